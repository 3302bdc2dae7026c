"""The writer that tests/crash/test_engine_crash.py kills with SIGKILL.

Run as `python engine_crash_driver.py DB_DIR ACK_FILE FIRST_BATCH_ID FORKED` (FORKED 1:
tables are built in forked children, 0: in background threads of this process). It
writes numbered WriteBatches for ever; the content of batch N is a pure function of N (`batch_ops`), so
the checker can rebuild the exact state that any prefix of the batches produces. After
each acknowledged write it appends "N SYNC\\n" to ACK_FILE (outside the DB directory), and
fsyncs that file when the write itself was synced: a line marked synced therefore proves
the engine acknowledged a durable write of batch N (and of every batch before it). Now
and then it flushes, compacts, or closes and reopens the DB (after a clean close, the last
batch is recorded as synced), so kills also land in those.

Every batch puts a marker key for its own id plus a few data keys whose values carry the
id, and sometimes deletes one data key: a batch that is only partly visible after
recovery, or that reappears after a later batch deleted its key, shows up as a
difference from the rebuilt state.
"""

from __future__ import annotations

import os
import random
import sys

DATA_KEYS = 120
MARKER_PREFIX = b"m/"
DATA_PREFIX = b"d/"

# Small enough that flushes, L0 compactions and level compactions happen many times a
# second, so the kills land inside them as well as inside plain writes.
ENGINE_OPTIONS = {
    "write_buffer_size": 8 * 1024,
    "target_file_size_base": 8 * 1024,
    "max_bytes_for_level_base": 32 * 1024,
    "max_bytes_for_level_multiplier": 4,
    "level0_file_num_compaction_trigger": 2,
    "block_size": 1024,
}


def marker_key(batch_id: int) -> bytes:
    return MARKER_PREFIX + b"%012d" % batch_id


def data_key(n: int) -> bytes:
    return DATA_PREFIX + b"%05d" % n


def batch_ops(batch_id: int) -> tuple[bool, list[tuple[bytes, bytes | None]]]:
    """(sync, operations) of batch `batch_id`; an operation with value None is a delete."""
    rng = random.Random(batch_id)
    sync = rng.random() < 0.3
    ops: list[tuple[bytes, bytes | None]] = [(marker_key(batch_id), b"%d" % batch_id)]
    for j in range(rng.randint(2, 6)):
        filler = bytes([97 + rng.randrange(26)]) * rng.randrange(0, 300)
        ops.append((data_key(rng.randrange(DATA_KEYS)), b"%d/%d/" % (batch_id, j) + filler))
    if rng.random() < 0.3:
        ops.append((data_key(rng.randrange(DATA_KEYS)), None))
    return sync, ops


def apply_batch(state: dict[bytes, bytes], batch_id: int) -> None:
    """Apply batch `batch_id` to a dict the way the engine applies it to the DB."""
    for key, value in batch_ops(batch_id)[1]:
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value


def write_batch(db, batch_id: int) -> bool:
    """Write batch `batch_id` to `db` as one WriteBatch; whether it was synced."""
    from engine import WriteBatch

    sync, ops = batch_ops(batch_id)
    batch = WriteBatch()
    for key, value in ops:
        if value is None:
            batch.delete(key)
        else:
            batch.put(key, value)
    db.write(batch, sync=sync)
    return sync


def main(argv: list[str]) -> int:
    from engine import DB, Options

    db_dir, ack_path, first, forked = argv[0], argv[1], int(argv[2]), argv[3] == "1"
    ack = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # The parent times its kill from these lines: "opening" to hit recovery, "ready" for
    # everything after it.
    sys.stdout.write("opening\n")
    sys.stdout.flush()
    options = Options(create_if_missing=True, background_processes=forked, **ENGINE_OPTIONS)
    db = DB.open(db_dir, options)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    chores = random.Random(first)
    batch_id = first
    while True:
        sync = write_batch(db, batch_id)
        os.write(ack, b"%d %d\n" % (batch_id, int(sync)))
        if sync:
            os.fsync(ack)
        batch_id += 1
        roll = chores.random()
        if roll < 0.01:
            db.flush()
        elif roll < 0.013:
            db.compact_range()
        elif roll < 0.016:
            # A clean close makes every batch so far durable: record the last one as synced.
            db.close()
            os.write(ack, b"%d 1\n" % (batch_id - 1))
            os.fsync(ack)
            db = DB.open(db_dir, options)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
