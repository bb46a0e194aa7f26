"""The Gitea emulator: its spec validator catches wrong bodies, every endpoint it serves conforms
to the spec, it behaves like Gitea where clients can tell, and its faults and git hosting work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from dispatch.config import load_config
from tests.emulator.fixtures import BOT, write_config
from tests.emulator.gitea import _ROUTES, API, GiteaEmulator, seed_demo
from tests.emulator.spec import SPEC_PATH, Spec

REPO = "acme/webapp"
T0 = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def spec() -> Spec:
    return Spec.load()


@pytest.fixture
def api(gitea: GiteaEmulator, canary: str) -> requests.Session:
    """A session authenticated as dispatch-bot; call it with paths under /api/v1."""
    session = requests.Session()
    session.headers["Authorization"] = f"token {canary}"
    return session


def url(gitea: GiteaEmulator, path: str) -> str:
    return gitea.url + API + path


# -- the spec and the validator -----------------------------------------------------------------


def test_vendored_spec_is_the_published_one() -> None:
    import hashlib

    digest = hashlib.sha256(SPEC_PATH.read_bytes()).hexdigest()
    assert digest == "f10ecf3934a5b603e55a531dcf81f1d8e84fff702d116ea4791d30f70c5f0d83"
    assert digest in (SPEC_PATH.parent / "SPEC.md").read_text()


def test_paths_map_to_templates_with_literals_winning(spec: Spec) -> None:
    assert spec.template("/api/v1/repos/a/b/issues/7") == "/repos/{owner}/{repo}/issues/{index}"
    assert spec.template("/repos/a/b/issues/pinned") == "/repos/{owner}/{repo}/issues/pinned"
    assert spec.template("/api/v1/repos/a/b/issues/7/labels/3?x=1") == (
        "/repos/{owner}/{repo}/issues/{index}/labels/{id}")
    assert spec.template("/api/v1/nothing/here") is None


GOOD_LABEL = {"id": 1, "name": "bug", "color": "ee0701", "description": "", "exclusive": False,
              "is_archived": False, "url": "http://x/api/v1/repos/a/b/labels/1"}


@pytest.mark.parametrize(("body", "complaint"), [
    ({"title": None}, "title: None is not of type 'string'"),
    ({"number": "7"}, "number: '7' is not of type 'integer'"),
    ({"state": "merged"}, "state: 'merged' is not one of"),
    ({"labels": [None]}, "labels/0: None is not of type 'object'"),
    ({"labels": None}, "labels: None is not of type 'array'"),
    ({"labels": [{**GOOD_LABEL, "id": "1"}]}, "labels/0/id: '1' is not of type 'integer'"),
    ({"created_at": "yesterday"}, "created_at: 'yesterday' is not a 'date-time'"),
    ({"user": {"login": 5}}, "user/login: 5 is not of type 'string'"),
])
def test_validator_rejects_wrong_issue_bodies(spec: Spec, body: dict, complaint: str) -> None:
    problems = spec.validate("GET", "/api/v1/repos/a/b/issues/1", 200, body)
    assert any(complaint in p for p in problems), problems


def test_null_is_allowed_only_for_object_refs_and_times(spec: Spec) -> None:
    ok = {"milestone": None, "assignee": None, "pull_request": None, "closed_at": None,
          "due_date": None, "repository": None}
    assert spec.validate("GET", "/api/v1/repos/a/b/issues/1", 200, ok) == []
    for field in ("title", "body", "number", "assignees", "is_locked", "html_url"):
        assert spec.validate("GET", "/api/v1/repos/a/b/issues/1", 200, {field: None}), field


def test_complete_mode_requires_every_declared_property(spec: Spec) -> None:
    partial = dict(GOOD_LABEL)
    del partial["color"]
    path = "/api/v1/repos/a/b/labels"
    assert spec.validate("GET", path, 200, [GOOD_LABEL], complete=True) == []
    assert spec.validate("GET", path, 200, [partial]) == []  # the spec itself requires nothing
    assert spec.validate("GET", path, 200, [partial], complete=True) == [
        "0: 'color' is a required property"]


def test_validator_checks_status_errors_and_empty_bodies(spec: Spec) -> None:
    labels = "/api/v1/repos/a/b/issues/1/labels/2"
    assert spec.validate("DELETE", labels, 204, None) == []
    assert spec.validate("DELETE", labels, 204, {"ok": True}) == [
        "the spec declares no body for this response"]
    assert "not a documented response" in spec.validate("GET", "/api/v1/user", 201, {})[0]
    assert "has no PUT" in spec.validate("PUT", "/api/v1/user", 200, {})[0]
    assert spec.validate("GET", "/api/v1/user", 404, {"message": "x", "url": "u", "errors": []}) == []
    assert spec.validate("GET", "/api/v1/user", 404, {"url": "u"}) == [
        "(body): 'message' is a required property"]
    assert spec.validate_request("POST", "/api/v1/repos/a/b/labels", {"name": "x"}) == [
        "(body): 'color' is a required property"]


def test_emulator_records_a_violation_when_its_own_shape_is_wrong(tmp_path: Path, canary: str) -> None:
    class Broken(GiteaEmulator):
        def _label_json(self, r, lb):  # type: ignore[no-untyped-def]
            return {**super()._label_json(r, lb), "color": None}

    with Broken(tmp_path) as emu:
        emu.add_user(BOT, canary)
        emu.add_repo(REPO)
        emu.add_label(REPO, "bug")
        resp = requests.get(emu.url + API + f"/repos/{REPO}/labels",
                            headers={"Authorization": f"token {canary}"}, timeout=5)
    assert resp.status_code == 200
    assert len(emu.violations) == 1
    assert "color: None is not of type 'string'" in str(emu.violations[0])


# -- every endpoint, spec-checked ---------------------------------------------------------------


def test_every_endpoint_answers_within_the_spec(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.add_repo(REPO, git=True)
    gitea.add_repo(f"{BOT}/own")
    bug = gitea.add_label(REPO, "bug")
    n = gitea.add_issue(REPO, "Crash", "boom", labels=["bug"], assignees=["alice"])
    gitea.add_comment(REPO, n, "seen it", author="alice")
    pr = gitea.add_pull(REPO, "Fix crash", f"Fixes #{n}", head="fix/crash")
    gitea.add_review(REPO, pr, "APPROVED", author="alice")
    gitea.add_status(REPO, "fix/crash", "success")
    calls = [
        ("GET", "/user", None, 200), ("GET", "/settings/api", None, 200),
        ("GET", f"/repos/{REPO}", None, 200), ("GET", "/orgs/acme/repos", None, 200),
        ("GET", "/user/repos", None, 200), ("GET", f"/repos/{REPO}/issues?state=all", None, 200),
        ("POST", f"/repos/{REPO}/issues", {"title": "New", "body": "b"}, 201),
        ("GET", f"/repos/{REPO}/issues/{n}", None, 200),
        ("PATCH", f"/repos/{REPO}/issues/{n}", {"title": "Crash!", "assignees": [BOT]}, 201),
        ("GET", f"/repos/{REPO}/issues/{n}/comments", None, 200),
        ("POST", f"/repos/{REPO}/issues/{n}/comments", {"body": "on it"}, 201),
        ("GET", f"/repos/{REPO}/labels", None, 200),
        ("POST", f"/repos/{REPO}/labels", {"name": "P1", "color": "#d93f0b"}, 201),
        ("POST", f"/repos/{REPO}/issues/{n}/labels", {"labels": ["P1"]}, 200),
        ("DELETE", f"/repos/{REPO}/issues/{n}/labels/{bug}", None, 204),
        ("GET", f"/repos/{REPO}/pulls?state=all", None, 200),
        ("GET", f"/repos/{REPO}/pulls/{pr}", None, 200),
        ("GET", f"/repos/{REPO}/pulls/{pr}/reviews", None, 200),
        ("GET", f"/repos/{REPO}/commits/fix%2Fcrash/status", None, 200),
        ("GET", f"/repos/{REPO}/branches", None, 200),
        ("POST", f"/repos/{REPO}/pulls/{pr}/merge", {"do": "merge"}, 200),
    ]
    gitea.git_commit(REPO, "feature", {"f.txt": "x"}, "feature work")
    calls.append(("POST", f"/repos/{REPO}/pulls", {"head": "feature", "base": "main", "title": "F"}, 201))
    for method, path, body, status in calls:
        resp = api.request(method, url(gitea, path), json=body, timeout=5)
        assert resp.status_code == status, (method, path, resp.text)
    served = {(q.method, Spec.load().template(q.path)) for q in gitea.requests if q.status < 300}
    registered = {(method, template) for method, template, _, _ in _ROUTES}
    assert registered <= served, registered - served
    assert gitea.violations == []


def test_issue_json_uses_null_for_absent_pointers(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.add_repo(REPO)
    n = gitea.add_issue(REPO, "Plain", created_at=T0)
    d = api.get(url(gitea, f"/repos/{REPO}/issues/{n}"), timeout=5).json()
    assert (d["milestone"], d["assignee"], d["pull_request"], d["closed_at"]) == (None,) * 4
    assert d["created_at"] == "2025-01-01T00:00:00Z" and d["updated_at"] == "2025-01-01T00:00:00Z"
    assert d["repository"]["full_name"] == REPO


def test_repo_json_points_clone_url_at_the_git_server(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.add_repo("acme/infra", default_branch="trunk")
    d = api.get(url(gitea, "/repos/acme/infra"), timeout=5).json()
    assert d["clone_url"] == f"{gitea.url}/acme/infra.git"
    assert d["default_branch"] == "trunk" and d["owner"]["login"] == "acme"


# -- Gitea behaviour clients can observe ------------------------------------------------------


def test_pages_are_capped_and_linked_like_gitea(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.add_repo(REPO)
    for i in range(120):
        gitea.add_issue(REPO, f"issue {i}")
    default = api.get(url(gitea, f"/repos/{REPO}/issues"), timeout=5)
    assert len(default.json()) == 30  # DEFAULT_PAGING_NUM when no limit is asked
    capped = api.get(url(gitea, f"/repos/{REPO}/issues"), params={"limit": 500, "page": 2}, timeout=5)
    assert len(capped.json()) == 50 and capped.headers["X-Total-Count"] == "120"
    links = dict(reversed(part.split(">; rel=")) for part in capped.headers["Link"].split(","))
    assert set(links) == {'"next"', '"last"', '"first"', '"prev"'}
    assert links['"next"'].endswith("page=3") and "limit=500" in links['"next"']
    assert links['"last"'].startswith(f"<{gitea.url}/api/v1/repos/{REPO}/issues?")
    last = api.get(url(gitea, f"/repos/{REPO}/issues"), params={"limit": 50, "page": 3}, timeout=5)
    assert len(last.json()) == 20 and '"next"' not in last.headers["Link"]
    assert api.get(url(gitea, "/settings/api"), timeout=5).json()["max_response_items"] == 50


def test_issue_filters(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.add_repo(REPO)
    a = gitea.add_issue(REPO, "a", labels=["bug"])
    b = gitea.add_issue(REPO, "b", labels=["P1"])
    c = gitea.add_issue(REPO, "c", labels=["bug", "P1"], state="closed")
    p = gitea.add_pull(REPO, "pr", head="x")
    assert [a, b, c, p] == [1, 2, 3, 4]  # issues and pulls share one sequence

    def numbers(**params: str) -> list[int]:
        resp = api.get(url(gitea, f"/repos/{REPO}/issues"), params=params, timeout=5)
        return sorted(d["number"] for d in resp.json())

    assert numbers() == [a, b, p]
    assert numbers(type="issues") == [a, b]
    assert numbers(type="pulls", state="all") == [p]
    assert numbers(state="closed") == [c]
    assert numbers(state="all", labels="bug,P1") == [a, b, c]  # any of
    assert numbers(labels="bug,nonexistent") == [a]


def test_edit_issue_answers_201_and_tracks_closing(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.clock = lambda: T0
    gitea.add_repo(REPO)
    n = gitea.add_issue(REPO, "x")
    resp = api.patch(url(gitea, f"/repos/{REPO}/issues/{n}"), json={"state": "closed"}, timeout=5)
    assert resp.status_code == 201 and resp.json()["closed_at"] == "2025-01-01T00:00:00Z"
    resp = api.patch(url(gitea, f"/repos/{REPO}/issues/{n}"), json={"state": "open"}, timeout=5)
    assert resp.json()["state"] == "open" and resp.json()["closed_at"] is None
    resp = api.patch(url(gitea, f"/repos/{REPO}/issues/{n}"), json={"assignees": ["ghost"]}, timeout=5)
    assert resp.status_code == 422


def test_comments_are_not_paginated(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.add_repo(REPO)
    n = gitea.add_issue(REPO, "chatty")
    for i in range(70):
        gitea.add_comment(REPO, n, f"comment {i}")
    resp = api.get(url(gitea, f"/repos/{REPO}/issues/{n}/comments"), timeout=5)
    assert len(resp.json()) == 70 and "Link" not in resp.headers


def test_issue_labels_by_id_and_name(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.add_repo(REPO)
    bug = gitea.add_label(REPO, "bug")
    p1 = gitea.add_label(REPO, "P1")
    n = gitea.add_issue(REPO, "x")
    resp = api.post(url(gitea, f"/repos/{REPO}/issues/{n}/labels"),
                    json={"labels": [bug, "P1", "missing"]}, timeout=5)
    assert sorted(lb["name"] for lb in resp.json()) == ["P1", "bug"]
    assert api.delete(url(gitea, f"/repos/{REPO}/issues/{n}/labels/{p1}"), timeout=5).status_code == 204
    assert [lb["name"] for lb in gitea.issue(REPO, n)["labels"]] == ["bug"]
    assert api.delete(url(gitea, f"/repos/{REPO}/issues/{n}/labels/999"), timeout=5).status_code == 422


def test_errors_are_gitea_shaped(gitea: GiteaEmulator, api: requests.Session) -> None:
    resp = api.get(url(gitea, "/repos/acme/nothing"), timeout=5)
    assert resp.status_code == 404
    assert resp.json() == {"message": "The target couldn't be found.",
                           "url": f"{gitea.url}/api/swagger", "errors": []}
    resp = api.post(url(gitea, "/repos/acme/nothing/labels"), json={"name": "x"}, timeout=5)
    assert resp.status_code == 422 and "color" in resp.json()["message"]


def test_auth_schemes_and_refusals(gitea: GiteaEmulator, canary: str) -> None:
    def get(path: str, auth: str | None) -> int:
        headers = {"Authorization": auth} if auth else {}
        return requests.get(url(gitea, path), headers=headers, timeout=5).status_code

    assert get("/user", f"token {canary}") == 200
    assert get("/user", f"Bearer {canary}") == 200
    assert get("/user", f"TOKEN {canary}") == 200
    assert get("/user", None) == 401
    assert get("/user", "token wrong") == 401
    assert get("/settings/api", None) == 200  # public in Gitea's default config
    assert get("/settings/api", "token wrong") == 401  # a bad token is refused everywhere
    records = repr(gitea.requests)
    assert canary not in records and [q.authorized for q in gitea.requests[-2:]] == [False, True]


def test_pull_requests_need_real_branches_and_are_unique(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.add_repo(REPO, git=True)
    create = url(gitea, f"/repos/{REPO}/pulls")
    missing = api.post(create, json={"head": "nope", "base": "main", "title": "t"}, timeout=5)
    assert missing.status_code == 404  # Gitea cannot resolve the head ref
    same = api.post(create, json={"head": "main", "base": "main", "title": "t"}, timeout=5)
    assert same.status_code == 422
    sha = gitea.git_commit(REPO, "fix/1", {"fix.txt": "fixed\n"}, "fix it")
    first = api.post(create, json={"head": "fix/1", "base": "main", "title": "Fix"}, timeout=5)
    assert first.status_code == 201 and first.json()["head"]["sha"] == sha
    again = api.post(create, json={"head": "fix/1", "base": "main", "title": "Fix"}, timeout=5)
    assert again.status_code == 409 and "already exists" in again.json()["message"]


def test_merge_makes_a_merge_commit(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.add_repo(REPO, git=True)
    n = gitea.add_pull(REPO, "Feature", head="feat")
    merge = url(gitea, f"/repos/{REPO}/pulls/{n}/merge")
    assert api.post(merge, json={"do": "merge"}, timeout=5).status_code == 200
    log = gitea.git_log(REPO, "main")
    assert log[0][1].startswith("Merge pull request 'Feature'") and len(log) == 3
    pr = api.get(url(gitea, f"/repos/{REPO}/pulls/{n}"), timeout=5).json()
    assert pr["merged"] and pr["state"] == "closed" and pr["merge_commit_sha"] == log[0][0]
    assert api.post(merge, json={"do": "merge"}, timeout=5).status_code == 405


def test_combined_status_takes_the_latest_per_context(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.add_repo(REPO, git=True)
    status = url(gitea, f"/repos/{REPO}/commits/main/status")
    assert api.get(status, timeout=5).json()["state"] == "pending"
    gitea.add_status(REPO, "main", "failure", context="ci")
    gitea.add_status(REPO, "main", "success", context="ci")
    gitea.add_status(REPO, "main", "success", context="lint")
    d = api.get(status, timeout=5).json()
    assert d["state"] == "success" and d["total_count"] == 2
    assert d["sha"] == gitea.git_branches(REPO)["main"]


# -- faults --------------------------------------------------------------------------------------


def test_fail_every_cycles_statuses_deterministically(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.fail_every, gitea.fail_statuses, gitea.retry_after = 3, [502, 429], 2
    got = [api.get(url(gitea, "/user"), timeout=5) for _ in range(9)]
    assert [r.status_code for r in got] == [200, 200, 502, 200, 200, 429, 200, 200, 502]
    assert got[5].headers["Retry-After"] == "2"
    assert gitea.count(kind="fault") == 3 and gitea.violations == []


def test_drop_every_closes_without_answering(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.drop_every = 2
    assert api.get(url(gitea, "/user"), timeout=5).status_code == 200
    with pytest.raises(requests.ConnectionError):
        api.get(url(gitea, "/user"), timeout=5)
    assert api.get(url(gitea, "/user"), timeout=5).status_code == 200


def test_latency_is_added(gitea: GiteaEmulator, api: requests.Session) -> None:
    gitea.latency = 0.2
    start = time.monotonic()
    api.get(url(gitea, "/user"), timeout=5)
    assert time.monotonic() - start >= 0.2


def test_down_refuses_and_up_serves_on_the_same_port(gitea: GiteaEmulator, api: requests.Session) -> None:
    assert api.get(url(gitea, "/user"), timeout=5).ok  # leaves a kept-alive connection
    port = gitea.port
    gitea.down()
    with pytest.raises(requests.ConnectionError):
        api.get(url(gitea, "/user"), timeout=5)
    gitea.up()
    assert gitea.port == port and api.get(url(gitea, "/user"), timeout=5).ok


# -- git hosting ---------------------------------------------------------------------------------


def git(*args: str, cwd: Path | None = None, token: str | None = None) -> subprocess.CompletedProcess:
    """Run git with credentials from GIT_ASKPASS (never in the URL), no prompts, no user config."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], "GIT_TERMINAL_PROMPT": "0",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    if token:
        askpass = Path(os.environ["HOME"]) / "askpass.sh"
        askpass.write_text('#!/bin/sh\ncase "$1" in Username*) echo dispatch-bot;; '
                           '*) echo "$EMU_TOKEN";; esac\n')
        askpass.chmod(0o700)
        env |= {"GIT_ASKPASS": str(askpass), "EMU_TOKEN": token}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=30)


