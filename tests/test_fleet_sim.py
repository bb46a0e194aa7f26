"""The fleet simulation's core (bench/bench_fleet.py) on a tiny world: 20 issues, one day."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pytest

from bench.bench_fleet import POLICIES, START, TRIAGE, World, _agent, generate, simulate
from dispatch.ledger import Ledger
from dispatch.triage import classify


@pytest.fixture(scope="module")
def world() -> World:
    return generate(seed=3, n=20)


@pytest.fixture(scope="module")
def runs(world: World) -> dict:
    return {p: simulate(world, p, seed=3, days=1) for p in POLICIES}


def _overlaps(rows: list[tuple[int, int]]) -> bool:
    rows = sorted(rows)
    return any(b_start < a_end for (_, a_end), (b_start, _) in zip(rows, rows[1:], strict=False))


@pytest.mark.parametrize("policy", POLICIES)
def test_every_resolved_issue_is_resolved_once_and_never_worked_after(runs, world, policy):
    rep = runs[policy]
    merged = rep.resolutions
    assert merged and len(merged) == len(set(merged)) == rep.resolved
    # the log holds finished attempts; at most one per agent is still running at the end
    assert len(rep.log) <= rep.attempts <= len(rep.log) + len(world.agents)
    done = {row[0]: row[4] for row in rep.log if row[5] == "merged"}
    for row in rep.log:
        assert row[3] < done.get(row[0], 10**9), f"#{row[0]} worked on after it was resolved"
    by_issue, by_agent = defaultdict(list), defaultdict(list)
    for issue, agent, _kind, start, end, _outcome in rep.log:
        by_issue[issue].append((start, end))
        by_agent[agent].append((start, end))
    assert not any(_overlaps(v) for v in by_issue.values()), "two attempts on one issue at once"
    assert not any(_overlaps(v) for v in by_agent.values()), "an agent on two issues at once"


@pytest.mark.parametrize("policy", POLICIES)
def test_epics_studies_and_blocked_issues_are_never_attempted(runs, world, policy):
    skipped = {i.number for i in world.issues if classify(i, [], TRIAGE)}
    assert skipped, "the generator should produce some issues to skip"
    assert not skipped & {row[0] for row in runs[policy].log}


def _stuck_world(world: World, stuck_rate: float) -> World:
    agents = (_agent("fast", ["bug"], [0.7] * 5, [4] * 5, stuck_rate, "test"),
              _agent("slow", ["docs"], [0.5] * 5, [8] * 5, stuck_rate, "test", kind="direct"))
    return replace(world, name=f"stuck{stuck_rate}", agents=agents)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_stuck_agent_is_detected_within_two_cycles_of_the_threshold(world, policy):
    rep = simulate(_stuck_world(world, 0.4), policy, seed=5, days=1)
    assert rep.stuck_episodes >= 3
    assert rep.missed == 0
    assert len(rep.nudge_delays) == rep.stuck_episodes
    assert all(0 <= d <= 2 for d in rep.nudge_delays), rep.nudge_delays
    released = [r for r in rep.log if r[5] == "released"]
    assert released and all(0 <= d <= 2 for d in rep.release_delays)
    assert len(released) == len(rep.release_delays)


def test_agents_that_never_go_quiet_are_never_released(world):
    rep = simulate(_stuck_world(world, 0.0), "simple", seed=5, days=1)
    assert rep.stuck_episodes == 0 and not rep.release_delays
    assert not [r for r in rep.log if r[5] == "released"]
    assert rep.resolved > 0


def test_same_seed_same_week_other_seed_other_week(world):
    a = simulate(world, "intelligent", seed=3, days=1)
    b = simulate(world, "intelligent", seed=3, days=1)
    c = simulate(world, "intelligent", seed=4, days=1)
    assert a.log == b.log and a.nudge_delays == b.nudge_delays
    assert a.log != c.log


def test_intelligent_learns_from_a_real_ledger(world, tmp_path):
    rep = simulate(world, "intelligent", seed=3, days=1, state_dir=tmp_path)
    with Ledger(tmp_path / f"ledger-{world.name}-intelligent.sqlite") as ledger:
        rates = ledger.success_rates(30, now=START.timestamp() + 2 * 86400)
    assert sum(r.attempts for r in rates.values()) == len(rep.log)
    assert sum(r.merged for r in rates.values()) == rep.resolved
