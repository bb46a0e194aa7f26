"""The worker loop over the Gitea emulator and the scripted model server: real sprints for a few
turns, the skip list, SIGTERM mid-sprint, a second loop refused; and `dispatch tmux up` on a
private tmux server."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dispatch.cli import app
from dispatch.config import load_config
from dispatch.forge import ForgeClient
from dispatch.loop import LoopConfig, SkipList, WorkerLoop
from tests.emulator.fixtures import write_config
from tests.emulator.model_server import call, say
from tests.realtools import require

REPO = "acme/app"
FAST = LoopConfig(cooldown_s=0, idle_sleep_s=0, max_failures=2, skip_hours=6)
AGENTS = [
    {"name": "claude", "strengths": ["architecture", "refactor"], "max_concurrent": 2},
    {"name": "kimi", "strengths": ["bug"], "kind": "cli"},
]


def config(tmp_path: Path, gitea, server, **sprint):
    return write_config(tmp_path, gitea, [REPO], agents=AGENTS, gitea={"retries": 1},
                        llm={"base_url": server.url + "/v1", "model": "scripted"},
                        sprint={"backends": ["direct"], **sprint})


def results(tmp_path: Path) -> list[dict]:
    path = tmp_path / "state" / "results.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


def labels(gitea, n: int) -> set[str]:
    return {lb["name"] for lb in gitea.issue(REPO, n)["labels"]}


def make_loop(tmp_path, cfg_path, agent: str, canary: str, sleeps: list[float]) -> WorkerLoop:
    cfg = load_config(cfg_path)
    found = next(a for a in cfg.agents if a.name == agent)
    return WorkerLoop(cfg, found, ForgeClient(cfg.gitea.url, canary, retries=1), canary,
                      loop_cfg=FAST, sleep=sleeps.append)


def test_skip_list_rests_an_issue_after_repeated_failures(tmp_path):
    path = tmp_path / "loops" / "a.skip.json"
    skips = SkipList.load(path)
    skips.record("o/r#1", "failed", 1000.0, FAST, "boom")
    assert not skips.resting("o/r#1", 1000.0)
    skips.record("o/r#1", "partial", 1001.0, FAST, "half")
    assert skips.resting("o/r#1", 1002.0) and not skips.resting("o/r#1", 1001.0 + 6 * 3600 + 1)
    again = SkipList.load(path)  # persisted
    assert again.entries["o/r#1"]["failures"] == 2 and again.entries["o/r#1"]["error"] == "half"
    again.record("o/r#1", "success", 2000.0, FAST)
    assert SkipList.load(path).entries == {}
    assert [p.name for p in path.parent.iterdir()] == ["a.skip.json"]  # no temp files left


def test_loop_turns_ready_first_then_routed_then_idle(gitea, model_server, tmp_path, canary):
    gitea.add_repo(REPO, git=True)
    routed = gitea.add_issue(REPO, "Refactor the loader", labels=["refactor", "P1"])
    ready = gitea.add_issue(REPO, "Write the changelog", labels=["claude-ready", "P3"])
    other = gitea.add_issue(REPO, "Fix the crash", labels=["bug", "P0"])
    server = model_server([call("write_file", path="f.txt", content="x\n"), say("done")],
                          per_conversation=True)
    sleeps: list[float] = []
    loop = make_loop(tmp_path, config(tmp_path, gitea, server), "claude", canary, sleeps)
    assert loop.run(max_turns=3, handle_signals=False) == 0

    rows = results(tmp_path)
    assert [(r["issue"], r["agent"], r["outcome"]) for r in rows] == [
        (str(ready), "claude", "success"), (str(routed), "claude", "success")]
    assert sleeps == [0, 0]  # a cool-down after each turn but the last
    assert "claude-ready" in labels(gitea, ready) and "dispatch:claimed" not in labels(gitea, ready)
    assert labels(gitea, other) == {"bug", "P0"}  # kimi's issue was left alone
    status = (tmp_path / "state" / "loops" / "claude.state.json").read_text()
    assert '"outcome": "idle"' in status and '"turns": 3' in status
    assert list((tmp_path / "state" / "locks").glob("*.lock")) == []


def test_cli_agent_loop_runs_its_sprint_through_the_cli_backend(gitea, model_server, tmp_path, canary):
    gitea.add_repo(REPO, git=True)
    n = gitea.add_issue(REPO, "Fix the crash", labels=["bug"])
    server = model_server([say("the direct runner must not be used")])
    cfg = config(tmp_path, gitea, server, cli_command="sh -c 'echo fixed > crash.txt'")
    loop = make_loop(tmp_path, cfg, "kimi", canary, [])
    loop.run(max_turns=1, handle_signals=False)
    [row] = results(tmp_path)
    assert (row["issue"], row["agent"], row["backend"], row["outcome"]) == (str(n), "kimi", "cli", "success")
    assert server.requests == []
    assert any(b.startswith(f"dispatch/{n}-") for b in gitea.git_branches(REPO))


def test_failing_issue_is_skipped_after_max_failures(gitea, model_server, tmp_path, canary):
    gitea.add_repo(REPO, git=True)
    n = gitea.add_issue(REPO, "Refactor everything", labels=["refactor"])
    server = model_server([say("I changed nothing")], per_conversation=True)
    sleeps: list[float] = []
    loop = make_loop(tmp_path, config(tmp_path, gitea, server), "claude", canary, sleeps)
    loop.run(max_turns=3, handle_signals=False)
    assert [r["outcome"] for r in results(tmp_path)] == ["failed", "failed"]
    skips = SkipList.load(tmp_path / "state" / "loops" / "claude.skip.json")
    assert skips.entries[f"{REPO}#{n}"]["failures"] == 2
    assert skips.resting(f"{REPO}#{n}", time.time())
    assert sleeps == [FAST.cooldown_s, FAST.cooldown_s]


def test_sigterm_mid_sprint_exits_clean_and_a_second_loop_is_refused(gitea, model_server, tmp_path):
    gitea.add_repo(REPO, git=True)
    n = gitea.add_issue(REPO, "Refactor slowly", labels=["refactor"])
    server = model_server([call("run_command", command="sleep 30")], when_done="repeat")
    cfg = config(tmp_path, gitea, server)
    env = {**os.environ, "DISPATCH_CONFIG": str(cfg)}
    proc = subprocess.Popen([sys.executable, "-c", "from dispatch.cli import main; main()",
                             "loop", "--agent", "claude"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not server.requests:
            time.sleep(0.05)
        assert server.requests, "the loop never reached the model"
        assert "dispatch:claimed" in labels(gitea, n)

        second = CliRunner().invoke(app, ["--config", str(cfg), "loop", "--agent", "claude"])
        assert second.exit_code == 1 and "already running" in second.stderr

        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert list((tmp_path / "state" / "locks").glob("*.lock")) == []
    assert "dispatch:claimed" not in labels(gitea, n)
    [row] = results(tmp_path)
    assert row["outcome"] == "failed" and "interrupted" in row["error"]


def test_unknown_agent_is_a_config_error(gitea, tmp_path, model_server):
    cfg = config(tmp_path, gitea, model_server([]))
    r = CliRunner().invoke(app, ["--config", str(cfg), "loop", "--agent", "nobody"])
    assert r.exit_code == 2 and "no agent named 'nobody'" in r.stderr


def test_bin_agent_loop_passes_the_agent_name(tmp_path):
    fake = tmp_path / "fake-dispatch"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    script = Path(__file__).parent.parent / "bin" / "agent-loop"
    env = {**os.environ, "DISPATCH_BIN": str(fake)}
    out = subprocess.run([str(script), "kimi"], env=env, capture_output=True, text=True).stdout
    assert out.strip() == "loop --agent kimi"
    out = subprocess.run([str(script), "--agent", "kimi", "--max-turns", "1"], env=env,
                         capture_output=True, text=True).stdout
    assert out.strip() == "loop --agent kimi --max-turns 1"


# ---- tmux ------------------------------------------------------------------------------------


@pytest.fixture
def tmux_socket():
    """A private tmux server (-L), killed at teardown."""
    require("tmux")
    name = f"dispatch-test-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True)


def windows(socket: str, session: str) -> list[tuple[str, str]]:
    out = subprocess.run(["tmux", "-L", socket, "list-windows", "-t", f"={session}", "-F",
                          "#{window_id} #{window_name}"], capture_output=True, text=True, check=True)
    return [tuple(line.split(" ", 1)) for line in out.stdout.splitlines()]  # type: ignore[misc]


def test_tmux_up_is_idempotent(gitea, tmp_path, tmux_socket, monkeypatch):
    monkeypatch.setenv("DISPATCH_TMUX_COMMAND", "sleep 60")  # a harmless pane, not a real loop
    cfg = write_config(tmp_path, gitea, [REPO], agents=AGENTS)
    args = ["--config", str(cfg), "tmux", "up", "--session", "fleet", "--socket", tmux_socket]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "fleet:claude created" in first.stdout and "fleet:kimi created" in first.stdout
    before = windows(tmux_socket, "fleet")
    assert sorted(name for _, name in before) == ["claude", "kimi"]

    # a window that died (its loop crashed) comes back; the live one is left alone
    subprocess.run(["tmux", "-L", tmux_socket, "kill-window", "-t", "=fleet:=kimi"], check=True)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "fleet:claude already running" in again.stdout
    assert "fleet:kimi created" in again.stdout
    after = windows(tmux_socket, "fleet")
    assert len(after) == 2 and before[0] in after  # claude's window is the very same one
    third = CliRunner().invoke(app, args)
    assert windows(tmux_socket, "fleet") == after and "created" not in third.stdout
    cmd = subprocess.run(["tmux", "-L", tmux_socket, "list-panes", "-s", "-t", "=fleet", "-F",
                          "#{pane_current_command}"], capture_output=True, text=True).stdout
    assert cmd.split() == ["sleep", "sleep"]


def test_sigterm_while_idle_wakes_the_sleep_and_exits(gitea, model_server, tmp_path):
    gitea.add_repo(REPO, git=True)  # nothing to do: the loop goes to its (300 s) idle sleep
    cfg = config(tmp_path, gitea, model_server([]))
    env = {**os.environ, "DISPATCH_CONFIG": str(cfg)}
    proc = subprocess.Popen([sys.executable, "-c", "from dispatch.cli import main; main()",
                             "loop", "--agent", "claude"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = tmp_path / "state" / "loops" / "claude.state.json"
    try:
        deadline = time.time() + 20
        while time.time() < deadline and not status.exists():
            time.sleep(0.05)
        assert '"outcome": "idle"' in status.read_text()
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and time.time() - t0 < 5
    assert list((tmp_path / "state" / "locks").glob("*.lock")) == []
