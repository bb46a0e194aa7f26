"""Sprints as durable jobs on Dramatiq + Redis, for a fleet on more than one machine.

With no `queue.url` none of this runs: the cron path (sprint in-process) stays the default. With
one, `enqueue_sprint` puts (repo, issue, agent) on the agent's queue `sprints.<agent>` and
`dispatch worker` runs it through the same `Sprinter.run` the launcher calls. Delivery is at
least once (a dead worker's job is re-delivered once its heartbeat lapses), so each job holds a
per-issue lock on Redis and the sprint re-reads the forge before any effect. Every command reads
the `queue` config section, so dramatiq and redis are imported inside functions only.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DispatchError, ForgeError

if TYPE_CHECKING:
    from .config import Config
    from .sprint import SprintOutcome

log = logging.getLogger(__name__)

ACTOR = "dispatch_sprint"
NAMESPACE = "dispatch"  # dramatiq's keys: dispatch:sprints.<agent>[.DQ|.XQ][.msgs], __heartbeats__
META = "dispatch:meta:"  # ours: workers, running, error:<message id>, lock:/owner:/attempt:<ref>
_AGENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")  # dramatiq queue names allow no more


@dataclass(frozen=True)
class QueueConfig:
    url: str = ""  # redis://10.0.0.5:6379/0; empty = no broker: sprints run in-process (cron path)
    password_file: str = ""  # a file holding the Redis password; never put it in the URL
    password_env: str = ""  # or the name of an env var holding it
    time_limit_minutes: float = 60  # a job running longer is interrupted, then retried
    max_retries: int = 3  # retries after a transient failure before the dead-letter queue
    min_backoff_s: float = 5  # first retry delay, doubled each retry (with jitter)
    max_backoff_s: float = 300  # cap on the retry delay
    lock_ttl_minutes: float = 90  # per-issue lock lifetime; must outlast the time limit
    heartbeat_timeout_s: float = 60  # a worker silent this long is dead; its jobs go back
    maintenance_chance: int = 1000  # per million broker calls, how many sweep dead workers' jobs
    dead_letter_days: float = 7  # dead-lettered jobs (and their errors) are kept this long


class QueueError(DispatchError):
    """Raised when the broker (Redis) cannot be reached or answers with an error."""


class SprintJobFailed(DispatchError):
    """Raised by a job whose sprint failed; `transient` failures are retried, others dead-lettered."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


# ---- config --------------------------------------------------------------------------------


def enabled(cfg: Config) -> bool:
    return bool(cfg.queue.url)


def check(cfg: Config) -> QueueConfig:
    """The queue section, validated; a ConfigError naming the key when it is unusable."""
    q, src = cfg.queue, cfg.source or "config"
    if not q.url:
        raise ConfigError(f"{src}: queue.url: no broker configured; set it to redis://HOST:PORT/DB "
                          "to use workers (without it, sprints run in-process: `dispatch run`)")
    if not q.url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{src}: queue.url: expected redis://, rediss:// or unix://, got {q.url.split(':')[0]}:")
    if "@" in q.url.split("//", 1)[1].split("/", 1)[0]:
        raise ConfigError(f"{src}: queue.url: credentials do not belong in the URL; use queue.password_file")
    if q.lock_ttl_minutes <= q.time_limit_minutes:
        raise ConfigError(f"{src}: queue.lock_ttl_minutes: must be longer than queue.time_limit_minutes "
                          f"({q.lock_ttl_minutes:g} <= {q.time_limit_minutes:g})")
    if q.max_retries < 0:
        raise ConfigError(f"{src}: queue.max_retries: expected 0 or more")
    if not 0 < q.min_backoff_s <= q.max_backoff_s:
        raise ConfigError(f"{src}: queue.min_backoff_s: expected more than 0 and at most max_backoff_s")
    return q


