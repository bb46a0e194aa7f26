"""Gitea REST API v1 client: auth header, timeouts, pagination, bounded retry, typed results.

Errors surface as ForgeError carrying method, URL (never the token), status and Gitea's message.
The `requests.Session` is injectable so tests hand in their own.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from .errors import ForgeError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
POST_RETRY_STATUSES = frozenset({429, 503})  # refused before doing anything; a 5xx may have done it
DEFAULT_PAGE = 50


# ---- typed results -------------------------------------------------------------------------


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Label:
    name: str
    id: int = 0
    color: str = ""

    @classmethod
    def from_api(cls, d: dict) -> Label:
        return cls(name=d.get("name") or "", id=d.get("id") or 0, color=d.get("color") or "")


@dataclass(frozen=True)
class Issue:
    repo: str  # owner/name
    number: int
    title: str
    body: str = ""
    state: str = "open"
    labels: tuple[str, ...] = ()
    assignees: tuple[str, ...] = ()
    author: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    comments: int = 0
    is_pull: bool = False
    html_url: str = ""

    @property
    def ref(self) -> str:
        return f"{self.repo}#{self.number}"

    @classmethod
    def from_api(cls, repo: str, d: dict) -> Issue:
        assignees = [a.get("login", "") for a in d.get("assignees") or []]
        if not assignees and d.get("assignee"):
            assignees = [d["assignee"].get("login", "")]
        return cls(
            repo=repo,
            number=d["number"],
            title=d.get("title") or "",
            body=d.get("body") or "",
            state=d.get("state") or "open",
            labels=tuple(lb.get("name", "") for lb in d.get("labels") or []),
            assignees=tuple(a for a in assignees if a),
            author=(d.get("user") or {}).get("login", ""),
            created_at=parse_time(d.get("created_at")),
            updated_at=parse_time(d.get("updated_at")),
            comments=d.get("comments") or 0,
            is_pull=d.get("pull_request") is not None,
            html_url=d.get("html_url") or "",
        )


@dataclass(frozen=True)
class Comment:
    id: int
    body: str
    author: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    html_url: str = ""

    @classmethod
    def from_api(cls, d: dict) -> Comment:
        return cls(
            id=d["id"],
            body=d.get("body") or "",
            author=(d.get("user") or {}).get("login", ""),
            created_at=parse_time(d.get("created_at")),
            updated_at=parse_time(d.get("updated_at")),
            html_url=d.get("html_url") or "",
        )


@dataclass(frozen=True)
class PullRequest:
    repo: str
    number: int
    title: str
    body: str = ""
    state: str = "open"
    head: str = ""  # head branch name
    base: str = ""
    merged: bool = False
    author: str = ""
    html_url: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    merged_at: datetime | None = None
    closed_at: datetime | None = None

    @classmethod
    def from_api(cls, repo: str, d: dict) -> PullRequest:
        return cls(
            repo=repo,
            number=d["number"],
            title=d.get("title") or "",
            body=d.get("body") or "",
            state=d.get("state") or "open",
            head=(d.get("head") or {}).get("ref") or "",
            base=(d.get("base") or {}).get("ref") or "",
            merged=bool(d.get("merged")),
            author=(d.get("user") or {}).get("login", ""),
            html_url=d.get("html_url") or "",
            created_at=parse_time(d.get("created_at")),
            updated_at=parse_time(d.get("updated_at")),
            merged_at=parse_time(d.get("merged_at")),
            closed_at=parse_time(d.get("closed_at")),
        )


@dataclass(frozen=True)
class Repo:
    full_name: str
    clone_url: str = ""
    default_branch: str = "main"
    html_url: str = ""
    archived: bool = False
    has_issues: bool = True
    empty: bool = False

    @property
    def owner(self) -> str:
        return self.full_name.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.full_name.split("/", 1)[1]

    @classmethod
    def from_api(cls, d: dict) -> Repo:
        return cls(
            full_name=d.get("full_name") or "",
            clone_url=strip_credentials(d.get("clone_url") or ""),
            default_branch=d.get("default_branch") or "main",
            html_url=d.get("html_url") or "",
            archived=bool(d.get("archived")),
            has_issues=d.get("has_issues", True) is not False,
            empty=bool(d.get("empty")),
        )


def strip_credentials(url: str) -> str:
    """Drop any user:password@ from a URL, so it can be printed, logged or put in a prompt."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def split_repo(full_name: str) -> tuple[str, str]:
    owner, _, name = full_name.partition("/")
    if not owner or not name or "/" in name:
        raise ValueError(f"expected owner/name, got {full_name!r}")
    return owner, name


