"""One orchestrator pass: observe the backlog, decide, dispatch, monitor, record, report.

Every forge action goes through the policy (allow / approve / forbid) and the action journal
(a key per intended action, recorded before and confirmed after), so a cron run that fires twice
or dies half-way never does the same thing twice. In `sovereign` mode actions that need approval
wait on one checklist comment on the operator issue and run once a box is ticked.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from . import house, policy, telemetry, watchdog
from .config import Config
from .errors import DispatchError, ForgeError
from .forge import ForgeClient
from .journal import Journal
from .ledger import Ledger, issue_kind
from .policy import Action

log = logging.getLogger(__name__)

MODES = ("simple", "intelligent", "sovereign")
# watchdog decisions -> the policy's action kinds
KIND = {"nudge": "nudge", "release": "reroute", "assign": "assign", "sprint": "assign", "stop": "reroute"}
CHECKLIST = "<!-- dispatch:approvals -->"
_BOX = re.compile(r"^- \[([ xX])\] `([^`]+)`", re.M)


@dataclass
class CycleResult:
    mode: str
    skipped: str = ""  # why nothing was attempted (an open breaker)
    actions: list[dict] = field(default_factory=list)  # one per decision: key, verdict, outcome
    events: list[dict] = field(default_factory=list)
    reported: bool = False

    @property
    def exit_code(self) -> int:
        return 1 if any(a["outcome"] == "error" for a in self.actions) else 0


def run_cycle(
    cfg: Config,
    client: ForgeClient,
    *,
    mode: str = "simple",
    now: datetime | None = None,
    run_sprint: Callable[[watchdog.Decision], bool] | None = None,
    max_sprints: int | None = 1,
    post_report: Callable[[], bool] | None = None,
) -> CycleResult:
    """One pass. `run_sprint` starts (or enqueues) a sprint for a `sprint` decision and says
    whether it succeeded; at most `max_sprints` start in one pass (None: no limit, a broker)."""
    if mode not in MODES:
        raise DispatchError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    now = now or datetime.now(UTC)
    state = cfg.state_path
    result = CycleResult(mode)
    breaker = cfg.breakers.breaker(state, "forge", clock=now.timestamp)
    if not breaker.allow():
        result.skipped = f"the forge breaker is open ({client.base_url}); skipping this cycle"
        _record(cfg, result, [{"kind": "cycle_skipped", "subject": "forge", "reason": result.skipped}])
        return result
    try:
        from .backlog import resolve_repos

        repos = resolve_repos(client, cfg)
        obs = watchdog.observe(client, repos, cfg, now, state_dir=state)
        ledger = Ledger(state / "ledger.sqlite")
        issues = [r.issue for r in obs.ranked] + [w.issue for w in obs.watches]
        kinds = {i.ref: issue_kind(i.labels, i.title) for i in issues}
        ledger.import_results(state / "results.csv",
                              kind_of=lambda repo, n: kinds.get(f"{repo}#{n}", "other"))
        ledger.set_kinds(issues)
        if mode == "intelligent":
            ledger.sync_prs(client, repos)  # "resolved" means merged: follow the PRs
        breaker.record(True)
    except ForgeError as e:
        breaker.record(False, str(e))
        raise

    attempts, resting = _history(state / "results.csv", now, cfg)
    if resting:  # an issue whose sprints keep failing rests, as the worker loop's skip list does
        obs = replace(obs, ranked=tuple(r for r in obs.ranked if r.issue.ref not in resting))
    agents, held_back = _available(cfg, ledger, now)
    events = [{"kind": "quota_exhausted", "subject": name, "reason": why} for name, why in held_back.items()]
    learned = None
    if mode == "intelligent":
        from .routing import Learned

        learned = Learned(ledger.success_rates(30))
        obs = replace(obs, ranked=tuple(replace(r, route=learned.route(r.issue, agents))
                                        for r in obs.ranked))
    decisions = watchdog.decide(obs, agents, cfg.watchdog, now,
                                router=learned and learned.route, pick=learned and learned.pick)
    journal = Journal(state / "journal.sqlite")
    approved = _approved(client, cfg) if mode == "sovereign" else set()
    waiting: list[tuple[Action, watchdog.Decision]] = []
    budget = [10**9 if max_sprints is None else max_sprints]
    for d in decisions:
        # a sprint key names the attempt, so a finished one never blocks the next attempt
        key = f"{d.key}:{attempts[d.ref]}" if d.action == "sprint" else d.key
        action = Action(KIND[d.action], d.ref, d.reason, key)
        verdict = policy.decide(action.kind, cfg.policy, mode=mode)
        row = {"key": key, "action": d.action, "verdict": verdict.verdict, "reason": d.reason}
        if verdict.verdict == "forbid":
            row["outcome"] = "forbidden"
        elif verdict.verdict == "approve" and key not in approved:
            row["outcome"] = "awaiting approval"
            waiting.append((action, d))
        else:
            row["outcome"] = _carry_out(client, cfg, journal, action, d, run_sprint, events, budget)
        events.append(policy.action_event(action, verdict, row["outcome"]))
        result.actions.append(row)
    if waiting:
        _post_checklist(client, cfg, waiting)

    readings = house.check_all(state, cfg.llm.base_url, cfg.house, api_key=cfg.llm_api_key())
    events += house.warnings(readings)
    if post_report and journal.begin(Action("comment", "report", "daily report", f"report:{now.date()}")):
        try:
            result.reported = post_report()
            journal.confirm(f"report:{now.date()}")
        except DispatchError as e:
            journal.fail(f"report:{now.date()}", str(e))
    _record(cfg, result, events)
    return result


def _history(results_csv: Path, now: datetime, cfg: Config) -> tuple[Counter, set[str]]:
    """Attempts so far per issue, and the issues resting after failures: the latest attempt
    failed within skip_hours / max_failures, or max_failures failed within skip_hours."""
    from .results import read_results

    attempts: Counter = Counter()
    failed: dict[str, list[datetime]] = {}
    last: dict[str, tuple[datetime, str]] = {}
    window = timedelta(hours=cfg.loop.skip_hours)
    for row in read_results(results_csv):
        if not row.attempted or not row.issue:
            continue
        ref = f"{row.repo}#{row.issue}"
        attempts[ref] += 1
        last[ref] = max(last.get(ref, (row.timestamp, "")), (row.timestamp, row.outcome))
        if row.outcome != "success" and now - row.timestamp < window:
            failed.setdefault(ref, []).append(row.timestamp)
    short = window / max(1, cfg.loop.max_failures)
    resting = {ref for ref, times in failed.items() if len(times) >= cfg.loop.max_failures}
    resting |= {ref for ref, (ts, outcome) in last.items() if outcome != "success" and now - ts < short}
    return attempts, resting


def _available(cfg: Config, ledger: Ledger, now: datetime):
    if not cfg.quotas:
        return list(cfg.agents), {}
    from .quota import available_agents

    names, reasons = available_agents(cfg.agents, ledger, cfg.quotas, now)
    return [a for a in cfg.agents if a.name in names], reasons


def _carry_out(client, cfg, journal: Journal, action: Action, d, run_sprint, events,
               budget: list[int]) -> str:
    if d.action == "sprint" and run_sprint is not None and budget[0] <= 0:
        return "deferred"  # untouched: no label, no journal entry, so a later cycle takes it
    # a key pending from a crashed run is safe to redo: every watchdog action checks its own
    # marker on the forge first, so reclaiming cannot double a comment
    stale = [e for e in journal.pending(older_than_s=300) if e.key == action.key]
    if not journal.begin(action) and not (stale and journal.reclaim(stale[0])):
        return "done before"
    try:
        events += watchdog.apply(client, [d], cfg)
        if d.action == "sprint" and run_sprint is not None:
            budget[0] -= 1
            if not run_sprint(d):
                # failed: the key may be begun again, so the issue is not wedged as "done"
                journal.fail(action.key, "the sprint did not succeed")
                return "sprint failed"
    except DispatchError as e:
        journal.fail(action.key, str(e))
        return "error"
    journal.confirm(action.key)
    return "done"


def _approved(client: ForgeClient, cfg: Config) -> set[str]:
    """Keys dispatch itself put on a checklist whose box the operator ticked: in dispatch's own
    comment (edited by the operator) or in a comment by one of `report.approvers`. A ticked box
    anyone else writes, or for a key dispatch never listed, approves nothing."""
    target = _operator_issue(cfg)
    if target is None:
        return set()
    repo, number = target
    me = client.current_user()
    listed, ticked = set(), set()
    for c in client.list_comments(repo, number):
        if CHECKLIST not in c.body:
            continue
        boxes = _BOX.findall(c.body)
        if c.author == me:
            listed |= {key for _, key in boxes}
        if c.author == me or c.author in cfg.report.approvers:
            ticked |= {key for mark, key in boxes if mark in "xX"}
    return ticked & listed


def _operator_issue(cfg: Config) -> tuple[str, int] | None:
    """(owner/repo, N) of report.operator_issue; None when unset or a bare repo (daily_issue)."""
    repo, _, number = cfg.report.operator_issue.strip().partition("#")
    return (repo, int(number)) if repo and number.isdigit() else None


def _post_checklist(client: ForgeClient, cfg: Config, waiting) -> None:
    """One checklist comment listing actions not yet put before the operator."""
    target = _operator_issue(cfg)
    if target is None:
        log.warning("%d actions need approval but report.operator_issue names no issue "
                    "(owner/repo#N)", len(waiting))
        return
    repo, number = target
    listed = set()
    for c in client.list_comments(repo, number):
        if CHECKLIST in c.body:
            listed |= {key for _, key in _BOX.findall(c.body)}
    new = [(a, d) for a, d in waiting if a.key not in listed]
    if not new:
        return
    lines = [CHECKLIST, "dispatch wants to do the following; tick a box to approve it "
             "(it runs on the next cycle, once):", ""]
    lines += [f"- [ ] `{a.key}` — {d.action} {d.ref}: {d.reason}" for a, d in new]
    client.create_comment(repo, number, "\n".join(lines))


def _record(cfg: Config, result: CycleResult, events: list[dict]) -> None:
    path = Path(cfg.state_path) / "telemetry" / "events.jsonl"
    t = cfg.telemetry
    for ev in events:
        telemetry.append(path, {**ev, "source": "cycle", "mode": result.mode},
                         fsync=t.fsync, max_bytes=t.max_bytes, keep=t.keep)
    result.events = events
