"""pytest plugin: a real `redis-server` on a free loopback port (add "tests.redis_fixtures" to
pytest_plugins). Without the binary the tests using it skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """redis-server with append-only persistence in `directory`; stopped and restarted by PID."""

    def __init__(self, binary: str, directory: Path, *, password: str = "") -> None:
        self.binary = binary
        self.dir = directory
        self.password = password
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RedisServer:
        # the password goes through stdin as a config file, never through argv
        args = [self.binary, "-", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"requirepass {self.password}\n".encode() if self.password else b"")
        self.proc.stdin.close()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log")
                raise RuntimeError("redis-server exited: " + (log.read_text()[-500:] if log.exists() else "?"))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                    if reply.startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server not ready on port {self.port} after {timeout} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop by PID (SIGTERM lets Redis flush its append-only file; SIGKILL after 10 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        """Same port, same directory: what was persisted comes back."""
        self.stop()
        self.start()


@pytest.fixture
def redis_binary() -> str:
    """Path of redis-server; skips the test when missing, fails it in CI (CI=true)."""
    from tests.realtools import require

    return require("redis-server")


@pytest.fixture
def redis_server(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A started redis-server on a free loopback port, appendonly, in its own temp dir."""
    server = RedisServer(redis_binary, tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()
