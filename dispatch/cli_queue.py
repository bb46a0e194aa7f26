"""CLI commands for the job queue: worker, enqueue, queue status|failed|retry (on dispatch.cli.app).

All of them need `queue.url` in the config; without it they exit 2 and say so, and nothing else
in dispatch changes (sprints run in-process through `dispatch run`).
"""


import json
import time
from typing import Annotated

import typer

from .cli import _console, _escape, _state, app, command, err, handle_errors, parse_ref

queue_app = typer.Typer(help="Inspect the job queue: status, dead letters, retry.", no_args_is_help=True,
                        epilog="Example: dispatch queue status\n\nExample: dispatch queue failed && "
                               "dispatch queue retry --all", rich_markup_mode=None)
app.add_typer(queue_app, name="queue")


def _queue_command(*args, **kwargs):
    """`command` for the `queue` sub-app."""
    return lambda fn: queue_app.command(*args, **kwargs)(handle_errors(fn))


@command(epilog="Example: dispatch worker --agent kimi --threads 2\n\n"
                "Example (systemd): see deploy/dispatch-worker.service")
def worker(
    ctx: typer.Context,
    agent: Annotated[list[str] | None, typer.Option("--agent", "-a", metavar="NAME",
                     help="Take jobs for this agent; repeatable. Default: every configured agent.")] = None,
    threads: Annotated[int, typer.Option("--threads", "-t", min=1, max=64,
                       help="Sprints run at once by this worker.")] = 1,
    grace: Annotated[float, typer.Option("--grace", metavar="SECONDS", min=0,
                     help="On SIGTERM, how long running sprints may finish before the worker exits "
                          "(unfinished ones are re-delivered).")] = 60.0,
) -> None:
    """Run sprints from the queue on this host until SIGTERM or Ctrl-C (for tmux or systemd)."""
    import signal
    import threading

    from .jobs import run_worker

    cfg = _state(ctx).cfg
    agents = agent or [a.name for a in cfg.agents]
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            raise SystemExit(128 + signum)  # a second signal: stop waiting for running sprints
        err(f"worker: signal {signum}: finishing running sprints (up to {grace:g} s), taking no new ones")
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    run_worker(cfg, agents, threads=threads, stop=stop, grace_s=grace,
               on_ready=lambda wid: err(f"worker {wid}: taking jobs for {', '.join(agents)} "
                                         f"({threads} at a time)"))


@command(epilog="Example: dispatch enqueue acme/api#42 --agent kimi")
def enqueue(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="OWNER/REPO#N", metavar="OWNER/REPO#N")],
    agent: Annotated[str | None, typer.Option("--agent", "-a", metavar="NAME",
                     help="The agent whose queue takes it (default: sprint.agent, else the first agent).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {job_id, queue} as JSON.")] = False,
) -> None:
    """Queue one sprint for a worker (needs queue.url; exit 2 without it)."""
    from .jobs import check, enqueue_sprint, queue_name

    repo, number = parse_ref(ref)
    cfg = _state(ctx).cfg
    check(cfg)
    name = agent or cfg.sprint.agent or (cfg.agents[0].name if cfg.agents else "")
    job_id = enqueue_sprint(cfg, repo, number, name)
    if as_json:
        print(json.dumps({"job_id": job_id, "queue": queue_name(name), "repo": repo, "issue": number}))
    else:
        print(f"queued {repo}#{number} for {name} as job {job_id} ({queue_name(name)})")


@_queue_command(epilog="Example: dispatch queue status --json")
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print queues, workers, running as JSON.")] = False,
) -> None:
    """Queued / delayed / running / failed per queue, and each worker's last heartbeat."""
    from dataclasses import asdict

    from .jobs import queue_status

    st = queue_status(_state(ctx).cfg)
    if as_json:
        print(json.dumps(asdict(st), indent=2))
        return
    from rich.table import Table

    table = Table(title="queues")
    for col in ("queue", "queued", "delayed", "running", "failed"):
        table.add_column(col, justify="left" if col == "queue" else "right")
    for d in st.queues:
        table.add_row(d.queue, str(d.queued), str(d.delayed), str(d.running), str(d.failed))
    workers = Table(title="workers")
    for col in ("worker", "host", "pid", "agents", "last heartbeat", "state"):
        workers.add_column(col)
    for w in st.workers:
        workers.add_row(w.worker_id[:8], _escape(w.host), str(w.pid), ", ".join(w.agents),
                        f"{w.last_seen_s:.0f} s ago", "alive" if w.alive else "DEAD")
    console = _console()
    console.print(table)
    console.print(workers)
    for j in st.running:
        console.print(f"running {j.ref} on {_escape(j.host)} for {time.time() - j.started:.0f} s "
                      f"(job {j.job_id})", markup=False)


@_queue_command(epilog="Example: dispatch queue failed --json | jq '.[].error'")
def failed(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the dead-lettered jobs as JSON.")] = False,
) -> None:
    """Dead-lettered jobs with their last error; bring them back with `dispatch queue retry`."""
    from dataclasses import asdict

    from .jobs import failed_jobs

    jobs = failed_jobs(_state(ctx).cfg)
    if as_json:
        print(json.dumps([asdict(j) for j in jobs], indent=2))
        return
    for j in jobs:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(j.failed_at))
        print(f"{j.job_id}  {j.repo}#{j.issue} ({j.agent})  {when}  after {j.retries} retries: {j.error}")
    print(f"{len(jobs)} dead-lettered job(s)")


@_queue_command(epilog="Example: dispatch queue retry 3f2c9a1b\n\nExample: dispatch queue retry --all")
def retry(
    ctx: typer.Context,
    job_id: Annotated[list[str] | None, typer.Argument(metavar="ID", help="Job id (or a unique prefix).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead-lettered job.")] = False,
) -> None:
    """Put dead-lettered jobs back on their queue with a fresh retry budget."""
    from .jobs import retry_failed

    if bool(job_id) == all_:
        raise typer.BadParameter("give job ids or --all (not both)")
    done = retry_failed(_state(ctx).cfg, None if all_ else job_id)
    for i in done:
        print(f"re-queued {i}")
    print(f"{len(done)} job(s) re-queued")
