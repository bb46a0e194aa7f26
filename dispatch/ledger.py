"""The outcome ledger, `<state>/ledger.sqlite`: issue -> attempt -> PR -> CI -> merged, closed or
reverted, with each attempt's cost, in one place.

"Tests pass" is not "resolved": success here means the attempt's PR was merged and stayed merged.
Attempts come from results.csv (one per sprint run that tried work); PR states come from the
forge (`sync_prs`). Times are epoch seconds (UTC).
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .forge import ForgeClient, Issue, parse_time
from .results import ResultRow, read_results
from .triage import normalize, references

KINDS = ("bug", "feature", "docs", "tests", "refactor", "other")
PR_STATES = ("open", "merged", "closed", "reverted")
BUSY_TIMEOUT_S = 10.0

# word (after triage.normalize) -> kind; the first kind in KINDS order that any label names wins
_KIND_WORDS = {
    "bug": "bug", "defect": "bug", "regression": "bug", "crash": "bug", "fix": "bug",
    "bugfix": "bug", "hotfix": "bug",
    "feature": "feature", "feat": "feature", "enhancement": "feature", "request": "feature",
    "doc": "docs",
    "test": "tests", "coverage": "tests",
    "refactor": "refactor", "cleanup": "refactor", "debt": "refactor", "chore": "refactor",
}
_CONVENTIONAL = re.compile(r"^\s*\[?([a-z]+)(?:\([^)]*\))?\]?\s*[:!\]]", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+")
_PR_NUMBER = re.compile(r"/pulls/(\d+)/?$")
_BRANCH_ISSUE = re.compile(r"^dispatch/(\d+)-")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS attempts (
    run_id   TEXT PRIMARY KEY,
    repo     TEXT NOT NULL,
    issue    INTEGER,
    agent    TEXT NOT NULL,
    model    TEXT NOT NULL,
    kind     TEXT NOT NULL,
    started  REAL NOT NULL,
    ended    REAL NOT NULL,
    outcome  TEXT NOT NULL,
    cost_usd REAL NOT NULL,
    tokens   INTEGER NOT NULL,
    pr_url   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_agent ON attempts (agent, ended);
CREATE TABLE IF NOT EXISTS prs (
    repo      TEXT NOT NULL,
    number    INTEGER NOT NULL,
    url       TEXT NOT NULL,
    issue     INTEGER,
    title     TEXT NOT NULL DEFAULT '',
    state     TEXT NOT NULL CHECK (state IN ('open', 'merged', 'closed', 'reverted')),
    ci_status TEXT NOT NULL DEFAULT '',
    merged_at REAL,
    updated   REAL NOT NULL,
    PRIMARY KEY (repo, number)
);
CREATE INDEX IF NOT EXISTS prs_url ON prs (url);
"""


def issue_kind(labels: Iterable[str], title: str = "") -> str:
    """bug, feature, docs, tests, refactor or other: labels first, then a conventional title
    prefix ("fix:", "docs(readme):", "[test]"), then words of the title; pure."""
    label_kinds = {_KIND_WORDS.get(normalize(w)) for lb in labels for w in _WORD.findall(lb.lower())}
    for kind in KINDS[:-1]:
        if kind in label_kinds:
            return kind
    m = _CONVENTIONAL.match(title)
    if m and (kind := _KIND_WORDS.get(normalize(m.group(1)))):
        return kind
    title_kinds = {_KIND_WORDS.get(normalize(w)) for w in _WORD.findall(title.lower())}
    return next((k for k in KINDS[:-1] if k in title_kinds), "other")


@dataclass(frozen=True)
class CostRow:
    attempts: int
    merged: int  # distinct PRs merged and not reverted
    cost_usd: float  # every attempt's cost, failed ones included
    cost_per_merged: float | None  # None when nothing merged


@dataclass(frozen=True)
class Rate:
    attempts: int
    merged: int  # attempts whose PR is merged (and not reverted)
    success_rate: float  # merged / attempts
    mean_duration_s: float  # over all attempts in the window


