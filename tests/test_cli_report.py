"""`dispatch collect`, `dispatch report` and `dispatch health` end to end: real files, the real
Gitea emulator, a real tmux server and model server, and concurrent collector processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dispatch.cli import app
from dispatch.cli_report import parse_duration
from dispatch.config import load_config
from dispatch.results import ResultRow, append_result, read_results
from dispatch.telemetry import ReadStats, append, format_ts, read, read_state
from tests.emulator.fixtures import write_config
from tests.realtools import Tmux

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_logging():
    """cli binds its log handler to the first CliRunner's stderr; give each invocation its own."""
    logger = logging.getLogger("dispatch")
    saved = logger.handlers[:]
    logger.handlers.clear()
    yield
    logger.handlers[:] = saved


def invoke(config: Path, *args: str) -> typer.testing.Result:
    return CliRunner().invoke(app, ["--config", str(config), *args])


def ago(hours: float) -> datetime:
    return datetime.now(UTC) - timedelta(hours=hours)


def result(hours: float, run: str, agent: str, outcome: str, pr: str = "", error: str = "", **kw) -> ResultRow:
    return ResultRow(timestamp=ago(hours), run_id=run, repo="acme/api", issue=1, agent=agent,
                     backend="direct", outcome=outcome, pr_url=pr, error=error, **kw)


# ---- report ----------------------------------------------------------------------------------


def write_fixture(state: Path) -> None:
    """Hand-computed: in the last 24h 4 sprints attempted (2 succeeded, 2 failed, both timeouts),
    1 nothing to do; PRs acme/api#4 (result + event, counted once), acme/api#9: 2 opened, #4
    merged; issue #2 closed; backlog 10 -> 8 open, 4 -> 3 eligible over 2 snapshots."""
    rows = [
        result(30, "r0", "claude", "success", "http://forge/acme/api/pulls/1"),  # before the window
        result(2, "r1", "claude", "success", "http://forge/acme/api/pulls/4", model="qwen3:14b",
               tokens_in=1000, tokens_out=200),
        result(3, "r2", "claude", "failed", error="timeout after 300s on step 12", model="qwen3:14b",
               tokens_in=500, tokens_out=100),
        result(4, "r3", "kimi", "failed", error="timeout after 120s on step 3"),
        result(5, "r4", "kimi", "success", "http://forge/acme/api/pulls/5", model="gpt-4o", cost_usd=0.05),
        result(6, "r5", "kimi", "nothing_to_do"),
    ]
    for r in rows:
        append_result(state / "results.csv", r)
    tel = state / "telemetry"
    for hours, open_, eligible in ((26, 99, 99), (7, 10, 4), (1, 8, 3)):
        append(tel / "metrics.jsonl", {"ts": format_ts(ago(hours)), "kind": "snapshot",
                                       "agents": {"claude": {"state": "working"}, "kimi": {"state": "idle"}},
                                       "backlog": {"open": open_, "eligible": eligible}, "probes": {"tmux": "ok"}})
    for hours, kind, subject in ((1.9, "pr_opened", "acme/api#4"), (1.5, "pr_opened", "acme/api#9"),
                                 (1.2, "pr_merged", "acme/api#4"), (1.1, "issue_closed", "acme/api#2"),
                                 (25, "pr_merged", "acme/api#1")):
        append(tel / "events.jsonl", {"ts": format_ts(ago(hours)), "kind": kind, "subject": subject})


EXPECTED_LINES = [
    "- **Sprints:** 4 attempted, 2 succeeded, 2 failed (50% success); 0 partial, 1 nothing to do, 0 skipped",
    "- **PRs:** 3 opened, 1 merged; issues closed: 1",
    "- **Backlog:** 10 → 8 open, 4 → 3 eligible (2 snapshots)",
    "- **Telemetry:** 0 torn and 0 corrupt lines skipped",
    "| `timeout after <n>s on step <n>` | 2 |",
    "| claude | 2 | 1 | 50% | 1.0 | 15m | 0m | 0m |",  # 6h between snapshots, capped at 15m
    "| kimi | 2 | 1 | 50% | 1.0 | 0m | 15m | 0m |",
    "| qwen3:14b | 2 | 1,500 | 300 | 0.0000 |",
]


def operator_setup(tmp_path: Path, gitea, **report) -> Path:
    gitea.add_repo("ops/fleet")
    gitea.add_issue("ops/fleet", "Fleet reports")  # 1
    config = write_config(tmp_path, gitea, ["acme/api"], report=report)
    write_fixture(tmp_path / "state")
    return config


