"""The JSONL telemetry format: locked whole-line appends, rotation, a tolerant streaming reader,
atomic state files, and state diffs turned into events. Row shapes: telemetry/SCHEMA.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_decode = json.JSONDecoder().decode  # skips json.loads' per-call type and encoding checks
DEFAULT_KEEP = 5  # gzipped segments kept by rotation


@dataclass(frozen=True)
class TelemetrySettings:
    """The `telemetry:` config section (to be wired into Config)."""

    max_bytes: int = 20_000_000  # rotate metrics/events files past this size
    keep: int = DEFAULT_KEEP  # gzipped segments kept per file
    fsync: bool = False  # fsync every append (slower; survives power loss)


@dataclass
class ReadStats:
    """What a reader yielded and what it skipped; mutable so one instance spans a whole read."""

    rows: int = 0
    torn: int = 0  # a final line without "\n": a write cut short
    corrupt: int = 0  # a whole line that is not a JSON object (or a CSV row) we can use


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_ts(dt: datetime) -> str:
    """ISO 8601 in UTC with a Z, millisecond precision: sorts as text and parses back."""
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_ts(value: Any) -> datetime | None:
    """An aware UTC datetime from an ISO string (naive means UTC), or None when unusable."""
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


# ---- writing ---------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold flock on a `<name>.lock` sidecar, so rotation can rename the data file safely."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def append_line(path: Path, line: bytes, *, fsync: bool = False, header: bytes = b"") -> None:
    """Append one complete line with one write on an O_APPEND fd; caller holds `locked(path)`.

    `header` is written first, in the same write, when the file is new or empty.
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            line = header + line
        elif os.pread(fd, 1, size - 1) != b"\n":
            # A crash left a torn last line: close it off so it stays one corrupt line
            # instead of swallowing this row too.
            line = b"\n" + line
        while line:  # one write in practice; the loop only covers a short write (disk full)
            line = line[os.write(fd, line):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def append(
    path: Path,
    row: dict,
    *,
    fsync: bool = False,
    max_bytes: int | None = None,
    keep: int = DEFAULT_KEEP,
    now: Callable[[], datetime] = utc_now,
) -> None:
    """Append `row` as one JSON line, adding `schema` and `ts` when absent; rotate past max_bytes."""
    path = Path(path)
    full = {"schema": SCHEMA_VERSION, "ts": format_ts(now()), **row}
    line = (json.dumps(full, separators=(",", ":"), default=str, ensure_ascii=False) + "\n").encode()
    with locked(path):
        if max_bytes is not None and _size(path) > 0 and _size(path) + len(line) > max_bytes:
            rotate(path, keep=keep)
        append_line(path, line, fsync=fsync)


def rotate(path: Path, *, keep: int = DEFAULT_KEEP) -> None:
    """Gzip the live file to `<name>.1.gz`, shifting older segments up; caller holds the lock."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    _segment(path, keep).unlink(missing_ok=True)
    for i in range(keep - 1, 0, -1):
        if _segment(path, i).exists():
            os.replace(_segment(path, i), _segment(path, i + 1))
    tmp = path.with_name(path.name + ".1.gz.tmp")
    with open(path, "rb") as src, gzip.open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(tmp, _segment(path, 1))
    # Unlink rather than truncate: a reader holding the old inode still reads it whole.
    path.unlink()


def _segment(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}.gz")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# ---- reading ---------------------------------------------------------------------------------


def segments(path: Path) -> list[Path]:
    """The gzipped segments of `path`, oldest first, then the live file when it exists."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)\.gz$")
    numbered = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            m = pattern.match(entry.name)
            if m:
                numbered.append((int(m.group(1)), Path(entry.path)))
    ordered = [p for _, p in sorted(numbered, reverse=True)]
    return ordered + ([path] if path.exists() else [])


