"""Triage of a large backlog against the Gitea emulator with injected latency.

Run: .venv/bin/python bench/bench_triage.py [--repos 20 --issues 300 --latency 0.02 --runs 3]

Reports, per client concurrency, the HTTP requests made against the minimum the page cap allows
(1 settings + per repo ceil(issues / cap) issue pages + 1 PR page), and the wall time of
`backlog.fetch` + `triage.triage` against requests x latency / concurrency. The emulator's spec
validation is off here: it is test machinery, and on a small machine it would be what we time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dispatch.backlog import fetch  # noqa: E402
from dispatch.config import AgentConfig, TriageConfig  # noqa: E402
from dispatch.forge import ForgeClient  # noqa: E402
from dispatch.triage import triage  # noqa: E402
from tests.emulator.gitea import GiteaEmulator  # noqa: E402

TOKEN = "bench-token"
AGENTS = [AgentConfig("claude", ["architecture", "refactor"], 2), AgentConfig("kimi", ["bug", "tests"], 2)]
LABELS = [[], ["P0", "bug"], ["P1"], ["P2", "refactor"], ["P3", "tests"], ["epic"], ["blocked"]]


def seed(emu: GiteaEmulator, repos: int, issues: int) -> list[str]:
    now = datetime.now(UTC)
    emu.add_user("bench", TOKEN)
    names = []
    for r in range(repos):
        name = f"org{r % 4}/repo{r:02d}"
        emu.add_repo(name)
        for i in range(issues):
            emu.add_issue(name, f"Issue {i} of {name}", "Something to do.\n" * (i % 7),
                          labels=LABELS[i % len(LABELS)], created_at=now - timedelta(days=i % 90))
        emu.add_pull(name, "Work in progress", "Closes #3", head="wip")
        names.append(name)
    return names


def minimum_requests(repos: int, issues: int, cap: int) -> int:
    return 1 + repos * math.ceil(issues / cap) + repos


def run_once(emu: GiteaEmulator, names: list[str], concurrency: int) -> tuple[float, int, int, int]:
    """(seconds, requests the server saw, eligible, skipped) for one fetch + triage."""
    client = ForgeClient(emu.url, TOKEN, concurrency=concurrency)
    emu.requests.clear()
    t0 = time.perf_counter()
    backlog = fetch(client, names)
    result = triage(list(backlog.issues), backlog.open_pulls, AGENTS, TriageConfig(), datetime.now(UTC))
    elapsed = time.perf_counter() - t0
    client.session.close()
    return elapsed, emu.count(), len(result.ranked), len(result.skipped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repos", type=int, default=20)
    ap.add_argument("--issues", type=int, default=300, help="open issues per repo")
    ap.add_argument("--cap", type=int, default=50, help="the server's max_response_items")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added to each request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--runs", type=int, default=3, help="runs per concurrency; the median is shown")
    args = ap.parse_args()

    with GiteaEmulator(page_cap=args.cap, validate=False) as emu:
        names = seed(emu, args.repos, args.issues)
        emu.latency = args.latency
        floor = minimum_requests(args.repos, args.issues, args.cap)
        print(f"{args.repos} repos x {args.issues} open issues, page cap {args.cap}, "
              f"{args.latency * 1000:g} ms latency; minimum requests {floor}")
        print(f"{'concurrency':>11} {'requests':>9} {'minimum':>8} {'wall s':>8} "
              f"{'req x lat / conc':>17} {'ratio':>6} {'eligible':>9} {'skipped':>8}")
        for conc in args.concurrency:
            samples = [run_once(emu, names, conc) for _ in range(args.runs)]
            wall = statistics.median(s[0] for s in samples)
            made, eligible, skipped = samples[-1][1:]
            ideal = made * args.latency / conc
            print(f"{conc:>11} {made:>9} {floor:>8} {wall:>8.2f} {ideal:>17.2f} "
                  f"{wall / ideal:>5.2f}x {eligible:>9} {skipped:>8}")


if __name__ == "__main__":
    main()
