"""Git for a sprint: clone, branch, commit, push, with the token kept out of argv, URLs and config.

The token reaches git through GIT_ASKPASS: a small script in the state dir that prints an
environment variable of git's own process. `/proc/*/cmdline` is world-readable, a process's
environment is not, and nothing is written to `.git/config` but the plain clone URL.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import DispatchError

ASKPASS = """#!/bin/sh
# dispatch: answers git's credential prompts from the environment of the git process
case "$1" in
  Username*) printf '%s\\n' "${DISPATCH_GIT_USER:-dispatch}" ;;
  *) printf '%s\\n' "$DISPATCH_GIT_PASSWORD" ;;
esac
"""

# Given on every git command line, so nothing the agent wrote into .git can run code or see the
# token: hooks off, credential helpers reset (a helper would be handed the password to "store"),
# no fsmonitor command.
HARDENING = ("-c", "core.hooksPath=/dev/null", "-c", "credential.helper=", "-c", "core.fsmonitor=false")

SAFE_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")


class GitError(DispatchError):
    """Raised when a git command fails; the message carries git's stderr, scrubbed of the token."""


Runner = Callable[..., subprocess.CompletedProcess]


@dataclass
class Git:
    """Runs git in one repository directory with credentials supplied only through the environment."""

    cwd: Path
    askpass: Path
    token: str = ""
    user: str = "dispatch"
    author: tuple[str, str] = ("dispatch", "dispatch@localhost")
    env: Mapping[str, str] | None = None
    runner: Runner = subprocess.run
    timeout: float = 600.0
    _config: bytes = b""

    def _env(self, with_token: bool) -> dict[str, str]:
        base = os.environ if self.env is None else self.env
        env = {k: base[k] for k in SAFE_ENV if k in base}
        env.update({
            "HOME": str(self.askpass.parent),  # no user ~/.gitconfig or credential store
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,  # not even a .gitconfig an agent may have left in HOME
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": str(self.askpass),
            "GIT_AUTHOR_NAME": self.author[0], "GIT_AUTHOR_EMAIL": self.author[1],
            "GIT_COMMITTER_NAME": self.author[0], "GIT_COMMITTER_EMAIL": self.author[1],
        })
        if with_token and self.token:
            env["DISPATCH_GIT_USER"] = self.user
            env["DISPATCH_GIT_PASSWORD"] = self.token
        return env

    def run(self, *args: str, with_token: bool = False, check: bool = True, cwd: Path | None = None) -> str:
        if with_token:
            # put the helper back as it must be: an unsandboxed agent could have rewritten it
            write_askpass(self.askpass.parent)
        try:
            proc = self.runner(
                ["git", *HARDENING, *args], cwd=cwd or self.cwd, env=self._env(with_token),
                capture_output=True, text=True, timeout=self.timeout,
            )
        except subprocess.TimeoutExpired:
            raise GitError(f"git {args[0]} timed out after {self.timeout:.0f}s") from None
        if check and proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().replace(self.token, "***") if self.token else (
                proc.stderr or proc.stdout).strip()
            raise GitError(f"git {args[0]} failed: {msg[-500:]}")
        return proc.stdout.strip()

    def clone(self, url: str, dest: Path) -> None:
        self.run("clone", "--quiet", "--no-tags", url, str(dest), with_token=True, cwd=dest.parent)

    def save_config(self) -> None:
        """Remember .git/config as cloned; see restore_config."""
        self._config = (self.cwd / ".git" / "config").read_bytes()

    def restore_config(self) -> None:
        """Put back .git/config as cloned before anything runs with the token: the agent could
        have pointed the remote elsewhere, added url.*.insteadOf, or defined filters."""
        path = self.cwd / ".git" / "config"
        tmp = path.with_name("config.dispatch-tmp")
        tmp.write_bytes(self._config)
        os.replace(tmp, path)

    def ahead(self, base: str) -> int:
        return int(self.run("rev-list", "--count", f"{base}..HEAD") or 0)

    def dirty(self) -> bool:
        return bool(self.run("status", "--porcelain"))

    def commit_all(self, message: str) -> bool:
        """Commit whatever the agent left uncommitted; False when there was nothing."""
        if not self.dirty():
            return False
        self.run("add", "-A")
        self.run("commit", "--quiet", "--no-verify", "-m", message)
        return True

    def remote_branch_exists(self, branch: str) -> bool:
        out = self.run("ls-remote", "--heads", "origin", f"refs/heads/{branch}", with_token=True)
        return bool(out)

    def push(self, branch: str) -> None:
        self.run("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", with_token=True)


def write_askpass(state_dir: Path) -> Path:
    """The askpass helper, private to this user; it holds no secret itself."""
    path = state_dir / "git-askpass.sh"
    if not path.exists() or path.read_text() != ASKPASS:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(ASKPASS)
        tmp.chmod(stat.S_IRWXU)
        os.replace(tmp, path)
    return path


def make_workspace(root: Path, run_id: str) -> Path:
    """A private directory for one run (mode 0700, under the state dir, never /tmp)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    ws = root / run_id
    ws.mkdir(mode=0o700)
    return ws


def prune(root: Path, *, older_than_s: float, now: float | None = None,
          has_unpushed: Callable[[Path], int] | None = None) -> tuple[list[Path], list[Path]]:
    """Remove workspaces older than the cutoff; never one holding unpushed commits.

    Returns (removed, kept because of unpushed work).
    """
    now = time.time() if now is None else now
    removed, kept = [], []
    if not root.is_dir():
        return removed, kept
    for ws in sorted(root.iterdir()):
        if not ws.is_dir() or now - ws.stat().st_mtime < older_than_s:
            continue
        repo = ws / "repo"
        if (repo / ".git").exists() and has_unpushed and has_unpushed(repo) > 0:
            kept.append(ws)
            continue
        shutil.rmtree(ws, ignore_errors=True)
        removed.append(ws)
    return removed, kept
