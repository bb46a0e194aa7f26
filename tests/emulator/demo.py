"""The README demo: dispatch against the bundled Gitea emulator and a scripted model, end to end.

Run: ``bash scripts/demo`` (or ``.venv/bin/python -m tests.emulator.demo``). Each step runs the
real `dispatch` command in a subprocess, so what you see is what a user sees. Exits non-zero if
any step fails.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from dispatch.forge import ForgeClient
from tests.emulator.gitea import GiteaEmulator, seed_demo
from tests.emulator.model_server import ModelServer, call, say

ROOT = Path(__file__).resolve().parents[2]
REPO = "acme/webapp"
MODEL = "qwen3:14b"  # what the scripted server says it serves
# The sprint's agent: write a file, look around, report. A real model would do more.
SCRIPT = [
    call("write_file", path="NOTES.md", content="Empty passwords are rejected before hashing.\n"),
    call("run_command", command="ls"),
    say("Added NOTES.md describing the fix."),
]


def header(text: str) -> None:
    print(f"\n\033[1m$ {text}\033[0m" if sys.stdout.isatty() else f"\n$ {text}", flush=True)


def write_setup(home: Path, emu: GiteaEmulator, model: ModelServer, token: str) -> Path:
    """A token file (0600) and a config in `home`; state lives in home/state."""
    token_file = home / "gitea-token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    config = {
        "gitea": {"url": emu.url, "token_file": str(token_file), "retries": 1},
        "repos": ["acme/webapp", "acme/infra"],
        "llm": {"base_url": model.url + "/v1", "model": MODEL},
        "agents": [{"name": "claude", "strengths": ["architecture", "refactor"], "max_concurrent": 2},
                   {"name": "kimi", "strengths": ["implementation", "tests", "bug"]}],
        "sprint": {"max_steps": 10, "max_minutes": 2},
        "state_dir": str(home / "state"),
    }
    path = home / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def dispatch(env: dict[str, str], *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    if not capture:
        header("dispatch " + " ".join(args))
    return subprocess.run([sys.executable, "-m", "dispatch", *args], cwd=ROOT, env=env,
                          text=True, capture_output=capture, timeout=120)


def main() -> int:
    token = secrets.token_hex(20)
    with tempfile.TemporaryDirectory(prefix="dispatch-demo-") as tmp, \
            GiteaEmulator(Path(tmp) / "gitea") as emu, \
            ModelServer(SCRIPT, model=MODEL) as model:
        home = Path(tmp)
        emu.add_user("dispatch-bot", token)
        seed_demo(emu)
        config = write_setup(home, emu, model, token)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
        # a private HOME: the demo must not read or write the user's own config or state
        env.update(DISPATCH_CONFIG=str(config), HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
                   XDG_STATE_HOME=str(home / ".state"), PYTHONPATH=str(ROOT))
        print(f"Gitea emulator at {emu.url}, scripted model at {model.url}/v1, config {config}")

        failed = []
        if dispatch(env, "doctor").returncode != 0:
            failed.append("doctor")
        if dispatch(env, "triage", "--limit", "10").returncode != 0:
            failed.append("triage")
        ranked = dispatch(env, "triage", "--json", "--repo", REPO, capture=True)
        top = json.loads(ranked.stdout)["ranked"][0] if ranked.returncode == 0 else None
        if top is None or dispatch(env, "prompt", f"{top['repo']}#{top['number']}").returncode != 0:
            failed.append("prompt")
        if dispatch(env, "sprint", "--repo", REPO, "--backend", "direct").returncode != 0:
            failed.append("sprint")

        header(f"the pull requests {REPO} now has (read back from the emulator)")
        pulls = ForgeClient(emu.url, token, retries=0).list_pulls(REPO)
        ours = [p for p in pulls if p.head.startswith("dispatch/")]
        for p in pulls:
            print(f"#{p.number} {p.head} -> {p.base}: {p.title}  ({p.html_url})")
        for p in ours:
            files = emu.git.git(*REPO.split("/"), "diff", "--stat", f"{p.base}...{p.head}")
            print(f"\n{p.body}\n\n{files}")
        if not ours:
            failed.append("no pull request from the sprint")

        header(f"the last row of {home / 'state' / 'results.csv'}")
        results = home / "state" / "results.csv"
        rows = list(csv.DictReader(results.open())) if results.exists() else []
        for key, value in (rows[-1] if rows else {}).items():
            print(f"  {key:12} {value}")
        if not rows:
            failed.append("no results.csv row")

    print("\ndemo " + ("FAILED: " + ", ".join(failed) if failed else "ok: every step worked"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
