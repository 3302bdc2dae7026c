"""Kill -9 the engine in a loop while it writes, and check every recovery.

One DB directory lives through all the kills. A child process (engine_crash_driver.py)
writes numbered batches and records each acknowledged one in a file outside the DB; the
parent SIGKILLs it at one of three kinds of moment: inside DB.open (so recovery itself is
interrupted and the next recovery meets its leftovers), while a forked flush or compaction
child is building a table, or at a random point of the writing. It then reopens the DB and
checks:

- the visible state is exactly the state after some prefix of the batches the child
  issued (so no batch is half applied, none is reordered, no delete is undone);
- that prefix reaches at least the last batch acknowledged as synced;
- `db.check()` passes.

The expected state then becomes the base for the next round. At the end, no stray file
(temporary or unreferenced table) may remain after a clean open. Sync=False batches may
be lost by a kill (the engine buffers them in the process); the count is printed.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROUNDS = 22
DRIVER = Path(__file__).with_name("engine_crash_driver.py")
REPO = Path(__file__).resolve().parents[2]

_spec = importlib.util.spec_from_file_location("engine_crash_driver", DRIVER)
assert _spec is not None and _spec.loader is not None
driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(driver)


def read_acks(path: Path, first: int) -> tuple[int, int]:
    """(acknowledged batches, acknowledged synced batches' max index + 1) of one round."""
    acked = 0
    synced_upto = 0
    if not path.exists():
        return 0, 0
    for line in path.read_bytes().splitlines():
        parts = line.split()
        # A line cut by the kill can only be the last one; it was not acknowledged durably.
        if len(parts) != 2:
            continue
        batch_id, sync = int(parts[0]), int(parts[1])
        if batch_id < first:
            continue
        acked = max(acked, batch_id - first + 1)
        if sync:
            synced_upto = max(synced_upto, batch_id - first + 1)
    return acked, synced_upto


def describe_difference(actual: dict[bytes, bytes], expected: dict[bytes, bytes]) -> str:
    lines = []
    for key in sorted(set(actual) | set(expected)):
        if actual.get(key) != expected.get(key):
            want = expected.get(key)
            got = actual.get(key)
            lines.append(f"{key!r}: expected {want[:24] if want else want!r}, got {got[:24] if got else got!r}")
            if len(lines) >= 8:
                break
    return "; ".join(lines)


class Round:
    """One writer run: how it ended and which table-building children outlived it."""

    def __init__(self) -> None:
        self.code: int | None = None
        self.stderr = ""
        self.during_job = False
        self.during_open = False
        self.orphans: list[psutil.Process] = []


def run_round(db_dir: Path, ack_path: Path, first: int, forked: bool,
              rng: random.Random, open_seconds: list[float]) -> Round:
    """Start the writer and SIGKILL it: inside DB.open (recovery), while a forked flush or
    compaction child is building a table, or at a random moment of its writing.

    `open_seconds` collects how long DB.open took in the rounds that got past it; a kill
    aimed at recovery picks a moment within the shortest of those.
    """
    result = Round()
    proc = subprocess.Popen(
        [sys.executable, str(DRIVER), str(db_dir), str(ack_path), str(first), str(int(forked))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        mode = rng.random()
        proc.stdout.readline()  # "opening"
        opening = time.monotonic()
        if mode < 0.25:
            # Recovery replays the WAL, writes a table and a new MANIFEST: a few ms.
            time.sleep(rng.uniform(0.0, min(open_seconds, default=0.01)))
            result.during_open = True
        elif proc.stdout.readline().strip() == b"ready":
            open_seconds.append(time.monotonic() - opening)
            time.sleep(rng.uniform(0.05, 0.5))
            if mode < 0.55:
                # Wait for a table-building child (a flush or compaction in flight).
                writer = psutil.Process(proc.pid)
                until = time.monotonic() + 1.0
                while time.monotonic() < until and not writer.children():
                    time.sleep(0.001)
        try:
            result.orphans = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            result.orphans = []
        result.during_job = bool(result.orphans)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        if result.during_open and b"ready" in out:
            result.during_open = False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result.code = proc.returncode
    result.stderr = err.decode(errors="replace")
    return result


def open_after_crash(path: Path, options, orphans: list[psutil.Process]):
    """Open the DB; while children of the killed writer still hold its lock, wait for them."""
    from engine import DB, LockError

    until = time.monotonic() + 15
    while True:
        try:
            return DB.open(str(path), options)
        except LockError:
            if time.monotonic() > until or not any(p.is_running() for p in orphans):
                raise
            time.sleep(0.01)


def reap(orphans: list[psutil.Process]) -> None:
    """Wait for the killed writer's table builders to finish; kill any that hang."""
    _, alive = psutil.wait_procs(orphans, timeout=10)
    for p in alive:
        p.kill()


@pytest.mark.parametrize("forked", [True, False], ids=["forked-builders", "threads-only"])
def test_sigkill_loop_keeps_synced_batches_whole(tmp_path: Path, forked: bool) -> None:
    from engine import Options

    db_dir = tmp_path / "db"
    ack_path = tmp_path / "acked"  # outside the DB directory on purpose
    # A fixed seed keeps the suite repeatable; set ENGINE_CRASH_SEED to explore others.
    rng = random.Random(int(os.environ.get("ENGINE_CRASH_SEED", "4")))
    options = Options(create_if_missing=True, background_processes=forked, **driver.ENGINE_OPTIONS)
    expected: dict[bytes, bytes] = {}
    recovered_batches = 0
    kills_during_open = 0
    lost_unsynced = 0
    kills_during_jobs = 0
    deepest_level = 0
    orphans: list[psutil.Process] = []
    open_seconds: list[float] = []

    try:
        for round_no in range(ROUNDS):
            first = (round_no + 1) * 1_000_000
            run = run_round(db_dir, ack_path, first, forked, rng, open_seconds)
            orphans += run.orphans
            assert run.code == -signal.SIGKILL, (
                f"round {round_no}: writer exited {run.code} before the kill:\n{run.stderr}")
            kills_during_jobs += run.during_job
            kills_during_open += run.during_open
            acked, synced_upto = read_acks(ack_path, first)
            prefix, deepest = verify_round(db_dir, options, run.orphans, expected, first,
                                           round_no, synced_upto, rng)
            deepest_level = max(deepest_level, deepest)
            recovered_batches += prefix
            lost_unsynced += acked - min(acked, prefix)
    finally:
        reap(orphans)

    # Leftovers of killed flushes and compactions are cleaned up by a later open.
    with open_after_crash(db_dir, options, []) as db:
        db.check()
        # Settle first, so the count below is the one close leaves on disk.
        db.flush()
        db.wait_for_compactions()
        live_tables = sum(lv["files"] for lv in db.property("levels"))
    names = sorted(p.name for p in db_dir.iterdir())
    stray = [n for n in names if not re.fullmatch(r"LOCK|CURRENT|OPTIONS|MANIFEST-\d+|\d+\.(log|sst)", n)]
    assert not stray, f"files left behind by killed jobs: {stray}"
    tables = [n for n in names if n.endswith(".sst")]
    assert len(tables) == live_tables, f"{len(tables)} .sst files on disk, {live_tables} live"

    print(
        f"{ROUNDS} kills ({kills_during_open} inside DB.open, {kills_during_jobs} while a "
        f"table was being built): {recovered_batches} batches recovered, deepest level "
        f"L{deepest_level}, "
        f"{lost_unsynced} acknowledged unsynced batches lost"
    )
    assert recovered_batches > ROUNDS * 10, "the writer hardly wrote anything before the kills"
    if forked:
        assert kills_during_jobs >= 3, "too few kills landed while a table builder was running"
    assert kills_during_open >= 2, "too few kills landed inside DB.open"
    assert deepest_level >= 1, "compaction never moved data below L0"


def verify_round(db_dir: Path, options, orphans: list[psutil.Process],
                 expected: dict[bytes, bytes], first: int, round_no: int,
                 synced_upto: int, rng: random.Random) -> tuple[int, int]:
    """Reopen after a kill and compare with the batches' effects.

    Returns (batches of this round that survived, deepest level holding files) and
    advances `expected` by the surviving batches.
    """
    with open_after_crash(db_dir, options, orphans) as db:
        db.check()
        actual = dict(db.iterator())
        markers = sorted(
            int(key[len(driver.MARKER_PREFIX):])
            for key in actual
            if key.startswith(driver.MARKER_PREFIX)
            and first <= int(key[len(driver.MARKER_PREFIX):]) < first + 1_000_000
        )
        prefix = len(markers)
        assert markers == list(range(first, first + prefix)), (
            f"round {round_no}: recovered batches are not a prefix of the written ones: "
            f"{markers[:5]}...{markers[-5:]}"
        )
        assert prefix >= synced_upto, (
            f"round {round_no}: batch {first + synced_upto - 1} was acknowledged as synced "
            f"but only {prefix} batches of this round survived"
        )
        for batch_id in range(first, first + prefix):
            driver.apply_batch(expected, batch_id)
        assert actual == expected, (
            f"round {round_no}: state after {prefix} recovered batches differs from the "
            f"batches' effects (a batch half applied or a write lost/undone): "
            f"{describe_difference(actual, expected)}"
        )
        # Point reads go through a different path (memtable, bloom, index) than scans.
        for key in rng.sample(sorted(expected), min(20, len(expected))):
            assert db.get(key) == expected[key], f"round {round_no}: get({key!r})"
        assert db.get(driver.data_key(driver.DATA_KEYS + 1)) is None
        deepest = max((i for i, lv in enumerate(db.property("levels")) if lv["files"]), default=0)
    return prefix, deepest
