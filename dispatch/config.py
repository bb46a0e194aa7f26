"""The config file: one YAML document, typed by the dataclasses below, validated on load.

Where it is read from, first match wins: ``$DISPATCH_CONFIG``, ``--config PATH``, then
``$XDG_CONFIG_HOME/dispatch/config.yaml`` (``~/.config/dispatch/config.yaml``).
Environment overrides, applied after the file: ``DISPATCH_GITEA_URL``, ``DISPATCH_STATE_DIR``,
``DISPATCH_LLM_BASE_URL``, ``DISPATCH_LLM_MODEL``.
Secrets are referenced (``token_file``, ``token_env``), never stored here and never printed.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .breaker import BreakerConfig
from .errors import ConfigError
from .health import HealthThresholds
from .house import HouseConfig
from .jobs import QueueConfig
from .loop import LoopConfig
from .policy import PolicyConfig, check_policy
from .quota import QuotaConfig, check_quotas
from .telemetry import TelemetrySettings
from .watchdog import WatchdogConfig


@dataclass(frozen=True)
class GiteaConfig:
    url: str = ""  # base URL of the forge; /api/v1 is appended by the client
    token_file: str = ""  # path to a file holding the API token
    token_env: str = ""  # or: name of an environment variable holding it
    timeout: float = 30.0  # seconds to wait for a response (connect timeout is 5 s)
    concurrency: int = 4  # parallel requests when paging through many repos
    retries: int = 4  # attempts after the first on 429, 5xx and connection errors
    backoff: float = 1.0  # seconds before the first retry; doubles each time, capped at 120


@dataclass(frozen=True)
class LLMConfig:
    base_url: str = "http://127.0.0.1:11434/v1"  # any OpenAI-compatible endpoint
    model: str = "qwen3:14b"  # default model; also the strong tier unless strong_model is set
    fast_model: str = ""  # the cheap tier for small issues; empty means use `model`
    strong_model: str = ""  # the strong tier for large or risky issues; empty means `model`
    api_key_env: str = ""  # env var holding the key; local servers need none
    api_key_file: str = ""  # or a file holding it
    timeout: float = 120.0  # seconds per model request
    prices: dict[str, list[float]] = field(default_factory=dict)  # model -> [USD per 1M in, per 1M out]


@dataclass(frozen=True)
class AgentConfig:
    name: str = ""
    strengths: list[str] = field(default_factory=list)  # words matched against labels and text
    max_concurrent: int = 1  # claimed issues this agent may hold at once
    account: str = ""  # its forge login, when it has one (used to count its comments and claims)
    kind: str = "direct"  # direct (the built-in runner), cli or gateway


@dataclass(frozen=True)
class TriageConfig:
    claim_label: str = "dispatch:claimed"
    blocked_labels: list[str] = field(default_factory=lambda: ["blocked"])
    skip_labels: list[str] = field(default_factory=lambda: ["epic", "study"])
    stale_days: float = 14.0  # untouched this long, an issue earns a staleness bonus
    skip_refs: list[str] = field(default_factory=list)  # owner/repo#N never dispatched (report.operator_issue is added)


@dataclass(frozen=True)
class SprintConfig:
    agent: str = ""  # the agent named in claims and results; default: the first configured agent
    backends: list[str] = field(default_factory=lambda: ["gateway", "cli", "direct"])  # tried in order
    gateway_url: str = "http://127.0.0.1:8642"  # agent gateway (OpenAI chat completions)
    probe_timeout: float = 2.0  # seconds to decide a gateway is down
    cli_command: str = ""  # e.g. "hermes chat -q {prompt_file}"; empty = no CLI backend
    max_steps: int = 40  # model turns per sprint
    max_minutes: float = 30.0  # wall clock for the implementation pass
    max_tokens: int = 400_000  # prompt + completion tokens per sprint
    max_cost_usd: float = 0.0  # 0 = unlimited (local models cost nothing)
    strong_labels: list[str] = field(
        default_factory=lambda: ["architecture", "refactor", "security", "design", "performance"]
    )  # issues with these labels, or larger than strong_min_chars, get the strong model
    strong_min_chars: int = 2500
    push_partial: bool = True  # push the commits of a failed run to its branch so nothing is lost
    sandbox: str = "auto"  # model commands in bubblewrap: auto (when installed), bwrap (required), off
    sandbox_network: bool = True  # false cuts the network inside the sandbox too
    git_name: str = "dispatch"
    git_email: str = "dispatch@localhost"


@dataclass(frozen=True)
class CollectorConfig:
    tmux_socket: str = ""  # tmux -L socket name; empty = the default server
    tmux_sessions: list[str] = field(default_factory=list)  # sessions to watch; empty = all
    idle_minutes: float = 10.0  # a pane with no output this long counts as idle
    expected_cron: list[str] = field(default_factory=list)  # substrings each crontab must contain
    processes: list[str] = field(default_factory=list)  # process names that must be running
    pid_files: list[str] = field(default_factory=list)  # pid files whose process must be alive
    window_hours: float = 24.0  # forge activity window for each snapshot


@dataclass(frozen=True)
class ReportConfig:
    operator_issue: str = ""  # owner/repo#N where `report --post` comments; empty: --post refuses
    post_mode: str = "comment"  # comment (one per run on operator_issue) or daily_issue
    since: str = "24h"  # default window
    approvers: list[str] = field(default_factory=list)  # forge logins whose ticked boxes approve (sovereign)


@dataclass(frozen=True)
class Config:
    gitea: GiteaConfig = field(default_factory=GiteaConfig)
    repos: list[str] = field(default_factory=list)  # owner/name
    orgs: list[str] = field(default_factory=list)  # every repo of each org
    llm: LLMConfig = field(default_factory=LLMConfig)
    agents: list[AgentConfig] = field(default_factory=list)
    triage: TriageConfig = field(default_factory=TriageConfig)
    sprint: SprintConfig = field(default_factory=SprintConfig)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    health: HealthThresholds = field(default_factory=HealthThresholds)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    breakers: BreakerConfig = field(default_factory=BreakerConfig)
    quotas: dict[str, QuotaConfig] = field(default_factory=dict)  # agent name -> daily caps
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    house: HouseConfig = field(default_factory=HouseConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    state_dir: str = "~/.local/state/dispatch"
    source: str = ""  # the file this was read from (set by the loader)

    @property
    def state_path(self) -> Path:
        return Path(os.path.expanduser(self.state_dir))

    def gitea_token(self, env: Mapping[str, str] | None = None) -> str:
        """Read the forge token from its file or env var; never logged, never stored here."""
        return read_secret(
            self.gitea.token_file, self.gitea.token_env, "gitea", self.source, env, required=True
        )

    def llm_api_key(self, env: Mapping[str, str] | None = None) -> str:
        """The model key, or '' when none is configured (local servers need none)."""
        return read_secret(
            self.llm.api_key_file, self.llm.api_key_env, "llm", self.source, env, required=False,
            file_key="api_key_file", env_key="api_key_env",
        )


ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "DISPATCH_GITEA_URL": ("gitea", "url"),
    "DISPATCH_STATE_DIR": ("state_dir",),
    "DISPATCH_LLM_BASE_URL": ("llm", "base_url"),
    "DISPATCH_LLM_MODEL": ("llm", "model"),
}


def read_secret(
    path: str,
    env_name: str,
    section: str,
    source: str,
    env: Mapping[str, str] | None,
    *,
    required: bool,
    file_key: str = "token_file",
    env_key: str = "token_env",
) -> str:
    env = os.environ if env is None else env
    if path:
        p = Path(os.path.expanduser(path))
        try:
            value = p.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(
                f"{source or 'config'}: {section}.{file_key}: cannot read {p} ({e.strerror}); "
                "expected a readable file holding the token"
            ) from None
        if not value:
            raise ConfigError(f"{source or 'config'}: {section}.{file_key}: {p} is empty")
        return value
    if env_name:
        value = env.get(env_name, "").strip()
        if value or not required:
            return value
        raise ConfigError(
            f"{source or 'config'}: {section}.{env_key}: environment variable {env_name} is not set"
        )
    if required:
        raise ConfigError(
            f"{source or 'config'}: {section}: set {file_key} (a file) or {env_key} (an env var name)"
        )
    return ""


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME", "~"), ".config")
    return Path(os.path.expanduser(base)) / "dispatch" / "config.yaml"


def config_path(cli_path: str | None, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("DISPATCH_CONFIG"):
        return Path(os.path.expanduser(env["DISPATCH_CONFIG"]))
    if cli_path:
        return Path(os.path.expanduser(cli_path))
    return default_config_path(env)


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, and validate; errors name the file and the key."""
    env = os.environ if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no config file; run `dispatch init` to write a starter one, "
            "or point DISPATCH_CONFIG / --config at yours"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    return config_from_dict(data, source=str(path), env=env)


