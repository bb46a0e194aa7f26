"""CLI commands for telemetry: collect, report, health (registered on dispatch.cli.app)."""


import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from .cli import _console, _state, command, err
from .errors import ConfigError, DispatchError

FORMATS = ("text", "md", "json", "html")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """'30m', '24h', '7d' (also s and w) as a timedelta; ValueError says what was expected."""
    m = _DURATION.fullmatch(text or "")
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"expected a duration like 30m, 24h or 7d, got {text!r}")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


# ---- collect ---------------------------------------------------------------------------------


@command(epilog="Example (cron): */5 * * * * dispatch collect >> ~/.local/state/dispatch/logs/collect.log 2>&1"
                "\n\nExample: dispatch collect --json | jq '.events[].kind'")
def collect(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print {events, probes} as JSON.")] = False,
) -> None:
    """Take one telemetry snapshot and print the state changes it found (exit 0 even if a probe failed)."""
    from .collector import collect as take
    from .collector import record

    state = _state(ctx)
    cfg = state.cfg
    try:
        client = state.forge()
    except DispatchError as e:  # still snapshot tmux, cron and the rest; the forge probe says why
        err(f"warning: no forge client: {type(e).__name__}: {e}")
        client = None
    snap = take(cfg, client=client, previous=_previous(cfg))
    events = record(cfg, snap)
    if as_json:
        print(json.dumps({"ts": snap.row["ts"], "events": events, "probes": snap.probes}, indent=2))
        return
    for ev in events:
        extra = f" ({ev['from'] or 'new'} -> {ev['to']})" if "to" in ev else ""
        print(f"{ev['kind']} {ev['subject']}{extra}")
    failing = {k: v for k, v in snap.probes.items() if v != "ok"}
    probes = f"{len(snap.probes) - len(failing)} probes ok" + "".join(
        f"; {k} {v}" for k, v in sorted(failing.items()))
    print(f"snapshot {snap.row['ts']}: {len(events)} events; {probes} ({snap.row['duration_s']:.2f}s)")


def _previous(cfg) -> dict:
    from .telemetry import read_collector_state

    return read_collector_state(cfg.state_path / "telemetry" / "last_state.json")


# ---- report ----------------------------------------------------------------------------------


@command(epilog="Example: dispatch report --since 7d --format html --out report.html"
                "\n\nExample (cron, each morning): 0 7 * * * dispatch report --format md --post")
def report(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option("--since", metavar="DURATION",
                                              help="Window: 30m, 24h, 7d ... (default: report.since).")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", metavar="text|md|json|html", help="Output format.")] = "text",
    out: Annotated[Path | None, typer.Option("--out", "-o", metavar="FILE", help="Write to FILE instead of stdout.")] = None,
    post: Annotated[bool, typer.Option("--post", help="Post the Markdown report as ONE comment (or the day's issue) "
                                                      "on report.operator_issue.")] = False,
) -> None:
    """The report over a window: sprints, PRs, agents, idle/stuck time, events, cost, backlog."""
    if fmt not in FORMATS:
        raise typer.BadParameter(f"expected one of {', '.join(FORMATS)}, got {fmt!r}", param_hint="--format")
    cfg = _state(ctx).cfg
    try:
        window = parse_duration(since or cfg.report.since)
    except ValueError as e:
        if since is None:
            raise ConfigError(f"{cfg.source}: report.since: {e}") from None
        raise typer.BadParameter(str(e), param_hint="--since") from None
    target = _operator_target(cfg) if post else None  # refuse before doing any work
    now = datetime.now(UTC)
    rep = load_report(cfg.state_path, now - window, now)
    text = _render(rep, fmt)
    if out is not None:
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    elif fmt == "text":
        _console().print(_render_rich(rep))
    else:
        sys.stdout.write(text)
    if rep.torn or rep.corrupt:
        err(f"telemetry: {rep.torn} torn and {rep.corrupt} corrupt lines skipped")
    if target is not None:
        from .report import render_markdown

        url = post_report(_state(ctx).forge(), target, cfg.report.post_mode, render_markdown(rep), now)
        print(f"posted {url}")


