"""What the fleet may do on its own: the `policy:` config section and the verdict on each action.

Action kinds form a closed set (ACTION_KINDS); anything else is forbidden. Verdicts, in order:

1. an unknown kind is forbidden;
2. a kind listed in `forbid` is forbidden, even when `allow` or `approve` also lists it, so no
   routing rule or config slip can unlock it;
3. a destructive kind (DESTRUCTIVE) is never allowed alone: listed in `approve` it needs the
   operator, otherwise it is forbidden;
4. a kind in `allow` is allowed, except in `sovereign` mode, where every allowed kind but
   `comment` needs approval (the operator signs off on everything that changes the forge beyond
   talking);
5. a kind in `approve` needs approval; a known kind listed nowhere needs approval too.

`simple` and `intelligent` differ only in routing, never in what is permitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from .errors import ConfigError
from .forge import Issue

Verdict = Literal["allow", "approve", "forbid"]
Mode = Literal["simple", "intelligent", "sovereign"]
MODES = ("simple", "intelligent", "sovereign")

ACTION_KINDS: dict[str, str] = {
    "comment": "post a comment (a report, a note, an explanation)",
    "nudge": "remind a stuck agent on its claimed issue",
    "assign": "hand an issue to an idle agent (label + comment, or start a sprint)",
    "reroute": "release a stuck claim and route the issue to another agent",
    "label": "add or remove a label",
    "close_stale": "close an issue untouched for policy.stale_close_days, with a note",
    "merge": "merge a PR whose combined status is success and that has enough approvals",
    "fix_drift": "rewrite an agent's config file to the expected model (with a backup)",
    "delete": "delete anything on the forge (issue, comment, label, branch, release)",
    "delete_repo": "delete a repository",
    "delete_branch_with_open_pr": "delete a branch that an open PR comes from",
    "force_push_default_branch": "force-push to a repository's default branch",
}
DESTRUCTIVE = frozenset({"delete", "delete_repo", "delete_branch_with_open_pr",
                         "force_push_default_branch"})
SOVEREIGN_FREE = frozenset({"comment"})  # what sovereign mode still lets through unapproved


@dataclass(frozen=True)
class PolicyConfig:
    """The `policy:` config section. Lists hold kinds from ACTION_KINDS."""

    allow: list[str] = field(
        default_factory=lambda: ["assign", "reroute", "nudge", "label", "comment"]
    )  # taken alone
    approve: list[str] = field(default_factory=lambda: ["close_stale", "merge"])  # operator first
    forbid: list[str] = field(
        default_factory=lambda: ["delete_repo", "delete_branch_with_open_pr",
                                 "force_push_default_branch", "delete"]
    )  # never, whatever else says so
    stale_close_days: float = 60  # days without an update before close_stale applies; 0 = never
    merge_requires_approvals: int = 1  # approving reviews a PR needs before merge applies


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str


@dataclass(frozen=True)
class Action:
    """One intended forge action and its provenance; `key` makes it idempotent (see journal)."""

    kind: str  # one of ACTION_KINDS
    target: str  # what it acts on, e.g. "owner/repo#12"
    reason: str  # why, in one line: shown in comments, events and the report
    key: str  # idempotency key, e.g. "nudge:owner/repo#12:<claim run id>"


def action_key(kind: str, target: str, *parts: object) -> str:
    """The conventional key: kind, target, then whatever makes this occurrence unique."""
    return ":".join([kind, target, *(str(p) for p in parts)])


def decide(kind: str, policy: PolicyConfig, *, mode: Mode = "simple") -> Decision:
    """The verdict on one kind of action under `policy` and the cycle `mode`; pure."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if kind not in ACTION_KINDS:
        return Decision("forbid", f"{kind!r} is not a known action kind")
    if kind in policy.forbid:
        return Decision("forbid", f"policy.forbid lists {kind}")
    if kind in DESTRUCTIVE:
        if kind in policy.approve:
            return Decision("approve", f"{kind} is destructive: the operator decides")
        return Decision("forbid", f"{kind} is destructive and not listed in policy.approve")
    if kind in policy.allow:
        if mode == "sovereign" and kind not in SOVEREIGN_FREE:
            return Decision("approve", f"sovereign mode: {kind} waits for the operator")
        return Decision("allow", f"policy.allow lists {kind}")
    if kind in policy.approve:
        return Decision("approve", f"policy.approve lists {kind}")
    return Decision("approve", f"{kind} is not listed in policy; the operator decides")


def check_policy(policy: PolicyConfig, source: str = "config") -> None:
    """Raise ConfigError naming the key when a list holds an unknown or unallowable kind."""
    for name in ("allow", "approve", "forbid"):
        for i, kind in enumerate(getattr(policy, name)):
            if kind not in ACTION_KINDS:
                known = ", ".join(sorted(ACTION_KINDS))
                raise ConfigError(f"{source}: policy.{name}[{i}]: unknown action {kind!r}; "
                                  f"expected one of: {known}")
            if name == "allow" and kind in DESTRUCTIVE:
                raise ConfigError(f"{source}: policy.allow[{i}]: {kind} is destructive and can "
                                  "never be taken alone; list it under approve or forbid")
    if policy.stale_close_days < 0:
        raise ConfigError(f"{source}: policy.stale_close_days: expected 0 (never) or more days")
    if policy.merge_requires_approvals < 0:
        raise ConfigError(f"{source}: policy.merge_requires_approvals: expected 0 or more")


# ---- conditions on specific actions --------------------------------------------------------


def can_merge(pr_status: str, approvals: int, policy: PolicyConfig) -> tuple[bool, str]:
    """Merge only on a combined commit status of success and enough approving reviews."""
    if pr_status != "success":
        return False, f"combined status is {pr_status or 'unknown'}, not success"
    need = policy.merge_requires_approvals
    if approvals < need:
        return False, f"{approvals} approving review(s), policy needs {need}"
    return True, f"status success, {approvals} approving review(s) (needs {need})"


def count_approvals(reviews: list[dict]) -> int:
    """Reviewers whose latest counting review approves (Gitea's /pulls/{n}/reviews items).

    A later REQUEST_CHANGES cancels the same reviewer's approval; comments do not change it;
    dismissed and stale (older commit) reviews do not count.
    """
    latest: dict[str, str] = {}
    for r in sorted(reviews, key=lambda r: r.get("id", 0)):
        state = r.get("state", "")
        if r.get("dismissed") or r.get("stale") or state not in ("APPROVED", "REQUEST_CHANGES"):
            continue
        latest[(r.get("user") or {}).get("login", "")] = state
    return sum(1 for s in latest.values() if s == "APPROVED")


def stale_to_close(issue: Issue, now: datetime, policy: PolicyConfig) -> bool:
    """An open issue (not a PR) untouched for at least stale_close_days; 0 days disables."""
    if policy.stale_close_days <= 0 or issue.is_pull or issue.state != "open":
        return False
    last = issue.updated_at or issue.created_at
    if last is None:
        return False
    last = last if last.tzinfo else last.replace(tzinfo=UTC)  # naive means UTC, as in triage
    now = now if now.tzinfo else now.replace(tzinfo=UTC)
    return (now - last).total_seconds() >= policy.stale_close_days * 86400


def action_event(action: Action, decision: Decision, outcome: str) -> dict:
    """The telemetry event recording one action with its provenance (events.jsonl row body).

    `outcome`: done, skipped (already done), waiting (for approval), refused (forbidden), failed.
    """
    return {"kind": "action", "subject": action.target, "action": action.kind,
            "key": action.key, "reason": action.reason, "verdict": decision.verdict,
            "why": decision.reason, "outcome": outcome}
