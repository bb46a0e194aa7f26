"""Fleet simulation: a week of 5-minute orchestrator cycles over a generated backlog, in-process.

Run: .venv/bin/python bench/bench_fleet.py [--days 7 --issues 300 --seed 7]

Each policy runs against the same world and seed. The agents' declared strengths are config;
their true per-kind success rates, speeds and stuck rates are hidden from the policies.
- naive: the first eligible issue by number, to idle agents in round-robin order;
- simple: `triage.triage` ranking and routes (declared strengths), assigned by `watchdog.decide`;
- intelligent: the same, routed by `routing.Learned` (re-routes, idle picks) from a real `Ledger` that starts
  empty and records every attempt of this run (as `dispatch cycle --mode intelligent` does).
Stuck detection is the real `watchdog.decide` for every policy: nudge, then release + re-route.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dispatch.claims import Claim  # noqa: E402
from dispatch.config import AgentConfig, TriageConfig  # noqa: E402
from dispatch.forge import Issue  # noqa: E402
from dispatch.ledger import Ledger, issue_kind  # noqa: E402
from dispatch.loop import LoopConfig  # noqa: E402
from dispatch.results import ResultRow  # noqa: E402
from dispatch.routing import Learned  # noqa: E402
from dispatch.triage import classify, dependencies, ready_label, triage  # noqa: E402
from dispatch.watchdog import Observation, Watch, WatchdogConfig, decide  # noqa: E402

REPO = "fleet/app"
START = datetime(2025, 3, 3, tzinfo=UTC)  # a Monday; the simulated clock, never the wall clock
CYCLE = timedelta(minutes=5)
KINDS = ("bug", "feature", "docs", "tests", "refactor")
WAITING_ODDS = 0.25  # work on an issue whose dependency is still open rarely lands
SIZES = {"small": (1, 1.0), "medium": (2, 0.85), "large": (4, 0.6)}  # (duration x, success x)
POLICIES = ("naive", "simple", "intelligent")
WORLDS = ("mixed", "uniform")
TRIAGE = TriageConfig()
WATCH = WatchdogConfig(stuck_minutes=30, reassign_minutes=60)
SKIP = LoopConfig()  # max_failures in a row on one issue, then it rests skip_hours


@dataclass(frozen=True)
class SimAgent:
    config: AgentConfig
    success: dict[str, float]  # hidden: kind -> chance an attempt on a small issue is merged
    cycles: dict[str, int]  # hidden: kind -> cycles an attempt on a small issue takes
    stuck_rate: float  # hidden: chance an attempt goes silent part-way and never finishes
    note: str  # what it stands for


@dataclass(frozen=True)
class World:
    name: str
    issues: tuple[Issue, ...]
    size: dict[int, str]  # hidden: issue number -> small | medium | large
    agents: tuple[SimAgent, ...]


@dataclass
class Attempt:
    run_id: str
    agent: SimAgent
    issue: Issue
    ends: int  # cycle at which it finishes, unless it goes silent first
    success: bool
    silent_at: datetime | None  # when it goes quiet for good (a stuck attempt), else None
    rng: random.Random
    started: datetime
    last_activity: datetime
    nudged: bool = False
    detected: bool = False  # the watchdog acted on it after it went silent
    start_cycle: int = 0


@dataclass
class Report:
    world: str
    policy: str
    resolved: int = 0
    urgent_resolved: int = 0  # P0/P1
    urgent_total: int = 0
    attempts: int = 0
    failed: int = 0
    idle_cycles: int = 0
    agent_cycles: int = 0
    stuck_episodes: int = 0  # silent attempts whose nudge threshold passed within the week
    nudge_delays: list[float] = field(default_factory=list)  # cycles past the nudge threshold
    release_delays: list[float] = field(default_factory=list)  # cycles past the release threshold
    missed: int = 0  # stuck episodes past the threshold that were never nudged
    false_nudges: int = 0  # nudges on attempts that were still working
    log: list[tuple[int, str, str, int, int, str]] = field(default_factory=list)
    # ^ one row per attempt: (issue, agent, kind, start cycle, end cycle, merged|failed|released)
    wall_s: float = 0.0

    @property
    def resolutions(self) -> list[int]:
        return [row[0] for row in self.log if row[5] == "merged"]

    @property
    def idle_pct(self) -> float:
        return 100 * self.idle_cycles / max(1, self.agent_cycles)


# ---- the world --------------------------------------------------------------------------------


def _agent(name, strengths, success, cycles, stuck, note, *, max_concurrent=1, kind="cli"):
    return SimAgent(AgentConfig(name, strengths, max_concurrent, kind=kind),
                    dict(zip(KINDS, success, strict=True)), dict(zip(KINDS, cycles, strict=True)),
                    stuck, note)


def fleet(kind: str = "mixed") -> tuple[SimAgent, ...]:
    """Four agents. `mixed`: a plausible heterogeneous fleet; `uniform`: equal agents, for contrast."""
    if kind == "uniform":
        return tuple(_agent(n, s, [0.6] * 5, [8, 10, 4, 6, 10], 0.05, "average at everything")
                     for n, s in (("claude", ["architecture", "refactor"]), ("qwen14b", ["tests", "docs"]),
                                  ("hermes", ["bug", "feature"]), ("qwen7b", ["docs", "typo"])))
    #                   bug   feat  docs  tests refac     bug feat docs tests refac (cycles)
    return (
        _agent("claude", ["architecture", "refactor", "security", "feature"],
               [.85, .80, .90, .90, .80], [6, 8, 3, 4, 8], 0.02,
               "cloud agent: good at everything, one session at a time"),
        _agent("qwen14b", ["tests", "docs"],
               [.45, .35, .85, .80, .10], [12, 14, 6, 8, 16], 0.08,
               "local 14B model: good at tests/docs, poor at refactors, slow"),
        _agent("hermes", ["bug", "feature", "refactor", "performance"],
               [.45, .30, .70, .55, .15], [8, 10, 4, 6, 10], 0.05,
               "mid agent whose declared strengths overstate it (bug/feature/refactor)"),
        _agent("qwen7b", ["docs", "typo"],
               [.20, .10, .75, .40, .05], [6, 8, 3, 5, 8], 0.12,
               "small local model: docs only, often goes quiet", kind="direct"),
    )


def generate(seed: int, n: int = 300, agents: str = "mixed") -> World:
    """A backlog of `n` issues: kinds by label, P0-P3, sizes, some epics, studies, blocked ones
    and dependencies (an attempt while a dependency is still open rarely succeeds)."""
    rng = random.Random(seed)
    issues, size = [], {}
    for num in range(1, n + 1):
        kind = rng.choices(KINDS, weights=(30, 25, 15, 15, 15))[0]
        prio = rng.choices(("P0", "P1", "P2", "P3"), weights=(5, 20, 45, 30))[0]
        size[num] = rng.choices(tuple(SIZES), weights=(50, 35, 15))[0]
        labels, title = [kind, prio], f"{kind.capitalize()} {num}: {rng.choice(TOPICS[kind])}"
        roll = rng.random()
        if roll < 0.03:
            title = f"[epic] {title}"
        elif roll < 0.05:
            labels.append("study")
        elif roll < 0.08:
            labels.append("blocked")
        body = "Details.\n" * {"small": 5, "medium": 60, "large": 200}[size[num]]
        body += "- [ ] step\n" * {"small": 0, "medium": 2, "large": 5}[size[num]]
        if rng.random() < 0.08:
            body += f"\nDepends on #{rng.randint(1, n)}\n"
        created = START - timedelta(days=120 * (n - num) / n, hours=rng.random() * 24)
        issues.append(Issue(REPO, num, title, body, labels=tuple(labels), created_at=created,
                            updated_at=created + timedelta(days=rng.random() * 10)))
    return World(agents, tuple(issues), size, fleet(agents))


TOPICS = {"bug": ["crash on empty config", "wrong exit code", "race in lock file"],
          "feature": ["add --json output", "support Forgejo", "export HTML report"],
          "docs": ["document the crontab", "fix README typo", "explain quotas"],
          "tests": ["cover the retry path", "add unittest for pagination", "pytest for claims"],
          "refactor": ["split the runner", "cleanup telemetry writer", "refactor the router"]}


# ---- one run ----------------------------------------------------------------------------------


def simulate(world: World, policy: str, *, seed: int = 7, days: float = 7,
             state_dir: Path | None = None) -> Report:
    """Run one policy over the world; `state_dir` holds the intelligent policy's ledger."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(state_dir or tmp) / f"ledger-{world.name}-{policy}.sqlite")
        try:
            report = _run(world, policy, seed, int(days * 24 * 60 / 5), ledger)
        finally:
            ledger.close()
    report.wall_s = time.perf_counter() - t0
    return report


