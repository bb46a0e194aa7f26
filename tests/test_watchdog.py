"""Watchdog: pure decisions on literals, drift against real loopback servers and real files, and
the acceptance scenario (nudge once, release and re-route, idle agents fed, idempotent) over the
Gitea emulator with an injected clock."""

from __future__ import annotations

import json
import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dispatch import claims, drift
from dispatch.claims import Claim
from dispatch.cli import app
from dispatch.config import AgentConfig, TriageConfig, load_config
from dispatch.forge import ForgeClient, Issue
from dispatch.triage import triage
from dispatch.watchdog import (
    AgentFile,
    LocalRun,
    Observation,
    Watch,
    WatchdogConfig,
    apply,
    assess,
    decide,
    observe,
    pane_activity,
)
from tests.emulator.fixtures import BOT, write_config
from tests.emulator.gitea import GiteaEmulator

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
AGENTS = [
    AgentConfig("claude", ["architecture", "refactor"], max_concurrent=2, kind="direct"),
    AgentConfig("kimi", ["tests", "bug"], max_concurrent=1, kind="cli"),
    AgentConfig("hermes", ["docs"], max_concurrent=1, kind="gateway"),
]
CFG = WatchdogConfig()


def issue(n: int, title: str = "Task", labels: tuple[str, ...] = ()) -> Issue:
    return Issue("acme/app", n, title, labels=labels, created_at=T0 - timedelta(days=1))


def watch(n: int, agent: str, quiet_min: float, *, nudged: bool = False, labels=()) -> Watch:
    last = T0 - timedelta(minutes=quiet_min)
    return Watch(issue(n, labels=("dispatch:claimed", *labels)), Claim(f"run-{n}", agent, 100 + n),
                 last, last, nudged)


def obs(watches=(), backlog=(), queued=None, local=()) -> Observation:
    ranked = triage(list(backlog), [], AGENTS, TriageConfig(), T0).ranked
    return Observation(tuple(watches), ranked, queued or {}, tuple(local))


# ---- pure core -------------------------------------------------------------------------------


def test_states_follow_the_thresholds():
    o = obs([watch(1, "claude", 10), watch(2, "kimi", 45)])
    states = {h.agent: h.state for h in assess(o, AGENTS, CFG, T0)}
    assert states == {"claude": "working", "kimi": "stuck", "hermes": "idle"}
    # pane output newer than the forge's last sign of life keeps an agent working
    lively = assess(o, AGENTS, CFG, T0, {"kimi": T0 - timedelta(minutes=2)})
    assert {h.agent: h.state for h in lively}["kimi"] == "working"


def test_quiet_claim_is_nudged_once_then_released_to_another_agent():
    assert decide(obs([watch(1, "kimi", 29)]), AGENTS, CFG, T0) == []
    [d] = [d for d in decide(obs([watch(1, "kimi", 31)]), AGENTS, CFG, T0) if d.issue == 1]
    assert (d.action, d.agent, d.run_id) == ("nudge", "kimi", "run-1")
    assert [d for d in decide(obs([watch(1, "kimi", 45, nudged=True)]), AGENTS, CFG, T0)
            if d.issue == 1] == []
    [r] = [d for d in decide(obs([watch(1, "kimi", 61, nudged=True, labels=("bug",))]),
                             AGENTS, CFG, T0) if d.issue == 1]
    assert r.action == "release" and r.to_agent in {"claude", "hermes"} and r.to_agent != "kimi"
    assert "61 min" in r.reason


def test_release_goes_back_to_the_backlog_when_every_other_agent_is_full():
    agents = [AgentConfig("a", max_concurrent=1), AgentConfig("b", max_concurrent=1)]
    o = Observation((watch(1, "a", 90), watch(2, "b", 5)), (), {})
    [r] = [d for d in decide(o, agents, CFG, T0) if d.action == "release"]
    assert r.to_agent == "" and "capacity" in r.reason


def test_idle_agents_get_fitting_issues_and_queued_ones_get_nothing():
    backlog = [issue(5, "Refactor the loader", ("refactor",)), issue(6, "Write install docs", ("docs",)),
               issue(7, "Fix crash", ("bug", "claude-ready"))]
    ds = decide(obs(backlog=backlog, queued={"kimi": ("acme/app#9",)}), AGENTS, CFG, T0)
    got = {d.agent: (d.action, d.issue) for d in ds}
    # claude runs sprints itself (direct), hermes is labelled; kimi has queued work; #7 is routed
    assert got == {"claude": ("sprint", 5), "hermes": ("assign", 6)}


