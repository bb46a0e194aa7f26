"""The backlog as the forge has it: which repos, their open issues and open pull requests.

The thin, impure shell around `triage`: fetch here, decide there, apply routing here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Config
from .forge import ForgeClient, Issue, PullRequest


@dataclass(frozen=True)
class Backlog:
    repos: tuple[str, ...]
    issues: tuple[Issue, ...]
    pulls: dict[str, tuple[PullRequest, ...]] = field(default_factory=dict)

    @property
    def open_pulls(self) -> list[PullRequest]:
        return [p for prs in self.pulls.values() for p in prs]


def resolve_repos(client: ForgeClient, cfg: Config, explicit: list[str] | None = None) -> list[str]:
    """The repos named on the command line, else the config's repos plus every repo of its orgs."""
    if explicit:
        return list(dict.fromkeys(explicit))
    repos = list(cfg.repos)
    for org_repos in client.map(client.org_repos, cfg.orgs):
        repos += [r.full_name for r in org_repos if not r.archived and r.has_issues]
    return list(dict.fromkeys(repos))


def fetch(client: ForgeClient, repos: list[str]) -> Backlog:
    """Open issues and open PRs of every repo, all pages, in one parallel sweep."""
    queries = [client.issues_query(r) for r in repos] + [client.pulls_query(r) for r in repos]
    pages = client.paginate_many(queries)
    issues: list[Issue] = []
    pulls: dict[str, tuple[PullRequest, ...]] = {}
    for repo, items in zip(repos, pages[: len(repos)], strict=True):
        # type=issues already excludes PRs on Gitea; keep them anyway so triage can say why
        issues += [Issue.from_api(repo, d) for d in items]
    for repo, items in zip(repos, pages[len(repos) :], strict=True):
        pulls[repo] = tuple(PullRequest.from_api(repo, d) for d in items)
    issues.sort(key=lambda i: (i.repo, i.number))
    return Backlog(tuple(repos), tuple(issues), pulls)


ROUTE_MARK = "<!-- dispatch:route"


@dataclass(frozen=True)
class RouteAction:
    issue: Issue
    agent: str
    labelled: bool  # this run added the label
    commented: bool  # this run posted the routing comment
    note: str = ""


def apply_routes(client: ForgeClient, ranked: list, agent_names: list[str]) -> list[RouteAction]:
    """Label each routed issue `<agent>-ready` and post one routing comment; idempotent.

    The comment goes first and carries a marker, the label second: a run that dies between the
    two leaves no label, so the next run looks for the marker instead of commenting again.
    """
    from .triage import ready_label

    ready = {ready_label(a): a for a in agent_names}
    labels: dict[tuple[str, str], int] = {}
    actions = []
    for item in ranked:
        issue, agent = item.issue, item.route.agent
        if agent is None:
            continue
        already = [ready[lb] for lb in issue.labels if lb in ready]
        if already:
            actions.append(RouteAction(issue, already[0], False, False, f"already routed to {already[0]}"))
            continue
        commented = False
        if not any(ROUTE_MARK in c.body for c in client.list_comments(issue.repo, issue.number)):
            client.create_comment(issue.repo, issue.number, route_comment(item))
            commented = True
        key = (issue.repo, ready_label(agent))
        if key not in labels:
            labels[key] = client.ensure_label(issue.repo, key[1]).id
        client.add_labels(issue.repo, issue.number, [labels[key]])
        actions.append(RouteAction(issue, agent, True, commented))
    return actions


def route_comment(item) -> str:
    lines = [
        f"{ROUTE_MARK} agent={item.route.agent} -->",
        f"Routed to **{item.route.agent}** by dispatch (score {item.score.value:g}).",
        "",
        "Why this issue now:",
        *[f"- {r}" for r in item.score.reasons],
        "",
        "Why this agent:",
        *[f"- {r}" for r in item.route.reasons],
    ]
    return "\n".join(lines)
