"""One sprint, end to end: pick, lock, claim, clone, run the agent, push, PR, comment, record.

Every exit path releases what it took (lock, claim) and writes exactly one results row for work
it claimed. A run that produced a PR is reported a success; one that did not never is.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from . import claims
from .backends import CLIBackend, DirectBackend, GatewayBackend, Job, run_first_available
from .config import Config
from .errors import DispatchError, ForgeError, LockHeld
from .forge import ForgeClient, Issue, PullRequest, Repo
from .gitops import Git, make_workspace, write_askpass
from .locks import Lock, stale
from .results import ResultRow, append_result

log = logging.getLogger(__name__)

SYSTEM = """You are a careful software engineer working alone, unattended, in a git clone.
Use the tools to read the code, make the change the issue asks for, and run the project's tests.
Paths are relative to the repository root. Commit nothing you would not want reviewed.
When the work is done, reply with a short summary of what you changed and no tool call."""


@dataclass(frozen=True)
class SprintOutcome:
    outcome: str  # success | failed | partial | nothing_to_do | dry_run
    repo: str
    issue: int | None
    run_id: str
    pr_url: str = ""
    error: str = ""
    branch: str = ""
    backend: str = ""
    model: str = ""
    notes: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        return 0 if self.outcome in ("success", "nothing_to_do", "dry_run") else 1

    def as_json(self) -> dict:
        return {"outcome": self.outcome, "repo": self.repo, "issue": self.issue,
                "pr_url": self.pr_url or None, "run_id": self.run_id, "error": self.error or None,
                "branch": self.branch or None, "backend": self.backend or None,
                "model": self.model or None, "notes": list(self.notes)}


def new_run_id(now: float | None = None) -> str:
    stamp = datetime.fromtimestamp(now or time.time(), UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def pick_model(issue: Issue, cfg: Config) -> tuple[str, str]:
    """(tier, model): the strong model for large or risky issues, the fast one otherwise."""
    llm, sp = cfg.llm, cfg.sprint
    strong = {s.lower() for s in sp.strong_labels}
    hit = sorted(lb for lb in issue.labels if lb.lower() in strong)
    if hit or len(issue.body) >= sp.strong_min_chars:
        return "strong", llm.strong_model or llm.model
    return "fast", llm.fast_model or llm.model


@dataclass
class Sprinter:
    """Runs sprints for one config; collaborators are injectable for tests."""

    cfg: Config
    client: ForgeClient
    token: str
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    clock: Callable[[], float] = time.time
    make_model: Callable[[str], object] | None = None  # tier model name -> Model
    which: Callable[[str], str | None] | None = None

    def __post_init__(self) -> None:
        state = self.cfg.state_path
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.locks = state / "locks"
        self.workspaces = state / "workspaces"
        self.trajectories = state / "trajectories"
        self.results = state / "results.csv"
        self.agent = self.cfg.sprint.agent or (self.cfg.agents[0].name if self.cfg.agents else "dispatch")

    # -- picking ----------------------------------------------------------------------------

    def candidates(self, repo: str, number: int | None) -> list[Issue]:
        if number is not None:
            return [self.client.get_issue(repo, number)]
        from .backlog import fetch
        from .triage import triage

        backlog = fetch(self.client, [repo])
        result = triage(list(backlog.issues), backlog.open_pulls, self.cfg.agents, self.cfg.triage,
                        datetime.fromtimestamp(self.clock(), UTC))
        return [r.issue for r in result.ranked]

    def still_eligible(self, issue: Issue) -> tuple[Issue, str | None]:
        """Re-read the issue after taking the lock: another run may have finished it meanwhile."""
        from .triage import classify

        fresh = self.client.get_issue(issue.repo, issue.number)
        if fresh.state != "open":
            return fresh, "closed"
        return fresh, classify(fresh, self.client.list_pulls(issue.repo), self.cfg.triage)

    # -- the run ----------------------------------------------------------------------------

    def run(self, repo: str, number: int | None = None, *, backend: str = "auto",
            dry_run: bool = False) -> SprintOutcome:
        run_id = new_run_id(self.clock())
        notes = [] if dry_run else self.recover_stale()
        skipped: list[str] = []
        for issue in self.candidates(repo, number):
            if dry_run:
                return SprintOutcome("dry_run", repo, issue.number, run_id, notes=(
                    f"would work on {issue.ref}: {issue.title}",))
            lock = Lock(self.locks, issue.ref, run_id=run_id,
                        data={"repo": repo, "issue": issue.number, "agent": self.agent})
            try:
                lock.acquire()
            except LockHeld as e:
                skipped.append(str(e))
                continue
            try:
                fresh, reason = self.still_eligible(issue)
                if reason:
                    skipped.append(f"{issue.ref}: {reason}")
                    continue
                try:
                    winner = claims.claim(self.client, repo, issue.number, run_id=run_id,
                                          agent=self.agent, label=self.cfg.triage.claim_label)
                except DispatchError as e:  # the claim was withdrawn; try the next issue
                    skipped.append(f"{issue.ref}: claim failed: {e}")
                    continue
                if winner is None or winner.run_id != run_id:
                    skipped.append(f"{issue.ref}: claimed first by run {winner.run_id if winner else '?'}")
                    continue
                log.info("run %s claimed %s: %s", run_id, issue.ref, issue.title)
                return self.work(fresh, run_id, backend, notes)
            finally:
                lock.release()
        why = "; ".join(skipped[-3:]) if skipped else "no eligible issue"
        return SprintOutcome("nothing_to_do", repo, number, run_id, error=why, notes=tuple(notes))

    def work(self, issue: Issue, run_id: str, backend: str, notes: list[str]) -> SprintOutcome:
        """Everything after a successful claim; always releases the claim and records one row."""
        from .prompt import branch_name

        t0 = self.clock()
        branch = branch_name(issue)
        tier, model = pick_model(issue, self.cfg)
        out = SprintOutcome("failed", issue.repo, issue.number, run_id, branch=branch, model=model,
                            notes=(*notes, f"model tier {tier}"))
        result = None
        try:
            out, result = self._implement(issue, run_id, branch, model, backend, out)
        except DispatchError as e:
            out = _with(out, outcome="failed", error=f"{type(e).__name__}: {e}")
        except BaseException as e:  # SIGTERM, Ctrl-C: still release and record, then go on dying
            out = _with(out, outcome="failed", error=f"interrupted ({type(e).__name__})")
            self.finish(issue, out, result, t0)
            raise
        self.finish(issue, out, result, t0)
        return out

    def _implement(self, issue: Issue, run_id: str, branch: str, model: str, backend: str,
                   out: SprintOutcome):
        from .prompt import sprint_prompt

        repo = self.client.get_repo(issue.repo)
        ws = make_workspace(self.workspaces, run_id)
        clone = ws / "repo"
        sp = self.cfg.sprint
        git = Git(cwd=clone, askpass=write_askpass(self.cfg.state_path), token=self.token,
                  author=(sp.git_name, sp.git_email), env=self.env)
        git.clone(repo.clone_url, clone)
        git.save_config()
        if git.remote_branch_exists(branch):
            # an earlier attempt pushed partial work: build on it rather than start over
            git.run("fetch", "--quiet", "origin", branch, with_token=True)
            git.run("checkout", "--quiet", "-B", branch, "FETCH_HEAD")
        else:
            git.run("checkout", "--quiet", "-b", branch)
        start = git.run("rev-parse", "HEAD")
        comments = self.client.list_comments(issue.repo, issue.number)
        prompt = sprint_prompt(issue, repo, comments, branch=branch)
        prompt_file = ws / "prompt.md"
        prompt_file.write_text(prompt, encoding="utf-8")
        self.trajectories.mkdir(parents=True, exist_ok=True, mode=0o700)
        job = Job(workspace=clone, prompt=prompt, prompt_file=prompt_file, system=SYSTEM,
                  repo=issue.repo, issue=issue.number, model=model,
                  trajectory=self.trajectories / f"{run_id}.jsonl", max_seconds=sp.max_minutes * 60)
        log.info("cloned %s into %s on %s; running the agent (model %s)", issue.repo, clone, branch, model)
        result = run_first_available(self.backends(backend), job)
        # whatever a backend says goes into results.csv, the PR body and forge comments
        result = replace(result, final=self.redact(result.final), error=self.redact(result.error))
        log.info("backend %s ended: %s %s", result.backend, result.status, result.error)
        out = _with(out, backend=result.backend, model=result.model or model,
                    notes=(*out.notes, *result.fallbacks))
        git.restore_config()
        git.commit_all(f"Fix #{issue.number}: {issue.title}\n\nWork of dispatch run {run_id}.")
        # an earlier partial run's commits are already on the branch: only this run's count
        ahead = git.ahead(start)
        if ahead and (result.ok or sp.push_partial):
            log.info("pushing %d commit(s) to %s", ahead, branch)
            git.push(branch)
        if ahead and result.ok:
            pr = self.open_pull(issue, repo, branch, run_id, result)
            return _with(out, outcome="success", pr_url=pr.html_url), result
        if ahead and sp.push_partial:
            return _with(out, outcome="partial", error=_why(result) + f"; {ahead} commit(s) pushed to {branch}"), result
        if result.ok:
            return _with(out, outcome="failed", error="agent finished without changing anything"), result
        return _with(out, outcome="failed", error=_why(result)), result

    def open_pull(self, issue: Issue, repo: Repo, branch: str, run_id: str, result) -> PullRequest:
        """The PR for this branch: an open one already there (a re-delivered run), else a new one."""
        existing = self._pull_for(issue.repo, branch)
        if existing:
            return existing
        body = (f"Closes #{issue.number}\n\nOpened by dispatch run `{run_id}` "
                f"(backend {result.backend}, model {result.model}, {result.steps} steps).\n\n"
                f"Agent's summary:\n\n{_quote(result.final or '(none)')}")
        try:
            return self.client.create_pull(issue.repo, head=branch, base=repo.default_branch,
                                           title=f"Fix #{issue.number}: {issue.title}", body=body)
        except ForgeError as e:
            # a retried POST whose first try landed answers "already exists": that PR is ours
            found = self._pull_for(issue.repo, branch) if e.status in (409, 422) else None
            if found is None:
                raise
            return found

    def _pull_for(self, repo: str, branch: str) -> PullRequest | None:
        return next((pr for pr in self.client.list_pulls(repo) if pr.head == branch), None)

    def finish(self, issue: Issue, out: SprintOutcome, result, t0: float) -> None:
        """Release the claim with the true outcome, then record the row (best effort each)."""
        note = {
            "success": f"dispatch opened {out.pr_url} for this issue.",
            "partial": f"dispatch could not finish: {out.error}. The work so far is on branch `{out.branch}`.",
        }.get(out.outcome, f"dispatch could not finish: {out.error}. Claim released.")
        try:
            claims.release(self.client, issue.repo, issue.number, run_id=out.run_id,
                           label=self.cfg.triage.claim_label, note=f"{note} (run `{out.run_id}`)")
            if out.outcome != "success":
                self._unroute(issue)
        except DispatchError as e:
            log.warning("could not release the claim on %s: %s", issue.ref, e)
        self.record(out, result, self.clock() - t0)

    def _unroute(self, issue: Issue) -> None:
        """A failed attempt hands the issue back to the pool: the agent's ready label comes off,
        or the issue would count as this agent's queued work for ever."""
        from .triage import ready_label

        name = ready_label(self.agent)
        if name in issue.labels:
            for lb in self.client.list_labels(issue.repo):
                if lb.name == name:
                    self.client.remove_label(issue.repo, issue.number, lb.id)

    def record(self, out: SprintOutcome, result, duration: float) -> None:
        r = result
        append_result(self.results, ResultRow(
            timestamp=datetime.fromtimestamp(self.clock(), UTC), run_id=out.run_id, repo=out.repo,
            issue=out.issue, agent=self.agent, backend=out.backend, model=out.model,
            outcome=out.outcome, duration_s=round(duration, 3), steps=r.steps if r else 0,
            tokens_in=r.tokens_in if r else 0, tokens_out=r.tokens_out if r else 0,
            cost_usd=r.cost_usd if r else 0.0, pr_url=out.pr_url, error=out.error))

    # -- backends ---------------------------------------------------------------------------

    def backends(self, choice: str) -> list:
        sp = self.cfg.sprint
        order = sp.backends if choice == "auto" else [choice]
        made = {
            "gateway": lambda: GatewayBackend(sp.gateway_url, probe_timeout=sp.probe_timeout),
            "cli": lambda: CLIBackend(sp.cli_command, env=self.env, **({"which": self.which} if self.which else {})),
            "direct": lambda: DirectBackend(self._model, self._environment, self._budget, self.redact),
        }
        return [made[name]() for name in order]

    def _model(self, model: str):
        if self.make_model:
            return self.make_model(model)
        from .agent import OpenAIModel

        llm = self.cfg.llm
        return OpenAIModel(llm.base_url, model, api_key=self.cfg.llm_api_key(self.env),
                           timeout=llm.timeout, prices=llm.prices)

    def _environment(self, job: Job):
        from .tools import Workspace, find_sandbox

        sp = self.cfg.sprint
        sandbox = find_sandbox(sp.sandbox, self.secret_paths(), network=sp.sandbox_network)
        return Workspace(job.workspace, forge=self.client, repo=job.repo, env=self.env,
                         sandbox=sandbox, issue=job.issue)

    def secret_paths(self) -> list[Path]:
        """What the model's shell must not see: the state dir (other runs, the askpass helper),
        the config and token files, and the operator's home."""
        paths = [self.cfg.state_path, Path(os.path.expanduser("~"))]
        if self.cfg.source:
            paths.append(Path(self.cfg.source).parent)
        for f in (self.cfg.gitea.token_file, self.cfg.llm.api_key_file):
            if f:
                paths.append(Path(os.path.expanduser(f)))
        return [p for p in paths if p.exists() and p != Path("/")]

    def _budget(self, job: Job):
        from .agent import Budget

        sp = self.cfg.sprint
        return Budget(max_steps=sp.max_steps, max_seconds=job.max_seconds,
                      max_tokens=sp.max_tokens, max_cost_usd=sp.max_cost_usd)

    def redact(self, text: str) -> str:
        """Every secret this run holds, masked: the forge token and the model key."""
        for secret in self._secrets():
            text = text.replace(secret, "***")
        return text

    def _secrets(self) -> list[str]:
        if not hasattr(self, "_secret_list"):
            try:
                key = self.cfg.llm_api_key(self.env)
            except DispatchError:
                key = ""
            self._secret_list = [s for s in (self.token, key) if s and len(s) >= 4]
        return self._secret_list

    # -- housekeeping -----------------------------------------------------------------------

    def recover_stale(self) -> list[str]:
        """Crashed runs left lock files: release their forge claims and record them as failed."""
        notes = []
        for _path, info in stale(self.locks):
            repo, number = info.data.get("repo"), info.data.get("issue")
            lock = Lock(self.locks, info.key, run_id="recovery")
            try:
                lock.acquire()
            except LockHeld:
                continue  # another run is recovering it right now
            try:
                if lock.previous is None or lock.previous.run_id != info.run_id:
                    continue  # another run recovered it between our look and our lock
                held = claims.active_claim(self.client.list_comments(repo, int(number))) if (
                    repo and number) else None
                if held is None or held.run_id != info.run_id:
                    # it died after releasing its claim (or never got one): nothing to undo
                    notes.append(f"removed the lock file of dead run {info.run_id} ({info.key})")
                    continue
                msg = (f"dispatch run `{info.run_id}` died (pid {info.pid} is gone); "
                       "claim released so the issue can be picked again.")
                claims.release(self.client, repo, int(number), run_id=info.run_id,
                               label=self.cfg.triage.claim_label, note=msg)
                append_result(self.results, ResultRow(
                    timestamp=datetime.fromtimestamp(self.clock(), UTC), run_id=info.run_id,
                    repo=repo, issue=int(number), agent=str(info.data.get("agent", "")),
                    outcome="failed", duration_s=round(self.clock() - info.started, 3),
                    error=f"crashed: process {info.pid} died holding the lock"))
                notes.append(f"took over the stale lock of dead run {info.run_id} ({info.key})")
            except DispatchError as e:
                notes.append(f"stale lock {info.key}: could not release its claim: {e}")
                lock.release(leave=info.data)  # keep the evidence for the next run
            finally:
                lock.release()
        return notes

    def prune(self) -> tuple[list[Path], list[Path]]:
        """Old workspaces, logs and trajectories go; unpushed or running work stays.

        Returns (removed, kept)."""
        from .house import cleanup

        done = cleanup(self.cfg.state_path, self.cfg.house.keep_days, now=self.clock(), env=dict(self.env))
        return done.removed, done.kept_unpushed + done.kept_live


def _with(out: SprintOutcome, **changes) -> SprintOutcome:
    return replace(out, **changes)


def _why(result) -> str:
    if result is None:
        return "no result"
    return result.error or f"agent stopped: {result.status}"


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in text.strip().splitlines()[:40])
