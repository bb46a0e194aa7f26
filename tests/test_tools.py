"""The workspace tools: confinement, scrubbed env, caps, timeouts and the gitea_api policy."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dispatch.agent import ToolCall
from dispatch.tools import TOOLS, Workspace, cap, check_api_path, schemas
from tests.fakes import FakeForge


def run(ws: Workspace, name: str, **args):
    return ws.execute(ToolCall("c1", name, args, ""))


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """A workspace dir and a sibling 'outside' dir holding a file that must stay untouched."""
    root = tmp_path / "ws"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "keep.txt").write_text("original")
    return root, outside


@pytest.fixture
def ws(layout: tuple[Path, Path]) -> Workspace:
    return Workspace(layout[0], forge=None, repo="o/r", env={"PATH": os.environ["PATH"]})


def test_schemas_come_from_one_definition() -> None:
    by_name = {s["function"]["name"]: s["function"] for s in schemas()}
    assert set(by_name) == {"run_command", "read_file", "write_file", "gitea_api"}
    assert by_name["run_command"]["parameters"]["required"] == ["command"]
    assert by_name["run_command"]["parameters"]["properties"]["timeout"]["default"] == 120
    assert by_name["gitea_api"]["parameters"]["required"] == ["method", "path"]
    assert set(by_name) == set(TOOLS)


def test_write_then_read_inside(ws: Workspace) -> None:
    obs = run(ws, "write_file", path="a/b/c.txt", content="hello\n")
    assert obs.ok, obs.output
    assert (ws.root / "a/b/c.txt").read_text() == "hello\n"
    assert run(ws, "read_file", path="a/b/c.txt").output == "hello\n"
    assert not [p for p in (ws.root / "a/b").iterdir() if p.name.endswith(".tmp")]


def test_write_keeps_existing_mode(ws: Workspace) -> None:
    script = ws.root / "run.sh"
    script.write_text("old")
    script.chmod(0o755)
    assert run(ws, "write_file", path="run.sh", content="#!/bin/sh\n").ok
    assert script.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("path", ["../../x", "../outside/keep.txt", "a/../../outside/keep.txt"])
def test_dotdot_refused(ws: Workspace, layout, path: str) -> None:
    _, outside = layout
    obs = run(ws, "write_file", path=path, content="pwned")
    assert not obs.ok and obs.output.startswith("error:") and "outside the workspace" in obs.output
    assert (outside / "keep.txt").read_text() == "original"
    assert not (ws.root.parent.parent / "x").exists()


def test_absolute_paths(ws: Workspace, layout) -> None:
    _, outside = layout
    obs = run(ws, "write_file", path=str(outside / "new.txt"), content="pwned")
    assert not obs.ok and "outside the workspace" in obs.output
    assert not (outside / "new.txt").exists()
    assert not run(ws, "read_file", path="/etc/passwd").ok
    # an absolute path that is inside the workspace is fine
    assert run(ws, "write_file", path=str(ws.root / "in.txt"), content="x").ok


def test_symlink_escape_refused(ws: Workspace, layout) -> None:
    _, outside = layout
    (ws.root / "link").symlink_to(outside / "keep.txt")
    (ws.root / "dirlink").symlink_to(outside)
    (ws.root / "dangling").symlink_to(outside / "created.txt")
    for name, args in [
        ("read_file", {"path": "link"}),
        ("write_file", {"path": "link", "content": "pwned"}),  # write THROUGH the link
        ("write_file", {"path": "dirlink/new.txt", "content": "pwned"}),  # under a linked dir
        ("write_file", {"path": "dirlink/sub/new.txt", "content": "pwned"}),
        ("write_file", {"path": "dangling", "content": "pwned"}),
    ]:
        obs = run(ws, name, **args)
        assert not obs.ok and "symlink" in obs.output, (name, args, obs)
    assert (outside / "keep.txt").read_text() == "original"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (ws.root / "link").is_symlink()


def test_symlink_inside_is_followed(ws: Workspace) -> None:
    (ws.root / "real.txt").write_text("a")
    (ws.root / "alias").symlink_to("real.txt")
    assert run(ws, "write_file", path="alias", content="b").ok
    assert (ws.root / "real.txt").read_text() == "b"
    assert (ws.root / "alias").is_symlink()


def test_git_dir_not_writable(ws: Workspace) -> None:
    (ws.root / ".git").mkdir()
    obs = run(ws, "write_file", path=".git/hooks/pre-commit", content="evil")
    assert not obs.ok and ".git" in obs.output
    assert not (ws.root / ".git/hooks").exists()


def test_size_caps(ws: Workspace) -> None:
    small = Workspace(ws.root, forge=None, repo="o/r", max_file_bytes=100, max_output=50)
    obs = run(small, "write_file", path="big.txt", content="x" * 101)
    assert not obs.ok and "over the 100 limit" in obs.output and not (ws.root / "big.txt").exists()
    (ws.root / "huge.txt").write_text("y" * 500)
    assert "over the 100 limit" in run(small, "read_file", path="huge.txt").output
    (ws.root / "bin.dat").write_bytes(b"\x7fELF\x00\x01")
    assert "binary" in run(small, "read_file", path="bin.dat").output
    (ws.root / "mid.txt").write_text("H" * 40 + "M" * 20 + "T" * 30)
    out = run(small, "read_file", path="mid.txt").output
    assert out.startswith("H" * 25) and out.endswith("T" * 25) and "40 characters elided" in out


def test_bad_arguments_are_tool_errors(ws: Workspace) -> None:
    assert "needs the argument 'content'" in run(ws, "write_file", path="x").output
    assert "takes no argument mode" in run(ws, "read_file", path="x", mode="r").output
    assert "must be a string" in run(ws, "read_file", path=3).output
    assert "unknown tool" in run(ws, "rm_rf").output
    bad = ws.execute(ToolCall("c", "read_file", None, "{oops", "arguments are not valid JSON"))
    assert not bad.ok and "valid JSON" in bad.output


def test_run_command_output_and_exit_code(ws: Workspace) -> None:
    obs = run(ws, "run_command", command="pwd; echo out; echo err >&2; exit 3")
    assert not obs.ok
    assert obs.output.startswith("exit code: 3")
    assert str(ws.root) in obs.output and "out" in obs.output and "err" in obs.output
    assert run(ws, "run_command", command="true", timeout="5").ok


def test_run_command_env_is_scrubbed(layout, canary: str, monkeypatch) -> None:
    monkeypatch.setenv("GITEA_TOKEN", canary)
    monkeypatch.setenv("FOO_API_KEY", canary)
    monkeypatch.setenv("MY_SECRET", canary)
    monkeypatch.setenv("GIT_AUTHOR_NAME", "dispatch-bot")
    ws = Workspace(layout[0], forge=None, repo="o/r")  # env defaults to os.environ
    obs = run(ws, "run_command", command="env; echo HOME=$HOME")
    assert obs.ok
    assert canary not in obs.output
    assert "GITEA_TOKEN" not in obs.output and "FOO_API_KEY" not in obs.output
    assert "GIT_AUTHOR_NAME=dispatch-bot" in obs.output and "TERM=dumb" in obs.output
    home = [ln for ln in obs.output.splitlines() if ln.startswith("HOME=")][-1][5:]
    assert Path(home).resolve().is_relative_to(ws.root)


def test_run_command_caps_head_and_tail(layout) -> None:
    ws = Workspace(layout[0], forge=None, repo="o/r", max_output=1000)
    obs = run(ws, "run_command", command="echo START; seq 1 200000; echo END")
    assert obs.output.startswith("exit code: 0\nSTART")
    assert obs.output.rstrip().endswith("END")
    assert "characters elided ...]" in obs.output
    assert len(obs.output) < 1200


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state


def test_run_command_timeout_kills_the_group(ws: Workspace) -> None:
    t0 = time.monotonic()
    obs = run(ws, "run_command", command="sleep 30 & echo $! > bg.pid; echo started; sleep 30",
              timeout=1)  # fmt: skip
    assert time.monotonic() - t0 < 5
    assert not obs.ok and "timed out after 1 s" in obs.output and "started" in obs.output
    pid = int((ws.root / "bg.pid").read_text())
    deadline = time.monotonic() + 3
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_cap_marks_the_cut() -> None:
    assert cap("short", 10) == "short"
    out = cap("a" * 10 + "b" * 10, 10)
    assert out == "aaaaa\n[... 10 characters elided ...]\nbbbbb"


# ---- gitea_api -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "why"),
    [
        ("GET", "/repos/other/r/issues", "only /repos/o/r"),
        ("GET", "/repos/o/r/../../other/r/issues", "'..'"),
        ("GET", "/repos/o/r/%2e%2e/x", "percent"),
        ("DELETE", "/repos/o/r/issues/1", "DELETE"),
        ("GET", "/admin/users", "only /repos/o/r"),
        ("POST", "/user/repos", "only /repos/o/r"),
        ("PATCH", "/repos/o/r", "may write only"),
        ("PUT", "/repos/o/r/collaborators/eve", "admin"),
        ("GET", "/repos/o/r/hooks", "admin"),
        ("POST", "/repos/o/r/pulls/1/merge", "may write only"),
        ("PUT", "/repos/o/r/contents/README.md", "may write only"),
        # what a review found the old blocklist let through
        ("POST", "/repos/o/r/statuses/abc123", "may write only"),
        ("PATCH", "/repos/o/r/issues/comments/5", "may write only"),
        ("PATCH", "/repos/o/r/labels/3", "may write only"),
        ("PUT", "/repos/o/r/issues/1/labels", "may write only"),
        ("POST", "/repos/o/r/forks", "may write only"),
        ("POST", "/repos/o/r/issues/2/comments", "may write only"),
        ("GET", "/repos/o/r/Hooks", "admin"),
        ("GET", "/repos/o/r/issues?sudo=admin", "sudo"),
        ("OPTIONS", "/repos/o/r/issues", "not allowed"),
        ("GET", "/repos/o//r/issues", "empty"),
    ],
)
def test_gitea_api_policy_refuses(layout, method: str, path: str, why: str) -> None:
    forge = FakeForge()
    ws = Workspace(layout[0], forge=forge, repo="o/r", issue=1)  # the sprint's issue is #1
    obs = run(ws, "gitea_api", method=method, path=path)
    assert not obs.ok and obs.output.startswith("error:") and why in obs.output, obs.output
    assert forge.calls == []  # refused before anything reached the forge


def test_gitea_api_passes_allowed_calls(layout) -> None:
    forge = FakeForge(routes={
        ("GET", "/repos/o/r/issues/1"): {"number": 1, "title": "Fix it"},
        ("POST", "/repos/o/r/issues/1/comments"): {"id": 9, "body": "hi"},
    })  # fmt: skip
    ws = Workspace(layout[0], forge=forge, repo="o/r", issue=1)
    got = run(ws, "gitea_api", method="get", path="repos/O/R/issues/1")
    assert got.ok and '"title": "Fix it"' in got.output
    posted = run(ws, "gitea_api", method="POST", path="/api/v1/repos/o/r/issues/1/comments",
                 body={"body": "hi"})  # fmt: skip
    assert posted.ok and '"id": 9' in posted.output
    assert forge.calls[-1] == ("POST", "/repos/o/r/issues/1/comments", {"body": "hi"})
    missing = run(ws, "gitea_api", method="GET", path="/repos/o/r/issues/404")
    assert not missing.ok and "404" in missing.output


def test_check_api_path_keeps_query() -> None:
    assert check_api_path("get", "/repos/o/r/issues?state=open&labels=a%20b", "o/r") == (
        "GET", "/repos/o/r/issues?state=open&labels=a%20b")  # fmt: skip


def test_odd_input_is_a_tool_error_not_a_crash(ws: Workspace) -> None:
    assert not run(ws, "run_command", command="echo a\x00b").ok
    assert not run(ws, "write_file", path="s.txt", content="\ud800").ok
    assert not run(ws, "write_file", path="", content="x").ok


def test_home_is_inside_the_workspace_and_usable(tmp_path: Path) -> None:
    root = tmp_path / "clone"
    (root / ".git").mkdir(parents=True)
    ws = Workspace(root, forge=None, repo="o/r")
    obs = run(ws, "run_command", command="git config --global user.name bot && echo $HOME")
    assert obs.ok, obs.output
    assert obs.output.splitlines()[-1] == str(root / ".git" / "dispatch-home")
