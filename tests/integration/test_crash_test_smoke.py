"""`scripts/crash_test`: a short run kills every writer in every way, finds nothing
wrong and leaves no mount, daemon or directory behind; and its verifier does report a
lost, stale, foreign or torn write when there is one."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from fuse_harness import REPO, require_fuse

from mount.mount_table import mounted_under

sys.path.insert(0, str(REPO / "scripts"))

import crash_test  # noqa: E402
from crash_test import ExpectedState, InFlight, check_state, key_bytes, value_for  # noqa: E402

SCRIPT = REPO / "scripts" / "crash_test.py"


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TDEFS_FAILPOINTS"}


@pytest.mark.fuse
def test_short_run_kills_each_writer_each_way_and_leaves_nothing(tmp_path: Path) -> None:
    require_fuse()
    pytest.importorskip("rocksdict")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--iterations", "3", "--writer", "all", "--seed", "7",
         "--dir", str(tmp_path), "--evidence", str(tmp_path / "evidence")],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output

    # a line per iteration, the writers in turns
    lines = re.findall(r"^\s+(\d+)\s+(lsmdb|sqlite|rocksdb)\s+(writer|daemon|both)\s+"
                       r"\d+\.\d\d s (?:writing|opening)\s+(\d+)\s+.*\s(ok|FAILED)\s",
                       proc.stdout, re.MULTILINE)
    assert [int(n) for n, *_ in lines] == list(range(1, 10)), output
    assert {result for *_, result in lines} == {"ok"}, output
    # with --kill mixed, three iterations kill each writer once in each way
    for writer in crash_test.WRITERS:
        assert sorted(kind for _, w, kind, *_ in lines if w == writer) == \
            ["both", "daemon", "writer"], output
        row = re.search(rf"^{writer}\s+3\s+1\s+1\s+1\s+(\d+)\s+0\s", proc.stdout, re.MULTILINE)
        assert row, f"no totals for {writer}:\n{output}"
    assert sum(int(acked) for *_, acked, _ in lines) > 0, output
    assert "crash_test: no failures" in proc.stdout

    assert mounted_under(tmp_path) == []
    leftover = [p.pid for p in psutil.process_iter(["cmdline"])
                if any(str(tmp_path) in part for part in p.info["cmdline"] or [])]
    assert leftover == [], f"processes still running: {leftover}"
    assert list(tmp_path.iterdir()) == []   # the work directory is gone; no evidence


def expected_state() -> ExpectedState:
    state = ExpectedState("sqlite", next_op=20)
    state.acknowledge(10, [(5, True), (6, True)])
    state.acknowledge(11, [(6, False)])
    state.acknowledge(12, [(7, True)])
    return state


def test_verifier_accepts_exactly_what_was_acknowledged() -> None:
    state = expected_state()
    found = {key_bytes(5): value_for(5, 10), key_bytes(7): value_for(7, 12)}
    verdict = check_state(state, found)
    assert verdict.problems == [] and verdict.present == 2 and verdict.in_flight_applied is None


def test_verifier_reports_lost_stale_foreign_and_torn_writes() -> None:
    state = expected_state()
    lost = check_state(state, {key_bytes(7): value_for(7, 12)})
    assert lost.problems == ["key 5: acknowledged as put by op 10, found absent"]

    stale = check_state(state, {key_bytes(5): value_for(5, 9), key_bytes(7): value_for(7, 12)})
    assert stale.problems == ["key 5: acknowledged as put by op 10, found the value of op 9"]

    resurrected = check_state(state, {key_bytes(5): value_for(5, 10), key_bytes(6): value_for(6, 10),
                                      key_bytes(7): value_for(7, 12)})
    assert resurrected.problems == [
        "key 6: acknowledged as deleted by op 11, found the value of op 10"]

    torn_value = value_for(5, 10)[:-1] + b"\0"
    garbage = check_state(state, {key_bytes(5): torn_value, key_bytes(7): value_for(7, 12),
                                  b"stray": b"x"})
    assert len(garbage.problems) == 2
    assert any("no writer wrote such a key" in p for p in garbage.problems)
    assert any(p.startswith("key 5: holds") for p in garbage.problems)

    # a batch in flight at the kill shows entirely or not at all
    state.in_flight = InFlight(13, [(5, False), (8, True)])
    base = {key_bytes(5): value_for(5, 10), key_bytes(7): value_for(7, 12)}
    assert check_state(state, base).problems == []
    assert check_state(state, base).in_flight_applied is False
    landed = {key_bytes(7): value_for(7, 12), key_bytes(8): value_for(8, 13)}
    assert check_state(state, landed).problems == []
    assert check_state(state, landed).in_flight_applied is True
    half = {**base, key_bytes(8): value_for(8, 13)}
    assert check_state(state, half).problems == [
        "op 13 (in flight) is torn: applied to keys [8], not to keys [5]"]


def test_verify_command_reads_a_database_and_catches_a_lost_write(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    store = crash_test.SqliteStore(db)
    store.apply([(5, True), (6, True)], 10)
    store.apply([(6, False)], 11)
    store.apply([(7, True)], 12)
    store.close()
    state = expected_state()
    good = tmp_path / "good.json"
    state.save(good)
    state.acknowledge(14, [(9, True)])   # a write the database never saw
    bad = tmp_path / "bad.json"
    state.save(bad)

    def verify(expected: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), "--verify", "sqlite", str(db),
                               "--expected", str(expected)],
                              cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)

    ok = verify(good)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout) == {"problems": [], "present": 2, "in_flight_applied": None}

    lost = verify(bad)
    assert lost.returncode == 1, lost.stdout + lost.stderr
    assert json.loads(lost.stdout)["problems"] == [
        "key 9: acknowledged as put by op 14, found absent"]

    # a damaged database is a finding, named, not a traceback
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE kv")
    broken = verify(good)
    assert broken.returncode == 1
    (problem,) = json.loads(broken.stdout)["problems"]
    assert problem.startswith("sqlite: cannot read the database: OperationalError")


def test_bad_options_exit_2_without_a_traceback() -> None:
    for args in (["--iterations", "0"], ["--writer", "leveldb"], ["--kill", "power"]):
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_run_of_deleted_keys_becomes_one_range_deletion() -> None:
    from crash_test import deleted_run

    assert deleted_run([(4, False), (5, False), (6, False)]) == (key_bytes(4), key_bytes(7))
    assert deleted_run([(4, False)]) is None                      # a plain delete
    assert deleted_run([(4, False), (6, False)]) is None          # not consecutive
    assert deleted_run([(4, False), (5, True)]) is None           # a put among them