def read(
    path: Path, *, since: datetime | None = None, stats: ReadStats | None = None
) -> Iterator[dict]:
    """Stream rows oldest first across segments and the live file; skip and count bad lines."""
    stats = stats if stats is not None else ReadStats()
    files = _open_all(Path(path))
    try:
        for f in files:
            yield from _rows(f, since, stats)
    finally:
        for f in files:
            _close(f)


def _rows(f: IO[str], since: datetime | None, stats: ReadStats) -> Iterator[dict]:
    try:
        for raw in f:
            if not raw.endswith("\n"):
                stats.torn += 1
                continue
            try:
                row = _decode(raw)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                if raw.strip():
                    stats.corrupt += 1
                continue
            if since is not None:
                ts = parse_ts(row.get("ts"))
                if ts is None:
                    stats.corrupt += 1
                    continue
                if ts < since:
                    continue
            stats.rows += 1
            yield row
    except (OSError, EOFError) as e:  # a damaged gzip segment: count it, go on to the next
        log.warning("telemetry segment unreadable: %s", e)
        stats.corrupt += 1


def _open_all(path: Path) -> list[IO[str]]:
    # Open every segment up front under a shared lock: a rotation that runs while we stream
    # renames and unlinks, but our descriptors keep the files we started with.
    if not segments(path):
        return []  # nothing to read: leave no lock file (or directory) behind
    try:
        with locked(path, shared=True):
            return _open_segments(path)
    except PermissionError:  # a read-only state dir: nobody can rotate it under us either
        return _open_segments(path)


def _open_segments(path: Path) -> list[IO[str]]:
    files: list[IO[str]] = []
    for seg in segments(path):
        with contextlib.suppress(FileNotFoundError):
            raw: IO[bytes] = open(seg, "rb")  # noqa: SIM115 - closed by read()
            if seg.suffix == ".gz":
                raw = gzip.GzipFile(fileobj=raw)
            # Split on "\n" only, so a line without one is recognisably torn.
            files.append(io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="\n"))
    return files


def _close(f: io.TextIOWrapper) -> None:
    inner = f.buffer.fileobj if isinstance(f.buffer, gzip.GzipFile) else None
    f.close()
    if inner is not None:
        inner.close()  # GzipFile(fileobj=...) leaves the underlying file open


# ---- state files -----------------------------------------------------------------------------


def write_state(path: Path, data: dict) -> None:
    """Replace `path` atomically: temp file in the same dir, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_state(path: Path, *, stats: ReadStats | None = None) -> dict:
    """The saved state, or {} when missing or corrupt (logged and counted, never raised)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        data, reason = None, e
    else:
        reason = f"expected a JSON object, got {type(data).__name__}"
    if isinstance(data, dict):
        if stats is not None:
            stats.rows += 1
        return data
    log.warning("state file %s is corrupt (%s); starting from an empty state", path, reason)
    if stats is not None:
        stats.corrupt += 1
    return {}


# What each state section must look like; anything else (a hand edit, an older version) is
# dropped with a warning rather than crashing every later collector run.
_SECTION_ITEMS = {"agents": dict, "panes": dict, "pulls": str, "issues": str}


def read_collector_state(path: Path) -> dict:
    """The collector's last_state.json, with any malformed section dropped (see _SECTION_ITEMS)."""
    return _sane_state(read_state(path), path)


def _sane_state(data: dict, path: Path) -> dict:
    out: dict = {}
    for key, value in data.items():
        item = _SECTION_ITEMS.get(key)
        if item is not None:
            if isinstance(value, dict):
                out[key] = {k: v for k, v in value.items() if isinstance(v, item)}
        elif key == "sprints":
            if isinstance(value, dict):
                out[key] = {k: v for k, v in value.items() if isinstance(v, list)}
        elif key in ("cron", "model_server"):
            if isinstance(value, dict):
                out[key] = value
        else:
            out[key] = value
        if key in out and out[key] != value:
            log.warning("state file %s: dropped malformed parts of %r", path, key)
        elif key not in out:
            log.warning("state file %s: dropped malformed section %r", path, key)
    cron = out.get("cron")
    if cron is not None and not isinstance(cron.get("missing", []), list):
        out.pop("cron")
    return out


