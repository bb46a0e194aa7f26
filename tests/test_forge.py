"""ForgeClient against the Gitea emulator (real HTTP on loopback), plus narrow `responses` tests
for Link parsing and Retry-After handling."""

from __future__ import annotations

import pytest
import requests
import responses

from dispatch.errors import ForgeError
from dispatch.forge import ForgeClient, parse_link
from tests.emulator.gitea import GiteaEmulator

REPO = "acme/webapp"


@pytest.fixture
def client(gitea: GiteaEmulator, canary: str) -> ForgeClient:
    """A client for the emulator that never really sleeps between retries."""
    return ForgeClient(gitea.url, canary, sleep=lambda s: None, retries=4)


def seed_issues(gitea: GiteaEmulator, n: int) -> None:
    gitea.add_repo(REPO)
    for i in range(n):
        gitea.add_issue(REPO, f"issue {i}", labels=["bug"] if i % 2 else [])


def test_pagination_reads_every_issue_once_with_the_fewest_requests(
    gitea: GiteaEmulator, client: ForgeClient
) -> None:
    seed_issues(gitea, 250)
    gitea.add_pull(REPO, "not an issue", head="x")
    issues = client.list_issues(REPO)
    assert [i.number for i in issues] == list(range(1, 251))
    assert not any(i.is_pull for i in issues)
    assert gitea.count("GET", "/api/v1/settings/api") == 1
    assert gitea.count("GET", f"/api/v1/repos/{REPO}/issues") == 5  # ceil(250 / 50)
    assert gitea.count() == 6 == client.requests_made


def test_a_limit_above_the_cap_still_gets_everything(gitea: GiteaEmulator, client: ForgeClient) -> None:
    seed_issues(gitea, 250)
    client._max_items = 200  # the client believes pages are bigger than the server allows
    assert [i.number for i in client.list_issues(REPO)] == list(range(1, 251))
    assert all("limit=200" in q.query for q in gitea.requests)


def test_retries_ride_out_one_failure_in_three(gitea: GiteaEmulator, client: ForgeClient) -> None:
    seed_issues(gitea, 250)
    gitea.fail_every, gitea.fail_statuses = 3, [502, 429]
    assert len(client.list_issues(REPO)) == 250
    faults = [q.status for q in gitea.requests if q.kind == "fault"]
    assert set(faults) == {502, 429} and len(faults) >= 2


def test_dropped_connections_are_retried(gitea: GiteaEmulator, client: ForgeClient) -> None:
    seed_issues(gitea, 120)
    gitea.drop_every = 4
    assert len(client.list_issues(REPO)) == 120
    assert gitea.count(kind="fault") >= 1


def test_server_down_names_the_url_and_never_the_token(
    gitea: GiteaEmulator, client: ForgeClient, canary: str
) -> None:
    gitea.add_repo(REPO)
    assert client.get_repo(REPO).full_name == REPO
    gitea.down()
    with pytest.raises(ForgeError) as info:
        client.get_repo(REPO)
    err = info.value
    assert err.status is None and f"{gitea.url}/api/v1/repos/{REPO}" in str(err)
    assert canary not in str(err) and canary not in repr(err.__dict__)
    gitea.up()
    assert client.get_repo(REPO).full_name == REPO


def test_404_carries_giteas_message(gitea: GiteaEmulator, client: ForgeClient) -> None:
    with pytest.raises(ForgeError) as info:
        client.get_issue("acme/missing", 1)
    assert info.value.status == 404
    assert "The target couldn't be found." in str(info.value)
    assert gitea.count() == 1  # a 404 is not retried


def test_edit_issue_handles_the_201(gitea: GiteaEmulator, client: ForgeClient) -> None:
    gitea.add_repo(REPO)
    n = gitea.add_issue(REPO, "stale")
    issue = client.edit_issue(REPO, n, state="closed", assignees=["dispatch-bot"])
    assert issue.state == "closed" and issue.assignees == ("dispatch-bot",)
    assert gitea.issue(REPO, n)["state"] == "closed"