def test_clone_needs_credentials_then_push_lands(gitea: GiteaEmulator, canary: str, tmp_path: Path) -> None:
    gitea.add_repo(REPO, git=True)
    remote = f"{gitea.url}/{REPO}.git"
    refused = git("clone", remote, str(tmp_path / "anon"))
    assert refused.returncode != 0 and "Username" in refused.stderr
    assert git("clone", remote, str(tmp_path / "w"), token="wrong").returncode != 0
    work = tmp_path / "w"
    cloned = git("clone", remote, str(work), token=canary)
    assert cloned.returncode == 0, cloned.stderr
    assert (work / "README.md").read_text().startswith("# webapp")
    (work / "big.bin").write_bytes(os.urandom(1_500_000))  # over http.postBuffer: chunked upload
    git("checkout", "-q", "-b", "feature", cwd=work)
    git("add", ".", cwd=work)
    git("commit", "-qm", "add feature", cwd=work)
    pushed = git("push", "origin", "feature", cwd=work, token=canary)
    assert pushed.returncode == 0, pushed.stderr
    head = git("rev-parse", "HEAD", cwd=work).stdout.strip()
    assert gitea.git_branches(REPO)["feature"] == head
    assert gitea.git_log(REPO, "feature")[0] == (head, "add feature")
    assert canary not in (work / ".git" / "config").read_text()


