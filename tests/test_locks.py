"""Local locks: flock-held, never by the dead, and a crashed holder's record left for recovery."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from dispatch.errors import LockHeld
from dispatch.locks import Lock, is_held, live, stale

HOLD = """
import sys, time
from pathlib import Path
from dispatch.locks import Lock
Lock(Path(sys.argv[1]), "acme/app#7", run_id="dead-run", data={"repo": "acme/app", "issue": 7}).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_holder_is_refused_and_a_clean_release_leaves_no_file(tmp_path):
    with Lock(tmp_path, "o/r#1", run_id="a") as first:
        with pytest.raises(LockHeld, match="by pid"):
            Lock(tmp_path, "o/r#1", run_id="b").acquire()
        assert [i.run_id for i in live(tmp_path)] == ["a"]
        assert first.previous is None
    assert list(tmp_path.glob("*.lock")) == []


def test_a_killed_holder_leaves_a_stale_record_that_the_next_taker_sees(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    path = next(tmp_path.glob("*.lock"))
    assert is_held(path) and list(stale(tmp_path)) == []
    proc.kill()
    proc.wait()
    deadline = time.time() + 5
    while is_held(path) and time.time() < deadline:
        time.sleep(0.01)
    [(found, info)] = list(stale(tmp_path))
    assert found == path and info.run_id == "dead-run" and info.data["issue"] == 7
    taker = Lock(tmp_path, "acme/app#7", run_id="recovery").acquire()
    assert taker.previous.run_id == "dead-run"
    # recovery could not finish: the dead run's record goes back for the next try
    taker.release(leave=taker.previous.data)
    assert json.loads(path.read_text())["run_id"] == "dead-run" and not is_held(path)
