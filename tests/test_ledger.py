"""The outcome ledger: attempts from results.csv, PR outcomes from the forge, cost and success."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dispatch.forge import ForgeClient, Issue
from dispatch.ledger import CostRow, Ledger, Rate, issue_kind
from dispatch.results import ResultRow, append_result

T0 = datetime(2024, 5, 1, 6, 0, tzinfo=UTC)


def row(run: str, **kw) -> ResultRow:
    base = dict(timestamp=T0, run_id=run, repo="o/app", issue=1, agent="kimi", backend="direct",
                model="qwen3:14b", outcome="success", duration_s=600.0, tokens_in=1000,
                tokens_out=500, cost_usd=0.5, pr_url="")
    return ResultRow(**{**base, **kw})


@pytest.mark.parametrize(("labels", "title", "kind"), [
    (["bug"], "anything", "bug"),
    (["type: Bug", "tests"], "", "bug"),  # bug outranks tests
    (["kind/enhancement"], "", "feature"),
    (["documentation"], "", "docs"),
    (["testing"], "", "tests"),
    (["refactoring"], "", "refactor"),
    (["tech-debt"], "", "refactor"),
    (["p1"], "fix: crash on empty config", "bug"),
    (["p1"], "docs(readme): explain cron", "docs"),
    ([], "[test] cover the parser", "tests"),
    ([], "feat!: new report", "feature"),
    ([], "Add tests for the loader", "tests"),
    ([], "Improve the dashboard", "other"),
    (["priority/high"], "", "other"),
])
def test_issue_kind(labels: list[str], title: str, kind: str) -> None:
    assert issue_kind(labels, title) == kind


def test_import_results_is_idempotent_and_keeps_only_attempts(tmp_path: Path) -> None:
    csv = tmp_path / "results.csv"
    append_result(csv, row("r1", pr_url="http://f/o/app/pulls/5"))
    append_result(csv, row("r2", outcome="failed", issue=2, cost_usd=2.0))
    append_result(csv, row("r3", outcome="nothing_to_do", repo="", issue=None))
    append_result(csv, row("r4", outcome="skipped", issue=3))
    kinds = {("o/app", 1): "bug", ("o/app", 2): "docs"}
    with Ledger(tmp_path / "ledger.sqlite") as led:
        assert led.import_results(csv, lambda repo, n: kinds[(repo, n)]) == 2
        assert led.import_results(csv, lambda repo, n: kinds[(repo, n)]) == 0
        append_result(csv, row("r5", outcome="partial", issue=2))
        assert led.import_results(csv) == 1
        chain = led.chain("o/app", 1)
        assert [(a["run_id"], a["kind"], a["tokens"], a["pr"], a["pr_state"]) for a in chain] == [
            ("r1", "bug", 1500, 5, "open")]
        assert chain[0]["ended"] - chain[0]["started"] == 600.0
        assert [a["kind"] for a in led.chain("o/app", 2)] == ["docs", "other"]
        led.set_kinds([Issue(repo="o/app", number=2, title="x", labels=("bug",))])
        assert [a["kind"] for a in led.chain("o/app", 2)] == ["bug", "bug"]
        with pytest.raises(ValueError, match="kind"):
            led.record_attempt(row("r9"), "chore")


def test_update_pr_keeps_fields_it_is_not_given(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite", clock=lambda: 100.0) as led:
        led.update_pr("o/app", 5, url="http://f/o/app/pulls/5", issue=1, title="Fix it")
        led.update_pr("o/app", 5, state="merged", ci_status="success", merged_at=90.0)
        pr = led.pr("o/app", 5)
        assert pr is not None
        assert (pr["url"], pr["issue"], pr["title"], pr["state"], pr["ci_status"], pr["merged_at"]) \
            == ("http://f/o/app/pulls/5", 1, "Fix it", "merged", "success", 90.0)
        with pytest.raises(ValueError, match="state"):
            led.update_pr("o/app", 5, state="gone")


def seeded(tmp_path: Path) -> Ledger:
    """Three agents' attempts; PR outcomes: merged, reverted, closed, merged, open."""
    led = Ledger(tmp_path / "l.sqlite", clock=lambda: (T0 + timedelta(days=1)).timestamp())
    plan = [  # run, agent, repo, kind, cost, pr number (0: no PR), final state, age (d), secs
        ("a1", "claude", "o/app", "feature", 3.0, 1, "merged", 0, 300),
        ("a2", "claude", "o/app", "feature", 1.0, 2, "reverted", 0, 400),
        ("a3", "kimi", "o/app", "bug", 0.4, 3, "closed", 0, 400),
        ("a4", "kimi", "o/app", "bug", 0.6, 4, "merged", 0, 500),
        ("a5", "kimi", "o/lib", "bug", 1.0, 0, None, 0, 450),  # failed, no PR
        ("a6", "local", "o/lib", "docs", 0.0, 6, "open", 0, 700),
        ("a7", "kimi", "o/lib", "bug", 5.0, 7, "merged", 40, 900),  # outside a 30-day window
    ]
    for run, agent, repo, kind, cost, pr, state, age, secs in plan:
        url = f"http://f/{repo}/pulls/{pr}" if pr else ""
        led.record_attempt(row(run, agent=agent, repo=repo, cost_usd=cost, pr_url=url,
                               outcome="success" if pr else "failed",
                               timestamp=T0 - timedelta(days=age),
                               duration_s=float(secs)), kind)
        if pr and state != "open":
            led.update_pr(repo, pr, state=state)
    return led