def test_anonymous_clone_when_allowed_but_never_anonymous_push(gitea: GiteaEmulator, tmp_path: Path) -> None:
    gitea.git_auth_required = False
    gitea.add_repo(REPO, git=True)
    work = tmp_path / "w"
    assert git("clone", f"{gitea.url}/{REPO}.git", str(work)).returncode == 0
    git("commit", "-q", "--allow-empty", "-m", "x", cwd=work)
    pushed = git("push", "origin", "HEAD:main", cwd=work)
    assert pushed.returncode != 0
    assert len(gitea.git_log(REPO, "main")) == 1


# -- demo, CLI and fixtures ----------------------------------------------------------------------


def test_seed_demo_makes_a_varied_backlog(tmp_path: Path) -> None:
    with GiteaEmulator(tmp_path) as emu:
        repos = seed_demo(emu, now=T0)
        issues = [emu.issue(r, n) for r in repos for n in emu.issue_numbers(r)]
    labels = {lb["name"] for i in issues for lb in i["labels"]}
    assert {"P0", "P1", "P2", "P3", "bug", "epic", "study", "blocked", "dispatch:claimed"} <= labels
    assert 14 <= len([i for i in issues if not i["pull_request"]]) <= 20
    assert any(i["assignees"] for i in issues) and any("Depends on #" in i["body"] for i in issues)
    assert any(i["pull_request"] and "Fixes #" in i["body"] for i in issues)
    assert emu.violations == []


