"""collector: a real tmux server on a private socket and the real Gitea emulator, driven through
panes that start, go idle and die and forge activity that appears between runs; the exact events."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest

from dispatch.collector import agent_states, collect, run_collector
from dispatch.config import load_config
from dispatch.forge import ForgeClient
from dispatch.locks import Lock, LockInfo
from dispatch.results import ResultRow, append_result
from dispatch.telemetry import ReadStats, read, read_state
from tests.emulator.fixtures import write_config
from tests.realtools import Tmux

ROOT = Path(__file__).resolve().parents[1]
AGENTS = [{"name": "claude", "account": "claude-bot"}, {"name": "kimi", "account": "kimi-bot"}]
CRON_LINE = "*/5 * * * * /opt/dispatch/bin/telemetry-collector"


@pytest.fixture
def fake_crontab(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An env whose PATH finds a `crontab` that prints a file we control (no cron daemon needed)."""
    bindir, table = tmp_path / "bin", tmp_path / "crontab.txt"
    bindir.mkdir()
    script = bindir / "crontab"
    script.write_text(f'#!/bin/sh\n[ "$1" = "-l" ] && exec cat "{table}"\nexit 2\n')
    script.chmod(0o755)
    table.write_text("# m h dom mon dow command\n")
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}, table


def schema(name: str) -> dict:
    return json.loads((ROOT / "telemetry" / f"{name}.schema.json").read_text())


def kinds(events: list[dict]) -> list[tuple]:
    return [(e["kind"], e["subject"], *((e.get("run_id"),) if e.get("run_id") else ())) for e in events]


def test_panes_start_go_idle_and_die_while_forge_activity_appears(
        tmp_path: Path, gitea, canary: str, tmux: Tmux, model_server, fake_crontab) -> None:
    env, crontab = fake_crontab
    models = model_server()
    gitea.add_repo("acme/api")
    gitea.add_issue("acme/api", "Fix the login redirect", labels=["bug"])  # 1
    gitea.add_issue("acme/api", "Document the API")  # 2
    old = datetime.now(UTC) - timedelta(days=10)  # 3: closed long before the window: never an event
    gitea.add_issue("acme/api", "Old chore", state="closed", created_at=old, updated_at=old)
    pid_file = tmp_path / "loop.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    cfg = load_config(write_config(
        tmp_path, gitea, ["acme/api"], agents=AGENTS, llm={"base_url": models.url + "/v1"},
        collector={"tmux_socket": tmux.socket, "idle_minutes": 1, "expected_cron": ["telemetry-collector"],
                   "processes": ["no-such-daemon"], "pid_files": [str(pid_file)]}))
    client = ForgeClient(gitea.url, canary, retries=0)
    t0 = datetime.now(UTC)

    def run(seconds: float) -> list[tuple]:
        return kinds(run_collector(cfg, client=client, env=env, now=lambda: t0 + timedelta(seconds=seconds)))

    # 0: no tmux server yet, the cron line missing: the baseline, which reports nothing
    assert run(0) == []
    # 1: two agent panes start, the cron line is installed, an agent opens a PR
    tmux("new-session", "-d", "-s", "fleet", "-n", "claude", "sh -c 'echo claude ready; exec sleep 600'")
    tmux("set-option", "-g", "remain-on-exit", "on")  # a pane whose command exits stays, dead
    tmux("new-window", "-d", "-t", "fleet", "-n", "kimi", "sh -c 'echo kimi ready; exec sleep 600'")
    claude_pane, _ = tmux.pane("claude")
    kimi_pane, kimi_pid = tmux.pane("kimi")
    crontab.write_text(CRON_LINE + "\n")
    gitea.add_pull("acme/api", "Fix the login redirect", head="fix-login", author="claude-bot")  # 4
    assert run(5) == [
        ("agent_working", "claude"), ("agent_working", "kimi"),
        ("pane_started", claude_pane), ("pane_started", kimi_pane),
        ("cron_restored", "telemetry-collector"), ("pr_opened", "acme/api#4")]
    # 2: three minutes on (injected) nobody printed: idle. The model server goes away; the PR
    # is merged, issue 2 is closed and claude comments on issue 1.
    models.close()
    client.request("POST", "/repos/acme/api/pulls/4/merge", json={"do": "merge"})
    client.edit_issue("acme/api", 2, state="closed")
    gitea.add_comment("acme/api", 1, "Working on it.", author="claude-bot")
    gitea.add_comment("acme/api", 1, "A human note.", author="alice")
    assert run(180) == [
        ("agent_idle", "claude"), ("agent_idle", "kimi"),
        ("pane_idle", claude_pane), ("pane_idle", kimi_pane),
        ("model_server_down", models.url + "/v1"), ("pr_merged", "acme/api#4"), ("issue_closed", "acme/api#2")]
    # 3: kimi's process dies (its pane stays, dead); claude takes a sprint lock while its pane is quiet
    os.kill(kimi_pid, signal.SIGTERM)
    _wait_dead(tmux, kimi_pane)
    lock = Lock(cfg.state_path / "locks", "acme/api#1", run_id="r-7", data={"agent": "claude"}).acquire()
    assert run(190) == [
        ("agent_stuck", "claude", "r-7"), ("agent_dead", "kimi"), ("pane_died", kimi_pane),
        ("sprint_started", "r-7", "r-7")]
    # 4: the sprint fails and releases its lock, claude's pane is killed, the cron line is removed
    lock.release()
    append_result(cfg.state_path / "results.csv", ResultRow(
        timestamp=t0 + timedelta(seconds=195), run_id="r-7", repo="acme/api", issue=1, agent="claude",
        outcome="failed", error="tests failed"))
    tmux("kill-pane", "-t", claude_pane)
    crontab.write_text("# nothing\n")
    assert run(200) == [
        ("agent_dead", "claude"), ("pane_died", claude_pane), ("cron_missing", "telemetry-collector"),
        ("sprint_failed", "r-7", "r-7")]
    # 5: nothing changed: nothing to say
    assert run(210) == []

    tel = cfg.state_path / "telemetry"
    stats = ReadStats()
    snaps = list(read(tel / "metrics.jsonl", stats=stats))
    assert len(snaps) == 6 and (stats.torn, stats.corrupt) == (0, 0)
    for row in snaps:
        jsonschema.validate(row, schema("metrics"))
    for row in read(tel / "events.jsonl"):
        jsonschema.validate(row, schema("events"))
    assert snaps[2]["forge"] == {"prs_opened": 1, "prs_merged": 1, "issues_closed": 1,
                                 "comments": {"claude-bot": 1, "kimi-bot": 0}}
    assert snaps[2]["backlog"] == {"open": 1, "eligible": 1}
    assert snaps[1]["model_server"] == {"up": True, "url": models.url + "/v1", "models": ["scripted"]}
    assert snaps[2]["probes"]["model_server"].startswith("error: ")
    assert snaps[3]["agents"]["claude"] == {"state": "stuck", "since": snaps[3]["ts"], "run_id": "r-7",
                                            "issue": "acme/api#1", "pane": claude_pane}
    assert snaps[5]["agents"]["kimi"]["since"] == snaps[3]["ts"]  # dead since run 3
    dead = next(p for p in snaps[3]["panes"] if p["id"] == kimi_pane)
    assert (dead["alive"], dead["agent"], dead["session"]) == (False, "kimi", "fleet")
    assert snaps[1]["processes"] == {"no-such-daemon": False, str(pid_file): True}
    assert snaps[4]["sprints"] == {"running": [], "failed": ["r-7"], "finished": {"failed": 1}}
    assert {v for s in snaps for k, v in s["probes"].items() if k != "model_server"} == {"ok"}
    state = read_state(tel / "last_state.json")
    assert state["pulls"] == {"acme/api#4": "merged"} and state["issues"] == {
        "acme/api#1": "open", "acme/api#2": "closed"}


