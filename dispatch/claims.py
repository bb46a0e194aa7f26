"""Claims on the forge: who is working an issue, agreed through comments every host can read.

A claim is a comment carrying a marker with the run id; the first claim after the last
release wins, so two hosts that claim at once both see the same winner after re-reading. Only
the winner adds the claim label, which is what triage skips on.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from .errors import DispatchError
from .forge import Comment, ForgeClient

CLAIM_RE = re.compile(r"<!-- dispatch:claim run=(\S+) agent=(\S*) -->")
RELEASE_RE = re.compile(r"<!-- dispatch:release run=(\S+) -->")


@dataclass(frozen=True)
class Claim:
    run_id: str
    agent: str
    comment_id: int


def active_claim(comments: list[Comment]) -> Claim | None:
    """The claim in force: replay the comments in order; a claim made while another is in
    force lost the race and never counts, a release ends the claim it names."""
    current: Claim | None = None
    for c in sorted(comments, key=lambda c: c.id):
        if (m := RELEASE_RE.search(c.body)) and current and m.group(1) == current.run_id:
            current = None
        elif (m := CLAIM_RE.search(c.body)) and current is None:
            current = Claim(m.group(1), m.group(2), c.id)
    return current


def claim(client: ForgeClient, repo: str, number: int, *, run_id: str, agent: str,
          label: str) -> Claim | None:
    """Try to claim; returns the winning claim (ours or another's), or None if it vanished."""
    body = (f"<!-- dispatch:claim run={run_id} agent={agent} -->\n"
            f"Claimed by dispatch run `{run_id}` (agent {agent or '-'}, host {socket.gethostname()}).")
    client.create_comment(repo, number, body)
    try:
        winner = active_claim(client.list_comments(repo, number))
        if winner and winner.run_id == run_id:
            client.add_labels(repo, number, [client.ensure_label(repo, label, "#d93f0b").id])
        elif winner is None:
            raise DispatchError("our claim comment is not visible yet")
    except DispatchError as e:
        # the comment is out there and may count later: withdraw it, or it blocks the issue for good
        try:
            release(client, repo, number, run_id=run_id, label=label,
                    note=f"dispatch run `{run_id}` withdrew its claim ({e}).")
        except DispatchError:
            pass  # the forge is failing; the watchdog releases claims that stay quiet
        raise
    return winner


def release(client: ForgeClient, repo: str, number: int, *, run_id: str, label: str,
            note: str) -> None:
    """Drop our claim: a release marker (with what happened) and the label removed."""
    client.create_comment(repo, number, f"<!-- dispatch:release run={run_id} -->\n{note}")
    current = active_claim(client.list_comments(repo, number))
    if current is not None and current.run_id != run_id:
        return  # a newer claim is in force (a re-route): its label is not ours to take off
    # every label of that name: two hosts claiming a repo's first issue at once can each create
    # one, and a claim label left behind would keep the issue out of triage for good
    for lb in client.list_labels(repo):
        if lb.name == label:
            client.remove_label(repo, number, lb.id)
