"""Benchmark: `summarize` over generated telemetry, as a ratio to `wc -l` on the same files,
with the peak memory of each run, to show that memory stays flat as rows grow.

    .venv/bin/python bench/bench_report.py              # 100k and 1M rows
    .venv/bin/python bench/bench_report.py 10000 50000  # other sizes

Each size is summarised in a fresh child process so its ru_maxrss is that run's peak alone.
Not run by the tests.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dispatch.report import render_markdown, summarize  # noqa: E402
from dispatch.results import read_results  # noqa: E402
from dispatch.telemetry import ReadStats, append, format_ts, read  # noqa: E402

START = datetime(2024, 1, 1, tzinfo=UTC)
STEP = timedelta(seconds=3)  # 1M rows span about 35 days
AGENTS = ("claude", "kimi", "ezra", "hermes")
STATES = ("working", "working", "idle", "stuck", "dead")
KINDS = ("agent_idle", "agent_working", "pane_died", "pr_opened", "pr_merged", "sprint_failed")


def generate(folder: Path, rows: int) -> tuple[Path, Path]:
    """Two thirds snapshots into metrics.jsonl, a third events into events.jsonl."""
    metrics, events = folder / "metrics.jsonl", folder / "events.jsonl"
    with open(metrics, "w") as m, open(events, "w") as e:
        for i in range(rows):
            ts = format_ts(START + STEP * i)
            if i % 3:
                agents = ",".join(f'"{a}":{{"state":"{STATES[(i + j) % 5]}","pane":"%{j}"}}'
                                  for j, a in enumerate(AGENTS))
                m.write(f'{{"schema":1,"ts":"{ts}","kind":"snapshot","duration_s":0.42,'
                        f'"agents":{{{agents}}},"backlog":{{"open":{100 + i % 37},"eligible":{i % 11}}},'
                        f'"probes":{{"tmux":"ok","forge":"ok","cron":"ok","model_server":"ok"}}}}\n')
            else:
                kind = KINDS[i % len(KINDS)]
                e.write(f'{{"schema":1,"ts":"{ts}","kind":"{kind}","subject":"org/repo#{i % 5000}",'
                        f'"run_id":"run-{i}"}}\n')
    return metrics, events


def child(folder: Path, rows: int) -> None:
    """Summarise the files in `folder`; print seconds and peak RSS as JSON."""
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = {"results": ReadStats(), "metrics": ReadStats(), "events": ReadStats()}
    t0 = time.perf_counter()
    report = summarize(
        read_results(folder / "results.csv", stats=stats["results"]),
        read(folder / "metrics.jsonl", stats=stats["metrics"]),
        read(folder / "events.jsonl", stats=stats["events"]),
        since=START, until=START + STEP * rows, read_stats=stats,
    )
    render_markdown(report)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    read_rows = stats["metrics"].rows + stats["events"].rows
    print(json.dumps({"seconds": seconds, "base_kb": base_kb, "peak_kb": peak_kb, "rows": read_rows,
                      "snapshots": report.snapshots, "events": report.events_total}))


def wc_seconds(*files: Path) -> float:
    best = float("inf")
    for _ in range(3):  # best of three: the first run may still be warming the page cache
        t0 = time.perf_counter()
        subprocess.run(["wc", "-l", *map(str, files)], check=True, capture_output=True)
        best = min(best, time.perf_counter() - t0)
    return best


def append_rate(folder: Path, n: int = 5_000) -> float:
    """Locked appends per second (what each collector run pays per row)."""
    path = folder / "append.jsonl"
    t0 = time.perf_counter()
    for i in range(n):
        append(path, {"kind": "agent_idle", "subject": f"a{i}"})
    return n / (time.perf_counter() - t0)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        child(Path(argv[1]), int(argv[2]))
        return
    sizes = [int(a) for a in argv] or [100_000, 1_000_000]
    print(f"{'rows':>10} {'MB':>7} {'wc -l s':>8} {'report s':>9} {'ratio':>6} {'peak RSS MB':>12} {'delta MB':>9}")
    with tempfile.TemporaryDirectory(prefix="dispatch-bench-") as tmp:
        folder = Path(tmp)
        for rows in sizes:
            metrics, events = generate(folder, rows)
            size_mb = (metrics.stat().st_size + events.stat().st_size) / 1e6
            wc = wc_seconds(metrics, events)
            out = subprocess.run([sys.executable, __file__, "--child", tmp, str(rows)],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout)
            assert r["rows"] == rows, r  # every generated row was read back
            print(f"{rows:>10,} {size_mb:>7.1f} {wc:>8.3f} {r['seconds']:>9.2f} {r['seconds'] / wc:>5.0f}x "
                  f"{r['peak_kb'] / 1024:>12.1f} {(r['peak_kb'] - r['base_kb']) / 1024:>9.1f}")
        print(f"locked append(): {append_rate(folder):,.0f} rows/s")


if __name__ == "__main__":
    main(sys.argv[1:])
