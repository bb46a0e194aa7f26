"""The idempotent action journal, `<state>/journal.sqlite`: every forge action is written down
under its key before it is taken and confirmed after, so no action happens twice.

The protocol, per action:

    if journal.begin(action):          # False: done already, or another run holds it
        try:
            result = take(action)      # put marker(action.key) into any comment it posts
        except Exception as e:
            journal.fail(action.key, str(e))   # failed keys may be begun again
            raise
        journal.confirm(action.key, result)

A run that crashed between begin and confirm leaves the key `pending`: nobody knows whether the
forge saw the action. `pending(older_than_s)` lists such keys; the caller looks on the forge
(for a comment, the marker) and then calls `confirm` when it happened, or `reclaim` and redoes it
when it did not. `begin` and `reclaim` are single SQL statements on a unique key, so of two
processes racing for the same key exactly one wins.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ForgeError
from .policy import Action

BUSY_TIMEOUT_S = 10.0
STATUSES = ("pending", "done", "failed")
_MARKER = re.compile(r"<!-- dispatch:action key=(\S+) -->")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS actions (
    key      TEXT PRIMARY KEY,
    kind     TEXT NOT NULL,
    target   TEXT NOT NULL,
    reason   TEXT NOT NULL,
    status   TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    result   TEXT NOT NULL DEFAULT '',
    error    TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 1,
    owner    TEXT NOT NULL DEFAULT '',
    created  REAL NOT NULL,
    updated  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS actions_status ON actions (status, updated);
"""


@dataclass(frozen=True)
class Entry:
    key: str
    kind: str
    target: str
    reason: str
    status: str  # pending, done or failed
    result: str  # what confirm() was given, e.g. a comment URL
    error: str  # what fail() was given
    attempts: int  # times the action was begun
    owner: str  # who began it last (pid by default)
    created: float  # epoch seconds
    updated: float


def marker(key: str) -> str:
    """An HTML comment to put in a posted body, so the forge itself can confirm the action."""
    _check_key(key)
    return f"<!-- dispatch:action key={key} -->"


def marked_keys(texts: Iterable[str]) -> set[str]:
    """Every action key a marker in `texts` names (e.g. the bodies of an issue's comments)."""
    return {m.group(1) for t in texts for m in _MARKER.finditer(t or "")}


def _outcome_unknown(exc: Exception) -> bool:
    return isinstance(exc, ForgeError) and exc.status is None


def _check_key(key: str) -> None:
    if not key or any(c.isspace() for c in key) or "-->" in key:
        raise ValueError(f"action key must be non-empty, without spaces or '-->': {key!r}")


class Journal:
    """One connection to the journal; open one per run (or per thread)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time,
                 owner: str = "") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.owner = owner or f"pid {os.getpid()}"
        # autocommit: each statement below is its own transaction, which is what makes the
        # race on a key safe without holding a write lock across a forge call
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def begin(self, action: Action) -> bool:
        """Record the intent; True when this caller should now take the action.

        False when the key is done, or pending (another run holds it or crashed holding it:
        see pending()). A failed key is begun again.
        """
        _check_key(action.key)
        now = self.clock()
        cur = self.db.execute(
            "INSERT OR IGNORE INTO actions (key, kind, target, reason, status, owner, created,"
            " updated) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
            (action.key, action.kind, action.target, action.reason, self.owner, now, now),
        )
        if cur.rowcount == 1:
            return True
        cur = self.db.execute(
            "UPDATE actions SET status = 'pending', error = '', attempts = attempts + 1,"
            " owner = ?, reason = ?, updated = ? WHERE key = ? AND status = 'failed'",
            (self.owner, action.reason, now, action.key),
        )
        return cur.rowcount == 1

    def confirm(self, key: str, result: str = "") -> None:
        """The action happened (seen by us, or found on the forge after a crash)."""
        self._finish(key, "done", result=result)

    def fail(self, key: str, error: str) -> None:
        """The action did not happen; a later begin() may try again."""
        self._finish(key, "failed", error=error[:500])

    def _finish(self, key: str, status: str, *, result: str = "", error: str = "") -> None:
        cur = self.db.execute(
            "UPDATE actions SET status = ?, result = ?, error = ?, updated = ? WHERE key = ?",
            (status, result, error, self.clock(), key),
        )
        if cur.rowcount != 1:
            raise KeyError(f"no journal entry for {key!r}; begin() it first")

    def reclaim(self, entry: Entry) -> bool:
        """Take over a pending entry (checked on the forge: not done); True if we now own it.

        Compares `updated` with what the caller saw, so two runs reclaiming at once cannot
        both redo the action.
        """
        cur = self.db.execute(
            "UPDATE actions SET attempts = attempts + 1, owner = ?, updated = ?"
            " WHERE key = ? AND status = 'pending' AND updated = ?",
            (self.owner, self.clock(), entry.key, entry.updated),
        )
        return cur.rowcount == 1

    def get(self, key: str) -> Entry | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM actions WHERE key = ?", (key,)).fetchone()
        return Entry(*row) if row else None

    def pending(self, older_than_s: float = 0.0) -> list[Entry]:
        """Begun but never confirmed nor failed, untouched for at least `older_than_s` (so a
        run still in progress elsewhere is not mistaken for a crashed one)."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM actions WHERE status = 'pending' AND updated <= ?"
            " ORDER BY created", (self.clock() - older_than_s,),
        ).fetchall()
        return [Entry(*r) for r in rows]

    def entries(self, *, since: float = 0.0) -> list[Entry]:
        """Every entry touched since `since` (epoch seconds), oldest first: for the report."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM actions WHERE updated >= ? ORDER BY created", (since,),
        ).fetchall()
        return [Entry(*r) for r in rows]

    @contextlib.contextmanager
    def once(self, action: Action) -> Iterator[Step]:
        """`with journal.once(a) as step:` — do the work only `if step.run`; set `step.result`.

        Normal exit confirms. An exception is re-raised and marks the key failed (retryable),
        unless the outcome is unknown: a forge call that timed out or lost its connection may
        have landed, and an interrupt may have come after it, so those stay pending for the
        forge re-check (see pending()). Keep only the action itself in the body.
        """
        step = Step(run=self.begin(action))
        try:
            yield step
        except Exception as e:
            if step.run and not _outcome_unknown(e):
                self.fail(action.key, f"{type(e).__name__}: {e}")
            raise
        if step.run:
            self.confirm(action.key, step.result)


@dataclass
class Step:
    run: bool  # False: done before (or held by another run); skip the work
    result: str = ""

    @property
    def done(self) -> bool:
        return not self.run


_COLUMNS = "key, kind, target, reason, status, result, error, attempts, owner, created, updated"
