"""Sprints as jobs on Dramatiq + a real redis-server, against the Gitea emulator and scripted model."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dispatch.cli import app
from dispatch.config import load_config
from dispatch.forge import ForgeClient
from dispatch.jobs import (
    QueueConfig,
    check,
    enqueue_sprint,
    is_transient,
    queue_status,
    redis_client,
)
from tests.emulator.fixtures import write_config
from tests.emulator.model_server import call, say

REPO = "acme/app"
CLI = "from dispatch.cli import main; main()"
# a worker with a stand-in runner (see `recording_runner`) instead of real sprints
PY_WORKER = """
import signal, sys, threading
from pathlib import Path
from dispatch.config import load_config
from dispatch.jobs import run_worker
from tests.test_jobs import recording_runner
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
run_worker(load_config(Path(sys.argv[1])), sys.argv[2].split(","), threads=int(sys.argv[3]),
           runner=recording_runner, stop=stop, grace_s=5)
"""
FAST = {"heartbeat_timeout_s": 3, "maintenance_chance": 1_000_000, "min_backoff_s": 0.2,
        "max_backoff_s": 1, "time_limit_minutes": 2, "lock_ttl_minutes": 3}


# ---- helpers -----------------------------------------------------------------------------------


def config(tmp_path: Path, gitea, redis, server=None, repos=(REPO,), **queue) -> Path:
    extra = {"llm": {"base_url": server.url + "/v1", "model": "scripted"}} if server else {}
    return write_config(tmp_path, gitea, list(repos), sprint={"backends": ["direct"]},
                        gitea={"retries": 0}, queue={"url": redis.url, **FAST, **queue}, **extra)


def invoke(cfg: Path, *args: str):
    return CliRunner().invoke(app, ["--config", str(cfg), *args])


def spawn(tmp_path: Path, cfg: Path, *args: str, name: str = "worker", code: str = CLI) -> subprocess.Popen:
    log = (tmp_path / f"{name}-{time.monotonic_ns()}.log").open("wb")
    argv = [sys.executable, "-c", code, *args] if code != CLI else [sys.executable, "-c", code, "-v", "--config", str(cfg), *args]
    return subprocess.Popen(argv, env={**os.environ, "DISPATCH_CONFIG": str(cfg)}, stdout=log, stderr=log,
                            cwd=Path(__file__).resolve().parent.parent)


def py_worker(tmp_path: Path, cfg: Path, agents: str = "claude", threads: int = 1) -> subprocess.Popen:
    return spawn(tmp_path, cfg, str(cfg), agents, str(threads), name="pyworker", code=PY_WORKER)


def stop(*procs: subprocess.Popen) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    return [p.wait(timeout=20) for p in procs]


def wait_for(pred: Callable[[], object], timeout: float, what: str, tmp_path: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    logs = "".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("*worker-*.log"))) if tmp_path else ""
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs}")


def forge(gitea) -> ForgeClient:
    from tests.conftest import CANARY

    return ForgeClient(gitea.url, CANARY, retries=0)


def results(tmp_path: Path) -> list[dict]:
    path = tmp_path / "state" / "results.csv"
    return list(csv.DictReader(path.open(newline=""))) if path.exists() else []


def redis_dump(cfg) -> bytes:
    r = redis_client(cfg)
    out = []
    for key in r.scan_iter():
        kind = r.type(key)
        if kind == b"string":
            out.append(r.get(key))
        elif kind == b"hash":
            out.extend(v for kv in r.hgetall(key).items() for v in kv)
        elif kind == b"list":
            out.extend(r.lrange(key, 0, -1))
        elif kind == b"zset":
            out.extend(r.zrange(key, 0, -1))
        elif kind == b"set":
            out.extend(r.smembers(key))
    return b"\n".join(out)


def depth(cfg, agent: str = "claude"):
    return next(d for d in queue_status(cfg).queues if d.queue == f"sprints.{agent}")


def recording_runner(cfg, repo: str, issue: int, previous):
    """Stand-in sprint for queue tests: sleeps, appends its interval to runs.jsonl, succeeds."""
    from dispatch.sprint import SprintOutcome

    start = time.time()
    time.sleep(float(os.environ.get("JOB_SLEEP", "0.3")))
    row = {"ref": f"{repo}#{issue}", "agent": cfg.sprint.agent, "start": start, "end": time.time(),
           "pid": os.getpid()}
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    with (cfg.state_path / "runs.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return SprintOutcome("success", repo, issue, "run-fake"), "finished"


def runs(tmp_path: Path) -> list[dict]:
    path = tmp_path / "state" / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


SCRIPT = [call("write_file", path="f.txt", content="x\n"), call("run_command", command="sleep 0.4"), say("done")]


# ---- no broker: the embedded default -------------------------------------------------------------


def test_without_a_broker_queue_commands_exit_2_and_say_why(gitea, tmp_path):
    cfg = write_config(tmp_path, gitea, [REPO])
    for args in (["enqueue", f"{REPO}#1"], ["worker"], ["queue", "status"], ["queue", "failed"],
                 ["queue", "retry", "--all"]):
        r = invoke(cfg, *args)
        assert r.exit_code == 2, (args, r.output)
        assert "queue.url: no broker configured" in r.output
    assert load_config(cfg).queue == QueueConfig()  # the section is optional


def test_importing_the_queue_config_loads_no_broker_library():
    code = ("import sys, dispatch.config, dispatch.jobs, dispatch.cli; "
            "print([m for m in sys.modules if m.split('.')[0] in ('dramatiq', 'redis')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("queue, fragment", [
    ({"url": "redis://:hunter2@10.0.0.5:6379/0"}, "credentials do not belong in the URL"),
    ({"url": "http://10.0.0.5"}, "expected redis://"),
    ({"url": "redis://10.0.0.5", "time_limit_minutes": 60, "lock_ttl_minutes": 60}, "must be longer"),
    ({"url": "redis://10.0.0.5", "min_backoff_s": 0}, "min_backoff_s"),
])
def test_bad_queue_config_names_the_key(gitea, tmp_path, queue, fragment):
    cfg = load_config(write_config(tmp_path, gitea, [REPO], queue=queue))
    with pytest.raises(Exception, match=fragment) as info:
        check(cfg)
    assert "queue." in str(info.value) and "hunter2" not in str(info.value)


@pytest.mark.parametrize("outcome, error, status, transient", [
    ("success", "", "finished", False),
    ("nothing_to_do", "no eligible issue", "", False),
    ("failed", "stopped after 40 steps (the step budget)", "step_budget", False),
    ("partial", "stopped after 40 steps; 2 commit(s) pushed", "step_budget", False),
    ("failed", "agent finished without changing anything", "finished", False),
    ("failed", "model endpoint kept failing", "model_error", True),
    ("failed", "ForgeError: 502 for POST http://x/api/v1/repos/a/b/pulls: bad gateway", "finished", True),
    ("failed", "ForgeError: cannot reach GET http://x/api/v1/repos/a/b", "", True),
    ("failed", "ForgeError: 404 for GET http://x/api/v1/repos/a/b: not found", "", False),
    ("failed", "GitError: git push failed: connection reset", "finished", True),
    ("failed", "interrupted (TimeLimitExceeded)", "", True),
])
def test_which_outcomes_are_retried(outcome, error, status, transient):
    assert is_transient(outcome, error, status) is transient


# ---- with Redis ----------------------------------------------------------------------------------


@pytest.mark.redis
def test_enqueue_puts_no_secret_on_the_wire_and_one_queue_per_agent(gitea, redis_binary, tmp_path, canary):
    from tests.redis_fixtures import RedisServer

    server = RedisServer(redis_binary, tmp_path / "redis", password="s3cret-pw")
    (tmp_path / "redis").mkdir()
    server.start()
    try:
        pw = tmp_path / "redis-password"
        pw.write_text("s3cret-pw\n")
        cfg_path = config(tmp_path, gitea, server, password_file=str(pw))
        r1 = invoke(cfg_path, "enqueue", f"{REPO}#7", "--agent", "kimi", "--json")
        r2 = invoke(cfg_path, "enqueue", f"{REPO}#8")
        assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
        job = json.loads(r1.stdout)
        assert job["queue"] == "sprints.kimi" and "for claude" in r2.stdout
        cfg = load_config(cfg_path)
        assert (depth(cfg, "kimi").queued, depth(cfg, "claude").queued) == (1, 1)
        raw = redis_client(cfg).hvals("dispatch:sprints.kimi.msgs")[0]
        assert json.loads(raw)["args"] == [REPO, 7, "kimi"]
        dump = redis_dump(cfg)
        assert canary.encode() not in dump and b"s3cret-pw" not in dump
        assert invoke(cfg_path, "enqueue", f"{REPO}#9", "--agent", "nobody").exit_code == 2
        pw.write_text("wrong\n")
        r = invoke(cfg_path, "queue", "status")
        assert r.exit_code == 1 and "QueueError" in r.output and "wrong" not in r.output
    finally:
        server.stop()


@pytest.mark.redis
def test_kimi_worker_never_runs_claude_jobs(gitea, redis_server, model_server, tmp_path):
    gitea.add_repo(REPO, git=True)
    for_claude = gitea.add_issue(REPO, "Refactor the core")
    for_kimi = gitea.add_issue(REPO, "Add a test")
    cfg_path = config(tmp_path, gitea, redis_server, model_server(SCRIPT, per_conversation=True))
    cfg = load_config(cfg_path)
    enqueue_sprint(cfg, REPO, for_claude, "claude")
    enqueue_sprint(cfg, REPO, for_kimi, "kimi")
    w = spawn(tmp_path, cfg_path, "worker", "--agent", "kimi")
    wait_for(lambda: forge(gitea).list_pulls(REPO), 30, "kimi's PR", tmp_path)
    st = queue_status(cfg)
    assert [(x.agents, x.alive) for x in st.workers] == [(("kimi",), True)]
    time.sleep(1.0)  # give a wrong worker every chance to take claude's job
    assert depth(cfg, "claude").queued == 1 and depth(cfg, "kimi").queued == 0
    assert forge(gitea).list_comments(REPO, for_claude) == []
    assert [r["agent"] for r in results(tmp_path)] == ["kimi"]
    assert stop(w) == [0]
    assert queue_status(cfg).workers == ()  # a clean stop unregisters


@pytest.mark.redis
def test_two_jobs_for_one_issue_never_overlap(gitea, redis_server, tmp_path):
    cfg_path = config(tmp_path, gitea, redis_server)
    cfg = load_config(cfg_path)
    jobs = [1, 1, 1, 1, 2, 2, 3, 3]
    for n in jobs:
        enqueue_sprint(cfg, REPO, n, "claude")
    workers = [py_worker(tmp_path, cfg_path, threads=2) for _ in range(2)]
    wait_for(lambda: len(runs(tmp_path)) == len(jobs), 30, "every job to run", tmp_path)
    assert stop(*workers) == [0, 0]
    done = runs(tmp_path)
    for ref in {r["ref"] for r in done}:
        spans = sorted((r["start"], r["end"]) for r in done if r["ref"] == ref)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)), ref
    # different issues did run side by side, so the lock, not a lack of workers, kept them apart
    assert any(a["start"] < b["end"] and b["start"] < a["end"]
               for a in done for b in done if a["ref"] != b["ref"])
    assert len({r["pid"] for r in done}) == 2
    assert depth(cfg).failed == 0


@pytest.mark.redis
def test_always_failing_job_is_dead_lettered_then_retried(gitea, redis_server, tmp_path):
    cfg_path = config(tmp_path, gitea, redis_server, max_retries=2, min_backoff_s=0.1, max_backoff_s=0.2)
    # a forge that is never there: every attempt fails with a transient "cannot reach"
    text = cfg_path.read_text().replace(gitea.url, "http://127.0.0.1:9")
    cfg_path.write_text(text)
    cfg = load_config(cfg_path)
    job_id = enqueue_sprint(cfg, REPO, 5, "claude")
    w = spawn(tmp_path, cfg_path, "worker")
    wait_for(lambda: depth(cfg).failed == 1, 30, "the job to be dead-lettered", tmp_path)
    assert stop(w) == [0]
    r = invoke(cfg_path, "queue", "failed", "--json")
    assert r.exit_code == 0, r.output
    [dead] = json.loads(r.stdout)
    assert dead["job_id"] == job_id and dead["retries"] == 2 and dead["issue"] == 5
    assert "ForgeError" in dead["error"] and "cannot reach" in dead["error"]
    assert invoke(cfg_path, "queue", "retry", "nope").exit_code == 2
    r = invoke(cfg_path, "queue", "retry", job_id[:8])
    assert r.exit_code == 0 and f"re-queued {job_id}" in r.stdout
    d = depth(cfg)
    assert (d.queued, d.failed) == (1, 0)
    back = json.loads(redis_client(cfg).hvals("dispatch:sprints.claude.msgs")[0])
    assert back["message_id"] == job_id and "retries" not in back["options"]
    assert invoke(cfg_path, "queue", "retry", "--all").stdout.strip().endswith("0 job(s) re-queued")


@pytest.mark.redis
def test_redis_restart_loses_nothing_queued(gitea, redis_server, tmp_path):
    cfg_path = config(tmp_path, gitea, redis_server)
    cfg = load_config(cfg_path)
    ids = {enqueue_sprint(cfg, REPO, n, "claude") for n in range(1, 6)}
    redis_server.restart()
    r = redis_client(cfg)
    assert {json.loads(v)["message_id"] for v in r.hvals("dispatch:sprints.claude.msgs")} == ids
    assert depth(cfg).queued == 5
    w = py_worker(tmp_path, cfg_path, threads=2)
    wait_for(lambda: len(runs(tmp_path)) == 5, 20, "the five jobs", tmp_path)
    assert stop(w) == [0]
    assert sorted(x["ref"] for x in runs(tmp_path)) == [f"{REPO}#{n}" for n in range(1, 6)]


@pytest.mark.redis
def test_redelivered_job_after_the_pr_doubles_nothing(gitea, redis_server, model_server, tmp_path):
    """At-least-once: the same message delivered again after its sprint opened the PR must end
    as nothing_to_do (the open PR makes the issue ineligible): no PR, comment or row added."""
    from dramatiq import Message

    from dispatch.jobs import make_broker

    gitea.add_repo(REPO, git=True)
    n = gitea.add_issue(REPO, "Add hello")
    cfg_path = config(tmp_path, gitea, redis_server, model_server(SCRIPT, per_conversation=True))
    cfg = load_config(cfg_path)
    msg = Message(queue_name="sprints.claude", actor_name="dispatch_sprint", args=(REPO, n, "claude"),
                  kwargs={}, options={})
    broker = make_broker(cfg)
    broker.enqueue(msg)
    w = spawn(tmp_path, cfg_path, "worker")
    wait_for(lambda: results(tmp_path), 30, "the first sprint", tmp_path)
    comments = [c.body for c in forge(gitea).list_comments(REPO, n)]
    broker.enqueue(msg)  # the very same job again, as a re-delivery would bring it
    wait_for(lambda: depth(cfg).queued == 0 and not queue_status(cfg).running, 20, "the second delivery")
    time.sleep(0.5)
    assert stop(w) == [0]
    assert len(forge(gitea).list_pulls(REPO, state="all")) == 1
    assert [c.body for c in forge(gitea).list_comments(REPO, n)] == comments
    assert [r["outcome"] for r in results(tmp_path)] == ["success"]
    assert depth(cfg).failed == 0


@pytest.mark.redis
def test_claim_of_an_attempt_that_died_on_another_host_is_released(gitea, redis_server, model_server, tmp_path):
    from dispatch import claims

    gitea.add_repo(REPO, git=True)
    n = gitea.add_issue(REPO, "Half way when the host died")
    cfg_path = config(tmp_path, gitea, redis_server, model_server(SCRIPT, per_conversation=True))
    cfg = load_config(cfg_path)
    # what a host that died mid-sprint leaves: its claim on the forge and its attempt record
    claims.claim(forge(gitea), REPO, n, run_id="run-dead", agent="claude", label=cfg.triage.claim_label)
    redis_client(cfg).set(f"dispatch:meta:attempt:{REPO}#{n}", json.dumps(
        {"message_id": "m-dead", "worker": "w-dead", "host": "vps-2", "agent": "claude", "started": time.time()}))
    enqueue_sprint(cfg, REPO, n, "claude")
    w = spawn(tmp_path, cfg_path, "worker")
    wait_for(lambda: results(tmp_path), 30, "the sprint", tmp_path)
    assert stop(w) == [0]
    bodies = [c.body for c in forge(gitea).list_comments(REPO, n)]
    released = [b for b in bodies if "dispatch:release run=run-dead" in b]
    assert len(released) == 1 and "vps-2" in released[0]
    assert [r["outcome"] for r in results(tmp_path)] == ["success"]
    assert len(forge(gitea).list_pulls(REPO)) == 1


@pytest.mark.redis
@pytest.mark.slow
def test_twenty_sprints_two_workers_one_killed(gitea, redis_server, model_server, tmp_path, canary):
    gitea.add_repo(REPO, git=True)
    numbers = [gitea.add_issue(REPO, f"Task {i}", labels=["P2"]) for i in range(20)]
    cfg_path = config(tmp_path, gitea, redis_server, model_server(SCRIPT, per_conversation=True))
    cfg = load_config(cfg_path)
    victim_w = spawn(tmp_path, cfg_path, "worker", "--threads", "2")
    other_w = spawn(tmp_path, cfg_path, "worker", "--threads", "2")
    for n in numbers:
        enqueue_sprint(cfg, REPO, n, "claude")
    locks = tmp_path / "state" / "locks"

    def victim_mid_sprint():
        # a sprint of the victim's that holds its issue lock and has claimed the issue on the forge
        for path in locks.glob("*.lock"):
            try:
                info = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                continue
            if info.get("pid") == victim_w.pid and "dispatch:claimed" in [
                    lb["name"] for lb in gitea.issue(REPO, info["issue"])["labels"]]:
                return info
        return None

    killed = wait_for(victim_mid_sprint, 30, "the victim worker mid-sprint", tmp_path)
    victim_w.send_signal(signal.SIGKILL)
    victim_w.wait(timeout=10)
    restarted = spawn(tmp_path, cfg_path, "worker", "--threads", "2")

    def all_done():
        st = queue_status(cfg)
        d = next(x for x in st.queues if x.queue == "sprints.claude")
        return len(forge(gitea).list_pulls(REPO)) == 20 and d.queued == d.delayed == d.reserved == 0
    wait_for(all_done, 60, "20 PRs and an empty queue", tmp_path)
    assert stop(other_w, restarted) == [0, 0]

    pulls = forge(gitea).list_pulls(REPO, state="all")
    assert sorted(int(p.head.split("/")[1].split("-")[0]) for p in pulls) == numbers  # one PR each
    rows = results(tmp_path)
    assert sorted(int(r["issue"]) for r in rows if r["outcome"] == "success") == numbers
    others = [r for r in rows if r["outcome"] != "success"]
    assert all("crashed" in r["error"] for r in others), others  # only the dead run's own row
    assert len({r["run_id"] for r in rows}) == len(rows)
    for n in numbers:
        bodies = [c.body for c in forge(gitea).list_comments(REPO, n)]
        claim_runs = [b.split("run=")[1].split()[0] for b in bodies if "dispatch:claim " in b]
        assert len(claim_runs) == len(set(claim_runs)), (n, bodies)
        assert sum("dispatch opened" in b for b in bodies) == 1, (n, bodies)
    # the killed sprint was re-delivered and finished by another run
    finished = next(r for r in rows if r["outcome"] == "success" and int(r["issue"]) == killed["issue"])
    assert finished["run_id"] != killed["run_id"]
    assert queue_status(cfg).queues[0].failed == 0
    assert canary.encode() not in redis_dump(cfg)


@pytest.mark.redis
def test_collector_and_report_show_queue_depth_workers_and_dead_letters(gitea, redis_server, tmp_path, canary):
    from datetime import UTC, datetime, timedelta

    from dispatch.cli_report import load_report
    from dispatch.collector import run_collector
    from dispatch.report_html import render_markdown

    gitea.add_repo(REPO, git=True)
    a, b = gitea.add_issue(REPO, "One"), gitea.add_issue(REPO, "Two")
    cfg = load_config(config(tmp_path, gitea, redis_server))
    enqueue_sprint(cfg, REPO, a, "claude")
    enqueue_sprint(cfg, REPO, b, "kimi")
    run_collector(cfg, client=ForgeClient(gitea.url, canary, retries=0))
    rows = (tmp_path / "state" / "telemetry" / "metrics.jsonl").read_text().splitlines()
    snap = json.loads(rows[-1])
    assert snap["probes"]["queue"] == "ok"
    assert snap["queue"]["queues"]["sprints.claude"]["queued"] == 1
    assert snap["queue"]["queues"]["sprints.kimi"]["queued"] == 1
    assert snap["queue"]["dead_letters"] == 0 and snap["queue"]["workers"] == []
    now = datetime.now(UTC)
    md = render_markdown(load_report(tmp_path / "state", now - timedelta(hours=1), now + timedelta(minutes=1)))
    assert "**Queue:** 2 queued, 0 delayed, 0 dead letters; 0 workers (none)" in md
