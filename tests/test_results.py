"""results.csv: header once, one physical line per sprint, a tolerant reader, the schema."""

from __future__ import annotations

import csv
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest

from dispatch.results import COLUMNS, ERROR_MAX, ResultRow, append_result, one_line, read_results
from dispatch.telemetry import ReadStats

T0 = datetime(2024, 5, 1, 6, 0, tzinfo=UTC)
SCHEMA = Path(__file__).resolve().parent.parent / "telemetry" / "results.schema.json"


def row(i: int = 1, **kw) -> ResultRow:
    base = dict(timestamp=T0 + timedelta(minutes=i), run_id=f"r{i}", repo="o/app", issue=i,
                agent="kimi", backend="direct", model="qwen3:14b", outcome="success",
                duration_s=12.5, steps=7, tokens_in=1000, tokens_out=250, cost_usd=0.0125,
                pr_url=f"http://forge.test/o/app/pulls/{i}")
    return ResultRow(**{**base, **kw})


def test_columns_are_exactly_the_documented_ones(tmp_path: Path) -> None:
    assert COLUMNS == ("timestamp", "run_id", "repo", "issue", "agent", "backend", "model",
                       "outcome", "duration_s", "steps", "tokens_in", "tokens_out", "cost_usd",
                       "pr_url", "error")
    path = tmp_path / "results.csv"
    append_result(path, row(1))
    append_result(path, row(2, outcome="nothing_to_do", repo="", issue=None, pr_url=""))
    lines = path.read_text().splitlines()
    assert lines == [
        ",".join(COLUMNS),
        "2024-05-01T06:01:00.000Z,r1,o/app,1,kimi,direct,qwen3:14b,success,12.5,7,1000,250,0.0125,"
        "http://forge.test/o/app/pulls/1,",
        "2024-05-01T06:02:00.000Z,r2,,,kimi,direct,qwen3:14b,nothing_to_do,12.5,7,1000,250,0.0125,,",
    ]


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state" / "results.csv"
    rows = [row(1), row(2, outcome="failed", error="boom", pr_url=""), row(3, issue=None, outcome="skipped")]
    for r in rows:
        append_result(path, r)
    stats = ReadStats()
    assert list(read_results(path, stats=stats)) == rows
    assert stats == ReadStats(rows=3, torn=0, corrupt=0)


def test_header_goes_into_an_existing_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.touch()
    append_result(path, row(1))
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)


def test_error_text_is_one_bounded_line(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    error = "Traceback:\n  File \"x\", line 3,\r\n\tboom, \"quoted\"\n" + "z" * 1000
    append_result(path, row(1, outcome="failed", error=error))
    lines = path.read_text().splitlines()
    assert len(lines) == 2  # header + exactly one physical line
    got = next(read_results(path))
    assert got.error.startswith('Traceback: File "x", line 3, boom, "quoted" zzz')
    assert len(got.error) == ERROR_MAX and got.error.endswith("…")
    assert next(csv.reader([lines[1]]))[-1] == got.error
    assert one_line("a \n\n b\t") == "a b"


def test_torn_last_line_is_counted_and_the_next_append_survives(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    for i in range(3):
        append_result(path, row(i))
    os.truncate(path, path.stat().st_size - 5)
    stats = ReadStats()
    assert [r.run_id for r in read_results(path, stats=stats)] == ["r0", "r1"]
    assert stats == ReadStats(rows=2, torn=1, corrupt=0)
    append_result(path, row(9))
    stats = ReadStats()
    assert [r.run_id for r in read_results(path, stats=stats)] == ["r0", "r1", "r9"]
    assert stats == ReadStats(rows=3, torn=0, corrupt=1)


def test_malformed_rows_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    append_result(path, row(1))
    with open(path, "a") as f:
        f.write("garbage\n")
        f.write("2024-05-01T00:00:00Z,r5,o/a,notanumber,a,b,m,success,1,1,1,1,1,,\n")
        f.write("2024-05-01T00:00:00Z,r6,o/a,1,a,b,m,exploded,1,1,1,1,1,,\n")
    append_result(path, row(2))
    stats = ReadStats()
    assert [r.run_id for r in read_results(path, stats=stats)] == ["r1", "r2"]
    assert stats == ReadStats(rows=2, torn=0, corrupt=3)


def test_since_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    assert list(read_results(path)) == []
    for i in range(5):
        append_result(path, row(i))
    assert [r.run_id for r in read_results(path, since=T0 + timedelta(minutes=3))] == ["r3", "r4"]


def test_outcome_and_timestamp_are_validated() -> None:
    with pytest.raises(ValueError, match="outcome"):
        row(1, outcome="won")
    with pytest.raises(ValueError, match="timezone"):
        row(1, timestamp=datetime(2024, 5, 1))


def test_rows_match_the_results_schema() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    assert tuple(validator.schema["required"]) == COLUMNS
    for r in (row(1), row(2, issue=None, outcome="partial", pr_url="", error="pushed, PR refused")):
        validator.validate(r.to_dict())
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**row(1).to_dict(), "outcome": "won"})