def test_report_post_makes_exactly_one_comment_per_run_with_the_fixture_numbers(tmp_path: Path, gitea) -> None:
    config = operator_setup(tmp_path, gitea, operator_issue="ops/fleet#1")
    for run in (1, 2):
        before = gitea.count("POST")
        res = invoke(config, "report", "--format", "md", "--post")
        assert res.exit_code == 0, res.output + res.stderr
        assert gitea.count("POST") - before == 1  # one write per run, nothing else
        comments = gitea.issue("ops/fleet", 1)["comments"]
        assert comments == run
        assert res.stdout.strip().splitlines()[-1].startswith("posted http")
    bodies = [c["body"] for c in _comments(gitea, "ops/fleet", 1)]
    for body in bodies:
        lines = body.splitlines()
        assert lines[0].startswith("## dispatch report · ")
        for line in EXPECTED_LINES:
            assert line in lines, (line, body)
    assert bodies[1] in res.stdout  # what was posted is what was printed


def _comments(gitea, repo: str, number: int) -> list[dict]:
    import requests

    from tests.conftest import CANARY

    resp = requests.get(f"{gitea.url}/api/v1/repos/{repo}/issues/{number}/comments",
                        headers={"Authorization": f"token {CANARY}"}, timeout=10)
    return resp.json()


def test_daily_issue_mode_opens_one_issue_a_day_and_reuses_it(tmp_path: Path, gitea) -> None:
    config = operator_setup(tmp_path, gitea, operator_issue="ops/fleet", post_mode="daily_issue")
    for _ in range(2):
        res = invoke(config, "report", "--format", "md", "--post")
        assert res.exit_code == 0, res.output + res.stderr
    title = f"dispatch report {datetime.now(UTC):%Y-%m-%d}"
    issues = [gitea.issue("ops/fleet", n) for n in gitea.issue_numbers("ops/fleet")]
    daily = [i for i in issues if i["title"] == title]
    assert len(daily) == 1 and len(issues) == 2
    assert EXPECTED_LINES[0] in daily[0]["body"].splitlines() and daily[0]["comments"] == 1


def test_post_without_operator_issue_and_bad_options_exit_2(tmp_path: Path, gitea) -> None:
    config = operator_setup(tmp_path, gitea)
    res = invoke(config, "report", "--post")
    assert res.exit_code == 2 and "report.operator_issue: not set" in res.stderr
    assert gitea.count("POST") == 0
    res = invoke(config, "report", "--since", "yesterday")
    assert res.exit_code == 2 and "expected a duration like 30m, 24h or 7d, got 'yesterday'" in res.stderr
    res = invoke(config, "report", "--format", "pdf")
    assert res.exit_code == 2 and "expected one of text, md, json, html" in res.stderr
    assert [parse_duration(t) for t in ("30m", "24h", "7d", "1.5h")] == [
        timedelta(minutes=30), timedelta(hours=24), timedelta(days=7), timedelta(minutes=90)]


def test_truncated_metrics_file_is_reported_as_torn_lines(tmp_path: Path, gitea) -> None:
    config = operator_setup(tmp_path, gitea)
    with open(tmp_path / "state" / "telemetry" / "metrics.jsonl", "ab") as f:
        f.write(b'{"schema":1,"ts":"2024-05-01T08:00:00.000Z","kind":"snaps')  # killed mid-write
    res = invoke(config, "report", "--format", "md")
    assert res.exit_code == 0
    assert "- **Telemetry:** 1 torn and 0 corrupt lines skipped" in res.stdout.splitlines()
    assert "telemetry: 1 torn and 0 corrupt lines skipped" in res.stderr
    data = json.loads(invoke(config, "report", "--format", "json").stdout)
    assert (data["torn"], data["attempted"], data["prs_opened"]) == (1, 4, 3)
    text = invoke(config, "report", "--since", "7d")
    assert "1 torn and 0 corrupt lines skipped" in text.stdout and "5 attempted" in text.stdout
    out = tmp_path / "r.html"
    res = invoke(config, "report", "--format", "html", "--out", str(out))
    assert res.stdout.startswith(f"wrote {out}") and out.read_text().count("<svg") == 3


# ---- collect and health ----------------------------------------------------------------------


