"""A whole sprint against the Gitea emulator, as a ratio to the bare `git clone` + `git push` in it.

Run: .venv/bin/python bench/bench_sprint.py [--runs 5]
Both are measured in the same run, alternating, against the same emulator and repository; the
sprint uses the direct backend and an in-process scripted model (write a file, then finish), so
what is left is dispatch's own overhead: forge calls, locks, claims, prompt, commit, PR, results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dispatch.config import config_from_dict  # noqa: E402
from dispatch.forge import ForgeClient  # noqa: E402
from dispatch.sprint import Sprinter  # noqa: E402
from tests.emulator.gitea import GiteaEmulator  # noqa: E402
from tests.emulator.model_server import call, say  # noqa: E402
from tests.fakes import ScriptedModel  # noqa: E402

TOKEN = "bench-token-0123456789"
REPO = "bench/app"


def bare_clone_push(emu: GiteaEmulator, work: Path, i: int) -> float:
    askpass = work / "askpass.sh"
    askpass.write_text(f"#!/bin/sh\necho {TOKEN}\n")
    askpass.chmod(0o700)
    env = {**os.environ, "GIT_ASKPASS": str(askpass), "GIT_TERMINAL_PROMPT": "0",
           "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@x"}
    dest = work / f"bare-{i}"
    t0 = time.perf_counter()
    subprocess.run(["git", "clone", "-q", f"{emu.url}/{REPO}.git", str(dest)], env=env, check=True)
    (dest / "f.txt").write_text("x\n")
    subprocess.run(["git", "-C", str(dest), "checkout", "-qb", f"bare-{i}"], env=env, check=True)
    subprocess.run(["git", "-C", str(dest), "add", "-A"], env=env, check=True)
    subprocess.run(["git", "-C", str(dest), "commit", "-qm", "x"], env=env, check=True)
    subprocess.run(["git", "-C", str(dest), "push", "-q", "origin", f"bare-{i}"], env=env, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        emu = GiteaEmulator(work / "gitea", validate=False)
        emu.add_user("bot", TOKEN)
        emu.add_repo(REPO, git=True)
        emu.start()
        token_file = work / "token"
        token_file.write_text(TOKEN)
        cfg = config_from_dict({
            "gitea": {"url": emu.url, "token_file": str(token_file), "retries": 0},
            "repos": [REPO], "agents": [{"name": "bench"}], "state_dir": str(work / "state"),
            "sprint": {"backends": ["direct"]}}, env={})
        sprinter = Sprinter(cfg, ForgeClient(emu.url, TOKEN, retries=0), TOKEN,
                            make_model=lambda m: ScriptedModel([call("write_file", path="f.txt", content="x\n"),
                                                                say("done")]))
        sprints, bares = [], []
        bare_clone_push(emu, work, -1)  # warm up git and the page cache
        for i in range(args.runs):
            n = emu.add_issue(REPO, f"Task {i}")
            t0 = time.perf_counter()
            out = sprinter.run(REPO, n, backend="direct")
            sprints.append(time.perf_counter() - t0)
            assert out.outcome == "success", out
            bares.append(bare_clone_push(emu, work, i))
        requests = len(emu.requests)
        emu.stop()
    s, b = statistics.median(sprints), statistics.median(bares)
    print(f"{'measure':40} {'median ms':>10}")
    print(f"{'bare git clone + commit + push':40} {b * 1000:10.1f}")
    print(f"{'whole sprint (direct, scripted model)':40} {s * 1000:10.1f}")
    print(f"ratio sprint / bare git: {s / b:.2f}x over {args.runs} runs; "
          f"{requests / args.runs:.0f} HTTP requests per sprint+bare pair")


if __name__ == "__main__":
    main()
