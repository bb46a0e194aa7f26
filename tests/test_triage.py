"""Triage is pure: Issue literals in, decisions with reasons out; no HTTP."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from dispatch.config import AgentConfig, TriageConfig
from dispatch.forge import Issue, PullRequest
from dispatch.triage import (
    Route,
    agent_load,
    classify,
    dependencies,
    normalize,
    priority_tier,
    ready_label,
    references,
    route,
    score,
    triage,
)

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
POLICY = TriageConfig()


def issue(number: int = 1, title: str = "Do a thing", **kw) -> Issue:
    kw.setdefault("repo", "acme/app")
    kw.setdefault("created_at", NOW - timedelta(days=3))
    kw.setdefault("updated_at", NOW - timedelta(days=1))
    return Issue(number=number, title=title, **kw)


def pr(number: int, title: str = "", body: str = "", repo: str = "acme/app", **kw) -> PullRequest:
    return PullRequest(repo=repo, number=number, title=title, body=body, **kw)


# ---- classify ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"is_pull": True}, "pull request"),
        ({"labels": ("Epic",)}, "epic"),
        ({"labels": ("STUDY",)}, "study"),
        ({"title": "[EPIC] rewrite everything"}, "epic"),
        ({"title": "  [study] compare runners"}, "study"),
        ({"labels": ("dispatch:claimed",)}, "claimed (dispatch:claimed)"),
        ({"assignees": ("alice",)}, "assigned to alice"),
        ({"assignees": ("alice", "bob")}, "assigned to alice, bob"),
        ({"labels": ("Blocked",)}, "blocked"),
        ({"state": "closed"}, "closed"),
    ],
)
def test_classify_skip_reasons(kw, reason):
    assert classify(issue(**kw), [], POLICY) == reason


def test_classify_custom_blocked_label_is_named():
    policy = TriageConfig(blocked_labels=["blocked", "needs-info"])
    assert classify(issue(labels=("Needs-Info",)), [], policy) == "blocked (needs-info)"


def test_classify_eligible_issue_has_no_reason():
    assert classify(issue(labels=("bug", "P1")), [pr(7, "Unrelated", "see #2")], POLICY) is None


@pytest.mark.parametrize(
    "text",
    ["Closes #1", "fixes #1.", "RESOLVES #1", "see (#1)", "acme/app#1", "Acme/App#1 and more"],
)
def test_open_pr_reference_skips(text):
    assert classify(issue(1), [pr(7, body=text)], POLICY) == "open PR #7 references it"
    assert classify(issue(1), [pr(7, title=text)], POLICY) == "open PR #7 references it"


@pytest.mark.parametrize(
    "text", ["Closes #12", "#10", "other/repo#1", "foo#1", "#1a", "v1.0", "issue 1", ""]
)
def test_pr_text_that_is_not_a_reference_to_issue_1(text):
    assert classify(issue(1), [pr(7, body=text)], POLICY) is None


def test_pr_reference_must_be_open_and_same_repo():
    other_repo = pr(7, body="Closes #1", repo="acme/other")
    closed = pr(8, body="Closes #1", state="closed")
    assert classify(issue(1), [other_repo, closed], POLICY) is None


def test_pr_on_dispatch_branch_counts_as_reference():
    assert classify(issue(3), [pr(9, head="dispatch/3-do-a-thing")], POLICY) == (
        "open PR #9 references it"
    )
    assert classify(issue(3), [pr(9, head="dispatch/33-other")], POLICY) is None


def test_references_parses_only_own_repo():
    text = "Closes #4, fixes acme/app#5, see other/x#6 and #12"
    assert references(text, "acme/app") == {4, 5, 12}


# ---- score ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "tier"),
    [
        ("P0", 0), ("p1", 1), ("priority/p2", 2), ("P3", 3), ("critical", 0),
        ("priority::critical", 0), ("priority: high", 1), ("High Priority", 1),
        ("priority", 1), ("priority: medium", 2), ("low-priority", 3), ("urgent", 0),
    ],
)
def test_priority_labels(label, tier):
    assert priority_tier([label]) == (tier, label)


def test_priority_ignores_unrelated_labels_and_takes_most_urgent():
    assert priority_tier(["bug", "help wanted", "low"]) is None
    assert priority_tier(["P3", "priority: high"]) == (1, "priority: high")


def test_score_reasons_name_each_component():
    s = score(issue(labels=("P1", "bug"), body="short fix"), POLICY, NOW)
    assert s.reasons[0] == "P1 +300"
    assert "bug +40" in s.reasons
    assert any(r.startswith("age 3d +") for r in s.reasons)
    assert any(r.startswith("size 9 chars, 0 open tasks +") for r in s.reasons)
    assert s.value == round(s.value, 1)


def test_priority_dominates_age_and_everything_else_positive():
    old_low = issue(
        1, labels=("P3", "security", "bug"), body="x",
        created_at=NOW - timedelta(days=5000), updated_at=NOW - timedelta(days=5000),
    )
    new_high = issue(2, labels=("P2",), body="word " * 5000, created_at=NOW, updated_at=NOW)
    assert score(new_high, POLICY, NOW).value > score(old_low, POLICY, NOW).value
    for tier in range(3):
        hi = issue(1, labels=(f"P{tier}",), body="- [ ] a\n" * 50, created_at=NOW, updated_at=NOW)
        lo = replace(old_low, labels=(f"P{tier + 1}", "security"))
        assert score(hi, POLICY, NOW).value > score(lo, POLICY, NOW).value


def test_unprioritised_sits_between_high_and_low():
    p1, none, p3 = (score(issue(labels=lbl), POLICY, NOW).value for lbl in (("P1",), (), ("P3",)))
    assert p1 > none > p3
    assert score(issue(), POLICY, NOW).reasons[0] == "unprioritised (as P2) +200"


def test_age_grows_then_caps():
    ages = [score(issue(created_at=NOW - timedelta(days=d), updated_at=NOW), POLICY, NOW).value
            for d in (0, 1, 10, 100, 1000, 10000)]
    assert ages == sorted(ages)
    assert ages[0] < ages[2]
    assert ages[-1] == ages[-2]  # capped


def test_staleness_bonus_after_stale_days():
    fresh = issue(updated_at=NOW - timedelta(days=13))
    stale = issue(updated_at=NOW - timedelta(days=15))
    assert "untouched 15d +10" in score(stale, POLICY, NOW).reasons
    assert not any(r.startswith("untouched") for r in score(fresh, POLICY, NOW).reasons)
    short = TriageConfig(stale_days=2)
    assert any(r.startswith("untouched") for r in score(fresh, short, NOW).reasons)


def test_smaller_issues_slightly_preferred():
    small = score(issue(body="Rename the flag."), POLICY, NOW)
    big = score(issue(body="x" * 3000 + "\n- [ ] one\n- [ ] two\n* [ ] three\n- [x] done"), POLICY, NOW)
    assert small.value > big.value
    assert any("3 open tasks" in r for r in big.reasons)
    assert small.value - big.value <= 10  # a preference, not a priority


def test_dependency_penalty_only_for_open_dependencies():
    body = "Depends on #4. Also BLOCKED BY #5 and #6; requires: #7; after #8 lands"
    i = issue(10, body=body)
    assert dependencies(i) == [4, 5, 6, 7, 8]
    free = score(i, POLICY, NOW, frozenset({1, 2, 3}))
    held = score(i, POLICY, NOW, frozenset({4, 6, 99}))
    assert free.value - held.value == 150
    assert "depends on open #4, #6 -150" in held.reasons
    assert not any("depends" in r for r in free.reasons)


def test_dependency_needs_explicit_phrase_and_whole_number():
    i = issue(1, body="Related to #4; see #12. depends on #12")
    assert dependencies(i) == [12]
    assert not any("depends" in r for r in score(i, POLICY, NOW, frozenset({1, 4})).reasons)


def test_self_dependency_ignored():
    assert dependencies(issue(4, body="depends on #4")) == []


def test_score_is_deterministic():
    i = issue(labels=("P2", "bug"), body="- [ ] a\n- [ ] b\n" * 3)
    assert score(i, POLICY, NOW) == score(i, POLICY, NOW)


# ---- route ---------------------------------------------------------------------------------

CLAUDE = AgentConfig(name="claude", strengths=["architecture", "refactoring", "review"], max_concurrent=2)
KIMI = AgentConfig(name="kimi", strengths=["implementation", "tests", "docs"], max_concurrent=1)


def test_normalize_folds_plurals_gerunds_and_synonyms():
    assert {normalize(w) for w in ("test", "tests", "Testing", "pytest")} == {"test"}
    assert normalize("refactoring") == normalize("refactor") == normalize("refactors")
    assert normalize("docs") == normalize("documentation") == normalize("README") == "doc"
    assert normalize("class") == "class" and normalize("status") == "status"


def test_route_by_label():
    r = route(issue(labels=("refactor",)), [KIMI, CLAUDE])
    assert r.agent == "claude"
    assert r.reasons == ("claude matched refactor (label) (fit 2, load 0)",)


def test_route_by_text():
    r = route(issue(title="Add tests for the parser"), [CLAUDE, KIMI])
    assert r.agent == "kimi"
    assert "test" in r.reasons[-1]


def test_label_outweighs_text():
    i = issue(title="Refactor the docs builder", labels=("documentation",))
    r = route(i, [CLAUDE, KIMI])
    assert r.agent == "kimi"
    assert r.reasons == ("kimi matched doc (label) (fit 2, load 0)",)


def test_route_skips_agents_at_capacity():
    r = route(issue(labels=("refactor",)), [CLAUDE, KIMI], {"claude": 2})
    assert r.agent == "kimi"
    assert r.reasons == ("claude at capacity (2/2)", "no strength matched; least loaded")


def test_max_concurrent_zero_takes_nothing():
    off = AgentConfig(name="off", strengths=["refactor"], max_concurrent=0)
    r = route(issue(labels=("refactor",)), [off, KIMI])
    assert r.agent == "kimi"
    assert r.reasons[0] == "off at capacity (0/0)"


def test_all_agents_at_capacity():
    r = route(issue(), [CLAUDE, KIMI], {"claude": 2, "kimi": 5})
    assert r == Route(None, ("claude at capacity (2/2)", "kimi at capacity (5/1)",
                             "all agents at capacity"))
    assert route(issue(), []) == Route(None, ("no agents configured",))


def test_no_fit_goes_to_least_loaded():
    a = AgentConfig(name="a", strengths=["x"], max_concurrent=5)
    b = AgentConfig(name="b", strengths=["y"], max_concurrent=5)
    assert route(issue(), [a, b], {"a": 2, "b": 1}).agent == "b"
    assert route(issue(), [a, b], {"a": 1, "b": 1}).agent == "a"  # config order


def test_ties_broken_by_load_then_config_order():
    a = AgentConfig(name="a", strengths=["parser"], max_concurrent=5)
    b = AgentConfig(name="b", strengths=["parser"], max_concurrent=5)
    i = issue(title="parser crash")
    assert route(i, [a, b], {"a": 1}).agent == "b"
    assert route(i, [a, b], {}).agent == "a"
    assert route(i, [b, a], {}).agent == "b"
    # higher fit wins over lower load
    c = AgentConfig(name="c", strengths=["parser", "crash"], max_concurrent=5)
    assert route(i, [a, c], {"c": 4}).agent == "c"


def test_agent_load_counts_claimed_open_issues():
    agents = [AgentConfig(name="claude", account="claude-bot", max_concurrent=2), KIMI]
    issues = [
        issue(1, labels=("dispatch:claimed",), assignees=("claude-bot",)),
        issue(2, labels=("dispatch:claimed", "kimi-ready")),
        issue(3, labels=("dispatch:claimed", "Claude-Ready")),
        issue(4, labels=("kimi-ready",)),  # not claimed: waiting, not in flight
        issue(5, labels=("dispatch:claimed",), assignees=("claude-bot",), state="closed"),
        issue(6, assignees=("claude-bot",)),
    ]
    assert agent_load(issues, agents, POLICY) == {"claude": 2, "kimi": 1}
    assert ready_label("kimi") == "kimi-ready"


# ---- triage --------------------------------------------------------------------------------


def test_triage_filters_scores_routes_and_ranks():
    issues = [
        issue(1, "[EPIC] big plan"),
        issue(2, "Refactor config", labels=("P1", "refactor")),
        issue(3, "Crash on start", labels=("P0", "bug")),
        issue(4, "Write tests", body="depends on #3"),
        issue(5, "In flight", labels=("dispatch:claimed", "claude-ready")),
        issue(6, "Has PR"),
        issue(1, "Other repo's issue", repo="acme/lib", body="depends on #3"),
    ]
    result = triage(issues, [pr(20, body="Closes #6")], [CLAUDE, KIMI], POLICY, NOW)
    assert [(r.issue.repo, r.issue.number) for r in result.ranked] == [
        ("acme/app", 3), ("acme/app", 2), ("acme/lib", 1), ("acme/app", 4)
    ]
    assert {(s.issue.number, s.reason) for s in result.skipped} == {
        (1, "epic"), (5, "claimed (dispatch:claimed)"), (6, "open PR #20 references it")
    }
    by_ref = {r.issue.ref: r for r in result.ranked}
    # acme/lib has no open #3: its dependency is not penalised
    assert "depends on open #3 -150" in by_ref["acme/app#4"].score.reasons
    assert not any("depends" in x for x in by_ref["acme/lib#1"].score.reasons)
    assert by_ref["acme/app#2"].route.agent == "claude"  # load 1 of 2: still room
    assert by_ref["acme/app#4"].route.agent == "kimi"


def _backlog(n: int, seed: int) -> list[Issue]:
    rng = random.Random(seed)
    labels = ["P0", "P1", "P2", "P3", "bug", "security", "refactor", "docs", "tests", "epic",
              "blocked", "dispatch:claimed", "kimi-ready", "priority: high"]
    out = []
    for k in range(n):
        repo = f"acme/r{k % 3}"
        age = rng.randint(0, 400)
        out.append(Issue(
            repo=repo, number=k // 3 + 1, title=rng.choice(["Fix", "Add tests", "Refactor"]),
            body=rng.choice(["", "short", "- [ ] a\n- [ ] b", f"depends on #{rng.randint(1, 90)}"]),
            labels=tuple(rng.sample(labels, rng.randint(0, 3))),
            assignees=("alice",) if rng.random() < 0.05 else (),
            created_at=NOW - timedelta(days=age),
            updated_at=NOW - timedelta(days=rng.randint(0, age)),
        ))
    return out


def test_generated_backlog_ranked_deterministically():
    backlog = _backlog(250, seed=7)
    pulls = [pr(900 + k, body=f"Closes #{k}", repo="acme/r1") for k in range(1, 6)]
    first = triage(backlog, pulls, [CLAUDE, KIMI], POLICY, NOW)
    shuffled = backlog[:]
    random.Random(1).shuffle(shuffled)
    second = triage(shuffled, pulls, [CLAUDE, KIMI], POLICY, NOW)
    assert first == second
    refs = [r.issue.ref for r in first.ranked] + [s.issue.ref for s in first.skipped]
    assert len(refs) == len(set(refs)) == 250
    keys = [(-r.score.value, r.issue.repo, r.issue.number) for r in first.ranked]
    assert keys == sorted(keys)
    assert first.ranked and first.skipped
    assert all(r.score.reasons and r.route.reasons for r in first.ranked)