@pytest.fixture
def fleet(tmux: Tmux, model_server, gitea, tmp_path: Path):
    """Everything alive: a pane per agent printing, the model server, a pid file, an eligible backlog."""
    tmux("new-session", "-d", "-s", "claude", "sh -c 'echo working; exec sleep 600'")
    tmux("new-session", "-d", "-s", "kimi", "sh -c 'echo working; exec sleep 600'")
    gitea.add_repo("acme/api")
    gitea.add_issue("acme/api", "Fix the login redirect", labels=["bug"])
    server = model_server()
    pid_file = tmp_path / "loop.pid"
    pid_file.write_text(str(os.getpid()))

    def config(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        return write_config(folder, gitea, ["acme/api"], llm={"base_url": server.url + "/v1"},
                            collector={"tmux_socket": tmux.socket, "pid_files": [str(pid_file)]})
    return config


def test_health_is_critical_when_sprints_fail_although_everything_runs_and_ok_when_work_flows(fleet) -> None:
    failing, flowing = fleet("failing"), fleet("flowing")
    append_result(load_config(failing).state_path / "results.csv",
                  result(30, "r0", "kimi", "success", "http://forge/acme/api/pulls/1"))
    for h in range(1, 24, 2):
        append_result(load_config(failing).state_path / "results.csv", result(h, f"f{h}", "kimi", "failed", error="boom"))
    for h, outcome in ((1, "success"), (2, "failed"), (3, "success"), (4, "success")):
        pr = f"http://forge/acme/api/pulls/{h}" if outcome == "success" else ""
        append_result(load_config(flowing).state_path / "results.csv", result(h, f"s{h}", "claude", outcome, pr))
    for config in (failing, flowing):
        res = invoke(config, "collect")
        assert res.exit_code == 0, res.output + res.stderr
        assert res.stdout.splitlines()[-1].startswith("snapshot ") and "6 probes ok" in res.stdout

    res = invoke(failing, "health")
    assert res.exit_code == 2, res.stdout
    lines = res.stdout.splitlines()
    assert lines[0] == "health: critical"
    assert "critical error_rate: 12 of 12 sprints failed in the last 24h (100%)" in lines
    assert any(ln.startswith("critical last_success: last successful sprint 30.0h ago") for ln in lines)
    # every process is alive: the snapshot says so
    for name in ("collector", "probes", "idle_loops"):
        assert any(ln.startswith(f"ok       {name}: ") for ln in lines), (name, lines)
    assert "ok       idle_loops: 2 of 2 agents working" in lines

    res = invoke(flowing, "health", "--json")
    assert res.exit_code == 0, res.stdout
    data = json.loads(res.stdout)
    assert data["level"] == "ok" and {c["level"] for c in data["checks"]} == {"ok"}


def test_collect_json_prints_the_events(fleet, tmux: Tmux) -> None:
    config = fleet("state")
    first = json.loads(invoke(config, "collect", "--json").stdout)
    assert first["events"] == [] and set(first["probes"].values()) == {"ok"}
    tmux("kill-session", "-t", "kimi")
    res = invoke(config, "collect", "--json")
    events = json.loads(res.stdout)["events"]
    assert [(e["kind"], e["subject"]) for e in events] == [("agent_dead", "kimi"), ("pane_died", "%1")]
    assert events[0]["from"] == "working"


# A sprint-like writer: result rows (every third one failed, with a long error) until told to stop.
WRITER = """
import sys, time
from datetime import UTC, datetime
from pathlib import Path
from dispatch.results import ResultRow, append_result
path, stop, n = Path(sys.argv[1]), Path(sys.argv[2]), 0
while not stop.exists() and n < 20000:
    append_result(path, ResultRow(timestamp=datetime.now(UTC), run_id=f"w{n}", agent="claude",
                                  outcome="failed" if n % 3 == 0 else "success", error="x" * 250 * (n % 3 == 0)))
    n += 1
    time.sleep(0.001)
print(n)
"""


def test_two_collectors_and_a_results_writer_at_once_never_interleave_lines(tmp_path: Path, gitea) -> None:
    gitea.add_repo("acme/api")
    config = write_config(tmp_path, gitea, ["acme/api"], agents=[{"name": "claude"}])
    state = load_config(config).state_path
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(state / "results.csv"), str(tmp_path / "stop")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    # through the cron entry point, as cron would run it
    shim = tmp_path / "dispatch"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -c "from dispatch.cli import main; main()" "$@"\n')
    shim.chmod(0o755)
    loop = f"for i in 1 2; do {ROOT}/bin/telemetry-collector --json >> \"$OUT\" || exit 1; done"
    collectors = [subprocess.Popen(["sh", "-c", loop], cwd=ROOT, env={
        **env, "DISPATCH_BIN": str(shim), "DISPATCH_CONFIG": str(config), "OUT": str(tmp_path / f"out{n}.json")})
        for n in range(2)]
    assert [p.wait(timeout=60) for p in collectors] == [0, 0]
    assert [(tmp_path / f"out{n}.json").read_text().count('"probes"') for n in range(2)] == [2, 2]
    (tmp_path / "stop").touch()
    written = int(writer.communicate(timeout=30)[0])
    stats = {name: ReadStats() for name in ("metrics", "events", "results")}
    snaps = list(read(state / "telemetry" / "metrics.jsonl", stats=stats["metrics"]))
    events = list(read(state / "telemetry" / "events.jsonl", stats=stats["events"]))
    rows = list(read_results(state / "results.csv", stats=stats["results"]))
    assert len(snaps) == 4 and len(rows) == written > 0
    assert all((s.torn, s.corrupt) == (0, 0) for s in stats.values()), stats
    assert isinstance(read_state(state / "telemetry" / "last_state.json").get("agents"), dict)
    # each failure the collectors saw was reported once, though they ran at the same time
    failed = [e["subject"] for e in events if e["kind"] == "sprint_failed"]
    assert failed and len(failed) == len(set(failed))


