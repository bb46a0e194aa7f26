"""Triage of a large backlog against the Gitea emulator with injected latency.

Run: .venv/bin/python bench/bench_triage.py [--repos 20 --issues 300 --latency 0.02 --runs 3]

Reports, per client concurrency, the HTTP requests made against the minimum the page cap allows
(1 settings + per repo ceil(issues / cap) issue pages + 1 PR page), and the wall time of
`backlog.fetch` + `triage.triage` against requests x latency / concurrency, and against the same
run at 0 ms latency (the client's own CPU cost: parsing JSON, building records, scoring).
The emulator runs in a child process with spec validation off, so the timed process pays only
what it would pay against a real Gitea.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
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


def serve(conn, cap: int, repos: int, issues: int) -> None:
    """Child process: seed and run the emulator, then obey (command, arg) messages."""
    with GiteaEmulator(page_cap=cap, validate=False) as emu:
        conn.send((emu.url, seed(emu, repos, issues)))
        while True:
            cmd, arg = conn.recv()
            if cmd == "latency":
                emu.latency = arg
                emu.requests.clear()
            elif cmd == "count":
                conn.send(emu.count())
            else:
                break


def run_once(url: str, names: list[str], concurrency: int) -> tuple[float, float, int, int, int]:
    """(seconds in all, of which triage, requests the client made, eligible, skipped)."""
    client = ForgeClient(url, TOKEN, concurrency=concurrency)
    t0 = time.perf_counter()
    backlog = fetch(client, names)
    t1 = time.perf_counter()
    result = triage(list(backlog.issues), backlog.open_pulls, AGENTS, TriageConfig(), datetime.now(UTC))
    t2 = time.perf_counter()
    client.session.close()
    return t2 - t0, t2 - t1, client.requests_made, len(result.ranked), len(result.skipped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repos", type=int, default=20)
    ap.add_argument("--issues", type=int, default=300, help="open issues per repo")
    ap.add_argument("--cap", type=int, default=50, help="the server's max_response_items")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added to each request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--runs", type=int, default=3, help="runs per concurrency; the median is shown")
    args = ap.parse_args()

    conn, child_conn = mp.Pipe()
    child = mp.Process(target=serve, args=(child_conn, args.cap, args.repos, args.issues), daemon=True)
    child.start()
    url, names = conn.recv()
    floor = minimum_requests(args.repos, args.issues, args.cap)
    print(f"{args.repos} repos x {args.issues} open issues, page cap {args.cap}, "
          f"{args.latency * 1000:g} ms latency; minimum requests {floor}")
    print(f"{'concurrency':>11} {'requests':>9} {'server saw':>10} {'minimum':>8} {'wall s':>7} "
          f"{'req*lat/conc':>12} {'ratio':>6} {'wall@0ms':>8} {'triage s':>8} {'eligible':>8} {'skipped':>7}")
    try:
        for conc in args.concurrency:
            conn.send(("latency", 0.0))
            cpu = statistics.median(run_once(url, names, conc)[0] for _ in range(args.runs))
            conn.send(("latency", args.latency))
            samples = [run_once(url, names, conc) for _ in range(args.runs)]
            conn.send(("count", None))
            seen = conn.recv() // args.runs
            wall = statistics.median(s[0] for s in samples)
            pure = statistics.median(s[1] for s in samples)
            made, eligible, skipped = samples[-1][2:]
            ideal = made * args.latency / conc
            print(f"{conc:>11} {made:>9} {seen:>10} {floor:>8} {wall:>7.2f} {ideal:>12.2f} "
                  f"{wall / ideal:>5.2f}x {cpu:>8.2f} {pure:>8.2f} {eligible:>8} {skipped:>7}")
    finally:
        conn.send(("stop", None))
        child.join(timeout=10)

if __name__ == "__main__":
    main()
