"""One collector snapshot (tmux panes, cron drift, forge activity, sprints, process and model
server liveness, backlog size), each probe failing on its own; `run_collector` records it.

Agent states, from the live sprint locks and the tmux panes mapped to each agent (a pane belongs
to an agent when its session or window is named after it, case-insensitively):

- holds a live sprint lock: `stuck` when the lock is older than sprint.max_minutes +
  collector.idle_minutes (the sprint outlived its own budget) or when it has live panes and all
  are idle; else `working` (a held flock proves its process is alive, with or without a pane);
- no sprint lock: `working` if a live pane of it shows output within collector.idle_minutes;
  `idle` if it has live panes but all are quiet, or its persistent loop holds `loop:<agent>`;
  `dead` if all its panes are dead, or it had a pane in the previous snapshot and now has none
  (sticky until a pane comes back); else `idle` (a cron-only agent between sprints).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from . import telemetry as tm
from .config import Config
from .forge import ForgeClient, parse_time, strip_credentials
from .locks import LockInfo, live
from .results import one_line, read_results

log = logging.getLogger(__name__)

TMUX_FIELDS = ("pane_id", "session_name", "window_name", "pane_current_command", "pane_pid",
               "pane_dead", "pane_activity", "window_activity")
TMUX_FORMAT = "\t".join("#{" + f + "}" for f in TMUX_FIELDS)
PROBE_TIMEOUT = 5.0  # seconds for tmux, crontab and the model server
MAX_THREADS = 40  # issue/PR threads whose comments are read per snapshot (bounds requests)
Runner = Callable[..., subprocess.CompletedProcess]


@dataclass(frozen=True)
class Snapshot:
    row: dict  # the metrics.jsonl row (telemetry/metrics.schema.json)
    state: dict  # the reduced state that diff_states compares (telemetry/SCHEMA.md)

    @property
    def probes(self) -> dict[str, str]:
        return self.row["probes"]


class ProbeError(Exception):
    """A probe could not observe what it looks at; its one-line reason goes into `probes`."""


def collect(cfg: Config, *, client: ForgeClient | None, runner: Runner = subprocess.run,
            now: Callable[[], datetime] = tm.utc_now, env: Mapping[str, str] = os.environ,
            previous: dict | None = None, proc: Path = Path("/proc")) -> Snapshot:
    """Run every probe; `previous` is the last reduced state (for `since` and vanished panes)."""
    t0, at = time.perf_counter(), now()
    probes: dict[str, str] = {}
    row: dict[str, Any] = {"kind": "snapshot", "ts": tm.format_ts(at)}
    state: dict[str, Any] = {}

    def probe(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - a probe must never stop the snapshot
            log.debug("probe %s failed", name, exc_info=True)
            probes[name] = "error: " + (one_line(str(e), 200) or type(e).__name__)
            return None
        probes[name] = "ok"
        return out

    panes = probe("tmux", _tmux, cfg, runner, env, at)
    if panes is not None:
        row["panes"] = panes
        state["panes"] = {p["id"]: {k: p[k] for k in ("alive", "idle", "command")} for p in panes}
    if cfg.collector.expected_cron and (cron := probe("cron", _cron, cfg.collector.expected_cron, runner, env)):
        row["cron"], state["cron"] = cron, {"missing": cron["missing"]}
    repos = probe("forge", _repos, client, cfg) if client else None
    if repos is None:
        probes["forge"] = probes["backlog"] = probes.get("forge", "error: no forge client (is the token configured?)")
    else:
        if forge := probe("forge", _forge, client, cfg, repos, at):
            row["forge"], state["pulls"], state["issues"] = forge
        if backlog := probe("backlog", _backlog, client, cfg, repos, at):
            row["backlog"] = backlog
    locks, sprints = probe("sprints", _sprints, cfg, at) or ([], None)
    if sprints:
        row["sprints"], state["sprints"] = sprints, {k: sprints[k] for k in ("running", "failed")}
    watched = cfg.collector.processes or cfg.collector.pid_files
    if watched and (found := probe("processes", _processes, cfg, proc)) is not None:
        row["processes"] = found
    if cfg.queue.url and (queue := probe("queue", _queue, cfg)) is not None:
        row["queue"] = queue
    model = row["model_server"] = _model_server(cfg, env)
    probes["model_server"] = model.pop("error", "ok")
    state["model_server"] = {"up": model["up"], "url": model["url"]}
    row["agents"] = state["agents"] = agent_states(cfg, panes, locks, (previous or {}).get("agents") or {}, at)
    row["probes"], row["duration_s"] = probes, round(time.perf_counter() - t0, 3)
    return Snapshot(row, state)


# ---- probes ----------------------------------------------------------------------------------


def _queue(cfg: Config) -> dict:
    """Depth per agent queue, worker liveness per host, dead letters (only with queue.url)."""
    from .jobs import failed_jobs, queue_status

    st = queue_status(cfg)
    return {
        "queues": {q.queue: {"queued": q.queued, "delayed": q.delayed, "running": q.running,
                             "failed": q.failed} for q in st.queues},
        "workers": [{"host": w.host, "pid": w.pid, "agents": list(w.agents), "alive": w.alive,
                     "last_seen_s": round(w.last_seen_s, 1)} for w in st.workers],
        "dead_letters": len(failed_jobs(cfg)),
    }


def _run(argv: list[str], runner: Runner, env: Mapping[str, str]) -> subprocess.CompletedProcess:
    try:
        return runner(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT, env=dict(env))
    except FileNotFoundError:
        raise ProbeError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ProbeError(f"{argv[0]} did not answer within {PROBE_TIMEOUT:g}s") from None


def _tmux(cfg: Config, runner: Runner, env: Mapping[str, str], at: datetime) -> list[dict]:
    c = cfg.collector
    socket = ["-L", c.tmux_socket] if c.tmux_socket else []
    out = _run(["tmux", *socket, "list-panes", "-a", "-F", TMUX_FORMAT], runner, env)
    if out.returncode != 0:
        if "no server running" in out.stderr or "error connecting" in out.stderr:
            return []  # no server: the probe worked, and there are no panes
        raise ProbeError(one_line(out.stderr, 200) or f"tmux exited {out.returncode}")
    names = {a.name.lower(): a.name for a in cfg.agents}
    idle_after = timedelta(minutes=c.idle_minutes)
    panes = []
    for line in out.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) != len(TMUX_FIELDS):
            continue
        pane_id, session, window, command, pid, dead, pane_act, window_act = fields
        if c.tmux_sessions and session not in c.tmux_sessions:
            continue
        # tmux 3.3 leaves #{pane_activity} empty; the window's activity is the finest it has then
        last = _epoch(pane_act) or _epoch(window_act)
        alive = dead != "1"
        pane = {"id": pane_id, "session": session, "window": window, "command": command,
                "pid": int(pid) if pid.isdigit() else 0, "alive": alive,
                "idle": bool(alive and last is not None and at - last >= idle_after)}
        if last is not None:
            pane["last_activity"] = tm.format_ts(last)
        agent = names.get(session.lower()) or names.get(window.lower())
        if agent:
            pane["agent"] = agent
        panes.append(pane)
    return panes


def _epoch(text: str) -> datetime | None:
    return datetime.fromtimestamp(int(text), UTC) if text.strip().isdigit() else None


def _cron(expected: list[str], runner: Runner, env: Mapping[str, str]) -> dict:
    out = _run(["crontab", "-l"], runner, env)
    if out.returncode != 0 and "no crontab" not in out.stderr.lower():
        raise ProbeError(one_line(out.stderr, 200) or f"crontab -l exited {out.returncode}")
    lines = [ln for ln in out.stdout.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return {"expected": len(expected), "missing": [e for e in expected if not any(e in ln for ln in lines)]}


def _repos(client: ForgeClient, cfg: Config) -> list[str]:
    from .backlog import resolve_repos

    return resolve_repos(client, cfg)


def _forge(client: ForgeClient, cfg: Config, repos: list[str], at: datetime) -> tuple[dict, dict, dict]:
    """Counts for the row, and PR / issue states for the diff, from items updated in the window."""
    start = at - timedelta(hours=cfg.collector.window_hours)
    # One `since` query per repo returns issues and PRs alike, so requests grow with the
    # window's activity, not with the repo's history.
    queries = [(client.issues_query(r)[0], {"state": "all", "since": tm.format_ts(start)}) for r in repos]
    counts = Counter(prs_opened=0, prs_merged=0, issues_closed=0)
    pulls: dict[str, str] = {}
    issues: dict[str, str] = {}
    threads: list[tuple[datetime, str, int]] = []
    for repo, items in zip(repos, client.paginate_many(queries), strict=True):
        for d in items:
            ref = f"{repo}#{d['number']}"
            created, closed = parse_time(d.get("created_at")), parse_time(d.get("closed_at"))
            if d.get("comments"):
                threads.append((parse_time(d.get("updated_at")) or start, repo, d["number"]))
            pr = d.get("pull_request")
            if pr is not None:
                merged = parse_time(pr.get("merged_at"))
                counts["prs_opened"] += bool(created and created >= start)
                counts["prs_merged"] += bool(merged and merged >= start)
                if any(t and t >= start for t in (created, merged, closed)):
                    pulls[ref] = "merged" if pr.get("merged") or merged else d.get("state", "open")
            elif d.get("state") == "closed":
                if closed and closed >= start:  # a comment on an old closed issue is no closing
                    counts["issues_closed"] += 1
                    issues[ref] = "closed"
            else:
                issues[ref] = "open"
    accounts = sorted({a.account for a in cfg.agents if a.account})
    comments = dict.fromkeys(accounts, 0)
    if accounts and threads:
        recent = sorted(threads, reverse=True)[:MAX_THREADS]
        for thread in client.map(lambda t: client.list_comments(t[1], t[2]), recent):
            for c in thread:
                if c.author in comments and c.created_at and c.created_at >= start:
                    comments[c.author] += 1
    return {**counts, "comments": comments}, pulls, issues


def _backlog(client: ForgeClient, cfg: Config, repos: list[str], at: datetime) -> dict:
    from .backlog import fetch
    from .triage import triage

    backlog = fetch(client, repos)
    result = triage(list(backlog.issues), backlog.open_pulls, cfg.agents, cfg.triage, at)
    return {"open": len(backlog.issues), "eligible": len(result.ranked)}


def _sprints(cfg: Config, at: datetime) -> tuple[list[LockInfo], dict]:
    """Live locks (running sprints and loops) and the results rows of the window (finished ones)."""
    # A persistent loop holds `loop:<agent>` for its whole life: liveness, not a sprint.
    locks = list(live(cfg.state_path / "locks"))
    start = at - timedelta(hours=cfg.collector.window_hours)
    outcomes: Counter[str] = Counter()
    failed = set()
    for r in read_results(cfg.state_path / "results.csv", since=start):
        outcomes[r.outcome] += 1
        if r.outcome == "failed":
            failed.add(r.run_id)
    # A persistent loop holds `loop:<agent>` for its whole life: liveness, not a sprint.
    running = sorted({lk.run_id for lk in locks if lk.run_id and lk.data.get("kind") != "loop"})
    return locks, {"running": running, "failed": sorted(failed),
                   "finished": dict(sorted(outcomes.items()))}


def _processes(cfg: Config, proc: Path) -> dict[str, bool]:
    running = set()
    for comm in proc.glob("[0-9]*/comm"):
        try:
            running.add(comm.read_text(encoding="utf-8", errors="replace").strip())
        except OSError:
            continue  # exited while we looked
    # /proc/PID/comm holds at most 15 characters of the name
    found = {name: name[:15] in running for name in cfg.collector.processes}
    for pid_file in cfg.collector.pid_files:
        try:
            pid = int(Path(os.path.expanduser(pid_file)).read_text().strip())
        except (OSError, ValueError):
            found[pid_file] = False
            continue
        found[pid_file] = pid > 0 and (proc / str(pid)).is_dir()
    return found


def _model_server(cfg: Config, env: Mapping[str, str]) -> dict:
    """{up, url, models}; when down also `error`, which becomes the probe's status."""
    import requests

    url = strip_credentials(cfg.llm.base_url).rstrip("/")
    try:
        key = cfg.llm_api_key(env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        resp = requests.get(url + "/models", headers=headers, timeout=PROBE_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - unreachable, refused, bad key file: all mean down
        reason = ("timed out" if isinstance(e, requests.Timeout) else "cannot connect"
                  if isinstance(e, requests.ConnectionError) else one_line(str(e), 200) or type(e).__name__)
        return {"up": False, "url": url, "error": f"error: {reason}: GET {url}/models"}
    if not resp.ok:
        return {"up": False, "url": url, "error": f"error: {resp.status_code} for GET {url}/models"}
    try:
        models = [str(m.get("id")) for m in resp.json().get("data", [])][:20]
    except (ValueError, AttributeError):
        models = []
    return {"up": True, "url": url, "models": models}


# ---- agents ----------------------------------------------------------------------------------


def agent_states(cfg: Config, panes: list[dict] | None, locks: list[LockInfo], previous: dict,
                 at: datetime) -> dict[str, dict]:
    """Each agent's state by the rule in the module docstring; `panes` None means tmux is unknown."""
    overdue = timedelta(minutes=cfg.sprint.max_minutes + cfg.collector.idle_minutes)
    out = {}
    for agent in cfg.agents:
        name, prev = agent.name, previous.get(agent.name) or {}
        held = [lk for lk in locks if lk.data.get("agent") == name]
        lock = next((lk for lk in held if lk.data.get("kind") != "loop"), None)
        looping = any(lk.data.get("kind") == "loop" for lk in held)
        mine = [p for p in panes or () if p.get("agent") == name]
        alive = [p for p in mine if p["alive"]]
        active = [p for p in alive if not p["idle"]]
        entry: dict[str, Any] = {}
        if lock is not None:
            late = at - datetime.fromtimestamp(lock.started, UTC) > overdue
            state = "stuck" if late or (alive and not active) else "working"
            entry.update(run_id=lock.run_id, issue=lock.key)
        elif active:
            state = "working"
        elif alive or looping:  # a loop between sprints is alive even without a pane
            state = "idle"
        elif panes is None and prev.get("state") in tm.AGENT_STATES:
            # tmux could not be asked: what we knew stands, rather than a made-up change
            state = prev["state"] if prev["state"] != "stuck" else "idle"
            entry.update({k: prev[k] for k in ("pane",) if prev.get(k)})
        elif mine or (panes is not None and prev.get("pane")):
            state = "dead"
        else:
            state = "idle"
        pane = (active or alive or mine or [{}])[0].get("id") or (prev.get("pane") if state == "dead" else None)
        if pane:
            entry["pane"] = pane
        since = prev.get("since") if prev.get("state") == state else None
        out[name] = {"state": state, "since": since or tm.format_ts(at), **entry}
    return out


# ---- recording -------------------------------------------------------------------------------


def run_collector(cfg: Config, *, client: ForgeClient | None, runner: Runner = subprocess.run,
                  now: Callable[[], datetime] = tm.utc_now, env: Mapping[str, str] = os.environ,
                  proc: Path = Path("/proc")) -> list[dict]:
    """Collect one snapshot and `record` it; returns the events emitted."""
    previous = tm.read_collector_state(cfg.state_path / "telemetry" / "last_state.json")
    snap = collect(cfg, client=client, runner=runner, now=now, env=env, previous=previous, proc=proc)
    return record(cfg, snap)


def record(cfg: Config, snap: Snapshot) -> list[dict]:
    """Append the snapshot to metrics.jsonl, diff it against last_state.json, append the events
    to events.jsonl and replace last_state.json with `{**old, **new}`; returns the events."""
    folder = cfg.state_path / "telemetry"
    state_file = folder / "last_state.json"
    opts = {"fsync": cfg.telemetry.fsync, "max_bytes": cfg.telemetry.max_bytes, "keep": cfg.telemetry.keep}
    tm.append(folder / "metrics.jsonl", snap.row, **opts)
    # Diff and save under one lock, re-reading the state inside it: two collectors that overlap
    # then report each change once instead of both diffing against the same old state.
    with tm.locked(state_file):
        old = tm.read_collector_state(state_file)
        last, this = tm.parse_ts(old.get("ts")), tm.parse_ts(snap.row["ts"])
        if last and this and this < last < this + timedelta(minutes=10):
            # an overlapping collector recorded a later snapshot first: diffing this one would
            # go backwards (a bigger gap means the clock was stepped back: carry on)
            return []
        events = [{"schema": tm.SCHEMA_VERSION, "ts": snap.row["ts"], **ev}
                  for ev in tm.diff_states(old, snap.state)]
        for ev in events:
            tm.append(folder / "events.jsonl", ev, **opts)
        tm.write_state(state_file, {**old, **snap.state, "ts": snap.row["ts"]})
    return events
