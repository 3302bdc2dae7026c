"""SingleDelete: the deletion and the one put it meets vanish together in compaction;
breaking the contract is undefined for reads but never crashes or damages a file."""

from __future__ import annotations

import shutil

import pytest
from engine_helpers import small_options

from engine import DB, WriteBatch
from engine.compaction import compaction_job
from engine.filename import table_name
from engine.table_builder import TableBuilder
from engine.table_reader import TableReader
from engine.tags import KIND_DELETE, KIND_PUT, KIND_SINGLE_DELETE
from engine.write_batch import SINGLE_DELETE, decode_batch, encode_batch


def _table(path, entries):
    """A table of ``(key, seq, kind, value)`` entries, in order."""
    b = TableBuilder(str(path), block_size=64)
    b.add_many([e[0] for e in entries], [e[1] << 8 | e[2] for e in entries],
               [e[3] for e in entries])
    b.finish()
    return str(path)


def _entries(out):
    return [(k, t >> 8, t & 0xFF) for k, t, _ in TableReader(out["path"], 0).entries()]


def test_single_delete_in_the_wal_and_memtable(tmp_path):
    ops = [(b"a", b"1"), (b"a", SINGLE_DELETE)]
    assert decode_batch("x.log", 0, encode_batch(4, ops)) == (4, ops)
    with DB.open(tmp_path / "db", small_options()) as db:
        db.put(b"a", b"1")
        db.put(b"b", b"2")
        with db.snapshot() as snap:
            db.single_delete(b"a")
            assert db.get(b"a") is None and db.get(b"a", snapshot=snap) == b"1"
            assert list(db.iterator()) == [(b"b", b"2")]
            assert list(db.iterator(snapshot=snap)) == [(b"a", b"1"), (b"b", b"2")]
        batch = WriteBatch()
        batch.put(b"c", b"3")
        batch.single_delete(b"b")
        db.write(batch, sync=True)
        # A copy taken while open holds the writes only in its log, as after a crash.
        shutil.copytree(tmp_path / "db", tmp_path / "crashed")
    with DB.open(tmp_path / "crashed", small_options()) as db:  # replayed from the WAL
        assert list(db.iterator()) == [(b"c", b"3")]
        db.flush()
        kinds = {k: t & 0xFF for k, t, _ in db._sv[2].levels[0][0].reader.entries()}
        assert kinds[b"b"] == KIND_SINGLE_DELETE


def test_flush_writes_the_single_delete_kind(tmp_path):
    with DB.open(tmp_path / "db", small_options()) as db:
        db.put(b"a", b"1")
        db.flush()
        db.single_delete(b"a")
        db.delete(b"b")
        db.flush()
        newest = db._sv[2].levels[0][0]
        kinds = {k: t & 0xFF for k, t, _ in newest.reader.entries()}
        assert kinds == {b"a": KIND_SINGLE_DELETE, b"b": KIND_DELETE}
        assert db.get(b"a") is None


def test_single_delete_and_its_put_vanish_together_above_the_bottom(tmp_path):
    newer = _table(tmp_path / "1.sst", [(b"a", 20, KIND_SINGLE_DELETE, b""),
                                         (b"b", 21, KIND_DELETE, b"")])
    older = _table(tmp_path / "2.sst", [(b"a", 5, KIND_PUT, b"a5"), (b"b", 6, KIND_PUT, b"b6"),
                                         (b"c", 7, KIND_PUT, b"c7")])
    # Not the bottom of the tree: a plain deletion must stay, the single one need not.
    (out,) = compaction_job([[newer], [older]], str(tmp_path / "o-"), [], False, 1 << 20,
                            4096, "none", 10)
    assert _entries(out) == [(b"b", 21, KIND_DELETE), (b"c", 7, KIND_PUT)]
    # A snapshot between them sees the put: both stay.
    (out,) = compaction_job([[newer], [older]], str(tmp_path / "s-"), [10], False, 1 << 20,
                            4096, "none", 10)
    assert _entries(out)[:2] == [(b"a", 20, KIND_SINGLE_DELETE), (b"a", 5, KIND_PUT)]
    # Alone (its put is further down), it stays above the bottom.
    (out,) = compaction_job([[newer]], str(tmp_path / "n-"), [], False, 1 << 20, 4096,
                            "none", 10)
    assert _entries(out)[0] == (b"a", 20, KIND_SINGLE_DELETE)


