"""The agent loop: real Workspace, scripted model server, real `openai` SDK over loopback."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from dispatch.agent import Budget, OpenAIModel, run_agent
from dispatch.errors import ModelError
from dispatch.tools import Workspace
from tests.emulator.model_fixtures import model_server  # noqa: F401  (until conftest plugs it in)
from tests.emulator.model_server import call, calls, drop, fault, say
from tests.fakes import FakeEnvironment, ScriptedModel


def model_for(server, **kwargs) -> OpenAIModel:
    return OpenAIModel(server.url + "/v1", "scripted", **kwargs)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    return Workspace(root, forge=None, repo="o/r")


def go(model, env, tmp_path: Path, budget: Budget | None = None, **kwargs):
    return run_agent(model, env, system="You fix issues.", task="Fix issue #1.",
                     budget=budget or Budget(), trajectory_path=tmp_path / "traj.jsonl",
                     **kwargs)  # fmt: skip


def lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def tool_outputs(path: Path) -> list[str]:
    return [r["content"] for r in lines(path) if r["role"] == "tool"]


def test_writes_a_file_runs_a_command_and_finishes(model_server, ws, tmp_path, canary) -> None:  # noqa: F811
    server = model_server([
        call("write_file", path="hello.py", content="print('hi from the agent')\n"),
        call("run_command", command="python3 hello.py"),
        say("Done: added hello.py"),
    ])  # fmt: skip
    result = go(model_for(server, prices={"scripted": [1.0, 2.0]}), ws, tmp_path,
                redact=lambda s: s.replace(canary, "***"))  # fmt: skip
    assert result.status == "finished" and result.ok
    assert result.final == "Done: added hello.py"
    assert (ws.root / "hello.py").read_text() == "print('hi from the agent')\n"
    assert result.steps == 3 and result.tokens_in > 0 and result.tokens_out > 0
    assert result.cost_usd == pytest.approx((result.tokens_in + 2 * result.tokens_out) / 1e6)
    assert any("hi from the agent" in out for out in tool_outputs(result.trajectory))
    # the model saw the command's output in the history it was sent
    last = server.requests[-1]["messages"]
    assert any(m["role"] == "tool" and "hi from the agent" in m["content"] for m in last)
    assert server.requests[0]["tools"] and server.authorized == [True, True, True]
    records = lines(result.trajectory)
    roles = [r["role"] for r in records]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant",
                     "result"]  # fmt: skip
    assistant = [r for r in records if r["role"] == "assistant"]
    assert all(r["usage"]["prompt_tokens"] > 0 for r in assistant)
    assert all("ts" in r for r in records)
    assert records[-1]["status"] == "finished"


def test_loop_forever_is_stopped_by_step_budget(model_server, ws, tmp_path) -> None:  # noqa: F811
    server = model_server([call("run_command", command="echo again")], when_done="repeat")
    result = go(model_for(server), ws, tmp_path, Budget(max_steps=5))
    assert result.status == "step_budget" and result.steps == 5
    assert len(server.requests) == 5
    assert "step budget" in result.error


def test_malformed_json_then_recovery(model_server, ws, tmp_path) -> None:  # noqa: F811
    server = model_server([
        call("write_file", '{"path": "a.txt", "content": '),  # truncated JSON
        call("write_file", path="a.txt", content="ok"),
        say("fixed"),
    ])  # fmt: skip
    result = go(model_for(server), ws, tmp_path)
    assert result.status == "finished"
    outputs = tool_outputs(result.trajectory)
    assert outputs[0].startswith("error: arguments are not valid JSON")
    assert (ws.root / "a.txt").read_text() == "ok"
    # the error went back to the model as a tool message answering its call id
    second = server.requests[1]["messages"]
    assert second[-1]["role"] == "tool" and second[-1]["content"].startswith("error:")
    assert second[-1]["tool_call_id"] == second[-2]["tool_calls"][0]["id"]


def test_unknown_tool_is_a_tool_error(model_server, ws, tmp_path) -> None:  # noqa: F811
    server = model_server([call("delete_repo", name="o/r"), say("ok")])
    result = go(model_for(server), ws, tmp_path)
    assert result.status == "finished"
    assert "unknown tool 'delete_repo'" in tool_outputs(result.trajectory)[0]


def test_repeated_identical_failure_stops(model_server, ws, tmp_path) -> None:  # noqa: F811
    server = model_server([call("read_file", path="../../etc/passwd")], when_done="repeat")
    result = go(model_for(server), ws, tmp_path, Budget(max_steps=20))
    assert result.status == "repeated_failure" and result.steps == 3
    assert "read_file" in result.error and "outside the workspace" in result.error


def test_escape_attempts_through_the_loop_touch_nothing(model_server, ws, tmp_path) -> None:  # noqa: F811
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("original")
    (ws.root / "out").symlink_to(outside)
    server = model_server([
        call("write_file", path="../../x", content="pwned"),
        call("write_file", path=str(outside / "abs.txt"), content="pwned"),
        call("write_file", path="out/keep.txt", content="pwned"),
        say("gave up"),
    ])  # fmt: skip
    result = go(model_for(server), ws, tmp_path)
    assert result.status == "finished"
    assert all(o.startswith("error:") for o in tool_outputs(result.trajectory))
    assert (outside / "keep.txt").read_text() == "original"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert not (tmp_path.parent / "x").exists()


def test_500_then_success_is_retried(model_server, ws, tmp_path) -> None:  # noqa: F811
    server = model_server([fault(500), fault(503), say("fine")])
    waits: list[float] = []
    result = go(model_for(server, sleep=waits.append), ws, tmp_path)
    assert result.status == "finished" and result.final == "fine"
    assert len(server.requests) == 3 and len(waits) == 2


def test_429_retry_after_is_honoured(model_server, ws, tmp_path) -> None:  # noqa: F811
    server = model_server([fault(429, retry_after=7), say("fine")])
    waits: list[float] = []
    result = go(model_for(server, sleep=waits.append), ws, tmp_path)
    assert result.status == "finished"
    assert waits and waits[0] >= 7


def test_429_wait_bounded_by_the_deadline(model_server, ws, tmp_path) -> None:  # noqa: F811
    server = model_server([fault(429, retry_after=600)], when_done="repeat")
    waits: list[float] = []
    t0 = time.monotonic()
    result = go(model_for(server, sleep=waits.append), ws, tmp_path, Budget(max_seconds=20))
    assert time.monotonic() - t0 < 5
    assert result.status == "model_error" and waits == []
    assert "429" in result.error and "time budget" in result.error


def test_retries_give_up_with_model_error(model_server, ws, tmp_path) -> None:  # noqa: F811
    server = model_server([drop()], when_done="repeat")
    waits: list[float] = []
    result = go(model_for(server, sleep=waits.append, max_retries=2), ws, tmp_path)
    assert result.status == "model_error" and "cannot reach the model" in result.error
    assert len(server.requests) == 3 and len(waits) == 2


def test_model_down_is_a_model_error(ws, tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    model = OpenAIModel(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, sleep=lambda _: None)
    result = go(model, ws, tmp_path)
    assert result.status == "model_error" and result.steps == 0
    assert "cannot reach the model" in result.error and "Traceback" not in result.error
    with pytest.raises(ModelError):
        model.query([{"role": "user", "content": "hi"}], [])


def test_401_is_not_retried(model_server, ws, tmp_path) -> None:  # noqa: F811
    server = model_server([fault(401)], when_done="repeat")
    result = go(model_for(server, sleep=lambda _: None), ws, tmp_path)
    assert result.status == "model_error" and "401" in result.error
    assert len(server.requests) == 1


def test_placeholder_key_and_canary_never_sent(model_server, ws, tmp_path, canary, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setenv("GITEA_TOKEN", canary)
    monkeypatch.setenv("FOO_API_KEY", canary)
    server = model_server([call("run_command", command="env"), say("ok")])
    result = go(OpenAIModel(server.url + "/v1", "scripted", api_key=""), ws, tmp_path)
    assert result.status == "finished"
    assert "PATH=" in server.sent_text()  # the env output did reach the model...
    assert canary not in server.sent_text()  # ...without the token
    assert canary not in result.trajectory.read_text()


def test_redact_applies_to_trajectory_and_history(tmp_path, canary) -> None:
    from dispatch.agent import Observation

    model = ScriptedModel([call("run_command", command="x"), say(f"final {canary}")])
    env = FakeEnvironment({"run_command": Observation(f"leaked {canary}", True)})
    result = go(model, env, tmp_path, redact=lambda s: s.replace(canary, "[redacted]"))
    assert canary not in result.trajectory.read_text() and canary not in result.final
    assert "leaked [redacted]" in model.seen[-1][-1]["content"]


def test_token_and_cost_budgets(tmp_path) -> None:
    loop = [call("run_command", command="x")]
    tokens = go(ScriptedModel(loop, when_done="repeat"), FakeEnvironment(), tmp_path,
                Budget(max_tokens=100))  # fmt: skip
    assert tokens.status == "token_budget" and tokens.tokens_in + tokens.tokens_out >= 100
    pricey = ScriptedModel(loop, when_done="repeat", prices=(1000.0, 1000.0))
    cost = go(pricey, FakeEnvironment(), tmp_path, Budget(max_cost_usd=0.1))
    assert cost.status == "cost_budget" and cost.cost_usd >= 0.1 and cost.steps < 40


def test_time_budget_uses_the_injected_clock(tmp_path) -> None:
    ticks = iter(range(0, 10_000, 100))
    result = go(ScriptedModel([call("run_command", command="x")], when_done="repeat"),
                FakeEnvironment(), tmp_path, Budget(max_seconds=250), clock=lambda: next(ticks))  # fmt: skip
    assert result.status == "time_budget" and result.steps == 2


def test_trajectory_is_saved_as_it_goes(tmp_path) -> None:
    """A crash in the environment mid-run leaves every earlier turn on disk."""

    class Boom(FakeEnvironment):
        def execute(self, call):
            raise RuntimeError("environment bug")

    with pytest.raises(RuntimeError):
        go(ScriptedModel([calls(call("read_file", path="a"))]), Boom(), tmp_path)
    records = lines(tmp_path / "traj.jsonl")
    assert [r["role"] for r in records] == ["system", "user", "assistant"]
    assert records[-1]["tool_calls"][0]["name"] == "read_file"


def test_openai_import_is_lazy() -> None:
    import subprocess
    import sys

    code = "import sys, dispatch.agent, dispatch.tools; print('openai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, env={**os.environ}, check=True)  # fmt: skip
    assert out.stdout.strip() == "False"
