"""CLI commands for the fleet: watchdog, loop, tmux up (registered on dispatch.cli.app)."""


import json
import os
import shlex
import shutil
import sys
from typing import Annotated

import typer

from .cli import _state, app, command, err, handle_errors


def _append_events(cfg, rows: list[dict]) -> None:
    from .telemetry import append

    t = cfg.telemetry
    for row in rows:
        append(cfg.state_path / "telemetry" / "events.jsonl", row, fsync=t.fsync,
               max_bytes=t.max_bytes, keep=t.keep)


def _last_snapshot(cfg) -> dict:
    """The newest metrics row, read from the file's tail (the file can be large)."""
    path = cfg.state_path / "telemetry" / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 262_144))
            lines = f.read().splitlines()
    except OSError:
        return {}
    for raw in reversed(lines):
        try:
            row = json.loads(raw)
        except ValueError:
            continue
        if isinstance(row, dict):
            return row
    return {}


@command(epilog="Example (cron): */10 * * * * dispatch watchdog >> ~/.local/state/dispatch/logs/watchdog.log 2>&1\n\n"
                "Example: dispatch watchdog --dry-run --json")
def watchdog(
    ctx: typer.Context,
    fix: Annotated[bool, typer.Option("--fix", help="Correct drifted agent config files (backup kept).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Decide and report; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON.")] = False,
) -> None:
    """Stuck and idle agents (nudge, re-route, assign), model drift, house health, cleanup.

    Exit 0 when all is well, 1 when drift or a house threshold is left unresolved."""
    from datetime import UTC, datetime

    from . import drift, house
    from .backlog import resolve_repos
    from .watchdog import apply, assess, decide, observe, pane_activity

    state = _state(ctx)
    cfg = state.cfg
    wcfg = cfg.watchdog
    hcfg = cfg.house
    now = datetime.now(UTC)
    client = state.forge()
    obs = observe(client, resolve_repos(client, cfg), cfg, now, cfg.state_path)
    panes = pane_activity(_last_snapshot(cfg))
    health = assess(obs, cfg.agents, wcfg, now, panes)
    decisions = decide(obs, cfg.agents, wcfg, now, panes)
    from .cycle import KIND
    from .policy import decide as policy_decide

    # only what the policy lets the fleet do alone; `dispatch cycle --mode sovereign` asks for the rest
    held = [d for d in decisions if policy_decide(KIND[d.action], cfg.policy).verdict != "allow"]
    decisions = [d for d in decisions if d not in held]
    for d in held:
        err(f"not done, the policy does not allow {d.action} alone: {d.ref} ({d.reason})")
    actions = [] if dry_run else apply(client, decisions, cfg)

    server = drift.server_models(cfg.llm.base_url, api_key=cfg.llm_api_key()) if wcfg.expected_models else None
    drifted = drift.check(wcfg.expected_models, server, wcfg.agent_configs)
    if fix and not dry_run:
        verdict = policy_decide("fix_drift", cfg.policy)
        if verdict.verdict != "allow":
            err(f"--fix: the policy does not let the fleet fix drift alone ({verdict.reason}); "
                "add fix_drift to policy.allow")
        drifted = drift.fix(drifted, wcfg.agent_configs, allowed=verdict.verdict == "allow")
    readings = house.check_all(cfg.state_path, cfg.llm.base_url, hcfg, api_key=cfg.llm_api_key())
    warned = house.warnings(readings)
    cleaned = None if dry_run else house.cleanup(cfg.state_path, hcfg.keep_days)
    if not dry_run:
        _append_events(cfg, actions + drifted + warned)

    unresolved = [d for d in drifted if not d.get("fixed")] + warned
    if as_json:
        print(json.dumps({
            "agents": [h.__dict__ for h in health],
            "decisions": [d.as_json() for d in decisions], "actions": actions, "drift": drifted,
            "house": [r.__dict__ for r in readings],
            "cleanup": cleaned and {k: [str(p) for p in v] for k, v in cleaned.__dict__.items()},
            "dry_run": dry_run}, indent=2, default=str))
    else:
        for h in health:
            extra = f" on {', '.join(h.issues)} ({h.quiet_minutes:g} min quiet)" if h.issues else ""
            print(f"{h.agent}: {h.state}{extra}")
        for d in decisions:
            print(f"{'would ' if dry_run else ''}{d.action} {d.ref} ({d.agent}"
                  f"{' -> ' + d.to_agent if d.to_agent else ''}): {d.reason}")
        for ev in drifted:
            state_ = "fixed" if ev.get("fixed") else "drift"
            print(f"{state_}: {ev['subject']} ({ev['where']}) expected {ev['expected']}, found {ev['found']}")
        for ev in warned:
            print(f"house: {ev['subject']} = {ev['value']} (threshold {ev['threshold']:g})")
        if cleaned and (cleaned.removed or cleaned.kept_unpushed):
            print(f"cleanup: removed {len(cleaned.removed)}, kept {len(cleaned.kept_unpushed)} "
                  "with unpushed work")
    raise typer.Exit(1 if unresolved else 0)


