"""The `dispatch` command. Each sub-command is a thin layer over the library modules.

Only this module prints for humans and picks exit codes: 0 ok, 1 the work failed (a forge or
model error, a failed sprint), 2 usage or config error. Heavy imports (requests, openai, rich)
happen inside the commands, so `dispatch --help` costs little more than importing typer.
"""


import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import DispatchError

app = typer.Typer(
    name="dispatch",
    help=(
        "Keep a fleet of AI coding agents working on a Gitea/Forgejo backlog.\n\n"
        "Example: dispatch init && dispatch doctor && dispatch triage --limit 10"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: rich's help renderer costs ~60 ms of imports on every --help
    rich_markup_mode=None,
)



class State:
    """Per-invocation settings from the global options; config is read only when asked for."""

    def __init__(self, config: str | None, verbose: int) -> None:
        self.config_arg = config
        self.verbose = verbose
        self._cfg = None

    @property
    def config_file(self) -> Path:
        from .config import config_path

        return config_path(self.config_arg)

    @property
    def cfg(self):
        if self._cfg is None:
            from .config import load_config

            self._cfg = load_config(self.config_file)
        return self._cfg

    def forge(self):
        from .forge import ForgeClient

        cfg = self.cfg
        return ForgeClient(
            cfg.gitea.url,
            cfg.gitea_token(),
            timeout=cfg.gitea.timeout,
            retries=cfg.gitea.retries,
            backoff=cfg.gitea.backoff,
            concurrency=cfg.gitea.concurrency,
        )


def _state(ctx: typer.Context) -> State:
    return ctx.obj


def err(message: str) -> None:
    """One line to stderr, never markup-interpreted (issue text may contain brackets)."""
    print(message, file=sys.stderr)


def handle_errors(fn: Callable) -> Callable:
    """Turn a DispatchError into one stderr line and its exit code (for any typer command)."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        try:
            return fn(*a, **k)
        except DispatchError as e:
            err(f"{type(e).__name__}: {e}")
            raise typer.Exit(e.exit_code) from None

    return wrapper


def command(*args: Any, **kwargs: Any) -> Callable:
    """`app.command` with `handle_errors`."""

    def deco(fn: Callable) -> Callable:
        return app.command(*args, **kwargs)(handle_errors(fn))

    return deco


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", metavar="PATH", help="Config file (DISPATCH_CONFIG wins over this)."),
    ] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="-v info, -vv debug.")] = 0,
) -> None:
    ctx.obj = State(config, verbose)
    _setup_logging(verbose)


def _setup_logging(verbose: int) -> None:
    import logging  # here, not at import: `dispatch --help` never needs it

    class StderrHandler(logging.StreamHandler):
        """Writes to whatever sys.stderr is now, so a second in-process invocation (tests,
        embedding) does not log into the first one's closed stream."""

        @property
        def stream(self):  # type: ignore[override]
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    level = logging.WARNING - 10 * min(verbose, 2)
    root = logging.getLogger("dispatch")
    root.setLevel(level)
    if root.handlers:
        return
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False)
    else:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


# ---- init / doctor -----------------------------------------------------------------------