def _wait_dead(tmux: Tmux, pane: str) -> None:
    deadline = time.monotonic() + 5
    while tmux("display-message", "-p", "-t", pane, "#{pane_dead}").strip() != "1":
        assert time.monotonic() < deadline, "pane did not die"
        time.sleep(0.05)


def no_programs(argv, **kwargs):
    """A runner for a machine without tmux or crontab."""
    raise FileNotFoundError(argv[0])


def test_failed_probes_are_recorded_and_carry_the_last_known_state(tmp_path: Path, gitea, canary: str) -> None:
    gitea.add_repo("acme/api")
    gitea.add_pull("acme/api", "A change", head="a")
    cfg = load_config(write_config(tmp_path, gitea, ["acme/api"], gitea={"retries": 0},
                                   collector={"expected_cron": ["dispatch"]}))
    client = ForgeClient(gitea.url, canary, retries=0, connect_timeout=1)

    assert run_collector(cfg, client=client, runner=no_programs) == []
    gitea.down()
    events = run_collector(cfg, client=client, runner=no_programs)
    rows = list(read(cfg.state_path / "telemetry" / "metrics.jsonl"))
    probes = rows[-1]["probes"]
    assert probes["tmux"] == "error: tmux is not installed"
    assert probes["cron"] == "error: crontab is not installed"
    assert probes["forge"].startswith("error: cannot reach GET ") and canary not in json.dumps(rows)
    assert probes["backlog"] == probes["forge"] and probes["sprints"] == "ok"
    assert probes["model_server"].startswith("error: ")
    assert "forge" not in rows[-1] and "backlog" not in rows[-1] and "panes" not in rows[-1]
    # a failed probe is not a change: the PR seen before is still known, nothing was emitted
    assert events == []
    assert read_state(cfg.state_path / "telemetry" / "last_state.json")["pulls"] == {"acme/api#1": "open"}
    snap = collect(cfg, client=None, runner=no_programs)
    assert snap.probes["forge"].startswith("error: no forge client")


