"""The sprint results ledger, `<state_dir>/results.csv`: one row per sprint, appended under a lock.

Columns and outcomes are documented in telemetry/SCHEMA.md and telemetry/results.schema.json.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterator
from dataclasses import astuple, dataclass, fields
from datetime import datetime
from pathlib import Path

from .telemetry import ReadStats, append_line, format_ts, locked, parse_ts

log = logging.getLogger(__name__)

COLUMNS = (
    "timestamp", "run_id", "repo", "issue", "agent", "backend", "model", "outcome",
    "duration_s", "steps", "tokens_in", "tokens_out", "cost_usd", "pr_url", "error",
)
# success: PR opened; failed: the run ended in error; nothing_to_do: no eligible issue;
# skipped: not run (lock held, budget spent, backend down); partial: work pushed, no PR.
OUTCOMES = frozenset({"success", "failed", "nothing_to_do", "skipped", "partial"})
ATTEMPTED = frozenset({"success", "failed", "partial"})  # outcomes where work was tried
ERROR_MAX = 300  # characters of error text kept in a row

_HEADER = (",".join(COLUMNS) + "\n").encode()
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, kw_only=True)
class ResultRow:
    timestamp: datetime  # when the sprint ended (aware, UTC)
    run_id: str
    repo: str = ""  # owner/name; empty when no issue was picked
    issue: int | None = None
    agent: str = ""
    backend: str = ""  # gateway, cli or direct
    model: str = ""
    outcome: str  # one of OUTCOMES
    duration_s: float = 0.0
    steps: int = 0  # tool calls made by the agent
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    pr_url: str = ""
    error: str = ""  # one line, at most ERROR_MAX characters

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r} is not one of {sorted(OUTCOMES)}")
        if self.timestamp.tzinfo is None:
            raise ValueError("timestamp must be timezone-aware")

    @property
    def attempted(self) -> bool:
        return self.outcome in ATTEMPTED

    def to_dict(self) -> dict:
        """The row as JSON-ready data, shaped as in results.schema.json."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["timestamp"] = format_ts(self.timestamp)
        return d


def one_line(text: str, limit: int = ERROR_MAX) -> str:
    """Collapse whitespace (newlines included) and cut to `limit` characters."""
    flat = _SPACE.sub(" ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def format_row(row: ResultRow) -> bytes:
    """One CSV line, newline-terminated; the error is flattened so a row is one physical line."""
    values = list(astuple(row))
    values[0] = format_ts(row.timestamp)
    values[COLUMNS.index("issue")] = "" if row.issue is None else row.issue
    values[-1] = one_line(row.error)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue().encode()


def append_result(path: Path, row: ResultRow, *, fsync: bool = False) -> None:
    """Append one row in a single locked write; the header goes first into a new file."""
    path = Path(path)
    with locked(path):
        append_line(path, format_row(row), fsync=fsync, header=_HEADER)


def read_results(
    path: Path, *, since: datetime | None = None, stats: ReadStats | None = None
) -> Iterator[ResultRow]:
    """Stream rows in file order; a torn last line or an unparsable row is counted, not raised."""
    stats = stats if stats is not None else ReadStats()
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, also when the caller stops early
    except FileNotFoundError:
        return
    columns = COLUMNS
    try:
        for n, raw in enumerate(f):
            if not raw.endswith(b"\n"):
                stats.torn += 1
                continue
            values = next(csv.reader([raw.decode("utf-8", "replace")]), [])
            if n == 0 and values and values[0] == "timestamp":
                columns = tuple(values)  # follow the file's header if columns are ever added
                continue
            # A wrong field count is a fragment (a torn line closed off by a later append).
            row = parse_row(dict(zip(columns, values, strict=True))) if len(values) == len(columns) else None
            if row is None:
                stats.corrupt += 1 if raw.strip() else 0
                continue
            if since is not None and row.timestamp < since:
                continue
            stats.rows += 1
            yield row
    finally:
        f.close()


def parse_row(d: dict[str, str]) -> ResultRow | None:
    """A ResultRow from CSV text fields, or None when a required field is missing or malformed."""
    ts = parse_ts(d.get("timestamp"))
    if ts is None or not d.get("run_id") or d.get("outcome") not in OUTCOMES:
        return None
    try:
        return ResultRow(
            timestamp=ts,
            run_id=d["run_id"],
            repo=d.get("repo", ""),
            issue=int(d["issue"]) if d.get("issue") else None,
            agent=d.get("agent", ""),
            backend=d.get("backend", ""),
            model=d.get("model", ""),
            outcome=d["outcome"],
            duration_s=float(d.get("duration_s") or 0),
            steps=int(d.get("steps") or 0),
            tokens_in=int(d.get("tokens_in") or 0),
            tokens_out=int(d.get("tokens_out") or 0),
            cost_usd=float(d.get("cost_usd") or 0),
            pr_url=d.get("pr_url", ""),
            error=d.get("error", ""),
        )
    except ValueError:
        return None
