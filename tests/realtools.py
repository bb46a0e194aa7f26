"""The real programs tests drive (tmux, chromium, redis-server, bwrap): one rule for when one is
missing — skip locally with the reason, fail in CI (CI=true), where scripts/setup.sh --system
installs them. Also a pytest plugin: the `tmux` fixture, a private tmux server."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest


def require(tool: str, package: str | None = None) -> str:
    """The program's path; skips the test when it is missing, fails it in CI."""
    path = shutil.which(tool)
    if path:
        return path
    message = f"{tool} is not installed (`scripts/setup.sh --system` installs Debian's {package or tool})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI must run these tests", pytrace=False)
    pytest.skip(message)


class Tmux:
    """A tmux server of our own on a private socket (-L), so the user's sessions are never seen."""

    def __init__(self) -> None:
        self.socket = f"dispatch-test-{uuid.uuid4().hex[:10]}"

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                              check=True, capture_output=True, text=True, timeout=10).stdout

    def pane(self, window: str) -> tuple[str, int]:
        """(pane id, pid) of the first pane of the named window."""
        for line in self("list-panes", "-a", "-F", "#{window_name} #{pane_id} #{pane_pid}").splitlines():
            name, pane_id, pid = line.split()
            if name == window:
                return pane_id, int(pid)
        raise KeyError(window)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    """A private tmux server, killed at teardown (it starts with the first new-session)."""
    require("tmux")
    server = Tmux()
    try:
        yield server
    finally:
        server.kill()
