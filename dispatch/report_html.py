"""Renderers of a `Report`: rich text, Markdown (one forge comment), JSON, and one
self-contained HTML page whose charts are inline SVG (no scripts, no network).
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from datetime import date, datetime

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .report import AgentStats, ModelUsage, Report
from .telemetry import format_ts


def render_json(report: Report) -> str:
    data = asdict(report)
    data.update(attempted=report.attempted, succeeded=report.succeeded, failed=report.failed,
                success_rate=report.success_rate, torn=report.torn, corrupt=report.corrupt)
    for a, stats in zip(data["agents"], report.agents, strict=True):
        a["success_rate"] = stats.success_rate
    return json.dumps(data, indent=2, default=_json_default)


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return format_ts(value)
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.0%}"


def hm(seconds: float) -> str:
    """Seconds as '1h 05m' or '20m'."""
    h, m = divmod(round(seconds / 60), 60)
    return f"{h}h {m:02d}m" if h else f"{m}m"


def headlines(r: Report) -> list[tuple[str, str]]:
    """The summary lines every renderer shows, as (label, text)."""
    o = r.outcomes
    lines = [
        ("Sprints", f"{r.attempted} attempted, {r.succeeded} succeeded, {r.failed} failed "
                    f"({pct(r.success_rate)} success); {o.get('partial', 0)} partial, "
                    f"{o.get('nothing_to_do', 0)} nothing to do, {o.get('skipped', 0)} skipped"),
        ("PRs", f"{r.prs_opened} opened, {r.prs_merged} merged; issues closed: {r.issues_closed}"),
    ]
    if r.backlog:
        a, b = r.backlog[0], r.backlog[-1]
        lines.append(("Backlog", f"{a.open} → {b.open} open, {a.eligible} → {b.eligible} eligible "
                                 f"({r.snapshots} snapshots)"))
    else:
        lines.append(("Backlog", "no snapshots in the window"))
    if r.queue:
        lines.append(("Queue", queue_line(r.queue)))
    if r.probe_errors:
        lines.append(("Probes failing", ", ".join(f"{k} ×{n}" for k, n in r.probe_errors.items())))
    lines.append(("Telemetry", f"{r.torn} torn and {r.corrupt} corrupt lines skipped"))
    return lines


def queue_line(q: dict) -> str:
    depth = q.get("queues") or {}
    queued = sum(int(v.get("queued", 0)) for v in depth.values())
    delayed = sum(int(v.get("delayed", 0)) for v in depth.values())
    workers = q.get("workers") or []
    hosts = ", ".join(sorted(f"{w.get('host')} {'alive' if w.get('alive') else 'silent'}" for w in workers))
    return (f"{queued} queued, {delayed} delayed, {q.get('dead_letters', 0)} dead letters; "
            f"{len(workers)} workers ({hosts or 'none'})")


def agent_cells(a: AgentStats) -> list[str]:
    s = a.seconds
    return [a.name, str(a.attempted), str(a.succeeded), pct(a.success_rate), f"{a.per_day:.1f}",
            hm(s.get("working", 0)), hm(s.get("idle", 0)), hm(s.get("stuck", 0))]


AGENT_HEADERS = ["agent", "attempted", "succeeded", "success", "per day", "working", "idle", "stuck"]
MODEL_HEADERS = ["model", "sprints", "tokens in", "tokens out", "cost (USD)"]


def model_cells(m: ModelUsage) -> list[str]:
    return [m.model, str(m.sprints), f"{m.tokens_in:,}", f"{m.tokens_out:,}", f"{m.cost_usd:.4f}"]


def window(r: Report) -> str:
    return f"{r.since:%Y-%m-%d %H:%M} → {r.until:%Y-%m-%d %H:%M} UTC"


def render_markdown(r: Report) -> str:
    """The report as one Markdown comment for the operator issue."""
    out = [f"## dispatch report · {window(r)}", ""]
    out += [f"- **{label}:** {text}" for label, text in headlines(r)]
    if r.top_failures:
        out += ["", "### Top failure reasons", "| reason | count |", "|---|---:|"]
        out += [f"| `{_md(reason)}` | {n} |" for reason, n in r.top_failures]
    tables = (("Agents", AGENT_HEADERS, [agent_cells(a) for a in r.agents]),
              ("Tokens and cost by model", MODEL_HEADERS, [model_cells(m) for m in r.models]))
    for title, headers, rows in tables:
        if rows:
            out += ["", f"### {title}", "| " + " | ".join(headers) + " |",
                    "|---" + "|---:" * (len(headers) - 1) + "|"]
            out += ["| " + " | ".join(_md(c) for c in cells) + " |" for cells in rows]
    if r.timeline:
        out += ["", f"### Events (last {len(r.timeline)} of {r.events_total})"]
        out += [f"- {e.ts:%m-%d %H:%M} {e.kind} `{_md(e.subject)}`"
                + (f" (run {_md(e.run_id)})" if e.run_id else "") for e in r.timeline]
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


def render_text(r: Report) -> Group:
    """A rich renderable for the terminal."""
    summary = Table.grid(padding=(0, 2))
    for label, text in headlines(r):
        summary.add_row(f"[bold]{label}[/]", escape(text))
    parts: list = [Text(f"dispatch report · {window(r)}", style="bold"), summary]
    if r.top_failures:
        parts.append(_table("Top failure reasons", ["reason", "count"],
                            [[reason, str(n)] for reason, n in r.top_failures]))
    if r.agents:
        parts.append(_table("Agents", AGENT_HEADERS, [agent_cells(a) for a in r.agents]))
    if r.models:
        parts.append(_table("Tokens and cost by model", MODEL_HEADERS, [model_cells(m) for m in r.models]))
    if r.timeline:
        parts.append(_table(f"Events (last {len(r.timeline)} of {r.events_total})",
                            ["time", "kind", "subject", "run"],
                            [[f"{e.ts:%m-%d %H:%M}", e.kind, e.subject, e.run_id] for e in r.timeline],
                            left=4))
    return Group(*parts)


def _table(title: str, headers: list[str], rows: list[list[str]], left: int = 1) -> Table:
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < left else "right")
    for cells in rows:
        table.add_row(*(escape(c) for c in cells))
    return table


# ---- HTML ------------------------------------------------------------------------------------

W, H, PAD = 640, 220, 36  # chart size and margin, in SVG user units
_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:760px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border-bottom:1px solid #ddd;padding:2px 8px}
td+td,th+th{text-align:right}.chart{width:100%;height:auto;background:#fafafa;margin-bottom:1.5em}
.chart text{font-size:11px;fill:#555}.ok{fill:#3a9b5c}.all{fill:#c9d3de}.bar{fill:#4a78b5}
.events td{text-align:left}.open{stroke:#4a78b5}.eligible{stroke:#e08a2c}.open-key{fill:#4a78b5}.eligible-key{fill:#e08a2c}
.track{fill:#eceff3}polyline{fill:none;stroke-width:2}"""


