"""Intelligent routing: who should take an issue, judged by what each agent actually delivered.

`triage.route` matches declared strengths. Here each agent's measured record on this kind of
issue (attempts whose PR was merged, from the outcome ledger) decides, with the strengths as a
tie-breaker and as the fallback where nobody has a record yet. Pure: rates come in as data.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config import AgentConfig
from .forge import Issue
from .ledger import Rate, issue_kind
from .triage import Route, issue_words, route, strength_fit

MIN_ATTEMPTS = 3  # fewer attempts than this on a kind say too little to trust
OPTIMISM = 0.7  # what a short record is assumed worth: one early failure must not end exploration
FLOOR = 0.15  # an idle agent whose best expected success is below this stays idle


def expected_success(rate: Rate | None) -> float:
    """Merged / attempts with Laplace smoothing; a record shorter than MIN_ATTEMPTS is given
    the benefit of the doubt, so every agent keeps being tried on a kind until it is known."""
    if rate is None or rate.attempts < MIN_ATTEMPTS:
        return max(OPTIMISM, (rate.merged + 1) / (rate.attempts + 2)) if rate else OPTIMISM
    return (rate.merged + 1) / (rate.attempts + 2)


def route_learned(
    issue: Issue,
    agents: list[AgentConfig],
    load: Mapping[str, int] | None,
    rates: Mapping[tuple[str, str], Rate],
    *,
    kind: str | None = None,
) -> Route:
    """The agent most likely to get this kind of issue merged; reasons quote the numbers."""
    load = load or {}
    kind = kind or issue_kind(issue.labels, issue.title)
    free = [a for a in agents if load.get(a.name, 0) < a.max_concurrent]
    known = [a for a in free if (r := rates.get((a.name, kind))) and r.attempts >= MIN_ATTEMPTS]
    if not known:
        base = route(issue, agents, load)
        return Route(base.agent, (*base.reasons, f"no agent has {MIN_ATTEMPTS}+ attempts on {kind} issues yet"))
    label_words, text_words = issue_words(issue)
    best = None
    for index, agent in enumerate(free):
        p = expected_success(rates.get((agent.name, kind)))
        fit, _ = strength_fit(agent, label_words, text_words)
        # the record decides; fit and load only break near-ties
        key = (-round(p, 2), -fit, load.get(agent.name, 0), index)
        if best is None or key < best[0]:
            best = (key, agent, p)
    _, agent, p = best
    reasons: list[str] = []
    for a in free:
        r = rates.get((a.name, kind))
        if r and r.attempts:
            reasons.append(f"{a.name}: {r.merged}/{r.attempts} {kind} attempts merged "
                           f"({r.success_rate:.0%}), mean {r.mean_duration_s / 60:.0f} min")
    reasons.append(f"{agent.name} has the best expected success on {kind} issues ({p:.0%})")
    return Route(agent.name, tuple(reasons))


class Learned:
    """The routing choices of `intelligent` mode, for `watchdog.decide`: who takes a re-routed
    issue (`route`) and which free issue an idle agent takes when none is routed to it (`pick`)."""

    def __init__(self, rates: Mapping[tuple[str, str], Rate]) -> None:
        self.rates = rates

    def route(self, issue: Issue, agents: list[AgentConfig], load: Mapping[str, int] | None = None) -> Route:
        return route_learned(issue, agents, load, self.rates)

    def pick(self, agent: AgentConfig, free: list) -> object | None:
        """The free ranked issue of the kind this agent does best on, highest-ranked first;
        None when it is unlikely to succeed at any of them (an attempt costs, a wait does not)."""
        best, best_key = None, None
        for index, item in enumerate(free):
            p = expected_success(self.rates.get((agent.name, issue_kind(item.issue.labels, item.issue.title))))
            key = (-round(p, 1), index)
            if p >= FLOOR and (best_key is None or key < best_key):
                best, best_key = item, key
        return best
