"""report: numbers from a hand-computed fixture, the Markdown comment, JSON, rich text, and one
self-contained HTML page with three SVG charts; memory stays bounded while streaming."""

from __future__ import annotations

import json
import re
import tracemalloc
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

from rich.console import Console

from dispatch.report import normalise_error, pr_ref, render_json, render_markdown, summarize
from dispatch.report_html import render_html, render_text
from dispatch.results import ResultRow, append_result, read_results
from dispatch.telemetry import ReadStats, append, format_ts, read

SINCE = datetime(2024, 5, 1, tzinfo=UTC)
UNTIL = SINCE + timedelta(days=1)


def at(hhmm: str, day: int = 1) -> datetime:
    h, m = map(int, hhmm.split(":"))
    return datetime(2024, 5, day, h, m, tzinfo=UTC)


def res(ts: datetime, run: str, agent: str, outcome: str, model: str = "", tin: int = 0,
        tout: int = 0, cost: float = 0.0, pr: str = "", error: str = "") -> ResultRow:
    return ResultRow(timestamp=ts, run_id=run, repo="o/a", issue=1, agent=agent, backend="direct",
                     model=model, outcome=outcome, tokens_in=tin, tokens_out=tout, cost_usd=cost,
                     pr_url=pr, error=error)


RESULTS = [
    res(at("23:00") - timedelta(days=1), "r0", "claude", "success"),  # before the window
    res(at("01:00"), "r1", "claude", "success", "qwen3:14b", 1000, 200, pr="http://forge/o/a/pulls/1"),
    res(at("02:00"), "r2", "claude", "failed", "qwen3:14b", 500, 100, error="timeout after 300s on step 12"),
    res(at("03:00"), "r3", "kimi", "failed", "qwen3:14b", 400, 80, error="timeout after 120s on step 3"),
    res(at("04:00"), "r4", "kimi", "success", "gpt-4o", 2000, 400, 0.05, pr="http://forge/o/b/pulls/7"),
    res(at("05:00"), "r5", "kimi", "nothing_to_do"),
    res(at("06:00"), "r6", "claude", "partial", "qwen3:14b", 300, 50),
    res(at("07:00"), "r7", "claude", "failed", "qwen3:14b", 100, 10, error="git push failed: 'origin' rejected"),
    res(at("10:00"), "r8", "kimi", "skipped"),
]


def snap(ts: datetime, claude: str, kimi: str, open_: int, eligible: int, forge: str = "ok") -> dict:
    return {"schema": 1, "ts": format_ts(ts), "kind": "snapshot",
            "agents": {"claude": {"state": claude}, "kimi": {"state": kimi}},
            "backlog": {"open": open_, "eligible": eligible},
            "probes": {"tmux": "ok", "forge": forge}}


METRICS = [
    snap(at("23:55") - timedelta(days=1), "dead", "dead", 99, 99),  # before the window
    snap(at("00:00"), "working", "idle", 10, 4),
    snap(at("00:05"), "working", "working", 10, 4),
    snap(at("00:10"), "idle", "stuck", 9, 3, forge="error: 502 for GET /api/v1/repos"),
    snap(at("01:10"), "idle", "idle", 8, 3),  # an hour later: the gap counts 15 minutes only
    snap(at("00:00", day=2), "working", "working", 1, 1),  # the window is [since, until)
]


def ev(ts: datetime, kind: str, subject: str, run_id: str = "") -> dict:
    row = {"schema": 1, "ts": format_ts(ts), "kind": kind, "subject": subject}
    return {**row, "run_id": run_id} if run_id else row


EVENTS = [
    ev(at("00:10"), "agent_idle", "claude"),
    ev(at("00:10"), "agent_stuck", "kimi"),
    ev(at("00:30"), "pr_opened", "o/a#1"),  # also in results: counted once
    ev(at("02:30"), "pane_died", "%3"),
    ev(at("04:30"), "sprint_failed", "r2", run_id="r2"),
    ev(at("05:00"), "pr_opened", "o/c#3"),
    ev(at("06:00"), "pr_merged", "o/a#1"),
    ev(at("07:00"), "issue_closed", "o/a#5"),
    ev(at("01:00", day=2), "pr_merged", "o/z#9"),  # after the window
]

READ_STATS = {"results": ReadStats(9, 0, 0), "metrics": ReadStats(6, 1, 0), "events": ReadStats(9, 0, 2)}


def fixture_report():
    return summarize(RESULTS, METRICS, EVENTS, since=SINCE, until=UNTIL, read_stats=READ_STATS)


