"""`dispatch doctor`: is this machine ready to run the fleet? Each check says pass or fail and why."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import DispatchError


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def run_checks(
    config_file: Path,
    env: Mapping[str, str],
    *,
    which: Callable[[str], str | None] = shutil.which,
    session=None,
) -> list[Check]:
    """Every check, in order; a failed config stops the ones that need it."""
    from .config import load_config

    checks: list[Check] = []
    try:
        cfg = load_config(config_file, env)
        checks.append(Check("config", True, str(config_file)))
    except DispatchError as e:
        return [Check("config", False, str(e)), *_tool_checks(which)]

    try:
        token = cfg.gitea_token(env)
        checks.append(Check("gitea token", True, _where(cfg.gitea.token_file, cfg.gitea.token_env)))
    except DispatchError as e:
        token = ""
        checks.append(Check("gitea token", False, str(e)))

    if token:
        from .forge import ForgeClient

        client = ForgeClient(cfg.gitea.url, token, session=session, retries=0, timeout=10)
        try:
            login = client.current_user()
            checks.append(Check("gitea auth", True, f"{client.api}/user as {login}"))
        except DispatchError as e:
            checks.append(Check("gitea auth", False, str(e)))

    checks.append(_model_check(cfg, env, session))
    return checks + _tool_checks(which)


def _where(path: str, env_name: str) -> str:
    return f"file {path}" if path else f"env ${env_name}"


def _model_check(cfg, env: Mapping[str, str], session) -> Check:
    import requests

    url = cfg.llm.base_url.rstrip("/") + "/models"
    try:
        key = cfg.llm_api_key(env)
    except DispatchError as e:
        return Check("model endpoint", False, str(e))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = (session or requests).get(url, headers=headers, timeout=(3, 10))
    except requests.RequestException as e:
        return Check("model endpoint", False, f"cannot reach GET {url}: {type(e).__name__}")
    if not resp.ok:
        return Check("model endpoint", False, f"{resp.status_code} for GET {url}")
    try:
        ids = [m.get("id", "") for m in resp.json().get("data", [])]
    except (ValueError, AttributeError):
        return Check("model endpoint", False, f"GET {url} did not answer an OpenAI model list")
    wanted = cfg.llm.model
    if ids and wanted not in ids:
        return Check("model endpoint", False, f"{url} does not serve {wanted!r} (has: {', '.join(ids[:5])})")
    return Check("model endpoint", True, f"{url} serves {wanted}")


def _tool_checks(which: Callable[[str], str | None]) -> list[Check]:
    out = []
    for tool, required, why in (("git", True, "clones and pushes"), ("tmux", False, "worker loops")):
        path = which(tool)
        if not path:
            out.append(Check(tool, False, f"not on PATH (needed for {why})", required))
            continue
        version = subprocess.run([path, "-V" if tool == "tmux" else "--version"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        out.append(Check(tool, True, version or path, required))
    return out