def test_idle_agent_takes_an_unfitting_issue_only_when_allowed():
    backlog = [issue(5, "Refactor the loader", ("refactor",))]
    o = obs(backlog=backlog, queued={"claude": ("acme/app#1",), "kimi": ("acme/app#2",)})
    assert [(d.agent, d.issue) for d in decide(o, AGENTS, CFG, T0)] == [("hermes", 5)]
    strict = WatchdogConfig(idle_takes_any=False)
    assert decide(o, AGENTS, strict, T0) == []


def test_stop_quiet_local_run_and_apply_signals_its_pid():
    run = LocalRun("run-9", 4242, "kimi", "acme/app", 9, T0 - timedelta(minutes=121))
    ds = [d for d in decide(obs(local=[run], queued={a.name: ("x",) for a in AGENTS}), AGENTS,
                            CFG, T0)]
    assert [(d.action, d.pid, d.run_id) for d in ds] == [("stop", 4242, "run-9")]
    sent = []
    events = apply(None, ds, None, kill=lambda pid, sig: sent.append((pid, sig)))  # type: ignore[arg-type]
    assert sent == [(4242, 15)] and events[0]["kind"] == "run_stopped"
    fresh = LocalRun("run-9", 4242, "kimi", "acme/app", 9, T0 - timedelta(minutes=119))
    assert decide(obs(local=[fresh], queued={a.name: ("x",) for a in AGENTS}), AGENTS, CFG, T0) == []


def test_pane_activity_from_a_snapshot():
    snap = {"panes": [{"id": "%1", "agent": "kimi", "last_activity": "2025-03-03T08:50:00.000Z"},
                      {"id": "%2", "agent": "kimi", "last_activity": "2025-03-03T08:55:00.000Z"},
                      {"id": "%3", "last_activity": "2025-03-03T08:59:00.000Z"}]}
    assert pane_activity(snap) == {"kimi": T0 - timedelta(minutes=5)}


# ---- drift -----------------------------------------------------------------------------------


AGENT_YAML = """\
# hermes profile: edited by hand, keep the comments
model:
  default: qwen3:8b   # the daily driver
  provider: ollama
toolsets: [web, terminal]
"""


def test_drift_found_in_server_and_file(tmp_path):
    f = tmp_path / "hermes.yaml"
    f.write_text(AGENT_YAML)
    files = {"hermes": AgentFile(str(f), "model.default"), "kimi": AgentFile(str(tmp_path / "no.yaml"), "m")}
    expected = {"hermes": "qwen3:14b", "kimi": "kimi-k2"}
    server = drift.ServerModels("openai", ("qwen3:14b",))
    events = drift.check(expected, server, files)
    where = sorted((e["subject"], e["where"], e["found"]) for e in events)
    assert where == [("hermes", "config", "qwen3:8b"), ("kimi", "config", None),
                     ("kimi", "server", ["qwen3:14b"])]
    assert all(e["kind"] == "model_drift" for e in events)
    # ollama lists what is loaded: a model nobody expects is the drift, `:latest` is implicit
    ps = drift.ServerModels("ollama", ("qwen3:14b", "llama3:latest"))
    assert [e["subject"] for e in drift.check({"a": "qwen3:14b", "b": "llama3"}, ps, {})] == []
    assert [e["subject"] for e in drift.check({"a": "qwen3:14b"}, ps, {})] == ["llama3:latest"]


