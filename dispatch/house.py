"""House health: disk, memory, load and the model server, against thresholds; and cleanup of old
workspaces, logs and trajectories that never touches unpushed work or a live run's files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .gitops import Git, GitError, prune, write_askpass
from .locks import live

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HouseConfig:
    """The `house:` config section: when the machine counts as unhealthy, and what is old."""

    disk_min_free_gb: float = 5.0  # free space on the state dir's filesystem, GB
    disk_min_free_pct: float = 10.0  # ... and as a percentage of the filesystem
    mem_min_available_mb: float = 1024.0  # MemAvailable from /proc/meminfo, MB
    load_per_core_max: float = 2.0  # 5-minute load average divided by the number of cores
    model_timeout: float = 3.0  # seconds to wait for the model server's /models
    keep_days: float = 3.0  # workspaces, logs and trajectories older than this are removed


@dataclass(frozen=True)
class Reading:
    check: str  # disk_free_gb | disk_free_pct | mem_available_mb | load_per_core | model_server
    value: float | None  # None: could not be measured
    threshold: float
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Cleanup:
    removed: list[Path] = field(default_factory=list)
    kept_unpushed: list[Path] = field(default_factory=list)  # old, but hold work not on the forge
    kept_live: list[Path] = field(default_factory=list)  # old, but a live run holds them


def disk(path: Path, cfg: HouseConfig, statvfs: Callable = os.statvfs) -> list[Reading]:
    st = statvfs(path)
    free = st.f_bavail * st.f_frsize
    total = st.f_blocks * st.f_frsize or 1
    gb, pct = free / 1e9, 100.0 * free / total
    return [Reading("disk_free_gb", round(gb, 2), cfg.disk_min_free_gb, gb >= cfg.disk_min_free_gb,
                    str(path)),
            Reading("disk_free_pct", round(pct, 1), cfg.disk_min_free_pct,
                    pct >= cfg.disk_min_free_pct, str(path))]


def memory(cfg: HouseConfig, meminfo: Path = Path("/proc/meminfo")) -> Reading:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                mb = int(line.split()[1]) / 1024  # the kernel reports kB
                return Reading("mem_available_mb", round(mb), cfg.mem_min_available_mb,
                               mb >= cfg.mem_min_available_mb)
    except (OSError, ValueError, IndexError):
        pass
    return Reading("mem_available_mb", None, cfg.mem_min_available_mb, True, "not measurable here")


def load(cfg: HouseConfig, getloadavg: Callable[[], tuple[float, float, float]] = os.getloadavg,
         cores: int | None = None) -> Reading:
    per_core = getloadavg()[1] / max(1, cores or os.cpu_count() or 1)
    return Reading("load_per_core", round(per_core, 2), cfg.load_per_core_max,
                   per_core <= cfg.load_per_core_max)


def model_server(base_url: str, cfg: HouseConfig, session: requests.Session | None = None,
                 api_key: str = "") -> Reading:
    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # hosted endpoints need it
    try:
        r = (session or requests.Session()).get(url, headers=headers, timeout=cfg.model_timeout)
        ok, detail = r.ok, f"{r.status_code} from {url}"
    except requests.RequestException as e:
        ok, detail = False, f"{type(e).__name__}: cannot reach {url}"
    return Reading("model_server", 1.0 if ok else 0.0, 1.0, ok, detail)


def check_all(state_dir: Path, model_url: str, cfg: HouseConfig, *, api_key: str = "",
              **probes: Callable) -> list[Reading]:
    """Every reading; `probes` may replace statvfs, meminfo, getloadavg or session (tests)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = disk(state_dir, cfg, probes.get("statvfs", os.statvfs))
    out.append(memory(cfg, probes.get("meminfo", Path("/proc/meminfo"))))
    out.append(load(cfg, probes.get("getloadavg", os.getloadavg)))
    if model_url:
        out.append(model_server(model_url, cfg, probes.get("session"), api_key))
    return out


def warnings(readings: list[Reading]) -> list[dict]:
    """One `house_warning` event per crossed threshold."""
    return [{"kind": "house_warning", "subject": r.check, "value": r.value,
             "threshold": r.threshold, **({"detail": r.detail} if r.detail else {})}
            for r in readings if not r.ok]


# ---- cleanup ---------------------------------------------------------------------------------


def cleanup(state_dir: Path, keep_days: float, *, now: float | None = None,
            env: dict[str, str] | None = None) -> Cleanup:
    """Remove workspaces, logs and trajectories older than keep_days, except a workspace with
    commits or changes not on the forge, or one whose run still holds its lock."""
    now = time.time() if now is None else now
    cutoff = keep_days * 86400
    running = {info.run_id for info in live(state_dir / "locks") if info.run_id}
    workspaces = state_dir / "workspaces"
    result = Cleanup()
    askpass = write_askpass(state_dir)

    def holds_work(repo_dir: Path) -> int:
        if repo_dir.parent.name in running:
            result.kept_live.append(repo_dir.parent)
            return 1
        return _unsaved(Git(cwd=repo_dir, askpass=askpass, env=env))

    # prune asks holds_work only where a clone exists; a live run that has not cloned yet is
    # kept here, before prune can see it
    guarded = [ws for ws in _old(workspaces, now, cutoff)
               if ws.name in running and not (ws / "repo" / ".git").exists()]
    if guarded:
        result.kept_live.extend(guarded)
        log.info("not pruning workspaces this time: live run(s) %s still setting up",
                 ", ".join(ws.name for ws in guarded))
    else:
        removed, kept = prune(workspaces, older_than_s=cutoff, now=now, has_unpushed=holds_work)
        result.removed.extend(removed)
        result.kept_unpushed.extend(k for k in kept if k not in result.kept_live)
    for sub in ("trajectories", "logs"):
        for f in _old(state_dir / sub, now, cutoff, files=True):
            if f.stem in running:
                continue
            f.unlink(missing_ok=True)
            result.removed.append(f)
    return result


def _unsaved(git: Git) -> int:
    """Commits on no remote branch, plus one for uncommitted changes; an unreadable repo counts
    as holding work, so a git failure can never lead to a deletion."""
    try:
        ahead = int(git.run("rev-list", "--count", "--branches", "--not", "--remotes") or 0)
        return ahead + (1 if git.dirty() else 0)
    except (GitError, ValueError):
        return 1


def _old(root: Path, now: float, cutoff: float, *, files: bool = False) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in sorted(root.iterdir())
            if (p.is_file() if files else p.is_dir()) and now - p.stat().st_mtime >= cutoff]
