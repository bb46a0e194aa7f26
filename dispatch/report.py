"""The morning report: one streaming pass over results, snapshots and events into a `Report`,
rendered as rich text, Markdown (one forge comment), JSON, or HTML (see report_html).

Memory is bounded by agents, models, days and distinct PRs, never by the number of rows.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from .results import ATTEMPTED, ResultRow
from .telemetry import ReadStats, parse_ts

TOP_FAILURES = 5
TIMELINE = 50  # most recent events kept for the timeline
BACKLOG_POINTS = 48  # backlog trend is downsampled to at most this many buckets
MAX_KEYS = 200  # agents/models/reasons tracked before the rest fold into "(other)"
MAX_GAP = timedelta(minutes=15)  # a longer gap between snapshots is collector downtime
STATES = ("working", "idle", "stuck", "dead")


@dataclass(frozen=True)
class AgentStats:
    name: str
    attempted: int = 0
    succeeded: int = 0
    failed: int = 0
    per_day: float = 0.0  # successful sprints per day of the window
    seconds: dict[str, float] = field(default_factory=dict)  # state -> time seen in it

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.attempted if self.attempted else None


@dataclass(frozen=True)
class ModelUsage:
    model: str
    sprints: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True)
class DayCount:
    day: date
    attempted: int = 0
    succeeded: int = 0


@dataclass(frozen=True)
class BacklogPoint:
    ts: datetime
    open: int
    eligible: int


@dataclass(frozen=True)
class TimelineEvent:
    ts: datetime
    kind: str
    subject: str = ""
    run_id: str = ""


@dataclass(frozen=True)
class SourceStats:
    name: str
    rows: int = 0
    torn: int = 0
    corrupt: int = 0


@dataclass(frozen=True)
class Report:
    since: datetime
    until: datetime
    outcomes: dict[str, int]  # outcome -> sprints in the window
    top_failures: tuple[tuple[str, int], ...]  # normalised error -> count, most frequent first
    prs_opened: int
    prs_merged: int
    issues_closed: int
    agents: tuple[AgentStats, ...]
    models: tuple[ModelUsage, ...]
    days: tuple[DayCount, ...]
    backlog: tuple[BacklogPoint, ...]
    timeline: tuple[TimelineEvent, ...]  # the last TIMELINE events, oldest first
    events_total: int
    snapshots: int
    probe_errors: dict[str, int]  # probe -> snapshots in which it failed
    sources: tuple[SourceStats, ...]
    queue: dict | None = None  # the last snapshot's job queue section (only with queue.url)

    @property
    def attempted(self) -> int:
        return sum(self.outcomes.get(o, 0) for o in ATTEMPTED)

    @property
    def succeeded(self) -> int:
        return self.outcomes.get("success", 0)

    @property
    def failed(self) -> int:
        return self.outcomes.get("failed", 0)

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.attempted if self.attempted else None

    @property
    def torn(self) -> int:
        return sum(s.torn for s in self.sources)

    @property
    def corrupt(self) -> int:
        return sum(s.corrupt for s in self.sources)


_NORMALISE = (
    (re.compile(r"https?://\S+"), "<url>"),
    (re.compile(r"(?:~|\.{1,2})?(?:/[\w.@+-]+){2,}/?"), "<path>"),
    (re.compile(r"\b(?=[0-9a-f]*\d)[0-9a-f]{7,}\b"), "<hex>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),
    (re.compile(r"\s+"), " "),
)


def normalise_error(text: str) -> str:
    """Fold run-specific detail (numbers, paths, URLs, hashes, quoted text) so alike errors count together."""
    for pattern, repl in _NORMALISE:
        text = pattern.sub(repl, text)
    text = text.strip()
    return (text[:117] + "…" if len(text) > 120 else text) or "(no error text)"


def pr_ref(url: str) -> str:
    """`owner/repo#n` for a PR URL, so results rows and pr_* events name a PR the same way."""
    m = re.search(r"([^/]+/[^/]+)/pulls?/(\d+)", url)
    return f"{m.group(1)}#{m.group(2)}" if m else url


def _key(counter: dict, key: str) -> str:
    return key if key in counter or len(counter) < MAX_KEYS else "(other)"


class _Tally:
    """Running totals for one report; every structure is bounded (see module docstring)."""

    def __init__(self, since: datetime, until: datetime) -> None:
        self.since, self.until = since, until
        self.outcomes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.agents: dict[str, dict] = {}
        self.models: dict[str, list] = {}
        self.days: dict[date, list[int]] = {}
        self.opened: set[str] = set()
        self.merged: set[str] = set()
        self.closed: set[str] = set()
        self.targets = {"pr_opened": self.opened, "pr_merged": self.merged, "issue_closed": self.closed}
        self.timeline: deque[tuple] = deque(maxlen=TIMELINE)  # (ts, kind, subject, run_id)
        self.events = self.snapshots = 0
        self.probe_errors: Counter[str] = Counter()
        self.backlog: dict[int, tuple] = {}  # bucket -> last (ts, open, eligible) seen in it
        self.first_backlog: tuple | None = None
        self.bucket_s = max((until - since).total_seconds() / BACKLOG_POINTS, 60.0)
        self.prev: tuple[datetime, dict] | None = None
        self.queue: dict | None = None

    def _in(self, ts: datetime | None) -> bool:
        return ts is not None and self.since <= ts < self.until

    def agent(self, name: str) -> dict:
        a = self.agents.get(name)
        if a is None:  # the hot path above runs for every agent of every snapshot
            name = _key(self.agents, name or "(none)")
            a = self.agents.setdefault(name, {"attempted": 0, "succeeded": 0, "failed": 0,
                                              "seconds": dict.fromkeys(STATES, 0.0)})
        return a

    def result(self, r: ResultRow) -> None:
        if not self._in(r.timestamp):
            return
        self.outcomes[r.outcome] += 1
        if r.outcome == "failed":
            self.reasons[_key(self.reasons, normalise_error(r.error))] += 1
        if r.pr_url:
            self.opened.add(pr_ref(r.pr_url))
        if r.attempted:
            a = self.agent(r.agent)
            a["attempted"] += 1
            a["succeeded"] += r.outcome == "success"
            a["failed"] += r.outcome == "failed"
            day = self.days.setdefault(r.timestamp.date(), [0, 0])
            day[0] += 1
            day[1] += r.outcome == "success"
        if r.model or r.tokens_in or r.tokens_out or r.cost_usd:
            m = self.models.setdefault(_key(self.models, r.model or "(unknown)"), [0, 0, 0, 0.0])
            m[0] += 1
            m[1] += r.tokens_in
            m[2] += r.tokens_out
            m[3] += r.cost_usd

    def snapshot(self, row: dict) -> None:
        ts = parse_ts(row.get("ts"))
        if row.get("kind") != "snapshot" or not self._in(ts):
            return
        self.snapshots += 1
        states = {n: a.get("state") for n, a in _dict(row.get("agents")).items() if isinstance(a, dict)}
        if self.prev is not None:
            # The interval is credited to the states seen at its start, capped at MAX_GAP.
            gap = min((ts - self.prev[0]).total_seconds(), MAX_GAP.total_seconds())
            for name, state in self.prev[1].items():
                if gap > 0 and state in STATES:
                    self.agent(name)["seconds"][state] += gap
        for name in states.keys() - self.agents.keys():
            self.agent(name)
        self.prev = (ts, states)
        for probe, status in (row.get("probes") or {}).items():
            if status != "ok":
                self.probe_errors[_key(self.probe_errors, probe)] += 1
        if isinstance(row.get("queue"), dict):
            self.queue = row["queue"]
        backlog = row.get("backlog")
        if isinstance(backlog, dict):
            point = (ts, _int(backlog.get("open")), _int(backlog.get("eligible")))
            self.first_backlog = self.first_backlog or point
            self.backlog[int((ts - self.since).total_seconds() // self.bucket_s)] = point

    def event(self, row: dict) -> None:
        ts = parse_ts(row.get("ts"))
        if not self._in(ts) or row.get("kind") in (None, "", "snapshot"):
            return  # snapshots are metrics, so one mixed stream may be passed as both
        kind, subject = str(row["kind"]), str(row.get("subject") or "")
        self.events += 1
        self.timeline.append((ts, kind, subject, str(row.get("run_id") or "")))
        target = self.targets.get(kind)
        if target is not None:
            target.add(subject)

    def report(self, read_stats: dict[str, ReadStats] | None) -> Report:
        window_days = max((self.until - self.since).total_seconds() / 86400, 1e-9)
        agents = tuple(
            AgentStats(name, a["attempted"], a["succeeded"], a["failed"],
                       a["succeeded"] / window_days, a["seconds"])
            for name, a in sorted(self.agents.items())
        )
        models = tuple(ModelUsage(k, m[0], m[1], m[2], round(m[3], 6))
                       for k, m in sorted(self.models.items()))
        return Report(
            since=self.since, until=self.until, outcomes=dict(sorted(self.outcomes.items())),
            top_failures=tuple(sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_FAILURES]),
            prs_opened=len(self.opened), prs_merged=len(self.merged), issues_closed=len(self.closed),
            agents=agents, models=models, days=self._days(), backlog=self._backlog(),
            timeline=tuple(TimelineEvent(*t) for t in self.timeline), events_total=self.events, snapshots=self.snapshots,
            probe_errors=dict(sorted(self.probe_errors.items())),
            sources=tuple(SourceStats(n, s.rows, s.torn, s.corrupt) for n, s in (read_stats or {}).items()),
            queue=self.queue,
        )

    def _backlog(self) -> tuple[BacklogPoint, ...]:
        points = [v for _, v in sorted(self.backlog.items())]
        # Keep the very first observation too, so the trend starts where the window did.
        if self.first_backlog and points and points[0] != self.first_backlog:
            points.insert(0, self.first_backlog)
        return tuple(BacklogPoint(*p) for p in points)

    def _days(self) -> tuple[DayCount, ...]:
        first, last = self.since.date(), (self.until - timedelta(microseconds=1)).date()
        span = [first + timedelta(days=i) for i in range((last - first).days + 1)]
        keys = span if len(span) <= 366 else sorted(self.days)  # zero-filled for the chart
        return tuple(DayCount(d, *self.days.get(d, (0, 0))) for d in keys)


def _dict(value: object) -> dict:
    """A mapping from a row, or {} when a hand-edited or older row has something else there."""
    return value if isinstance(value, dict) else {}


def _int(value: object) -> int:
    try:
        return int(value or 0)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def summarize(
    results: Iterable[ResultRow],
    metrics: Iterable[dict],
    events: Iterable[dict],
    *,
    since: datetime,
    until: datetime,
    read_stats: dict[str, ReadStats] | None = None,
) -> Report:
    """One pass over each stream (metrics chronological) into the report for [since, until)."""
    tally = _Tally(since, until)
    for r in results:
        tally.result(r)
    for row in metrics:
        tally.snapshot(row)
    for row in events:
        tally.event(row)
    return tally.report(read_stats)


_RENDERERS = frozenset({"render_html", "render_json", "render_markdown", "render_text"})


def __getattr__(name: str) -> object:
    # The renderers live in report_html (presentation apart from aggregation); importing them
    # lazily here keeps `from dispatch.report import render_markdown` working without a cycle.
    if name in _RENDERERS:
        from . import report_html

        return getattr(report_html, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