def _run(world: World, policy: str, seed: int, cycles: int, ledger: Ledger) -> Report:
    rep = Report(world.name, policy)
    by_num = {i.number: i for i in world.issues}
    configs = [a.config for a in world.agents]
    sim = {a.config.name: a for a in world.agents}
    eligible = {i.number for i in world.issues if classify(i, [], TRIAGE) is None}
    rep.urgent_total = sum(1 for n in eligible if {"P0", "P1"} & set(by_num[n].labels))
    closed: set[int] = set()
    active: dict[str, Attempt] = {}  # agent -> its attempt (one at a time)
    queued: dict[str, list[int]] = {a.name: [] for a in configs}  # re-routed to an agent
    tries: dict[tuple[str, int], int] = {}
    fails: dict[int, int] = {}  # failures in a row per issue
    resting: dict[int, datetime] = {}  # issue -> until when nobody takes it
    rates, rates_stale, rr = {}, True, 0
    learned: Learned | None = None

    def start(agent: SimAgent, num: int, c: int, now: datetime) -> None:
        issue = by_num[num]
        n = tries[agent.config.name, num] = tries.get((agent.config.name, num), 0) + 1
        # one generator per (agent, issue, try): the same attempt turns out the same under
        # every policy, so policies differ by their choices, not by luck
        rng = random.Random(f"{seed}:{agent.config.name}:{num}:{n}")
        mult, odds = SIZES[world.size[num]]
        kind = issue_kind(issue.labels, issue.title)
        span = max(1, round(agent.cycles[kind] * mult * rng.uniform(0.7, 1.3)))
        waits = any(d in by_num and d not in closed for d in dependencies(issue))
        ok = rng.random() < agent.success[kind] * odds * (WAITING_ODDS if waits else 1)
        silent = now + span * CYCLE * rng.random() if rng.random() < agent.stuck_rate else None
        active[agent.config.name] = Attempt(f"{agent.config.name}-{num}-{n}", agent, issue,
                                            c + span, ok, silent, rng, now, now, start_cycle=c)
        rep.attempts += 1

    def finish(a: Attempt, c: int, now: datetime, ok: bool, released: bool = False) -> None:
        del active[a.agent.config.name]
        name, num, kind = a.agent.config.name, a.issue.number, issue_kind(a.issue.labels, a.issue.title)
        outcome = "merged" if ok else "released" if released else "failed"
        rep.log.append((num, name, kind, a.start_cycle, c, outcome))
        if ok:
            closed.add(num)
            rep.resolved += 1
            rep.urgent_resolved += bool({"P0", "P1"} & set(a.issue.labels))
        else:
            rep.failed += 1
            fails[num] = fails.get(num, 0) + 1
            if fails[num] >= SKIP.max_failures:
                fails[num], resting[num] = 0, now + timedelta(hours=SKIP.skip_hours)
        url = f"http://forge/{REPO}/pulls/{num}" if ok else ""
        ledger.record_attempt(ResultRow(timestamp=now, run_id=a.run_id, repo=REPO, issue=num,
                                        agent=name, outcome="success" if ok else "failed",
                                        duration_s=(now - a.started).total_seconds(), pr_url=url),
                              kind)
        if ok:
            ledger.update_pr(REPO, num, url=url, issue=num, state="merged")

    for c in range(1, cycles + 1):
        now = START + c * CYCLE
        # 1. the world moves: agents work (activity somewhere in the last 5 minutes) or finish
        for a in list(active.values()):
            seen = now - CYCLE * a.rng.random()
            if a.silent_at is None or seen < a.silent_at:
                if a.rng.random() < 0.8:
                    a.last_activity = max(a.last_activity, seen)
                if a.silent_at is None and c >= a.ends:
                    finish(a, c, now, a.success)
                    rates_stale = True
        # 2. observe, as watchdog.observe would see the forge
        claimed = {a.issue.number: a for a in active.values()}
        busy = {n for n in claimed} | {n for q in queued.values() for n in q}
        busy |= {n for n, until in resting.items() if until > now}
        idle = [a for a in configs if a.name not in active and not queued[a.name]]
        ranked = ()
        if idle and policy != "naive":
            view = [_labelled(i, claimed.get(i.number), queued) for i in world.issues
                    if i.number not in closed and (i.number in claimed or i.number not in busy)]
            ranked = triage(view, [], configs, TRIAGE, now).ranked
            if policy == "intelligent":
                if rates_stale:
                    rates, rates_stale = ledger.success_rates(30, now=now.timestamp()), False
                    learned = Learned(rates)
                ranked = tuple(replace(r, route=learned.route(r.issue, configs)) for r in ranked)
        watches = tuple(Watch(a.issue, Claim(a.run_id, name, 0), a.started, a.last_activity,
                              a.nudged) for name, a in active.items())
        obs = Observation(watches, ranked, {n: tuple(f"{REPO}#{i}" for i in q)
                                            for n, q in queued.items()})
        # 3. decide with the real watchdog, then carry out
        smart = policy == "intelligent" and learned is not None
        for d in decide(obs, configs, WATCH, now, router=learned.route if smart else None,
                        pick=learned.pick if smart else None):
            if d.action in ("nudge", "release"):
                a = active[d.agent]
                late = (now - a.last_activity) / CYCLE  # cycles of silence so far
                if a.silent_at and not a.detected:  # first action on a silent attempt
                    a.detected = True
                    rep.nudge_delays.append(late - timedelta(minutes=WATCH.stuck_minutes) / CYCLE)
                if d.action == "nudge":
                    a.nudged = True
                    rep.false_nudges += a.silent_at is None
                    continue
                rep.release_delays.append(late - timedelta(minutes=WATCH.reassign_minutes) / CYCLE)
                finish(a, c, now, False, released=True)
                rates_stale = True
                if d.to_agent and policy != "naive":
                    queued[d.to_agent].append(d.issue)
            elif d.action in ("assign", "sprint") and policy != "naive":
                start(sim[d.agent], d.issue, c, now)
        if policy == "naive":
            order = configs[rr:] + configs[:rr]
            free = sorted(eligible - closed - busy - {a.issue.number for a in active.values()})
            for cfg in order:
                if cfg.name in active or not free:
                    continue
                start(sim[cfg.name], free.pop(0), c, now)
                rr = (configs.index(cfg) + 1) % len(configs)
        for name, q in queued.items():  # an agent works its queue first (the loop does)
            if name not in active and q:
                start(sim[name], q.pop(0), c, now)
        rep.agent_cycles += len(configs)
        rep.idle_cycles += sum(1 for a in configs if a.name not in active)
    end = START + cycles * CYCLE
    for a in active.values():  # silent attempts still open: due but never nudged counts as missed
        if a.silent_at and a.last_activity + timedelta(minutes=WATCH.stuck_minutes) <= end \
                and not a.detected:
            rep.missed += 1
    rep.stuck_episodes = len(rep.nudge_delays) + rep.missed
    return rep


