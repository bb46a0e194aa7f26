"""Shared fixtures. Fixture modules of the emulators are plugged in below."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.emulator.fixtures", "tests.emulator.model_fixtures", "tests.redis_fixtures", "tests.realtools"]

CANARY = "canary-7f3c1e9a-TOKEN-d41d8cd9"  # a unique token; tests prove it never leaks


@pytest.fixture(autouse=True)
def hermetic_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point HOME and the XDG dirs at a temp dir and drop DISPATCH_* so no test sees the user's."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    for var in list(os.environ):
        if var.startswith("DISPATCH_") or var in {"GITEA_TOKEN", "OPENAI_API_KEY"}:
            monkeypatch.delenv(var)
    return home


@pytest.fixture
def canary() -> str:
    """The canary token string."""
    return CANARY