def queue_name(agent: str) -> str:
    if not _AGENT_RE.match(agent):
        raise ConfigError(f"agent name {agent!r} cannot name a queue (letters, digits, _ and - only)")
    return f"sprints.{agent}"


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def redis_client(cfg: Config, env: dict | None = None):
    """A redis client for the configured broker; the password comes from its file or env var."""
    import redis

    from .config import read_secret

    q = check(cfg)
    password = read_secret(q.password_file, q.password_env, "queue", cfg.source, env, required=False,
                           file_key="password_file", env_key="password_env")
    pool = redis.ConnectionPool.from_url(q.url, password=password or None, socket_connect_timeout=5,
                                         socket_keepalive=True, health_check_interval=30)
    return redis.Redis(connection_pool=pool)


def make_broker(cfg: Config, *, middleware: list | None = None, client=None):
    """A RedisBroker with the configured heartbeat and dead-letter lifetimes (no middleware by
    default: enqueuing and inspecting need none)."""
    from dramatiq.brokers.redis import RedisBroker

    q = check(cfg)
    return RedisBroker(client=client or redis_client(cfg), namespace=NAMESPACE, middleware=middleware or [],
                       heartbeat_timeout=_ms(q.heartbeat_timeout_s),
                       dead_message_ttl=_ms(q.dead_letter_days * 86400),
                       maintenance_chance=q.maintenance_chance)


@contextmanager
def _broker_errors() -> Iterator[None]:
    import redis

    try:
        yield
    except redis.RedisError as e:
        raise QueueError(f"broker: {type(e).__name__}: {e}") from None


# ---- enqueue ---------------------------------------------------------------------------------


def enqueue_sprint(cfg: Config, repo: str, issue: int, agent: str, *, broker=None) -> str:
    """Queue one sprint for `agent`; returns the job id. The payload never holds a secret."""
    from dramatiq import Message

    check(cfg)
    names = [a.name for a in cfg.agents]
    if agent not in names:
        raise ConfigError(f"{cfg.source or 'config'}: agents: no agent named {agent!r} (have {', '.join(names) or 'none'})")
    msg = Message(queue_name=queue_name(agent), actor_name=ACTOR, args=(repo, int(issue), agent),
                  kwargs={}, options={})
    with _broker_errors():
        (broker or make_broker(cfg)).enqueue(msg)
    return msg.message_id


# ---- what a sprint outcome means for the queue -------------------------------------------------


def is_transient(outcome: str, error: str, status: str = "") -> bool:
    """Would running the same sprint again plausibly succeed? Budgets and 'nothing changed' will
    not; a model or forge that was down, a network git failure or an interruption may."""
    if outcome not in ("failed", "partial"):
        return False
    if status in ("model_error", "error"):
        return True
    if error.startswith(("interrupted", "ModelError", "GitError")):
        return True
    if error.startswith("ForgeError"):
        m = re.match(r"ForgeError: (\d{3}) for", error)
        return m is None or int(m.group(1)) >= 500 or m.group(1) == "429"
    return False


def error_is_transient(exc: BaseException) -> bool:
    if isinstance(exc, SprintJobFailed):
        return exc.transient
    if isinstance(exc, ForgeError):
        return exc.status is None or exc.status >= 500 or exc.status == 429
    if isinstance(exc, DispatchError):
        from .gitops import GitError

        return isinstance(exc, GitError) or type(exc).__name__ == "ModelError"
    return True  # time limit, Redis hiccup, a bug: retried, and its traceback kept


# ---- the job ---------------------------------------------------------------------------------

Runner = Callable[["Config", str, int, "dict | None"], "tuple[SprintOutcome, str]"]


def sprint_runner(cfg: Config, repo: str, issue: int, previous: dict | None) -> tuple[SprintOutcome, str]:
    """The real job body: release a dead attempt's claim if needed, then `Sprinter.run`.
    Returns the outcome and the backend's status ('' when no backend ran)."""
    from .forge import ForgeClient

    client = ForgeClient(cfg.gitea.url, cfg.gitea_token(), timeout=cfg.gitea.timeout,
                         retries=cfg.gitea.retries, concurrency=cfg.gitea.concurrency)
    if previous:
        release_dead_claim(cfg, client, repo, issue, previous)
    sprinter = _job_sprinter_class()(cfg, client, cfg.gitea_token())
    out = sprinter.run(repo, issue)
    return out, sprinter.backend_status


