"""The job queue against the in-process cron path, with no-op sprints, in the same run.

Run: .venv/bin/python bench/bench_queue.py [--jobs 200] [--idle 10] [--gap 1.5]
Starts a throwaway redis-server (appendonly, as in production) and two `run_worker` processes
(one thread each) whose sprint is a no-op that stamps its start time. Measures:
  - enqueue-to-start latency on an idle queue (one job at a time) and under a burst,
  - jobs per second for a burst of --jobs jobs across the two workers,
and the same no-op run by the cron path: called in-process, and as a fresh process per sprint
(what cron pays: interpreter, imports, config).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dispatch.config import load_config  # noqa: E402


def noop_runner(cfg, repo: str, issue: int, previous):
    """A sprint that does nothing but say when it started."""
    from dispatch.sprint import SprintOutcome

    line = json.dumps({"issue": issue, "start": time.time()}) + "\n"
    with open(os.environ["BENCH_STARTS"], "a") as f:
        f.write(line)
    return SprintOutcome("success", repo, issue, "bench"), "finished"


def worker_main(cfg_path: str) -> None:
    from dispatch.jobs import run_worker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    run_worker(load_config(Path(cfg_path)), ["claude"], threads=1, runner=noop_runner, stop=stop, grace_s=5)


def starts(path: Path) -> dict[int, float]:
    if not path.exists():
        return {}
    return {d["issue"]: d["start"] for d in map(json.loads, path.read_text().splitlines())}


def wait_count(path: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(starts(path)) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(starts(path))} of {n} jobs started")
        time.sleep(0.002)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def row(name: str, lat: list[float] | None, rate: float | None) -> str:
    med = f"{statistics.median(lat) * 1000:9.2f}" if lat else f"{'-':>9}"
    p95 = f"{pct(lat, 0.95) * 1000:9.2f}" if lat else f"{'-':>9}"
    r = f"{rate:10.1f}" if rate else f"{'-':>10}"
    return f"{name:<44}{med}{p95}{r}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=200, help="burst size")
    ap.add_argument("--idle", type=int, default=10, help="one-at-a-time jobs for idle latency")
    ap.add_argument("--gap", type=float, default=1.5,
                    help="seconds between idle jobs (a worker's poll backs off to 1 s when idle)")
    ap.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker)

    from dispatch.jobs import enqueue_sprint, make_broker
    from tests.redis_fixtures import RedisServer

    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("redis-server is not installed (scripts/setup.sh --system)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "redis").mkdir()
        server = RedisServer(binary, work / "redis").start()
        cfg_path = work / "config.yaml"
        cfg_path.write_text(json.dumps({
            "gitea": {"url": "http://127.0.0.1:9", "token_env": "BENCH_NO_TOKEN"},
            "agents": [{"name": "claude"}], "state_dir": str(work / "state"),
            "queue": {"url": server.url}}))
        cfg = load_config(cfg_path)
        env = {**os.environ, "BENCH_STARTS": str(work / "starts.jsonl"), "PYTHONPATH": str(ROOT)}
        os.environ["BENCH_STARTS"] = env["BENCH_STARTS"]
        marks = work / "starts.jsonl"
        workers = [subprocess.Popen([sys.executable, __file__, "--worker", str(cfg_path)], env=env)
                   for _ in range(2)]
        try:
            broker = make_broker(cfg)
            # warm up: both workers booted and polling
            for i in range(4):
                enqueue_sprint(cfg, "bench/app", 10_000 + i, "claude", broker=broker)
            wait_count(marks, 4)
            marks.unlink()

            idle = []
            for i in range(args.idle):
                t0 = time.time()
                enqueue_sprint(cfg, "bench/app", i, "claude", broker=broker)
                wait_count(marks, i + 1)
                idle.append(starts(marks)[i] - t0)
                time.sleep(args.gap)
            marks.unlink()

            sent = {}
            t0 = time.time()
            for i in range(args.jobs):
                sent[i] = time.time()
                enqueue_sprint(cfg, "bench/app", i, "claude", broker=broker)
            wait_count(marks, args.jobs)
            got = starts(marks)
            burst = [got[i] - sent[i] for i in range(args.jobs)]
            rate = args.jobs / (max(got.values()) - t0)
        finally:
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                w.wait(timeout=30)
            server.stop()

        # the cron path: the same no-op, called where the decision is made
        marks.unlink(missing_ok=True)
        called = {}
        t0 = time.time()
        for i in range(args.jobs):
            called[i] = time.time()
            noop_runner(cfg, "bench/app", i, None)
        inproc_rate = args.jobs / (time.time() - t0)
        got = starts(marks)
        inproc = [got[i] - called[i] for i in range(args.jobs)]
        # ...and as cron runs it: a fresh interpreter per sprint that imports the CLI and reads config
        procs = []
        code = ("import sys; from dispatch.cli import app; from dispatch.config import load_config; "
                f"from pathlib import Path; sys.path.insert(0, {str(ROOT)!r}); "
                "from bench.bench_queue import noop_runner; "
                f"noop_runner(load_config(Path({str(cfg_path)!r})), 'bench/app', int(sys.argv[1]), None)")
        marks.unlink(missing_ok=True)
        n_proc = min(args.idle, 20)
        t0 = time.time()
        for i in range(n_proc):
            t = time.time()
            subprocess.run([sys.executable, "-c", code, str(i)], env=env, check=True)
            procs.append(starts(marks)[i] - t)
        proc_rate = n_proc / (time.time() - t0)

    print(f"{'path (no-op sprints)':<44}{'median ms':>9}{'p95 ms':>9}{'jobs/s':>10}")
    print(row(f"queue, idle, enqueue->start ({args.idle} jobs)", idle, None))
    print(row(f"queue, burst of {args.jobs}, 2 workers", burst, rate))
    print(row("cron path, in-process call", inproc, inproc_rate))
    print(row(f"cron path, process per sprint ({n_proc})", procs, proc_rate))


if __name__ == "__main__":
    main()