@command(name="loop", epilog="Example (in a tmux pane): dispatch loop --agent kimi")
def loop_cmd(
    ctx: typer.Context,
    agent: Annotated[str, typer.Option("--agent", "-a", metavar="NAME", help="A configured agent.")],
    max_turns: Annotated[int | None, typer.Option("--max-turns", min=1, metavar="N",
                                                  help="Stop after N turns (default: run until signalled).")] = None,
) -> None:
    """Work one agent's lane until SIGTERM/SIGINT: pick, sprint, record, cool down, repeat.

    Exit 0 on a clean stop, 1 when this agent's loop is already running."""
    from .errors import ConfigError, LockHeld
    from .loop import WorkerLoop

    state = _state(ctx)
    cfg = state.cfg
    found = next((a for a in cfg.agents if a.name == agent), None)
    if found is None:
        names = ", ".join(a.name for a in cfg.agents) or "none configured"
        raise ConfigError(f"{cfg.source}: agents: no agent named {agent!r} (have: {names})")
    loop = WorkerLoop(cfg, found, state.forge(), cfg.gitea_token(),
                      loop_cfg=cfg.loop)
    try:
        code = loop.run(max_turns=max_turns)
    except LockHeld as e:
        err(f"a loop for agent {agent} is already running ({e}); not starting a second one")
        raise typer.Exit(1) from None
    raise typer.Exit(code)


tmux_app = typer.Typer(help="The tmux session holding one worker loop per agent.",
                       epilog="Example: dispatch tmux up --session dispatch",
                       no_args_is_help=True, rich_markup_mode=None)
app.add_typer(tmux_app, name="tmux")


@tmux_app.command("up", epilog="Example (crontab): @reboot dispatch tmux up")
@handle_errors
def tmux_up_cmd(
    ctx: typer.Context,
    session: Annotated[str | None, typer.Option("--session", "-s", help="Session name (default: loop.tmux_session).")] = None,
    socket: Annotated[str | None, typer.Option("--socket", "-L", help="tmux -L socket (default: collector.tmux_socket).")] = None,
) -> None:
    """Create the session with one window per agent running its loop; idempotent.

    DISPATCH_TMUX_COMMAND overrides loop.tmux_command ({dispatch}, {config}, {agent})."""
    from .loop import loop_windows, tmux_up

    state = _state(ctx)
    cfg = state.cfg
    lc = cfg.loop
    exe = shutil.which("dispatch")
    # not `python -m dispatch.cli`: run as __main__, cli.py would not see the commands that
    # modules like this one register on the imported `dispatch.cli.app`
    dispatch = shlex.quote(exe) if exe else (
        f"{shlex.quote(sys.executable)} -c 'from dispatch.cli import main; main()'")
    template = os.environ.get("DISPATCH_TMUX_COMMAND") or lc.tmux_command
    windows = loop_windows(cfg.agents, template, dispatch=dispatch, config=str(state.config_file))
    name = session or lc.tmux_session
    created = tmux_up(name, windows, socket=socket if socket is not None else cfg.collector.tmux_socket)
    for w in windows:
        print(f"{name}:{w} {'created' if w in created else 'already running'}")
