"""Per-agent quotas: a daily token cap, a daily money cap and a subscription window.

An agent whose quota is spent, or whose window is closed, is left out of routing for now, so the
work goes to the next agent (e.g. the local model) and the report can say why. "Daily" means the
calendar day in the quota's `timezone`, which is also the clock the window is read on.
Spending is what the ledger has recorded for finished attempts; a run still in progress is not
counted until it ends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, tzinfo
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigError

if TYPE_CHECKING:  # config.py imports this module for QuotaConfig: no runtime import back
    from .config import AgentConfig
    from .ledger import Ledger

_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class QuotaConfig:
    """One entry of the `quotas:` config section, keyed by agent name."""

    daily_tokens: int = 0  # prompt + completion tokens per day; 0 = no cap
    daily_usd: float = 0.0  # USD per day; 0 = no cap
    window: str = ""  # "HH:MM-HH:MM" when the agent may work (may wrap midnight); "" = always
    timezone: str = "UTC"  # UTC, local (this machine's zone) or an IANA name like Europe/Berlin


@dataclass(frozen=True)
class QuotaState:
    spent_tokens: int
    spent_usd: float
    exhausted: bool  # True: route no work to this agent now
    reason: str  # why it is exhausted, or how much is left


def zone(name: str) -> tzinfo | None:
    """The tzinfo for a quota's timezone; None means this machine's local zone."""
    if name.lower() == "local":
        return None
    if name.upper() in ("UTC", "Z"):
        return UTC
    return ZoneInfo(name)


def parse_window(window: str) -> tuple[time, time] | None:
    """("08:00-20:00") -> (08:00, 20:00); "" -> None; ValueError when malformed."""
    if not window.strip():
        return None
    m = _WINDOW.match(window)
    if not m:
        raise ValueError(f"expected HH:MM-HH:MM, got {window!r}")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
        raise ValueError(f"not a time of day in {window!r}")
    end = time(0, 0) if h2 == 24 else time(h2, m2)  # 24:00 = end of day
    return time(h1, m1), end


def in_window(window: str, local: datetime) -> bool:
    """Is `local` (already in the quota's zone) inside the window? End is exclusive."""
    parsed = parse_window(window)
    if parsed is None:
        return True
    start, end = parsed
    t = local.time().replace(tzinfo=None)
    if start < end:
        return start <= t < end
    return t >= start or t < end  # wraps midnight (or start == end: all day)


def day_start(now: datetime, tz: tzinfo | None) -> datetime:
    """Midnight of `now`'s day in `tz` (None: local)."""
    local = now.astimezone(tz)
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


def evaluate(quota: QuotaConfig, spent_tokens: int, spent_usd: float, now: datetime) -> QuotaState:
    """Pure: the agent's state given what it spent today."""
    local = now.astimezone(zone(quota.timezone))

    def state(exhausted: bool, reason: str) -> QuotaState:
        return QuotaState(spent_tokens, round(spent_usd, 6), exhausted, reason)

    if not in_window(quota.window, local):
        return state(True, f"outside its window {quota.window} {quota.timezone} "
                           f"(now {local:%H:%M})")
    if quota.daily_tokens and spent_tokens >= quota.daily_tokens:
        return state(True, f"daily token cap spent ({spent_tokens:,}/{quota.daily_tokens:,})")
    if quota.daily_usd and spent_usd >= quota.daily_usd:
        return state(True, f"daily cost cap spent (${spent_usd:.2f}/${quota.daily_usd:.2f})")
    left = []
    if quota.daily_tokens:
        left.append(f"{quota.daily_tokens - spent_tokens:,} tokens")
    if quota.daily_usd:
        left.append(f"${quota.daily_usd - spent_usd:.2f}")
    return state(False, f"{' and '.join(left)} left today" if left else "no cap")


def remaining(agent: str, quota: QuotaConfig | None, ledger: Ledger, now: datetime) -> QuotaState:
    """The agent's quota state now, from what the ledger recorded since its day began."""
    quota = quota or QuotaConfig()
    since = day_start(now, zone(quota.timezone)).timestamp()
    tokens, usd = ledger.spent(agent, since)
    return evaluate(quota, tokens, usd, now)


def available_agents(
    agents: Iterable[AgentConfig | str],
    ledger: Ledger,
    quotas: Mapping[str, QuotaConfig],
    now: datetime,
) -> tuple[list[str], dict[str, str]]:
    """Agents that may take work now (in the given order), and why each other one may not."""
    available, why = [], {}
    for agent in agents:
        name = agent if isinstance(agent, str) else agent.name
        if name not in quotas:
            available.append(name)
            continue
        st = remaining(name, quotas[name], ledger, now)
        if st.exhausted:
            why[name] = st.reason
        else:
            available.append(name)
    return available, why


def check_quotas(quotas: Mapping[str, QuotaConfig], agent_names: Iterable[str],
                 source: str = "config") -> None:
    """Raise ConfigError naming the key for an unknown agent, window or timezone."""
    names = set(agent_names)
    for agent, q in quotas.items():
        where = f"{source}: quotas.{agent}"
        if agent not in names:
            raise ConfigError(f"{where}: {agent!r} is not one of agents[].name")
        if q.daily_tokens < 0 or q.daily_usd < 0:
            raise ConfigError(f"{where}: caps must be 0 (none) or more")
        try:
            parse_window(q.window)
        except ValueError as e:
            raise ConfigError(f"{where}.window: {e}") from None
        try:
            zone(q.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"{where}.timezone: unknown zone {q.timezone!r}; expected UTC, "
                              "local or an IANA name like Europe/Berlin") from None
