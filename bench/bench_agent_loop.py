"""Agent-loop overhead per step: in-process scripted model vs the model server over loopback.

    .venv/bin/python bench/bench_agent_loop.py [--steps 500]

Both use a no-op environment, so the figures are the loop's own cost (history, trajectory
writes) plus, for the server, the SDK and HTTP round trip. Goal: < 5 ms/step in-process.
The server rows grow with the run: the SDK re-walks the whole history on each request.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dispatch.agent import Budget, OpenAIModel, run_agent  # noqa: E402
from tests.emulator.model_server import ModelServer, call  # noqa: E402
from tests.fakes import FakeEnvironment, ScriptedModel  # noqa: E402


def per_step(model, steps: int, trajectory: Path | None) -> float:
    budget = Budget(max_steps=steps, max_tokens=10**12, repeat_limit=10**9)
    t0 = time.perf_counter()
    result = run_agent(model, FakeEnvironment(), system="bench", task="loop",
                       budget=budget, trajectory_path=trajectory)  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert result.status == "step_budget" and result.steps == steps, result
    return elapsed / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    args = ap.parse_args()
    script = [call("write_file", path="a.txt", content="x" * 200)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        traj = Path(tmp) / "t.jsonl"
        rows.append(("in-process, no trajectory",
                     per_step(ScriptedModel(script, when_done="repeat"), args.steps, None)))
        rows.append(("in-process, trajectory",
                     per_step(ScriptedModel(script, when_done="repeat"), args.steps, traj)))
        with ModelServer(script, when_done="repeat") as server:
            model = OpenAIModel(server.url + "/v1", "scripted")
            # the SDK walks the whole history on every request (openai _transform), so the cost
            # per step grows with the run: show the default budget and a long run
            for n in (40, min(args.steps, 200)):
                rows.append((f"model server + openai SDK, {n} steps", per_step(model, n, traj)))
    print(f"{'loop':<42} {'ms/step':>9}")
    for name, ms in rows:
        print(f"{name:<42} {ms:>9.3f}")
    print(f"goal: in-process < 5 ms/step -> {'ok' if rows[1][1] < 5 else 'MISSED'}")


if __name__ == "__main__":
    main()
