"""In-process fakes: a scripted Model, a recording Environment and a tiny forge client.

ScriptedModel speaks the same script vocabulary as the model server (`say`, `call`, `fault`),
so one script can run in-process (fast) or over HTTP through the real SDK.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dispatch.agent import ModelReply, Observation, ToolCall, assistant_message, parse_tool_call
from dispatch.errors import ForgeError, ModelError
from dispatch.tools import schemas
from tests.emulator.model_server import Fault, Reply, Turn, estimate_tokens, say


class ScriptedModel:
    """A zero-latency Model replaying turns; a Fault raises ModelError."""

    def __init__(self, script: list[Turn], *, when_done: str = "final", name: str = "scripted",
                 prices: tuple[float, float] = (0.0, 0.0)) -> None:  # fmt: skip
        self.script = list(script)
        self.when_done = when_done
        self.name = name
        self.prices = prices
        self.position = 0
        self.seen: list[list[dict]] = []  # a copy of the history at each query

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.prices[0] + tokens_out * self.prices[1]) / 1_000_000

    def query(self, messages: list[dict], tools: list[dict], *,
              time_left: float | None = None) -> ModelReply:  # fmt: skip
        self.seen.append(list(messages))
        if self.position < len(self.script):
            turn = self.script[self.position]
            self.position += 1
        elif self.when_done == "repeat" and self.script:
            turn = self.script[-1]
        else:
            turn = say("done")
        if isinstance(turn, Fault):
            raise ModelError(f"{turn.status} from the scripted model: {turn.message}")
        return to_reply(turn, self.position)


def to_reply(turn: Reply, n: int) -> ModelReply:
    """A scripted turn as the ModelReply the OpenAI model would have parsed."""
    parsed = []
    for i, c in enumerate(turn.tool_calls):
        raw = c.arguments if isinstance(c.arguments, str) else json.dumps(c.arguments)
        parsed.append(parse_tool_call(f"call_{n}_{i}", c.name, raw))
    message = assistant_message(turn.content, parsed)
    return ModelReply(turn.content, tuple(parsed), 10, estimate_tokens(json.dumps(message)), message)


class FakeEnvironment:
    """Records every call; answers from `outputs` by tool name (default: ok, no output)."""

    def __init__(self, outputs: dict[str, Observation] | None = None) -> None:
        self.outputs = outputs or {}
        self.calls: list[ToolCall] = []
        self._schemas = schemas()

    def tool_schemas(self) -> list[dict]:
        return self._schemas

    def execute(self, call: ToolCall) -> Observation:
        self.calls.append(call)
        return self.outputs.get(call.name, Observation("", True))


@dataclass
class FakeResponse:
    data: Any
    status_code: int = 200

    def json(self) -> Any:
        return self.data


@dataclass
class FakeForge:
    """Stands in for ForgeClient.request: answers by (METHOD, path), records every call."""

    routes: dict[tuple[str, str], Any] = field(default_factory=dict)
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    api: str = "http://forge.test/api/v1"

    def request(self, method: str, path: str, *, json: Any = None, **_: Any) -> FakeResponse:
        self.calls.append((method, path, json))
        if (method, path) not in self.routes:
            raise ForgeError(method, self.api + path, 404, "The target couldn't be found.")
        return FakeResponse(self.routes[(method, path)])