def test_numbers_match_the_hand_computed_fixture() -> None:
    r = fixture_report()
    assert r.outcomes == {"failed": 3, "nothing_to_do": 1, "partial": 1, "skipped": 1, "success": 2}
    assert (r.attempted, r.succeeded, r.failed) == (6, 2, 3)
    assert r.success_rate == 2 / 6
    assert r.top_failures == (("timeout after <n>s on step <n>", 2), ("git push failed: <str> rejected", 1))
    assert (r.prs_opened, r.prs_merged, r.issues_closed) == (3, 1, 1)
    claude, kimi = r.agents
    assert (claude.name, claude.attempted, claude.succeeded, claude.failed) == ("claude", 4, 1, 2)
    assert (kimi.name, kimi.attempted, kimi.succeeded, kimi.failed) == ("kimi", 2, 1, 1)
    assert (claude.success_rate, kimi.success_rate, claude.per_day) == (0.25, 0.5, 1.0)
    assert claude.seconds == {"working": 600.0, "idle": 900.0, "stuck": 0.0, "dead": 0.0}
    assert kimi.seconds == {"working": 300.0, "idle": 300.0, "stuck": 900.0, "dead": 0.0}
    assert [(m.model, m.sprints, m.tokens_in, m.tokens_out, m.cost_usd) for m in r.models] == [
        ("gpt-4o", 1, 2000, 400, 0.05), ("qwen3:14b", 5, 2300, 440, 0.0)]
    assert [(d.day, d.attempted, d.succeeded) for d in r.days] == [(date(2024, 5, 1), 6, 2)]
    assert [(p.open, p.eligible) for p in r.backlog] == [(10, 4), (9, 3), (8, 3)]
    assert r.snapshots == 4 and r.probe_errors == {"forge": 1}
    assert r.events_total == 8 and len(r.timeline) == 8
    assert r.timeline[4].kind == "sprint_failed" and r.timeline[4].run_id == "r2"
    assert (r.torn, r.corrupt) == (1, 2)


def test_markdown_comment_lines() -> None:
    md = render_markdown(fixture_report())
    lines = md.splitlines()
    assert lines[0] == "## dispatch report · 2024-05-01 00:00 → 2024-05-02 00:00 UTC"
    for expected in [
        "- **Sprints:** 6 attempted, 2 succeeded, 3 failed (33% success); 1 partial, 1 nothing to do, 1 skipped",
        "- **PRs:** 3 opened, 1 merged; issues closed: 1",
        "- **Backlog:** 10 → 8 open, 4 → 3 eligible (4 snapshots)",
        "- **Probes failing:** forge ×1",
        "- **Telemetry:** 1 torn and 2 corrupt lines skipped",
        "| `timeout after <n>s on step <n>` | 2 |",
        "| `git push failed: <str> rejected` | 1 |",
        "| agent | attempted | succeeded | success | per day | working | idle | stuck |",
        "| claude | 4 | 1 | 25% | 1.0 | 10m | 15m | 0m |",
        "| kimi | 2 | 1 | 50% | 1.0 | 5m | 5m | 15m |",
        "| gpt-4o | 1 | 2,000 | 400 | 0.0500 |",
        "| qwen3:14b | 5 | 2,300 | 440 | 0.0000 |",
        "### Events (last 8 of 8)",
        "- 05-01 02:30 pane_died `%3`",
        "- 05-01 04:30 sprint_failed `r2` (run r2)",
    ]:
        assert expected in lines, expected
    assert "o/z#9" not in md and "99" not in md  # rows outside the window left no trace


def test_json_is_data_for_scripts() -> None:
    data = json.loads(render_json(fixture_report()))
    assert (data["attempted"], data["succeeded"], data["failed"], data["torn"]) == (6, 2, 3, 1)
    assert data["since"] == "2024-05-01T00:00:00.000Z"
    assert data["agents"][0]["name"] == "claude" and data["agents"][0]["success_rate"] == 0.25
    assert data["days"] == [{"day": "2024-05-01", "attempted": 6, "succeeded": 2}]
    assert data["top_failures"][0] == ["timeout after <n>s on step <n>", 2]


def test_rich_text_report() -> None:
    console = Console(record=True, width=120)
    console.print(render_text(fixture_report()))
    out = console.export_text()
    assert "6 attempted, 2 succeeded, 3 failed (33% success)" in out
    assert "timeout after <n>s on step <n>" in out
    assert re.search(r"claude\s+│\s+4\s+│\s+1\s+│\s+25%", out)


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))