def _labelled(issue: Issue, attempt: Attempt | None, queued: dict[str, list[int]]) -> Issue:
    """The issue as the forge shows it: claim and ready labels on claimed or queued work."""
    extra = [ready_label(n) for n, q in queued.items() if issue.number in q]
    if attempt:
        extra += [TRIAGE.claim_label, ready_label(attempt.agent.config.name)]
    return replace(issue, labels=(*issue.labels, *extra)) if extra else issue


# ---- report -----------------------------------------------------------------------------------


def table(reports: list[Report]) -> str:
    naive = next(r for r in reports if r.policy == "naive")
    rows = ["| policy | resolved | vs naive | P0/P1 resolved | attempts | failed | idle % "
            "| stuck episodes | nudge delay max / mean | release delay max | false nudges | wall s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        d = r.nudge_delays or [0.0]
        rows.append(f"| {r.policy} | {r.resolved} | {r.resolved / max(1, naive.resolved):.2f}x "
                    f"| {r.urgent_resolved}/{r.urgent_total} | {r.attempts} | {r.failed} "
                    f"| {r.idle_pct:.1f} | {r.stuck_episodes} | {max(d):.2f} / "
                    f"{sum(d) / len(d):.2f} | {max(r.release_delays or [0.0]):.2f} "
                    f"| {r.false_nudges} | {r.wall_s:.1f} |")
    return "\n".join(rows)


def matrix(rep: Report, world: World) -> list[str]:
    """Who did what: merged/attempts per agent and kind, against the hidden success rate."""
    def cell(name: str, k: str) -> str:
        rows = [r for r in rep.log if r[1] == name and r[2] == k]
        return f"{k} {sum(r[5] == 'merged' for r in rows)}/{len(rows)}"
    return [f"  {rep.policy:<11} {a.config.name:<8} "
            + ", ".join(f"{cell(a.config.name, k)} ({a.success[k]:.0%})" for k in KINDS)
            for a in world.agents]


def _resolved(job: tuple[str, int, int, float]) -> tuple[str, int, dict[str, int]]:
    kind, seed, issues, days = job
    world = generate(seed, issues, kind)
    return kind, seed, {p: simulate(world, p, seed=seed, days=days).resolved for p in POLICIES}


def sweep(seeds: list[int], issues: int, days: float) -> None:
    """Resolved counts over many seeds (two processes): how much the ratio depends on the world."""
    with multiprocessing.Pool(2) as pool:
        results = pool.map(_resolved, [(k, s, issues, days) for k in WORLDS for s in seeds])
    print("| world | seed | naive | simple | intelligent | intelligent / naive |\n"
          "|---|---:|---:|---:|---:|---:|")
    for kind, seed, r in results:
        print(f"| {kind} | {seed} | {r['naive']} | {r['simple']} | {r['intelligent']} "
              f"| {r['intelligent'] / max(1, r['naive']):.2f}x |")
    for kind in WORLDS:
        ratios = [r["intelligent"] / max(1, r["naive"]) for k, _, r in results if k == kind]
        print(f"{kind}: intelligent / naive mean {sum(ratios) / len(ratios):.2f}x, min "
              f"{min(ratios):.2f}x, max {max(ratios):.2f}x; >= 1.5x in "
              f"{sum(x >= 1.5 for x in ratios)} of {len(ratios)} seeds")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--days", type=float, default=7)
    p.add_argument("--issues", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--sweep", type=int, default=0, metavar="N",
                   help="instead: resolved counts for seeds 1..N in both worlds (slow: ~150 s)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.sweep:
        sweep(list(range(1, args.sweep + 1)), args.issues, args.days)
        print(f"total wall time {time.perf_counter() - t0:.1f} s")
        return 0
    held = True
    for kind in WORLDS:
        world = generate(args.seed, args.issues, kind)
        skipped = sum(1 for i in world.issues if classify(i, [], TRIAGE))
        print(f"\n## world: {kind} ({args.issues} issues, {skipped} epics/studies/blocked to skip, "
              f"{args.days:g} days of 5-minute cycles, seed {args.seed})")
        for a in world.agents:
            print(f"- {a.config.name}: {a.note}; declares {', '.join(a.config.strengths)}; "
                  "true " + ", ".join(f"{k} {a.success[k]:.0%}/{a.cycles[k]}c" for k in KINDS)
                  + f"; stuck {a.stuck_rate:.0%}")
        naive, simple, smart = (simulate(world, pol, seed=args.seed, days=args.days)
                                for pol in POLICIES)
        print(table([naive, simple, smart]))
        if kind == "mixed":
            print("merged/attempts per agent and kind (hidden success rate on a small issue):")
            print("\n".join(matrix(simple, world) + matrix(smart, world)))
        ratio_ok = smart.resolved >= 1.5 * naive.resolved
        detect_ok = all(r.missed == 0 and max(r.nudge_delays or [0.0]) <= 2
                        for r in (naive, simple, smart))
        print(f"goal intelligent >= 1.5x naive: {'HOLDS' if ratio_ok else 'FAILS'} "
              f"({smart.resolved / max(1, naive.resolved):.2f}x; simple "
              f"{simple.resolved / max(1, naive.resolved):.2f}x, so learning adds "
              f"{smart.resolved / max(1, simple.resolved) - 1:+.0%} over ranking alone); every "
              f"stuck agent detected within 2 cycles of the threshold: "
              f"{'HOLDS' if detect_ok else 'FAILS'}")
        held = held and detect_ok and (ratio_ok or kind == "uniform")
    print("\nThe ratio to naive depends on the world: most of it is ranking (naive ignores "
          "priorities and 'depends on'), learning pays only where agents differ, and it moves "
          "with the seed; `--sweep 8` shows the spread.")
    print(f"total wall time {time.perf_counter() - t0:.1f} s")
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
