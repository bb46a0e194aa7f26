"""Quotas: daily caps per calendar day in the quota's zone, subscription windows, fallback."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from dispatch.config import AgentConfig, _build
from dispatch.errors import ConfigError
from dispatch.ledger import Ledger
from dispatch.quota import (
    QuotaConfig,
    available_agents,
    check_quotas,
    day_start,
    evaluate,
    in_window,
    parse_window,
    remaining,
)
from dispatch.results import ResultRow

NOW = datetime(2024, 6, 3, 14, 30, tzinfo=UTC)  # a Monday, 14:30 UTC


def at(h: int, m: int = 0) -> datetime:
    return NOW.replace(hour=h, minute=m)


@pytest.mark.parametrize(("window", "when", "inside"), [
    ("08:00-20:00", at(8), True),
    ("08:00-20:00", at(19, 59), True),
    ("08:00-20:00", at(20), False),  # the end is exclusive
    ("08:00-20:00", at(7, 59), False),
    ("22:00-06:00", at(23), True),  # wraps midnight
    ("22:00-06:00", at(5, 59), True),
    ("22:00-06:00", at(12), False),
    ("9:30-24:00", at(23, 59), True),
    ("", at(3), True),
])
def test_in_window(window: str, when: datetime, inside: bool) -> None:
    assert in_window(window, when) is inside


def test_parse_window_rejects_nonsense() -> None:
    assert parse_window("08:00-20:00") is not None
    for bad in ("8-20", "25:00-26:00", "08:60-09:00", "24:30-01:00", "morning"):
        with pytest.raises(ValueError):
            parse_window(bad)


def test_evaluate_caps_and_reasons() -> None:
    q = QuotaConfig(daily_tokens=100_000, daily_usd=5.0)
    ok = evaluate(q, 40_000, 1.25, NOW)
    assert (ok.exhausted, ok.reason) == (False, "60,000 tokens and $3.75 left today")
    tok = evaluate(q, 100_000, 0.0, NOW)
    assert (tok.exhausted, tok.reason) == (True, "daily token cap spent (100,000/100,000)")
    usd = evaluate(q, 0, 5.01, NOW)
    assert (usd.exhausted, usd.reason) == (True, "daily cost cap spent ($5.01/$5.00)")
    assert evaluate(QuotaConfig(), 10**9, 10**6, NOW).exhausted is False  # no caps


def test_window_is_read_in_the_quotas_timezone() -> None:
    # 14:30 UTC is 16:30 in Berlin (CEST): inside 08:00-17:00 there, outside 08:00-14:00 UTC
    berlin = QuotaConfig(window="08:00-17:00", timezone="Europe/Berlin")
    assert evaluate(berlin, 0, 0, NOW).exhausted is False
    utc = QuotaConfig(window="08:00-14:00")
    st = evaluate(utc, 0, 0, NOW)
    assert st.exhausted is True
    assert st.reason == "outside its window 08:00-14:00 UTC (now 14:30)"


def test_day_start_follows_the_zone() -> None:
    assert day_start(NOW, UTC) == datetime(2024, 6, 3, tzinfo=UTC)
    tokyo = ZoneInfo("Asia/Tokyo")  # 14:30 UTC is already 23:30 on the 3rd in Tokyo
    assert day_start(at(15, 30), tokyo) == datetime(2024, 6, 4, tzinfo=tokyo)


def spend(led: Ledger, run: str, agent: str, when: datetime, tokens: int, usd: float) -> None:
    led.record_attempt(ResultRow(timestamp=when, run_id=run, repo="o/app", issue=1, agent=agent,
                                 outcome="failed", tokens_in=tokens, cost_usd=usd), "bug")


def test_remaining_counts_only_todays_spending(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as led:
        spend(led, "y1", "claude", NOW - timedelta(days=1), 900_000, 50.0)  # yesterday
        spend(led, "t1", "claude", at(0, 5), 30_000, 1.0)
        spend(led, "t2", "claude", at(9), 20_000, 0.5)
        spend(led, "k1", "kimi", at(9), 99_999, 0.0)
        st = remaining("claude", QuotaConfig(daily_tokens=60_000), led, NOW)
        assert (st.spent_tokens, st.spent_usd, st.exhausted) == (50_000, 1.5, False)
        assert remaining("claude", QuotaConfig(daily_tokens=50_000), led, NOW).exhausted
        # now is 23:30 in Tokyo, whose day began at 15:00 UTC on the 2nd: yesterday's run at
        # 14:30 UTC falls just before it
        tokyo = remaining("claude", QuotaConfig(timezone="Asia/Tokyo"), led, NOW)
        assert tokyo.spent_tokens == 50_000
        assert remaining("nobody", None, led, NOW).exhausted is False


def test_available_agents_route_around_spent_quotas(tmp_path: Path) -> None:
    agents = [AgentConfig(name="claude"), AgentConfig(name="kimi"), AgentConfig(name="local")]
    quotas = {
        "claude": QuotaConfig(daily_usd=2.0),
        "kimi": QuotaConfig(window="00:00-08:00"),
        "local": QuotaConfig(daily_tokens=1_000_000),
    }
    with Ledger(tmp_path / "ledger.sqlite") as led:
        names, why = available_agents(agents, led, quotas, NOW)
        assert (names, why) == (["claude", "local"], {
            "kimi": "outside its window 00:00-08:00 UTC (now 14:30)"})
        spend(led, "c1", "claude", at(10), 1000, 2.5)
        names, why = available_agents(agents, led, quotas, NOW)
        assert names == ["local"]
        assert why["claude"] == "daily cost cap spent ($2.50/$2.00)"
        # the next day claude's cap resets; names work as well as AgentConfig
        names, _ = available_agents(["claude", "kimi"], led, quotas, NOW + timedelta(days=1))
        assert names == ["claude"]


def test_quota_section_builds_and_checks() -> None:
    data = {"claude": {"daily_usd": 20, "window": "08:00-20:00", "timezone": "Europe/Berlin"}}
    quotas = {k: _build(QuotaConfig, v, "cfg.yaml", f"quotas.{k}") for k, v in data.items()}
    assert quotas["claude"] == QuotaConfig(daily_usd=20.0, window="08:00-20:00",
                                           timezone="Europe/Berlin")
    check_quotas(quotas, ["claude"], "cfg.yaml")
    with pytest.raises(ConfigError, match=r"cfg.yaml: quotas.ghost: 'ghost' is not one of agents"):
        check_quotas({"ghost": QuotaConfig()}, ["claude"], "cfg.yaml")
    with pytest.raises(ConfigError, match=r"quotas.claude.window: expected HH:MM-HH:MM"):
        check_quotas({"claude": QuotaConfig(window="9-5")}, ["claude"])
    with pytest.raises(ConfigError, match=r"quotas.claude.timezone: unknown zone 'Mars/Base'"):
        check_quotas({"claude": QuotaConfig(timezone="Mars/Base")}, ["claude"])
    with pytest.raises(ConfigError, match=r"quotas.claude: caps must be"):
        check_quotas({"claude": QuotaConfig(daily_tokens=-1)}, ["claude"])