def test_html_is_self_contained_with_three_svg_charts() -> None:
    page = render_html(fixture_report())
    assert page.startswith("<!DOCTYPE html>")
    parser = _Tags()
    parser.feed(page)
    svgs = {a.get("id"): a for t, a in parser.tags if t == "svg"}
    assert set(svgs) == {"chart-throughput", "chart-success", "chart-backlog"}
    assert all(a["class"] == "chart" for a in svgs.values())
    assert page.count("<svg") == page.count("</svg>") == 3
    # No external resources: no URLs at all, no scripts, no stylesheets or images to fetch.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*https?://""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert not {t for t, _ in parser.tags} & {"script", "link", "img", "iframe"}
    assert "url(" not in page
    # Charts carry the data: one day of bars, one bar per agent, two backlog lines.
    assert "<title>2024-05-01: 6 attempted</title>" in page
    assert "<title>2024-05-01: 2 succeeded</title>" in page
    assert "<title>claude: 1/4</title>" in page and "<title>kimi: 1/2</title>" in page
    assert len([a for t, a in parser.tags if t == "polyline"]) == 2


def test_html_escapes_text_and_handles_an_empty_window() -> None:
    rows = [res(at("01:00"), "r1", "<script>alert(1)</script>", "failed", error="<b>boom</b>")]
    page = render_html(summarize(rows, [], [], since=SINCE, until=UNTIL, read_stats=None))
    assert "<script>" not in page and "&lt;script&gt;" in page
    empty = render_html(summarize([], [], [], since=SINCE, until=UNTIL, read_stats=None))
    assert empty.count("no data in the window") == 3
    assert 'id="chart-throughput"' in empty


def test_error_normalisation_and_pr_refs() -> None:
    assert normalise_error("clone of https://forge/x.git failed in /tmp/ws/abc after 3 tries") == \
        "clone of <url> failed in <path> after <n> tries"
    assert normalise_error("commit 3f9a2c1d not found") == "commit <hex> not found"
    assert normalise_error("  \n") == "(no error text)"
    assert len(normalise_error("x" * 500)) == 118
    assert pr_ref("http://forge:3000/org/repo/pulls/12") == "org/repo#12"


def test_report_over_files_counts_a_torn_line(tmp_path: Path) -> None:
    metrics, events, results = tmp_path / "metrics.jsonl", tmp_path / "events.jsonl", tmp_path / "results.csv"
    for row in METRICS:
        append(metrics, row)
    for row in EVENTS:
        append(events, row)
    for r in RESULTS:
        append_result(results, r)
    with open(events, "ab") as f:
        f.write(b'{"schema":1,"ts":"2024-05-01T08:00')  # a collector killed mid-write
    stats = {"results": ReadStats(), "metrics": ReadStats(), "events": ReadStats()}
    report = summarize(read_results(results, stats=stats["results"]), read(metrics, stats=stats["metrics"]),
                       read(events, stats=stats["events"]), since=SINCE, until=UNTIL, read_stats=stats)
    assert (report.attempted, report.prs_opened, report.events_total) == (6, 3, 8)
    assert (report.torn, report.corrupt) == (1, 0)
    assert "- **Telemetry:** 1 torn and 0 corrupt lines skipped" in render_markdown(report)


def _generated(n: int, start: datetime):
    states = ("working", "idle", "stuck", "dead")
    for i in range(n):
        ts = format_ts(start + timedelta(seconds=i))
        if i % 3:
            yield {"schema": 1, "ts": ts, "kind": "snapshot", "backlog": {"open": i % 50, "eligible": i % 7},
                   "agents": {f"a{j}": {"state": states[(i + j) % 4]} for j in range(4)},
                   "probes": {"tmux": "ok"}}
        else:
            yield {"schema": 1, "ts": ts, "kind": "pane_died", "subject": f"%{i}"}


def test_memory_stays_bounded_in_the_number_of_rows() -> None:
    def peak(n: int) -> int:
        start = UNTIL - timedelta(seconds=n)
        tracemalloc.start()
        report = summarize([], _generated(n, start), _generated(n, start), since=SINCE, until=UNTIL,
                           read_stats=None)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(report.timeline) == 50 and len(report.backlog) <= 49
        assert report.events_total == -(-n // 3)
        return top

    small, large = peak(2_000), peak(20_000)
    assert large < small * 1.5 + 50_000, (small, large)  # ten times the rows, about the same memory


def test_wrong_typed_metrics_rows_do_not_crash_the_report_or_health():
    from datetime import UTC, datetime, timedelta

    from dispatch.health import evaluate
    from dispatch.report import summarize

    now = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
    bad = {"kind": "snapshot", "ts": (now - timedelta(minutes=5)).isoformat(),
           "agents": {"claude": "x"}, "backlog": {"open": "many", "eligible": None}}
    rep = summarize([], [bad, {**bad, "agents": "x", "backlog": "x"}], [], since=now - timedelta(hours=1), until=now)
    assert rep.snapshots == 2 and rep.backlog[0].open == 0
    assert evaluate([], bad, [], now=now).status in (0, 1, 2)
    assert evaluate([], {**bad, "agents": "x", "backlog": "x"}, [], now=now).status in (0, 1, 2)
