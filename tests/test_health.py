"""health: "processes running" is told apart from "work being done"."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dispatch.health import HealthThresholds, evaluate
from dispatch.results import ResultRow
from dispatch.telemetry import format_ts

NOW = datetime(2024, 5, 2, 6, 0, tzinfo=UTC)


def result(hours_ago: float, outcome: str, pr: str = "", agent: str = "kimi") -> ResultRow:
    return ResultRow(timestamp=NOW - timedelta(hours=hours_ago), run_id=f"r{hours_ago}", repo="o/a",
                     agent=agent, outcome=outcome, pr_url=pr, error="boom" if outcome == "failed" else "")


def snapshot(minutes_ago: float = 3, states: tuple[str, ...] = ("working", "working"),
             eligible: int = 5, **agent_extra) -> dict:
    agents = {name: {"state": s, **agent_extra} for name, s in zip(("claude", "kimi"), states, strict=False)}
    return {"schema": 1, "ts": format_ts(NOW - timedelta(minutes=minutes_ago)), "kind": "snapshot",
            "agents": agents, "backlog": {"open": 9, "eligible": eligible},
            "probes": {"tmux": "ok", "forge": "ok", "model_server": "ok", "cron": "ok"}}


def levels(report) -> dict[str, str]:
    return {c.name: c.level for c in report.checks}


def test_work_flowing_is_ok() -> None:
    results = [result(1, "success", "http://f/o/a/pulls/3"), result(3, "failed"),
               result(5, "success", "http://f/o/a/pulls/4"), result(9, "nothing_to_do")]
    report = evaluate(results, snapshot(), [], now=NOW, thresholds=HealthThresholds())
    assert report.status == 0, report.checks
    assert set(levels(report).values()) == {"ok"}
    reasons = {c.name: c.reason for c in report.checks}
    assert reasons["last_success"] == "last successful sprint 1.0h ago"
    assert reasons["prs"] == "2 PRs opened in the last 24h"
    assert reasons["error_rate"] == "1 of 3 sprints failed in the last 24h (33%)"


def test_failing_for_the_window_is_critical_although_everything_runs() -> None:
    # Every process is alive: fresh snapshot, agents working, all probes ok. But nothing lands.
    results = [result(30, "success", "http://f/o/a/pulls/1")] + [result(h, "failed") for h in range(1, 24, 2)]
    report = evaluate(results, snapshot(), [], now=NOW)
    assert report.status == 2
    got = levels(report)
    assert got["last_success"] == "critical" and got["error_rate"] == "critical"
    assert got["prs"] == "warn"
    assert got["collector"] == got["probes"] == got["idle_loops"] == "ok"
    assert report.to_dict()["level"] == "critical"
    assert "12 of 12 sprints failed in the last 24h (100%)" in [c.reason for c in report.checks]


def test_failing_without_any_success_on_record_is_critical() -> None:
    report = evaluate([result(h, "failed") for h in (1, 2, 3)], snapshot(), [], now=NOW)
    assert levels(report)["last_success"] == "critical"
    assert report.status == 2


def test_pr_from_events_counts_and_error_rate_needs_a_minimum() -> None:
    events = [{"ts": format_ts(NOW - timedelta(hours=2)), "kind": "pr_opened", "subject": "o/a#9"}]
    report = evaluate([result(1, "success"), result(2, "failed")], snapshot(), events, now=NOW)
    got = levels(report)
    assert got["prs"] == "ok" and got["error_rate"] == "ok"
    assert report.status == 0


def test_stale_collector_warns_then_goes_critical() -> None:
    flowing = [result(1, "success", "http://f/o/a/pulls/3")]
    assert levels(evaluate(flowing, snapshot(minutes_ago=5), [], now=NOW))["collector"] == "ok"
    warn = evaluate(flowing, snapshot(minutes_ago=30), [], now=NOW)
    assert levels(warn)["collector"] == "warn" and warn.status == 1
    crit = evaluate(flowing, snapshot(minutes_ago=120), [], now=NOW)
    assert levels(crit)["collector"] == "critical" and crit.status == 2
    assert levels(evaluate(flowing, None, [], now=NOW))["collector"] == "critical"


def test_loops_alive_but_idle_with_eligible_work() -> None:
    flowing = [result(0.5, "success", "http://f/o/a/pulls/3")]
    since = format_ts(NOW - timedelta(hours=2))
    idle = snapshot(states=("idle", "stuck"), since=since)
    report = evaluate(flowing, idle, [], now=NOW)
    check = next(c for c in report.checks if c.name == "idle_loops")
    assert check.level == "warn"
    assert check.reason == "no agent working for 2.0h (claude idle, kimi stuck) with 5 eligible issues"
    # From events when the snapshot has no `since`: the last agent change was 5 hours ago.
    events = [{"ts": format_ts(NOW - timedelta(hours=h)), "kind": "agent_idle", "subject": name}
              for name, h in (("claude", 7), ("kimi", 5))]
    assert levels(evaluate(flowing, snapshot(states=("idle", "idle")), events, now=NOW))["idle_loops"] == "critical"
    # Nothing eligible: idle is the right thing to be.
    assert levels(evaluate(flowing, snapshot(states=("idle", "idle"), eligible=0), [], now=NOW))["idle_loops"] == "ok"


def test_no_eligible_work_is_not_an_outage() -> None:
    results = [result(48, "success"), result(2, "nothing_to_do")]
    report = evaluate(results, snapshot(states=("idle", "idle"), eligible=0), [], now=NOW)
    assert report.status == 0, report.checks


def test_failing_probe_warns_and_thresholds_are_configurable() -> None:
    snap = snapshot()
    snap["probes"]["forge"] = "error: 502 for GET /api/v1/repos/o/a"
    flowing = [result(1, "success", "http://f/o/a/pulls/3")]
    report = evaluate(flowing, snap, [], now=NOW)
    assert levels(report)["probes"] == "warn" and report.status == 1
    assert "forge: 502 for GET /api/v1/repos/o/a" in next(c.reason for c in report.checks if c.name == "probes")
    strict = HealthThresholds(success_warn_hours=0.1, success_critical_hours=0.5)
    assert levels(evaluate(flowing, snapshot(), [], now=NOW, thresholds=strict))["last_success"] == "critical"


def test_a_recent_house_warning_warns_and_an_old_one_does_not():
    from datetime import UTC, datetime, timedelta

    from dispatch.health import evaluate

    now = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
    recent = {"ts": (now - timedelta(minutes=10)).isoformat(), "kind": "house_warning",
              "subject": "disk", "value": 2.5, "threshold": 5.0}
    old = {**recent, "ts": (now - timedelta(hours=5)).isoformat()}
    house = {c.name: c for c in evaluate([], None, [recent], now=now).checks}["house"]
    assert house.level == "warn" and "disk: 2.5 (limit 5.0)" in house.reason
    assert {c.name: c for c in evaluate([], None, [old], now=now).checks}["house"].level == "ok"
