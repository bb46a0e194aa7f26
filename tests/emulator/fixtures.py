"""pytest fixtures for the Gitea emulator: a started server, a token file, a dispatch config.

Plugged in by ``pytest_plugins`` in tests/conftest.py, so any test can ask for ``gitea``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .gitea import GiteaEmulator

BOT = "dispatch-bot"

DEFAULT_AGENTS = [
    {"name": "claude", "strengths": ["architecture", "refactor", "review"], "max_concurrent": 2},
    {"name": "kimi", "strengths": ["implementation", "tests", "bug"], "max_concurrent": 1},
]


@pytest.fixture
def gitea(canary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GiteaEmulator]:
    """A started emulator with user `dispatch-bot` (token: the canary). Fails the test at
    teardown if any response it sent violated Gitea's spec."""
    emu = GiteaEmulator(tmp_path_factory.mktemp("gitea"), validate=True)
    emu.add_user(BOT, canary)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()
    if emu.violations:
        pytest.fail("Gitea emulator sent responses the spec does not allow:\n"
                    + "\n".join(f"  {v}" for v in emu.violations), pytrace=False)


def write_token_file(directory: Path, token: str, name: str = "gitea-token") -> Path:
    """The token in a file readable by its owner only (0600), as the config expects."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)  # in case the file already existed with looser bits
    return path


@pytest.fixture
def gitea_token_file(tmp_path: Path, canary: str) -> Path:
    """The canary token in a 0600 file."""
    return write_token_file(tmp_path, canary)


def write_config(tmp_path: Path, gitea: GiteaEmulator, repos: list[str] | None = None, /,
                 **extra: Any) -> Path:
    """A dispatch config YAML pointing at the emulator; returns its path.

    Writes the canary token to tmp_path/gitea-token and sets state_dir to tmp_path/state.
    `extra` adds or overrides top-level keys; a dict merges into a section, e.g.
    ``write_config(tmp_path, gitea, ["acme/webapp"], gitea={"retries": 0}, agents=[...])``
    (the first three are positional-only, so `gitea=` can name the config section).
    """
    from tests.conftest import CANARY

    token_file = write_token_file(tmp_path, CANARY)
    config: dict[str, Any] = {
        "gitea": {"url": gitea.url, "token_file": str(token_file)},
        "repos": list(repos or []),
        "agents": DEFAULT_AGENTS,
        "state_dir": str(tmp_path / "state"),
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path
