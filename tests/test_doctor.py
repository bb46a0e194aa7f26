"""`dispatch doctor` against the Gitea emulator and the scripted model server, and its checks."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

from typer.testing import CliRunner

from dispatch.cli import app
from dispatch.doctor import run_checks
from tests.emulator.fixtures import write_config


def doctor(config: Path, *args: str):
    result = CliRunner().invoke(app, ["--config", str(config), "doctor", "--json", *args])
    return result, json.loads(result.stdout)


def by_name(data: dict) -> dict[str, dict]:
    return {c["name"]: c for c in data["checks"]}


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_all_checks_pass(gitea, tmp_path, model_server):
    server = model_server(model="scripted")
    config = write_config(tmp_path, gitea, llm={"base_url": server.url + "/v1", "model": "scripted"})
    result, data = doctor(config)
    assert result.exit_code == 0, result.output
    assert data["ok"] is True
    checks = by_name(data)
    assert {"config", "gitea token", "gitea auth", "model endpoint", "git", "tmux"} <= set(checks)
    assert all(c["ok"] for c in data["checks"] if c["required"])
    assert "dispatch-bot" in checks["gitea auth"]["detail"]
    assert checks["git"]["detail"].startswith("git version")
    assert gitea.count("GET", "/api/v1/user") == 1


def test_json_shape(gitea, tmp_path, model_server):
    server = model_server()
    config = write_config(tmp_path, gitea, llm={"base_url": server.url + "/v1", "model": "scripted"})
    _, data = doctor(config)
    assert set(data) == {"ok", "checks"}
    for c in data["checks"]:
        assert set(c) == {"name", "ok", "detail", "required"}
        assert isinstance(c["ok"], bool) and isinstance(c["required"], bool)
        assert isinstance(c["name"], str) and isinstance(c["detail"], str) and c["detail"]


def test_table_output_marks_each_check(gitea, tmp_path, model_server):
    server = model_server()
    config = write_config(tmp_path, gitea, llm={"base_url": server.url + "/v1", "model": "scripted"})
    result = CliRunner().invoke(app, ["--config", str(config), "doctor"])
    assert result.exit_code == 0, result.output
    for name in ("config", "gitea auth", "model endpoint", "git"):
        assert name in result.stdout
    assert "pass" in result.stdout and "FAIL" not in result.stdout


def test_wrong_token_fails_gitea_auth(gitea, tmp_path, model_server, canary):
    server = model_server()
    config = write_config(tmp_path, gitea, llm={"base_url": server.url + "/v1", "model": "scripted"})
    (tmp_path / "gitea-token").write_text("not-the-token\n")
    result, data = doctor(config)
    assert result.exit_code == 1
    assert data["ok"] is False
    auth = by_name(data)["gitea auth"]
    assert auth["ok"] is False and "401" in auth["detail"] and "/api/v1/user" in auth["detail"]
    assert by_name(data)["model endpoint"]["ok"] is True  # the other checks still ran
    assert "not-the-token" not in result.output


def test_model_endpoint_down_fails(gitea, tmp_path):
    url = closed_port_url()
    config = write_config(tmp_path, gitea, llm={"base_url": url + "/v1", "model": "scripted"})
    result, data = doctor(config)
    assert result.exit_code == 1
    model = by_name(data)["model endpoint"]
    assert model["ok"] is False and model["required"] is True
    assert f"{url}/v1/models" in model["detail"]
    assert by_name(data)["gitea auth"]["ok"] is True


def test_model_not_served_fails_with_message(gitea, tmp_path, model_server):
    server = model_server(model="llama3:8b")
    config = write_config(tmp_path, gitea, llm={"base_url": server.url + "/v1", "model": "qwen3:14b"})
    result, data = doctor(config)
    assert result.exit_code == 1
    model = by_name(data)["model endpoint"]
    assert model["ok"] is False
    assert "qwen3:14b" in model["detail"] and "llama3:8b" in model["detail"]


def test_bad_config_fails_first_check_and_still_checks_tools(tmp_path):
    missing = tmp_path / "absent.yaml"
    result, data = doctor(missing)
    assert result.exit_code == 1
    checks = by_name(data)
    assert checks["config"]["ok"] is False and str(missing) in checks["config"]["detail"]
    assert "gitea auth" not in checks
    assert "git" in checks


def test_missing_git_is_required_missing_tmux_only_warns(tmp_path):
    missing = tmp_path / "absent.yaml"
    checks = {c.name: c for c in run_checks(missing, {}, which=lambda name: None)}
    assert checks["git"].ok is False and checks["git"].required is True
    assert "not on PATH" in checks["git"].detail
    assert checks["tmux"].ok is False and checks["tmux"].required is False

    git = shutil.which("git")
    checks = {c.name: c for c in run_checks(missing, {},
                                            which=lambda name: git if name == "git" else None)}
    assert checks["git"].ok is True and "git version" in checks["git"].detail
    assert checks["tmux"].ok is False
