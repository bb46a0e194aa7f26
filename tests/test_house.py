"""House health readings against thresholds, and cleanup over real git clones of a real bare
remote: old clean work goes, unpushed or uncommitted work and live runs stay."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dispatch import house
from dispatch.house import HouseConfig
from dispatch.locks import Lock

CFG = HouseConfig()
DAY = 86400.0


def statvfs(free_gb: float, total_gb: float):
    block = 4096
    return lambda path: SimpleNamespace(f_bavail=int(free_gb * 1e9 / block), f_frsize=block,
                                        f_blocks=int(total_gb * 1e9 / block))


def test_disk_thresholds_in_gb_and_percent(tmp_path):
    low = {r.check: r for r in house.disk(tmp_path, CFG, statvfs(3, 100))}
    assert low["disk_free_gb"].ok is False and low["disk_free_gb"].value == pytest.approx(3, abs=0.01)
    assert low["disk_free_pct"].ok is False
    big = {r.check: r.ok for r in house.disk(tmp_path, CFG, statvfs(40, 1000))}
    assert big == {"disk_free_gb": True, "disk_free_pct": False}  # 4 %: plenty of GB, still low
    real = house.disk(tmp_path, CFG)
    assert real[0].value is not None and real[0].value > 0


def test_memory_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:     512000 kB\n")
    r = house.memory(CFG, meminfo)
    assert (r.value, r.ok) == (500, False)
    meminfo.write_text("MemAvailable:    4096000 kB\n")
    assert house.memory(CFG, meminfo).ok is True
    missing = house.memory(CFG, tmp_path / "nope")
    assert missing.value is None and missing.ok is True


def test_load_per_core():
    assert house.load(CFG, lambda: (9.0, 6.0, 1.0), cores=2).ok is False
    r = house.load(CFG, lambda: (9.0, 3.0, 1.0), cores=2)
    assert (r.value, r.ok) == (1.5, True)


def test_model_server_reachability_and_warnings(model_server, tmp_path):
    server = model_server([])
    up = house.model_server(server.url + "/v1", CFG)
    assert up.ok is True
    down = house.model_server("http://127.0.0.1:9/v1", HouseConfig(model_timeout=0.5))
    assert down.ok is False and "cannot reach" in down.detail
    readings = house.check_all(tmp_path / "state", "http://127.0.0.1:9/v1", HouseConfig(model_timeout=0.5),
                               statvfs=statvfs(1, 100), getloadavg=lambda: (0.1, 0.1, 0.1))
    events = house.warnings(readings)
    assert {e["subject"] for e in events} >= {"disk_free_gb", "disk_free_pct", "model_server"}
    assert all(e["kind"] == "house_warning" and "threshold" in e for e in events)
    assert "load_per_core" not in {e["subject"] for e in events}


# ---- cleanup over real git -------------------------------------------------------------------


def git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def remote(tmp_path) -> Path:
    """A bare repository with one commit on main."""
    bare = tmp_path / "remote.git"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    seed = tmp_path / "seed"
    git("clone", "-q", str(bare), str(seed))
    (seed / "README.md").write_text("hi\n")
    git("add", "-A", cwd=seed)
    git("commit", "-qm", "seed", cwd=seed)
    git("push", "-q", "origin", "HEAD:main", cwd=seed)
    return bare


def workspace(state: Path, run_id: str, remote: Path, *, age_days: float = 10) -> Path:
    ws = state / "workspaces" / run_id
    ws.mkdir(parents=True)
    git("clone", "-q", str(remote), str(ws / "repo"))
    old = time.time() - age_days * DAY
    os.utime(ws, (old, old))
    return ws


def commit(clone: Path, name: str, *, push: str = "") -> None:
    (clone / name).write_text(name)
    git("add", "-A", cwd=clone)
    git("commit", "-qm", name, cwd=clone)
    if push:
        git("push", "-q", "origin", f"HEAD:refs/heads/{push}", cwd=clone)


def age(path: Path, days: float) -> None:
    old = time.time() - days * DAY
    os.utime(path, (old, old))


def test_cleanup_keeps_unpushed_dirty_and_live_work(tmp_path, remote):
    state = tmp_path / "state"
    pushed = workspace(state, "run-pushed", remote)
    commit(pushed / "repo", "done.txt", push="dispatch/1-done")
    age(pushed, 10)
    unpushed = workspace(state, "run-unpushed", remote)
    commit(unpushed / "repo", "local.txt")
    age(unpushed, 10)
    dirty = workspace(state, "run-dirty", remote)
    (dirty / "repo" / "half.txt").write_text("uncommitted")
    age(dirty, 10)
    live = workspace(state, "run-live", remote)
    recent = workspace(state, "run-recent", remote, age_days=1)
    traj = state / "trajectories"
    traj.mkdir()
    for name, days in (("run-old.jsonl", 10), ("run-new.jsonl", 1), ("run-live.jsonl", 10)):
        (traj / name).write_text("{}\n")
        age(traj / name, days)
    logs = state / "logs"
    logs.mkdir()
    (logs / "old.log").write_text("x")
    age(logs / "old.log", 10)

    with Lock(state / "locks", "acme/app#3", run_id="run-live"):
        result = house.cleanup(state, keep_days=3)
    assert result.removed == [pushed, traj / "run-old.jsonl", logs / "old.log"]
    assert not pushed.exists()
    assert sorted(result.kept_unpushed) == [dirty, unpushed]
    assert (unpushed / "repo" / "local.txt").exists() and (dirty / "repo" / "half.txt").exists()
    assert result.kept_live == [live] and (live / "repo" / ".git").is_dir()
    assert recent.exists() and (traj / "run-new.jsonl").exists() and (traj / "run-live.jsonl").exists()

    # the lock is gone now: the same clean workspace is fair game
    assert house.cleanup(state, keep_days=3).removed == [live, traj / "run-live.jsonl"]


def test_cleanup_never_deletes_a_repo_git_cannot_read(tmp_path, remote):
    state = tmp_path / "state"
    broken = workspace(state, "run-broken", remote)
    (broken / "repo" / ".git" / "HEAD").write_text("garbage\n")
    age(broken, 10)
    result = house.cleanup(state, keep_days=3)
    assert result.kept_unpushed == [broken] and broken.exists()


def test_cleanup_waits_while_a_live_run_is_still_cloning(tmp_path, remote):
    state = tmp_path / "state"
    old_clean = workspace(state, "run-clean", remote)
    setting_up = state / "workspaces" / "run-setup"
    setting_up.mkdir()
    age(setting_up, 10)
    with Lock(state / "locks", "acme/app#4", run_id="run-setup"):
        result = house.cleanup(state, keep_days=3)
    assert result.removed == [] and result.kept_live == [setting_up]
    assert old_clean.exists() and setting_up.exists()


def test_the_model_server_check_sends_the_api_key():
    import responses as rsps

    from dispatch.house import HouseConfig, model_server

    def models(request):
        ok = request.headers.get("Authorization") == "Bearer sk-test"
        return (200, {}, '{"data": []}') if ok else (401, {}, '{"error": "no key"}')

    with rsps.RequestsMock() as mock:
        mock.add_callback(rsps.GET, "http://llm.test/v1/models", callback=models)
        assert not model_server("http://llm.test/v1", HouseConfig()).ok
        assert model_server("http://llm.test/v1", HouseConfig(), api_key="sk-test").ok