# ---- state diffs -----------------------------------------------------------------------------

AGENT_STATES = frozenset({"working", "idle", "stuck", "dead"})
PR_EVENTS = {"open": "pr_opened", "merged": "pr_merged", "closed": "pr_closed"}


def diff_states(old: dict, new: dict) -> list[dict]:
    """Events for what changed between two collector states (shapes in SCHEMA.md); pure.

    No previous state at all ({}) makes `new` the baseline: nothing is reported. A section
    missing from `new` means its probe failed this time, which is not a change either.
    """
    if not old:
        return []
    events: list[dict] = []
    for section, differ in _DIFFERS:
        if section in new:
            events += differ(old.get(section) or {}, new.get(section) or {})
    return events


def _agents(old: dict, new: dict) -> list[dict]:
    out = []
    for name in sorted(new):
        cur, prev = new[name] or {}, old.get(name) or {}
        state = cur.get("state")
        if state in AGENT_STATES and state != prev.get("state"):
            ev = {"kind": f"agent_{state}", "subject": name, "from": prev.get("state"), "to": state}
            if cur.get("run_id"):
                ev["run_id"] = cur["run_id"]
            out.append(ev)
    return out


def _panes(old: dict, new: dict) -> list[dict]:
    out = []
    for pane_id in sorted(set(old) | set(new)):
        prev, cur = old.get(pane_id), new.get(pane_id)
        was = bool(prev) and prev.get("alive", True)
        now = bool(cur) and cur.get("alive", True)
        if now and not was:
            kind = "pane_started"
        elif was and not now:
            kind = "pane_died"  # gone from tmux, or still listed with a dead process
        elif now and bool(cur.get("idle")) != bool(prev.get("idle")):
            kind = "pane_idle" if cur.get("idle") else "pane_active"
        else:
            continue
        out.append({"kind": kind, "subject": pane_id, "command": (cur or prev).get("command", "")})
    return out


def _cron(old: dict, new: dict) -> list[dict]:
    before, after = set(old.get("missing") or ()), list(new.get("missing") or ())
    out = [{"kind": "cron_missing", "subject": e} for e in after if e not in before]
    return out + [{"kind": "cron_restored", "subject": e} for e in sorted(before - set(after))]


def _model_server(old: dict, new: dict) -> list[dict]:
    # An unknown previous state counts for "down" (an alarm) but not for "up" (a recovery).
    prev, cur = old.get("up"), new.get("up")
    if cur is False and prev is not False:
        return [{"kind": "model_server_down", "subject": new.get("url", "model_server")}]
    if cur is True and prev is False:
        return [{"kind": "model_server_up", "subject": new.get("url", "model_server")}]
    return []


def _sprints(old: dict, new: dict) -> list[dict]:
    out = []
    for key, kind in (("running", "sprint_started"), ("failed", "sprint_failed")):
        seen = set(old.get(key) or ())
        out += [{"kind": kind, "subject": r, "run_id": r} for r in new.get(key) or () if r not in seen]
    return out


def _pulls(old: dict, new: dict) -> list[dict]:
    return [
        {"kind": PR_EVENTS[state], "subject": ref}
        for ref, state in sorted(new.items())
        if state in PR_EVENTS and state != old.get(ref)
    ]


def _issues(old: dict, new: dict) -> list[dict]:
    out = []
    for ref, state in sorted(new.items()):
        if state == "closed" and old.get(ref) != "closed":
            out.append({"kind": "issue_closed", "subject": ref})
        elif state == "open" and old.get(ref) == "closed":
            out.append({"kind": "issue_reopened", "subject": ref})
    return out


_DIFFERS: tuple[tuple[str, Callable[[dict, dict], list[dict]]], ...] = (
    ("agents", _agents),
    ("panes", _panes),
    ("cron", _cron),
    ("model_server", _model_server),
    ("sprints", _sprints),
    ("pulls", _pulls),
    ("issues", _issues),
)
