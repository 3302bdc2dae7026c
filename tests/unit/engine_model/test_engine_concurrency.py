"""Batches stay atomic for readers in other threads, while flushes and compactions run.

Writers replace whole groups of keys in one WriteBatch (every key of group g gets the
batch's id); readers, concurrently, take snapshots and read groups through `get` and
through iterators, and plain iterators (which pin their own snapshot). Any group seen with
two different ids, or partly missing, is a batch a reader saw half applied. Tiny buffers
keep memtable switches, flushes and compactions going the whole time.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from engine import DB, Options, WriteBatch

GROUPS = 8
GROUP_SIZE = 6
WRITERS = 2
READERS = 2
SECONDS = 4.0


def group_key(g: int, i: int) -> bytes:
    return b"g%02d/%02d" % (g, i)


def group_range(g: int) -> tuple[bytes, bytes]:
    return b"g%02d/" % g, b"g%02d0" % g  # "0" sorts right after "/"


def check_group(g: int, values: list[bytes | None], where: str) -> None:
    ids = {v.split(b":")[0] if v is not None else None for v in values}
    assert len(ids) == 1, f"{where}: group {g} half applied: {values}"


def test_readers_never_see_half_a_batch(tmp_path: Path) -> None:
    options = Options(
        write_buffer_size=4 * 1024,
        target_file_size_base=4 * 1024,
        max_bytes_for_level_base=16 * 1024,
        max_bytes_for_level_multiplier=2,
        level0_file_num_compaction_trigger=2,
        block_size=512,
    )
    errors: list[BaseException] = []
    stop = threading.Event()
    counts = {"batches": 0, "reads": 0}

    with DB.open(str(tmp_path / "db"), options) as db:
        # Every group exists from the start, so "all missing" never hides a bug.
        batch = WriteBatch()
        for g in range(GROUPS):
            for i in range(GROUP_SIZE):
                batch.put(group_key(g, i), b"0:" + b"." * 40)
        db.write(batch)

        def writer(w: int) -> None:
            n = 0
            try:
                while not stop.is_set():
                    n += 1
                    batch_id = b"%d-%d" % (w, n)
                    g = (n * 7 + w) % GROUPS
                    batch = WriteBatch()
                    for i in range(GROUP_SIZE):
                        batch.put(group_key(g, i), batch_id + b":" + b"v" * (20 + i * 5))
                    db.write(batch, sync=(n % 50 == 0))
                    counts["batches"] += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
                stop.set()

        def reader(r: int) -> None:
            n = 0
            try:
                while not stop.is_set():
                    n += 1
                    g = (n + r) % GROUPS
                    lower, upper = group_range(g)
                    with db.snapshot() as snap:
                        got = [db.get(group_key(g, i), snapshot=snap) for i in range(GROUP_SIZE)]
                        check_group(g, got, "get at a snapshot")
                        scanned = [v for _, v in db.iterator(lower=lower, upper=upper, snapshot=snap)]
                        assert scanned == got, f"group {g}: iterator and get disagree at one snapshot"
                    items = list(db.iterator(lower=lower, upper=upper, reverse=bool(n % 2)))
                    assert len(items) == GROUP_SIZE, f"group {g}: {len(items)} keys visible"
                    check_group(g, [v for _, v in items], "plain iterator")
                    counts["reads"] += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
                stop.set()

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
        threads += [threading.Thread(target=reader, args=(r,)) for r in range(READERS)]
        for t in threads:
            t.start()
        time.sleep(SECONDS)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        if errors:
            raise errors[0]
        stats = db.property("stats")
        db.check()
        for g in range(GROUPS):
            lower, upper = group_range(g)
            check_group(g, [v for _, v in db.iterator(lower=lower, upper=upper)], "final state")

    assert counts["batches"] > 100 and counts["reads"] > 50, counts
    assert stats["flushes"] > 5 and stats["compactions"] > 0, stats
