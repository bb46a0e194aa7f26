"""pytest plugin: the `model_server` fixture (add "tests.emulator.model_fixtures" to pytest_plugins)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.emulator.model_server import ModelServer, Turn


@pytest.fixture
def model_server() -> Iterator[Callable[..., ModelServer]]:
    """A factory: `model_server(script, when_done="final"|"repeat")` starts a scripted server.

    Every server started is shut down when the test ends.
    """
    started: list[ModelServer] = []

    def start(script: list[Turn] | None = None, **kwargs: Any) -> ModelServer:
        server = ModelServer(script, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
