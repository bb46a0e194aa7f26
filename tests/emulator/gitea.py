"""A Gitea emulator on loopback: the subset of API v1 that dispatch uses, each JSON response checked
against Gitea's official spec, real git over smart HTTP, and injectable faults.

    with GiteaEmulator(root=tmp_path) as emu:
        emu.add_user("dispatch-bot", token)
        emu.add_repo("acme/webapp", git=True)
        n = emu.add_issue("acme/webapp", "Fix login", labels=["P1", "bug"])

Run by hand: ``python -m tests.emulator.gitea --port 3000 --seed demo``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from .githost import GitError, GitHost, MergeConflict
from .spec import Spec, Violation

API = "/api/v1"
NOT_FOUND = "The target couldn't be found."


@dataclass(frozen=True)
class RequestRecord:
    """One request the emulator saw. The Authorization value is never kept, only its presence."""

    method: str
    path: str
    query: str
    status: int  # 0 when the connection was dropped without a response
    authorized: bool  # an Authorization header was sent
    kind: str  # "api", "git" or "fault" (an injected failure)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors


@dataclass
class _Account:
    id: int
    login: str
    token: str | None
    is_org: bool
    created: datetime


@dataclass
class _Label:
    id: int
    name: str
    color: str
    description: str = ""


@dataclass
class _Comment:
    id: int
    body: str
    author: str
    created_at: datetime
    updated_at: datetime


@dataclass
class _Pull:
    head: str
    base: str
    head_sha: str = ""
    merge_base: str = ""
    merged_at: datetime | None = None
    merged_by: str = ""
    merge_sha: str = ""
    reviews: list[dict] = field(default_factory=list)


@dataclass
class _Issue:
    id: int
    number: int
    title: str
    body: str
    author: str
    state: str
    labels: list[int]
    assignees: list[str]
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None = None
    comments: list[_Comment] = field(default_factory=list)
    pull: _Pull | None = None


@dataclass
class _Repo:
    id: int
    owner: str
    name: str
    default_branch: str
    git: bool
    private: bool
    description: str
    created_at: datetime
    labels: dict[int, _Label] = field(default_factory=dict)
    issues: dict[int, _Issue] = field(default_factory=dict)  # issues and pulls share numbers
    statuses: list[dict] = field(default_factory=list)

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


_ROUTES: list[tuple[str, str, re.Pattern[str], str]] = []  # method, template, regex, handler


def route(method: str, template: str) -> Callable:
    """Register an API handler for METHOD template (a spec-style path under /api/v1)."""
    regex = re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template))

    def register(fn: Callable) -> Callable:
        _ROUTES.append((method, template, regex, fn.__name__))
        return fn

    return register


def _ts(dt: datetime | None) -> str | None:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if dt else None


def _when(value: datetime | str | None, default: datetime) -> datetime:
    if value is None:
        return default
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class GiteaEmulator:
    """A real HTTP server on 127.0.0.1 speaking Gitea API v1, with in-memory state."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        port: int = 0,
        page_cap: int = 50,  # Gitea's MAX_RESPONSE_ITEMS
        default_page: int = 30,  # Gitea's DEFAULT_PAGING_NUM, used when no limit is asked
        validate: bool = True,
        git_auth_required: bool = True,  # clone/fetch need credentials, like a private repo
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="gitea-emu-"))
        self.git = GitHost(self.root / "git")
        self.port = port
        self.page_cap, self.default_page = page_cap, default_page
        self.validate, self.git_auth_required, self.clock = validate, git_auth_required, clock
        self.spec = Spec.load()
        self.requests: list[RequestRecord] = []
        self.violations: list[Violation] = []
        # fault injection, settable at any time
        self.latency = 0.0  # seconds added to every request
        self.fail_every = 0  # every Nth API request fails with the next of fail_statuses
        self.fail_statuses: list[int] = [502, 429]
        self.retry_after: int | None = None  # Retry-After seconds sent with injected 429s
        self.drop_every = 0  # every Nth API request gets its connection closed, no response
        self._accounts: dict[str, _Account] = {}
        self._repos: dict[str, _Repo] = {}
        self._ids = itertools.count(1)
        self._api_calls = itertools.count(1)
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GiteaEmulator:
        self._server = _Server(("127.0.0.1", self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def stop(self) -> None:
        self.down()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def down(self) -> None:
        """Stop listening and cut open connections: clients see "connection refused"."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.drop_connections()
            self._server = None

    def up(self) -> None:
        """Listen again on the same port after down()."""
        if self._server is None:
            self.start()

    def __enter__(self) -> GiteaEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- seeding ---------------------------------------------------------------------------

    def add_user(self, login: str, token: str | None = None) -> None:
        """A user; with a token it can call the API and push."""
        with self._lock:
            self._accounts[login] = _Account(next(self._ids), login, token, False, self.clock())

    def add_org(self, name: str) -> None:
        with self._lock:
            self._accounts.setdefault(name, _Account(next(self._ids), name, None, True, self.clock()))

    def add_repo(self, full_name: str, default_branch: str = "main", git: bool = False, *,
                 description: str = "", private: bool = True) -> None:
        """A repository; an unknown owner becomes an org. git=True makes a real bare repo."""
        owner, name = full_name.split("/", 1)
        if owner not in self._accounts:
            self.add_org(owner)
        with self._lock:
            self._repos[full_name] = _Repo(next(self._ids), owner, name, default_branch, git,
                                           private, description, self.clock())
        if git:
            self.git.create(owner, name, default_branch, f"# {name}\n\n{description}\n")

    def add_label(self, repo: str, name: str, color: str = "ededed", description: str = "") -> int:
        with self._lock:
            r = self._repos[repo]
            label = _Label(next(self._ids), name, color.lstrip("#"), description)
            r.labels[label.id] = label
            return label.id

    def add_issue(self, repo: str, title: str, body: str = "", labels: Iterable[str] = (),
                  assignees: Iterable[str] = (), state: str = "open",
                  created_at: datetime | str | None = None, updated_at: datetime | str | None = None,
                  author: str | None = None) -> int:
        """An issue; unknown labels and users are created. Returns its number."""
        with self._lock:
            issue = self._new_issue(self._repos[repo], title, body, author, labels, assignees,
                                    created_at, updated_at)
            if state == "closed":
                issue.state, issue.closed_at = "closed", issue.updated_at
            return issue.number

    def add_comment(self, repo: str, number: int, body: str, author: str | None = None,
                    created_at: datetime | str | None = None) -> int:
        with self._lock:
            issue = self._repos[repo].issues[number]
            when = _when(created_at, self.clock())
            comment = _Comment(next(self._ids), body, self._user(author).login, when, when)
            issue.comments.append(comment)
            return comment.id

    def add_pull(self, repo: str, title: str, body: str = "", head: str = "", base: str | None = None,
                 state: str = "open", author: str | None = None,
                 created_at: datetime | str | None = None) -> int:
        """A pull request; with git hosting a missing head branch is created with one commit."""
        with self._lock:
            r = self._repos[repo]
            base = base or r.default_branch
            head = head or f"pr-{len(r.issues) + 1}"
            if r.git and not self.git.rev(r.owner, r.name, head):
                self.git.commit(r.owner, r.name, head, {f"{head}.txt": f"{title}\n"}, title,
                                start=base)
            issue = self._new_issue(r, title, body, author, (), (), created_at, None)
            issue.pull = self._pull_for(r, head, base)
            if state == "closed":
                issue.state, issue.closed_at = "closed", issue.updated_at
            return issue.number

    def add_status(self, repo: str, ref: str, state: str, context: str = "ci",
                   description: str = "", target_url: str = "") -> None:
        """A commit status on a sha or branch (a branch is resolved to its sha now)."""
        with self._lock:
            r = self._repos[repo]
            now = self.clock()
            r.statuses.append({"id": next(self._ids), "sha": self._sha(r, ref) or ref, "status": state,
                               "context": context, "description": description,
                               "target_url": target_url, "at": now})

    def add_review(self, repo: str, number: int, state: str = "APPROVED", body: str = "",
                   author: str | None = None) -> int:
        with self._lock:
            pull = self._repos[repo].issues[number].pull
            assert pull is not None, f"{repo}#{number} is not a pull request"
            review = {"id": next(self._ids), "state": state, "body": body,
                      "user": self._user(author).login, "at": self.clock(), "sha": pull.head_sha}
            pull.reviews.append(review)
            return review["id"]

    # -- assertions ------------------------------------------------------------------------

    def issue(self, repo: str, number: int) -> dict:
        """The issue as the API would return it (for assertions)."""
        with self._lock:
            r = self._repos[repo]
            return self._issue_json(r, r.issues[number])

    def issue_numbers(self, repo: str) -> list[int]:
        """Every issue and pull request number in the repo."""
        with self._lock:
            return sorted(self._repos[repo].issues)

    def git_branches(self, repo: str) -> dict[str, str]:
        return self.git.branches(*repo.split("/", 1))

    def git_log(self, repo: str, branch: str) -> list[tuple[str, str]]:
        """(sha, subject) newest first."""
        return self.git.log(*repo.split("/", 1), branch)

    def git_commit(self, repo: str, branch: str, files: dict[str, str], message: str) -> str:
        """Commit files onto a branch (created from the default branch if new)."""
        r = self._repos[repo]
        return self.git.commit(r.owner, r.name, branch, files, message, start=r.default_branch)

    def count(self, method: str | None = None, path_prefix: str = "", kind: str = "api") -> int:
        """How many recorded requests match."""
        return sum(1 for q in list(self.requests) if q.kind == kind
                   and (method is None or q.method == method) and q.path.startswith(path_prefix))

    # -- internals shared by seeding and handlers ------------------------------------------

    def _user(self, login: str | None) -> _Account:
        if login is None:
            login = next((a.login for a in self._accounts.values() if a.token), "gitea-admin")
        if login not in self._accounts:
            self.add_user(login)
        return self._accounts[login]

    def _label_named(self, r: _Repo, name: str) -> _Label:
        found = next((lb for lb in r.labels.values() if lb.name == name), None)
        return found or r.labels[self.add_label(r.full_name, name)]

    def _new_issue(self, r: _Repo, title: str, body: str, author: str | None,
                   labels: Iterable[str], assignees: Iterable[str],
                   created_at: datetime | str | None, updated_at: datetime | str | None) -> _Issue:
        created = _when(created_at, self.clock())
        number = len(r.issues) + 1
        issue = _Issue(next(self._ids), number, title, body, self._user(author).login, "open",
                       [self._label_named(r, n).id for n in labels],
                       [self._user(a).login for a in assignees], created,
                       _when(updated_at, created))
        r.issues[number] = issue
        return issue

    def _sha(self, r: _Repo, ref: str) -> str | None:
        if r.git:
            return self.git.rev(r.owner, r.name, ref)
        # no git: a stable made-up sha per branch, so statuses and PR heads still line up
        return hashlib.sha1(f"{r.full_name}:{ref}".encode()).hexdigest()

    def _pull_for(self, r: _Repo, head: str, base: str) -> _Pull:
        head_sha = self._sha(r, head) or ""
        merge_base = self.git.merge_base(r.owner, r.name, head, base) if r.git else ""
        return _Pull(head, base, head_sha, merge_base or (self._sha(r, base) or ""))

    # -- HTTP --------------------------------------------------------------------------------

    def _dispatch(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        path, query = split.path, split.query

        def record(status: int, kind: str = "api") -> None:
            # called before the response goes out, so a client never outruns the record
            self._record(h.command, path, query, status, "Authorization" in h.headers, kind)

        if self.latency:
            time.sleep(self.latency)
        git = re.fullmatch(r"/([^/]+)/([^/]+)\.git(/.*)?", path)
        if git:
            self._serve_git(h, git.group(1), git.group(2), git.group(3) or "", query, record)
            return
        if not (path == API or path.startswith(API + "/")):
            record(404)
            return self._send(h, 404, {"message": NOT_FOUND, "url": self._swagger, "errors": []})
        n = next(self._api_calls)
        if self.drop_every and n % self.drop_every == 0:
            record(0, "fault")
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if self.fail_every and n % self.fail_every == 0:
            status = self.fail_statuses[(n // self.fail_every - 1) % len(self.fail_statuses)]
            extra = {}
            if status == 429 and self.retry_after is not None:
                extra["Retry-After"] = str(self.retry_after)
            _read_body(h)
            record(status, "fault")
            return self._send(h, status, {"message": "injected fault", "url": self._swagger}, extra)
        status, payload, headers = self._serve_api(h, path[len(API):] or "/", query)
        record(status)
        self._send(h, status, payload, headers)

    def _record(self, method: str, path: str, query: str, status: int, authorized: bool,
                kind: str) -> None:
        # a token put in the query string (which Gitea no longer accepts) is not kept either
        query = re.sub(r"((?:access_)?token=)[^&]*", r"\1***", query)
        self.requests.append(RequestRecord(method, path, query, status, authorized, kind))

    @property
    def _swagger(self) -> str:
        return f"{self.url}/api/swagger"

    def _authenticate(self, header: str | None) -> _Account | None:
        scheme, _, credential = (header or "").strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() == "basic":
            try:
                credential = base64.b64decode(credential).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return None
        elif scheme.lower() not in ("token", "bearer"):
            return None
        with self._lock:
            return next((a for a in self._accounts.values() if a.token and a.token == credential),
                        None)

    def _serve_api(self, h: _Handler, path: str, query: str) -> tuple[int, Any, dict[str, str]]:
        raw = _read_body(h)
        method = h.command
        try:
            user = self._authenticate(h.headers.get("Authorization"))
            anonymous_ok = method == "GET" and path == "/settings/api"
            if user is None and ("Authorization" in h.headers or not anonymous_ok):
                raise HTTPError(401, "invalid username, password or token"
                                if "Authorization" in h.headers else "token is required")
            handler, params = self._route(method, path)
            try:
                body = json.loads(raw) if raw.strip() else None
            except ValueError:
                raise HTTPError(422, "request body is not valid JSON") from None
            if method in ("POST", "PATCH", "PUT"):
                body = {} if body is None else body
                problems = self.spec.validate_request(method, path, body)
                if problems:
                    raise HTTPError(422, "; ".join(problems))
            call = _Call(user, {k: v[-1] for k, v in parse_qs(query).items()}, parse_qs(query),
                         body, API + path)
            with self._lock:
                status, payload, *headers = getattr(self, handler)(call, **params)
        except HTTPError as e:
            status, headers = e.status, []
            payload = {"message": e.message, "url": self._swagger}
            if e.status == 404 or e.errors is not None:
                payload["errors"] = e.errors or []
        except Exception as e:  # a bug in the emulator: answer, and fail the test at teardown
            status, headers = 500, []
            payload = {"message": f"emulator error: {type(e).__name__}: {e}", "url": self._swagger}
            self.violations.append(Violation(method, API + path, 500, (payload["message"],)))
        if self.validate and (payload is not None or 200 <= status < 300):
            problems = self.spec.validate(method, API + path, status, payload, complete=True)
            if problems:
                self.violations.append(Violation(method, API + path, status, tuple(problems)))
        return status, payload, headers[0] if headers else {}

    def _route(self, method: str, path: str) -> tuple[str, dict[str, str]]:
        allowed = False
        for m, _, regex, name in _ROUTES:
            match = regex.fullmatch(path)
            if match:
                if m == method:
                    return name, {k: unquote(v) for k, v in match.groupdict().items()}
                allowed = True
        raise HTTPError(405, "Method Not Allowed") if allowed else HTTPError(404, NOT_FOUND)

    def _send(self, h: _Handler, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        h.send_response(status)
        if payload is not None:
            h.send_header("Content-Type", "application/json;charset=utf-8")
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _serve_git(self, h: _Handler, owner: str, name: str, rest: str, query: str,
                   record: Callable[[int, str], None]) -> None:
        r = self._repos.get(f"{owner}/{name}")
        if r is None or not r.git:
            _read_body(h)
            record(404, "git")
            return self._send(h, 404, {"message": NOT_FOUND, "url": self._swagger, "errors": []})
        push = "git-receive-pack" in rest or "service=git-receive-pack" in query
        user = self._authenticate(h.headers.get("Authorization"))
        if user is None and (push or self.git_auth_required):
            # git asks its credential helper / GIT_ASKPASS only after this challenge
            _read_body(h)
            h.close_connection = True
            record(401, "git")
            return self._send(h, 401, None, {"WWW-Authenticate": 'Basic realm="Gitea"'})
        self.git.serve(h, f"/{owner}/{name}.git{rest}", query, user.login if user else "",
                       on_status=lambda status: record(status, "git"))

    # -- JSON shapes (every property of the spec's definitions, as Gitea fills them) -----------

    def _api_url(self, *parts: object) -> str:
        return self.url + API + "/" + "/".join(str(p) for p in parts)

    def _user_json(self, a: _Account) -> dict:
        return {
            "id": a.id, "login": a.login, "login_name": "", "source_id": 0, "full_name": a.login,
            "email": f"{a.login}@noreply.localhost", "avatar_url": f"{self.url}/avatars/{a.id}",
            "html_url": f"{self.url}/{a.login}", "language": "en-US", "is_admin": False,
            "last_login": _ts(a.created), "created": _ts(a.created), "restricted": False,
            "active": not a.is_org, "prohibit_login": False, "location": "", "website": "",
            "description": "", "visibility": "public", "followers_count": 0,
            "following_count": 0, "starred_repos_count": 0,
        }

    def _repo_json(self, r: _Repo) -> dict:
        issues = [i for i in r.issues.values() if i.state == "open"]
        full = r.full_name
        return {
            "id": r.id, "owner": self._user_json(self._accounts[r.owner]), "name": r.name,
            "full_name": full, "description": r.description, "empty": False, "private": r.private,
            "fork": False, "template": False, "parent": None, "mirror": False, "size": 0,
            "language": "", "languages_url": self._api_url("repos", full, "languages"),
            "html_url": f"{self.url}/{full}", "url": self._api_url("repos", full), "link": "",
            "ssh_url": f"git@127.0.0.1:{full}.git", "clone_url": f"{self.url}/{full}.git",
            "original_url": "", "website": "", "stars_count": 0, "forks_count": 0,
            "watchers_count": 1, "open_issues_count": sum(1 for i in issues if not i.pull),
            "open_pr_counter": sum(1 for i in issues if i.pull), "release_counter": 0,
            "default_branch": r.default_branch, "archived": False, "created_at": _ts(r.created_at),
            "updated_at": _ts(r.created_at), "archived_at": "1970-01-01T00:00:00Z",
            "permissions": {"admin": True, "push": True, "pull": True}, "has_code": True,
            "has_issues": True, "internal_tracker": {
                "enable_time_tracker": True, "allow_only_contributors_to_track_time": True,
                "enable_issue_dependencies": True},
            "external_tracker": None, "has_wiki": False, "external_wiki": None,
            "has_pull_requests": True, "has_projects": False, "projects_mode": "all",
            "has_releases": False, "has_packages": False, "has_actions": False,
            "ignore_whitespace_conflicts": False, "allow_merge_commits": True, "allow_rebase": True,
            "allow_rebase_explicit": True, "allow_squash_merge": True,
            "allow_fast_forward_only_merge": True, "allow_rebase_update": True,
            "allow_manual_merge": False, "autodetect_manual_merge": False,
            "default_delete_branch_after_merge": False, "default_merge_style": "merge",
            "default_allow_maintainer_edit": False, "default_target_branch": r.default_branch,
            "avatar_url": "", "internal": False, "mirror_interval": "",
            "object_format_name": "sha1", "mirror_updated": "0001-01-01T00:00:00Z",
            "repo_transfer": None, "topics": [], "licenses": [],
            "branch_count": len(self._branches(r)),
        }

    def _label_json(self, r: _Repo, lb: _Label) -> dict:
        return {"id": lb.id, "name": lb.name, "exclusive": False, "is_archived": False,
                "color": lb.color, "description": lb.description,
                "url": self._api_url("repos", r.full_name, "labels", lb.id)}

    def _html(self, r: _Repo, i: _Issue) -> str:
        return f"{self.url}/{r.full_name}/{'pulls' if i.pull else 'issues'}/{i.number}"

    def _issue_json(self, r: _Repo, i: _Issue) -> dict:
        assignees = [self._user_json(self._accounts[a]) for a in i.assignees]
        pull = None
        if i.pull:
            pull = {"merged": bool(i.pull.merged_at), "merged_at": _ts(i.pull.merged_at),
                    "draft": False, "html_url": self._html(r, i)}
        return {
            "id": i.id, "url": self._api_url("repos", r.full_name, "issues", i.number),
            "html_url": self._html(r, i), "number": i.number,
            "user": self._user_json(self._accounts[i.author]), "original_author": "",
            "original_author_id": 0, "title": i.title, "body": i.body, "ref": "", "assets": [],
            "labels": [self._label_json(r, r.labels[x]) for x in i.labels if x in r.labels],
            "milestone": None, "assignee": assignees[0] if assignees else None,
            "assignees": assignees, "state": i.state, "is_locked": False,
            "comments": len(i.comments), "created_at": _ts(i.created_at),
            "updated_at": _ts(i.updated_at), "closed_at": _ts(i.closed_at), "due_date": None,
            "time_estimate": 0, "pull_request": pull, "pin_order": 0, "content_version": 0,
            "repository": {"id": r.id, "name": r.name, "owner": r.owner, "full_name": r.full_name},
        }

    def _pull_json(self, r: _Repo, i: _Issue) -> dict:
        p = i.pull
        assert p is not None
        base = {k: v for k, v in self._issue_json(r, i).items()
                if k in ("id", "number", "user", "title", "body", "labels", "milestone", "assignee",
                         "assignees", "state", "is_locked", "comments", "html_url", "created_at",
                         "updated_at", "closed_at", "due_date", "pin_order", "content_version")}
        repo = self._repo_json(r)

        def branch(ref: str, sha: str) -> dict:
            return {"label": ref, "ref": ref, "sha": sha, "repo_id": r.id, "repo": repo}

        html = self._html(r, i)
        return {
            **base, "url": html, "diff_url": f"{html}.diff", "patch_url": f"{html}.patch",
            "draft": False, "requested_reviewers": [], "requested_reviewers_teams": [],
            "review_comments": 0, "additions": 0, "deletions": 0, "changed_files": 0,
            "mergeable": i.state == "open", "merged": bool(p.merged_at),
            "merged_at": _ts(p.merged_at),
            # Gitea sends null until merged; the spec cannot say so, so "" stands in for it
            "merge_commit_sha": p.merge_sha,
            "merged_by": self._user_json(self._accounts[p.merged_by]) if p.merged_by else None,
            "allow_maintainer_edit": False, "base": branch(p.base, self._sha(r, p.base) or ""),
            "head": branch(p.head, self._sha(r, p.head) or p.head_sha),
            "merge_base": p.merge_base,
        }

    def _comment_json(self, r: _Repo, i: _Issue, c: _Comment) -> dict:
        html = self._html(r, i)
        return {"id": c.id, "html_url": f"{html}#issuecomment-{c.id}",
                "pull_request_url": html if i.pull else "", "issue_url": "" if i.pull else html,
                "user": self._user_json(self._accounts[c.author]), "original_author": "",
                "original_author_id": 0, "body": c.body, "assets": [],
                "created_at": _ts(c.created_at), "updated_at": _ts(c.updated_at)}

    def _branches(self, r: _Repo) -> dict[str, str]:
        if r.git:
            return self.git.branches(r.owner, r.name)
        names = {r.default_branch} | {i.pull.head for i in r.issues.values() if i.pull}
        return {n: self._sha(r, n) or "" for n in sorted(names)}

    def _branch_json(self, r: _Repo, name: str, sha: str) -> dict:
        info = self.git.commit_info(r.owner, r.name, sha) if r.git else {}
        author = {"name": info.get("author_name", "Gitea Emulator"),
                  "email": info.get("author_email", "emulator@gitea.invalid"), "username": ""}
        return {
            "name": name, "protected": False, "required_approvals": 0,
            "enable_status_check": False, "status_check_contexts": [], "user_can_push": True,
            "user_can_merge": True, "effective_branch_protection_name": "",
            "commit": {
                "id": sha, "message": info.get("message", ""), "url": f"{self.url}/{r.full_name}/commit/{sha}",
                "author": author, "committer": author,
                "verification": {"verified": False, "reason": "gpg.error.not_signed_commit",
                                 "signature": "", "signer": None, "payload": ""},
                "timestamp": info.get("date") or _ts(r.created_at),
                "added": [], "removed": [], "modified": [],
            },
        }

    # -- paging --------------------------------------------------------------------------------

    def _paged(self, call: _Call, items: list[Any]) -> tuple[int, list, dict[str, str]]:
        """One page of `items` the way Gitea pages: limit capped, Link and X-Total-Count set."""
        page = max(1, _int(call.q.get("page"), 1))
        limit = _int(call.q.get("limit"), 0)
        limit = self.default_page if limit <= 0 else min(limit, self.page_cap)
        total = len(items)
        pages = max(1, -(-total // limit))
        headers = {"X-Total-Count": str(total),
                   "Access-Control-Expose-Headers": "X-Total-Count, Link"}

        def link(p: int, rel: str) -> str:
            query = urlencode({**call.multi, "page": [str(p)]}, doseq=True)
            return f'<{self.url}{call.path}?{query}>; rel="{rel}"'

        links = []
        if page < pages:
            links += [link(page + 1, "next"), link(pages, "last")]
        if page > 1:
            links += [link(1, "first"), link(page - 1, "prev")]
        if links:
            headers["Link"] = ",".join(links)
        return 200, items[(page - 1) * limit: page * limit], headers

    def _repo_or_404(self, owner: str, repo: str) -> _Repo:
        r = self._repos.get(f"{owner}/{repo}")
        if r is None:
            raise HTTPError(404, NOT_FOUND)
        return r

    def _issue_or_404(self, owner: str, repo: str, index: str, pull: bool | None = None) -> tuple[_Repo, _Issue]:
        r = self._repo_or_404(owner, repo)
        i = r.issues.get(_int(index, 0))
        if i is None or (pull is not None and bool(i.pull) != pull):
            raise HTTPError(404, NOT_FOUND)
        return r, i

    # -- endpoints -------------------------------------------------------------------------

    @route("GET", "/user")
    def get_user(self, call: _Call) -> tuple:
        return 200, self._user_json(call.user)

    @route("GET", "/settings/api")
    def get_settings(self, call: _Call) -> tuple:
        return 200, {"max_response_items": self.page_cap, "default_paging_num": self.default_page,
                     "default_git_trees_per_page": 1000, "default_max_blob_size": 10485760,
                     "default_max_response_size": 104857600}

    @route("GET", "/repos/{owner}/{repo}")
    def get_repo(self, call: _Call, owner: str, repo: str) -> tuple:
        return 200, self._repo_json(self._repo_or_404(owner, repo))

    @route("GET", "/orgs/{org}/repos")
    def org_repos(self, call: _Call, org: str) -> tuple:
        account = self._accounts.get(org)
        if account is None or not account.is_org:
            raise HTTPError(404, NOT_FOUND)
        repos = sorted((r for r in self._repos.values() if r.owner == org), key=lambda r: r.name)
        status, page, headers = self._paged(call, repos)
        return status, [self._repo_json(r) for r in page], headers

    @route("GET", "/user/repos")
    def user_repos(self, call: _Call) -> tuple:
        # the bot may push everywhere here: its own repos and every org's
        repos = sorted((r for r in self._repos.values()
                        if r.owner == call.user.login or self._accounts[r.owner].is_org),
                       key=lambda r: r.id)
        status, page, headers = self._paged(call, repos)
        return status, [self._repo_json(r) for r in page], headers

    @route("GET", "/repos/{owner}/{repo}/issues")
    def list_issues(self, call: _Call, owner: str, repo: str) -> tuple:
        r = self._repo_or_404(owner, repo)
        state, kind, q = call.q.get("state", "open"), call.q.get("type", ""), call.q
        wanted = {lb.id for name in q.get("labels", "").split(",") if name
                  for lb in r.labels.values() if lb.name == name}
        since, before = q.get("since"), q.get("before")
        items = [
            i for i in r.issues.values()
            if (state == "all" or i.state == state)
            and (kind != "issues" or not i.pull) and (kind != "pulls" or i.pull)
            # any-of; names that match no label are discarded, as Gitea does
            and (not wanted or wanted & set(i.labels))
            and (not q.get("created_by") or i.author == q["created_by"])
            and (not q.get("assigned_by") or q["assigned_by"] in i.assignees)
            and (not q.get("q") or q["q"].lower() in (i.title + i.body).lower())
            and (not since or i.updated_at >= _when(since, i.updated_at))
            and (not before or i.updated_at <= _when(before, i.updated_at))
        ]
        items.sort(key=lambda i: (i.created_at, i.number), reverse=True)  # newest first
        status, page, headers = self._paged(call, items)
        return status, [self._issue_json(r, i) for i in page], headers

    @route("POST", "/repos/{owner}/{repo}/issues")
    def create_issue(self, call: _Call, owner: str, repo: str) -> tuple:
        r = self._repo_or_404(owner, repo)
        body = call.body or {}
        assignees = self._known_users(body.get("assignees") or [])
        issue = self._new_issue(r, body["title"], body.get("body", ""), call.user.login, (),
                                assignees, None, None)
        issue.labels = [x for x in body.get("labels") or [] if x in r.labels]
        if body.get("closed"):
            issue.state, issue.closed_at = "closed", issue.created_at
        return 201, self._issue_json(r, issue)

    @route("GET", "/repos/{owner}/{repo}/issues/{index}")
    def get_issue(self, call: _Call, owner: str, repo: str, index: str) -> tuple:
        r, i = self._issue_or_404(owner, repo, index)
        return 200, self._issue_json(r, i)

    @route("PATCH", "/repos/{owner}/{repo}/issues/{index}")
    def edit_issue(self, call: _Call, owner: str, repo: str, index: str) -> tuple:
        r, i = self._issue_or_404(owner, repo, index)
        body = call.body or {}
        if "state" in body:
            if body["state"] not in ("open", "closed"):
                raise HTTPError(422, f"unknown state {body['state']!r}")
            if i.pull and i.pull.merged_at and body["state"] != i.state:
                raise HTTPError(412, "cannot change state of this pull request, it was already merged")
            if body["state"] != i.state:
                i.state = body["state"]
                i.closed_at = self.clock() if i.state == "closed" else None
        if body.get("title"):
            i.title = body["title"]
        if "body" in body:
            i.body = body["body"]
        if "assignees" in body:
            i.assignees = self._known_users(body["assignees"] or [])
        i.updated_at = self.clock()
        return 201, self._issue_json(r, i)  # Gitea answers this PATCH with 201

    def _known_users(self, logins: list[str]) -> list[str]:
        for login in logins:
            if login not in self._accounts or self._accounts[login].is_org:
                raise HTTPError(422, f"Assignee does not exist: [name: {login}]")
        return list(dict.fromkeys(logins))

    @route("GET", "/repos/{owner}/{repo}/issues/{index}/comments")
    def list_comments(self, call: _Call, owner: str, repo: str, index: str) -> tuple:
        r, i = self._issue_or_404(owner, repo, index)
        return 200, [self._comment_json(r, i, c) for c in i.comments]  # all of them, unpaged

    @route("POST", "/repos/{owner}/{repo}/issues/{index}/comments")
    def create_comment(self, call: _Call, owner: str, repo: str, index: str) -> tuple:
        r, i = self._issue_or_404(owner, repo, index)
        now = self.clock()
        comment = _Comment(next(self._ids), call.body["body"], call.user.login, now, now)
        i.comments.append(comment)
        i.updated_at = now
        return 201, self._comment_json(r, i, comment)

    @route("GET", "/repos/{owner}/{repo}/labels")
    def list_labels(self, call: _Call, owner: str, repo: str) -> tuple:
        r = self._repo_or_404(owner, repo)
        status, page, headers = self._paged(call, sorted(r.labels.values(), key=lambda lb: lb.name))
        return status, [self._label_json(r, lb) for lb in page], headers

    @route("POST", "/repos/{owner}/{repo}/labels")
    def create_label(self, call: _Call, owner: str, repo: str) -> tuple:
        r = self._repo_or_404(owner, repo)
        color = call.body["color"]
        if not re.fullmatch(r"#?[0-9a-fA-F]{6}", color):
            raise HTTPError(422, "Color: invalid color code")
        label_id = self.add_label(r.full_name, call.body["name"], color,
                                  call.body.get("description", ""))
        return 201, self._label_json(r, r.labels[label_id])

    @route("POST", "/repos/{owner}/{repo}/issues/{index}/labels")
    def add_issue_labels(self, call: _Call, owner: str, repo: str, index: str) -> tuple:
        r, i = self._issue_or_404(owner, repo, index)
        for ref in (call.body or {}).get("labels") or []:
            # ids or names; unknown ones are ignored, as Gitea does
            label = r.labels.get(ref) if isinstance(ref, int) else next(
                (lb for lb in r.labels.values() if lb.name == ref), None)
            if label and label.id not in i.labels:
                i.labels.append(label.id)
        i.updated_at = self.clock()
        return 200, [self._label_json(r, r.labels[x]) for x in i.labels]

    @route("DELETE", "/repos/{owner}/{repo}/issues/{index}/labels/{id}")
    def remove_issue_label(self, call: _Call, owner: str, repo: str, index: str, id: str) -> tuple:
        r, i = self._issue_or_404(owner, repo, index)
        label_id = _int(id, 0)
        if label_id not in r.labels:
            raise HTTPError(422, f"label does not exist [label_id: {label_id}]")
        if label_id in i.labels:
            i.labels.remove(label_id)
            i.updated_at = self.clock()
        return 204, None

    @route("GET", "/repos/{owner}/{repo}/pulls")
    def list_pulls(self, call: _Call, owner: str, repo: str) -> tuple:
        r = self._repo_or_404(owner, repo)
        state = call.q.get("state", "open")
        items = [i for i in r.issues.values() if i.pull and (state == "all" or i.state == state)]
        items.sort(key=lambda i: i.number, reverse=True)
        status, page, headers = self._paged(call, items)
        return status, [self._pull_json(r, i) for i in page], headers

    @route("GET", "/repos/{owner}/{repo}/pulls/{index}")
    def get_pull(self, call: _Call, owner: str, repo: str, index: str) -> tuple:
        r, i = self._issue_or_404(owner, repo, index, pull=True)
        return 200, self._pull_json(r, i)

    @route("POST", "/repos/{owner}/{repo}/pulls")
    def create_pull(self, call: _Call, owner: str, repo: str) -> tuple:
        r = self._repo_or_404(owner, repo)
        body = call.body or {}
        head = (body.get("head") or "").removeprefix(f"{r.owner}:")
        base = body.get("base") or r.default_branch
        if head == base:
            raise HTTPError(422, "Invalid PullRequest: There are no changes between the head and the base")
        if r.git and not (self.git.rev(r.owner, r.name, head) and self.git.rev(r.owner, r.name, base)):
            # Gitea answers a head or base it cannot resolve with a bare 404
            missing = head if not self.git.rev(r.owner, r.name, head) else base
            raise HTTPError(404, NOT_FOUND, [f"branch {missing!r} does not exist"])
        for other in r.issues.values():
            p = other.pull
            if p and other.state == "open" and not p.merged_at and (p.head, p.base) == (head, base):
                raise HTTPError(409, f"pull request already exists for these targets [id: {other.id}, "
                                     f"issue_id: {other.number}, head_repo_id: {r.id}, base_repo_id: "
                                     f"{r.id}, head_branch: {head}, base_branch: {base}]")
        issue = self._new_issue(r, body.get("title") or head, body.get("body", ""),
                                call.user.login, (), self._known_users(body.get("assignees") or []),
                                None, None)
        issue.labels = [x for x in body.get("labels") or [] if x in r.labels]
        issue.pull = self._pull_for(r, head, base)
        return 201, self._pull_json(r, issue)

    @route("POST", "/repos/{owner}/{repo}/pulls/{index}/merge")
    def merge_pull(self, call: _Call, owner: str, repo: str, index: str) -> tuple:
        r, i = self._issue_or_404(owner, repo, index, pull=True)
        p = i.pull
        assert p is not None
        if i.state == "closed" and not p.merged_at:
            raise HTTPError(404, NOT_FOUND)
        if p.merged_at:
            raise HTTPError(405, "")
        body = call.body or {}
        if r.git:
            title = body.get("merge_title_field") or f"Merge pull request '{i.title}' (#{i.number})"
            try:
                p.merge_sha = self.git.merge(r.owner, r.name, p.head, p.base, title)
            except MergeConflict:
                raise HTTPError(409, "merge failed because of conflict") from None
            except GitError as e:
                raise HTTPError(405, str(e)) from None
            p.head_sha = self.git.rev(r.owner, r.name, p.head) or p.head_sha
            if body.get("delete_branch_after_merge"):
                self.git.delete_branch(r.owner, r.name, p.head)
        else:
            p.merge_sha = hashlib.sha1(f"{r.full_name}#{i.number}:merge".encode()).hexdigest()
        now = self.clock()
        p.merged_at, p.merged_by = now, call.user.login
        i.state, i.closed_at, i.updated_at = "closed", now, now
        return 200, None

    @route("GET", "/repos/{owner}/{repo}/pulls/{index}/reviews")
    def list_reviews(self, call: _Call, owner: str, repo: str, index: str) -> tuple:
        r, i = self._issue_or_404(owner, repo, index, pull=True)
        assert i.pull is not None
        html = self._html(r, i)
        reviews = [{
            "id": v["id"], "user": self._user_json(self._accounts[v["user"]]), "team": None,
            "state": v["state"], "body": v["body"], "commit_id": v["sha"], "stale": False,
            "official": True, "dismissed": False, "comments_count": 0,
            "submitted_at": _ts(v["at"]), "updated_at": _ts(v["at"]),
            "html_url": f"{html}#issuecomment-{v['id']}", "pull_request_url": html,
        } for v in i.pull.reviews]
        status, page, headers = self._paged(call, reviews)
        return status, page, headers

    @route("GET", "/repos/{owner}/{repo}/commits/{ref}/status")
    def combined_status(self, call: _Call, owner: str, repo: str, ref: str) -> tuple:
        r = self._repo_or_404(owner, repo)
        sha = self._sha(r, ref) or ref
        latest: dict[str, dict] = {}
        for s in r.statuses:
            if s["sha"] == sha:
                latest[s["context"]] = s  # the newest status per context counts
        states = {s["status"] for s in latest.values()}
        # GitHub's rule, which Gitea follows: any error/failure fails; else pending wins; no
        # statuses is "pending" here (real Gitea sends an empty object with state "", which the
        # spec's enum does not allow)
        combined = ("failure" if states & {"error", "failure"} else "pending"
                    if not states or "pending" in states else "warning"
                    if "warning" in states else "success")
        statuses = [{
            "id": s["id"], "status": s["status"], "target_url": s["target_url"],
            "description": s["description"], "context": s["context"],
            "url": self._api_url("repos", r.full_name, "statuses", sha),
            "creator": self._user_json(self._user(None)), "created_at": _ts(s["at"]),
            "updated_at": _ts(s["at"]),
        } for s in latest.values()]
        return 200, {"state": combined, "sha": sha, "total_count": len(statuses),
                     "statuses": statuses, "repository": self._repo_json(r),
                     "commit_url": self._api_url("repos", r.full_name, "commits", sha),
                     "url": self._api_url("repos", r.full_name, "commits", sha, "status")}

    @route("GET", "/repos/{owner}/{repo}/branches")
    def list_branches(self, call: _Call, owner: str, repo: str) -> tuple:
        r = self._repo_or_404(owner, repo)
        status, page, headers = self._paged(call, sorted(self._branches(r).items()))
        return status, [self._branch_json(r, name, sha) for name, sha in page], headers


@dataclass(frozen=True)
class _Call:
    user: _Account
    q: dict[str, str]  # last value of each query parameter
    multi: dict[str, list[str]]  # every value, for rebuilding Link URLs
    body: Any
    path: str  # /api/v1/...


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    length = _int(h.headers.get("Content-Length"), 0)
    return h.rfile.read(length) if length > 0 else b""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so request counts match a pooled client's
    server: _Server

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes; without this, Nagle holds the second one
        # until the client's delayed ACK, adding ~40 ms to every response
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self.server.emu._dispatch(self)

    do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass  # requests are recorded on the emulator instead


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], emu: GiteaEmulator) -> None:
        self.emu = emu
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:  # type: ignore[override]
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Cut kept-alive connections, so "down" also means down for pooled clients."""
        with self._open_lock:
            for sock in list(self._open):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# -- demo backlog ------------------------------------------------------------------------------


def seed_demo(emu: GiteaEmulator, now: datetime | None = None, *, git: bool = True) -> list[str]:
    """A small, varied backlog in two repos (priorities, bugs, epics, blocked, claimed, deps,
    one issue referenced by an open PR). Returns the repo names."""
    now = now or emu.clock()

    def ago(days: float) -> datetime:
        return now - timedelta(days=days)

    colors = {"P0": "b60205", "P1": "d93f0b", "P2": "fbca04", "P3": "0e8a16", "bug": "ee0701",
              "epic": "5319e7", "study": "c5def5", "blocked": "000000",
              "dispatch:claimed": "1d76db", "docs": "0075ca", "refactor": "bfd4f2"}
    for login in ("alice", "bob"):
        emu.add_user(login)
    backlog = {
        "acme/webapp": [
            ("Login page crashes on empty password", ["P0", "bug"], "", 2, 1, {}),
            ("Add rate limiting to the public API", ["P1"], "Needed before launch.", 10, 9, {}),
            ("Epic: new billing system", ["epic"], "Tracks #4 and #5.", 40, 3, {}),
            ("Study: evaluate Postgres 17 upgrade", ["study"], "", 20, 20, {}),
            ("Refactor session storage", ["P2", "refactor"], "Depends on #6", 8, 8, {}),
            ("Move config loading into one module", ["P2"], "", 12, 12, {}),
            ("Flaky test in checkout flow", ["P1", "bug", "blocked"], "Waiting on vendor.", 6, 4, {}),
            ("Add dark mode", ["P3"], "", 30, 25, {"assignees": ["bob"]}),
            ("Update dependencies", ["P3", "dispatch:claimed"], "", 5, 0.1, {}),
            ("Fix typo in README", ["P3", "docs"], "'recieve' -> 'receive'", 3, 3, {}),
            ("Slow dashboard query", ["P1"], "p95 is 4s on the dashboard.", 45, 30, {}),
            ("Crash when uploading an empty file", ["P2", "bug"], "", 60, 50, {"state": "closed"}),
        ],
        "acme/infra": [
            ("Disk usage alert on runner-2", ["P0"], "/var is at 93%.", 1, 1, {}),
            ("Rotate TLS certificates", ["P1"], "Depends on #1", 7, 7, {}),
            ("Document backup restore procedure", ["P2", "docs"], "", 15, 15, {}),
            ("Upgrade CI runners", ["P2"], "", 25, 2, {}),
        ],
    }
    for repo, issues in backlog.items():
        emu.add_repo(repo, git=git, description=f"demo repository {repo}")
        for name, color in colors.items():
            emu.add_label(repo, name, color)
        for title, labels, body, created, updated, extra in issues:
            emu.add_issue(repo, title, body, labels=labels, created_at=ago(created),
                          updated_at=ago(updated), author="alice", **extra)
    emu.add_comment("acme/webapp", 9, "Claimed by kimi.", author="alice", created_at=ago(0.1))
    emu.add_pull("acme/webapp", "Fix typo in README", "Fixes #10", head="fix/10-readme-typo",
                 author="bob", created_at=ago(1))
    return list(backlog)


def main(argv: list[str] | None = None) -> None:
    import secrets

    parser = argparse.ArgumentParser(description="Run the Gitea emulator on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--seed", choices=["none", "demo"], default="none")
    parser.add_argument("--root", type=Path, help="where the bare repos live (default: a temp dir)")
    parser.add_argument("--user", default="dispatch-bot")
    args = parser.parse_args(argv)
    emu = GiteaEmulator(args.root, port=args.port, validate=True)
    token_file = emu.root / "token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.touch(mode=0o600)
    token_file.write_text(secrets.token_hex(20) + "\n", encoding="utf-8")
    emu.add_user(args.user, token_file.read_text(encoding="utf-8").strip())
    if args.seed == "demo":
        seed_demo(emu)
    emu.start()
    print(f"Gitea emulator at {emu.url} (user {args.user})", flush=True)
    print(f"token file: {token_file}", flush=True)
    print("Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
        for v in emu.violations:
            print(f"spec violation: {v}")


if __name__ == "__main__":
    main()
