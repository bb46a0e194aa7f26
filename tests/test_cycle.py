"""The orchestrator cycle over the emulator: idempotent, policy-bound, approval-gated, breaker-aware."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dispatch.config import load_config
from dispatch.cycle import CHECKLIST, run_cycle
from dispatch.errors import ForgeError
from dispatch.forge import ForgeClient
from tests.conftest import CANARY
from tests.emulator.fixtures import write_config

REPO = "acme/app"
OPS = "acme/ops"
NOW = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
AGENTS = [
    {"name": "claude", "strengths": ["refactor"], "max_concurrent": 1},
    {"name": "kimi", "strengths": ["bug"], "max_concurrent": 1},
    {"name": "local", "strengths": ["docs"], "max_concurrent": 1},
]


@pytest.fixture
def world(gitea, tmp_path):
    gitea.add_repo(REPO)
    gitea.add_repo(OPS)
    ops = gitea.add_issue(OPS, "Operator inbox")
    created = NOW - timedelta(days=2)
    issues = {
        "bug": gitea.add_issue(REPO, "Crash on save", labels=["bug", "P1"], created_at=created),
        "docs": gitea.add_issue(REPO, "Document the API", labels=["docs"], created_at=created),
        "refactor": gitea.add_issue(REPO, "Refactor storage", labels=["refactor"], created_at=created),
    }
    return gitea, tmp_path, ops, issues


def config(tmp_path, gitea, ops, **extra):
    report = {"operator_issue": f"{OPS}#{ops}", **extra.pop("report", {})}
    path = write_config(tmp_path, gitea, [REPO], agents=AGENTS, gitea={"retries": 0},
                        report=report, **extra)
    return load_config(path, env={})


def client(gitea) -> ForgeClient:
    return ForgeClient(gitea.url, CANARY, retries=0)


def comments(gitea, repo, n) -> list[str]:
    return [c.body for c in client(gitea).list_comments(repo, n)]


def labels(gitea, n) -> list[str]:
    return sorted(lb["name"] for lb in gitea.issue(REPO, n)["labels"])


def test_idle_agents_get_work_and_a_second_cycle_does_nothing_twice(world):
    gitea, tmp_path, ops, issues = world
    cfg = config(tmp_path, gitea, ops)
    first = run_cycle(cfg, client(gitea), mode="simple", now=NOW)
    assigned = {a["key"] for a in first.actions if a["outcome"] == "done"}
    assert len(assigned) == 3  # three idle agents, three issues
    assert labels(gitea, issues["bug"]) == ["P1", "bug", "kimi-ready"]
    assert labels(gitea, issues["docs"]) == ["docs", "local-ready"]
    posts = sum(q.method == "POST" for q in gitea.requests)

    second = run_cycle(cfg, client(gitea), mode="simple", now=NOW + timedelta(minutes=5))
    assert [a for a in second.actions if a["outcome"] == "done"] == []
    assert sum(q.method == "POST" for q in gitea.requests) == posts  # nothing posted again
    for n in issues.values():
        assert len(comments(gitea, REPO, n)) == 1


def test_a_forbidden_action_is_never_taken(world):
    gitea, tmp_path, ops, issues = world
    cfg = config(tmp_path, gitea, ops, policy={"allow": ["nudge", "comment"], "forbid": ["assign", "delete"]})
    result = run_cycle(cfg, client(gitea), mode="simple", now=NOW)
    assert result.actions and {a["outcome"] for a in result.actions} == {"forbidden"}
    for n in issues.values():
        assert comments(gitea, REPO, n) == []
        assert not any(lb.endswith("-ready") for lb in labels(gitea, n))


def test_sovereign_waits_for_approval_then_acts_exactly_once(world):
    gitea, tmp_path, ops, issues = world
    gitea.add_user("operator")
    gitea.add_user("mallory")
    cfg = config(tmp_path, gitea, ops, report={"approvers": ["operator"]})
    first = run_cycle(cfg, client(gitea), mode="sovereign", now=NOW)
    assert {a["outcome"] for a in first.actions} == {"awaiting approval"}
    checklists = [c for c in comments(gitea, OPS, ops) if CHECKLIST in c]
    assert len(checklists) == 1 and checklists[0].count("- [ ] `") == 3
    assert all(comments(gitea, REPO, n) == [] for n in issues.values())

    run_cycle(cfg, client(gitea), mode="sovereign", now=NOW + timedelta(minutes=5))
    assert len([c for c in comments(gitea, OPS, ops) if CHECKLIST in c]) == 1  # not listed twice

    line = next(ln for ln in checklists[0].splitlines() if f"#{issues['bug']}" in ln)
    ticked = f"{CHECKLIST}\n{line.replace('- [ ]', '- [x]')}"
    # a tick from someone who is not an approver approves nothing
    gitea.add_comment(OPS, ops, ticked, author="mallory")
    stranger = run_cycle(cfg, client(gitea), mode="sovereign", now=NOW + timedelta(minutes=7))
    assert "done" not in [a["outcome"] for a in stranger.actions]
    # the operator (a configured approver) ticks the box of the bug's assignment
    gitea.add_comment(OPS, ops, ticked, author="operator")
    third = run_cycle(cfg, client(gitea), mode="sovereign", now=NOW + timedelta(minutes=10))
    assert [a["outcome"] for a in third.actions].count("done") == 1
    assert "kimi-ready" in labels(gitea, issues["bug"])
    assert comments(gitea, REPO, issues["docs"]) == []  # not approved: still waiting

    fourth = run_cycle(cfg, client(gitea), mode="sovereign", now=NOW + timedelta(minutes=15))
    assert "done" not in [a["outcome"] for a in fourth.actions]
    assert len(comments(gitea, REPO, issues["bug"])) == 1


def test_forge_down_opens_the_breaker_and_later_runs_skip(world):
    gitea, tmp_path, ops, _ = world
    cfg = config(tmp_path, gitea, ops)
    gitea.down()
    for i in range(5):
        with pytest.raises(ForgeError):
            run_cycle(cfg, client(gitea), now=NOW + timedelta(seconds=i))
    skipped = run_cycle(cfg, client(gitea), now=NOW + timedelta(seconds=10))
    assert "breaker is open" in skipped.skipped and skipped.actions == []
    gitea.up()
    later = NOW + timedelta(minutes=5)  # past the cool-down: half-open, then closed
    assert run_cycle(cfg, client(gitea), now=later).skipped == ""
    assert run_cycle(cfg, client(gitea), now=later + timedelta(minutes=5)).skipped == ""


def test_sprints_beyond_the_budget_are_deferred_untouched_and_failures_stay_retryable(world):
    gitea, tmp_path, ops, issues = world
    cfg = config(tmp_path, gitea, ops)
    ran: list[str] = []

    def run_sprint(d) -> bool:  # every agent is "direct": each decision is a sprint
        ran.append(d.ref)
        return False  # it failed

    first = run_cycle(cfg, client(gitea), now=NOW, run_sprint=run_sprint, max_sprints=1)
    outcomes = sorted(a["outcome"] for a in first.actions)
    assert outcomes == ["deferred", "deferred", "sprint failed"] and len(ran) == 1
    deferred = [a["key"] for a in first.actions if a["outcome"] == "deferred"]
    for key in deferred:  # untouched on the forge: no label, no comment
        n = int(key.split("#")[1].split(":")[0])
        assert comments(gitea, REPO, n) == [] and not any(lb.endswith("-ready") for lb in labels(gitea, n))
    # the failed key is not "done": a later cycle may sprint it again
    from dispatch.journal import Journal

    failed_key = next(a["key"] for a in first.actions if a["outcome"] == "sprint failed")
    assert Journal(tmp_path / "state" / "journal.sqlite").get(failed_key).status == "failed"


def _row(tmp_path, issue: int, outcome: str, when: datetime) -> None:
    from dispatch.results import ResultRow, append_result

    append_result(tmp_path / "state" / "results.csv", ResultRow(
        timestamp=when, run_id=f"r{issue}-{when.timestamp():.0f}", repo=REPO, issue=issue,
        agent="kimi", backend="direct", model="m", outcome=outcome,
        pr_url=f"http://forge/{REPO}/pulls/9" if outcome == "success" else ""))


@pytest.mark.parametrize("mode", ["simple", "intelligent"])
def test_a_failing_issue_rests_and_a_finished_sprint_never_blocks_the_next(world, mode):
    gitea, tmp_path, ops, issues = world
    cfg = config(tmp_path, gitea, ops)
    # the bug just failed, and the docs issue had a successful sprint whose PR was then closed
    _row(tmp_path, issues["bug"], "failed", NOW - timedelta(minutes=10))
    _row(tmp_path, issues["docs"], "success", NOW - timedelta(days=1))
    seen: list[str] = []

    def run_sprint(d) -> bool:
        seen.append(d.ref)
        return True

    result = run_cycle(cfg, client(gitea), mode=mode, now=NOW, run_sprint=run_sprint, max_sprints=5)
    assert f"{REPO}#{issues['bug']}" not in seen  # resting after its failure
    assert f"{REPO}#{issues['docs']}" in seen  # its earlier finished attempt did not block it
    docs_key = next(a["key"] for a in result.actions if f"#{issues['docs']}:" in a["key"])
    assert docs_key.endswith(":1")  # the second attempt has its own key
    later = run_cycle(cfg, client(gitea), mode=mode, now=NOW + timedelta(hours=3), run_sprint=run_sprint,
                      max_sprints=5)
    assert f"{REPO}#{issues['bug']}" in [a["key"].split(":")[1] for a in later.actions]  # rested enough


def test_sovereign_with_a_bare_operator_repo_does_not_crash(world):
    gitea, tmp_path, ops, _ = world
    cfg = config(tmp_path, gitea, ops, report={"operator_issue": OPS, "post_mode": "daily_issue"})
    result = run_cycle(cfg, client(gitea), mode="sovereign", now=NOW)
    assert {a["outcome"] for a in result.actions} == {"awaiting approval"}
