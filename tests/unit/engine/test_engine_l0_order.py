"""Level 0 is read in epoch order, never by sequence numbers, and that survives reopen.

The tables are built and installed through the internal version API the way file
ingestion will: their sequence ranges overlap, and the table with the *lower*
sequence numbers carries the *newer* epoch.
"""

from __future__ import annotations

import os

from engine_helpers import small_options

from engine import DB
from engine.filename import table_name
from engine.table_builder import TableBuilder
from engine.table_reader import open_table
from engine.version import FileMeta, VersionEdit


def install_level0(db: DB, entries: list[tuple[bytes, int, bytes]], epoch: int) -> FileMeta:
    number = db._vs.new_file_number()
    builder = TableBuilder(os.path.join(db.path, table_name(number)))
    for key, seq, value in entries:
        builder.add(key, seq, value)
    st = builder.finish()
    f = FileMeta(number, st["size"], st["smallest"], st["largest"], st["smallest_seq"],
                 st["largest_seq"], epoch, st["num_entries"])
    open_table(db.path, f, db.cache)
    db._install(VersionEdit(new_files=[(0, f)], last_sequence=st["largest_seq"],
                            next_epoch=max(db._vs.next_epoch, epoch + 1)), [])
    return f


def setup_overlapping(db: DB) -> None:
    # Older epoch, higher sequence numbers.
    install_level0(db, [(b"a", 50, b"old-a"), (b"b", 51, b"old-b"), (b"c", 52, b"old-c")], 3)
    # Newer epoch, lower sequence numbers: its values must win.
    install_level0(db, [(b"a", 10, b"new-a"), (b"c", 60, b"new-c")], 7)


def expect_newest_epoch_wins(db: DB) -> None:
    assert db.property("level0_epochs") == [7, 3]
    assert db.get(b"a") == b"new-a"
    assert db.get(b"b") == b"old-b"
    assert db.get(b"c") == b"new-c"
    assert list(db.iterator()) == [(b"a", b"new-a"), (b"b", b"old-b"), (b"c", b"new-c")]
    assert list(db.iterator(reverse=True)) == [(b"c", b"new-c"), (b"b", b"old-b"),
                                               (b"a", b"new-a")]
    db.check()


def test_level0_is_read_newest_epoch_first_and_survives_reopen(tmp_path):
    opts = small_options(level0_file_num_compaction_trigger=100)
    path = tmp_path / "db"
    with DB.open(path, opts) as db:
        setup_overlapping(db)
        expect_newest_epoch_wins(db)
    with DB.open(path, opts) as db:
        expect_newest_epoch_wins(db)
        # Writes after reopen continue above every recovered sequence number.
        assert db.property("sequence") >= 60


def test_compaction_merges_level0_in_epoch_order(tmp_path):
    opts = small_options(level0_file_num_compaction_trigger=100)
    path = tmp_path / "db"
    with DB.open(path, opts) as db:
        setup_overlapping(db)
        db.compact_range()
        levels = db.property("levels")
        assert levels[0]["files"] == 0 and levels[1]["files"] == 1
        assert db._sv[2].levels[1][0].epoch == 3  # the minimum of its inputs
        assert list(db.iterator()) == [(b"a", b"new-a"), (b"b", b"old-b"), (b"c", b"new-c")]
    with DB.open(path, opts) as db:
        assert db.get(b"a") == b"new-a"
        db.check()


def test_flush_assigns_next_epoch(tmp_path):
    opts = small_options(level0_file_num_compaction_trigger=100)
    with DB.open(tmp_path / "db", opts) as db:
        setup_overlapping(db)
        db.put(b"a", b"flushed")
        db.flush()
        assert db.property("level0_epochs") == [8, 7, 3]
        assert db.get(b"a") == b"flushed"