def test_single_delete_through_the_levels(tmp_path):
    with DB.open(tmp_path / "db", small_options()) as db:
        for i in range(300):
            db.put(b"k%03d" % i, b"v%d" % i)
        db.compact_range()
        snap = db.snapshot()
        for i in range(0, 300, 2):
            db.single_delete(b"k%03d" % i)
        db.flush()
        db.compact_range()
        want = [(b"k%03d" % i, b"v%d" % i) for i in range(1, 300, 2)]
        assert list(db.iterator()) == want
        assert len(list(db.iterator(snapshot=snap))) == 300
        snap.release()
        for k in (b"k000", b"k299"):  # a table spanning the bottom files brings them in
            db.delete(k)
        db.compact_range()
        db.check()
        assert list(db.iterator()) == want[:-1]
        on_disk = [k for _, f in db._sv[2].files() for k, _, _ in f.reader.entries()]
        assert len(on_disk) == len(want) - 1  # every single delete went with its put


@pytest.mark.parametrize("misuse", ["put-twice", "mixed-with-delete", "never-put",
                                    "single-delete-twice"])
def test_broken_contract_never_crashes_or_corrupts(tmp_path, misuse):
    """Undefined results, as in RocksDB, but every read works, checks pass, reopen works."""
    with DB.open(tmp_path / "db", small_options()) as db:
        for i in range(60):
            k = b"k%03d" % i
            if misuse == "put-twice":
                db.put(k, b"first")
                db.flush()
                db.put(k, b"second")
            elif misuse == "mixed-with-delete":
                db.put(k, b"first")
                db.delete(k)
                db.flush()
                db.put(k, b"second")
            elif misuse == "single-delete-twice":
                db.put(k, b"first")
                db.single_delete(k)
            db.flush()
            db.single_delete(k)
            if i % 20 == 0:
                db.compact_range()
        db.compact_range()
        db.check()
        for i in range(60):
            assert db.get(b"k%03d" % i) in (None, b"first", b"second")
        rows = list(db.iterator())
        assert all(v in (b"first", b"second") for _, v in rows)
    with DB.open(tmp_path / "db", small_options()) as db:
        db.check()
        assert list(db.iterator()) == rows


def test_a_deletion_before_the_one_put_still_hides_older_puts(tmp_path):
    """delete, put once, single_delete: when the pair vanishes above the bottom, the
    deletion under it must remain, though the put replaced it in the memtable."""
    opts = small_options(level0_file_num_compaction_trigger=100)
    path = tmp_path / "db"
    with DB.open(path, opts) as db:
        db.put(b"k", b"old")
        db.flush()
        db.delete(b"k")
        db.put(b"k", b"new")  # same memtable as the deletion
        db.flush()
        db.single_delete(b"k")
        db.flush()
        assert db.get(b"k") is None
        oldest, middle, newest = reversed(db._sv[2].levels[0])
        paths = [str(path / table_name(f.number)) for f in (newest, middle, oldest)]
    # The two newer tables compacted above the oldest one (not the bottom).
    (out,) = compaction_job([[paths[0]], [paths[1]]], str(tmp_path / "o-"), [], False,
                            1 << 20, 4096, "none", 10)
    assert [(k, kind) for k, _, kind in _entries(out)] == [(b"k", KIND_DELETE)]
    # Then with the oldest, at the bottom: nothing is left.
    outs = compaction_job([[out["path"]], [paths[2]]], str(tmp_path / "b-"), [], True,
                          1 << 20, 4096, "none", 10)
    assert outs == []
