"""Circuit breakers that outlive the process: one JSON file per dependency in `<state>/breakers/`.

Each cron run is a new process, so a breaker's memory lives on disk. closed: calls go through
and consecutive failures are counted; at `failure_threshold` the breaker opens. open: calls are
skipped until `cooldown_s` has passed since it opened, then it is half_open: calls go through,
`success_threshold` successes in a row close it, one failure opens it again for another
cool-down. Updates hold a lock on the file, so overlapping runs do not lose counts.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from .errors import DispatchError, ForgeError
from .telemetry import locked, read_state, write_state

T = TypeVar("T")
STATES = ("closed", "open", "half_open")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class BreakerOpen(DispatchError):
    """Raised instead of calling a dependency whose breaker is open."""

    def __init__(self, name: str, retry_at: float, failures: int, last_error: str = "") -> None:
        self.name, self.retry_at, self.failures = name, retry_at, failures
        when = datetime.fromtimestamp(retry_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        last = f" (last: {last_error})" if last_error else ""
        super().__init__(f"{name}: circuit open after {failures} consecutive failures{last}; "
                         f"skipping it until {when}")


@dataclass(frozen=True)
class BreakerConfig:
    """The `breakers:` config section; one setting for every dependency."""

    failure_threshold: int = 5  # consecutive failures that open a breaker
    cooldown_s: float = 60.0  # seconds an open breaker skips its dependency
    success_threshold: int = 2  # successes in a row, half-open, that close it again

    def breaker(self, state_dir: Path, name: str, *,
                clock: Callable[[], float] = time.time) -> Breaker:
        return Breaker(state_dir, name, clock=clock, failure_threshold=self.failure_threshold,
                       cooldown_s=self.cooldown_s, success_threshold=self.success_threshold)


def counts_as_failure(exc: BaseException) -> bool:
    """A dependency failed when it could not be reached or answered 5xx/429; a 4xx is an
    answer (the server is up, the request was wrong), so it does not trip the breaker."""
    if isinstance(exc, ForgeError) and exc.status is not None:
        return exc.status >= 500 or exc.status == 429
    return True


def breaker_path(state_dir: Path, name: str) -> Path:
    """The file for dependency `name`; names like URLs are folded to a safe, unique file name."""
    safe = _UNSAFE.sub("_", name).strip("._") or "dependency"
    if safe != name:
        safe = f"{safe[:80]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return Path(state_dir) / "breakers" / f"{safe}.json"


class Breaker:
    """The breaker of one dependency; cheap to build, so build one per run."""

    def __init__(
        self,
        state_dir: Path,
        name: str,
        *,
        clock: Callable[[], float] = time.time,
        failure_threshold: int = 5,
        cooldown_s: float = 60.0,
        success_threshold: int = 2,
        is_failure: Callable[[BaseException], bool] = counts_as_failure,
    ) -> None:
        self.name = name
        self.path = breaker_path(state_dir, name)
        self.clock = clock
        self.failure_threshold = max(1, failure_threshold)
        self.cooldown_s = cooldown_s
        self.success_threshold = max(1, success_threshold)
        self.is_failure = is_failure

    @property
    def state(self) -> str:
        """closed, open or half_open, as a call made now would find it."""
        return _effective(self._load(), self.clock())

    def allow(self) -> bool:
        """May a call go through now? Moves an open breaker whose cool-down passed to half_open."""
        data = self._load()
        if data["state"] != "open":
            return True
        if self.clock() < data["retry_at"]:
            return False
        with locked(self.path):
            data = self._load()
            if data["state"] == "open" and self.clock() >= data["retry_at"]:
                data.update(state="half_open", successes=0, updated=self.clock())
                self._save(data)
        return True

    def record(self, ok: bool, error: str = "") -> str:
        """Count one call's outcome; returns the new state."""
        now = self.clock()
        with locked(self.path):
            data = self._load()
            state = data["state"]
            if ok:
                data["failures"] = 0
                if state == "closed":
                    data["successes"] = 0
                else:  # open (a call made anyway) or half_open: one more good call
                    data["successes"] += 1
                    data["state"] = "half_open"
                    if data["successes"] >= self.success_threshold:
                        data.update(state="closed", successes=0, opened_at=None, retry_at=None)
            else:
                data["failures"] += 1
                data["successes"] = 0
                data["last_error"] = error[:200]
                if state != "closed" or data["failures"] >= self.failure_threshold:
                    data.update(state="open", opened_at=now, retry_at=now + self.cooldown_s)
            data["updated"] = now
            self._save(data)
            return data["state"]

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` through the breaker: BreakerOpen when open, the outcome recorded otherwise."""
        if not self.allow():
            data = self._load()
            raise BreakerOpen(self.name, data["retry_at"], data["failures"], data["last_error"])
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            failed = self.is_failure(e)
            self.record(not failed, str(e) if failed else "")
            raise
        self.record(True)
        return result

    def _load(self) -> dict:
        return _normalise(read_state(self.path), self.name)

    def _save(self, data: dict) -> None:
        write_state(self.path, data)


def _normalise(data: dict, name: str) -> dict:
    """A complete state dict from whatever the file held (missing or corrupt: closed)."""
    state = data.get("state") if data.get("state") in STATES else "closed"
    retry_at = data.get("retry_at")
    if state == "open" and not isinstance(retry_at, int | float):
        state = "half_open"  # open with no retry time: let a call test the dependency
    return {
        "name": data.get("name") or name,
        "state": state,
        "failures": int(data.get("failures") or 0),
        "successes": int(data.get("successes") or 0),
        "opened_at": data.get("opened_at"),
        "retry_at": retry_at,
        "last_error": str(data.get("last_error") or ""),
        "updated": data.get("updated"),
    }


def _effective(data: dict, now: float) -> str:
    if data["state"] == "open" and now >= data["retry_at"]:
        return "half_open"
    return data["state"]


def status_all(state_dir: Path, *, now: float | None = None) -> list[dict]:
    """Every breaker on disk, for the report: name, state (as of now), failures, retry_at, ..."""
    now = time.time() if now is None else now
    out = []
    for path in sorted((Path(state_dir) / "breakers").glob("*.json")):
        data = _normalise(read_state(path), path.stem)
        out.append({**data, "state": _effective(data, now), "file": path.name})
    return sorted(out, key=lambda d: d["name"])
