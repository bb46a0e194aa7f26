"""dispatch-health: is the fleet doing work, not merely running? Pure checks over results rows,
the last collector snapshot and recent events; status 0 ok, 1 warn, 2 critical (for cron mail).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from .report import pr_ref
from .results import ResultRow
from .telemetry import parse_ts

LEVELS = ("ok", "warn", "critical")  # index = exit status


@dataclass(frozen=True)
class HealthThresholds:
    """When a check turns warn or critical. Hours unless named otherwise."""

    window_hours: float = 24.0  # error rate is measured over this window
    success_warn_hours: float = 6.0  # last successful sprint older than this: warn
    success_critical_hours: float = 24.0  # ... older than this (or none while failing): critical
    pr_window_hours: float = 24.0  # PRs opened are counted over this window
    pr_min: int = 1  # fewer PRs than this while issues are eligible: warn
    idle_warn_hours: float = 1.0  # no agent working this long while issues are eligible: warn
    idle_critical_hours: float = 4.0
    error_rate_warn: float = 0.5  # failed / attempted sprints over window_hours
    error_rate_critical: float = 0.8
    error_min_attempts: int = 3  # fewer attempts than this are too few to judge a rate
    collector_warn_hours: float = 0.25  # last snapshot older than this (3 missed 5-minute runs)
    collector_critical_hours: float = 1.0


@dataclass(frozen=True)
class Check:
    name: str
    level: str  # ok, warn or critical
    reason: str  # one line an operator can act on


@dataclass(frozen=True)
class HealthReport:
    status: int  # 0 ok, 1 warn, 2 critical: the worst check
    checks: tuple[Check, ...]

    def to_dict(self) -> dict:
        return {"status": self.status, "level": LEVELS[self.status],
                "checks": [{"name": c.name, "level": c.level, "reason": c.reason} for c in self.checks]}


def _level(value: float, warn: float, critical: float) -> str:
    return "critical" if value >= critical else "warn" if value >= warn else "ok"


def _ago(hours: float) -> str:
    return f"{hours * 60:.0f}m" if hours < 1 else f"{hours:.1f}h"


def evaluate(
    results: Iterable[ResultRow],
    metrics_last: dict | None,
    events: Iterable[dict],
    *,
    now: datetime,
    thresholds: HealthThresholds = HealthThresholds(),  # noqa: B008 - frozen, safe to share
) -> HealthReport:
    """Run every check; each result streams through once."""
    t = thresholds
    window_start = now - timedelta(hours=t.window_hours)
    pr_start = now - timedelta(hours=t.pr_window_hours)
    last_success: datetime | None = None
    attempted = failed = 0
    prs: set[str] = set()
    for r in results:
        if r.outcome == "success" and (last_success is None or r.timestamp > last_success):
            last_success = r.timestamp
        if r.attempted and window_start <= r.timestamp <= now:
            attempted += 1
            failed += r.outcome == "failed"
        if r.pr_url and pr_start <= r.timestamp <= now:
            prs.add(pr_ref(r.pr_url))
    changed: dict[str, datetime] = {}  # agent -> when it last changed state
    house: dict[str, str] = {}  # check -> latest warning within the collector window
    house_since = now - timedelta(hours=t.collector_critical_hours)
    for ev in events:
        ts, kind = parse_ts(ev.get("ts")), str(ev.get("kind", ""))
        if ts is None:
            continue
        if kind == "pr_opened" and pr_start <= ts <= now:
            prs.add(str(ev.get("subject", "")))
        elif kind.startswith("agent_") and ev.get("subject"):
            changed[ev["subject"]] = max(ts, changed.get(ev["subject"], ts))
        elif kind == "house_warning" and house_since <= ts <= now:
            house[str(ev.get("subject", "?"))] = f"{ev.get('value')} (limit {ev.get('threshold')})"
    snap = metrics_last or {}
    backlog = snap.get("backlog")
    eligible = backlog.get("eligible") if isinstance(backlog, dict) else None
    eligible = eligible if isinstance(eligible, int) else None
    no_work = eligible == 0  # unknown (no snapshot) is not "no work"
    checks = (
        _last_success(last_success, attempted, no_work, now, t),
        _prs(len(prs), no_work, t),
        _idle(snap, eligible, changed, now, t),
        _error_rate(attempted, failed, t),
        _collector(metrics_last, now, t),
        _probes(snap),
        _house(house),
    )
    return HealthReport(max(LEVELS.index(c.level) for c in checks), checks)


def _last_success(last: datetime | None, attempted: int, no_work: bool, now: datetime,
                  t: HealthThresholds) -> Check:
    name = "last_success"
    if last is None:
        if attempted:
            return Check(name, "critical", f"no successful sprint recorded; {attempted} attempted in the window")
        if no_work:
            return Check(name, "ok", "no sprint recorded, and no issue is eligible")
        return Check(name, "warn", "no sprint recorded")
    hours = (now - last).total_seconds() / 3600
    level = _level(hours, t.success_warn_hours, t.success_critical_hours)
    if level != "ok" and no_work:
        return Check(name, "ok", f"last successful sprint {_ago(hours)} ago; no issue is eligible")
    return Check(name, level, f"last successful sprint {_ago(hours)} ago")


def _prs(count: int, no_work: bool, t: HealthThresholds) -> Check:
    reason = f"{count} PRs opened in the last {t.pr_window_hours:g}h"
    if count >= t.pr_min or no_work:
        return Check("prs", "ok", reason + ("; no issue is eligible" if count < t.pr_min else ""))
    return Check("prs", "warn", f"{reason} (expected at least {t.pr_min})")


def _idle(snap: dict, eligible: int | None, changed: dict[str, datetime], now: datetime,
          t: HealthThresholds) -> Check:
    name, agents = "idle_loops", snap.get("agents")
    agents = {n: a for n, a in agents.items() if isinstance(a, dict)} if isinstance(agents, dict) else {}
    states = {n: a.get("state") for n, a in agents.items()}
    working = sum(s == "working" for s in states.values())
    if not agents:
        return Check(name, "ok", "no agents reported")
    if working:
        return Check(name, "ok", f"{working} of {len(agents)} agents working")
    if not eligible:
        return Check(name, "ok", "no agent working, and no issue is eligible" if eligible == 0
                     else "no agent working; backlog size unknown")
    sinces = [parse_ts((agents[n] or {}).get("since")) or changed.get(n) for n in agents]
    known = [s for s in sinces if s is not None]
    summary = ", ".join(f"{n} {s}" for n, s in sorted(states.items()))
    if not known:
        return Check(name, "warn", f"no agent working ({summary}) with {eligible} eligible issues; since unknown")
    hours = (now - max(known)).total_seconds() / 3600
    level = _level(hours, t.idle_warn_hours, t.idle_critical_hours)
    return Check(name, level, f"no agent working for {_ago(hours)} ({summary}) with {eligible} eligible issues")


def _error_rate(attempted: int, failed: int, t: HealthThresholds) -> Check:
    where = f"in the last {t.window_hours:g}h"
    if attempted < t.error_min_attempts:
        return Check("error_rate", "ok", f"{failed} of {attempted} sprints failed {where} (too few to judge)")
    rate = failed / attempted
    level = _level(rate, t.error_rate_warn, t.error_rate_critical)
    return Check("error_rate", level, f"{failed} of {attempted} sprints failed {where} ({rate:.0%})")


def _collector(snap: dict | None, now: datetime, t: HealthThresholds) -> Check:
    ts = parse_ts((snap or {}).get("ts"))
    if ts is None:
        return Check("collector", "critical", "no collector snapshot recorded")
    hours = (now - ts).total_seconds() / 3600
    level = _level(hours, t.collector_warn_hours, t.collector_critical_hours)
    return Check("collector", level, f"last snapshot {_ago(hours)} ago")


def _house(warnings: dict[str, str]) -> Check:
    if not warnings:
        return Check("house", "ok", "no disk, memory, load or model-server warning lately")
    text = "; ".join(f"{k}: {v}" for k, v in sorted(warnings.items()))
    return Check("house", "warn", f"machine thresholds crossed: {text[:200]}")


def _probes(snap: dict) -> Check:
    failing = {k: v for k, v in (snap.get("probes") or {}).items() if v != "ok"}
    if not failing:
        return Check("probes", "ok", f"{len(snap.get('probes') or {})} probes ok in the last snapshot")
    text = "; ".join(f"{k}: {str(v).removeprefix('error: ')}" for k, v in sorted(failing.items()))
    return Check("probes", "warn", f"failing in the last snapshot: {text[:200]}")
