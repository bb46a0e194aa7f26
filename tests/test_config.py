"""Config loading: precedence, overrides, and errors that name the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.config import STARTER, config_path, load_config
from dispatch.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


GOOD = """
gitea: {url: "http://127.0.0.1:3000", token_env: GITEA_TOKEN}
repos: [acme/api]
agents:
  - {name: claude, strengths: [architecture], max_concurrent: 2}
  - {name: kimi, strengths: [tests]}
"""


def test_good_config_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), env={})
    assert cfg.gitea.url == "http://127.0.0.1:3000"
    assert cfg.repos == ["acme/api"]
    assert [a.name for a in cfg.agents] == ["claude", "kimi"]
    assert cfg.agents[1].max_concurrent == 1
    assert cfg.triage.claim_label == "dispatch:claimed"
    assert cfg.source.endswith("config.yaml")


def test_starter_config_is_valid(tmp_path):
    cfg = load_config(write(tmp_path, STARTER), env={})
    assert {a.name for a in cfg.agents} == {"claude", "kimi"}


def test_precedence_env_over_cli_over_xdg(tmp_path):
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert config_path(None, env) == tmp_path / "xdg" / "dispatch" / "config.yaml"
    assert config_path("cli.yaml", env) == Path("cli.yaml")
    env["DISPATCH_CONFIG"] = str(tmp_path / "env.yaml")
    assert config_path("cli.yaml", env) == tmp_path / "env.yaml"


def test_env_overrides_apply_after_the_file(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), env={
        "DISPATCH_GITEA_URL": "http://forge:3000", "DISPATCH_STATE_DIR": "/srv/state"})
    assert cfg.gitea.url == "http://forge:3000"
    assert cfg.state_path == Path("/srv/state")
    assert cfg.gitea.token_env == "GITEA_TOKEN"  # the rest of the section survives


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("gitea: [1, 2", "not valid YAML at line"),
        ("gitea: {token_env: X}", "gitea.url: missing"),
        ("gitea: {url: ftp://x, token_env: X}", "gitea.url: expected an http"),
        ("gitea: {url: 'http://u:p@x', token_env: X}", "credentials do not belong"),
        ("gitea: {url: http://x, token_env: X}\ncolour: red", "colour: unknown key"),
        ("gitea: {url: http://x, timeout: soon}", "gitea.timeout: expected a number"),
        ("gitea: {url: http://x}\nagents: [{name: a, max_concurrent: 1.5}]", "agents[0].max_concurrent: expected a whole number"),
        ("gitea: {url: http://x}\nagents: [{name: a}, {name: a}]", "duplicate name 'a'"),
        ("gitea: {url: http://x}\nrepos: [justaname]", "repos: expected owner/name"),
        ("gitea: {url: http://x}\nrepos: acme/api", "repos: expected a list"),
        ("- just\n- a list", "expected a mapping of keys at the top"),
        ("gitea: {url: http://x}\ntelemetry: {keep: 0}", "telemetry.keep: expected at least 1, got 0"),
        ("gitea: {url: http://x}\nloop: {idle_sleep_s: -5}", "loop.idle_sleep_s: expected more than 0.0"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert needle in str(e.value)
    assert str(path) in str(e.value)
    assert e.value.exit_code == 2


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="dispatch init"):
        load_config(tmp_path / "nope.yaml", env={})


def test_token_from_file_and_env(tmp_path, canary):
    tok = tmp_path / "tok"
    tok.write_text(canary + "\n")
    cfg = load_config(write(tmp_path, f"gitea: {{url: http://x, token_file: {tok}}}"), env={})
    assert cfg.gitea_token({}) == canary
    cfg = load_config(write(tmp_path, "gitea: {url: http://x, token_env: T}"), env={})
    assert cfg.gitea_token({"T": canary}) == canary


def test_unreadable_or_missing_token_is_a_config_error_without_the_token(tmp_path, canary):
    cfg = load_config(write(tmp_path, f"gitea: {{url: http://x, token_file: {tmp_path}/none}}"), env={})
    with pytest.raises(ConfigError, match=r"gitea.token_file: cannot read .*none"):
        cfg.gitea_token({})
    cfg = load_config(write(tmp_path, "gitea: {url: http://x, token_env: T}"), env={})
    with pytest.raises(ConfigError, match="environment variable T is not set"):
        cfg.gitea_token({})
    cfg = load_config(write(tmp_path, "gitea: {url: http://x}"), env={})
    with pytest.raises(ConfigError, match="set token_file"):
        cfg.gitea_token({})


def test_llm_key_is_optional(tmp_path):
    cfg = load_config(write(tmp_path, "gitea: {url: http://x}\nllm: {api_key_env: K}"), env={})
    assert cfg.llm_api_key({}) == ""
    assert cfg.llm_api_key({"K": "sk-1"}) == "sk-1"


def test_the_operator_issue_is_never_dispatched(tmp_path):
    from dispatch.forge import Issue
    from dispatch.triage import classify

    cfg = load_config(write(tmp_path, "gitea: {url: http://x}\nreport: {operator_issue: 'acme/ops#1'}"), env={})
    assert cfg.triage.skip_refs == ["acme/ops#1"]
    assert classify(Issue("acme/ops", 1, "Operator inbox"), [], cfg.triage).startswith("excluded")
    assert classify(Issue("acme/ops", 2, "Real work"), [], cfg.triage) is None