def test_fix_keeps_comments_backs_up_and_is_atomic(tmp_path):
    f = tmp_path / "hermes.yaml"
    f.write_text(AGENT_YAML)
    f.chmod(0o640)
    af = AgentFile(str(f), "model.default")
    events = drift.check({"hermes": "qwen3:14b"}, None, {"hermes": af})
    refused = drift.fix(events, {"hermes": af}, allowed=False)
    assert refused[0]["fixed"] is False and f.read_text() == AGENT_YAML
    [done] = drift.fix(events, {"hermes": af}, allowed=True, now=T0)
    assert done["fixed"] is True
    backup = tmp_path / "hermes.yaml.bak-20250303T090000"
    assert done["backup"] == str(backup) and backup.read_text() == AGENT_YAML
    text = f.read_text()
    assert text == AGENT_YAML.replace("default: qwen3:8b ", "default: qwen3:14b ")
    assert "# the daily driver" in text and stat.S_IMODE(f.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert drift.check({"hermes": "qwen3:14b"}, None, {"hermes": af}) == []


def test_fix_flow_style_falls_back_to_a_full_rewrite(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("model: {default: old, temp: 0.2}\nname: a\n")
    drift.fix_agent_file(AgentFile(str(f), "model.default"), "new", now=T0)
    assert yaml.safe_load(f.read_text()) == {"model": {"default": "new", "temp": 0.2}, "name": "a"}


def test_server_models_openai_and_ollama(model_server):
    server = model_server([], model="qwen3:14b")
    assert drift.server_models(server.url + "/v1") == drift.ServerModels("openai", ("qwen3:14b",))

    class Ollama(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"models": [{"name": "qwen3:8b", "model": "qwen3:8b"}]}).encode()
            code = 200 if self.path == "/api/ps" else 404
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Ollama)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        assert drift.server_models(url) == drift.ServerModels("ollama", ("qwen3:8b",))
    finally:
        httpd.shutdown()
        httpd.server_close()
    down = drift.server_models(url, timeout=0.5)
    assert down.api == "" and "cannot list models" in down.error


# ---- the acceptance scenario over the emulator -----------------------------------------------


@pytest.fixture
def clocked(tmp_path, canary):
    """An emulator whose clock the test moves."""
    now = [T0]
    emu = GiteaEmulator(tmp_path / "gitea", validate=True, clock=lambda: now[0])
    emu.add_user(BOT, canary)
    emu.start()
    yield emu, now
    emu.stop()
    assert emu.violations == []


def bodies(emu, n: int) -> list[str]:
    from tests.conftest import CANARY

    return [c.body for c in ForgeClient(emu.url, CANARY, retries=0).list_comments("acme/app", n)]


def label_names(emu, n: int) -> set[str]:
    return {lb["name"] for lb in emu.issue("acme/app", n)["labels"]}


def test_scenario_nudge_release_reroute_feed_idle_idempotent(clocked, tmp_path, canary):
    emu, now = clocked
    emu.add_repo("acme/app")
    crash = emu.add_issue("acme/app", "Fix the crash on save", labels=["bug", "P1"])
    refactor = emu.add_issue("acme/app", "Refactor the config loader", labels=["refactor", "P2"])
    docs = emu.add_issue("acme/app", "Write the install docs", labels=["docs", "P3"])
    tests = emu.add_issue("acme/app", "Add tests for the parser", labels=["tests", "P3"])
    agents = [{"name": a.name, "strengths": a.strengths, "max_concurrent": a.max_concurrent,
               "kind": a.kind} for a in AGENTS]
    cfg = load_config(write_config(tmp_path, emu, ["acme/app"], agents=agents))
    client = ForgeClient(emu.url, canary, retries=0)
    claims.claim(client, "acme/app", crash, run_id="run-crash", agent="kimi", label="dispatch:claimed")

    def cycle(minutes: float) -> list[dict]:
        now[0] = T0 + timedelta(minutes=minutes)
        o = observe(client, ["acme/app"], cfg, now[0], cfg.state_path)
        return apply(client, decide(o, cfg.agents, CFG, now[0]), cfg)

    first = cycle(1)  # kimi works; the idle ones are fed by fit
    assert sorted((e["agent"], e["subject"]) for e in first) == [
        ("claude", f"acme/app#{refactor}"), ("hermes", f"acme/app#{docs}")]
    assert "claude-ready" in label_names(emu, refactor) and "hermes-ready" in label_names(emu, docs)
    assert cycle(2) == []

    quiet = cycle(31)
    assert [(e["kind"], e["subject"]) for e in quiet] == [("agent_nudged", f"acme/app#{crash}")]
    assert cycle(32) == [] and cycle(45) == []
    assert sum("dispatch:nudge run=run-crash" in b for b in bodies(emu, crash)) == 1

    released = cycle(61)
    assert [(e["kind"], e["to"]) for e in released] == [("claim_released", "claude")]
    assert claims.active_claim(client.list_comments("acme/app", crash)) is None
    assert label_names(emu, crash) == {"bug", "P1", "claude-ready"}
    reroute = [b for b in bodies(emu, crash) if "dispatch:reroute" in b]
    assert len(reroute) == 1 and "Re-routed from kimi to **claude**" in reroute[0]
    assert "no activity from kimi for 61 min" in bodies(emu, crash)[-1]

    fed = cycle(62)  # kimi is idle now and takes the issue that fits it
    assert [(e["kind"], e["agent"], e["subject"]) for e in fed] == [
        ("issue_assigned", "kimi", f"acme/app#{tests}")]
    assert cycle(63) == [] and cycle(200) == []
    assert sum("dispatch:nudge" in b for b in bodies(emu, crash)) == 1
    assert sum("dispatch:release" in b for b in bodies(emu, crash)) == 1