class Ledger:
    """One connection to the ledger file; tables are created on first use."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --

    def record_attempt(self, row: ResultRow, kind: str = "other") -> bool:
        """Add one sprint run that tried work; False when it is not an attempt or known already."""
        if not row.attempted or not row.repo:
            return False
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        ended = row.timestamp.timestamp()
        with self.db:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.run_id, row.repo, row.issue, row.agent, row.model, kind,
                 ended - row.duration_s, ended, row.outcome, row.cost_usd,
                 row.tokens_in + row.tokens_out, row.pr_url),
            )
            if cur.rowcount and row.pr_url and (m := _PR_NUMBER.search(row.pr_url)):
                self.db.execute(
                    "INSERT OR IGNORE INTO prs (repo, number, url, issue, state, updated)"
                    " VALUES (?, ?, ?, ?, 'open', ?)",
                    (row.repo, int(m.group(1)), row.pr_url, row.issue, ended),
                )
        return bool(cur.rowcount)

    def import_results(
        self, path: Path, kind_of: Callable[[str, int | None], str] | None = None
    ) -> int:
        """Add every attempt in results.csv not yet here (by run_id); returns how many.

        results.csv has no labels: `kind_of(repo, issue)` supplies the kind when the caller
        knows it (see also set_kinds); otherwise attempts start as "other".
        """
        added = 0
        for row in read_results(path):
            kind = kind_of(row.repo, row.issue) if kind_of and row.attempted else "other"
            added += self.record_attempt(row, kind)
        return added

    def set_kinds(self, issues: Iterable[Issue]) -> int:
        """Re-derive the kind of these issues' attempts from their labels and titles."""
        with self.db:
            return sum(
                self.db.execute("UPDATE attempts SET kind = ? WHERE repo = ? AND issue = ?",
                                (issue_kind(i.labels, i.title), i.repo, i.number)).rowcount
                for i in issues
            )

    def update_pr(self, repo: str, number: int, *, url: str = "", issue: int | None = None,
                  title: str | None = None, state: str | None = None,
                  ci_status: str | None = None, merged_at: float | None = None) -> None:
        """Insert or update one PR; fields left None keep their stored value."""
        if state is not None and state not in PR_STATES:
            raise ValueError(f"state must be one of {', '.join(PR_STATES)}, got {state!r}")
        now = self.clock()
        with self.db:
            self.db.execute(
                "INSERT INTO prs (repo, number, url, issue, title, state, ci_status, merged_at,"
                " updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (repo, number) DO UPDATE"
                " SET url = CASE WHEN excluded.url != '' THEN excluded.url ELSE url END,"
                " issue = COALESCE(?, issue), title = COALESCE(?, title),"
                " state = COALESCE(?, state), ci_status = COALESCE(?, ci_status),"
                " merged_at = COALESCE(?, merged_at), updated = excluded.updated",
                (repo, number, url, issue, title or "", state or "open", ci_status or "",
                 merged_at, now, issue, title, state, ci_status, merged_at),
            )

    def sync_prs(self, client: ForgeClient, repos: Iterable[str]) -> int:
        """Refresh tracked PRs from the forge: state, revert, combined commit status.

        Tracked: PRs an attempt links to, plus any on a `dispatch/<issue>-...` branch. A PR is
        reverted when a later merged PR is titled 'Revert "<its title>"' or is titled
        'Revert "...' and references it by number. Returns the number of PRs refreshed.
        """
        refreshed = 0
        for repo in repos:
            pulls = client.paginate(*client.pulls_query(repo, "all"))
            known = {n: (s, ci) for n, s, ci in self.db.execute(
                "SELECT number, state, ci_status FROM prs WHERE repo = ?", (repo,))}
            reverts = [p for p in pulls if p.get("merged") and
                       (p.get("title") or "").startswith('Revert "')]
            for p in pulls:
                head = p.get("head") or {}
                branch = _BRANCH_ISSUE.match(head.get("ref") or "")
                if p["number"] not in known and not branch:
                    continue
                merged_at = parse_time(p.get("merged_at"))
                state = ("merged" if p.get("merged") else p.get("state") or "open")
                if state == "merged" and _reverted(p, reverts, repo):
                    state = "reverted"
                old_state, old_ci = known.get(p["number"], (None, ""))
                ci = old_ci
                # CI can change while a PR is open; once it is settled, the status it ended
                # with is the one that counts, so each PR is asked at most once after that
                if head.get("sha") and (state == "open" or old_state in (None, "open")):
                    ci = _combined_status(client, repo, head["sha"])
                self.update_pr(repo, p["number"], url=p.get("html_url") or "",
                               issue=int(branch.group(1)) if branch else None,
                               title=p.get("title") or "", state=state, ci_status=ci,
                               merged_at=merged_at.timestamp() if merged_at else None)
                refreshed += 1
        return refreshed

    # -- reading --

    def pr(self, repo: str, number: int) -> dict | None:
        cur = self.db.execute("SELECT * FROM prs WHERE repo = ? AND number = ?", (repo, number))
        row = cur.fetchone()
        return dict(zip([c[0] for c in cur.description], row, strict=True)) if row else None

    def chain(self, repo: str, issue: int) -> list[dict]:
        """The issue's attempts, oldest first, each with its PR's state and CI status."""
        cur = self.db.execute(
            "SELECT a.*, p.number AS pr, p.state AS pr_state, p.ci_status FROM attempts a"
            " LEFT JOIN prs p ON p.url = a.pr_url AND a.pr_url != ''"
            " WHERE a.repo = ? AND a.issue = ? ORDER BY a.started", (repo, issue))
        names = [c[0] for c in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def spent(self, agent: str, since: float) -> tuple[int, float]:
        """Tokens and USD the agent's attempts that ended at or after `since` used."""
        tokens, usd = self.db.execute(
            "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(cost_usd), 0) FROM attempts"
            " WHERE agent = ? AND ended >= ?", (agent, since)).fetchone()
        return int(tokens), float(usd)

    def cost_per_merged_pr(self, by: str = "agent", *, since: float = 0.0) -> dict[str, CostRow]:
        """Cost of all attempts over the distinct PRs merged, grouped by agent, repo or kind."""
        if by not in ("agent", "repo", "kind"):
            raise ValueError(f"by must be agent, repo or kind, got {by!r}")
        rows = self.db.execute(
            f"SELECT a.{by}, COUNT(*), COUNT(DISTINCT CASE WHEN p.state = 'merged'"
            " THEN p.repo || '#' || p.number END), SUM(a.cost_usd) FROM attempts a"
            " LEFT JOIN prs p ON p.url = a.pr_url AND a.pr_url != ''"
            f" WHERE a.ended >= ? GROUP BY a.{by} ORDER BY a.{by}", (since,)).fetchall()
        return {key: CostRow(n, merged, round(cost, 6),
                             round(cost / merged, 6) if merged else None)
                for key, n, merged, cost in rows}

    def success_rates(self, window_days: float, *,
                      now: float | None = None) -> dict[tuple[str, str], Rate]:
        """Per (agent, kind) over attempts that ended in the window: how often the PR merged."""
        now = self.clock() if now is None else now
        rows = self.db.execute(
            "SELECT a.agent, a.kind, COUNT(*), SUM(CASE WHEN p.state = 'merged' THEN 1 ELSE 0"
            " END), AVG(a.ended - a.started) FROM attempts a"
            " LEFT JOIN prs p ON p.url = a.pr_url AND a.pr_url != ''"
            " WHERE a.ended >= ? GROUP BY a.agent, a.kind", (now - window_days * 86400,)).fetchall()
        return {(agent, kind): Rate(n, merged, round(merged / n, 4), round(avg, 1))
                for agent, kind, n, merged, avg in rows}


def _reverted(pr: dict, reverts: list[dict], repo: str) -> bool:
    title = pr.get("title") or ""
    merged = parse_time(pr.get("merged_at"))
    for r in reverts:
        if r["number"] == pr["number"]:
            continue
        r_merged = parse_time(r.get("merged_at"))
        if merged and r_merged and r_merged < merged:
            continue
        if (r.get("title") or "") == f'Revert "{title}"':
            return True
        if pr["number"] in references(f"{r.get('title') or ''}\n{r.get('body') or ''}", repo):
            return True
    return False


def _combined_status(client: ForgeClient, repo: str, sha: str) -> str:
    owner, name = repo.split("/", 1)
    path = f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}/commits/{quote(sha, safe='')}/status"
    return str(client.get_json(path).get("state") or "")
