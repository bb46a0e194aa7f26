"""The local tool-calling loop: a Model proposes tool calls, an Environment runs them, until done.

The loop stops on a final answer, a budget (steps, wall clock, tokens, cost), a model failure that
retries did not fix, or the same failing tool call repeated. Every turn is appended to a
trajectory JSONL file as it happens.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from .errors import ModelError

log = logging.getLogger(__name__)

STATUSES = ("finished", "step_budget", "time_budget", "token_budget", "cost_budget",
            "repeated_failure", "model_error")  # fmt: skip


# ---- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict | None  # None when the model's JSON did not parse
    raw_arguments: str = ""
    error: str | None = None  # why the arguments are unusable; fed back to the model


@dataclass(frozen=True)
class ModelReply:
    content: str | None
    tool_calls: tuple[ToolCall, ...]
    tokens_in: int
    tokens_out: int
    message: dict  # the assistant message to append to the history


@dataclass(frozen=True)
class Observation:
    output: str
    ok: bool


@dataclass(frozen=True)
class Budget:
    max_steps: int = 40  # model turns
    max_seconds: float = 1800.0  # wall clock for the whole run, model waits included
    max_tokens: int = 400_000  # prompt + completion tokens across the run
    max_cost_usd: float = 0.0  # 0 = unlimited
    repeat_limit: int = 3  # identical failing calls (name, arguments, output) in total


@dataclass(frozen=True)
class RunResult:
    status: str  # one of STATUSES
    final: str
    steps: int
    tokens_in: int
    tokens_out: int
    cost_usd: float
    model: str
    trajectory: Path | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "finished"


class Model(Protocol):
    """Turns the history into the next assistant message.

    `time_left` is the seconds remaining in the run: retries and rate-limit waits stay inside it.
    """

    name: str

    def query(
        self, messages: list[dict], tools: list[dict], *, time_left: float | None = None
    ) -> ModelReply: ...


class Environment(Protocol):
    """Runs one tool call; failures come back as Observation(ok=False), not exceptions."""

    def execute(self, call: ToolCall) -> Observation: ...

    def tool_schemas(self) -> list[dict]: ...


# ---- the OpenAI-compatible model -----------------------------------------------------------

_RETRY_STATUSES = {408, 409, 429}


class OpenAIModel:
    """Any OpenAI-compatible chat endpoint through the official SDK, with bounded retries."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        timeout: float = 120,
        prices: dict[str, list[float]] | None = None,
        client: Any = None,
        max_retries: int = 4,
        sleep: Callable[[float], None] = time.sleep,
        *,
        backoff: float = 1.0,
        backoff_cap: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import openai  # lazily: `dispatch --help` and triage must not pay for it

        self._openai = openai
        self.name = model
        self.base_url = base_url
        self.timeout = timeout
        self.prices = prices or {}
        self.max_retries = max_retries
        self.sleep = sleep
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.clock = clock
        # max_retries=0: the SDK's own retries would wait outside our budget
        self.client = client or openai.OpenAI(
            base_url=base_url, api_key=api_key or "not-needed", timeout=timeout, max_retries=0
        )

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        price_in, price_out = (list(self.prices.get(self.name) or []) + [0.0, 0.0])[:2]
        return (tokens_in * price_in + tokens_out * price_out) / 1_000_000

    def query(
        self, messages: list[dict], tools: list[dict], *, time_left: float | None = None
    ) -> ModelReply:
        deadline = None if time_left is None else self.clock() + time_left
        extra = {"tools": tools} if tools else {}
        attempt = 0
        while True:
            timeout = self.timeout
            if deadline is not None:
                timeout = min(timeout, deadline - self.clock())
                if timeout <= 0:
                    raise ModelError("the run's time budget ran out before the model answered")
            try:
                resp = self.client.chat.completions.create(
                    model=self.name, messages=messages, timeout=timeout, **extra
                )
                return parse_completion(resp)
            except self._openai.APIError as e:
                reason, wait = self._describe(e, attempt)
                if wait is None or attempt >= self.max_retries:
                    raise ModelError(reason) from None
                if deadline is not None and self.clock() + wait > deadline:
                    raise ModelError(
                        f"{reason}; waiting {wait:.0f} s more would pass the run's time budget"
                    ) from None
                attempt += 1
                log.info("model: %s; retry %d in %.1f s", reason, attempt, wait)
                self.sleep(wait)

    def _describe(self, e: Exception, attempt: int) -> tuple[str, float | None]:
        """A one-line reason and the wait before retrying, or None when retrying won't help."""
        o = self._openai
        backoff = min(self.backoff_cap, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
        if isinstance(e, o.APITimeoutError):
            return f"model at {self.base_url} timed out", backoff
        if isinstance(e, o.APIConnectionError):
            return f"cannot reach the model at {self.base_url}", backoff
        if isinstance(e, o.APIStatusError):
            reason = f"{e.status_code} from the model at {self.base_url}: {_short(e.message)}"
            if e.status_code in _RETRY_STATUSES or e.status_code >= 500:
                after = _retry_after(e.response.headers)
                return reason, backoff if after is None else max(after, backoff)
            return reason, None
        return f"bad answer from the model at {self.base_url}: {_short(str(e))}", None


def _retry_after(headers: Any) -> float | None:
    for key, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return float(headers.get(key)) * scale
        except (TypeError, ValueError):
            continue  # absent, or an HTTP date: fall back to our own backoff
    return None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def assistant_message(content: str | None, calls: list[ToolCall]) -> dict[str, Any]:
    """The assistant turn as the history holds it, tool calls with their raw arguments."""
    message: dict[str, Any] = {"role": "assistant", "content": content or ""}
    if calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.raw_arguments}}
            for c in calls
        ]  # fmt: skip
    return message


