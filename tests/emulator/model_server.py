"""A scripted OpenAI-compatible chat server on loopback, for driving the real `openai` SDK.

It replays a script of turns (assistant replies with tool calls, malformed arguments, HTTP
faults, delays, dropped connections) and records every request it was sent.

    with ModelServer([call("write_file", path="x", content="y"), say("done")]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# ---- the script ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScriptedCall:
    name: str
    arguments: dict | str  # a str is sent as-is: use it for malformed JSON


@dataclass(frozen=True)
class Reply:
    content: str | None = None
    tool_calls: tuple[ScriptedCall, ...] = ()
    delay: float = 0.0  # seconds to wait before answering


@dataclass(frozen=True)
class Fault:
    status: int = 500
    retry_after: float | None = None  # sent as a Retry-After header when set
    delay: float = 0.0
    drop: bool = False  # close the connection without answering
    message: str = "scripted fault"


Turn = Reply | Fault


def say(text: str, *, delay: float = 0.0) -> Reply:
    """A final assistant message (no tool calls)."""
    return Reply(content=text, delay=delay)


def call(name: str, _raw: str | None = None, /, **arguments: Any) -> Reply:
    """One tool call; pass a raw string first to send malformed arguments verbatim."""
    return Reply(tool_calls=(ScriptedCall(name, _raw if _raw is not None else arguments),))


def calls(*replies: Reply, content: str | None = None) -> Reply:
    """Several tool calls in one assistant message."""
    return Reply(content=content, tool_calls=tuple(c for r in replies for c in r.tool_calls))


def fault(status: int = 500, *, retry_after: float | None = None, delay: float = 0.0) -> Fault:
    return Fault(status=status, retry_after=retry_after, delay=delay)


def drop() -> Fault:
    return Fault(drop=True)


def estimate_tokens(text: str) -> int:
    """About four characters per token: cheap and good enough for budgets in tests."""
    return max(1, len(text) // 4)


# ---- the server ----------------------------------------------------------------------------


@dataclass
class _State:
    script: list[Turn]
    when_done: str  # "repeat" the last turn, or "final": answer with `final_text`
    final_text: str
    model: str
    position: int = 0
    requests: list[dict] = field(default_factory=list)
    authorized: list[bool] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    per_conversation: bool = False  # replay the script from the top for each conversation

    def next_turn(self, request: dict | None = None) -> Turn:
        with self.lock:
            if self.per_conversation and request is not None:
                # the turn index is how many assistant turns the conversation already holds, so
                # concurrent clients each walk the script independently
                self.position = sum(m.get("role") == "assistant" for m in request.get("messages", []))
            if self.position < len(self.script):
                turn = self.script[self.position]
                self.position += 1
                return turn
        if self.when_done == "repeat" and self.script:
            return self.script[-1]
        return say(self.final_text)


class ModelServer:
    """Serves /v1/chat/completions and /v1/models on 127.0.0.1 at a free port."""

    def __init__(
        self,
        script: list[Turn] | None = None,
        *,
        when_done: str = "final",
        final_text: str = "done",
        model: str = "scripted",
        per_conversation: bool = False,
    ) -> None:
        if when_done not in ("repeat", "final"):
            raise ValueError("when_done is 'repeat' or 'final'")
        self.state = _State(list(script or []), when_done, final_text, model,
                            per_conversation=per_conversation)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[dict]:
        """Every chat request body received, in order."""
        return self.state.requests

    @property
    def authorized(self) -> list[bool]:
        """Whether each request carried an Authorization header."""
        return self.state.authorized

    def sent_text(self) -> str:
        """Everything the model was ever sent, as one string (for leak checks)."""
        return "\n".join(json.dumps(r, ensure_ascii=False) for r in self.requests)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
        # headers and body leave in one segment: otherwise Nagle + delayed ACK add ~40 ms a call
        disable_nagle_algorithm = True
        wbufsize = 64 * 1024

        def log_message(self, format: str, *args: Any) -> None:  # quiet in tests
            pass

        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/v1/models":
                return self._json(404, {"error": {"message": "not found"}})
            self._json(200, {"object": "list", "data": [
                {"id": state.model, "object": "model", "created": 0, "owned_by": "tests"}]})  # fmt: skip

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._json(404, {"error": {"message": "not found"}})
            try:
                body = json.loads(raw)
            except ValueError:
                return self._json(400, {"error": {"message": "body is not JSON"}})
            with state.lock:
                state.requests.append(body)
                state.authorized.append(bool(self.headers.get("Authorization")))
            turn = state.next_turn(body)
            if turn.delay:
                time.sleep(turn.delay)
            if isinstance(turn, Fault):
                return self._fault(turn)
            self._json(200, _completion(body, turn, len(state.requests)))

        def _fault(self, f: Fault) -> None:
            if f.drop:
                self.close_connection = True  # the client sees the socket close, no response
                return
            headers = {"Retry-After": f"{f.retry_after:g}"} if f.retry_after is not None else {}
            self._json(f.status, {"error": {"message": f.message, "type": "scripted"}}, headers)

        def _json(self, status: int, data: dict, headers: dict | None = None) -> None:
            payload = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def _completion(request: dict, reply: Reply, n: int) -> dict:
    tool_calls = []
    for i, c in enumerate(reply.tool_calls):
        args = c.arguments if isinstance(c.arguments, str) else json.dumps(c.arguments)
        tool_calls.append({"id": f"call_{n}_{i}", "type": "function",
                           "function": {"name": c.name, "arguments": args}})  # fmt: skip
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    prompt = estimate_tokens(json.dumps(request.get("messages", [])))
    completion = estimate_tokens(json.dumps(message))
    return {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "scripted"),
        "choices": [{"index": 0, "message": message,
                     "finish_reason": "tool_calls" if tool_calls else "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    }  # fmt: skip
