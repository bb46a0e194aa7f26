"""The action journal: once per key, across runs, racing processes and crashes."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dispatch.errors import ForgeError
from dispatch.forge import ForgeClient
from dispatch.journal import Journal, marked_keys, marker
from dispatch.policy import Action, action_key

ROOT = Path(__file__).resolve().parent.parent


def act(n: int = 1, kind: str = "nudge") -> Action:
    target = f"o/app#{n}"
    return Action(kind, target, "quiet for 45 min", action_key(kind, target, "run-1"))


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_confirmed_key_is_never_begun_again(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    with Journal(path) as j:
        assert j.begin(act()) is True
        j.confirm(act().key, "http://forge/o/app/issues/1#issuecomment-7")
        assert j.begin(act()) is False
    with Journal(path) as j:  # the next cron run
        assert j.begin(act()) is False
        e = j.get(act().key)
        assert e is not None
        assert (e.status, e.result, e.attempts) == ("done", "http://forge/o/app/issues/1#issuecomment-7", 1)
        assert (e.kind, e.target, e.reason) == ("nudge", "o/app#1", "quiet for 45 min")
        assert j.begin(act(2)) is True  # another key is independent


def test_a_failed_key_is_retried_and_its_attempts_counted(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.sqlite") as j:
        assert j.begin(act())
        j.fail(act().key, "ForgeError: 502")
        assert j.get(act().key).status == "failed"  # type: ignore[union-attr]
        assert j.begin(act())
        e = j.get(act().key)
        assert (e.status, e.error, e.attempts) == ("pending", "", 2)  # type: ignore[union-attr]
        with pytest.raises(KeyError, match="begin"):
            j.confirm("nudge:o/app#99:x")


def test_once_runs_the_work_once_and_records_a_failure(tmp_path: Path) -> None:
    posted: list[str] = []
    path = tmp_path / "j.sqlite"
    for _ in range(3):  # three runs
        with Journal(path) as j, j.once(act()) as step:
            if step.run:
                posted.append("nudge")
                step.result = "comment 1"
    assert posted == ["nudge"]
    with Journal(path) as j:
        assert j.get(act().key).result == "comment 1"  # type: ignore[union-attr]
        with pytest.raises(RuntimeError), j.once(act(2)) as step:
            assert step.run and not step.done
            raise RuntimeError("forge said no")
        assert j.get(act(2).key).status == "failed"  # type: ignore[union-attr]
        assert "RuntimeError: forge said no" in j.get(act(2).key).error  # type: ignore[union-attr]
        with j.once(act(2)) as step:
            assert step.run  # a failed action is tried again


def test_once_leaves_an_unknown_outcome_pending_for_the_forge_check(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.sqlite") as j:
        with pytest.raises(ForgeError), j.once(act()) as step:
            assert step.run
            raise ForgeError("POST", "http://f/api/v1/repos/o/app/issues/1/comments", None,
                             "timed out")  # the comment may have been posted
        assert j.get(act().key).status == "pending"  # type: ignore[union-attr]
        assert [e.key for e in j.pending()] == [act().key]
        with pytest.raises(ForgeError), j.once(act(2)) as step:
            raise ForgeError("POST", "http://f/api/v1/repos/o/app/issues/2/comments", 422, "no")
        assert j.get(act(2).key).status == "failed"  # type: ignore[union-attr]


def test_database_is_wal_with_a_busy_timeout(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.sqlite") as j:
        assert j.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert j.db.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000


def _race(path: str, keys: int, barrier, out) -> None:
    j = Journal(Path(path))
    barrier.wait()
    won = [k for k in range(keys) if j.begin(act(k))]
    j.close()
    out.put(won)


def test_two_processes_beginning_the_same_keys_win_each_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    Journal(path).close()  # create the schema first, as a real install would have
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(path), 150, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    wins = [out.get(timeout=20), out.get(timeout=20)]
    for p in procs:
        p.join(20)
        assert p.exitcode == 0
    assert sorted(wins[0] + wins[1]) == list(range(150))  # every key won, none twice
    with Journal(path) as j:
        assert len(j.pending()) == 150


def test_reclaim_lets_only_one_run_take_over_a_pending_key(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "j.sqlite"
    with Journal(path, clock=clock) as crashed:
        crashed.begin(act())
    clock.t += 600
    a, b = Journal(path, clock=clock, owner="a"), Journal(path, clock=clock, owner="b")
    seen_a, seen_b = a.pending(older_than_s=300), b.pending(older_than_s=300)
    assert [e.key for e in seen_a] == [act().key]
    clock.t += 1
    assert a.reclaim(seen_a[0]) is True
    assert b.reclaim(seen_b[0]) is False  # it saw the entry before a took it over
    e = a.get(act().key)
    assert (e.owner, e.attempts, e.status) == ("a", 2, "pending")  # type: ignore[union-attr]
    a.close()
    b.close()


def test_pending_skips_entries_a_live_run_is_still_working_on(tmp_path: Path) -> None:
    clock = Clock()
    with Journal(tmp_path / "j.sqlite", clock=clock) as j:
        j.begin(act(1))
        clock.t += 100
        j.begin(act(2))
        assert [e.target for e in j.pending(older_than_s=50)] == ["o/app#1"]
        assert [e.target for e in j.pending()] == ["o/app#1", "o/app#2"]
        assert [e.target for e in j.entries(since=clock.t)] == ["o/app#2"]


def test_markers_round_trip_and_unsafe_keys_are_refused(tmp_path: Path) -> None:
    key = act().key
    body = f"{marker(key)}\nStill working on this? No activity for 45 minutes."
    assert marked_keys(["unrelated", body]) == {key}
    for bad in ("", "a b", "x-->y"):
        with pytest.raises(ValueError):
            marker(bad)
    with Journal(tmp_path / "j.sqlite") as j, pytest.raises(ValueError):
        j.begin(Action("nudge", "o/app#1", "r", "has space"))


CRASHING_RUN = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from dispatch.forge import ForgeClient
    from dispatch.journal import Journal, marker
    from dispatch.policy import Action
    url, journal_path, key = sys.argv[1:4]
    j = Journal(Path(journal_path))
    a = Action("nudge", "o/app#1", "quiet", key)
    assert j.begin(a)
    ForgeClient(url, os.environ["FORGE_TOKEN"]).create_comment(
        "o/app", 1, marker(key) + "\\nAre you still on this?")
    os._exit(9)  # killed between the forge call and confirm()
""")


