"""The persistent worker lane of one agent (a tmux pane): pick its next issue, run a sprint,
remember failures, cool down, repeat; stop cleanly on SIGTERM/SIGINT. One loop per agent.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DispatchError
from .forge import ForgeClient, Issue
from .locks import Lock
from .telemetry import read_state, write_state

if TYPE_CHECKING:  # config.py imports this module's LoopConfig: keep the import graph a tree
    from .config import AgentConfig, Config

log = logging.getLogger(__name__)

BACKEND_OF_KIND = {"cli": "cli", "gateway": "gateway", "direct": "direct"}


@dataclass(frozen=True)
class LoopConfig:
    """The `loop:` config section."""

    cooldown_s: float = 60.0  # pause after a sprint
    idle_sleep_s: float = 300.0  # pause when there was nothing to do (or the forge failed)
    max_failures: int = 3  # failed sprints on one issue before it is skipped for a while
    skip_hours: float = 6.0  # how long a skipped issue rests before one more try
    tmux_session: str = "dispatch"  # `dispatch tmux up` session name
    # what each tmux window runs; {dispatch}, {config} and {agent} are filled in, shell-quoted
    tmux_command: str = "{dispatch} --config {config} loop --agent {agent}"


@dataclass(frozen=True)
class TurnResult:
    outcome: str  # a sprint outcome, "idle" (nothing to pick) or "error"
    issue: str = ""  # owner/repo#n
    detail: str = ""
    pause: float = 0.0  # seconds to sleep before the next turn


# ---- skip list -------------------------------------------------------------------------------


@dataclass
class SkipList:
    """Failures per issue and a rest period once they reach the limit; saved atomically."""

    path: Path
    entries: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> SkipList:
        data = read_state(path)
        return cls(path, {k: v for k, v in (data.get("issues") or {}).items() if isinstance(v, dict)})

    def save(self) -> None:
        write_state(self.path, {"issues": self.entries})

    def resting(self, ref: str, now: float) -> bool:
        return float(self.entries.get(ref, {}).get("until", 0)) > now

    def record(self, ref: str, outcome: str, now: float, cfg: LoopConfig, error: str = "") -> None:
        if outcome == "success":
            self.entries.pop(ref, None)
        elif outcome in ("failed", "partial"):
            e = self.entries.setdefault(ref, {"failures": 0, "until": 0})
            e["failures"] = int(e.get("failures", 0)) + 1
            e["error"] = error[:300]
            if e["failures"] >= cfg.max_failures:
                e["until"] = now + cfg.skip_hours * 3600
        elif outcome == "nothing_to_do":
            # taken or closed meanwhile: don't pick it again on the very next turn
            e = self.entries.setdefault(ref, {"failures": 0, "until": 0})
            e["until"] = max(float(e.get("until", 0)), now + cfg.idle_sleep_s)
        self.save()


# ---- the loop --------------------------------------------------------------------------------


class WorkerLoop:
    """One agent's lane; collaborators injected so tests run it for a few fast turns."""

    def __init__(self, cfg: Config, agent: AgentConfig, client: ForgeClient, token: str, *,
                 loop_cfg: LoopConfig | None = None, env: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], object] | None = None,
                 make_sprinter: Callable[[Config], object] | None = None) -> None:
        self.cfg = dataclasses.replace(cfg, sprint=dataclasses.replace(cfg.sprint, agent=agent.name))
        self.agent, self.client, self.token = agent, client, token
        self.lc = loop_cfg or LoopConfig()
        self.env = os.environ if env is None else env
        self.clock = clock
        self._wake = threading.Event()
        self.sleep = sleep or self._wake.wait  # the default sleep wakes early on a stop signal
        self.make_sprinter = make_sprinter
        state = self.cfg.state_path
        self.lock = Lock(state / "locks", f"loop:{agent.name}", run_id=f"loop-{os.getpid()}",
                         data={"agent": agent.name, "kind": "loop"})
        self.skips = SkipList.load(state / "loops" / f"{agent.name}.skip.json")
        self.status_path = state / "loops" / f"{agent.name}.state.json"
        self.stopping = False
        self._in_sprint = False
        self._interrupted = False

    # -- picking --

    def select(self) -> Issue | None:
        """Issues labelled `<agent>-ready` first, then those triage routes to this agent."""
        from .backlog import fetch, resolve_repos
        from .triage import ready_label, triage

        repos = resolve_repos(self.client, self.cfg)
        backlog = fetch(self.client, repos)
        result = triage(list(backlog.issues), backlog.open_pulls, self.cfg.agents, self.cfg.triage,
                        datetime.fromtimestamp(self.clock(), UTC))
        mine, others = ready_label(self.agent.name), {ready_label(a.name) for a in self.cfg.agents}
        now = self.clock()
        ok = [r for r in result.ranked if not self.skips.resting(r.issue.ref, now)]
        labelled = [r for r in ok if mine in r.issue.labels]
        routed = [r for r in ok if r.route.agent == self.agent.name
                  and not others & set(r.issue.labels)]
        pick = (labelled or routed or [None])[0]
        return pick.issue if pick else None

    # -- one turn --

    def sprinter(self):
        if self.make_sprinter:
            return self.make_sprinter(self.cfg)
        from .sprint import Sprinter

        return Sprinter(self.cfg, self.client, self.token, env=self.env, clock=self.clock)

    def turn(self) -> TurnResult:
        try:
            issue = self.select()
        except DispatchError as e:
            log.warning("loop %s: cannot select work: %s", self.agent.name, e)
            return TurnResult("error", detail=str(e), pause=self.lc.idle_sleep_s)
        if issue is None:
            return TurnResult("idle", pause=self.lc.idle_sleep_s)
        backend = BACKEND_OF_KIND.get(self.agent.kind, "auto")
        log.info("loop %s: sprint on %s (backend %s)", self.agent.name, issue.ref, backend)
        self._in_sprint = True
        try:
            if self.stopping:
                raise KeyboardInterrupt("stop requested")
            out = self.sprinter().run(issue.repo, issue.number, backend=backend)
        except DispatchError as e:
            self.skips.record(issue.ref, "failed", self.clock(), self.lc, str(e))
            return TurnResult("error", issue.ref, str(e), self.lc.cooldown_s)
        finally:
            self._in_sprint = False
        self.skips.record(issue.ref, out.outcome, self.clock(), self.lc, out.error)
        return TurnResult(out.outcome, issue.ref, out.pr_url or out.error, self.lc.cooldown_s)

    # -- the lane --

    def run(self, *, max_turns: int | None = None, handle_signals: bool = True) -> int:
        """Turn until stopped (or max_turns); raises LockHeld if this agent's loop already runs."""
        self.lock.acquire()
        restore = self._install_signals() if handle_signals else {}
        turns = 0
        try:
            while not self.stopping and (max_turns is None or turns < max_turns):
                try:
                    result = self.turn()
                except KeyboardInterrupt:
                    # the sprint released its claim and lock on the way out (Sprinter.work)
                    self._status(TurnResult("stopped", detail="interrupted mid-sprint"), turns)
                    break
                turns += 1
                self._status(result, turns)
                log.info("loop %s: turn %d: %s %s", self.agent.name, turns, result.outcome,
                         result.issue)
                if self.stopping or (max_turns is not None and turns >= max_turns):
                    break
                self.sleep(result.pause)
        finally:
            for sig, old in restore.items():
                signal.signal(sig, old)
            self.lock.release()
        return 0

    def stop(self) -> None:
        self.stopping = True
        self._wake.set()

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            log.warning("loop %s: signal %d, stopping", self.agent.name, signum)
            self.stop()
            if self._in_sprint and not self._interrupted:
                # interrupt the sprint once: it releases its claim and lock and records the run;
                # a second signal must not cut that clean-up short
                self._interrupted = True
                raise KeyboardInterrupt(f"signal {signum}")

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _status(self, result: TurnResult, turns: int) -> None:
        write_state(self.status_path, {
            "agent": self.agent.name, "pid": os.getpid(), "turns": turns,
            "ts": datetime.fromtimestamp(self.clock(), UTC).isoformat(),
            "outcome": result.outcome, "issue": result.issue, "detail": result.detail[:300]})