def test_cost_per_merged_pr_counts_every_attempts_cost(tmp_path: Path) -> None:
    with seeded(tmp_path) as led:
        assert led.cost_per_merged_pr("agent") == {
            "claude": CostRow(2, 1, 4.0, 4.0),  # the reverted PR's cost counts, its merge not
            "kimi": CostRow(4, 2, 7.0, 3.5),
            "local": CostRow(1, 0, 0.0, None),
        }
        assert led.cost_per_merged_pr("repo") == {
            "o/app": CostRow(4, 2, 5.0, 2.5), "o/lib": CostRow(3, 1, 6.0, 6.0)}
        by_kind = led.cost_per_merged_pr("kind", since=(T0 - timedelta(days=1)).timestamp())
        assert by_kind["bug"] == CostRow(3, 1, 2.0, 2.0)
        with pytest.raises(ValueError):
            led.cost_per_merged_pr("model; DROP TABLE attempts")


def test_success_rates_by_agent_and_kind_in_a_window(tmp_path: Path) -> None:
    with seeded(tmp_path) as led:
        rates = led.success_rates(30)
        assert rates[("claude", "feature")] == Rate(2, 1, 0.5, 350.0)
        assert rates[("kimi", "bug")] == Rate(3, 1, 0.3333, 450.0)  # a7 is 40 days old
        assert rates[("local", "docs")] == Rate(1, 0, 0.0, 700.0)
        assert led.success_rates(60)[("kimi", "bug")].attempts == 4


def test_spent_sums_an_agents_attempts_since_a_time(tmp_path: Path) -> None:
    with seeded(tmp_path) as led:
        assert led.spent("kimi", (T0 - timedelta(days=1)).timestamp()) == (4500, 2.0)
        assert led.spent("nobody", 0) == (0, 0.0)


def test_sync_prs_follows_prs_to_merged_closed_and_reverted(tmp_path: Path, gitea, canary: str) -> None:
    repo = "o/app"
    gitea.add_repo(repo, git=True)  # real branches, so head shas and statuses line up
    merged = gitea.add_pull(repo, "Fix parser", head="dispatch/1-fix-parser")
    reverted = gitea.add_pull(repo, "Add cache", head="dispatch/2-add-cache")
    closed = gitea.add_pull(repo, "Try thing", head="dispatch/3-try", state="closed")
    still_open = gitea.add_pull(repo, "Docs", head="dispatch/4-docs")
    unrelated = gitea.add_pull(repo, "Human work", head="feature-x")
    gitea.add_status(repo, "dispatch/1-fix-parser", "success")
    gitea.add_status(repo, "dispatch/4-docs", "failure")
    client = ForgeClient(gitea.url, canary, retries=0)
    for n in (merged, reverted):
        client.request("POST", f"/repos/{repo}/pulls/{n}/merge", json={"do": "merge"})
    revert = gitea.add_pull(repo, 'Revert "Add cache"', body=f"This reverts #{reverted}.",
                            head="revert-cache")
    client.request("POST", f"/repos/{repo}/pulls/{revert}/merge", json={"do": "merge"})

    with Ledger(tmp_path / "l.sqlite") as led:
        led.record_attempt(row("r1", issue=1, pr_url=f"{gitea.url}/{repo}/pulls/{merged}"), "bug")
        assert led.sync_prs(client, [repo]) == 4
        states = {n: (led.pr(repo, n) or {}).get("state") for n in
                  (merged, reverted, closed, still_open, unrelated, revert)}
        assert states == {merged: "merged", reverted: "reverted", closed: "closed",
                          still_open: "open", unrelated: None, revert: None}
        assert led.pr(repo, merged)["ci_status"] == "success"  # type: ignore[index]
        assert led.pr(repo, still_open)["ci_status"] == "failure"  # type: ignore[index]
        assert led.pr(repo, still_open)["issue"] == 4  # type: ignore[index]
        assert led.pr(repo, merged)["merged_at"] is not None  # type: ignore[index]
        assert led.chain(repo, 1)[0]["pr_state"] == "merged"
        assert led.success_rates(3650, now=T0.timestamp() + 1)[("kimi", "bug")] == Rate(1, 1, 1.0, 600.0)

        # a second sync asks CI again only for what may still change (the open PR)
        before = gitea.count("GET", f"/api/v1/repos/{repo}/commits/")
        led.sync_prs(client, [repo])
        assert gitea.count("GET", f"/api/v1/repos/{repo}/commits/") - before == 1