def test_watchdog_cli_reports_and_records_events(gitea, model_server, tmp_path, canary):
    gitea.add_repo("acme/app")
    n = gitea.add_issue("acme/app", "Refactor the loader", labels=["refactor"])
    server = model_server([])
    cfg = write_config(tmp_path, gitea, ["acme/app"], llm={"base_url": server.url + "/v1"})
    dry = CliRunner().invoke(app, ["--config", str(cfg), "watchdog", "--dry-run", "--json"])
    out = json.loads(dry.stdout)
    assert [d["action"] for d in out["decisions"]] == ["sprint"] and out["actions"] == []
    assert "claude-ready" not in [lb["name"] for lb in gitea.issue("acme/app", n)["labels"]]

    r = CliRunner().invoke(app, ["--config", str(cfg), "watchdog", "--json"])
    out = json.loads(r.stdout)
    assert [(a["kind"], a["agent"]) for a in out["actions"]] == [("issue_assigned", "claude")]
    assert {h["agent"]: h["state"] for h in out["agents"]} == {"claude": "idle", "kimi": "idle"}
    model = next(x for x in out["house"] if x["check"] == "model_server")
    assert model["ok"] is True
    warned = [x for x in out["house"] if not x["ok"]]
    assert r.exit_code == (1 if warned else 0)
    events = [json.loads(line) for line in
              (tmp_path / "state" / "telemetry" / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events if e["kind"] != "house_warning"] == ["issue_assigned"]
    assert canary not in r.stdout and canary not in json.dumps(events)
    assert os.stat(tmp_path / "state").st_mode & 0o077 == 0


@pytest.mark.skipif(not hasattr(__import__("dispatch.config").config.Config(), "watchdog"),
                    reason="Config has no `watchdog:` section yet (wired by the lead)")
def test_watchdog_cli_fix_corrects_a_drifted_agent_file(gitea, model_server, tmp_path):
    server = model_server([], model="qwen3:14b")
    agent_file = tmp_path / "claude.yaml"
    agent_file.write_text(AGENT_YAML)
    cfg = write_config(tmp_path, gitea, [], llm={"base_url": server.url + "/v1"}, watchdog={
        "expected_models": {"claude": "qwen3:14b"},
        "agent_configs": {"claude": {"path": str(agent_file), "key": "model.default"}}})
    r = CliRunner().invoke(app, ["--config", str(cfg), "watchdog", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["drift"][0]["found"] == "qwen3:8b"
    assert agent_file.read_text() == AGENT_YAML
    # the default policy wants approval for fix_drift: --fix refuses and says so
    r = CliRunner().invoke(app, ["--config", str(cfg), "watchdog", "--fix", "--json"])
    assert json.loads(r.stdout)["drift"][0]["fixed"] is False and "fix_drift" in r.stderr
    assert agent_file.read_text() == AGENT_YAML
    text = cfg.read_text() + "policy: {allow: [assign, reroute, nudge, label, comment, fix_drift]}\n"
    cfg.write_text(text)
    r = CliRunner().invoke(app, ["--config", str(cfg), "watchdog", "--fix", "--json"])
    [ev] = json.loads(r.stdout)["drift"]
    assert ev["fixed"] is True and drift.read_file_model(AgentFile(str(agent_file), "model.default")) == "qwen3:14b"
    assert Path(ev["backup"]).read_text() == AGENT_YAML
    rows = (tmp_path / "state" / "telemetry" / "events.jsonl").read_text().splitlines()
    assert [json.loads(x).get("fixed") for x in rows if '"model_drift"' in x] == [None, False, True]
