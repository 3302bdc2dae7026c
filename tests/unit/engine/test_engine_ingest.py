"""Ingestion of external tables: SstFileWriter, DB.ingest's checks, where the files
land, the global sequence number (reads, snapshots, compaction, recovery), move as a
hard link, and the two level-0 ordering cases behind RocksDB's switch to epoch
numbers."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from engine_helpers import run_lsmdb, small_options

from engine import DB, IngestionError, InvalidArgument, Options, SstFileWriter
from engine.compaction import Compaction
from engine.ingest import target_level
from engine.table_builder import TableBuilder
from engine.table_reader import TableReader
from engine.tags import KIND_DELETE, KIND_PUT
from engine.version import FileMeta, Version, VersionEdit

BOTTOM = Options().num_levels - 1


def opts(**kw) -> Options:
    # No automatic compaction unless a test asks: levels stay where ingestion put them.
    kw.setdefault("level0_file_num_compaction_trigger", 100)
    return small_options(**kw)


def external(path: Path, puts: dict[bytes, bytes | None] | None = None,
             ranges: list[tuple[bytes, bytes]] = ()) -> str:
    """Write an external table: ``puts`` (value None: a deletion) and range deletions."""
    with SstFileWriter(path) as w:
        for k, v in sorted((puts or {}).items()):
            if v is None:
                w.delete(k)
            else:
                w.put(k, v)
        for begin, end in ranges:
            w.delete_range(begin, end)
    return str(path)


def level_of(db: DB, key: bytes) -> list[int]:
    """The levels holding a table whose key range contains ``key``."""
    return [lv for lv, f in db._sv[2].files() if f.smallest <= key <= f.largest]


def state(db: DB) -> tuple:
    """Everything a refused ingestion must leave as it was. Logs are left out: the
    flush thread deletes the log of a flushed memtable just after the flush returns."""
    files = sorted(n for n in os.listdir(db.path) if not n.endswith(".log"))
    manifest = [n for n in files if n.startswith("MANIFEST-")]
    return (files, [Path(db.path, m).read_bytes() for m in manifest],
            db.property("sequence"), db.property("levels"), list(db.iterator()))


# ------------------------------------------------------------------ SstFileWriter


def test_writer_refuses_keys_out_of_order_and_marks_the_file_external(tmp_path):
    w = SstFileWriter(tmp_path / "a.sst")
    w.put(b"b", b"1")
    with pytest.raises(InvalidArgument, match="strictly increasing"):
        w.put(b"a", b"2")
    with pytest.raises(InvalidArgument, match="added twice"):
        w.delete(b"b")
    w.delete(b"c")
    with pytest.raises(InvalidArgument, match="strictly increasing"):
        w.put(b"c", b"again")
    # Range tombstones come in any order, before or after the keys they surround.
    w.delete_range(b"x", b"y")
    w.delete_range(b"0", b"1")
    with pytest.raises(InvalidArgument, match="begin"):
        w.delete_range(b"q", b"p")
    info = w.finish()
    assert (info.smallest, info.largest, info.num_entries, info.num_range_deletions) == \
        (b"0", b"y", 2, 2)
    with pytest.raises(InvalidArgument, match="already finished"):
        w.put(b"z", b"late")
    r = TableReader(str(tmp_path / "a.sst"), 0)
    assert r.properties["external"] is True
    assert list(r.entries()) == [(b"b", KIND_PUT, b"1"), (b"c", KIND_DELETE, None)]
    assert sorted(r.range_tombstones) == [(b"0", b"1", 0), (b"x", b"y", 0)]
    r.close()


def test_writer_refuses_an_empty_file_and_removes_it(tmp_path):
    w = SstFileWriter(tmp_path / "e.sst")
    with pytest.raises(InvalidArgument, match="no entries"):
        w.finish()
    assert not (tmp_path / "e.sst").exists()
    with pytest.raises(ValueError), SstFileWriter(tmp_path / "f.sst") as w:
        w.put(b"a", b"1")
        raise ValueError("abandon")
    assert not (tmp_path / "f.sst").exists()


# ------------------------------------------------------------------ placement


def test_ingest_into_empty_db_lands_at_the_bottom_level_and_survives_reopen(tmp_path):
    path = tmp_path / "db"
    f = external(tmp_path / "a.sst", {b"a": b"1", b"b": None, b"c": b"3"})
    with DB.open(path, opts()) as db:
        db.ingest([f])
        assert level_of(db, b"a") == [BOTTOM]
        assert db.property("sequence") == 1
        assert [db.get(k) for k in (b"a", b"b", b"c")] == [b"1", None, b"3"]
        db.check()
    with DB.open(path, opts()) as db:
        assert level_of(db, b"a") == [BOTTOM]
        (f_meta,) = [f for _, f in db._sv[2].files()]
        assert (f_meta.global_seq, f_meta.smallest_seq, f_meta.largest_seq) == (1, 1, 1)
        # The next write comes after the ingested sequence number, even with no WAL.
        assert db.property("sequence") == 1
        db.put(b"a", b"after")
        assert db.property("sequence") == 2
        assert list(db.iterator()) == [(b"a", b"after"), (b"c", b"3")]
        db.check()


def test_each_file_goes_to_the_deepest_level_with_nothing_overlapping_above(tmp_path):
    path = tmp_path / "db"
    with DB.open(path, opts()) as db:
        db.ingest([external(tmp_path / "x.sst", {b"a": b"x", b"b": b"x", b"c": b"x"})])
        db.ingest([external(tmp_path / "y.sst", {b"b": b"y"})])
        db.ingest([external(tmp_path / "z.sst", {b"b": b"z", b"c": b"z"})])
        # A file meeting nothing goes to the bottom beside the others.
        db.ingest([external(tmp_path / "w.sst", {b"m": b"w"})])
        assert sorted(lv for lv, _ in db._sv[2].files()) == [BOTTOM - 2, BOTTOM - 1, BOTTOM, BOTTOM]
        want = [(b"a", b"x"), (b"b", b"z"), (b"c", b"z"), (b"m", b"w")]
        assert list(db.iterator()) == want
        assert list(db.iterator(reverse=True)) == want[::-1]
        db.check()
    with DB.open(path, opts()) as db:
        assert list(db.iterator()) == want
        db.compact_range()
        assert list(db.iterator()) == want
        # Compaction outputs are ordinary tables; [m] met nothing and stayed as it was.
        files = {f.smallest: f for _, f in db._sv[2].files()}
        assert sorted(files) == [b"a", b"m"]
        assert files[b"a"].global_seq is None and files[b"m"].global_seq is not None
        db.check()
    with DB.open(path, opts()) as db:
        assert list(db.iterator()) == want


def test_file_goes_to_level0_when_level0_overlaps_and_above_an_overlapping_level(tmp_path):
    with DB.open(tmp_path / "db", opts()) as db:
        db.put(b"k", b"old")
        db.put(b"z", b"old")
        db.flush()
        db.compact_range()
        assert level_of(db, b"k") == [1]
        # Meets level 1 only: the level above it.
        db.ingest([external(tmp_path / "a.sst", {b"k": b"new"})])
        assert sorted(level_of(db, b"k")) == [0, 1]
        db.put(b"m", b"mem")
        db.flush()  # level 0 now holds [m], and the ingested [k]
        db.ingest([external(tmp_path / "b.sst", {b"l": b"x", b"n": b"newer"})])
        # Level 0's [m] meets it: it stays in level 0, as the newest epoch there.
        assert [lv for lv, f in db._sv[2].files() if f.smallest == b"l"] == [0]
        assert db._sv[2].levels[0][0].smallest == b"l"
        assert db.property("level0_epochs") == sorted(db.property("level0_epochs"), reverse=True)
        assert list(db.iterator()) == [(b"k", b"new"), (b"l", b"x"), (b"m", b"mem"),
                                       (b"n", b"newer"), (b"z", b"old")]
        db.check()


def test_a_running_compaction_keeps_the_file_above_its_output_level():
    def meta(n: int, lo: bytes, hi: bytes) -> FileMeta:
        return FileMeta(n, 1, lo, hi, 1, 1, n)

    levels: list[list[FileMeta]] = [[] for _ in range(7)]
    levels[2] = [meta(1, b"a", b"c")]
    levels[3] = [meta(2, b"x", b"z")]
    version = Version(levels)
    assert target_level(version, [], b"m", b"n") == 6
    # Its inputs span [a, z] and it writes into level 3: [m, n] must stay above.
    running = Compaction(2, 3, [levels[2][0]], [levels[3][0]], bottommost=True)
    assert target_level(version, [running], b"m", b"n") == 2
    assert target_level(version, [running], b"d", b"e") == 2
    assert target_level(version, [], b"b", b"b") == 1


# ------------------------------------------------------------- memtable overlap


def test_overlapping_memtable_is_flushed_first_and_the_ingested_value_wins(tmp_path):
    path = tmp_path / "db"
    with DB.open(path, opts()) as db:
        db.put(b"k", b"memtable")
        db.put(b"q", b"other")
        flushes = db.stats["flushes"]
        db.ingest([external(tmp_path / "a.sst", {b"k": b"ingested"})])
        assert db.stats["flushes"] == flushes + 1
        assert db.property("stats")["memtable_bytes"] == 0
        assert db.get(b"k") == b"ingested"
        assert level_of(db, b"k") == [0, 0]  # above the flushed table, newer epoch
        db.put(b"k", b"later")
        assert db.get(b"k") == b"later"
        db.check()
    with DB.open(path, opts()) as db:
        assert db.get(b"k") == b"later"
        assert db.get(b"q") == b"other"


def test_non_overlapping_memtable_is_not_flushed(tmp_path):
    with DB.open(tmp_path / "db", opts()) as db:
        db.put(b"a", b"1")
        db.put(b"z", b"1")
        db.ingest([external(tmp_path / "a.sst", {b"m": b"x"})])
        assert db.stats["flushes"] == 0
        assert level_of(db, b"m") == [BOTTOM]
        assert list(db.iterator()) == [(b"a", b"1"), (b"m", b"x"), (b"z", b"1")]


def test_a_memtable_range_tombstone_over_the_file_forces_the_flush(tmp_path):
    with DB.open(tmp_path / "db", opts()) as db:
        db.put(b"a", b"1")
        db.delete_range(b"j", b"p")  # holds no key of the file, but covers its range
        db.ingest([external(tmp_path / "a.sst", {b"m": b"x"})])
        assert db.stats["flushes"] == 1
        assert db.get(b"m") == b"x"
        db.check()


# ------------------------------------------------------ range tombstones, snapshots


def test_ingested_deletions_and_range_tombstones_hide_older_data_only(tmp_path):
    path = tmp_path / "db"
    with DB.open(path, opts()) as db:
        for k in (b"a", b"b", b"c", b"d", b"e"):
            db.put(k, b"old")
        db.flush()
        f = external(tmp_path / "a.sst", {b"a": None, b"c": b"new"}, [(b"d", b"f")])
        db.ingest([f])
        want = [(b"b", b"old"), (b"c", b"new")]
        assert list(db.iterator()) == want
        assert db.get(b"e") is None and db.get(b"a") is None
        db.put(b"e", b"after")  # a write after the ingestion is above its tombstone
        want.append((b"e", b"after"))
        assert list(db.iterator()) == want
        db.compact_range()
        assert list(db.iterator()) == want
        db.check()
    with DB.open(path, opts()) as db:
        assert list(db.iterator()) == want


def test_snapshots_taken_before_ingestion_do_not_see_it(tmp_path):
    with DB.open(tmp_path / "db", opts()) as db:
        db.put(b"k", b"old")
        db.put(b"gone", b"old")
        db.flush()
        db.put(b"mem", b"1")  # not in the file's range: stays in the memtable
        snap = db.snapshot()
        db.ingest([external(tmp_path / "a.sst", {b"k": b"new", b"gone": None, b"fresh": b"1"})])
        assert db.stats["flushes"] == 1
        before = [(b"gone", b"old"), (b"k", b"old"), (b"mem", b"1")]
        after = [(b"fresh", b"1"), (b"k", b"new"), (b"mem", b"1")]
        for _ in range(2):
            assert db.get(b"k", snapshot=snap) == b"old"
            assert db.get(b"fresh", snapshot=snap) is None
            assert list(db.iterator(snapshot=snap)) == before
            assert list(db.iterator(reverse=True, snapshot=snap)) == before[::-1]
            assert list(db.iterator()) == after
            later = db.snapshot()
            assert list(db.iterator(snapshot=later)) == after
            later.release()
            # Compaction keeps what the snapshot sees.
            db.compact_range()
        snap.release()
        db.compact_range()
        assert list(db.iterator()) == after
        db.check()


# ---------------------------------------------------------------- refusals


def test_bad_files_are_refused_with_the_database_unchanged(tmp_path):
    path = tmp_path / "db"
    good = external(tmp_path / "good.sst", {b"g": b"1"})
    corrupt = external(tmp_path / "corrupt.sst", {b"c%03d" % i: b"v" * 50 for i in range(40)})
    data = bytearray(Path(corrupt).read_bytes())
    data[100] ^= 0x55  # inside the first data block
    Path(corrupt).write_bytes(bytes(data))
    unsorted = str(tmp_path / "unsorted.sst")
    b = TableBuilder(unsorted)
    b.add_many([b"b", b"a"], [KIND_PUT, KIND_PUT], [b"1", b"2"])
    b.finish({"external": True})
    internal = str(tmp_path / "internal.sst")
    b = TableBuilder(internal)
    b.add(b"i", 5, b"1")
    b.finish()
    with_seq = str(tmp_path / "seq.sst")
    b = TableBuilder(with_seq)
    b.add(b"s", 5, b"1")
    b.finish({"external": True})
    lying = str(tmp_path / "lying.sst")
    b = TableBuilder(lying)
    b.add(b"l", 0, b"1")
    b.finish({"external": True, "largest_key": b"z".hex()})
    over1 = external(tmp_path / "o1.sst", {b"a": b"1", b"m": b"1"})
    over2 = external(tmp_path / "o2.sst", {b"k": b"2"})
    with DB.open(path, opts()) as db:
        db.put(b"x", b"1")
        db.flush()
        db.put(b"y", b"2")
        before = state(db)
        cases = [
            ([good, corrupt], "corrupt.sst.*checksum"),
            ([unsorted], "unsorted.sst"),
            ([internal], "internal.sst: not an external table"),
            ([with_seq], "seq.sst: key b's' has sequence number 5"),
            ([lying], "lying.sst: property largest_key"),
            ([over1, over2], "o1.sst and .*o2.sst together: their key ranges overlap"),
            ([good, good], "overlap"),
            ([str(tmp_path / "missing.sst")], "missing.sst: no such file"),
        ]
        for paths, message in cases:
            with pytest.raises(IngestionError, match=message):
                db.ingest(paths)
            assert state(db) == before, paths
        db.ingest([good])
        assert db.get(b"g") == b"1"
        # The same file once more is fine when copied: it is new data again ...
        db.ingest([good])
        # ... but a table of the database itself is refused.
        own = next(Path(path).glob("*.sst"))
        copy_of_state = state(db)
        with pytest.raises(IngestionError, match="not an external table|already a table"):
            db.ingest([str(own)])
        assert state(db) == copy_of_state
    with DB.open(path, opts()) as db:
        assert db.get(b"g") == b"1" and db.get(b"y") == b"2"
        db.check()


def test_a_moved_file_is_linked_and_cannot_be_ingested_again(tmp_path):
    path = tmp_path / "db"
    moved = external(tmp_path / "m.sst", {b"m": b"1"})
    copied = external(tmp_path / "c.sst", {b"c": b"1"})
    with DB.open(path, opts()) as db:
        db.ingest([moved], move=True)
        db.ingest([copied])
        tables = {f.smallest: Path(path, f"{f.number:06d}.sst") for _, f in db._sv[2].files()}
        st, inside = os.stat(moved), os.stat(tables[b"m"])
        assert st.st_ino == inside.st_ino and st.st_nlink == 2
        assert os.stat(copied).st_ino != os.stat(tables[b"c"]).st_ino
        assert os.stat(copied).st_nlink == 1
        before = state(db)
        with pytest.raises(IngestionError, match="already a table"):
            db.ingest([moved])
        assert state(db) == before
    os.unlink(moved)  # the database keeps its own name for the data
    with DB.open(path, opts()) as db:
        assert db.get(b"m") == b"1" and db.get(b"c") == b"1"
        db.check()


def test_move_copies_when_the_filesystem_cannot_link(tmp_path, monkeypatch):
    src = external(tmp_path / "m.sst", {b"m": b"1"})

    def no_link(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    with DB.open(tmp_path / "db", opts()) as db:
        db.ingest([src], move=True)
        (f,) = [f for _, f in db._sv[2].files()]
        assert os.stat(src).st_nlink == 1
        assert os.stat(Path(db.path, f"{f.number:06d}.sst")).st_ino != os.stat(src).st_ino
        assert db.get(b"m") == b"1"


# ------------------------------------------------- level 0 ordering (epoch numbers)


@pytest.mark.parametrize("order", ["compact-then-flush", "flush-then-compact"])
def test_compacted_ingested_files_and_a_later_flush_are_no_false_corruption(tmp_path, order):
    """RocksDB case 1: two ingested files take sequence numbers inside the range of
    the memtable's writes; they are compacted, then the memtable is flushed. Checked
    or ordered by sequence ranges this looked like corruption (a level-0 table whose
    sequence range contains another's); by epoch it is fine. The second order leaves
    all of them side by side in level 0 before compacting."""
    path = tmp_path / "db"
    o = opts(level0_file_num_compaction_trigger=3 if order == "compact-then-flush" else 100)
    with DB.open(path, o) as db:
        # Seen by no put, this snapshot keeps compaction from writing the bottommost
        # puts with sequence number 0, which would take the ranges apart.
        before_all = db.snapshot()
        db.put(b"a", b"base")
        db.put(b"z", b"base")
        db.flush()  # level 0: [a, z], so the ingested files stay in level 0
        db.put(b"zz", b"mem-1")  # memtable, outside the ingested ranges
        db.ingest([external(tmp_path / "1.sst", {b"c": b"i1", b"d": b"i1"})])
        db.ingest([external(tmp_path / "2.sst", {b"e": b"i2", b"f": b"i2"})])
        seq_ingested = db.property("sequence")
        db.put(b"zzz", b"mem-2")
        db.put(b"c", b"mem-c")  # overlaps an ingested file, newer than it
        want = [(b"a", b"base"), (b"c", b"mem-c"), (b"d", b"i1"), (b"e", b"i2"),
                (b"f", b"i2"), (b"z", b"base"), (b"zz", b"mem-1"), (b"zzz", b"mem-2")]
        if order == "compact-then-flush":
            db.wait_for_compactions()  # three level-0 files: compacted together
            assert db.property("levels")[0]["files"] == 0
            db.flush()
            (flushed,) = db._sv[2].levels[0]
            (compacted,) = db._sv[2].levels[1]
            assert compacted.smallest_seq < flushed.smallest_seq <= compacted.largest_seq
            assert flushed.epoch > compacted.epoch
        else:
            db.flush()
            flushed, newer, older, base = db._sv[2].levels[0]
            # The flushed table's sequence range contains both ingested tables'.
            assert flushed.smallest_seq < older.largest_seq < newer.largest_seq < \
                flushed.largest_seq
            assert [f.largest_seq for f in (newer, older)] == [seq_ingested, seq_ingested - 1]
            assert flushed.smallest_seq < base.largest_seq or base.largest_seq < older.smallest_seq
            db.check()
            assert list(db.iterator()) == want
            assert db.get(b"c") == b"mem-c"
            db.compact_range()
        flushed = max(f.largest_seq for f in db._sv[2].levels[0]) if db._sv[2].levels[0] else 0
        assert flushed == 0 or flushed > seq_ingested
        assert list(db.iterator()) == want
        assert db.get(b"c") == b"mem-c"
        db.check()
        before_all.release()
    with DB.open(path, o) as db:
        db.check()
        assert list(db.iterator()) == want
        db.compact_range()
        assert list(db.iterator()) == want
        db.check()


def test_the_newest_value_always_wins_across_ingestions_single_delete_and_compaction(tmp_path):
    """RocksDB case 2: an old value of k in a table, k rewritten in the memtable,
    two ingestions (sequence numbers above the rewrite), a single delete, a flush and
    compactions. A compaction output holding the old k and the ingested files has a
    higher largest sequence number than the table with the new k; ordered by
    sequence numbers, the old value came back."""
    path = tmp_path / "db"
    o = opts(level0_file_num_compaction_trigger=3)
    with DB.open(path, o) as db:
        # Seen by no put, this snapshot keeps compaction from writing the bottommost
        # puts with sequence number 0 (the output's range is the point of the case).
        before_all = db.snapshot()
        db.put(b"a", b"x")
        db.put(b"k", b"v1")
        db.put(b"s", b"once")
        db.put(b"z", b"x")
        db.flush()  # level 0: [a .. z] holding the old k
        db.put(b"k", b"v2")  # the rewrite, in the memtable
        db.ingest([external(tmp_path / "1.sst", {b"b": b"i1"})])
        assert db.get(b"k") == b"v2"
        db.ingest([external(tmp_path / "2.sst", {b"c": b"i2"})])
        assert db.get(b"k") == b"v2"
        db.single_delete(b"s")
        db.wait_for_compactions()  # old k and both ingested files: one output, level 1
        (out,) = db._sv[2].levels[1]
        assert out.largest_seq > db._sv[0].version(b"k", None)[0]
        assert db.get(b"k") == b"v2"
        before_all.release()
        db.flush()
        want = [(b"a", b"x"), (b"b", b"i1"), (b"c", b"i2"), (b"k", b"v2"), (b"z", b"x")]
        for step in ("flushed", "compacted", "reopened"):
            assert db.get(b"k") == b"v2", step
            assert db.get(b"s") is None, step
            assert list(db.iterator()) == want, step
            assert list(db.iterator(reverse=True)) == want[::-1], step
            db.check()
            if step == "flushed":
                db.compact_range()
                db.wait_for_compactions()
            elif step == "compacted":
                db.close()
                db = DB.open(path, o)
        db.close()


# ---------------------------------------------------------------------- manifest


def test_old_manifest_rows_without_a_global_sequence_still_read():
    row = [1, 7, 100, "61", "62", 3, 4, 2, 5]
    level, f = FileMeta.from_json(row)
    assert (level, f.number, f.global_seq) == (1, 7, None)
    assert f.to_json(1) == row
    f.global_seq = 9
    assert FileMeta.from_json(f.to_json(1))[1].global_seq == 9
    edit = VersionEdit(new_files=[(1, f)])
    assert VersionEdit.decode(edit.encode(), "m", 0).new_files[0][1].global_seq == 9


# ---------------------------------------------------------------------------- CLI


def test_lsmdb_ingest_and_dump_sst(tmp_path, capsys):
    path = tmp_path / "db"
    f1 = external(tmp_path / "1.sst", {b"a": b"1"})
    f2 = external(tmp_path / "2.sst", {b"b": b"2"})
    # Like put, ingest creates a database in a missing directory.
    code, out, err = run_lsmdb(capsys, path, "ingest", f1, f2, "--move")
    assert (code, out, err) == (0, "ingested 2 files\n", "")
    code, out, err = run_lsmdb(capsys, path, "put", "x", "y")
    assert code == 0
    assert os.stat(f1).st_nlink == 2
    code, out, _ = run_lsmdb(capsys, path, "scan")
    assert out == "a\t1\nb\t2\nx\ty\n"
    code, out, err = run_lsmdb(capsys, path, "ingest", str(tmp_path / "none.sst"))
    assert code == 1 and out == ""
    assert err.startswith("lsmdb: error: cannot ingest") and err.count("\n") == 1
    code, out, err = run_lsmdb(capsys, path, "ingest", f1)
    assert code == 1 and "already a table" in err
    code, out, _ = run_lsmdb(capsys, "dump-sst", f1)
    assert code == 0 and "external" in out and "a @ 0 put = 1" in out
    manifest = next(path.glob("MANIFEST-*"))
    code, out, _ = run_lsmdb(capsys, "dump-manifest", manifest)
    assert code == 0 and "ingested at global seq" in out
    code, out, _ = run_lsmdb(capsys, path, "check")
    assert code == 0