def test_labels_are_created_added_and_removed(gitea: GiteaEmulator, client: ForgeClient) -> None:
    gitea.add_repo(REPO)
    n = gitea.add_issue(REPO, "work", labels=["P1"])
    claim = client.ensure_label(REPO, "dispatch:claimed")
    assert claim.id and client.ensure_label(REPO, "dispatch:claimed").id == claim.id
    assert {lb.name for lb in client.add_labels(REPO, n, [claim.id])} == {"P1", "dispatch:claimed"}
    assert client.get_issue(REPO, n).labels == ("P1", "dispatch:claimed")
    client.remove_label(REPO, n, claim.id)
    client.remove_label(REPO, n, claim.id)  # already gone: still fine
    assert client.get_issue(REPO, n).labels == ("P1",)


def test_comments_are_created_and_listed(gitea: GiteaEmulator, client: ForgeClient) -> None:
    gitea.add_repo(REPO)
    n = gitea.add_issue(REPO, "talk")
    gitea.add_comment(REPO, n, "first", author="alice")
    made = client.create_comment(REPO, n, "claimed by kimi")
    comments = client.list_comments(REPO, n)
    assert [(c.author, c.body) for c in comments] == [("alice", "first"), ("dispatch-bot", "claimed by kimi")]
    assert comments[-1].id == made.id and client.get_issue(REPO, n).comments == 2


def test_pull_requests_round_trip(gitea: GiteaEmulator, client: ForgeClient) -> None:
    gitea.add_repo(REPO, git=True)
    gitea.git_commit(REPO, "fix/7", {"fix.txt": "x\n"}, "fix")
    pr = client.create_pull(REPO, head="fix/7", base="main", title="Fix #7", body="Fixes #7")
    assert (pr.head, pr.base, pr.state, pr.merged) == ("fix/7", "main", "open", False)
    assert [p.number for p in client.list_pulls(REPO)] == [pr.number]
    with pytest.raises(ForgeError) as info:
        client.create_pull(REPO, head="fix/7", base="main", title="again", body="")
    assert info.value.status == 409


def test_org_repos_and_current_user(gitea: GiteaEmulator, client: ForgeClient) -> None:
    for name in ("b", "a", "c"):
        gitea.add_repo(f"acme/{name}")
    repos = client.org_repos("acme")
    assert [r.full_name for r in repos] == ["acme/a", "acme/b", "acme/c"]
    assert repos[0].clone_url == f"{gitea.url}/acme/a.git"
    assert client.current_user() == "dispatch-bot"


# -- narrow unit tests with `responses` -----------------------------------------------------------

BASE = "http://forge.test"


def test_parse_link_reads_giteas_comma_joined_header() -> None:
    header = (f'<{BASE}/api/v1/x?limit=50&page=3>; rel="next",<{BASE}/api/v1/x?limit=50&page=5>; '
              f'rel="last",<{BASE}/api/v1/x?limit=50&page=1>; rel="first",'
              f'<{BASE}/api/v1/x?limit=50&page=1>; rel="prev"')
    links = parse_link(header)
    assert links["next"].endswith("page=3") and links["last"].endswith("page=5")
    assert set(links) == {"next", "last", "first", "prev"}
    assert parse_link(None) == {} and parse_link("") == {}


@responses.activate
def test_without_a_total_the_client_follows_next_links() -> None:
    api = f"{BASE}/api/v1"
    responses.get(f"{api}/settings/api", json={"max_response_items": 2})
    pages = {1: [{"id": 1}, {"id": 2}], 2: [{"id": 3}, {"id": 4}], 3: [{"id": 5}]}
    for page, items in pages.items():
        link = f'<{api}/orgs/o/repos?limit=2&page={page + 1}>; rel="next"' if page < 3 else ""
        responses.get(f"{api}/orgs/o/repos", json=items, headers={"Link": link} if link else {},
                      match=[responses.matchers.query_param_matcher({"limit": "2", "page": str(page)})])
    items = ForgeClient(BASE, "t", sleep=lambda s: None).paginate("/orgs/o/repos")
    assert [d["id"] for d in items] == [1, 2, 3, 4, 5]