def test_a_crash_after_posting_is_confirmed_from_the_forge_not_posted_again(
    tmp_path: Path, gitea, canary: str
) -> None:
    gitea.add_repo("o/app")
    gitea.add_issue("o/app", "stuck issue")
    path = tmp_path / "journal.sqlite"
    key = act().key
    env = {**os.environ, "FORGE_TOKEN": canary, "PYTHONPATH": str(ROOT)}  # token via env, not argv
    proc = subprocess.run([sys.executable, "-c", CRASHING_RUN, gitea.url, str(path), key],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 9, proc.stderr

    client = ForgeClient(gitea.url, canary, retries=0)
    with Journal(path) as j:
        assert j.begin(act()) is False  # not blindly redone
        # recovery, as the cycle does it: look for the marker on the forge
        for entry in j.pending():
            number = int(entry.target.rsplit("#", 1)[1])
            comments = client.list_comments("o/app", number)
            if entry.key in marked_keys(c.body for c in comments):
                j.confirm(entry.key, "found on the forge after a crash")
            elif j.reclaim(entry):
                client.create_comment("o/app", number, marker(entry.key) + "\nretry")
                j.confirm(entry.key)
        assert j.pending() == []
        assert j.get(key).result == "found on the forge after a crash"  # type: ignore[union-attr]
    bodies = [c.body for c in client.list_comments("o/app", 1)]
    assert len(bodies) == 1 and marker(key) in bodies[0]


def test_a_crash_before_posting_is_reclaimed_and_done_once(tmp_path: Path, gitea, canary: str) -> None:
    gitea.add_repo("o/app")
    gitea.add_issue("o/app", "stuck issue")
    path = tmp_path / "journal.sqlite"
    with Journal(path) as crashed:
        crashed.begin(act())  # and then the process died before the forge call
    client = ForgeClient(gitea.url, canary, retries=0)
    for _ in range(2):  # two recovery runs in a row
        with Journal(path) as j:
            for entry in j.pending():
                comments = client.list_comments("o/app", 1)
                if entry.key in marked_keys(c.body for c in comments):
                    j.confirm(entry.key)
                elif j.reclaim(entry):
                    client.create_comment("o/app", 1, marker(entry.key) + "\nnudge")
                    j.confirm(entry.key)
    assert [marked_keys([c.body]) for c in client.list_comments("o/app", 1)] == [{act().key}]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT status, attempts FROM actions").fetchall() == [("done", 2)]
