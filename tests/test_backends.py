"""Backend selection: gateway first, CLI second, direct third, each probed; reasons recorded."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dispatch.backends import CLIBackend, DirectBackend, GatewayBackend, Job, run_first_available
from tests.emulator.model_server import say
from tests.fakes import FakeEnvironment, ScriptedModel


class Gateway:
    """A minimal agent gateway on loopback: answers /v1/models and one chat completion."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, data: dict) -> None:
                raw = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "hermes"}]})

            def do_POST(self):
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self._send({"model": "hermes", "choices": [{"message": {"role": "assistant", "content": "did it"}}],
                            "usage": {"prompt_tokens": 11, "completion_tokens": 3}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def job(tmp_path: Path) -> Job:
    ws = tmp_path / "ws"
    ws.mkdir()
    prompt = tmp_path / "prompt.md"
    prompt.write_text("do the thing")
    return Job(workspace=ws, prompt="do the thing", prompt_file=prompt, system="sys", repo="o/r",
               issue=1, model="m", trajectory=tmp_path / "t.jsonl", max_seconds=30)


def direct() -> DirectBackend:
    from dispatch.agent import Budget

    return DirectBackend(lambda m: ScriptedModel([say("direct done")]), lambda job: FakeEnvironment(),
                         lambda job: Budget(max_steps=3), lambda s: s)


def closed_port() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_gateway_up_runs_on_the_gateway(job):
    gw = Gateway()
    try:
        r = run_first_available([GatewayBackend(gw.url), CLIBackend("true"), direct()], job)
    finally:
        gw.close()
    assert (r.backend, r.status, r.final, r.tokens_in) == ("gateway", "finished", "did it", 11)
    assert r.fallbacks == ()
    assert str(job.workspace) in gw.bodies[0]["messages"][1]["content"]


def test_gateway_down_falls_back_to_cli(job, tmp_path):
    script = tmp_path / "agent.sh"
    script.write_text('#!/bin/sh\necho "cli saw $1" > "$PWD/out.txt"\n')
    script.chmod(0o755)
    r = run_first_available([GatewayBackend(closed_port(), probe_timeout=0.5),
                             CLIBackend(f"{script} {{prompt_file}}"), direct()], job)
    assert (r.backend, r.status) == ("cli", "finished")
    assert r.fallbacks[0].startswith("gateway: gateway http://127.0.0.1")
    assert (job.workspace / "out.txt").read_text().strip() == f"cli saw {job.prompt_file}"


def test_cli_missing_falls_back_to_direct(job):
    r = run_first_available([GatewayBackend(closed_port(), probe_timeout=0.5),
                             CLIBackend("no-such-agent-binary chat -q {prompt_file}"), direct()], job)
    assert (r.backend, r.status, r.final) == ("direct", "finished", "direct done")
    assert [f.split(":")[0] for f in r.fallbacks] == ["gateway", "cli"]
    assert "not found on PATH" in r.fallbacks[1]


def test_cli_env_is_scrubbed_and_failure_is_reported(job, tmp_path, monkeypatch, canary):
    script = tmp_path / "agent.sh"
    script.write_text("#!/bin/sh\nenv\nexit 3\n")
    script.chmod(0o755)
    monkeypatch.setenv("GITEA_TOKEN", canary)
    r = run_first_available([CLIBackend(str(script))], job)
    assert r.status == "error" and "exited 3" in r.error
    assert canary not in r.final and canary not in r.error


def test_no_backend_available_says_why(job):
    r = run_first_available([CLIBackend("")], job)
    assert r.status == "error" and "no cli command configured" in r.error
