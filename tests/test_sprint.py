"""Whole sprints against the Gitea emulator's real git hosting and the scripted model server."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dispatch.cli import app
from dispatch.forge import ForgeClient
from tests.emulator.fixtures import write_config
from tests.emulator.model_server import call, say

REPO = "acme/app"
pytestmark = pytest.mark.slow


def sprint_config(tmp_path: Path, gitea, server, **sprint) -> Path:
    return write_config(
        tmp_path, gitea, [REPO],
        llm={"base_url": server.url + "/v1", "model": "scripted"},
        sprint={"backends": ["direct"], **sprint},
        gitea={"retries": 1},
    )


def invoke(cfg: Path, *args: str):
    return CliRunner().invoke(app, ["--config", str(cfg), *args])


def results(tmp_path: Path) -> list[dict]:
    path = tmp_path / "state" / "results.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def forge(gitea) -> ForgeClient:
    from tests.conftest import CANARY

    return ForgeClient(gitea.url, CANARY, retries=0)


def comments(gitea, number: int) -> list[str]:
    return [c.body for c in forge(gitea).list_comments(REPO, number)]


def pulls(gitea, state: str = "open"):
    return forge(gitea).list_pulls(REPO, state=state)


@pytest.fixture
def repo(gitea):
    gitea.add_repo(REPO, git=True)
    return gitea


WRITE_AND_RUN = [
    call("write_file", path="hello.txt", content="hello from the agent\n"),
    call("run_command", command="cat hello.txt && git status --short"),
    say("Added hello.txt."),
]


def test_sprint_end_to_end(repo, model_server, tmp_path, canary):
    low = repo.add_issue(REPO, "Polish the docs", labels=["P3"])
    n = repo.add_issue(REPO, "Add a hello file", body="We need hello.txt.", labels=["P1"])
    server = model_server(WRITE_AND_RUN)
    cfg = sprint_config(tmp_path, repo, server)

    r = invoke(cfg, "sprint", "--repo", REPO, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["outcome"] == "success" and out["issue"] == n and out["pr_url"]

    branch = f"dispatch/{n}-add-a-hello-file"
    assert branch in repo.git_branches(REPO)
    assert repo.git_log(REPO, branch)[0][1] == f"Fix #{n}: Add a hello file"
    prs = pulls(repo)
    assert len(prs) == 1 and prs[0].head == branch
    assert f"Closes #{n}" in prs[0].body
    assert any(prs[0].html_url in body for body in comments(repo, n))
    assert "dispatch:claimed" not in [lb["name"] for lb in repo.issue(REPO, n)["labels"]]
    assert comments(repo, low) == []  # the lower-ranked issue was left alone

    rows = results(tmp_path)
    assert len(rows) == 1
    assert rows[0]["outcome"] == "success" and rows[0]["issue"] == str(n)
    assert rows[0]["backend"] == "direct" and int(rows[0]["steps"]) == 3

    # the canary token went nowhere it should not
    assert canary not in server.sent_text()
    state = tmp_path / "state"
    for path in state.rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path
    git_config = next(state.glob("workspaces/*/repo/.git/config")).read_text()
    assert "@" not in git_config.split("url = ", 1)[1].splitlines()[0]


def test_nothing_to_do_exits_zero(repo, model_server, tmp_path):
    repo.add_issue(REPO, "[EPIC] everything")
    cfg = sprint_config(tmp_path, repo, model_server([say("unused")]))
    r = invoke(cfg, "sprint", "--repo", REPO)
    assert r.exit_code == 0 and "nothing to do" in r.stdout
    assert results(tmp_path) == []


def test_dry_run_changes_nothing(repo, model_server, tmp_path):
    n = repo.add_issue(REPO, "Fix the bug", labels=["bug"])
    cfg = sprint_config(tmp_path, repo, model_server([say("unused")]))
    r = invoke(cfg, "sprint", "--repo", REPO, "--dry-run")
    assert r.exit_code == 0 and f"{REPO}#{n}" in r.stdout
    assert comments(repo, n) == [] and results(tmp_path) == []


def test_runaway_model_is_stopped_and_reported_true(repo, model_server, tmp_path):
    n = repo.add_issue(REPO, "Loop forever")
    server = model_server([call("run_command", command="echo again $RANDOM")], when_done="repeat")
    cfg = sprint_config(tmp_path, repo, server, max_steps=5)
    r = invoke(cfg, "sprint", "--repo", REPO, "--json")
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["outcome"] == "failed" and "step budget" in out["error"]
    assert len(server.requests) == 5
    row = results(tmp_path)[0]
    assert row["outcome"] == "failed" and row["pr_url"] == ""
    assert "could not finish" in comments(repo, n)[-1]
    assert "dispatch:claimed" not in [lb["name"] for lb in repo.issue(REPO, n)["labels"]]


def test_partial_work_is_pushed_not_lost(repo, model_server, tmp_path):
    n = repo.add_issue(REPO, "Half done")
    script = [call("write_file", path="part.txt", content="half\n")]
    server = model_server(script + [call("run_command", command="false")], when_done="repeat")
    cfg = sprint_config(tmp_path, repo, server, max_steps=4)
    r = invoke(cfg, "sprint", "--repo", REPO, "--json")
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["outcome"] == "partial" and out["pr_url"] is None
    branch = f"dispatch/{n}-half-done"
    assert branch in repo.git_branches(REPO)
    assert pulls(repo, "all") == []
    assert f"`{branch}`" in comments(repo, n)[-1]


def test_model_escaping_the_workspace_touches_nothing_outside(repo, model_server, tmp_path):
    repo.add_issue(REPO, "Escape")
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    script = [
        call("write_file", path="../../../outside.txt", content="pwned"),
        call("write_file", path=str(outside), content="pwned"),
        call("gitea_api", method="GET", path="/repos/other/repo/issues"),
        call("gitea_api", method="DELETE", path=f"/repos/{REPO}"),
        say("gave up"),
    ]
    server = model_server(script)
    cfg = sprint_config(tmp_path, repo, server)
    r = invoke(cfg, "sprint", "--repo", REPO, "--json")
    assert json.loads(r.stdout)["outcome"] == "failed"  # finished without changes
    assert outside.read_text() == "untouched"
    tool_results = [m["content"] for m in server.requests[-1]["messages"] if m["role"] == "tool"]
    assert len(tool_results) == 4 and all(t.startswith("error") for t in tool_results)
    # the only DELETE is dispatch's own: the claim label coming off the issue
    deletes = [q.path for q in repo.requests if q.method == "DELETE"]
    assert deletes and all("/labels/" in p for p in deletes)


def test_eight_concurrent_sprints_take_five_distinct_issues(repo, model_server, tmp_path):
    numbers = [repo.add_issue(REPO, f"Task {i}", labels=["P2"]) for i in range(5)]
    # every sprint walks the same two-turn script on its own: write, then finish
    server = model_server([call("write_file", path="f.txt", content="x\n"), say("done")],
                          per_conversation=True)
    cfg = sprint_config(tmp_path, repo, server)
    env = {**os.environ, "DISPATCH_CONFIG": str(cfg)}
    procs = [subprocess.Popen([sys.executable, "-m", "dispatch", "sprint", "--repo", REPO, "--json"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    summaries = [json.loads(o) for o, _ in outs]
    done = sorted(s["issue"] for s in summaries if s["outcome"] == "success")
    assert done == sorted(numbers), (summaries, [e for _, e in outs])
    assert sum(s["outcome"] == "nothing_to_do" for s in summaries) == 3
    assert codes.count(0) == 8
    assert sorted(int(p.body.split("#")[1].split()[0]) for p in pulls(repo)) == sorted(numbers)
    assert len(results(tmp_path)) == 5


def test_kill_9_then_next_run_recovers(repo, model_server, tmp_path):
    n = repo.add_issue(REPO, "Slow one", labels=["P0"])
    server = model_server([call("run_command", command="sleep 30")], when_done="repeat")
    cfg = sprint_config(tmp_path, repo, server)
    env = {**os.environ, "DISPATCH_CONFIG": str(cfg)}
    proc = subprocess.Popen([sys.executable, "-m", "dispatch", "sprint", "--repo", REPO],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while time.time() < deadline and not server.requests:
        time.sleep(0.05)
    assert server.requests, "the sprint never reached the model"
    assert "dispatch:claimed" in [lb["name"] for lb in repo.issue(REPO, n)["labels"]]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    locks = list((tmp_path / "state" / "locks").glob("*.lock"))
    assert len(locks) == 1  # the dead run's lock file is left behind

    server2 = model_server([say("nothing to change")])
    cfg2 = sprint_config(tmp_path, repo, server2)
    r = invoke(cfg2, "sprint", "--repo", REPO, "--issue", str(n), "--json")
    out = json.loads(r.stdout)
    assert any("stale lock" in note for note in out["notes"])
    rows = results(tmp_path)
    assert rows[0]["outcome"] == "failed" and "died" in rows[0]["error"]
    assert any("died" in body for body in comments(repo, n))
    # all rows parse: nothing half-written
    assert all(row["run_id"] for row in rows)


def test_canary_never_in_child_argv(repo, model_server, tmp_path, canary):
    repo.add_issue(REPO, "Watch the argv")
    script = [call("write_file", path="a.txt", content="a\n"), call("run_command", command="sleep 0.3"),
              say("done")]
    server = model_server(script)
    cfg = sprint_config(tmp_path, repo, server)
    env = {**os.environ, "DISPATCH_CONFIG": str(cfg)}
    seen: list[str] = []
    stop = threading.Event()

    def scan() -> None:
        while not stop.is_set():
            for proc_dir in Path("/proc").glob("[0-9]*"):
                try:
                    argv = (proc_dir / "cmdline").read_bytes()
                except OSError:
                    continue
                if canary.encode() in argv:
                    seen.append(argv.decode(errors="replace"))
                if b"git" in argv:
                    seen.append("git-seen")
            time.sleep(0.005)

    t = threading.Thread(target=scan, daemon=True)
    t.start()
    proc = subprocess.run([sys.executable, "-m", "dispatch", "sprint", "--repo", REPO, "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    stop.set()
    t.join()
    assert json.loads(proc.stdout)["outcome"] == "success", proc.stderr
    assert "git-seen" in seen  # the scanner did watch the git children
    assert [s for s in seen if s != "git-seen"] == []
    assert canary not in proc.stdout + proc.stderr


def test_prune_keeps_unpushed_work(repo, model_server, tmp_path):
    from dispatch.config import load_config
    from dispatch.sprint import Sprinter
    from tests.conftest import CANARY

    for title in ("Pushed", "Unpushed"):
        repo.add_issue(REPO, title)
    cfg = load_config(sprint_config(tmp_path, repo, model_server(WRITE_AND_RUN, per_conversation=True)))
    sprinter = Sprinter(cfg, forge(repo), CANARY)
    assert sprinter.run(REPO, 1).outcome == "success"
    assert sprinter.run(REPO, 2).outcome == "success"
    pushed, unpushed = sorted((tmp_path / "state" / "workspaces").iterdir())
    clone = unpushed / "repo"
    (clone / "local.txt").write_text("not pushed")
    subprocess.run(["git", "-C", str(clone), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-qm", "local only"], check=True)
    old = time.time() - 10 * 86400
    for ws in (pushed, unpushed):
        os.utime(ws, (old, old))
    removed, kept = sprinter.prune()
    assert pushed in removed and not pushed.exists()
    assert kept == [unpushed] and (clone / "local.txt").exists()


def test_the_model_shell_cannot_read_secrets_in_the_sandbox(repo, model_server, tmp_path, canary, monkeypatch):
    from tests.realtools import require

    require("bwrap", "bubblewrap")
    monkeypatch.setenv("GITEA_TOKEN", canary)  # in dispatch's own environment, as with token_env
    repo.add_issue(REPO, "Try to steal")
    token_file = tmp_path / "gitea-token"
    probe = (f"cat /proc/$PPID/environ /proc/1/environ 2>&1 | tr '\\0' '\\n'; cat {token_file} 2>&1; "
             f"ls {tmp_path / 'state'} 2>&1; ls /proc | head -3")
    server = model_server([call("run_command", command=probe), say("nothing to do")])
    cfg = sprint_config(tmp_path, repo, server, sandbox="bwrap")
    r = invoke(cfg, "sprint", "--repo", REPO, "--json")
    assert json.loads(r.stdout)["outcome"] == "failed"  # it changed nothing
    [seen] = [m["content"] for m in server.requests[-1]["messages"] if m["role"] == "tool"]
    assert "exit code" in seen and canary not in seen
    assert "gitea-token: Permission denied" in seen or "gitea-token: No such file" in seen  # masked
    assert "results.csv" not in seen and "git-askpass.sh" not in seen  # the state dir is hidden
    assert canary not in server.sent_text()


def test_a_pr_post_that_landed_before_its_retry_failed_is_still_a_success(repo, model_server, tmp_path):
    from dispatch.config import load_config
    from dispatch.errors import ForgeError
    from dispatch.sprint import Sprinter
    from tests.conftest import CANARY

    class LostAnswer(ForgeClient):
        """The PR is created, but the answer is lost and the retry is told it exists."""

        def create_pull(self, repo_: str, **kw):
            super().create_pull(repo_, **kw)
            raise ForgeError("POST", f"{self.api}/repos/{repo_}/pulls", 409, "pull request already exists")

    n = repo.add_issue(REPO, "Add a hello file")
    cfg = load_config(sprint_config(tmp_path, repo, model_server(WRITE_AND_RUN)))
    out = Sprinter(cfg, LostAnswer(repo.url, CANARY, retries=0), CANARY).run(REPO, n)
    assert out.outcome == "success" and out.pr_url.endswith("/pulls/2")
    assert len(pulls(repo)) == 1 and results(tmp_path)[0]["outcome"] == "success"


def test_what_a_cli_agent_prints_is_redacted_everywhere(repo, tmp_path, canary):
    n = repo.add_issue(REPO, "Leaky agent")
    agent = tmp_path / "leaky-agent.sh"
    agent.write_text(f"#!/bin/sh\necho \"my token is $(cat {tmp_path / 'gitea-token'})\"\nexit 3\n")
    agent.chmod(0o755)
    cfg = write_config(tmp_path, repo, [REPO], gitea={"retries": 0},
                       sprint={"backends": ["cli"], "cli_command": f"{agent} {{prompt_file}}"})
    r = invoke(cfg, "sprint", "--repo", REPO, "--json")
    out = json.loads(r.stdout)
    assert out["outcome"] == "failed" and "my token is ***" in out["error"]
    assert canary not in (tmp_path / "state" / "results.csv").read_text()
    assert all(canary not in body for body in comments(repo, n))
