"""How a sprint's implementation pass runs: an agent gateway, a CLI agent, or the direct runner.

Each backend is probed with a short timeout; the first available in the configured order runs,
and the reasons the others were passed over are recorded with the result.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from .tools import scrubbed_env

BACKENDS = ("gateway", "cli", "direct")


@dataclass(frozen=True)
class Job:
    """Everything a backend needs for one implementation pass, with no secret in it."""

    workspace: Path  # the clone; the agent works here
    prompt: str  # the task, as sent to the agent
    prompt_file: Path  # the same text on disk, for CLI agents
    system: str
    repo: str
    issue: int
    model: str  # the tier picked for this issue
    trajectory: Path
    max_seconds: float


@dataclass(frozen=True)
class BackendResult:
    backend: str
    status: str  # "finished" or why it stopped (agent statuses, "error", "timeout")
    model: str = ""
    steps: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    final: str = ""
    error: str = ""
    fallbacks: tuple[str, ...] = field(default_factory=tuple)  # why earlier backends were skipped

    @property
    def ok(self) -> bool:
        return self.status == "finished"


class Backend(Protocol):
    name: str

    def probe(self) -> str | None:
        """None when usable, else the reason it is not."""

    def run(self, job: Job) -> BackendResult: ...


class GatewayBackend:
    """An agent gateway speaking OpenAI chat completions on a local port (8642 by default)."""

    name = "gateway"

    def __init__(self, url: str, *, probe_timeout: float = 2.0, model: str = "", session=None) -> None:
        self.url = url.rstrip("/")
        self.probe_timeout = probe_timeout
        self.model = model
        self.session = session

    def _session(self):
        if self.session is None:
            import requests

            self.session = requests.Session()
        return self.session

    def probe(self) -> str | None:
        import requests

        try:
            resp = self._session().get(f"{self.url}/v1/models", timeout=self.probe_timeout)
        except requests.RequestException as e:
            return f"gateway {self.url} unreachable ({type(e).__name__})"
        return None if resp.ok else f"gateway {self.url} answered {resp.status_code}"

    def run(self, job: Job) -> BackendResult:
        import requests

        body = {"model": self.model or job.model, "messages": [
            {"role": "system", "content": job.system},
            {"role": "user", "content": f"Work in the directory {job.workspace}.\n\n{job.prompt}"},
        ]}
        try:
            resp = self._session().post(f"{self.url}/v1/chat/completions", json=body,
                                        timeout=(self.probe_timeout, job.max_seconds))
        except requests.Timeout:
            return BackendResult(self.name, "timeout", body["model"], error="gateway timed out")
        except requests.RequestException as e:
            return BackendResult(self.name, "error", body["model"], error=f"gateway failed: {type(e).__name__}")
        if not resp.ok:
            return BackendResult(self.name, "error", body["model"], error=f"gateway answered {resp.status_code}")
        try:
            data = resp.json()
            final = data["choices"][0]["message"].get("content") or ""
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            return BackendResult(self.name, "error", body["model"], error="gateway reply was not a chat completion")
        return BackendResult(self.name, "finished", data.get("model") or body["model"], steps=1,
                             tokens_in=usage.get("prompt_tokens", 0),
                             tokens_out=usage.get("completion_tokens", 0), final=final[:2000])


class CLIBackend:
    """A CLI agent run in the workspace, e.g. `hermes chat -q {prompt_file}`."""

    name = "cli"

    def __init__(self, command: str, *, env: Mapping[str, str] | None = None,
                 which: Callable[[str], str | None] = shutil.which) -> None:
        self.command = command
        self.env = os.environ if env is None else env
        self.which = which

    def argv(self, job: Job) -> list[str]:
        # format each word after splitting, so a path with spaces stays one argument
        return [w.format(prompt_file=job.prompt_file, workspace=job.workspace, model=job.model,
                         repo=job.repo, issue=job.issue) for w in shlex.split(self.command)]

    def probe(self) -> str | None:
        if not self.command.strip():
            return "no cli command configured"
        exe = shlex.split(self.command)[0]
        return None if self.which(exe) else f"cli agent {exe!r} not found on PATH"

    def run(self, job: Job) -> BackendResult:
        argv = self.argv(job)
        env = scrubbed_env(self.env, job.workspace)
        try:
            proc = subprocess.Popen(argv, cwd=job.workspace, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
        except OSError as e:
            return BackendResult(self.name, "error", job.model, error=f"cannot start {argv[0]}: {e.strerror}")
        try:
            out, _ = proc.communicate(timeout=job.max_seconds)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return BackendResult(self.name, "timeout", job.model,
                                 error=f"{argv[0]} ran past {job.max_seconds:.0f}s and was stopped")
        except BaseException:
            _kill(proc)  # an interrupted sprint must not leave the agent working unwatched
            raise
        if proc.returncode != 0:
            return BackendResult(self.name, "error", job.model, final=out[-2000:],
                                 error=f"{argv[0]} exited {proc.returncode}: {out.strip()[-300:]}")
        return BackendResult(self.name, "finished", job.model, steps=1, final=out[-2000:])


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


class DirectBackend:
    """The built-in tool-calling loop over the OpenAI SDK, confined to the workspace."""

    name = "direct"

    def __init__(self, make_model: Callable[[str], object], make_env: Callable[[Job], object],
                 budget_for: Callable[[Job], object], redact: Callable[[str], str]) -> None:
        self.make_model = make_model
        self.make_env = make_env
        self.budget_for = budget_for
        self.redact = redact

    def probe(self) -> str | None:
        return None

    def run(self, job: Job) -> BackendResult:
        from .agent import run_agent

        model = self.make_model(job.model)
        r = run_agent(model, self.make_env(job), system=job.system, task=job.prompt,
                      budget=self.budget_for(job), trajectory_path=job.trajectory, redact=self.redact)
        return BackendResult(self.name, r.status, r.model, r.steps, r.tokens_in, r.tokens_out,
                             r.cost_usd, r.final[:2000], r.error)


def run_first_available(backends: list[Backend], job: Job) -> BackendResult:
    """Run the first backend whose probe passes; say why each earlier one was skipped."""
    skipped: list[str] = []
    for backend in backends:
        reason = backend.probe()
        if reason:
            skipped.append(f"{backend.name}: {reason}")
            continue
        return replace(backend.run(job), fallbacks=tuple(skipped))
    return BackendResult("none", "error", error="no backend available: " + "; ".join(skipped),
                         fallbacks=tuple(skipped))
