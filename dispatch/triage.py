"""Triage: which open issues an agent may take, in what order, and which agent should take each.

Pure functions over fetched records; every decision carries short human-readable reasons so
`dispatch triage` can explain itself.
"""

from __future__ import annotations

import functools
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from .config import AgentConfig, TriageConfig
from .forge import Issue, PullRequest

# Priority tiers are 100 apart and every other positive component together stays below 100
# (age <= 25, stale 10, type <= 50, size <= 5; size can take off 5), so priority always decides
# between tiers. Only an open dependency (-150) is meant to push an issue below the next tier.
TIER_WEIGHT = {0: 400.0, 1: 300.0, 2: 200.0, 3: 100.0}
UNPRIORITISED_TIER = 2  # no priority label: treated as medium, so an explicit "low" sinks below it
AGE_CAP, STALE_BONUS, SIZE_SPAN, DEPENDENCY_PENALTY = 25.0, 10.0, 5.0, -150.0
TYPE_BOOST = {"security": 50.0, "bug": 40.0}
TYPE_WORDS = {"security": "security", "vulnerability": "security", "cve": "security",
              "bug": "bug", "defect": "bug", "regression": "bug", "crash": "bug"}
TIER_WORDS = {"critical": 0, "urgent": 0, "blocker": 0, "highest": 0, "high": 1,
              "medium": 2, "normal": 2, "low": 3, "lowest": 3, "minor": 3}

LABEL_WEIGHT, TEXT_WEIGHT = 2, 1  # a label is a deliberate statement; a word in prose is a hint
# Small on purpose: stemming (below) already folds tests/testing -> test, docs -> doc,
# refactoring -> refactor; these cover words that stemming cannot relate.
SYNONYMS = {"documentation": "doc", "readme": "doc", "unittest": "test", "pytest": "test",
            "vuln": "security", "vulnerability": "security", "perf": "performance",
            "arch": "architecture", "ci": "infra", "infrastructure": "infra"}

_WORD = re.compile(r"[a-z0-9]+")
_REF = re.compile(r"(?<![\w/#])(?:([\w.-]+/[\w.-]+))?#(\d+)\b")
_DEP = re.compile(r"\b(?:depends\s+on|blocked\s+by|after|requires)\s*:?\s*"
                  r"((?:#\d+\b(?:\s*(?:,|and|&)\s*)?)+)", re.IGNORECASE)
_CHECKBOX = re.compile(r"^\s*[-*]\s+\[ \]", re.MULTILINE)


@dataclass(frozen=True)
class Skip:
    issue: Issue
    reason: str


@dataclass(frozen=True)
class Score:
    value: float
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Route:
    agent: str | None
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Ranked:
    issue: Issue
    score: Score
    route: Route


@dataclass(frozen=True)
class TriageResult:
    ranked: tuple[Ranked, ...]
    skipped: tuple[Skip, ...]


def ready_label(agent_name: str) -> str:
    return f"{agent_name}-ready"


# ---- filter --------------------------------------------------------------------------------


def classify(issue: Issue, open_pulls: list[PullRequest], policy: TriageConfig) -> str | None:
    """Why the issue must not be dispatched, or None when it is eligible."""
    labels = {lb.lower() for lb in issue.labels}
    if issue.is_pull:
        return "pull request"
    if issue.state != "open":
        return issue.state
    if issue.ref in policy.skip_refs:
        return "excluded (the operator issue, or triage.skip_refs)"
    kind = _skip_kind(issue, labels, policy)
    if kind:
        return kind
    if policy.claim_label.lower() in labels:
        return f"claimed ({policy.claim_label})"
    if issue.assignees:
        return "assigned to " + ", ".join(issue.assignees)
    blocked = sorted(labels & {b.lower() for b in policy.blocked_labels})
    if blocked:
        return "blocked" if blocked == ["blocked"] else f"blocked ({blocked[0]})"
    pr = next((p for p in open_pulls if _pr_references(p, issue)), None)
    return f"open PR #{pr.number} references it" if pr else None


def _skip_kind(issue: Issue, labels: set[str], policy: TriageConfig) -> str | None:
    hit = sorted(labels & {s.lower() for s in policy.skip_labels})
    if hit:
        return hit[0]
    title = issue.title.lstrip().lower()
    for tag in ("epic", "study"):
        if title.startswith(f"[{tag}]"):
            return tag
    return None


def _pr_references(pr: PullRequest, issue: Issue) -> bool:
    if pr.repo != issue.repo or pr.state != "open":
        return False
    # our own branch convention (prompt.branch_name) links the PR even without a "Closes #N"
    if pr.head.startswith(f"dispatch/{issue.number}-"):
        return True
    return issue.number in references(f"{pr.title}\n{pr.body}", issue.repo)