@responses.activate
def test_retry_after_is_honoured_and_capped() -> None:
    slept: list[float] = []
    responses.get(f"{BASE}/api/v1/user", status=429, headers={"Retry-After": "7"})
    responses.get(f"{BASE}/api/v1/user", status=429, headers={"Retry-After": "9999"})
    responses.get(f"{BASE}/api/v1/user", json={"login": "bot"})
    client = ForgeClient(BASE, "t", sleep=slept.append, backoff=0.01, backoff_cap=60)
    assert client.current_user() == "bot"
    assert slept[0] >= 7 and slept[1] == 60


@responses.activate
def test_retries_are_bounded_and_the_error_keeps_the_status() -> None:
    responses.get(f"{BASE}/api/v1/user", status=503, json={"message": "maintenance", "url": ""})
    client = ForgeClient(BASE, "secret-token", sleep=lambda s: None, retries=2)
    with pytest.raises(ForgeError) as info:
        client.current_user()
    assert info.value.status == 503 and "maintenance" in str(info.value)
    assert len(responses.calls) == 3 and "secret-token" not in str(info.value)


@responses.activate
def test_connection_errors_become_forge_errors() -> None:
    responses.get(f"{BASE}/api/v1/user", body=requests.ConnectionError("refused"))
    with pytest.raises(ForgeError) as info:
        ForgeClient(BASE, "t", sleep=lambda s: None, retries=1).current_user()
    assert info.value.status is None and "cannot reach GET" in str(info.value)


def test_an_unexpected_body_is_a_forge_error_not_a_traceback() -> None:
    import responses as rsps

    from dispatch.errors import ForgeError
    from dispatch.forge import ForgeClient

    with rsps.RequestsMock() as mock:
        mock.get("http://forge.test/api/v1/settings/api", json={"max_response_items": 50})
        mock.get("http://forge.test/api/v1/repos/o/r/issues", body="<html>proxy login</html>",
                 headers={"X-Total-Count": "1"})
        mock.get("http://forge.test/api/v1/user", json=["not", "a", "user"])
        client = ForgeClient("http://forge.test", "t", retries=0)
        with pytest.raises(ForgeError, match="unexpected body"):
            client.list_issues("o/r")
        with pytest.raises(ForgeError, match="unexpected body"):
            client.current_user()


def test_a_post_whose_answer_timed_out_is_not_sent_again() -> None:
    import requests
    import responses as rsps

    from dispatch.errors import ForgeError
    from dispatch.forge import ForgeClient

    with rsps.RequestsMock() as mock:
        mock.post("http://forge.test/api/v1/repos/o/r/issues/1/comments", body=requests.ReadTimeout())
        client = ForgeClient("http://forge.test", "t", retries=3, sleep=lambda s: None)
        with pytest.raises(ForgeError, match="timed out"):
            client.create_comment("o/r", 1, "hi")
        assert len(mock.calls) == 1


def test_a_list_that_grows_mid_read_loses_nothing() -> None:
    import responses as rsps

    from dispatch.forge import ForgeClient

    items = [{"id": i, "number": i, "title": f"t{i}"} for i in range(100, 0, -1)]  # newest first
    reads = {"n": 0}

    def page(request):
        import json as j
        from urllib.parse import parse_qs, urlsplit

        q = parse_qs(urlsplit(request.url).query)
        p, lim = int(q["page"][0]), int(q["limit"][0])
        reads["n"] += 1
        if reads["n"] == 2:  # a new issue arrives after page 1 was read: everything shifts by one
            items.insert(0, {"id": 101, "number": 101, "title": "t101"})
        return 200, {"X-Total-Count": str(len(items) if reads["n"] > 1 else 100)}, j.dumps(
            items[(p - 1) * lim: p * lim])

    with rsps.RequestsMock() as mock:
        mock.get("http://forge.test/api/v1/settings/api", json={"max_response_items": 50})
        mock.add_callback(rsps.GET, "http://forge.test/api/v1/repos/o/r/issues", callback=page)
        got = ForgeClient("http://forge.test", "t", retries=0, concurrency=1).list_issues("o/r")
    assert {i.number for i in got} >= set(range(1, 101))  # nothing that was there is lost