NOW = datetime(2024, 5, 1, 6, 0, tzinfo=UTC)


def pane(pid: str, agent: str, alive: bool = True, idle: bool = False) -> dict:
    return {"id": pid, "agent": agent, "alive": alive, "idle": idle, "command": "x"}


def lock(agent: str, minutes_ago: float, kind: str = "") -> LockInfo:
    started = (NOW - timedelta(minutes=minutes_ago)).timestamp()
    return LockInfo("o/r#1", 1, "r-1", "h", started, {"agent": agent, **({"kind": kind} if kind else {})})


@pytest.mark.parametrize(("panes", "locks", "previous", "expected"), [
    ([pane("%1", "claude")], [], {}, "working"),  # output flowing
    ([pane("%1", "claude", idle=True)], [], {}, "idle"),
    ([pane("%1", "claude", alive=False)], [], {}, "dead"),
    ([], [], {"claude": {"state": "idle", "pane": "%1"}}, "dead"),  # its pane vanished
    ([], [], {}, "idle"),  # a cron-only agent between sprints
    (None, [], {"claude": {"state": "idle", "pane": "%1"}}, "idle"),  # tmux unknown: no verdict of death
    ([], [lock("claude", 5)], {}, "working"),  # a headless sprint holds the lock
    ([pane("%1", "claude", idle=True)], [lock("claude", 5)], {}, "stuck"),  # claimed, quiet pane
    ([pane("%1", "claude", alive=False)], [lock("claude", 5)], {}, "working"),  # lock holder lives
    ([], [lock("claude", 45)], {}, "stuck"),  # past sprint.max_minutes (30) + idle_minutes (10)
    ([pane("%2", "kimi")], [lock("kimi", 1)], {}, "idle"),  # other agents' panes and locks
    ([], [lock("claude", 600, "loop")], {"claude": {"state": "idle", "pane": "%1"}}, "idle"),  # loop alive
    ([pane("%1", "claude")], [lock("claude", 600, "loop")], {}, "working"),
    ([pane("%1", "claude", idle=True)], [lock("claude", 600, "loop"), lock("claude", 5)], {}, "stuck"),
])
def test_agent_state_rule(tmp_path: Path, panes, locks, previous, expected) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("gitea: {url: 'http://127.0.0.1:1'}\nagents: [{name: claude}, {name: kimi}]\n")
    got = agent_states(load_config(cfg_path), panes, locks, previous, NOW)["claude"]
    assert got["state"] == expected


def test_since_is_kept_while_the_state_holds(tmp_path: Path) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("gitea: {url: 'http://127.0.0.1:1'}\nagents: [{name: claude}]\n")
    cfg = load_config(cfg_path)
    before = {"claude": {"state": "idle", "since": "2024-05-01T05:00:00.000Z"}}
    assert agent_states(cfg, [], [], before, NOW)["claude"]["since"] == "2024-05-01T05:00:00.000Z"
    assert agent_states(cfg, [pane("%1", "claude")], [], before, NOW)["claude"]["since"] == "2024-05-01T06:00:00.000Z"


def test_a_loop_lock_is_liveness_not_a_sprint(tmp_path: Path) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"gitea: {{url: 'http://127.0.0.1:1'}}\nagents: [{{name: claude}}]\nstate_dir: {tmp_path}\n")
    cfg = load_config(cfg_path)
    with Lock(cfg.state_path / "locks", "loop:claude", run_id="loop-1", data={"agent": "claude", "kind": "loop"}), \
            Lock(cfg.state_path / "locks", "o/r#3", run_id="r-3", data={"agent": "claude"}):
        snap = collect(cfg, client=None, runner=no_programs)
    assert snap.row["sprints"]["running"] == ["r-3"]
    assert snap.row["agents"]["claude"]["run_id"] == "r-3"


def test_a_failed_tmux_probe_keeps_what_was_known():
    from datetime import UTC, datetime

    from dispatch.collector import agent_states
    from dispatch.config import config_from_dict

    cfg = config_from_dict({"gitea": {"url": "http://x"}, "agents": [{"name": "kimi"}, {"name": "claude"}]}, env={})
    at = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
    prev = {"kimi": {"state": "working", "since": "2026-11-25T08:00:00.000Z", "pane": "%3"},
            "claude": {"state": "dead", "since": "2026-11-25T07:00:00.000Z", "pane": "%4"}}
    now = agent_states(cfg, None, [], prev, at)
    assert now["kimi"] == prev["kimi"] and now["claude"] == prev["claude"]  # no made-up events
