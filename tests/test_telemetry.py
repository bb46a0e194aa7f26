"""telemetry: locked appends from real concurrent processes, torn/corrupt lines, gzip rotation,
atomic state files, state diffs, and the documented row schemas."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest

from dispatch import telemetry
from dispatch.results import ResultRow, append_result, read_results
from dispatch.telemetry import ReadStats, append, diff_states, read, read_state, write_state

SCHEMAS = Path(__file__).resolve().parent.parent / "telemetry"
T0 = datetime(2024, 5, 1, tzinfo=UTC)


def clock(start: datetime = T0, step: timedelta = timedelta(minutes=1)):
    """A fake clock for `append(now=...)`: each call is one step later."""
    t = [start - step]

    def now() -> datetime:
        t[0] += step
        return t[0]

    return now


def schema(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / name).read_text()))


# ---- append ----------------------------------------------------------------------------------


def test_append_adds_schema_and_ts_and_creates_dirs(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "metrics.jsonl"
    append(path, {"kind": "snapshot", "n": 1}, now=clock())
    append(path, {"kind": "x", "ts": "2020-01-01T00:00:00.000Z", "schema": 7}, fsync=True)
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    assert json.loads(lines[0]) == {"schema": 1, "ts": "2024-05-01T00:00:00.000Z", "kind": "snapshot", "n": 1}
    assert json.loads(lines[1])["ts"] == "2020-01-01T00:00:00.000Z"  # the row's own values win
    assert json.loads(lines[1])["schema"] == 7


def test_newlines_in_values_stay_inside_one_line(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    append(path, {"kind": "k", "subject": "a\nb\r\nc"})
    assert path.read_bytes().count(b"\n") == 1
    assert next(read(path))["subject"] == "a\nb\r\nc"


# ---- concurrency: real processes -------------------------------------------------------------


def _write_metrics(path: str, writer: int, count: int, barrier, max_bytes: int | None) -> None:
    barrier.wait()
    pad = "x" * 1000  # ~1 KB rows make a torn or interleaved write likely if locking were wrong
    for seq in range(count):
        append(Path(path), {"kind": "snapshot", "writer": writer, "seq": seq, "pad": pad},
               max_bytes=max_bytes, keep=100)


def _write_results(path: str, count: int, barrier) -> None:
    barrier.wait()
    for seq in range(count):
        append_result(Path(path), ResultRow(
            timestamp=T0 + timedelta(seconds=seq), run_id=f"r{seq}", repo="o/r", issue=seq,
            agent="kimi", outcome="failed", error="boom\n" * 50 + "," * 40 + '"quoted"'))


def _run_writers(tmp_path: Path, max_bytes: int | None) -> tuple[Path, Path]:
    ctx = multiprocessing.get_context("spawn")
    metrics, results = tmp_path / "telemetry" / "metrics.jsonl", tmp_path / "results.csv"
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_write_metrics, args=(str(metrics), w, 2000, barrier, max_bytes))
             for w in (1, 2)]
    procs.append(ctx.Process(target=_write_results, args=(str(results), 1000, barrier)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return metrics, results


def test_concurrent_processes_never_interleave_lines(tmp_path: Path) -> None:
    metrics, results = _run_writers(tmp_path, max_bytes=None)
    raw = metrics.read_bytes()
    assert raw.endswith(b"\n")
    rows = [json.loads(line) for line in raw.splitlines()]  # every line parses
    assert len(rows) == 4000
    for w in (1, 2):
        assert [r["seq"] for r in rows if r["writer"] == w] == list(range(2000))
    lines = results.read_text().splitlines()
    assert len(lines) == 1001 and lines[0].startswith("timestamp,run_id,")
    assert sum(line.startswith("timestamp,") for line in lines) == 1  # header written once
    stats = ReadStats()
    parsed = list(read_results(results, stats=stats))
    assert [r.run_id for r in parsed] == [f"r{i}" for i in range(1000)]
    assert stats == ReadStats(rows=1000, torn=0, corrupt=0)


def test_concurrent_appends_with_rotation_lose_nothing(tmp_path: Path) -> None:
    metrics, _ = _run_writers(tmp_path, max_bytes=300_000)
    segs = telemetry.segments(metrics)
    assert len(segs) >= 10 and all(s.name.endswith(".gz") for s in segs[:-1])
    for seg in segs[:-1]:
        assert os.path.getsize(seg) < 300_000  # really compressed
    stats = ReadStats()
    rows = list(read(metrics, stats=stats))
    assert stats == ReadStats(rows=4000, torn=0, corrupt=0)
    for w in (1, 2):  # each writer's rows come back in the order it wrote them
        assert [r["seq"] for r in rows if r["writer"] == w] == list(range(2000))


# ---- torn and corrupt lines ------------------------------------------------------------------


def test_truncated_file_counts_one_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    for i in range(3):
        append(path, {"kind": "snapshot", "i": i})
    size = path.stat().st_size
    os.truncate(path, size - 10)  # cut the last row mid-line
    stats = ReadStats()
    assert [r["i"] for r in read(path, stats=stats)] == [0, 1]
    assert stats == ReadStats(rows=2, torn=1, corrupt=0)
    # The next append closes the fragment off: it becomes one corrupt line, the new row survives.
    append(path, {"kind": "snapshot", "i": 3})
    stats = ReadStats()
    assert [r["i"] for r in read(path, stats=stats)] == [0, 1, 3]
    assert stats == ReadStats(rows=3, torn=0, corrupt=1)


def test_corrupt_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append(path, {"kind": "a"})
    with open(path, "ab") as f:
        f.write(b"not json\n[1, 2]\n\n\xff\xfe\n")
    append(path, {"kind": "b"})
    stats = ReadStats()
    assert [r["kind"] for r in read(path, stats=stats)] == ["a", "b"]
    assert stats == ReadStats(rows=2, torn=0, corrupt=3)  # the blank line is not counted


def test_missing_file_reads_as_empty(tmp_path: Path) -> None:
    stats = ReadStats()
    assert list(read(tmp_path / "none.jsonl", stats=stats)) == []
    assert list(read(tmp_path / "no" / "dir.jsonl", stats=stats)) == []
    assert stats == ReadStats()
    assert list(tmp_path.iterdir()) == []  # reading leaves nothing behind


def test_since_filters_rows_and_counts_rows_without_a_time(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    now = clock(step=timedelta(hours=1))
    for i in range(5):
        append(path, {"kind": "k", "i": i}, now=now)
    append(path, {"kind": "k", "i": 99, "ts": "yesterday"})
    stats = ReadStats()
    rows = list(read(path, since=T0 + timedelta(hours=3), stats=stats))
    assert [r["i"] for r in rows] == [3, 4]
    assert stats == ReadStats(rows=2, torn=0, corrupt=1)


# ---- rotation --------------------------------------------------------------------------------


def test_rotation_gzips_and_reader_follows_in_order(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    row = {"kind": "snapshot", "pad": "y" * 200}
    for i in range(40):
        append(path, {**row, "i": i}, max_bytes=2_000, keep=3)
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert names == ["metrics.jsonl", "metrics.jsonl.1.gz", "metrics.jsonl.2.gz", "metrics.jsonl.3.gz"]
    with gzip.open(tmp_path / "metrics.jsonl.1.gz") as f:  # a real gzip file
        assert json.loads(f.readline())["kind"] == "snapshot"
    assert path.stat().st_size <= 2_000
    got = [r["i"] for r in read(path)]
    # Older segments beyond keep=3 are dropped; what remains is contiguous and ends at 39.
    assert got == list(range(got[0], 40)) and len(got) >= 20


def test_reader_keeps_its_files_across_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    for i in range(10):
        append(path, {"kind": "k", "i": i})
    it = read(path)
    assert next(it)["i"] == 0
    for i in range(10, 20):  # rotates on the first of these: the live file is gzipped and unlinked
        append(path, {"kind": "k", "i": i}, max_bytes=400)
    rest = [r["i"] for r in it]
    assert rest[:9] == list(range(1, 10))  # the rows it started with, none lost or doubled


# ---- state files -----------------------------------------------------------------------------


def test_write_state_is_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "t" / "last_state.json"
    write_state(path, {"agents": {"a": {"state": "idle"}}})
    write_state(path, {"agents": {"a": {"state": "working"}}})
    assert read_state(path) == {"agents": {"a": {"state": "working"}}}
    assert [p.name for p in path.parent.iterdir()] == ["last_state.json"]


def test_failed_write_keeps_the_old_state_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "last_state.json"
    write_state(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_state(path, {("tuple", "key"): 1})  # not serialisable: fails mid-write
    assert read_state(path) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last_state.json"]


@pytest.mark.parametrize("content", [b'{"agents": {"a"', b"[1, 2]", b"\x00\xff", b""])
def test_corrupt_state_reads_empty_counts_it_and_is_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "last_state.json"
    path.write_bytes(content)
    stats = ReadStats()
    assert read_state(path, stats=stats) == {}
    assert stats.corrupt == 1
    write_state(path, {"fresh": True})
    assert read_state(path) == {"fresh": True}


def test_missing_state_is_empty(tmp_path: Path) -> None:
    assert read_state(tmp_path / "nope.json") == {}


# ---- diff_states -----------------------------------------------------------------------------


STATES = [
    {  # 0: baseline
        "agents": {"claude": {"state": "working", "run_id": "r1"}, "kimi": {"state": "idle"}},
        "panes": {"%1": {"alive": True, "idle": False, "command": "claude"},
                  "%2": {"alive": True, "idle": True, "command": "kimi"}},
        "cron": {"missing": []},
        "model_server": {"up": True, "url": "http://127.0.0.1:9/v1"},
        "sprints": {"running": ["r1"], "failed": []},
        "pulls": {"o/a#1": "open"},
        "issues": {"o/a#5": "open"},
    },
    {  # 1: claude goes idle, kimi starts r2; pane %2 active, %1 dies, %3 starts; cron line lost
        "agents": {"claude": {"state": "idle"}, "kimi": {"state": "working", "run_id": "r2"}},
        "panes": {"%2": {"alive": True, "idle": False, "command": "kimi"},
                  "%3": {"alive": True, "idle": False, "command": "bash"}},
        "cron": {"missing": ["*/5 * * * * dispatch collect"]},
        "model_server": {"up": False, "url": "http://127.0.0.1:9/v1"},
        "sprints": {"running": ["r2"], "failed": ["r1"]},
        "pulls": {"o/a#1": "merged", "o/b#2": "open"},
        "issues": {"o/a#5": "closed"},
    },
    {  # 2: probes for tmux and cron failed (sections absent); server back; PR closed; stuck
        "agents": {"claude": {"state": "idle"}, "kimi": {"state": "stuck", "run_id": "r2"}},
        "model_server": {"up": True, "url": "http://127.0.0.1:9/v1"},
        "sprints": {"running": [], "failed": ["r1"]},
        "pulls": {"o/b#2": "closed"},
        "issues": {"o/a#5": "closed"},
    },
]


def test_diff_states_scripted_sequence() -> None:
    assert diff_states({}, STATES[0]) == []  # first run is the baseline
    assert diff_states(STATES[0], STATES[0]) == []
    assert diff_states(STATES[0], STATES[1]) == [
        {"kind": "agent_idle", "subject": "claude", "from": "working", "to": "idle"},
        {"kind": "agent_working", "subject": "kimi", "from": "idle", "to": "working", "run_id": "r2"},
        {"kind": "pane_died", "subject": "%1", "command": "claude"},
        {"kind": "pane_active", "subject": "%2", "command": "kimi"},
        {"kind": "pane_started", "subject": "%3", "command": "bash"},
        {"kind": "cron_missing", "subject": "*/5 * * * * dispatch collect"},
        {"kind": "model_server_down", "subject": "http://127.0.0.1:9/v1"},
        {"kind": "sprint_started", "subject": "r2", "run_id": "r2"},
        {"kind": "sprint_failed", "subject": "r1", "run_id": "r1"},
        {"kind": "pr_merged", "subject": "o/a#1"},
        {"kind": "pr_opened", "subject": "o/b#2"},
        {"kind": "issue_closed", "subject": "o/a#5"},
    ]
    saved = {**STATES[1], **STATES[2]}  # what the collector keeps: absent sections carry over
    assert diff_states(STATES[1], STATES[2]) == [
        {"kind": "agent_stuck", "subject": "kimi", "from": "working", "to": "stuck", "run_id": "r2"},
        {"kind": "model_server_up", "subject": "http://127.0.0.1:9/v1"},
        {"kind": "pr_closed", "subject": "o/b#2"},
    ]
    restored = {**saved, "cron": {"missing": []},
                "panes": {"%2": {"alive": False, "idle": False, "command": "kimi"},
                          "%3": {"alive": True, "idle": True, "command": "bash"}}}
    assert diff_states(saved, restored) == [
        {"kind": "pane_died", "subject": "%2", "command": "kimi"},
        {"kind": "pane_idle", "subject": "%3", "command": "bash"},
        {"kind": "cron_restored", "subject": "*/5 * * * * dispatch collect"},
    ]


def test_diff_states_unknown_sections_and_first_seen_subjects() -> None:
    old = {"agents": {}}
    new = {"agents": {"ezra": {"state": "dead"}}, "model_server": {"up": True},
           "cron": {"missing": ["a"]}, "issues": {"o/r#1": "open", "o/r#2": "closed"}}
    assert diff_states(old, new) == [
        {"kind": "agent_dead", "subject": "ezra", "from": None, "to": "dead"},
        {"kind": "cron_missing", "subject": "a"},
        {"kind": "issue_closed", "subject": "o/r#2"},
    ]  # unknown -> up is no recovery; a newly seen open issue is no news
    assert diff_states(old, {"model_server": {"up": False}}) == [
        {"kind": "model_server_down", "subject": "model_server"}]


# ---- schemas ---------------------------------------------------------------------------------


def test_event_rows_match_events_schema(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    for old, new in zip(STATES, STATES[1:], strict=False):
        for ev in diff_states(old, new):
            append(path, ev)
    rows = list(read(path))
    assert len(rows) == 15
    validator = schema("events.schema.json")
    for row in rows:
        validator.validate(row)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**rows[0], "kind": "agent_sleepy"})


def test_snapshot_row_matches_metrics_schema(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append(path, {
        "kind": "snapshot", "duration_s": 0.4,
        "agents": {"claude": {"state": "working", "since": "2024-05-01T00:00:00.000Z", "run_id": "r1"}},
        "backlog": {"open": 3, "eligible": 1},
        "panes": [{"id": "%1", "command": "claude", "pid": 12, "alive": True, "idle": False}],
        "probes": {"tmux": "ok", "forge": "error: 502 for GET /api/v1/repos"},
        "cron": {"expected": 3, "missing": []}, "model_server": {"up": True},
        "sprints": {"running": ["r1"], "failed": []},
        "forge": {"prs_opened": 1, "prs_merged": 0, "issues_closed": 0, "comments": {"bot": 2}},
    })
    validator = schema("metrics.schema.json")
    row = next(read(path))
    validator.validate(row)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**row, "probes": {"tmux": "broken"}})


def test_a_wrong_shaped_state_is_trimmed_not_fatal(tmp_path):
    import json

    from dispatch.telemetry import diff_states, read_collector_state

    path = tmp_path / "last_state.json"
    path.write_text(json.dumps({"agents": {"claude": "working", "kimi": {"state": "idle"}},
                                "sprints": {"running": 5, "failed": ["r1"]}, "cron": {"missing": 3},
                                "ts": "2026-11-25T09:00:00Z"}))
    state = read_collector_state(path)
    assert state == {"agents": {"kimi": {"state": "idle"}}, "sprints": {"failed": ["r1"]},
                     "ts": "2026-11-25T09:00:00Z"}
    diff_states(state, {"agents": {"kimi": {"state": "working"}}, "sprints": {"running": [], "failed": []}})