@command(epilog="Example: dispatch init --config ./dispatch.yaml")
def init(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter config (to the --config path or the XDG config dir)."""
    from .config import STARTER
    from .errors import ConfigError

    path = _state(ctx).config_file
    if path.exists() and not force:
        raise ConfigError(f"{path}: already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(STARTER, encoding="utf-8")
    os.replace(tmp, path)
    print(f"wrote {path}")
    print("next: put your forge token in the token_file it names (chmod 600), then `dispatch doctor`")


@command(epilog="Example: dispatch doctor --json")
def doctor(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
) -> None:
    """Check config, forge reachability and auth, the model endpoint, git and tmux."""
    from .doctor import run_checks

    checks = run_checks(_state(ctx).config_file, os.environ)
    failed = [c for c in checks if c.required and not c.ok]
    if as_json:
        print(json.dumps({"ok": not failed, "checks": [c.__dict__ for c in checks]}, indent=2))
    else:
        from rich.table import Table

        table = Table(title="dispatch doctor")
        for col in ("check", "result", "detail"):
            table.add_column(col)
        for c in checks:
            mark = "[green]pass[/]" if c.ok else ("[red]FAIL[/]" if c.required else "[yellow]warn[/]")
            table.add_row(c.name, mark, _escape(c.detail))
        _console().print(table)
    raise typer.Exit(1 if failed else 0)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# ---- triage / prompt / route -------------------------------------------------------------


RepoOpt = Annotated[
    list[str] | None,
    typer.Option("--repo", "-r", metavar="OWNER/REPO", help="OWNER/REPO; repeatable. Default: the config's repos and orgs."),
]


def _triage(state: State, repos: list[str] | None):
    from datetime import UTC, datetime

    from .backlog import fetch, resolve_repos
    from .triage import triage

    cfg = state.cfg
    for r in repos or []:
        _parse_repo(r)
    client = state.forge()
    names = resolve_repos(client, cfg, repos)
    if not names:
        from .errors import ConfigError

        raise ConfigError(f"{cfg.source}: repos: no repos to triage; list some under repos/orgs or pass --repo")
    backlog = fetch(client, names)
    result = triage(list(backlog.issues), backlog.open_pulls, cfg.agents, cfg.triage, datetime.now(UTC))
    return client, result


def _parse_repo(text: str) -> tuple[str, str]:
    owner, _, name = text.partition("/")
    if not owner or not name or "/" in name or "#" in text:
        raise typer.BadParameter(f"expected OWNER/REPO, got {text!r}")
    return owner, name


@command(epilog="Example: dispatch triage --repo acme/api --limit 10\n\nExample: dispatch triage --json | jq '.ranked[0]'")
def triage(
    ctx: typer.Context,
    repo: RepoOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, metavar="N", help="Show the top N (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {ranked, skipped} as JSON.")] = False,
) -> None:
    """Rank the open backlog, explain each score, and suggest an agent for each issue."""
    _, result = _triage(_state(ctx), repo)
    ranked = list(result.ranked)[:limit] if limit else list(result.ranked)
    if as_json:
        print(json.dumps({
            "ranked": [
                {"rank": i, "repo": r.issue.repo, "number": r.issue.number, "title": r.issue.title,
                 "score": r.score.value, "agent": r.route.agent,
                 "reasons": list(r.score.reasons), "route_reasons": list(r.route.reasons)}
                for i, r in enumerate(ranked, 1)
            ],
            "skipped": [
                {"repo": s.issue.repo, "number": s.issue.number, "title": s.issue.title, "reason": s.reason}
                for s in result.skipped
            ],
        }, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{len(result.ranked)} eligible, {len(result.skipped)} skipped")
    for col, kw in (("#", {"justify": "right"}), ("issue", {}), ("title", {"max_width": 50}),
                    ("score", {"justify": "right"}), ("agent", {}), ("top reasons", {"max_width": 50})):
        table.add_column(col, **kw)
    for i, r in enumerate(ranked, 1):
        table.add_row(str(i), r.issue.ref, _escape(r.issue.title), f"{r.score.value:g}",
                      r.route.agent or "-", _escape("; ".join(r.score.reasons[:3])))
    _console().print(table)


@command(epilog="Example: dispatch prompt acme/api#42 > prompt.md")
def prompt(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="OWNER/REPO#N", metavar="OWNER/REPO#N")],
    agent: Annotated[str | None, typer.Option("--agent", help="Address the prompt to this agent.")] = None,
) -> None:
    """Print the self-contained prompt for one issue (no credentials in it)."""
    from .prompt import build_prompt

    repo, number = parse_ref(ref)
    state = _state(ctx)
    client = state.forge()
    issue = client.get_issue(repo, number)
    comments = client.list_comments(repo, number)
    text = build_prompt(
        issue, client.get_repo(repo), comments,
        api_url=client.api, token_hint=token_hint(state.cfg), agent=agent,
    )
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def parse_ref(ref: str) -> tuple[str, int]:
    repo, sep, num = ref.partition("#")
    if not sep or not num.isdigit():
        raise typer.BadParameter(f"expected OWNER/REPO#N, got {ref!r}")
    _parse_repo(repo)
    return repo, int(num)


def token_hint(cfg) -> str:
    if cfg.gitea.token_file:
        return f"the file {cfg.gitea.token_file}"
    return f"the environment variable {cfg.gitea.token_env}"


@command(epilog="Example: dispatch route            # show\n\nExample: dispatch route --apply    # label <agent>-ready and comment, once")
def route(
    ctx: typer.Context,
    repo: RepoOpt = None,
    apply: Annotated[bool, typer.Option("--apply", help="Label and comment on the forge.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, metavar="N", help="Route the top N only.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the routes as JSON.")] = False,
) -> None:
    """Show (or with --apply, apply) which agent takes each eligible issue; idempotent."""
    state = _state(ctx)
    client, result = _triage(state, repo)
    ranked = [r for r in result.ranked if r.route.agent][:limit] if limit else [
        r for r in result.ranked if r.route.agent]
    if apply:
        from .backlog import apply_routes

        actions = apply_routes(client, ranked, [a.name for a in state.cfg.agents])
        rows = [{"repo": a.issue.repo, "number": a.issue.number, "agent": a.agent,
                 "labelled": a.labelled, "commented": a.commented, "note": a.note} for a in actions]
    else:
        rows = [{"repo": r.issue.repo, "number": r.issue.number, "agent": r.route.agent,
                 "reasons": list(r.route.reasons)} for r in ranked]
    if as_json:
        print(json.dumps({"applied": apply, "routes": rows}, indent=2))
        return
    for row in rows:
        what = row.get("note") or ("routed" if apply else "; ".join(row.get("reasons", [])))
        print(f"{row['repo']}#{row['number']} -> {row['agent']}: {what}")
    if not apply:
        print(f"{len(rows)} routes; run with --apply to label and comment")


# ---- sprints ---------------------------------------------------------------------------------


def _sprinter(state: State):
    from .sprint import Sprinter

    cfg = state.cfg
    return Sprinter(cfg, state.forge(), cfg.gitea_token())


def _on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so a killed sprint still releases its claim and lock."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _report_sprint(out, as_json: bool) -> None:
    if as_json:
        print(json.dumps(out.as_json(), indent=2))
    else:
        where = f"{out.repo}#{out.issue}" if out.issue else out.repo
        line = {"success": f"success: {where} -> {out.pr_url}",
                "nothing_to_do": f"nothing to do in {out.repo} ({out.error})",
                "dry_run": "dry run: " + "; ".join(out.notes)}.get(
            out.outcome, f"{out.outcome}: {where}: {out.error}")
        print(line)
    raise typer.Exit(out.exit_code)


BackendOpt = Annotated[
    str, typer.Option("--backend", "-b", metavar="auto|gateway|cli|direct",
                      help="Which backend runs the agent (auto: the configured order).")]


def _check_backend(backend: str) -> None:
    if backend not in ("auto", "gateway", "cli", "direct"):
        raise typer.BadParameter(f"expected auto, gateway, cli or direct, got {backend!r}",
                                 param_hint="--backend")


@command(epilog="Example: dispatch sprint --repo acme/api\n\nExample: dispatch sprint --repo acme/api --issue 42 --backend direct --json")
def sprint(
    ctx: typer.Context,
    repo: Annotated[str, typer.Option("--repo", "-r", metavar="OWNER/REPO", help="The repository.")],
    issue: Annotated[int | None, typer.Option("--issue", "-i", metavar="N", min=1, help="This issue instead of the top-ranked one.")] = None,
    backend: BackendOpt = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be picked; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
) -> None:
    """Run one sprint: issue -> claim -> agent -> branch, push, PR, comment. Exit 0/1/2."""
    _parse_repo(repo)
    _check_backend(backend)
    _on_sigterm()
    out = _sprinter(_state(ctx)).run(repo, issue, backend=backend, dry_run=dry_run)
    _report_sprint(out, as_json)


@command(name="run", epilog="Example (cron): */30 * * * * dispatch run >> ~/.local/state/dispatch/logs/run.log 2>&1")
def run_cmd(
    ctx: typer.Context,
    repo: RepoOpt = None,
    backend: BackendOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
) -> None:
    """The launcher: one sprint on the top-ranked issue across the configured repos, then prune."""
    _check_backend(backend)
    _on_sigterm()
    state = _state(ctx)
    sprinter = _sprinter(state)
    _, result = _triage(state, repo)
    from .sprint import SprintOutcome, new_run_id

    out = None
    for r in result.ranked:
        out = sprinter.run(r.issue.repo, r.issue.number, backend=backend)
        if out.outcome != "nothing_to_do":
            break
    if out is None:
        out = SprintOutcome("nothing_to_do", ",".join(repo or state.cfg.repos), None, new_run_id(),
                            error="no eligible issue")
    removed, kept = sprinter.prune()
    if removed or kept:
        import logging

        logging.getLogger("dispatch").info(
            "pruned %d old files/workspaces; kept %d with unpushed work", len(removed), len(kept))
    _report_sprint(out, as_json)


@command(epilog="Example (cron): */5 * * * * dispatch cycle --mode intelligent >> ~/.local/state/dispatch/logs/cycle.log 2>&1")
def cycle(
    ctx: typer.Context,
    mode: Annotated[str, typer.Option("--mode", "-m", metavar="simple|intelligent|sovereign",
                                      help="simple: scoring rules; intelligent: also measured success "
                                           "rates; sovereign: approval-gated actions wait for the operator.")] = "simple",
    max_sprints: Annotated[int, typer.Option("--max-sprints", min=0, metavar="N",
                                             help="Sprints started in-process this pass (no broker).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the actions as JSON.")] = False,
) -> None:
    """One orchestrator pass: observe, decide, dispatch to idle agents, monitor, record, report."""
    if mode not in ("simple", "intelligent", "sovereign"):
        raise typer.BadParameter(f"expected simple, intelligent or sovereign, got {mode!r}", param_hint="--mode")
    from datetime import UTC, datetime

    from .cycle import run_cycle

    _on_sigterm()
    state = _state(ctx)
    cfg = state.cfg
    client = state.forge()
    started: list = []

    def run_sprint(decision) -> bool:
        if cfg.queue.url:  # a broker: hand the sprint to the worker of that agent
            from .jobs import enqueue_sprint

            started.append(enqueue_sprint(cfg, decision.repo, decision.issue, decision.agent))
            return True
        from .sprint import Sprinter

        sprinter = Sprinter(cfg, client, cfg.gitea_token())
        sprinter.agent = decision.agent  # the claim and the results row name who it went to
        out = sprinter.run(decision.repo, decision.issue)
        started.append(out.outcome)
        return out.outcome == "success"

    post = None
    if cfg.report.operator_issue:
        def post() -> bool:
            from datetime import timedelta

            from .cli_report import _operator_target, load_report, post_report
            from .report_html import render_markdown

            now = datetime.now(UTC)
            body = render_markdown(load_report(cfg.state_path, now - timedelta(hours=24), now))
            post_report(client, _operator_target(cfg), cfg.report.post_mode, body, now)
            return True

    result = run_cycle(cfg, client, mode=mode, run_sprint=run_sprint, post_report=post,
                       max_sprints=None if cfg.queue.url else max_sprints)
    if as_json:
        print(json.dumps({"mode": result.mode, "skipped": result.skipped or None, "actions": result.actions,
                          "sprints": [str(s) for s in started], "reported": result.reported}, indent=2))
    elif result.skipped:
        print(result.skipped)
    else:
        for a in result.actions:
            print(f"{a['outcome']:>17}  {a['action']} {a['key']}: {a['reason']}")
        print(f"{len(result.actions)} actions, {len(started)} sprints started"
              + (", daily report posted" if result.reported else ""))
    raise typer.Exit(result.exit_code)


# commands that live in their own modules register themselves on `app` when imported
from . import cli_fleet, cli_queue, cli_report  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    app()