def references(text: str, repo: str) -> set[int]:
    """Issue numbers of `repo` that `text` mentions as `#N` or `owner/repo#N` (not `x#N`)."""
    found = set()
    for m in _REF.finditer(text):
        if m.group(1) is None or m.group(1).lower() == repo.lower():
            found.add(int(m.group(2)))
    return found


# ---- score ---------------------------------------------------------------------------------


def score(
    issue: Issue, policy: TriageConfig, now: datetime, open_numbers: frozenset[int] = frozenset()
) -> Score:
    """Higher is sooner. Priority dominates; age, staleness, type and size order within a tier."""
    parts = [
        _priority(issue),
        _type_boost(issue),
        _age(issue, now),
        _staleness(issue, policy, now),
        _size(issue),
        _dependencies(issue, open_numbers),
    ]
    kept = [(round(v, 1), why) for v, why in parts if round(v, 1) != 0]
    return Score(round(sum(v for v, _ in kept), 1), tuple(why for _, why in kept))


def priority_tier(labels: Iterable[str]) -> tuple[int, str] | None:
    """The most urgent tier (0 = most urgent) any label states, with that label."""
    found = []
    for label in labels:
        words = _WORD.findall(label.lower())
        tier = next((int(w[1]) for w in words if re.fullmatch(r"p[0-3]", w)), None)
        if tier is None and {"critical", "urgent"} & set(words):
            tier = 0
        if tier is None and {"priority", "prio"} & set(words):
            tier = min((TIER_WORDS[w] for w in words if w in TIER_WORDS), default=1)
        if tier is not None:
            found.append((tier, label))
    return min(found) if found else None


def _priority(issue: Issue) -> tuple[float, str]:
    hit = priority_tier(issue.labels)
    if hit is None:
        w = TIER_WEIGHT[UNPRIORITISED_TIER]
        return w, f"unprioritised (as P{UNPRIORITISED_TIER}) +{w:g}"
    tier, label = hit
    named = "" if label.lower() == f"p{tier}" else f" ({label})"
    return TIER_WEIGHT[tier], f"P{tier}{named} +{TIER_WEIGHT[tier]:g}"


def _type_boost(issue: Issue) -> tuple[float, str]:
    words = {w for lb in issue.labels for w in _WORD.findall(lb.lower())}
    kinds = {TYPE_WORDS[w] for w in words if w in TYPE_WORDS}
    if not kinds:
        return 0.0, ""
    # the largest applies, not the sum: a "security bug" is one urgent thing
    kind = max(kinds, key=lambda k: TYPE_BOOST[k])
    return TYPE_BOOST[kind], f"{kind} +{TYPE_BOOST[kind]:g}"


def _days(then: datetime | None, now: datetime) -> float | None:
    if then is None:
        return None
    aware = [t if t.tzinfo else t.replace(tzinfo=UTC) for t in (then, now)]  # naive means UTC
    return max(0.0, (aware[1] - aware[0]).total_seconds() / 86400)


def _age(issue: Issue, now: datetime) -> tuple[float, str]:
    days = _days(issue.created_at, now)
    if days is None:
        return 0.0, ""
    # logarithmic: a week vs. a day matters, a year vs. two hardly does
    v = round(min(AGE_CAP, 5 * math.log1p(days)), 1)
    return v, f"age {days:.0f}d +{v}"


def _staleness(issue: Issue, policy: TriageConfig, now: datetime) -> tuple[float, str]:
    days = _days(issue.updated_at or issue.created_at, now)
    if days is None or days <= policy.stale_days:
        return 0.0, ""
    return STALE_BONUS, f"untouched {days:.0f}d +{STALE_BONUS:g}"


def _size(issue: Issue) -> tuple[float, str]:
    """Small issues get up to +5, big ones down to -5.

    Unattended agents finish small, well-scoped changes far more often than sprawling ones, and
    each open checklist item is a separate step that can fail. An empty body earns nothing: too
    little to act on is not the same as small.
    """
    body = issue.body.strip()
    if not body:
        return 0.0, ""
    tasks = len(_CHECKBOX.findall(body))
    bulk = min(2 * SIZE_SPAN, len(body) / 1000 + tasks)
    v = round(SIZE_SPAN - bulk, 1)
    sign = "+" if v >= 0 else ""
    return v, f"size {len(body)} chars, {tasks} open tasks {sign}{v}"


def dependencies(issue: Issue) -> list[int]:
    """Issue numbers this one says it waits for ("depends on #4", "blocked by #4, #5")."""
    nums = []
    for m in _DEP.finditer(f"{issue.title}\n{issue.body}"):
        nums += [int(n) for n in re.findall(r"#(\d+)", m.group(1))]
    return sorted({n for n in nums if n != issue.number})


