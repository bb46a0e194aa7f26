"""Cold start of `dispatch --help` as a ratio to `python -c "import typer"`, the floor of a typer CLI.

Run: .venv/bin/python bench/bench_cli_startup.py [--runs 15]
Both commands alternate in one run so machine noise hits them alike; the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    cases = {
        "python -c 'import typer'": [sys.executable, "-c", "import typer"],
        "dispatch --help": [str(VENV_BIN / "dispatch"), "--help"],
        "dispatch triage --help": [str(VENV_BIN / "dispatch"), "triage", "--help"],
        "python -c 'import openai' (for scale)": [sys.executable, "-c", "import openai"],
    }
    for cmd in cases.values():  # warm the page cache once
        timed(cmd)
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.runs):
        for name, cmd in cases.items():
            samples[name].append(timed(cmd))
    floor = statistics.median(samples["python -c 'import typer'"])
    print(f"{'command':42} {'median ms':>10} {'ratio':>7}")
    for name, xs in samples.items():
        med = statistics.median(xs)
        print(f"{name:42} {med * 1000:10.1f} {med / floor:7.2f}x")


if __name__ == "__main__":
    main()