# ---- tmux ------------------------------------------------------------------------------------


def tmux_up(session: str, windows: Mapping[str, str], *, socket: str = "",
            runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[str]:
    """Make sure `session` exists with one window per name running its command; returns the
    windows created. Idempotent: an existing window (a loop already running) is left alone."""
    base = ["tmux", *(["-L", socket] if socket else [])]

    def tmux(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = runner([*base, *args], capture_output=True, text=True, timeout=15)
        if check and proc.returncode != 0:
            raise DispatchError(f"tmux {args[0]} failed: {(proc.stderr or proc.stdout).strip()}")
        return proc

    created: list[str] = []
    names = list(windows)
    if not names:
        return created
    if tmux("has-session", "-t", f"={session}", check=False).returncode != 0:
        tmux("new-session", "-d", "-s", session, "-n", names[0], "-x", "200", "-y", "50",
             windows[names[0]])
        created.append(names[0])
    have = set(tmux("list-windows", "-t", f"={session}", "-F", "#{window_name}").stdout.split())
    for name in names:
        if name not in have and name not in created:
            tmux("new-window", "-d", "-t", f"={session}:", "-n", name, windows[name])
            created.append(name)
    return created


def loop_windows(agents: list[AgentConfig], template: str, *, dispatch: str,
                 config: str) -> dict[str, str]:
    """The command each agent's window runs, every substituted value shell-quoted."""
    q = shlex.quote
    return {a.name: template.format(dispatch=dispatch, config=q(config), agent=q(a.name))
            for a in agents}
