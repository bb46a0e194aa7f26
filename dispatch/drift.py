"""Model/profile drift: the expected agent -> model map against what the model server reports
and what each agent's own YAML config says; `fix_agent_file` corrects one file atomically.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import yaml

from .errors import ConfigError
from .watchdog import AgentFile

_MISSING = object()


@dataclass(frozen=True)
class ServerModels:
    api: str  # "ollama" (/api/ps: loaded now), "openai" (/v1/models: served), "" when unreachable
    models: tuple[str, ...] = ()
    error: str = ""


def server_models(base_url: str, *, session: requests.Session | None = None,
                  timeout: float = 3.0, api_key: str = "") -> ServerModels:
    """Ask Ollama's /api/ps first (when the endpoint is Ollama it says what is loaded), then /models."""
    http = session or requests.Session()
    if api_key:
        http.headers["Authorization"] = f"Bearer {api_key}"
    base = base_url.rstrip("/")
    root = base[: -len("/v1")] if base.endswith("/v1") else base
    try:
        r = http.get(root + "/api/ps", timeout=timeout)
        data = r.json() if r.ok else None
        if isinstance(data, dict) and isinstance(data.get("models"), list):
            return ServerModels("ollama", tuple(str(m.get("name") or m.get("model") or "")
                                                for m in data["models"]))
        r = http.get(base + "/models", timeout=timeout)
        r.raise_for_status()
        return ServerModels("openai", tuple(str(m.get("id", "")) for m in r.json().get("data", [])))
    except (requests.RequestException, ValueError, AttributeError) as e:
        return ServerModels("", error=f"{type(e).__name__}: cannot list models at {base}")


def same_model(a: str, b: str) -> bool:
    """Equal names, where Ollama's implicit `:latest` tag counts as written."""
    def norm(m: str) -> str:
        return m if ":" in m else m + ":latest"
    return norm(a.strip()) == norm(b.strip())


def get_key(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def check(expected: Mapping[str, str], server: ServerModels | None,
          files: Mapping[str, AgentFile], env: Mapping[str, str] | None = None) -> list[dict]:
    """Drift events (kind model_drift). Server: an expected model it does not serve (/models), or
    a loaded model nobody expects (Ollama: something else holds the memory). File: the agent's
    configured model differs from the expected one."""
    events = []
    if server and server.api == "openai":
        for name, model in sorted(expected.items()):
            if not any(same_model(model, m) for m in server.models):
                events.append({"kind": "model_drift", "subject": name, "where": "server",
                               "expected": model, "found": list(server.models)})
    if server and server.api == "ollama":
        for m in server.models:
            if not any(same_model(m, x) for x in expected.values()):
                events.append({"kind": "model_drift", "subject": m, "where": "server",
                               "expected": sorted(set(expected.values())), "found": m})
    for name, af in sorted(files.items()):
        if name not in expected:
            continue
        found = read_file_model(af)
        if found is None or not same_model(str(found), expected[name]):
            events.append({"kind": "model_drift", "subject": name, "where": "config",
                           "path": af.path, "key": af.key, "expected": expected[name],
                           "found": found})
    return events


def fix(events: list[dict], files: Mapping[str, AgentFile], *, allowed: bool,
        now: datetime | None = None) -> list[dict]:
    """Correct each drifted agent file when the policy allows; each event says what happened."""
    out = []
    for ev in events:
        af = files.get(ev["subject"]) if ev.get("where") == "config" else None
        if af is None:
            out.append(ev)
        elif not allowed:
            out.append({**ev, "fixed": False, "why": "the policy does not allow fixing agent configs"})
        elif not Path(os.path.expanduser(af.path)).is_file():
            out.append({**ev, "fixed": False, "why": "the file does not exist"})
        else:
            try:
                backup = fix_agent_file(af, ev["expected"], now=now)
            except (ConfigError, OSError) as e:
                out.append({**ev, "fixed": False, "why": str(e)})
            else:
                out.append({**ev, "fixed": True, "backup": str(backup)})
    return out


def read_file_model(af: AgentFile) -> str | None:
    try:
        data = yaml.safe_load(Path(os.path.expanduser(af.path)).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    value = get_key(data, af.key)
    return None if value is _MISSING or value is None else str(value)


def fix_agent_file(af: AgentFile, model: str, *, now: datetime | None = None) -> Path:
    """Set `af.key` to `model`, keeping the rest of the file (comments too, when the key is a plain
    block-style scalar); backup first, then an atomic replace. Returns the backup's path."""
    path = Path(os.path.expanduser(af.path))
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}); not touching it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top; not touching it")
    want = _with_key(data, af.key, model)
    new = _edit_line(text, af.key.split("."), model)
    if new is None or yaml.safe_load(new) != want:
        new = yaml.safe_dump(want, sort_keys=False, allow_unicode=True)  # loses comments, stays right
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S")
    backup = path.with_name(f"{path.name}.bak-{stamp}")
    shutil.copy2(path, backup)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return backup


def _with_key(data: dict, dotted: str, value: Any) -> dict:
    head, _, rest = dotted.partition(".")
    inner = data.get(head)
    new = _with_key(inner if isinstance(inner, dict) else {}, rest, value) if rest else value
    return {**data, head: new}


_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[^\s#:][^:#]*?)\s*:(?P<sp>\s*)(?P<value>[^#]*?)"
                   r"(?P<comment>\s+#.*)?$")


def _edit_line(text: str, path: list[str], value: str) -> str | None:
    """Replace the scalar at `path` in block-style YAML in place; None when that is not simple."""
    lines = text.splitlines(keepends=True)
    stack: list[tuple[int, str]] = []
    for i, raw in enumerate(lines):
        body = raw.rstrip("\r\n")
        if not body.strip() or body.lstrip().startswith(("#", "-")):
            continue
        m = _LINE.match(body)
        if not m:
            continue
        indent, key = len(m["indent"]), m["key"].strip("'\"")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if [k for _, k in stack] == path and m["value"].strip():
            dumped = yaml.safe_dump(value, default_flow_style=True).strip()
            dumped = dumped.removesuffix("...").strip()
            end = raw[len(body):]
            lines[i] = (f"{m['indent']}{m['key']}:{m['sp'] or ' '}{dumped}"
                        f"{m['comment'] or ''}{end}")
            return "".join(lines)
    return None