_LINK_RE = re.compile(r'<([^>]+)>\s*;\s*rel="?([a-z]+)"?')


def parse_link(header: str | None) -> dict[str, str]:
    """Parse an RFC 8288 Link header into {rel: url}; Gitea joins entries with ','."""
    return {rel: url for url, rel in _LINK_RE.findall(header or "")}


# ---- the client ----------------------------------------------------------------------------


class ForgeClient:
    """Talks to one Gitea/Forgejo server. Thread-safe for the concurrent paging it does itself."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        session: requests.Session | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        retries: int = 4,
        backoff: float = 1.0,
        backoff_cap: float = 120.0,
        concurrency: int = 4,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = strip_credentials(base_url).rstrip("/")
        self.api = self.base_url + "/api/v1"
        self.timeout = (connect_timeout, timeout)
        self.retries = retries
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.concurrency = max(1, concurrency)
        self.sleep = sleep
        self.requests_made = 0
        self._count_lock = threading.Lock()
        self._max_items: int | None = None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_maxsize=max(10, self.concurrency * 2))
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self.session = session
        self._auth = {"Authorization": f"token {token}"} if token else {}

    # -- transport --

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        ok: Iterable[int] = (),
    ) -> requests.Response:
        """One API call with bounded retry; raises ForgeError unless the status is 2xx or in `ok`."""
        url = self.api + path
        attempt = 0
        while True:
            with self._count_lock:
                self.requests_made += 1
            try:
                resp = self.session.request(
                    method, url, params=params, json=json, headers=self._auth, timeout=self.timeout
                )
            except requests.RequestException as e:
                # a POST whose answer timed out may have landed: sending it again could double
                # a comment, so only a failure before the request was read is retried
                landed = method == "POST" and isinstance(e, requests.ReadTimeout)
                if attempt < self.retries and not landed:
                    attempt += 1
                    self._wait(attempt, None)
                    continue
                raise ForgeError(method, url, None, _describe(e)) from None
            retry = RETRY_STATUSES if method != "POST" else POST_RETRY_STATUSES
            if resp.status_code in retry and attempt < self.retries:
                attempt += 1
                log.info("forge %s %s -> %s, retry %d", method, url, resp.status_code, attempt)
                self._wait(attempt, resp.headers.get("Retry-After"))
                continue
            if resp.ok or resp.status_code in ok:
                return resp
            raise ForgeError(method, url, resp.status_code, _message(resp))

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.backoff_cap, self.backoff * 2 ** (attempt - 1))
        delay = delay * (0.5 + random.random() / 2)  # jitter so parallel crons do not march in step
        if retry_after and retry_after.isdigit():
            delay = min(self.backoff_cap, max(delay, float(retry_after)))
        self.sleep(delay)

    def get_json(self, path: str, params: dict[str, Any] | None = None, expect: type | None = None) -> Any:
        return _body(self.request("GET", path, params=params), expect)

    def max_items(self) -> int:
        """The server's page cap (`max_response_items`), asked once; 50 if the server won't say."""
        if self._max_items is None:
            try:
                data = self.get_json("/settings/api", expect=dict)
                self._max_items = int(data.get("max_response_items") or DEFAULT_PAGE)
            except ForgeError as e:
                if e.status is None:
                    raise
                self._max_items = DEFAULT_PAGE
        return self._max_items

    def paginate(self, path: str, params: dict[str, Any] | None = None) -> list[dict]:
        """Every item of one list endpoint; see paginate_many."""
        return self.paginate_many([(path, params or {})])[0]

    def paginate_many(self, queries: list[tuple[str, dict[str, Any]]]) -> list[list[dict]]:
        """Every item of several list endpoints, at the server's page cap, pages in parallel.

        Two phases over one pool: the first page of every query (its X-Total-Count says how many
        pages follow), then every remaining page at once, so a backlog of many repos costs the
        minimum number of requests at the configured concurrency. Without a total, follow
        rel="next". Items are de-duplicated by id, so one that shifts pages mid-read is kept once.
        """
        limit = self.max_items()
        bases = [(path, {**params, "limit": limit}) for path, params in queries]
        firsts = self.map(lambda q: self.request("GET", q[0], params={**q[1], "page": 1}), bases)
        results: list[list[dict]] = [_body(r, list) for r in firsts]
        todo: list[tuple[int, int]] = []
        sizes: dict[int, int] = {}
        for i, resp in enumerate(firsts):
            total = resp.headers.get("X-Total-Count", "")
            if total.isdigit():
                # a server capping `limit` lower than it said serves shorter pages; number the
                # pages by what it actually served, or pages 2.. would skip items
                size = len(results[i]) if 0 < len(results[i]) < min(limit, int(total)) else limit
                sizes[i] = size
                todo += [(i, p) for p in range(2, -(-int(total) // size) + 1)]
            else:
                results[i] += self._follow_links(bases[i], resp)
        chunks = self.map(lambda t: self._page(bases[t[0]], t[1]), todo)
        for (i, _), chunk in zip(todo, chunks, strict=True):
            results[i].extend(chunk)
        for i, resp in enumerate(firsts):
            total = resp.headers.get("X-Total-Count", "")
            # the list grew while we read (an item shifted into a page already read, so a
            # de-duplicated count falls short): carry on until a short page
            if total.isdigit() and len(_dedupe(results[i])) < int(total):
                page = max([p for j, p in todo if j == i], default=1)
                while page < 10_000:
                    page += 1
                    chunk = self._page(bases[i], page)
                    results[i].extend(chunk)
                    if len(chunk) < sizes[i]:
                        break
        return [_dedupe(items) for items in results]

    def _page(self, query: tuple[str, dict[str, Any]], page: int) -> list[dict]:
        return _body(self.request("GET", query[0], params={**query[1], "page": page}), list)

    def _follow_links(self, query: tuple[str, dict[str, Any]], resp: requests.Response) -> list[dict]:
        items: list[dict] = []
        page = 1
        while parse_link(resp.headers.get("Link")).get("next") and page < 10_000:
            page += 1
            resp = self.request("GET", query[0], params={**query[1], "page": page})
            items.extend(_body(resp, list))
        return items

    def map(self, fn: Callable[[Any], Any], args: Iterable[Any]) -> list[Any]:
        """Run `fn` over `args` with the client's concurrency, keeping order."""
        args = list(args)
        if len(args) <= 1:
            return [fn(a) for a in args]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(args))) as pool:
            return list(pool.map(fn, args))

    # -- endpoints --

    def current_user(self) -> str:
        return self.get_json("/user", expect=dict).get("login", "")

    def get_repo(self, full_name: str) -> Repo:
        return Repo.from_api(self.get_json(f"/repos/{_repo_path(full_name)}", expect=dict))

    def org_repos(self, org: str) -> list[Repo]:
        return [Repo.from_api(d) for d in self.paginate(f"/orgs/{quote(org, safe='')}/repos")]

    @staticmethod
    def issues_query(repo: str, state: str = "open") -> tuple[str, dict[str, Any]]:
        """The list query for a repo's issues (no pull requests), for paginate_many."""
        return f"/repos/{_repo_path(repo)}/issues", {"state": state, "type": "issues"}

    @staticmethod
    def pulls_query(repo: str, state: str = "open") -> tuple[str, dict[str, Any]]:
        return f"/repos/{_repo_path(repo)}/pulls", {"state": state}

    def list_issues(self, repo: str, *, state: str = "open") -> list[Issue]:
        """Issues only (no pull requests), every page."""
        items = self.paginate(*self.issues_query(repo, state))
        return sorted((Issue.from_api(repo, d) for d in items), key=lambda i: i.number)

    def get_issue(self, repo: str, number: int) -> Issue:
        return Issue.from_api(repo, self.get_json(f"/repos/{_repo_path(repo)}/issues/{number}", expect=dict))

    def list_comments(self, repo: str, number: int) -> list[Comment]:
        # Gitea does not paginate this endpoint: one call returns every comment.
        data = self.get_json(f"/repos/{_repo_path(repo)}/issues/{number}/comments", expect=list)
        return [Comment.from_api(d) for d in data]

    def create_comment(self, repo: str, number: int, body: str) -> Comment:
        resp = self.request(
            "POST", f"/repos/{_repo_path(repo)}/issues/{number}/comments", json={"body": body}
        )
        return Comment.from_api(_body(resp, dict))

    def list_labels(self, repo: str) -> list[Label]:
        return [Label.from_api(d) for d in self.paginate(f"/repos/{_repo_path(repo)}/labels")]

    def ensure_label(self, repo: str, name: str, color: str = "#5319e7") -> Label:
        """The repo's label of that name, created if missing."""
        for label in self.list_labels(repo):
            if label.name == name:
                return label
        resp = self.request(
            "POST", f"/repos/{_repo_path(repo)}/labels", json={"name": name, "color": color}
        )
        return Label.from_api(_body(resp, dict))

    def add_labels(self, repo: str, number: int, label_ids: list[int]) -> list[Label]:
        resp = self.request(
            "POST",
            f"/repos/{_repo_path(repo)}/issues/{number}/labels",
            json={"labels": label_ids},
        )
        return [Label.from_api(d) for d in _body(resp, list)]

    def remove_label(self, repo: str, number: int, label_id: int) -> None:
        # 404 or 422 (Gitea, for a label id it does not know) mean nothing to remove: idempotent
        self.request(
            "DELETE", f"/repos/{_repo_path(repo)}/issues/{number}/labels/{label_id}", ok=(404, 422)
        )

    def edit_issue(self, repo: str, number: int, **fields: Any) -> Issue:
        # Gitea answers PATCH of an issue with 201, not 200.
        resp = self.request("PATCH", f"/repos/{_repo_path(repo)}/issues/{number}", json=fields)
        return Issue.from_api(repo, _body(resp, dict))

    def list_pulls(self, repo: str, *, state: str = "open") -> list[PullRequest]:
        items = self.paginate(*self.pulls_query(repo, state))
        return sorted((PullRequest.from_api(repo, d) for d in items), key=lambda p: p.number)

    def create_pull(self, repo: str, *, head: str, base: str, title: str, body: str) -> PullRequest:
        resp = self.request(
            "POST",
            f"/repos/{_repo_path(repo)}/pulls",
            json={"head": head, "base": base, "title": title, "body": body},
        )
        return PullRequest.from_api(repo, _body(resp, dict))


def _repo_path(full_name: str) -> str:
    owner, name = split_repo(full_name)
    return f"{quote(owner, safe='')}/{quote(name, safe='')}"


def _body(resp: requests.Response, expect: type | None = None) -> Any:
    """The JSON body, or a ForgeError when the forge (or a proxy in front of it) sent
    something else: an HTML error page with status 200 must not become a traceback."""
    try:
        data = resp.json()
    except ValueError:
        data = None
        expect = expect or dict  # force the error below
    if expect is not None and not isinstance(data, expect):
        req = resp.request
        raise ForgeError(req.method or "GET", strip_credentials(req.url or ""), resp.status_code,
                         f"unexpected body (expected a JSON {expect.__name__})")
    return data


def _dedupe(items: list[dict]) -> list[dict]:
    seen: set[Any] = set()
    out = []
    for d in items:
        key = d.get("id", id(d)) if isinstance(d, dict) else id(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _message(resp: requests.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return (resp.text or resp.reason or "").strip()[:200]
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return (resp.reason or "").strip()


def _describe(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed (is the server up?)"
    return type(exc).__name__


def utcnow() -> datetime:
    return datetime.now(UTC)
