"""Policy verdicts: forbid always wins, sovereign asks for approval, merge and stale conditions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dispatch.config import _build
from dispatch.errors import ConfigError
from dispatch.forge import Issue
from dispatch.policy import (
    ACTION_KINDS,
    DESTRUCTIVE,
    Action,
    PolicyConfig,
    action_event,
    action_key,
    can_merge,
    check_policy,
    count_approvals,
    decide,
    stale_to_close,
)

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
DEFAULT = PolicyConfig()


@pytest.mark.parametrize(("kind", "verdict"), [
    ("assign", "allow"), ("reroute", "allow"), ("nudge", "allow"), ("label", "allow"),
    ("comment", "allow"), ("close_stale", "approve"), ("merge", "approve"),
    ("fix_drift", "approve"),  # known but listed nowhere: the operator decides
    ("delete_repo", "forbid"), ("delete_branch_with_open_pr", "forbid"),
    ("force_push_default_branch", "forbid"), ("delete", "forbid"),
])
def test_default_policy_verdicts(kind: str, verdict: str) -> None:
    assert decide(kind, DEFAULT).verdict == verdict


def test_unknown_kind_is_forbidden_in_every_mode() -> None:
    for mode in ("simple", "intelligent", "sovereign"):
        d = decide("rm_rf", PolicyConfig(allow=["rm_rf"]), mode=mode)  # type: ignore[arg-type]
        assert d.verdict == "forbid"
        assert "not a known action" in d.reason


def test_forbid_wins_even_when_allow_and_approve_list_it() -> None:
    p = PolicyConfig(allow=["merge", "assign"], approve=["merge"], forbid=["merge"])
    for mode in ("simple", "intelligent", "sovereign"):
        d = decide("merge", p, mode=mode)  # type: ignore[arg-type]
        assert (d.verdict, d.reason) == ("forbid", "policy.forbid lists merge")
    assert decide("assign", p).verdict == "allow"


def test_destructive_kinds_are_never_allowed_alone() -> None:
    # removed from forbid and slipped into allow (bypassing check_policy): still not taken alone
    p = PolicyConfig(allow=sorted(DESTRUCTIVE), approve=[], forbid=[])
    assert {decide(k, p).verdict for k in DESTRUCTIVE} == {"forbid"}
    # an operator who lists one under approve gets asked, never skipped
    p = PolicyConfig(allow=[], approve=["delete"], forbid=[])
    assert decide("delete", p).verdict == "approve"


def test_sovereign_turns_every_allowed_change_into_an_approval_but_comments() -> None:
    verdicts = {k: decide(k, DEFAULT, mode="sovereign").verdict for k in ACTION_KINDS}
    assert verdicts == {
        "comment": "allow", "nudge": "approve", "assign": "approve", "reroute": "approve",
        "label": "approve", "close_stale": "approve", "merge": "approve", "fix_drift": "approve",
        "delete": "forbid", "delete_repo": "forbid", "delete_branch_with_open_pr": "forbid",
        "force_push_default_branch": "forbid",
    }
    assert "sovereign" in decide("assign", DEFAULT, mode="sovereign").reason


def test_modes_other_than_sovereign_agree_and_bad_mode_raises() -> None:
    for k in ACTION_KINDS:
        assert decide(k, DEFAULT, mode="simple") == decide(k, DEFAULT, mode="intelligent")
    with pytest.raises(ValueError, match="mode"):
        decide("assign", DEFAULT, mode="wild")  # type: ignore[arg-type]


def test_check_policy_names_the_key() -> None:
    check_policy(DEFAULT)
    with pytest.raises(ConfigError, match=r"cfg.yaml: policy.approve\[1\]: unknown action 'nuke'"):
        check_policy(PolicyConfig(approve=["merge", "nuke"]), "cfg.yaml")
    with pytest.raises(ConfigError, match=r"policy.allow\[0\]: delete_repo is destructive"):
        check_policy(PolicyConfig(allow=["delete_repo"], forbid=[]))
    with pytest.raises(ConfigError, match="stale_close_days"):
        check_policy(PolicyConfig(stale_close_days=-1))


def test_policy_section_loads_through_the_config_loader() -> None:
    # The loader builds nested dataclasses generically; this is how `policy:` will be read once
    # Config has the field. Until then, build it the same way from its own mapping.
    p = _build(PolicyConfig, {"allow": ["nudge"], "stale_close_days": 30}, "cfg.yaml", "policy")
    assert p == PolicyConfig(allow=["nudge"], stale_close_days=30.0)
    with pytest.raises(ConfigError, match=r"policy.alow: unknown key"):
        _build(PolicyConfig, {"alow": []}, "cfg.yaml", "policy")


@pytest.mark.parametrize(("status", "approvals", "ok", "why"), [
    ("success", 1, True, "status success, 1 approving"),
    ("success", 0, False, "0 approving review(s), policy needs 1"),
    ("pending", 3, False, "combined status is pending"),
    ("failure", 1, False, "combined status is failure"),
    ("", 1, False, "combined status is unknown"),
])
def test_can_merge(status: str, approvals: int, ok: bool, why: str) -> None:
    got, reason = can_merge(status, approvals, DEFAULT)
    assert got is ok
    assert why in reason


def test_can_merge_follows_the_required_approvals() -> None:
    p = PolicyConfig(merge_requires_approvals=2)
    assert can_merge("success", 1, p)[0] is False
    assert can_merge("success", 2, p)[0] is True


def test_count_approvals_latest_review_per_user_counts() -> None:
    def rv(i: int, user: str, state: str, **kw: object) -> dict:
        return {"id": i, "user": {"login": user}, "state": state, **kw}

    reviews = [
        rv(1, "ann", "APPROVED"),
        rv(2, "bob", "APPROVED"),
        rv(3, "bob", "REQUEST_CHANGES"),  # bob changed his mind
        rv(4, "ann", "COMMENT"),  # a comment does not cancel ann's approval
        rv(5, "cid", "APPROVED", dismissed=True),
        rv(6, "dan", "APPROVED", stale=True),
    ]
    assert count_approvals(reviews) == 1
    assert count_approvals([*reviews, rv(7, "bob", "APPROVED")]) == 2


def issue(days_idle: float, **kw: object) -> Issue:
    base = dict(repo="o/r", number=1, title="t", created_at=NOW - timedelta(days=400),
                updated_at=NOW - timedelta(days=days_idle))
    return Issue(**{**base, **kw})  # type: ignore[arg-type]


def test_stale_to_close() -> None:
    assert stale_to_close(issue(60), NOW, DEFAULT) is True
    assert stale_to_close(issue(59.9), NOW, DEFAULT) is False
    assert stale_to_close(issue(90, state="closed"), NOW, DEFAULT) is False
    assert stale_to_close(issue(90, is_pull=True), NOW, DEFAULT) is False
    assert stale_to_close(issue(90), NOW, PolicyConfig(stale_close_days=0)) is False
    # no updated_at: falls back to created_at; naive times are UTC
    assert stale_to_close(issue(0, updated_at=None), NOW, DEFAULT) is True
    naive = issue(0, updated_at=(NOW - timedelta(days=61)).replace(tzinfo=None))
    assert stale_to_close(naive, NOW, DEFAULT) is True


def test_action_carries_provenance_into_its_event() -> None:
    key = action_key("nudge", "o/r#3", "run-42")
    assert key == "nudge:o/r#3:run-42"
    a = Action("nudge", "o/r#3", "no activity for 45 min on a claimed issue", key)
    ev = action_event(a, decide("nudge", DEFAULT), "done")
    assert ev == {"kind": "action", "subject": "o/r#3", "action": "nudge", "key": key,
                  "reason": "no activity for 45 min on a claimed issue", "verdict": "allow",
                  "why": "policy.allow lists nudge", "outcome": "done"}
    with pytest.raises(AttributeError):
        a.kind = "merge"  # type: ignore[misc]
