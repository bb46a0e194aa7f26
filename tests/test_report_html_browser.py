"""The HTML report in a real browser: headless Debian Chromium loads the page from a file, and the
DOM it built must hold the three SVG charts with no console errors. The same page with a
deliberate script error is the negative control, proving console errors would be seen."""

from __future__ import annotations

import re
import subprocess
from html.parser import HTMLParser

import pytest

from dispatch.report_html import render_html
from tests.realtools import require
from tests.test_report import fixture_report

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]
# Chromium logs page console messages as `...:INFO:CONSOLE:12] "msg", source: ...` (older
# builds: `CONSOLE(12)`); uncaught exceptions arrive the same way.
CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]")
CHARTS = ("chart-throughput", "chart-success", "chart-backlog")


def chromium() -> str:
    return require("chromium")


@pytest.fixture(scope="module")
def browsed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, list[str]]]:
    """{'report' | 'broken': (DOM after load, console lines)}; both pages load in parallel."""
    exe = chromium()
    tmp = tmp_path_factory.mktemp("browser")
    page = render_html(fixture_report())
    broken = page.replace("</body>", "<script>console.error('deliberate'); undefinedThing();</script></body>")
    procs = {}
    for name, html in (("report", page), ("broken", broken)):
        path = tmp / f"{name}.html"
        path.write_text(html, encoding="utf-8")
        procs[name] = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={tmp / (name + '-profile')}", "--dump-dom", path.as_uri()],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    out = {}
    for name, proc in procs.items():
        try:
            dom, log = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, log[-2000:]
        out[name] = (dom, [ln for ln in log.splitlines() if CONSOLE.search(ln)])
    return out


class _Svgs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, int] = {}  # svg id -> shapes drawn inside it
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "svg":
            self._open = dict(attrs).get("id") or ""
            self.charts[self._open] = 0
        elif self._open is not None and tag in ("rect", "polyline", "line"):
            self.charts[self._open] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._open = None


def test_charts_render_without_console_errors(browsed) -> None:
    dom, console = browsed["report"]
    assert console == []
    parser = _Svgs()
    parser.feed(dom)
    assert sorted(parser.charts) == sorted(CHARTS)
    assert all(parser.charts[c] > 0 for c in CHARTS), parser.charts  # each chart drew something
    assert "dispatch report" in dom and "<script" not in dom


def test_a_page_with_a_script_error_is_caught(browsed) -> None:
    dom, console = browsed["broken"]
    assert any("Uncaught ReferenceError: undefinedThing is not defined" in ln for ln in console), console
    assert any('"deliberate"' in ln for ln in console)
    assert "chart-backlog" in dom  # same page, so only the error tells them apart
