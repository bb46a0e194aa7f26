"""Watchdog over the fleet's claimed work: stuck agents are nudged, then released and re-routed,
quiet local runs stopped, idle agents handed the next issue (model drift: `drift.py`).

Pure core (`assess`, `decide`) over what `observe` fetched; `apply` acts, each action guarded by
a marker on the forge, so running twice never acts twice.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from . import claims
from .claims import Claim
from .forge import ForgeClient, Issue, PullRequest, parse_time
from .locks import live

if TYPE_CHECKING:  # config.py imports this module's WatchdogConfig: keep the import graph a tree
    from .config import AgentConfig, Config
    from .triage import Ranked

log = logging.getLogger(__name__)

NUDGE = "<!-- dispatch:nudge run={run} -->"
REROUTE = "<!-- dispatch:reroute run={run} agent={agent} -->"
_OWN = "<!-- dispatch:"  # dispatch's own comments are bookkeeping, not the agent's activity


@dataclass(frozen=True)
class AgentFile:
    path: str  # the agent's own YAML config file, e.g. ~/.hermes/config.yaml
    key: str  # dotted key holding its model there, e.g. model.default


@dataclass(frozen=True)
class WatchdogConfig:
    """The `watchdog:` config section. Minutes count from the last activity on claimed work."""

    stuck_minutes: float = 30.0  # quiet this long: one nudge comment per claim
    reassign_minutes: float = 60.0  # quiet this long: release the claim, re-route to another agent
    stop_minutes: float = 120.0  # a local sprint process quiet this long gets SIGTERM
    idle_takes_any: bool = True  # an idle agent no issue fits takes the top unrouted one anyway
    expected_models: dict[str, str] = field(default_factory=dict)  # agent/profile -> model
    agent_configs: dict[str, AgentFile] = field(default_factory=dict)  # agent/profile -> its file


@dataclass(frozen=True)
class Watch:
    """One claimed issue as the forge and local files show it."""

    issue: Issue
    claim: Claim
    claimed_at: datetime
    last_activity: datetime  # newest of: claim, other comments, PR update, branch commit, trajectory
    nudged: bool = False  # a nudge for this claim's run is already on the issue


@dataclass(frozen=True)
class LocalRun:
    """A sprint running on this host (a live lock), which only this host can stop."""

    run_id: str
    pid: int
    agent: str
    repo: str
    issue: int
    last_activity: datetime


@dataclass(frozen=True)
class Observation:
    watches: tuple[Watch, ...]
    ranked: tuple[Ranked, ...]  # eligible issues, best first
    queued: dict[str, tuple[str, ...]]  # agent -> open unclaimed issues labelled <agent>-ready
    local: tuple[LocalRun, ...] = ()


@dataclass(frozen=True)
class AgentHealth:
    agent: str
    state: str  # working | idle | stuck
    issues: tuple[str, ...] = ()  # refs it holds claims on
    quiet_minutes: float = 0.0  # the longest quiet among its claims
    queued: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    action: str  # nudge | release | assign | sprint | stop
    agent: str  # the quiet agent (nudge, release, stop) or the receiving one (assign, sprint)
    repo: str
    issue: int
    reason: str
    run_id: str = ""
    to_agent: str = ""  # release: the agent it is re-routed to; "" sends it back to the backlog
    pid: int = 0  # stop: the local process

    @property
    def ref(self) -> str:
        return f"{self.repo}#{self.issue}"

    @property
    def key(self) -> str:
        """Names the intended action once, for an action journal."""
        return f"{self.action}:{self.ref}:{self.run_id or self.agent}"

    def as_json(self) -> dict:
        return {"action": self.action, "agent": self.agent, "issue": self.ref, "reason": self.reason,
                "run_id": self.run_id or None, "to_agent": self.to_agent or None, "key": self.key}


# ---- pure core -------------------------------------------------------------------------------


def _minutes(now: datetime, then: datetime) -> float:
    return max(0.0, (now - then).total_seconds() / 60)


def _active(w: Watch, pane: Mapping[str, datetime]) -> datetime:
    seen = pane.get(w.claim.agent)
    return max(w.last_activity, seen) if seen else w.last_activity


def assess(obs: Observation, agents: list[AgentConfig], cfg: WatchdogConfig, now: datetime,
           pane_activity: Mapping[str, datetime] | None = None) -> list[AgentHealth]:
    """Each configured agent: idle (no claim), working (a claim with recent activity) or stuck."""
    pane = pane_activity or {}
    out = []
    for a in agents:
        mine = [w for w in obs.watches if w.claim.agent == a.name]
        quiet = [_minutes(now, _active(w, pane)) for w in mine]
        state = "idle" if not mine else "working" if min(quiet) < cfg.stuck_minutes else "stuck"
        out.append(AgentHealth(a.name, state, tuple(w.issue.ref for w in mine),
                               round(max(quiet, default=0.0), 1), obs.queued.get(a.name, ())))
    return out


def decide(obs: Observation, agents: list[AgentConfig], cfg: WatchdogConfig, now: datetime,
           pane_activity: Mapping[str, datetime] | None = None, *,
           router: Callable | None = None, pick: Callable | None = None) -> list[Decision]:
    """What to do now, with reasons; stuck claims first, so re-routed work counts as queued.

    `router(issue, agents, load) -> Route` re-routes released work (default: declared strengths);
    `pick(agent, free) -> Ranked | None` chooses for an idle agent that nothing was routed to
    (default: the top-ranked free issue). `routing.Learned` supplies both in intelligent mode.
    """
    from .triage import ready_label
    from .triage import route as by_strength

    route = router or by_strength

    pane = pane_activity or {}
    decisions: list[Decision] = []
    load = {a.name: len(obs.queued.get(a.name, ())) for a in agents}
    for w in obs.watches:
        load[w.claim.agent] = load.get(w.claim.agent, 0) + 1
    busy = {name for name, n in load.items() if n}
    taken = {w.issue.ref for w in obs.watches}
    for w in obs.watches:
        quiet = _minutes(now, _active(w, pane))
        who, ref, run = w.claim.agent, w.issue.ref, w.claim.run_id
        if quiet >= cfg.reassign_minutes:
            others = [a for a in agents if a.name != who]
            r = route(w.issue, others, load)
            if r.agent:
                load[r.agent] = load.get(r.agent, 0) + 1
                busy.add(r.agent)
            why = (f"no activity from {who or 'its agent'} for {quiet:.0f} min "
                   f"(threshold {cfg.reassign_minutes:g}); " + "; ".join(r.reasons[-1:]))
            decisions.append(Decision("release", who, w.issue.repo, w.issue.number, why, run,
                                      to_agent=r.agent or ""))
        elif quiet >= cfg.stuck_minutes and not w.nudged:
            decisions.append(Decision("nudge", who, w.issue.repo, w.issue.number,
                                      f"no activity on {ref} for {quiet:.0f} min "
                                      f"(threshold {cfg.stuck_minutes:g})", run))
    for run_ in obs.local:
        quiet = _minutes(now, run_.last_activity)
        if quiet >= cfg.stop_minutes:
            decisions.append(Decision("stop", run_.agent, run_.repo, run_.issue,
                                      f"local run quiet for {quiet:.0f} min (threshold "
                                      f"{cfg.stop_minutes:g})", run_.run_id, pid=run_.pid))
    ready = {ready_label(a.name) for a in agents}
    free = [r for r in obs.ranked if r.issue.ref not in taken and not ready & set(r.issue.labels)]
    idle = [a for a in agents if a.name not in busy and a.max_concurrent > 0]
    for fits_only in (True, False) if cfg.idle_takes_any else (True,):
        for a in list(idle):
            if fits_only:
                choice = next((r for r in free if r.route.agent == a.name), None)
            else:
                choice = pick(a, free) if pick else (free[0] if free else None)
            if choice is None:
                continue
            free.remove(choice)
            idle.remove(a)
            why = (f"{a.name} is idle; " + "; ".join(choice.route.reasons[-1:]) if fits_only
                   else f"{a.name} is idle and nothing was routed to it; "
                        + ("the free issue it is likeliest to finish" if pick else "top-ranked unrouted"))
            decisions.append(Decision("sprint" if a.kind == "direct" else "assign", a.name,
                                      choice.issue.repo, choice.issue.number,
                                      f"{why} (score {choice.score.value:g})"))
    return decisions


# ---- the shell: observe ----------------------------------------------------------------------


def observe(client: ForgeClient, repos: list[str], cfg: Config, now: datetime,
            state_dir: Path | None = None) -> Observation:
    """Fetch the backlog, every claimed issue's history, and this host's running sprints."""
    from .backlog import fetch
    from .triage import ready_label, triage

    backlog = fetch(client, repos)
    result = triage(list(backlog.issues), backlog.open_pulls, cfg.agents, cfg.triage, now)
    label = cfg.triage.claim_label
    claimed = [i for i in backlog.issues if label in i.labels]
    branches = _branch_times(client, {i.repo for i in claimed})
    trajectories = state_dir / "trajectories" if state_dir else None
    watches = []
    for issue in claimed:
        comments = client.list_comments(issue.repo, issue.number)
        c = claims.active_claim(comments)
        if c is None:
            continue  # a label without a claim in force: the claim's owner is releasing it
        claim_comment = next(x for x in comments if x.id == c.comment_id)
        at = claim_comment.created_at or now
        times = [at]
        times += [x.created_at for x in comments
                  if x.id > c.comment_id and x.created_at and _OWN not in x.body]
        times += [p.updated_at for p in backlog.pulls.get(issue.repo, ())
                  if p.updated_at and _pr_for(p, issue)]
        times += [t for name, t in branches.get(issue.repo, {}).items()
                  if name.startswith(f"dispatch/{issue.number}-")]
        if trajectories and (t := _mtime(trajectories / f"{c.run_id}.jsonl")):
            times.append(t)
        nudged = any(NUDGE.format(run=c.run_id) in x.body for x in comments)
        watches.append(Watch(issue, c, at, max(times), nudged))
    queued = {a.name: tuple(i.ref for i in backlog.issues
                            if ready_label(a.name) in i.labels and label not in i.labels)
              for a in cfg.agents}
    local = tuple(_local_runs(state_dir, watches)) if state_dir else ()
    return Observation(tuple(watches), result.ranked, queued, local)


def _pr_for(pr: PullRequest, issue: Issue) -> bool:
    from .triage import references

    return pr.head.startswith(f"dispatch/{issue.number}-") or issue.number in references(
        f"{pr.title}\n{pr.body}", issue.repo)


def _branch_times(client: ForgeClient, repos: Iterable[str]) -> dict[str, dict[str, datetime]]:
    """The last commit time of every dispatch/* branch, per repo: pushed work is activity."""
    out: dict[str, dict[str, datetime]] = {}
    for repo in sorted(repos):
        items = client.paginate(f"/repos/{repo}/branches")
        out[repo] = {b["name"]: t for b in items if str(b.get("name", "")).startswith("dispatch/")
                     and (t := parse_time((b.get("commit") or {}).get("timestamp")))}
    return out


def _mtime(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except OSError:
        return None


def _local_runs(state_dir: Path, watches: list[Watch]) -> Iterable[LocalRun]:
    by_run = {w.claim.run_id: w.last_activity for w in watches}
    host = socket.gethostname()
    for info in live(state_dir / "locks"):
        d = info.data
        if not (d.get("repo") and d.get("issue")) or info.host != host or not info.pid:
            continue  # not a sprint (a loop's own lock), or a process this host cannot signal
        times = [datetime.fromtimestamp(info.started, UTC)]
        times += [t for t in (by_run.get(info.run_id),
                              _mtime(state_dir / "trajectories" / f"{info.run_id}.jsonl")) if t]
        yield LocalRun(info.run_id, info.pid, str(d.get("agent", "")), str(d["repo"]),
                       int(d["issue"]), max(times))


# ---- the shell: apply ------------------------------------------------------------------------


def apply(client: ForgeClient, decisions: list[Decision], cfg: Config, *,
          kill: Callable[[int, int], None] = os.kill,
          run_sprint: Callable[[Decision], object] | None = None) -> list[dict]:
    """Carry out decisions; returns one event row per action actually taken (provenance)."""
    events = []
    for d in decisions:
        done = _APPLY[d.action](client, d, cfg, kill)
        if done:
            events.append({"kind": _EVENT[d.action], "subject": d.ref, "agent": d.agent,
                           "reason": d.reason, **({"run_id": d.run_id} if d.run_id else {}),
                           **({"to": d.to_agent} if d.to_agent else {})})
        if d.action == "sprint" and run_sprint is not None:
            run_sprint(d)
    return events


_EVENT = {"nudge": "agent_nudged", "release": "claim_released", "assign": "issue_assigned",
          "sprint": "issue_assigned", "stop": "run_stopped"}


def _nudge(client: ForgeClient, d: Decision, cfg: Config, kill) -> bool:
    mark = NUDGE.format(run=d.run_id)
    if any(mark in c.body for c in client.list_comments(d.repo, d.issue)):
        return False
    client.create_comment(d.repo, d.issue, f"{mark}\n@{d.agent or 'agent'}: still on this? dispatch "
                          f"sees {d.reason}. Without activity the claim is released and the issue "
                          "re-routed.")
    return True


def _release(client: ForgeClient, d: Decision, cfg: Config, kill) -> bool:
    from .triage import ready_label

    comments = client.list_comments(d.repo, d.issue)
    current = claims.active_claim(comments)
    if current is None or current.run_id != d.run_id:
        return False  # released meanwhile, or re-claimed by a newer run: leave it be
    # route first, release last: a run that dies half-way leaves the claim, so the next run
    # redoes the whole step, and the markers keep the comments from doubling
    if d.to_agent:
        mark = REROUTE.format(run=d.run_id, agent=d.to_agent)
        if not any(mark in c.body for c in comments):
            client.create_comment(d.repo, d.issue, f"{mark}\nRe-routed from {d.agent or '-'} to "
                                  f"**{d.to_agent}**: {d.reason}.")
        client.add_labels(d.repo, d.issue, [client.ensure_label(d.repo, ready_label(d.to_agent)).id])
    if d.agent:
        old = [lb for lb in client.list_labels(d.repo) if lb.name == ready_label(d.agent)]
        for lb in old:
            client.remove_label(d.repo, d.issue, lb.id)
    where = f"re-routed to {d.to_agent}" if d.to_agent else "back to the backlog (no agent free)"
    claims.release(client, d.repo, d.issue, run_id=d.run_id, label=cfg.triage.claim_label,
                   note=f"dispatch watchdog released the claim of {d.agent or '-'} (run "
                        f"`{d.run_id}`): {d.reason}; {where}.")
    return True


def _assign(client: ForgeClient, d: Decision, cfg: Config, kill) -> bool:
    from .backlog import ROUTE_MARK
    from .triage import ready_label

    mark = f"{ROUTE_MARK} agent={d.agent} -->"
    comments = client.list_comments(d.repo, d.issue)
    if claims.active_claim(comments):
        return False  # someone took it since we looked
    if not any(mark in c.body for c in comments):
        client.create_comment(d.repo, d.issue, f"{mark}\nAssigned to **{d.agent}** by the "
                              f"dispatch watchdog: {d.reason}.")
    client.add_labels(d.repo, d.issue, [client.ensure_label(d.repo, ready_label(d.agent)).id])
    return True


def _stop(client: ForgeClient, d: Decision, cfg: Config, kill) -> bool:
    try:
        kill(d.pid, signal.SIGTERM)  # the sprint turns SIGTERM into a clean release
    except ProcessLookupError:
        return False
    return True


_APPLY = {"nudge": _nudge, "release": _release, "assign": _assign, "sprint": _assign,
          "stop": _stop}


def pane_activity(snapshot: dict) -> dict[str, datetime]:
    """Agent -> last pane output, from a collector snapshot (metrics row)."""
    out: dict[str, datetime] = {}
    for p in snapshot.get("panes") or []:
        t = parse_time(p.get("last_activity")) if p.get("agent") else None
        if t and (p["agent"] not in out or t > out[p["agent"]]):
            out[p["agent"]] = t
    return out
