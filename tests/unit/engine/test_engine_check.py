"""``lsmdb check`` (``DB.check``): every block checksum, key order inside each table,
range tombstones inside their table's bounds, level invariants. Damage that keeps
every checksum valid is still found, and reported with the file and offset."""

from __future__ import annotations

import json
import os

import pytest
from engine_helpers import run_lsmdb, small_options

from engine import DB
from engine.errors import Corruption
from engine.filename import manifest_name, read_current, set_current, table_name
from engine.table_format import TRAILER_SIZE, trailer
from engine.table_reader import TableReader
from engine.wal import LogWriter, read_records


def one_table_db(path, keys, range_dels=()) -> int:
    """A database whose only table holds ``keys``; returns the table's number."""
    with DB.open(path, small_options(level0_file_num_compaction_trigger=100,
                                     write_buffer_size=1 << 20)) as db:
        for key in keys:
            db.put(key, b"value-" + key)
        for begin, end in range_dels:
            db.delete_range(begin, end)
        db.flush()
        (f,) = [f for _, f in db._sv[2].files()]
        return f.number


def test_check_finds_keys_out_of_order_under_a_valid_checksum(tmp_path, capsys):
    path = tmp_path / "db"
    keys = [b"key%04d" % i for i in range(200)]
    number = one_table_db(path, keys)
    code, out, _ = run_lsmdb(capsys, path, "check")
    assert code == 0 and out.startswith("ok")

    table = os.path.join(path, table_name(number))
    reader = TableReader(table, number)
    off, size = reader.handles[1]  # a block in the middle: its index key stays right
    reader.close()
    with open(table, "r+b") as f:
        f.seek(off)
        stored = bytearray(f.read(size))
        # Contents start with the keys, all seven bytes long: swap the first two.
        assert stored[:7] < stored[7:14]
        stored[:7], stored[7:14] = stored[7:14], stored[:7]
        f.seek(off)
        f.write(bytes(stored) + trailer(bytes(stored), 0))
        assert f.tell() == off + size + TRAILER_SIZE

    code, out, err = run_lsmdb(capsys, path, "check")
    assert code != 0 and out == ""
    line = err.strip()
    assert "\n" not in line
    assert table_name(number) in line and f"at offset {off}" in line and "out of order" in line
    # A normal open reads the block (its checksum is fine) but check still fails.
    with DB.open(path, small_options()) as db, \
            pytest.raises(Corruption, match=f"at offset {off}: .*out of order"):
        db.check()


def rewrite_manifest(path, change) -> None:
    """Replace the MANIFEST with one edit: the whole state, passed through ``change``."""
    name = read_current(path)
    edits = [json.loads(payload) for _, payload in read_records(os.path.join(path, name))]
    state = {"new_files": []}
    for e in edits:
        for k, v in e.items():
            if k == "new_files":
                state["new_files"] += v
            elif k != "deleted_files":
                state[k] = v
    change(state)
    number = int(name.split("-")[1]) + 1000
    state["next_file_number"] = max(state.get("next_file_number", 0), number + 1)
    writer = LogWriter(os.path.join(path, manifest_name(number)))
    writer.add(json.dumps(state).encode())
    writer.sync()
    writer.close()
    set_current(path, number)


def test_check_finds_a_tombstone_outside_the_table_bounds(tmp_path, capsys):
    path = tmp_path / "db"
    one_table_db(path, [b"b1", b"b2", b"c5"], range_dels=[(b"a", b"bb")])
    code, out, _ = run_lsmdb(capsys, path, "check")
    assert code == 0

    def narrow(state):
        (row,) = state["new_files"]
        assert row[3] == b"a".hex()  # smallest covers the tombstone's start
        row[3] = b"b1".hex()

    rewrite_manifest(path, narrow)
    code, _, err = run_lsmdb(capsys, path, "check")
    assert code != 0
    assert "range tombstone outside" in err and "\n" not in err.strip()


def test_check_finds_overlapping_levels(tmp_path, capsys):
    path = tmp_path / "db"
    with DB.open(path, small_options(level0_file_num_compaction_trigger=100,
                                     write_buffer_size=1 << 20)) as db:
        for i in range(20):
            db.put(b"k%02d" % i, b"v")
        db.flush()
        for i in range(10, 30):
            db.put(b"k%02d" % i, b"w")
        db.flush()

    def to_level1(state):
        for row in state["new_files"]:
            row[0] = 1

    rewrite_manifest(path, to_level1)
    code, _, err = run_lsmdb(capsys, path, "check")
    assert code != 0 and "overlap" in err and "\n" not in err.strip()


def test_check_finds_a_filter_that_misses_keys(tmp_path, capsys):
    path = tmp_path / "db"
    number = one_table_db(path, [b"key%04d" % i for i in range(100)])
    table = os.path.join(path, table_name(number))
    reader = TableReader(table, number)
    off, size = reader.footer_handles[1]
    reader.close()
    with open(table, "r+b") as f:
        f.seek(off)
        stored = bytearray(f.read(size))
        stored[:-1] = bytes(size - 1)  # every word empty; keep the probe count
        f.seek(off)
        f.write(bytes(stored) + trailer(bytes(stored), 0))
    code, _, err = run_lsmdb(capsys, path, "check")
    assert code != 0
    assert f"at offset {off}" in err and "filter does not match key" in err