def render_html(r: Report) -> str:
    """One self-contained page: summary, three inline SVG charts, the tables; no external URLs."""
    e = html.escape
    body = [f"<h1>dispatch report</h1><p>{e(window(r))}</p><ul>"]
    body += [f"<li><b>{e(label)}:</b> {e(text)}</li>" for label, text in headlines(r)]
    body += ["</ul>", "<h2>Throughput per day</h2>", _throughput(r),
             "<h2>Success rate per agent</h2>", _success(r), "<h2>Backlog</h2>", _backlog(r)]
    if r.top_failures:
        body.append(_html_table("Top failure reasons", ["reason", "count"],
                                [[k, str(n)] for k, n in r.top_failures]))
    body.append(_html_table("Agents", AGENT_HEADERS, [agent_cells(a) for a in r.agents]))
    body.append(_html_table("Tokens and cost by model", MODEL_HEADERS, [model_cells(m) for m in r.models]))
    body.append(_html_table(f"Events (last {len(r.timeline)} of {r.events_total})",
                            ["time", "kind", "subject", "run"],
                            [[f"{ev.ts:%m-%d %H:%M}", ev.kind, ev.subject, ev.run_id] for ev in r.timeline],
                            css="events"))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>dispatch report {e(window(r))}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _html_table(title: str, headers: list[str], rows: list[list[str]], css: str = "") -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    cells = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<h2>{e(title)}</h2><table class="{css}"><tr>{head}</tr>{cells}</table>'


def _svg(chart_id: str, label: str, inner: list[str], height: float = H) -> str:
    return (f'<svg class="chart" id="chart-{chart_id}" viewBox="0 0 {W} {height:.0f}" role="img" '
            f'aria-label="{html.escape(label)}"><title>{html.escape(label)}</title>'
            + "".join(inner) + "</svg>")


