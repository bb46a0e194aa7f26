"""The collector's run time per snapshot against the Gitea emulator, with and without tmux.

Run: .venv/bin/python bench/bench_collector.py [--repos 3 --issues 100 --active 20 --panes 8 --runs 5]

Each repo has `issues` open issues (the backlog probe reads them all, as triage does) and `active`
issues and PRs updated in the window, half of them commented on by an agent account (the forge
probe reads those threads, at most collector.MAX_THREADS). The emulator runs in a child process
with spec validation off; the scripted model server answers /v1/models. "with tmux" adds a
private tmux server with `panes` panes; "without" is a machine without tmux (the probe fails fast).
One `run_collector` per snapshot (probes + metrics append + diff + events + state), median shown.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dispatch.collector import run_collector  # noqa: E402
from dispatch.config import config_from_dict  # noqa: E402
from dispatch.forge import ForgeClient  # noqa: E402
from tests.emulator.gitea import GiteaEmulator  # noqa: E402
from tests.emulator.model_server import ModelServer  # noqa: E402

TOKEN = "bench-token"


def seed(emu: GiteaEmulator, repos: int, issues: int, active: int) -> list[str]:
    old = datetime.now(UTC) - timedelta(days=30)
    emu.add_user("bench", TOKEN)
    names = []
    for r in range(repos):
        name = f"acme/repo{r}"
        emu.add_repo(name)
        for i in range(issues):
            emu.add_issue(name, f"Old issue {i}", "Something to do.", labels=["bug"] if i % 3 else [],
                          created_at=old, updated_at=old)
        for i in range(active):  # touched in the window: half PRs, half issues, half commented
            n = (emu.add_pull(name, f"Change {i}", head=f"b{i}", author="claude-bot") if i % 2
                 else emu.add_issue(name, f"New issue {i}"))
            if i % 4 < 2:
                emu.add_comment(name, n, "On it.", author="claude-bot")
        names.append(name)
    return names


def serve(conn, repos: int, issues: int, active: int, latency: float) -> None:
    with GiteaEmulator(validate=False) as emu:
        emu.latency = latency
        conn.send((emu.url, seed(emu, repos, issues, active)))
        while True:
            cmd, _ = conn.recv()
            if cmd == "count":
                conn.send(emu.count())
                emu.requests.clear()
            else:
                break


def _no_tmux(argv, **kwargs):
    raise FileNotFoundError(argv[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repos", type=int, default=3)
    ap.add_argument("--issues", type=int, default=100, help="open issues per repo (the backlog)")
    ap.add_argument("--active", type=int, default=20, help="issues and PRs per repo updated in the window")
    ap.add_argument("--panes", type=int, default=8)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to each forge request")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    conn, child_conn = mp.Pipe()
    child = mp.Process(target=serve, args=(child_conn, args.repos, args.issues, args.active, args.latency),
                       daemon=True)
    child.start()
    url, names = conn.recv()
    socket = f"dispatch-bench-{uuid.uuid4().hex[:8]}"
    models = ModelServer()
    print(f"{args.repos} repos x ({args.issues} open + {args.active} active), {args.panes} panes, "
          f"{args.latency * 1000:g} ms forge latency, median of {args.runs}")
    print(f"{'tmux':>8} {'ms/snapshot':>12} {'min ms':>7} {'forge requests':>15} {'events':>7}")
    try:
        for with_tmux in (False, True):
            if with_tmux:
                if not shutil.which("tmux"):
                    print(f"{'with':>8} (tmux not installed)")
                    continue
                tmux = ["tmux", "-L", socket, "-f", "/dev/null"]
                subprocess.run([*tmux, "new-session", "-d", "-s", "claude", "sleep 600"], check=True)
                for i in range(args.panes - 1):
                    subprocess.run([*tmux, "new-window", "-d", "-t", "claude", "-n", f"w{i}", "sleep 600"], check=True)
            with tempfile.TemporaryDirectory(prefix="dispatch-bench-") as tmp:
                (Path(tmp) / "token").write_text(TOKEN)
                cfg = config_from_dict({
                    "gitea": {"url": url, "token_file": str(Path(tmp) / "token")}, "repos": names,
                    "agents": [{"name": "claude", "account": "claude-bot"}, {"name": "kimi", "account": "kimi-bot"}],
                    "llm": {"base_url": models.url + "/v1"}, "state_dir": str(Path(tmp) / "state"),
                    "collector": {"tmux_socket": socket}})
                client = ForgeClient(url, TOKEN)
                runner = subprocess.run if with_tmux else _no_tmux
                run_collector(cfg, client=client, runner=runner)  # warm-up and baseline state
                conn.send(("count", None))
                conn.recv()
                times, events = [], 0
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    events += len(run_collector(cfg, client=client, runner=runner))
                    times.append(time.perf_counter() - t0)
                conn.send(("count", None))
                per = conn.recv() / args.runs
            print(f"{'with' if with_tmux else 'without':>8} {statistics.median(times) * 1000:>12.1f} "
                  f"{min(times) * 1000:>7.1f} {per:>15.0f} {events:>7}")
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
        models.close()
        conn.send(("stop", None))
        child.join(timeout=10)


if __name__ == "__main__":
    main()
