"""Local locks for work items: one file per key under `<state>/locks/`, held with flock.

The kernel drops a flock when its holder dies, even on kill -9, so a lock can never be held by a
dead process. The file outlives a crash, though, and still names the dead run: that is how the
next run finds crashed work and cleans up after it (see `stale`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import LockHeld


@dataclass(frozen=True)
class LockInfo:
    key: str
    pid: int
    run_id: str
    host: str
    started: float
    data: dict


def lock_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".lock"


class Lock:
    """An exclusive, non-blocking lock on `key`; `previous` is the record a crashed holder left."""

    def __init__(self, lock_dir: Path, key: str, *, run_id: str = "", data: dict | None = None) -> None:
        self.path = lock_dir / lock_name(key)
        self.key = key
        self.run_id = run_id
        self.data = data or {}
        self.previous: LockInfo | None = None
        self._fd: int | None = None

    def acquire(self) -> Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = read_info(self.path)
                who = f" by pid {holder.pid} (run {holder.run_id})" if holder else ""
                raise LockHeld(f"{self.key} is locked{who}") from None
            # the holder may have unlinked the file between our open and our flock: retry on
            # the new file, or two processes would each hold a lock on a different inode
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.previous = _parse(os.read(fd, 65536), self.key)
        record = {"key": self.key, "pid": os.getpid(), "run_id": self.run_id,
                  "host": socket.gethostname(), "started": time.time(), **self.data}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self, *, leave: dict | None = None) -> None:
        """Unlock and remove the file; with `leave`, write that record back and keep the file
        instead (a crashed run's record that recovery could not finish with)."""
        if self._fd is None:
            return
        if leave is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(leave).encode(), 0)
            os.close(self._fd)
            self._fd = None
            return
        # unlink before unlocking: a clean release leaves no file, so a file left behind always
        # means its holder died
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse(raw: bytes, key: str) -> LockInfo | None:
    try:
        d = json.loads(raw.decode() or "null")
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict):
        return None
    return LockInfo(key=d.get("key", key), pid=int(d.get("pid", 0)), run_id=str(d.get("run_id", "")),
                    host=str(d.get("host", "")), started=float(d.get("started", 0)), data=d)


def read_info(path: Path) -> LockInfo | None:
    try:
        return _parse(path.read_bytes(), path.stem)
    except OSError:
        return None


def is_held(path: Path) -> bool:
    """True if a live process holds the lock file at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def live(lock_dir: Path) -> Iterator[LockInfo]:
    """Locks held right now (running work)."""
    for path in sorted(lock_dir.glob("*.lock")):
        if is_held(path) and (info := read_info(path)):
            yield info


def stale(lock_dir: Path) -> Iterator[tuple[Path, LockInfo]]:
    """Lock files whose holder died without releasing: crashed runs."""
    for path in sorted(lock_dir.glob("*.lock")):
        if not is_held(path) and (info := read_info(path)) and info.pid:
            yield path, info