def load_report(state_dir: Path, since: datetime, until: datetime):
    """Stream results.csv, metrics.jsonl and events.jsonl under `state_dir` into a Report."""
    from .report import summarize
    from .results import read_results
    from .telemetry import ReadStats, read

    stats = {"results": ReadStats(), "metrics": ReadStats(), "events": ReadStats()}
    tel = state_dir / "telemetry"
    return summarize(read_results(state_dir / "results.csv", since=since, stats=stats["results"]),
                     read(tel / "metrics.jsonl", since=since, stats=stats["metrics"]),
                     read(tel / "events.jsonl", since=since, stats=stats["events"]),
                     since=since, until=until, read_stats=stats)


def _render_rich(rep):
    from .report_html import render_text

    return render_text(rep)


def _render(rep, fmt: str) -> str:
    from . import report_html as r

    if fmt == "text":
        import io

        from rich.console import Console

        console = Console(record=True, width=110, file=io.StringIO())
        console.print(r.render_text(rep))
        return console.export_text()
    return {"md": r.render_markdown, "json": r.render_json, "html": r.render_html}[fmt](rep)


def _operator_target(cfg) -> tuple[str, int | None]:
    """(owner/repo, issue number or None) from report.operator_issue, or a ConfigError naming it."""
    value, where = cfg.report.operator_issue.strip(), f"{cfg.source}: report.operator_issue"
    if not value:
        raise ConfigError(f"{where}: not set; --post needs owner/repo#N (the issue that receives the report)")
    repo, _, number = value.partition("#")
    if repo.count("/") != 1 or not all(repo.split("/")) or (number and not number.isdigit()):
        raise ConfigError(f"{where}: expected owner/repo#N, got {value!r}")
    if not number and cfg.report.post_mode == "comment":
        raise ConfigError(f"{where}: post_mode comment needs an issue number: owner/repo#N, got {value!r}")
    return repo, int(number) if number else None


def post_report(client, target: tuple[str, int | None], mode: str, body: str, now: datetime) -> str:
    """Post ONE comment on the operator issue, or with mode daily_issue, open (or reuse) the
    day's issue in the operator's repo; returns the URL of what was written."""
    repo, number = target
    if mode == "comment":
        return client.create_comment(repo, number, body).html_url
    title = f"dispatch report {now:%Y-%m-%d}"
    path, _ = client.issues_query(repo)
    found = [d for d in client.paginate(path, {"state": "all", "type": "issues", "q": title})
             if d.get("title") == title]
    if found:  # a second run the same day adds to the day's issue instead of opening another
        return client.create_comment(repo, min(d["number"] for d in found), body).html_url
    return client.request("POST", path, json={"title": title, "body": body}).json().get("html_url", "")


# ---- health ----------------------------------------------------------------------------------


@command(epilog="Example (cron, mails only when not ok): */15 * * * * dispatch health > /tmp/h.log 2>&1 || cat /tmp/h.log"
                "\n\nExample: dispatch health --json | jq .level")
def health(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print {status, level, checks} as JSON.")] = False,
) -> None:
    """Is work being done, not just processes running? Exit 0 ok, 1 warn, 2 critical."""
    from .health import LEVELS, evaluate
    from .results import read_results
    from .telemetry import read

    cfg = _state(ctx).cfg
    t, now = cfg.health, datetime.now(UTC)
    tel = cfg.state_path / "telemetry"
    last = None
    for row in read(tel / "metrics.jsonl", since=now - timedelta(hours=max(t.window_hours, t.collector_critical_hours))):
        if row.get("kind") == "snapshot":
            last = row
    events = read(tel / "events.jsonl", since=now - timedelta(hours=max(t.window_hours, t.pr_window_hours)))
    rep = evaluate(read_results(cfg.state_path / "results.csv"), last, events, now=now, thresholds=t)
    if as_json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(f"health: {LEVELS[rep.status]}")
        for c in rep.checks:
            print(f"{c.level:<8} {c.name}: {c.reason}")
    raise typer.Exit(rep.status)
