"""Intelligent routing: measured success on a kind of issue beats declared strengths."""

from __future__ import annotations

from dispatch.config import AgentConfig
from dispatch.forge import Issue
from dispatch.ledger import Rate
from dispatch.routing import OPTIMISM, Learned, expected_success, route_learned
from dispatch.triage import Ranked, Route, Score

AGENTS = [AgentConfig(name="claude", strengths=["bug"], max_concurrent=2),
          AgentConfig(name="local", strengths=["docs"], max_concurrent=2)]
BUG = Issue(repo="o/r", number=1, title="Crash on save", labels=("bug",))


def test_no_record_falls_back_to_strengths():
    r = route_learned(BUG, AGENTS, {}, {})
    assert r.agent == "claude"
    assert "no agent has 3+ attempts on bug issues yet" in r.reasons[-1]


def test_a_measured_record_beats_declared_strengths():
    rates = {("claude", "bug"): Rate(10, 2, 0.2, 600.0), ("local", "bug"): Rate(10, 8, 0.8, 300.0)}
    r = route_learned(BUG, AGENTS, {}, rates)
    assert r.agent == "local"
    assert "local: 8/10 bug attempts merged (80%), mean 5 min" in r.reasons
    assert r.reasons[-1] == "local has the best expected success on bug issues (75%)"


def test_capacity_still_applies():
    rates = {("local", "bug"): Rate(10, 9, 0.9, 60.0), ("claude", "bug"): Rate(5, 1, 0.2, 60.0)}
    r = route_learned(BUG, AGENTS, {"local": 2}, rates)
    assert r.agent == "claude"


def test_short_records_are_explored_long_ones_trusted():
    assert expected_success(None) == OPTIMISM
    # one early failure does not end exploration ...
    assert expected_success(Rate(1, 0, 0.0, 0)) == OPTIMISM
    # ... a known record decides, smoothed
    assert expected_success(Rate(10, 1, 0.1, 0)) == 2 / 12
    assert expected_success(Rate(1, 1, 1.0, 0)) < expected_success(Rate(20, 18, 0.9, 0))


def test_an_explored_agent_is_tried_again_after_one_failure():
    rates = {("claude", "bug"): Rate(1, 0, 0.0, 60.0), ("local", "bug"): Rate(10, 5, 0.5, 60.0)}
    assert route_learned(BUG, AGENTS, {}, rates).agent == "claude"


def test_an_idle_agent_picks_the_kind_it_does_best_and_waits_when_hopeless():
    docs = Issue(repo="o/r", number=2, title="Write the guide", labels=("docs",))
    ranked = [Ranked(BUG, Score(10.0, ()), Route(None, ())), Ranked(docs, Score(5.0, ()), Route(None, ()))]
    rates = {("local", "bug"): Rate(10, 0, 0.0, 60.0), ("local", "docs"): Rate(10, 8, 0.8, 60.0)}
    assert Learned(rates).pick(AGENTS[1], ranked).issue is docs  # lower-ranked, but its kind
    hopeless = {("local", "bug"): Rate(20, 0, 0.0, 60.0), ("local", "docs"): Rate(20, 0, 0.0, 60.0)}
    assert Learned(hopeless).pick(AGENTS[1], ranked) is None