def _legend(*keys: tuple[str, str]) -> str:
    x, out = W - PAD - 90 * len(keys), []
    for i, (cls, label) in enumerate(keys):
        out.append(f'<rect class="{cls}" x="{x + 90 * i}" y="{PAD - 18}" width="10" height="10"/>'
                   f'<text x="{x + 90 * i + 14}" y="{PAD - 9}">{label}</text>')
    return "".join(out)


def _axis() -> str:
    return f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#999"/>'


def _no_data() -> str:
    return f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data in the window</text>'


def _throughput(r: Report) -> str:
    days, top = r.days, max((d.attempted for d in r.days), default=0)
    inner = [_no_data()] if not top else [f'<text x="4" y="{PAD - 8}">{top} sprints</text>', _axis(),
                                          _legend(("all", "attempted"), ("ok", "succeeded"))]
    if top:
        step = (W - 2 * PAD) / len(days)
        every = max(1, len(days) // 12)  # at most a dozen date labels
        for i, d in enumerate(days):
            x = PAD + i * step
            for cls, n in (("all", d.attempted), ("ok", d.succeeded)):
                h = (H - 2 * PAD) * n / top
                inner.append(f'<rect class="{cls}" x="{x + 1:.1f}" y="{H - PAD - h:.1f}" '
                             f'width="{max(step - 2, 1):.1f}" height="{h:.1f}">'
                             f"<title>{d.day}: {n} {'succeeded' if cls == 'ok' else 'attempted'}</title></rect>")
            if i % every == 0:
                inner.append(f'<text x="{x + step / 2:.1f}" y="{H - PAD + 14}" '
                             f'text-anchor="middle">{d.day:%m-%d}</text>')
    return _svg("throughput", "Sprints attempted and succeeded per day", inner)


def _success(r: Report) -> str:
    rated = [a for a in r.agents if a.success_rate is not None]
    inner = [_no_data()] if not rated else []
    row = min((H - 2 * 10) / max(len(rated), 1), 32)
    for i, a in enumerate(rated):
        y, w = 10 + i * row, (W - 2 * PAD - 100) * (a.success_rate or 0)
        inner.append(f'<text x="4" y="{y + row / 2 + 4:.1f}">{html.escape(a.name[:16])}</text>'
                     f'<rect class="track" x="{PAD + 70}" y="{y + 2:.1f}" width="{W - 2 * PAD - 100}" '
                     f'height="{max(row - 4, 1):.1f}"/>'
                     f'<rect class="bar" x="{PAD + 70}" y="{y + 2:.1f}" width="{w:.1f}" '
                     f'height="{max(row - 4, 1):.1f}"><title>{html.escape(a.name)}: '
                     f"{a.succeeded}/{a.attempted}</title></rect>"
                     f'<text x="{PAD + 74 + w:.1f}" y="{y + row / 2 + 4:.1f}">{pct(a.success_rate)}</text>')
    return _svg("success", "Success rate per agent", inner, height=H if not rated else 20 + row * len(rated))


def _backlog(r: Report) -> str:
    pts, top = r.backlog, max((max(p.open, p.eligible) for p in r.backlog), default=0)
    if not pts:
        return _svg("backlog", "Backlog trend", [_no_data()])
    span = max((r.until - r.since).total_seconds(), 1.0)
    inner = [f'<text x="4" y="{PAD - 8}">{top} issues</text>', _axis(),
             _legend(("open-key", "open"), ("eligible-key", "eligible")),
             f'<text x="{PAD}" y="{H - PAD + 14}">{r.since:%m-%d %H:%M}</text>',
             f'<text x="{W - PAD}" y="{H - PAD + 14}" text-anchor="end">{r.until:%m-%d %H:%M}</text>']
    for cls in ("open", "eligible"):
        coords = " ".join(
            f"{PAD + (W - 2 * PAD) * (p.ts - r.since).total_seconds() / span:.1f},"
            f"{H - PAD - (H - 2 * PAD) * getattr(p, cls) / max(top, 1):.1f}" for p in pts)
        inner.append(f'<polyline class="{cls}" points="{coords}"><title>{cls}</title></polyline>')
    return _svg("backlog", "Backlog trend: open and eligible issues", inner)
