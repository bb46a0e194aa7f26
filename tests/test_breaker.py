"""Circuit breakers kept on disk: each simulated cron run builds a fresh Breaker."""

from __future__ import annotations

import json
import multiprocessing
import socket
import time
from pathlib import Path

import pytest

from dispatch.breaker import Breaker, BreakerConfig, BreakerOpen, breaker_path, status_all
from dispatch.errors import ForgeError
from dispatch.forge import ForgeClient


class Clock:
    """A settable clock: seconds since the epoch."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def one_run(state: Path, clock: Clock, client: ForgeClient) -> str:
    """What a cron run does: a new process, so a new Breaker read from disk."""
    breaker = BreakerConfig().breaker(state, "forge", clock=clock)
    try:
        breaker.call(client.current_user)
    except BreakerOpen:
        return "skipped"
    except ForgeError:
        return "failed"
    return "ok"


def test_forge_down_for_five_runs_opens_skips_fast_and_closes_when_back(
    tmp_path: Path, gitea, canary: str
) -> None:
    clock = Clock()
    client = ForgeClient(gitea.url, canary, retries=0)
    assert one_run(tmp_path, clock, client) == "ok"
    gitea.down()
    outcomes = []
    for _ in range(5):
        clock.t += 60  # cron every minute; each failure is within one cool-down of the last
        outcomes.append(one_run(tmp_path, clock, client))
    assert outcomes == ["failed"] * 5
    assert Breaker(tmp_path, "forge", clock=clock).state == "open"

    # later runs inside the cool-down skip the forge: no request at all, and quickly
    made = client.requests_made
    clock.t += 30
    started = time.perf_counter()
    assert one_run(tmp_path, clock, client) == "skipped"
    assert time.perf_counter() - started < 0.1
    assert client.requests_made == made

    # the forge returns; after the cool-down the next run probes it (half-open)...
    gitea.up()
    clock.t += 31
    assert Breaker(tmp_path, "forge", clock=clock).state == "half_open"
    assert one_run(tmp_path, clock, client) == "ok"
    assert Breaker(tmp_path, "forge", clock=clock).state == "half_open"
    # ...and the second good call closes it
    clock.t += 60
    assert one_run(tmp_path, clock, client) == "ok"
    assert Breaker(tmp_path, "forge", clock=clock).state == "closed"
    assert status_all(tmp_path, now=clock.t)[0]["failures"] == 0


def test_skipping_a_dead_port_costs_no_connection_attempt(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ForgeClient(f"http://127.0.0.1:{port}", "t", retries=0)
    clock = Clock()
    for _ in range(5):
        assert one_run(tmp_path, clock, client) == "failed"
    assert client.requests_made == 5
    started = time.perf_counter()
    for _ in range(20):
        assert one_run(tmp_path, clock, client) == "skipped"
    assert time.perf_counter() - started < 0.5  # 20 runs' worth of checks, disk reads included
    assert client.requests_made == 5


def test_failure_in_half_open_reopens_for_another_cooldown(tmp_path: Path) -> None:
    clock = Clock()
    b = Breaker(tmp_path, "model", clock=clock, failure_threshold=2, cooldown_s=60)
    assert b.record(False, "boom") == "closed"
    assert b.record(False, "boom") == "open"
    assert not b.allow()
    clock.t += 60
    assert b.allow() and b.state == "half_open"
    assert b.record(False, "still down") == "open"
    clock.t += 59
    assert not Breaker(tmp_path, "model", clock=clock).allow()
    clock.t += 1
    assert Breaker(tmp_path, "model", clock=clock).allow()


def test_a_success_resets_the_consecutive_count(tmp_path: Path) -> None:
    clock = Clock()
    for _ in range(3):
        for _ in range(4):
            Breaker(tmp_path, "forge", clock=clock).record(False)
        Breaker(tmp_path, "forge", clock=clock).record(True)
    assert Breaker(tmp_path, "forge", clock=clock).state == "closed"


def test_open_message_names_the_dependency_and_the_retry_time(tmp_path: Path) -> None:
    clock = Clock(1_700_000_000.0)  # 2023-11-14 22:13:20Z
    b = Breaker(tmp_path, "gateway:8642", clock=clock, failure_threshold=1, cooldown_s=90)

    def down() -> None:
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        b.call(down)
    with pytest.raises(BreakerOpen) as info:
        b.call(down)
    msg = str(info.value)
    assert msg.startswith("gateway:8642: circuit open after 1 consecutive failures")
    assert "(last: refused)" in msg
    assert "skipping it until 2023-11-14 22:14:50Z" in msg
    assert info.value.retry_at == clock.t + 90


def test_client_errors_are_answers_not_outages(tmp_path: Path) -> None:
    b = Breaker(tmp_path, "forge", clock=Clock(), failure_threshold=1)

    def not_found() -> None:
        raise ForgeError("GET", "http://f/api/v1/repos/x/y", 404, "not found")

    def rate_limited() -> None:
        raise ForgeError("GET", "http://f/api/v1/user", 429, "slow down")

    for _ in range(3):
        with pytest.raises(ForgeError):
            b.call(not_found)
    assert b.state == "closed"
    with pytest.raises(ForgeError):
        b.call(rate_limited)
    assert b.state == "open"


def test_status_all_reports_every_breaker(tmp_path: Path) -> None:
    clock = Clock()
    cfg = BreakerConfig(failure_threshold=1, cooldown_s=60)
    cfg.breaker(tmp_path, "forge", clock=clock).record(True)
    cfg.breaker(tmp_path, "http://127.0.0.1:11434/v1", clock=clock).record(False, "refused")
    rows = status_all(tmp_path, now=clock.t)
    assert [(r["name"], r["state"]) for r in rows] == [
        ("forge", "closed"), ("http://127.0.0.1:11434/v1", "open")]
    assert rows[1]["retry_at"] == clock.t + 60 and rows[1]["last_error"] == "refused"
    assert [r["state"] for r in status_all(tmp_path, now=clock.t + 60)] == ["closed", "half_open"]


def test_names_fold_to_distinct_safe_files_and_corrupt_state_means_closed(tmp_path: Path) -> None:
    a = breaker_path(tmp_path, "http://a:1/v1")
    b = breaker_path(tmp_path, "http://a/1/v1")
    assert a != b and a.parent == b.parent == tmp_path / "breakers"
    assert "/" not in a.name and ":" not in a.name
    assert breaker_path(tmp_path, "forge").name == "forge.json"
    a.parent.mkdir(parents=True)
    a.write_text("{torn")
    assert Breaker(tmp_path, "http://a:1/v1").state == "closed"
    a.write_text(json.dumps({"state": "open"}))  # no retry time: let a probe through
    assert Breaker(tmp_path, "http://a:1/v1").allow()


def _fail_many(state: str, n: int, barrier) -> None:
    barrier.wait()
    for _ in range(n):
        Breaker(Path(state), "shared", failure_threshold=10_000).record(False)


def test_concurrent_runs_do_not_lose_counts(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_fail_many, args=(str(tmp_path), 40, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(20)
        assert p.exitcode == 0
    assert status_all(tmp_path)[0]["failures"] == 80