def _dependencies(issue: Issue, open_numbers: frozenset[int]) -> tuple[float, str]:
    waiting = [n for n in dependencies(issue) if n in open_numbers]
    if not waiting:
        return 0.0, ""
    refs = ", ".join(f"#{n}" for n in waiting)
    return DEPENDENCY_PENALTY, f"depends on open {refs} {DEPENDENCY_PENALTY:g}"


# ---- route ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8192)  # a backlog repeats few words many times: 70k calls, ~3k words
def normalize(word: str) -> str:
    """Fold a word to the form strengths are matched in: synonyms, then crude stemming."""
    w = SYNONYMS.get(word.lower(), word.lower())
    if w.endswith("ing") and len(w) >= 7:
        w = w[:-3]
    elif w.endswith("s") and len(w) > 3 and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    return SYNONYMS.get(w, w)


def _words(text: str) -> set[str]:
    return {normalize(w) for w in _WORD.findall(text.lower())}


def issue_words(issue: Issue) -> tuple[set[str], set[str]]:
    """(label words, title and body words), normalised for matching strengths."""
    return _words(" ".join(issue.labels)), _words(f"{issue.title}\n{issue.body}")


def strength_fit(agent: AgentConfig, label_words: set[str], text_words: set[str]) -> tuple[int, list[str]]:
    """How well an agent's strengths match an issue: labels weigh more than text."""
    fit, matched = 0, []
    for word in sorted(_words(" ".join(agent.strengths))):
        if word in label_words:
            fit, matched = fit + LABEL_WEIGHT, [*matched, f"{word} (label)"]
        elif word in text_words:
            fit, matched = fit + TEXT_WEIGHT, [*matched, word]
    return fit, matched


def route(
    issue: Issue, agents: list[AgentConfig], load: Mapping[str, int] | None = None
) -> Route:
    """The best-fitting agent with spare capacity; ties go to lower load, then config order."""
    if not agents:
        return Route(None, ("no agents configured",))
    load = load or {}
    label_words, text_words = issue_words(issue)
    reasons: list[str] = []
    candidates = []
    for index, agent in enumerate(agents):
        held = load.get(agent.name, 0)
        if held >= agent.max_concurrent:
            reasons.append(f"{agent.name} at capacity ({held}/{agent.max_concurrent})")
            continue
        fit, matched = strength_fit(agent, label_words, text_words)
        candidates.append((-fit, held, index, agent.name, matched))
    if not candidates:
        return Route(None, (*reasons, "all agents at capacity"))
    neg_fit, held, _, name, matched = min(candidates)
    if neg_fit == 0:  # nobody fits, so the minimum above is simply the least loaded
        return Route(name, (*reasons, "no strength matched; least loaded"))
    why = f"{name} matched {', '.join(matched)} (fit {-neg_fit}, load {held})"
    return Route(name, (*reasons, why))


def agent_load(
    issues: Iterable[Issue], agents: list[AgentConfig], policy: TriageConfig
) -> dict[str, int]:
    """Claimed, still-open issues per agent: assigned to its account or labelled `<name>-ready`."""
    counts = {a.name: 0 for a in agents}
    claim = policy.claim_label.lower()
    for issue in issues:
        labels = {lb.lower() for lb in issue.labels}
        if issue.state != "open" or claim not in labels:
            continue
        for a in agents:
            if (a.account and a.account in issue.assignees) or ready_label(a.name).lower() in labels:
                counts[a.name] += 1
    return counts


# ---- together ------------------------------------------------------------------------------


def triage(
    issues: Iterable[Issue],
    open_pulls: list[PullRequest],
    agents: list[AgentConfig],
    policy: TriageConfig,
    now: datetime,
) -> TriageResult:
    """Filter, score, route and rank a backlog that may span several repos."""
    issues = list(issues)
    load = agent_load(issues, agents, policy)
    open_by_repo, pulls_by_repo = defaultdict(set), defaultdict(list)
    for i in issues:
        if i.state == "open":
            open_by_repo[i.repo].add(i.number)
    for p in open_pulls:
        pulls_by_repo[p.repo].append(p)
    ranked, skipped = [], []
    for issue in sorted(issues, key=lambda i: (i.repo, i.number)):
        reason = classify(issue, pulls_by_repo[issue.repo], policy)
        if reason:
            skipped.append(Skip(issue, reason))
            continue
        s = score(issue, policy, now, frozenset(open_by_repo[issue.repo]))
        ranked.append(Ranked(issue, s, route(issue, agents, load)))
    ranked.sort(key=lambda r: (-r.score.value, r.issue.repo, r.issue.number))
    return TriageResult(tuple(ranked), tuple(skipped))