def test_cli_serves_the_demo_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.emulator.gitea", "--port", "0", "--seed", "demo",
         "--root", str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(2)]  # type: ignore[union-attr]
        base = lines[0].split()[3]
        token_file = Path(lines[1].split(": ", 1)[1].strip())
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        token = token_file.read_text().strip()
        resp = requests.get(f"{base}/api/v1/repos/acme/webapp/issues",
                            headers={"Authorization": f"token {token}"}, timeout=5)
        assert resp.status_code == 200 and int(resp.headers["X-Total-Count"]) >= 10
        assert token not in "".join(lines)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


def test_token_file_and_config_helpers(gitea: GiteaEmulator, gitea_token_file: Path, canary: str,
                                       tmp_path: Path) -> None:
    assert gitea_token_file.read_text().strip() == canary
    assert gitea_token_file.stat().st_mode & 0o777 == 0o600
    path = write_config(tmp_path, gitea, [REPO], gitea={"retries": 1}, orgs=["acme"])
    assert canary not in path.read_text()
    cfg = load_config(path, env={})
    assert cfg.gitea.url == gitea.url and cfg.gitea.retries == 1 and cfg.repos == [REPO]
    assert cfg.orgs == ["acme"] and cfg.state_path == tmp_path / "state"
    assert cfg.gitea_token(env={}) == canary and [a.name for a in cfg.agents] == ["claude", "kimi"]


def test_gitea_fixture_fails_a_test_whose_responses_break_the_spec(tmp_path: Path) -> None:
    test_file = tmp_path / "test_broken.py"
    test_file.write_text(
        "import pytest, requests\n"
        "@pytest.fixture\n"
        "def canary():\n"
        "    return 'tok'\n"
        "def test_broken(gitea):\n"
        "    gitea._label_json = lambda r, lb: {'id': 'not-a-number'}\n"
        "    gitea.add_repo('a/b')\n"
        "    gitea.add_label('a/b', 'x')\n"
        "    requests.get(gitea.url + '/api/v1/repos/a/b/labels',\n"
        "                 headers={'Authorization': 'token tok'}, timeout=5)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.emulator.fixtures", "-p",
         "no:cacheprovider", "--rootdir", str(tmp_path), str(test_file)],
        cwd=root, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 1, proc.stdout
    assert "1 passed, 1 error" in proc.stdout
    assert "0/id: 'not-a-number' is not of type 'integer'" in proc.stdout