def parse_completion(resp: Any) -> ModelReply:
    """A chat completion (SDK object) as a ModelReply; malformed tool arguments become errors."""
    if not getattr(resp, "choices", None):
        raise ModelError("the model returned no choices")
    msg = resp.choices[0].message
    calls = []
    for i, tc in enumerate(msg.tool_calls or ()):
        fn = tc.function
        calls.append(parse_tool_call(tc.id or f"call_{i}", fn.name or "", fn.arguments or ""))
    message = assistant_message(msg.content, calls)
    usage = resp.usage
    return ModelReply(
        content=msg.content,
        tool_calls=tuple(calls),
        tokens_in=(usage.prompt_tokens or 0) if usage else 0,
        tokens_out=(usage.completion_tokens or 0) if usage else 0,
        message=message,
    )


def parse_tool_call(call_id: str, name: str, raw: str) -> ToolCall:
    if not raw.strip():
        return ToolCall(call_id, name, {}, raw)
    try:
        args = json.loads(raw)
    except ValueError as e:
        return ToolCall(call_id, name, None, raw, f"arguments are not valid JSON ({e}); resend")
    if not isinstance(args, dict):
        return ToolCall(call_id, name, None, raw, "arguments must be a JSON object")
    return ToolCall(call_id, name, args, raw)


# ---- the loop ------------------------------------------------------------------------------


class _Trajectory:
    """Appends one JSON line per turn, flushed at once, so a crash keeps everything so far."""

    def __init__(self, path: Path | None, redact: Callable[[str], str]) -> None:
        self.path = path
        self.redact = redact
        self._f: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._f is None:
            return
        record["ts"] = round(time.time(), 3)
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
        self._f.write(self.redact(line) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _identity(text: str) -> str:
    return text


def run_agent(
    model: Model,
    env: Environment,
    *,
    system: str,
    task: str,
    budget: Budget,
    trajectory_path: Path | None,
    clock: Callable[[], float] = time.monotonic,
    redact: Callable[[str], str] = _identity,
) -> RunResult:
    """Run the loop until a final answer or a stop; never raises for model or tool failures."""
    tools = env.tool_schemas()
    known = {t["function"]["name"] for t in tools}
    cost_of = getattr(model, "cost", None)
    messages: list[dict] = [
        {"role": "system", "content": system},
        {"role": "user", "content": task},
    ]
    traj = _Trajectory(trajectory_path, redact)
    start = clock()
    steps = tokens_in = tokens_out = 0
    cost = 0.0
    failures: Counter[tuple[str, str, str]] = Counter()

    def done(status: str, final: str = "", error: str = "") -> RunResult:
        result = RunResult(status, redact(final), steps, tokens_in, tokens_out, round(cost, 6),
                           model.name, trajectory_path, redact(error))  # fmt: skip
        traj.write({"step": steps, "role": "result", "status": status, "error": result.error,
                    "usage": {"tokens_in": tokens_in, "tokens_out": tokens_out,
                              "cost_usd": result.cost_usd}})  # fmt: skip
        return result

    try:
        for m in messages:
            traj.write({"step": 0, "role": m["role"], "content": m["content"]})
        while True:
            elapsed = clock() - start
            if steps >= budget.max_steps:
                return done("step_budget", error=f"stopped after {steps} steps (the step budget)")
            if elapsed >= budget.max_seconds:
                return done("time_budget", error=f"stopped after {elapsed:.0f} s (the time budget)")
            if tokens_in + tokens_out >= budget.max_tokens:
                return done("token_budget", error=f"stopped after {tokens_in + tokens_out} tokens")
            if budget.max_cost_usd and cost >= budget.max_cost_usd:
                return done("cost_budget", error=f"stopped at ${cost:.4f} (the cost budget)")
            try:
                reply = model.query(messages, tools, time_left=budget.max_seconds - elapsed)
            except ModelError as e:
                return done("model_error", error=str(e))
            steps += 1
            tokens_in += reply.tokens_in
            tokens_out += reply.tokens_out
            if cost_of is not None:
                cost = cost_of(tokens_in, tokens_out)
            messages.append(reply.message)
            traj.write({
                "step": steps, "role": "assistant", "content": reply.content,
                "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.raw_arguments}
                               for c in reply.tool_calls],
                "usage": {"prompt_tokens": reply.tokens_in,
                          "completion_tokens": reply.tokens_out},
            })  # fmt: skip
            if not reply.tool_calls:
                return done("finished", final=reply.content or "")
            for call in reply.tool_calls:
                obs = _execute(env, call, known)
                output = redact(obs.output)  # tool output can echo anything; keep secrets out
                messages.append({"role": "tool", "tool_call_id": call.id, "content": output})
                traj.write({"step": steps, "role": "tool", "tool_call_id": call.id,
                            "name": call.name, "ok": obs.ok, "content": output})  # fmt: skip
                if obs.ok:
                    continue
                key = (call.name, _args_key(call), output)
                failures[key] += 1
                if failures[key] >= budget.repeat_limit:
                    first = output.splitlines()[0] if output else ""
                    return done(
                        "repeated_failure",
                        error=f"the model repeated a failing {call.name} call "
                        f"{failures[key]} times: {_short(first, 200)}",
                    )
    finally:
        traj.close()


def _execute(env: Environment, call: ToolCall, known: set[str]) -> Observation:
    if call.name not in known:
        return Observation(f"error: unknown tool {call.name!r}; use one of {sorted(known)}", False)
    if call.error is not None:
        return Observation(f"error: {call.error}", False)
    return env.execute(call)


def _args_key(call: ToolCall) -> str:
    if call.arguments is None:
        return call.raw_arguments
    return json.dumps(call.arguments, sort_keys=True, default=str)