def config_from_dict(
    data: Any, *, source: str = "config", env: Mapping[str, str] | None = None
) -> Config:
    env = os.environ if env is None else env
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top, got {_kind(data)}")
    data = dict(data)
    for var, (section, *key) in ENV_OVERRIDES.items():
        if not env.get(var):
            continue
        if not key:
            data[section] = env[var]
        elif isinstance(data.get(section) or {}, dict):
            data[section] = {**(data.get(section) or {}), key[0]: env[var]}
    data.pop("source", None)
    cfg = _build(Config, data, source, "")
    cfg = dataclasses.replace(cfg, source=source)
    _validate(cfg)
    op = cfg.report.operator_issue.strip()
    if op and op not in cfg.triage.skip_refs:
        # the operator's inbox holds reports and approvals, not work for an agent
        cfg = dataclasses.replace(cfg, triage=dataclasses.replace(
            cfg.triage, skip_refs=[*cfg.triage.skip_refs, op]))
    return cfg


def _validate(cfg: Config) -> None:
    src = cfg.source
    if not cfg.gitea.url:
        raise ConfigError(f"{src}: gitea.url: missing; expected the forge's base URL, e.g. http://127.0.0.1:3000")
    if not cfg.gitea.url.startswith(("http://", "https://")):
        raise ConfigError(f"{src}: gitea.url: expected an http:// or https:// URL, got {cfg.gitea.url!r}")
    if "@" in cfg.gitea.url.split("//", 1)[1].split("/", 1)[0]:
        raise ConfigError(f"{src}: gitea.url: credentials do not belong in the URL; use gitea.token_file")
    for r in cfg.repos:
        if r.count("/") != 1 or not all(r.split("/")):
            raise ConfigError(f"{src}: repos: expected owner/name, got {r!r}")
    names = [a.name for a in cfg.agents]
    for i, a in enumerate(cfg.agents):
        if not a.name:
            raise ConfigError(f"{src}: agents[{i}].name: missing")
        if a.max_concurrent < 0:
            raise ConfigError(f"{src}: agents[{i}].max_concurrent: expected 0 or more")
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{src}: agents: duplicate name {sorted(dupes)[0]!r}")
    for b in cfg.sprint.backends:
        if b not in ("gateway", "cli", "direct"):
            raise ConfigError(f"{src}: sprint.backends: unknown backend {b!r}; expected gateway, cli or direct")
    if cfg.sprint.agent and cfg.sprint.agent not in names:
        raise ConfigError(f"{src}: sprint.agent: {cfg.sprint.agent!r} is not one of agents[].name")
    # numbers whose wrong sign or zero would crash or spin a cron run later, not here
    minimums = {
        "gitea.timeout": (cfg.gitea.timeout, 0.0, False), "gitea.concurrency": (cfg.gitea.concurrency, 1, True),
        "gitea.retries": (cfg.gitea.retries, 0, True), "gitea.backoff": (cfg.gitea.backoff, 0.0, True),
        "sprint.max_steps": (cfg.sprint.max_steps, 1, True), "sprint.max_minutes": (cfg.sprint.max_minutes, 0.0, False),
        "telemetry.keep": (cfg.telemetry.keep, 1, True), "telemetry.max_bytes": (cfg.telemetry.max_bytes, 0, False),
        "loop.cooldown_s": (cfg.loop.cooldown_s, 0.0, True), "loop.idle_sleep_s": (cfg.loop.idle_sleep_s, 0.0, False),
        "loop.max_failures": (cfg.loop.max_failures, 1, True), "loop.skip_hours": (cfg.loop.skip_hours, 0.0, True),
        "health.window_hours": (cfg.health.window_hours, 0.0, False),
        "watchdog.stuck_minutes": (cfg.watchdog.stuck_minutes, 0.0, False),
    }
    for key, (value, low, inclusive) in minimums.items():
        if value < low or (value == low and not inclusive):
            bound = f"at least {low}" if inclusive else f"more than {low}"
            raise ConfigError(f"{src}: {key}: expected {bound}, got {value}")
    check_policy(cfg.policy, src)
    check_quotas(cfg.quotas, names, src)
    if cfg.sprint.sandbox not in ("auto", "bwrap", "off"):
        raise ConfigError(f"{src}: sprint.sandbox: expected auto, bwrap or off, got {cfg.sprint.sandbox!r}")
    if cfg.report.post_mode not in ("comment", "daily_issue"):
        raise ConfigError(f"{src}: report.post_mode: expected comment or daily_issue")
    for model, price in cfg.llm.prices.items():
        if len(price) != 2:
            raise ConfigError(f"{src}: llm.prices.{model}: expected [input, output] USD per 1M tokens")


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false",
            int: "a number", float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    """Build dataclass `cls` from YAML data, rejecting unknown keys and wrong types."""
    where = prefix or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields - {"source"}))
            raise ConfigError(f"{source}: {key_path}: unknown key; expected one of: {known}")
        kwargs[key] = _coerce(hints[key], value, source, key_path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, source: str, key_path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, source, key_path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key_path)
    if origin is list:
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key_path}: expected a list, got {_kind(value)}")
        return [_coerce(args[0], v, source, f"{key_path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key_path}: expected a mapping, got {_kind(value)}")
        return {str(k): _coerce(args[1], v, source, f"{key_path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key_path}: expected true or false, got {_kind(value)}")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key_path}: expected a number, got {_kind(value)}")
        if tp is int and not float(value).is_integer():
            raise ConfigError(f"{source}: {key_path}: expected a whole number, got {value}")
        return tp(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{source}: {key_path}: expected a string, got {_kind(value)}")
        return str(value)
    return value


STARTER = """\
# dispatch config. Every key is optional except gitea.url and a token reference.
# Docs: README.md. Secrets are referenced here, never written here.
gitea:
  url: http://127.0.0.1:3000            # base URL; /api/v1 is appended
  token_file: ~/.config/dispatch/gitea-token   # a file holding the token (chmod 600)
  # token_env: GITEA_TOKEN              # or the name of an env var holding it
  # timeout: 30                         # seconds per request
  # concurrency: 4                      # parallel requests when paging
repos: []                               # [owner/repo, ...]
orgs: []                                # every repo of these orgs
llm:
  base_url: http://127.0.0.1:11434/v1   # any OpenAI-compatible endpoint
  model: qwen3:14b
  # fast_model: qwen3:8b                # cheap tier for small issues
  # api_key_env: OPENAI_API_KEY         # local servers need no key
agents:
  - name: claude
    strengths: [architecture, refactor, review]
    max_concurrent: 2
  - name: kimi
    strengths: [implementation, tests, routine]
state_dir: ~/.local/state/dispatch
"""