_RECOVERY_LOCK = threading.Lock()


def _job_sprinter_class():
    from .sprint import Sprinter

    class JobSprinter(Sprinter):
        backend_status = ""

        def record(self, out, result, duration):
            self.backend_status = result.status if result else ""
            super().record(out, result, duration)

        def recover_stale(self):
            # Two sprints recovering the same dead run at once would both release its claim and
            # both write its crash row: serialize recovery across this host's worker threads and
            # processes, and each then sees the lock files left after the previous one.
            import fcntl

            path = self.cfg.state_path / "jobs-recovery.lock"
            with _RECOVERY_LOCK, open(path, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                return super().recover_stale()

    return JobSprinter


def release_dead_claim(cfg: Config, client, repo: str, issue: int, previous: dict) -> str | None:
    """A job attempt died (its worker's host went away) holding the forge claim: release it so the
    re-delivered job can go on. A local lock file means this host's own crash recovery owns it."""
    from . import claims
    from .locks import lock_name

    if (cfg.state_path / "locks" / lock_name(f"{repo}#{issue}")).exists():
        return None
    comments = client.list_comments(repo, issue)
    claim = claims.active_claim(comments)
    if claim is None or claim.agent != previous.get("agent"):
        return None
    made = next((c.created_at for c in comments if c.id == claim.comment_id), None)
    if made is not None and made.timestamp() < float(previous.get("started", 0)) - 300:
        return None  # older than the dead attempt: someone else's claim
    note = (f"dispatch run `{claim.run_id}` died with its worker on {previous.get('host', '?')} "
            f"(job {previous.get('message_id', '?')}); claim released for the re-delivered job.")
    claims.release(client, repo, issue, run_id=claim.run_id, label=cfg.triage.claim_label, note=note)
    log.warning("%s#%s: %s", repo, issue, note)
    return note


@dataclass
class JobContext:
    """What a worker process needs to run jobs: its own config (and token), the broker, a runner."""

    cfg: Config
    broker: Any
    runner: Runner = sprint_runner
    host: str = ""
    pid: int = 0

    def __post_init__(self) -> None:
        self.host = self.host or socket.gethostname()
        self.pid = self.pid or os.getpid()

    def perform(self, repo: str, issue: int, agent: str) -> None:
        from dramatiq.middleware import CurrentMessage

        q = self.cfg.queue
        if agent not in [a.name for a in self.cfg.agents]:
            raise SprintJobFailed(f"agent {agent!r} is not configured on {self.host}", transient=False)
        message = CurrentMessage.get_current_message()
        ref = f"{repo}#{issue}"
        attempt = {"message_id": message.message_id if message else "", "worker": self.broker.broker_id,
                   "host": self.host, "pid": self.pid, "agent": agent, "started": time.time()}
        r = self.broker.client
        with issue_lock(r, ref, ttl_ms=_ms(q.lock_ttl_minutes * 60), owner=attempt,
                        heartbeat_timeout_ms=_ms(q.heartbeat_timeout_s)) as got:
            if not got:
                return self.later(message, f"{ref} is being worked by another job")
            key, mine = META + "attempt:" + ref, json.dumps(attempt)
            previous = r.set(key, mine, px=_ms(q.lock_ttl_minutes * 60), get=True)
            try:
                cfg = replace(self.cfg, sprint=replace(self.cfg.sprint, agent=agent))
                out, status = self.runner(cfg, repo, issue, json.loads(previous) if previous else None)
            finally:
                _delete_if(r, key, mine)  # only a killed attempt leaves its record behind
        log.info("job %s %s: %s %s", attempt["message_id"], ref, out.outcome, out.error)
        if out.outcome == "nothing_to_do" and " is locked" in out.error:
            return self.later(message, out.error)  # this host's crash recovery holds it right now
        if out.outcome in ("failed", "partial"):
            raise SprintJobFailed(f"{out.outcome}: {out.error}",
                                  transient=is_transient(out.outcome, out.error, status))

    def later(self, message, why: str) -> None:
        """Put the job back with a delay without spending a retry: the issue is busy, not broken."""
        q = self.cfg.queue
        busy = int(message.options.get("busy", 0)) if message else 0
        delay = min(q.min_backoff_s * 2 ** min(busy, 16), q.max_backoff_s) * random.uniform(1, 1.5)
        log.info("%s; trying again in %.1f s", why, delay)
        if message is not None:
            self.broker.enqueue(message.copy(options={"busy": busy + 1}), delay=_ms(delay))


_BREAK = """if redis.call('get', KEYS[2]) == ARGV[1] then
  redis.call('del', KEYS[1], KEYS[2]) return 1 end return 0"""


def _delete_if(r, key: str, value: str) -> None:
    r.eval("if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end", 1, key, value)


@contextmanager
def issue_lock(r, ref: str, *, ttl_ms: int, owner: dict, heartbeat_timeout_ms: int) -> Iterator[bool]:
    """Dramatiq's ConcurrentRateLimiter (limit 1) on the issue: yields whether we hold it. A holder
    whose worker stopped heartbeating is dead, so its lock is broken instead of waiting out the TTL."""
    from dramatiq.rate_limits import ConcurrentRateLimiter
    from dramatiq.rate_limits.backends import RedisBackend

    key, owner_key = META + "lock:" + ref, META + "owner:" + ref
    limiter = ConcurrentRateLimiter(RedisBackend(client=r), key, limit=1, ttl=ttl_ms)
    mine = json.dumps(owner)
    with ExitStack() as stack:
        got = stack.enter_context(limiter.acquire(raise_on_failure=False))
        if not got and _break_dead_lock(r, key, owner_key, heartbeat_timeout_ms):
            got = stack.enter_context(limiter.acquire(raise_on_failure=False))
        if got:
            r.set(owner_key, mine, px=ttl_ms)
        try:
            yield got
        finally:
            if got:
                _delete_if(r, owner_key, mine)


def _break_dead_lock(r, key: str, owner_key: str, heartbeat_timeout_ms: int) -> bool:
    raw = r.get(owner_key)
    if not raw:
        return False  # no owner on record: wait out the TTL
    worker = json.loads(raw).get("worker", "")
    beat = r.zscore(f"{NAMESPACE}:__heartbeats__", worker)
    if beat is not None and time.time() * 1000 - beat < heartbeat_timeout_ms:
        return False
    broke = bool(r.eval(_BREAK, 2, key, owner_key, raw))
    if broke:
        log.warning("broke the lock %s: its worker %s stopped heartbeating", key, worker)
    return broke


# ---- the worker ------------------------------------------------------------------------------


def _book_middleware(r, cfg: Config, host: str):
    """Middleware keeping what `queue status`/`queue failed` show: running jobs and last errors."""
    from dramatiq import Middleware

    ttl = _ms(cfg.queue.dead_letter_days * 86400)

    class JobBook(Middleware):
        def before_process_message(self, broker, message):
            r.hset(META + "running", message.message_id, json.dumps({
                "queue": message.queue_name, "args": list(message.args), "host": host,
                "pid": os.getpid(), "worker": broker.broker_id, "started": time.time(),
                "retries": message.options.get("retries", 0)}))

        def after_process_message(self, broker, message, *, result=None, exception=None):
            r.hdel(META + "running", message.message_id)
            if exception is not None:
                r.set(META + "error:" + message.message_id, json.dumps({
                    "error": f"{type(exception).__name__}: {exception}"[:500], "at": time.time(),
                    "retries": message.options.get("retries", 0), "dead": message.failed}), px=ttl)
            else:
                r.delete(META + "error:" + message.message_id)

        def after_skip_message(self, broker, message):
            r.hdel(META + "running", message.message_id)

    return JobBook()


def run_worker(cfg: Config, agents: list[str], *, threads: int = 1, runner: Runner | None = None,
               stop: threading.Event | None = None, grace_s: float = 60,
               on_ready: Callable[[str], None] | None = None) -> None:
    """Consume `sprints.<agent>` for each agent until `stop` is set, then stop taking jobs and give
    running ones `grace_s` to finish; any still running are re-delivered after the heartbeat lapses."""
    from dramatiq import Worker, actor
    from dramatiq.middleware import CurrentMessage, Retries, TimeLimit

    q = check(cfg)
    names = [a.name for a in cfg.agents]
    unknown = [a for a in agents if a not in names]
    if unknown or not agents:
        what = f"no agent named {unknown[0]!r}" if unknown else "no agents configured"
        raise ConfigError(f"{cfg.source or 'config'}: agents: {what} (have {', '.join(names) or 'none'})")
    if runner is None:
        cfg.gitea_token()  # fail at start, not on the first job, when this host has no token
    client = redis_client(cfg)
    host = socket.gethostname()
    max_retries = q.max_retries
    middleware = [_book_middleware(client, cfg, host), TimeLimit(), CurrentMessage(),
                  Retries(max_retries=max_retries, min_backoff=_ms(q.min_backoff_s),
                          max_backoff=_ms(q.max_backoff_s),
                          retry_when=lambda n, e: n < max_retries and error_is_transient(e))]
    broker = make_broker(cfg, middleware=middleware, client=client)
    ctx = JobContext(cfg, broker, runner or sprint_runner, host=host)

    def dispatch_sprint(repo: str, issue: int, agent: str) -> None:
        ctx.perform(repo, issue, agent)

    actor(dispatch_sprint, actor_name=ACTOR, queue_name="sprints", broker=broker,
          time_limit=_ms(q.time_limit_minutes * 60))
    queues = {queue_name(a) for a in agents}
    for name in sorted(queues):
        broker.declare_queue(name)
    worker = Worker(broker, queues=queues, worker_threads=threads)
    worker.queue_prefetch = threads  # take only what we can run now; the rest stays for other hosts
    with _broker_errors():
        broker.emit_after("process_boot")
        worker.start()
        client.hset(META + "workers", broker.broker_id, json.dumps({
            "host": host, "pid": os.getpid(), "agents": sorted(agents), "threads": threads,
            "started": time.time()}))
    log.info("worker %s on %s: consuming %s with %d thread(s)", broker.broker_id, host,
             ", ".join(sorted(queues)), threads)
    if on_ready:
        on_ready(broker.broker_id)
    stop = stop or threading.Event()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        worker.stop(timeout=_ms(grace_s))
        try:
            client.hdel(META + "workers", broker.broker_id)
        except Exception:  # Redis gone: status shows this worker dead once its heartbeat lapses
            pass
        broker.close()


# ---- inspection: status, dead letters, retry -------------------------------------------------


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    queued: int  # waiting to be taken
    delayed: int  # waiting for a retry or a busy issue
    reserved: int  # taken by a worker (running or about to)
    running: int  # running right now, by the workers' own record
    failed: int  # dead-lettered


@dataclass(frozen=True)
class WorkerBeat:
    worker_id: str
    host: str
    pid: int
    agents: tuple[str, ...]
    last_seen_s: float  # seconds since its last heartbeat
    alive: bool


@dataclass(frozen=True)
class RunningJob:
    job_id: str
    queue: str
    ref: str
    host: str
    worker_id: str
    started: float


@dataclass(frozen=True)
class QueueStatus:
    queues: tuple[QueueDepth, ...]
    workers: tuple[WorkerBeat, ...]
    running: tuple[RunningJob, ...]


@dataclass(frozen=True)
class DeadJob:
    job_id: str
    queue: str
    repo: str
    issue: int
    agent: str
    retries: int
    failed_at: float
    error: str


_SUFFIX = re.compile(r"(\.DQ|\.XQ)?(\.msgs)?$")


def _queues(r, cfg: Config) -> list[str]:
    found = {queue_name(a.name) for a in cfg.agents if _AGENT_RE.match(a.name)}
    for key in r.scan_iter(match=f"{NAMESPACE}:sprints.*", count=500):
        found.add(_SUFFIX.sub("", key.decode().split(":", 1)[1]))
    return sorted(found)


def queue_status(cfg: Config, *, now: Callable[[], float] = time.time) -> QueueStatus:
    r = redis_client(cfg)
    q = check(cfg)
    with _broker_errors():
        beats = {k.decode(): v for k, v in r.zrange(f"{NAMESPACE}:__heartbeats__", 0, -1, withscores=True)}
        workers = []
        for wid, raw in sorted(r.hgetall(META + "workers").items()):
            wid, info = wid.decode(), json.loads(raw)
            age = now() - beats[wid] / 1000 if wid in beats else now() - info.get("started", 0)
            if wid not in beats and age > 86400:
                r.hdel(META + "workers", wid)  # gone for a day: forget it
                continue
            workers.append(WorkerBeat(wid, info.get("host", ""), int(info.get("pid", 0)),
                                      tuple(info.get("agents", ())), round(age, 1),
                                      wid in beats and age * 1000 < _ms(q.heartbeat_timeout_s)))
        alive = {w.worker_id for w in workers if w.alive}
        running = []
        for mid, raw in r.hgetall(META + "running").items():
            info = json.loads(raw)
            if info.get("worker") in alive:
                args = info.get("args") or ["?", "?"]
                running.append(RunningJob(mid.decode(), info.get("queue", ""), f"{args[0]}#{args[1]}",
                                          info.get("host", ""), info["worker"], info.get("started", 0)))
        depths = []
        for name in _queues(r, cfg):
            ns = f"{NAMESPACE}:{name}"
            queued, stored = r.llen(ns), r.hlen(ns + ".msgs")
            depths.append(QueueDepth(name, queued, r.hlen(ns + ".DQ.msgs"), max(stored - queued, 0),
                                     sum(j.queue == name for j in running), r.zcard(ns + ".XQ")))
    return QueueStatus(tuple(depths), tuple(workers), tuple(sorted(running, key=lambda j: j.started)))


def _dead(r, cfg: Config) -> Iterator[tuple[str, bytes, DeadJob]]:
    from dramatiq import Message

    for name in _queues(r, cfg):
        xq = f"{NAMESPACE}:{name}.XQ"
        for rid, score in r.zrange(xq, 0, -1, withscores=True):
            data = r.hget(xq + ".msgs", rid)
            if data is None:
                continue
            msg = Message.decode(data)
            err = r.get(META + "error:" + msg.message_id)
            err = json.loads(err)["error"] if err else msg.options.get("traceback", "").strip().splitlines()[-1:]
            repo, issue, agent = (list(msg.args) + ["", 0, ""])[:3]
            yield rid.decode(), data, DeadJob(msg.message_id, name, repo, int(issue), agent,
                                              int(msg.options.get("retries", 0)), score / 1000,
                                              err if isinstance(err, str) else "".join(err))


def failed_jobs(cfg: Config) -> list[DeadJob]:
    """Dead-lettered jobs, oldest first, with the last error each one raised."""
    r = redis_client(cfg)
    with _broker_errors():
        return sorted((job for _, _, job in _dead(r, cfg)), key=lambda j: j.failed_at)


def retry_failed(cfg: Config, ids: list[str] | None = None) -> list[str]:
    """Put dead-lettered jobs back on their queue with a fresh retry budget; None means all.
    An id may be a unique prefix. Returns the ids re-enqueued."""
    from dramatiq import Message

    broker = make_broker(cfg)
    r = broker.client
    done = []
    with _broker_errors():
        dead = list(_dead(r, cfg))
        for want in ids or []:
            hits = [j for _, _, j in dead if j.job_id.startswith(want)]
            if len(hits) != 1:
                raise ConfigError(f"job id {want!r}: {'no dead-lettered job' if not hits else 'ambiguous'} matches")
        for rid, data, job in dead:
            if ids is not None and not any(job.job_id.startswith(w) for w in ids):
                continue
            xq = f"{NAMESPACE}:{job.queue}.XQ"
            if not r.zrem(xq, rid):
                continue  # someone else retried it a moment ago
            r.hdel(xq + ".msgs", rid)
            msg = Message.decode(data)
            options = {k: v for k, v in msg.options.items()
                       if k not in ("retries", "busy", "traceback", "eta", "requeue_timestamp", "redis_message_id")}
            broker.enqueue(replace(msg, queue_name=job.queue, options=options))
            done.append(job.job_id)
    return done
