"""The `dispatch` CLI end to end, in process through CliRunner, against the real Gitea emulator."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dispatch.cli import app
from dispatch.config import load_config
from tests.emulator.fixtures import write_config
from tests.emulator.gitea import GiteaEmulator

ROOT = Path(__file__).resolve().parents[1]
PAGE_CAP = 50
OPEN_PER_REPO = {"acme/api": 110, "acme/web": 80, "tools/cli": 60}  # 250 open issues in all


def invoke(config: Path, *args: str) -> typer.testing.Result:
    return CliRunner().invoke(app, ["--config", str(config), *args])


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _safe_ages() -> list[int]:
    # triage reads the clock itself; keep every age clear of a 0.1 rounding edge of its
    # age score, so two runs seconds apart score identically
    return [d for d in range(1, 400)
            if abs((min(25.0, 5 * math.log1p(d)) * 10) % 1 - 0.5) > 0.05 or 5 * math.log1p(d) >= 25]


def seed_backlog(emu: GiteaEmulator) -> tuple[set[tuple[str, int]], dict[tuple[str, int], str]]:
    """250 open issues over 3 repos, some of each kind triage must skip, plus closed issues and
    PRs. Returns (eligible refs, {skipped ref: expected reason})."""
    emu.page_cap = PAGE_CAP
    rng = random.Random(7)
    ages = _safe_ages()
    now = datetime.now(UTC)
    eligible: set[tuple[str, int]] = set()
    skipped: dict[tuple[str, int], str] = {}
    emu.add_user("alice")
    for repo, count in OPEN_PER_REPO.items():
        emu.add_repo(repo)
        special = {  # position among the repo's open issues -> (title, labels, assignees, reason)
            3: ("Billing overhaul", ["epic"], [], "epic"),
            5: ("[EPIC] Multi-tenant support", ["P1"], [], "epic"),
            8: ("Evaluate a new queue", ["study"], [], "study"),
            9: ("[Study] caching options", [], [], "study"),
            12: ("Update the lockfile", ["P2", "dispatch:claimed"], [], "claimed (dispatch:claimed)"),
            15: ("Dark mode", ["P3"], ["alice"], "assigned to alice"),
            18: ("Flaky checkout test", ["P1", "bug", "blocked"], [], "blocked"),
            21: ("Retry the webhook", ["P2"], [], "open PR"),  # referenced by "Closes #N"
            24: ("Speed up the index", ["P2"], [], "open PR"),  # referenced by a dispatch/ branch
            27: ("Add a health endpoint", ["P2"], [], None),  # only a closed PR references it
        }
        numbers = {}
        for pos in range(1, count + 1):
            age = rng.choice(ages)
            created = now - timedelta(days=age)
            updated = created + timedelta(days=rng.choice([0, age // 2, age]))
            if pos in special:
                title, labels, assignees, reason = special[pos]
            else:
                title = f"{rng.choice(['Fix', 'Add', 'Refactor', 'Document', 'Test'])} item {pos}"
                labels = rng.sample(["P0", "P1", "P2", "P3", "bug", "security", "refactor", "tests",
                                     "docs"], rng.randint(0, 3))
                assignees, reason = [], None
            body = "- [ ] step\n" * rng.randint(0, 4) + "x" * rng.randint(0, 3000)
            n = emu.add_issue(repo, title, body, labels=labels, assignees=assignees,
                              created_at=created, updated_at=min(updated, now), author="alice")
            numbers[pos] = n
            ref = (repo, n)
            if reason is None:
                eligible.add(ref)
            else:
                skipped[ref] = reason
            if pos % 40 == 0:  # closed issues interleaved: never listed at all
                emu.add_issue(repo, f"Closed thing {pos}", state="closed", author="alice")
        pr1 = emu.add_pull(repo, "Webhook retries", f"Closes #{numbers[21]}", head="fix/webhook",
                           author="alice")
        pr2 = emu.add_pull(repo, "Faster index", "", head=f"dispatch/{numbers[24]}-speed-up-the-index",
                           author="alice")
        emu.add_pull(repo, "Old attempt", f"Fixes #{numbers[27]}", head="old/health", state="closed",
                     author="alice")
        skipped[(repo, numbers[21])] = f"open PR #{pr1} references it"
        skipped[(repo, numbers[24])] = f"open PR #{pr2} references it"
    return eligible, skipped


def min_requests() -> int:
    """settings + every issue page at the cap + one page of PRs per repo."""
    return 1 + sum(math.ceil(n / PAGE_CAP) for n in OPEN_PER_REPO.values()) + len(OPEN_PER_REPO)


@pytest.fixture
def backlog(gitea: GiteaEmulator, tmp_path: Path):
    eligible, skipped = seed_backlog(gitea)
    config = write_config(tmp_path, gitea, list(OPEN_PER_REPO), gitea={"backoff": 0.05})
    return config, eligible, skipped


# ---- triage ---------------------------------------------------------------------------------


def test_triage_json_lists_every_eligible_issue_once_ranked(gitea, backlog):
    config, eligible, skipped = backlog
    gitea.requests.clear()
    result = invoke(config, "triage", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)

    refs = [(r["repo"], r["number"]) for r in data["ranked"]]
    assert len(refs) == len(set(refs)) == len(eligible)
    assert set(refs) == eligible
    scores = [r["score"] for r in data["ranked"]]
    assert scores == sorted(scores, reverse=True)
    for r in data["ranked"]:
        assert r["title"] and r["agent"] in {"claude", "kimi"}
        assert r["reasons"] and all(isinstance(x, str) and x for x in r["reasons"])

    got = {(s["repo"], s["number"]): s for s in data["skipped"]}
    assert set(got) == set(skipped)
    for ref, reason in skipped.items():
        assert got[ref]["reason"] == reason, ref
        assert got[ref]["title"]

    assert gitea.count(kind="fault") == 0
    assert gitea.count() == min_requests()  # no page asked twice, none skipped
    assert all("limit=50" in q.query for q in gitea.requests if "/issues" in q.path)


def test_triage_survives_one_failure_in_three_identically(gitea, backlog):
    config, _, _ = backlog
    clean = invoke(config, "triage", "--json")
    assert clean.exit_code == 0, clean.output
    gitea.fail_every, gitea.fail_statuses = 3, [502, 429]
    gitea.requests.clear()
    t0 = time.monotonic()
    faulty = invoke(config, "triage", "--json")
    elapsed = time.monotonic() - t0
    assert faulty.exit_code == 0, faulty.output
    assert gitea.count(kind="fault") >= 3
    assert {q.status for q in gitea.requests if q.kind == "fault"} == {502, 429}
    assert faulty.stdout == clean.stdout
    # the retries sleep for real (config gitea.backoff: 50 ms, doubling, jittered)
    assert elapsed < 20, f"faulty triage took {elapsed:.1f}s"


@pytest.mark.parametrize("how", ["down", "closed port"])
def test_server_down_is_one_line_naming_the_url(gitea, tmp_path, how):
    if how == "down":
        config = write_config(tmp_path, gitea, ["acme/api"], gitea={"retries": 1})
        gitea.down()
        url = gitea.url
    else:
        with socket.socket() as s:  # a port that was free a moment ago and has no listener
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        config = write_config(tmp_path, gitea, ["acme/api"], gitea={"url": url, "retries": 0})
    result = invoke(config, "triage")
    assert result.exit_code == 1
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert url + "/api/v1/" in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


# ---- secrets ------------------------------------------------------------------------------


def test_canary_token_never_leaks(gitea, tmp_path, canary, hermetic_env, model_server):
    seed_backlog(gitea)
    server = model_server(model="scripted")
    config = write_config(tmp_path, gitea, list(OPEN_PER_REPO),
                          llm={"base_url": server.url + "/v1", "model": "scripted"})
    token_file = tmp_path / "gitea-token"
    assert canary in token_file.read_text()
    runs = [
        ("-vv", "triage"), ("-vv", "triage", "--json"), ("-vv", "prompt", "acme/api#1"),
        ("-vv", "route"), ("-vv", "route", "--apply", "--limit", "5"), ("-vv", "doctor"),
        ("-vv", "doctor", "--json"),
    ]
    for args in runs:
        result = invoke(config, *args)
        assert result.exit_code == 0, (args, result.output)
        assert canary not in result.stdout, args
        assert canary not in result.stderr, args
    gitea.fail_every = 10  # a fault or two: the retry log line names the URL, never the token
    retried = invoke(config, "-vv", "triage")
    assert "retry" in retried.stderr and "/api/v1/" in retried.stderr  # -vv did reach the log
    assert canary not in retried.stdout and canary not in retried.stderr
    assert all(q.authorized for q in gitea.requests if q.kind == "api")
    assert gitea.count("POST", "/api/v1/repos/acme/api/issues/") > 0  # --apply wrote comments
    comments = " ".join(json.dumps(gitea.issue("acme/api", n)) for n in gitea.issue_numbers("acme/api"))
    assert canary not in comments

    leaked = []
    for root in (tmp_path, hermetic_env):
        for path in root.rglob("*"):
            if path.is_file() and path != token_file and canary.encode() in path.read_bytes():
                leaked.append(path)
    assert leaked == []


def test_prompt_has_clone_url_branch_and_token_hint_but_no_token(gitea, tmp_path, canary):
    gitea.add_repo("acme/api", git=True)
    n = gitea.add_issue("acme/api", "Fix the login redirect!", "Users land on /404.", labels=["P1"])
    config = write_config(tmp_path, gitea, ["acme/api"])
    result = invoke(config, "prompt", f"acme/api#{n}")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{gitea.url}/acme/api.git" in out
    assert "@127.0.0.1" not in out and "://dispatch-bot" not in out
    assert f"dispatch/{n}-fix-the-login-redirect" in out
    assert f"Closes #{n}" in out
    assert str(tmp_path / "gitea-token") in out
    assert "Users land on /404." in out
    assert canary not in out and canary not in result.stderr


# ---- route --------------------------------------------------------------------------------


def test_route_apply_twice_labels_and_comments_once(gitea, tmp_path):
    gitea.add_repo("acme/api")
    numbers = [
        gitea.add_issue("acme/api", "Refactor the session layer", labels=["P1", "refactor"]),
        gitea.add_issue("acme/api", "Crash on empty input", labels=["P0", "bug"]),
        gitea.add_issue("acme/api", "Add tests for the parser", labels=["P2", "tests"]),
    ]
    epic = gitea.add_issue("acme/api", "Roadmap", labels=["epic"])
    config = write_config(tmp_path, gitea, ["acme/api"])

    preview = invoke(config, "route", "--json")
    assert preview.exit_code == 0, preview.output
    assert gitea.count("POST") == 0  # without --apply nothing is written
    planned = {r["number"]: r["agent"] for r in json.loads(preview.stdout)["routes"]}
    assert set(planned) == set(numbers)

    first = invoke(config, "route", "--apply", "--json")
    assert first.exit_code == 0, first.output
    assert all(r["labelled"] and r["commented"] for r in json.loads(first.stdout)["routes"])

    def state():
        return {n: (sorted(lb["name"] for lb in gitea.issue("acme/api", n)["labels"]),
                    gitea.issue("acme/api", n)["comments"]) for n in [*numbers, epic]}

    after_first = state()
    for n in numbers:
        labels, comments = after_first[n]
        assert f"{planned[n]}-ready" in labels
        assert [lb for lb in labels if lb.endswith("-ready")] == [f"{planned[n]}-ready"]
        assert comments == 1
    assert after_first[epic] == (["epic"], 0)
    posts = gitea.count("POST")

    second = invoke(config, "route", "--apply", "--json")
    assert second.exit_code == 0, second.output
    assert not any(r["labelled"] or r["commented"] for r in json.loads(second.stdout)["routes"])
    assert state() == after_first
    assert gitea.count("POST") == posts


# ---- config and arguments -----------------------------------------------------------------


def _config_cases(tmp_path: Path, gitea: GiteaEmulator) -> dict[str, Path]:
    good = write_config(tmp_path, gitea, ["acme/api"]).read_text()
    cases = {
        "bad yaml": "gitea: {url: [unclosed\n",
        "unknown key": good + "colour: blue\n",
        "missing url": good.replace(f"url: {gitea.url}", "url: ''"),
        "unreadable token file": good.replace(str(tmp_path / "gitea-token"), str(tmp_path / "nope")),
    }
    paths = {}
    for name, text in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.yaml"
        path.write_text(text)
        paths[name] = path
    return paths


def test_bad_config_exits_2_with_one_line_naming_the_file(gitea, tmp_path):
    gitea.add_repo("acme/api")
    expected = {"bad yaml": "not valid YAML", "unknown key": "colour",
                "missing url": "gitea.url", "unreadable token file": "token_file"}
    for name, path in _config_cases(tmp_path, gitea).items():
        result = invoke(path, "triage")
        assert result.exit_code == 2, (name, result.output)
        lines = stderr_lines(result)
        assert len(lines) == 1, (name, result.stderr)
        assert str(path) in lines[0] and expected[name] in lines[0], (name, lines[0])
        assert "Traceback" not in result.output


@pytest.mark.parametrize("args", [
    ["prompt", "foo"], ["prompt", "acme/api#x"], ["triage", "--limit", "0"], ["sprint", "--repo", "x"],
    ["sprint", "--repo", "acme/api", "--backend", "magic"], ["nosuchcommand"],
])
def test_bad_arguments_exit_2_without_traceback(gitea, tmp_path, args):
    config = write_config(tmp_path, gitea, ["acme/api"])
    result = invoke(config, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "Error" in result.stderr
    assert gitea.count() == 0  # refused before any forge call


def test_init_writes_a_loadable_config_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "conf" / "dispatch.yaml"
    first = invoke(path, "init")
    assert first.exit_code == 0, first.output
    cfg = load_config(path, {})
    assert cfg.gitea.url and cfg.gitea.token_file and [a.name for a in cfg.agents]

    path.write_text(path.read_text() + "# my edit\n")
    again = invoke(path, "init")
    assert again.exit_code == 2
    assert str(path) in again.stderr and "--force" in again.stderr
    assert path.read_text().endswith("# my edit\n")

    forced = invoke(path, "init", "--force")
    assert forced.exit_code == 0
    assert "# my edit" not in path.read_text()


def test_every_help_shows_an_example():
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "Example" in top.stdout
    commands = typer.main.get_command(app).commands
    assert {"init", "doctor", "triage", "prompt", "route", "sprint", "run"} <= set(commands)
    for name in commands:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example" in result.stdout, name


# ---- imports ------------------------------------------------------------------------------


def test_triage_does_not_import_openai(gitea, tmp_path):
    gitea.add_repo("acme/api")
    gitea.add_issue("acme/api", "Fix it", labels=["P1"])
    config = write_config(tmp_path, gitea, ["acme/api"])
    script = textwrap.dedent(f"""
        import sys
        from dispatch.cli import app
        try:
            app(["--config", {str(config)!r}, "triage", "--json"], standalone_mode=False)
        finally:
            print("OPENAI_IMPORTED=" + str("openai" in sys.modules), file=sys.stderr)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ranked"][0]["title"] == "Fix it"
    assert "OPENAI_IMPORTED=False" in proc.stderr
