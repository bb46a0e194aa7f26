"""The scripted model server itself, driven by the real `openai` SDK."""

from __future__ import annotations

import openai
import pytest

from dispatch.agent import OpenAIModel
from tests.emulator.model_fixtures import model_server  # noqa: F401  (until conftest plugs it in)
from tests.emulator.model_server import call, calls, say


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def test_models_and_script_replay(model_server) -> None:  # noqa: F811
    server = model_server([calls(call("read_file", path="a"), call("bad", "{nope")), say("hi")],
                          model="m1")  # fmt: skip
    c = client(server)
    assert [m.id for m in c.models.list()] == ["m1"]
    first = c.chat.completions.create(model="m1", messages=[{"role": "user", "content": "go"}])
    tcs = first.choices[0].message.tool_calls
    assert [t.function.name for t in tcs] == ["read_file", "bad"]
    assert tcs[0].function.arguments == '{"path": "a"}' and tcs[1].function.arguments == "{nope"
    assert first.usage.prompt_tokens > 0 and first.usage.completion_tokens > 0
    second = c.chat.completions.create(model="m1", messages=[{"role": "user", "content": "more"}])
    assert second.choices[0].message.content == "hi"
    third = c.chat.completions.create(model="m1", messages=[{"role": "user", "content": "again"}])
    assert third.choices[0].message.content == "done"  # script ran out: the final reply
    assert [r["messages"][0]["content"] for r in server.requests] == ["go", "more", "again"]


def test_slow_reply_times_out_then_retries(model_server) -> None:  # noqa: F811
    server = model_server([say("slow", delay=1.0), say("fast")])
    model = OpenAIModel(server.url + "/v1", "m", timeout=0.3, sleep=lambda _: None)
    reply = model.query([{"role": "user", "content": "hi"}], [])
    assert reply.content == "fast" and len(server.requests) == 2


def test_unknown_route_is_404(model_server) -> None:  # noqa: F811
    server = model_server()
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=server.url + "/nope", api_key="x", max_retries=0).models.list()
