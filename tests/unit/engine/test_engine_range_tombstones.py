"""DeleteRange: range tombstones in the memtable, in tables, through compaction, with
snapshots and iterators; fragmentation; file bounds and their truncation at output
boundaries; the out-of-order regression from production RocksDB."""

from __future__ import annotations

import random
import shutil

import pytest
from engine_helpers import small_options

import engine.memtable
from engine import DB, InvalidArgument, WriteBatch
from engine.compaction import compaction_job
from engine.range_tombstones import fragment, largest_covered
from engine.table_builder import TableBuilder
from engine.table_reader import TableReader
from engine.write_batch import RangeEnd, decode_batch, encode_batch


def key(i: int) -> bytes:
    return b"k%05d" % i


def value(i: int, tag: bytes = b"v") -> bytes:
    return tag + b"%d-" % i + b"x" * 40


def assert_matches(db: DB, model: dict[bytes, bytes], universe, snapshot=None) -> None:
    """Every key of ``universe`` reads as in ``model``; iterators agree both ways."""
    for k in universe:
        assert db.get(k, snapshot=snapshot) == model.get(k), k
    want = sorted(model.items())
    assert list(db.iterator(snapshot=snapshot)) == want
    assert list(db.iterator(reverse=True, snapshot=snapshot)) == want[::-1]
    lo, hi = key(1234), key(3456)
    assert list(db.iterator(lo, hi, snapshot=snapshot)) == [kv for kv in want if lo <= kv[0] < hi]


def delete_model_range(model: dict[bytes, bytes], begin: bytes, end: bytes) -> None:
    for k in [k for k in model if begin <= k < end]:
        del model[k]


def table_files(db: DB):
    return [(level, f) for level, f in db._sv[2].files()]


def tombstones_on_disk(db: DB) -> list:
    return [t for _, f in table_files(db) for t in f.reader.range_tombstones]


# --------------------------------------------------------------- fragmentation


def brute_covering(tombs, k, snap):
    return max((s for a, b, s in tombs if a <= k < b and (snap is None or s <= snap)), default=0)


def test_fragments_do_not_overlap_and_answer_like_the_tombstones():
    rng = random.Random(7)
    for _ in range(50):
        tombs = []
        for _ in range(rng.randrange(1, 30)):
            a, b = sorted(rng.sample(range(60), 2))
            tombs.append((b"%02d" % a, b"%02d" % b, rng.randrange(1, 100)))
        frags = fragment(tombs)
        assert all(s < e for s, e in zip(frags.starts, frags.ends, strict=True))
        assert all(e <= s for e, s in zip(frags.ends, frags.starts[1:], strict=False))
        assert all(list(seqs) == sorted(seqs, reverse=True) for seqs in frags.seqs)
        for k in range(61):
            kb = b"%02d" % k
            for snap in (None, 10, 50, 99):
                assert frags.covering(kb, snap) == brute_covering(tombs, kb, snap), (kb, snap)
            for v in (0, 20, 60):
                above = [s for a, b, s in tombs if a <= kb < b and s > v]
                assert frags.newest_above(kb, v) == min(above, default=0)


def test_merging_newer_tombstones_one_by_one_matches_fragmenting_them_all():
    rng = random.Random(11)
    for _ in range(40):
        tombs = []
        frags = fragment([])
        for seq in range(1, rng.randrange(2, 40)):
            a, b = sorted(rng.sample(range(60), 2))
            tombs.append((b"%02d" % a, b"%02d" % b, seq))
            frags = frags.with_newest(*tombs[-1])
            assert all(s < e for s, e in zip(frags.starts, frags.ends, strict=True))
            assert all(e <= s for e, s in zip(frags.ends, frags.starts[1:], strict=False))
        for k in range(61):
            kb = b"%02d" % k
            for snap in (None, 5, 20):
                assert frags.covering(kb, snap) == brute_covering(tombs, kb, snap), (kb, snap)
            above = [s for a, b, s in tombs if a <= kb < b and s > 7]
            assert frags.newest_above(kb, 7) == min(above, default=0)


def test_largest_covered_is_exact_for_a_successor_end():
    assert largest_covered(b"abc\x00") == b"abc"
    assert largest_covered(b"abd") == b"abd"  # conservative: one key more than needed


# ------------------------------------------------------------------ write path


def test_write_batch_encodes_range_deletes_and_keeps_order(tmp_path):
    ops = [(b"a", b"1"), (b"a", RangeEnd(b"c")), (b"b", b"2")]
    assert decode_batch("x.log", 0, encode_batch(9, ops)) == (9, ops)
    bad = bytearray(encode_batch(9, [(b"b", RangeEnd(b"c"))]))
    bad[-1] = ord("a")  # end "a" before begin "b"
    with pytest.raises(Exception, match="malformed write batch"):
        decode_batch("x.log", 0, bytes(bad))
    with DB.open(tmp_path / "db", small_options()) as db:
        batch = WriteBatch()
        batch.put(b"a", b"1")
        batch.delete_range(b"a", b"c")  # deletes the put before it, not the one after
        batch.put(b"b", b"2")
        db.write(batch)
        assert db.get(b"a") is None and db.get(b"b") == b"2"
        assert list(db.iterator()) == [(b"b", b"2")]
        with pytest.raises(InvalidArgument):
            db.delete_range(b"z", b"a")


def test_tombstone_in_memtable_and_after_reopen(tmp_path):
    model = {key(i): value(i) for i in range(100)}
    with DB.open(tmp_path / "db", small_options(write_buffer_size=1 << 20)) as db:
        for k, v in model.items():
            db.put(k, v)
        db.delete_range(key(20), key(60))
        delete_model_range(model, key(20), key(60))
        db.put(key(30), b"after", sync=True)  # written after the tombstone: visible
        model[key(30)] = b"after"
        assert db.level_file_counts()[0] == 0  # everything is still in the memtable
        assert_matches(db, model, [key(i) for i in range(101)])
        # A copy taken while open holds the writes only in its log, as after a crash.
        shutil.copytree(tmp_path / "db", tmp_path / "crashed")
    for path in (tmp_path / "crashed", tmp_path / "db"):
        with DB.open(path, small_options(write_buffer_size=1 << 20)) as db:
            assert_matches(db, model, [key(i) for i in range(101)])


def test_delete_range_costs_the_same_however_many_keys_it_covers(tmp_path):
    with DB.open(tmp_path / "db", small_options(write_buffer_size=1 << 22)) as db:
        for i in range(3000):
            db.put(key(i), b"v")
        before = db.property("sequence")
        db.delete_range(key(0), key(3000))
        assert db.property("sequence") == before + 1  # one operation, not 3000
        assert db._mem.range_dels == [(key(0), key(3000), before + 1)]
        assert list(db.iterator()) == []


def test_tombstone_after_flush_lives_in_the_range_tombstone_block(tmp_path):
    model = {key(i): value(i) for i in range(400)}
    with DB.open(tmp_path / "db", small_options()) as db:
        for k, v in model.items():
            db.put(k, v)
        db.flush()
        db.delete_range(key(100), key(300))
        delete_model_range(model, key(100), key(300))
        db.flush()
        assert tombstones_on_disk(db) and all(
            t[:2] == (key(100), key(300)) for t in tombstones_on_disk(db))
        # Nothing was deleted key by key: the covered versions are still on disk.
        assert any(k == key(150) for _, f in table_files(db) for k, _, _ in f.reader.entries())
        assert_matches(db, model, [key(i) for i in range(0, 401, 7)])
        db.check()


def test_tombstone_across_levels_then_dropped_at_the_bottom(tmp_path):
    model = {key(i): value(i) for i in range(600)}
    with DB.open(tmp_path / "db", small_options()) as db:
        for k, v in model.items():
            db.put(k, v)
        db.compact_range()
        assert db.level_file_counts()[0] == 0
        db.delete_range(key(50), key(450))
        delete_model_range(model, key(50), key(450))
        for i in range(0, 600, 10):  # newer puts over the range survive it
            db.put(key(i), value(i, b"new"))
            model[key(i)] = value(i, b"new")
        db.flush()  # tombstone in L0, covered keys in deeper levels
        assert_matches(db, model, [key(i) for i in range(0, 600, 3)])
        db.compact_range()
        db.check()
        assert_matches(db, model, [key(i) for i in range(0, 600, 3)])
        # Bottom of the tree, no snapshot: covered keys and the tombstone are gone.
        assert tombstones_on_disk(db) == []
        on_disk = {k for _, f in table_files(db) for k, _, _ in f.reader.entries()}
        assert on_disk == set(model)


def test_tombstone_is_kept_while_older_data_lies_below(tmp_path):
    """Compacted into a level above data it covers, a tombstone stays (not bottommost)."""
    old = tmp_path / "old.sst"
    b = TableBuilder(str(old))
    b.add(b"m", 5, b"old")
    b.finish()
    new = tmp_path / "new.sst"
    b = TableBuilder(str(new))
    b.add(b"a", 20, b"a")
    b.add_range_tombstone(b"k", b"p", 10)
    b.finish()
    # Only the new table is compacted; the old one is below it (not bottommost).
    (out,) = compaction_job([[str(new)]], str(tmp_path / "o-"), [], False, 1 << 20, 4096,
                            "none", 10)
    assert TableReader(out["path"], 0).range_tombstones == [(b"k", b"p", 10)]
    assert out["largest"] == b"p"
    # Both together at the bottom: the covered put and the tombstone vanish.
    (out,) = compaction_job([[str(new)], [str(old)]], str(tmp_path / "b-"), [], True,
                            1 << 20, 4096, "none", 10)
    r = TableReader(out["path"], 0)
    assert r.range_tombstones == [] and [k for k, _, _ in r.entries()] == [b"a"]


def test_snapshot_older_than_a_tombstone_still_sees_covered_keys(tmp_path):
    model = {key(i): value(i) for i in range(500)}
    with DB.open(tmp_path / "db", small_options()) as db:
        for k, v in model.items():
            db.put(k, v)
        db.flush()
        snap = db.snapshot()
        old = dict(model)
        db.delete_range(key(100), key(400))
        delete_model_range(model, key(100), key(400))
        sample = [key(i) for i in range(0, 500, 9)]
        assert_matches(db, model, sample)
        assert_matches(db, old, sample, snapshot=snap)
        db.flush()
        db.compact_range()  # the compaction must keep what the snapshot sees
        db.check()
        assert_matches(db, model, sample)
        assert_matches(db, old, sample, snapshot=snap)
        assert tombstones_on_disk(db)
        snap.release()
        # compact_range does not rewrite the bottom level by itself: a table spanning
        # the range brings every bottom file holding a piece into the compaction.
        for k in (key(0), key(499)):
            db.put(k, b"edge")
            model[k] = b"edge"
        db.compact_range()
        assert tombstones_on_disk(db) == []
        assert_matches(db, model, sample)


def test_snapshot_newer_than_the_tombstone_does_not_see_covered_keys(tmp_path):
    with DB.open(tmp_path / "db", small_options()) as db:
        for i in range(50):
            db.put(key(i), b"v")
        db.delete_range(key(10), key(20))
        with db.snapshot() as snap:
            db.put(key(15), b"again")
            assert db.get(key(15), snapshot=snap) is None
            assert len(list(db.iterator(snapshot=snap))) == 40
            db.flush()
            db.compact_range()
            assert db.get(key(15), snapshot=snap) is None
            assert db.get(key(15)) == b"again"
            assert len(list(db.iterator(snapshot=snap))) == 40
            assert len(list(db.iterator(reverse=True))) == 41


def test_iterators_honour_tombstones_from_every_source(tmp_path):
    model = {key(i): value(i) for i in range(800)}
    with DB.open(tmp_path / "db", small_options()) as db:
        for k, v in model.items():
            db.put(k, v)
        db.compact_range()
        db.delete_range(key(100), key(200))  # goes to L0
        delete_model_range(model, key(100), key(200))
        db.flush()
        db.delete_range(key(150), key(350))  # stays in the memtable
        delete_model_range(model, key(150), key(350))
        for i in (160, 360):
            db.put(key(i), b"fresh")
            model[key(i)] = b"fresh"
        for lower, upper in [(None, None), (key(90), key(210)), (key(120), key(130)),
                             (key(349), None), (None, key(101))]:
            want = [(k, v) for k, v in sorted(model.items())
                    if (lower is None or k >= lower) and (upper is None or k < upper)]
            assert list(db.iterator(lower, upper)) == want
            assert list(db.iterator(lower, upper, reverse=True)) == want[::-1]


def test_file_bounds_cover_tombstones_beyond_the_keys(tmp_path):
    # no compaction may merge the two level-0 tables this test looks at
    with DB.open(tmp_path / "db", small_options(level0_file_num_compaction_trigger=10)) as db:
        db.put(b"m", b"1")
        db.delete_range(b"x", b"zz")
        db.delete_range(b"c", b"d\x00")
        db.flush()
        ((_, f),) = table_files(db)
        assert f.smallest == b"c" and f.largest == b"zz"
        db.delete_range(b"a", b"b\x00")
        db.flush()
        f = db._sv[2].levels[0][0]
        assert f.smallest == b"a" and f.largest == b"b"  # exclusive end b"b\0": up to b"b"
        db.check()


def test_outputs_truncate_tombstones_at_their_boundaries(tmp_path):
    """A tombstone spanning many outputs is cut at each boundary; levels >= 1 do not
    overlap; every piece lies inside its file's bounds."""
    opts = small_options(target_file_size_base=4 << 10)
    model = {key(i): value(i) for i in range(0, 3000, 3)}
    with DB.open(tmp_path / "db", opts) as db:
        for k, v in model.items():
            db.put(k, v)
        db.compact_range()
        snap = db.snapshot()  # keeps the covered keys, and so the tombstone, alive
        old = dict(model)
        db.delete_range(key(10), key(2990))
        delete_model_range(model, key(10), key(2990))
        db.compact_range()
        db.check()
        version = db._sv[2]
        deep = [files for files in version.levels[1:] if files]
        assert deep and max(len(files) for files in deep) > 3
        pieces = 0
        for files in deep:
            for a, b in zip(files, files[1:], strict=False):
                assert a.largest < b.smallest
            for f in files:
                for start, end, _ in f.reader.range_tombstones:
                    pieces += 1
                    assert f.smallest <= start < end
                    assert largest_covered(end) <= f.largest
        assert pieces > 3
        sample = [key(i) for i in range(0, 3001, 7)]
        assert_matches(db, model, sample)
        assert_matches(db, old, sample, snapshot=snap)
        snap.release()
        for k in (key(0), key(2999)):  # a table spanning every bottom file
            db.put(k, b"edge")
            model[k] = b"edge"
        db.compact_range()
        db.check()
        assert_matches(db, model, sample)
        assert tombstones_on_disk(db) == []


def test_a_thousand_tombstones_read_correctly_and_fragment_once(tmp_path, monkeypatch):
    rng = random.Random(3)
    model = {key(i): value(i) for i in range(5000)}
    with DB.open(tmp_path / "db", small_options(write_buffer_size=1 << 18)) as db:
        for k, v in model.items():
            db.put(k, v)
        db.flush()
        for _ in range(1000):
            a = rng.randrange(5000)
            b = a + rng.randrange(1, 8)
            db.delete_range(key(a), key(b))
            delete_model_range(model, key(a), key(b))
        calls = []
        real = engine.memtable.fragment
        monkeypatch.setattr(engine.memtable, "fragment", lambda t: calls.append(1) or real(t))
        sample = [key(i) for i in range(0, 5000, 3)]
        for k in sample:
            assert db.get(k) == model.get(k)
        assert len(calls) <= 1  # cached: one fragmentation for all these reads
        assert list(db.iterator()) == sorted(model.items())
        db.flush()
        assert_matches(db, model, sample)
        db.compact_range()
        db.check()
        assert_matches(db, model, sample)


def test_out_of_order_tombstones_set_the_smallest_key(tmp_path):
    """Regression for production RocksDB: range tombstones added out of order (the
    earliest-starting one last) left the file's smallest key at the first one added,
    so later compactions missed the file and resurrected or lost keys."""
    model = {}
    with DB.open(tmp_path / "db", small_options()) as db:
        for i in range(0, 2000, 2):
            db.put(key(i), value(i))
            model[key(i)] = value(i)
        db.compact_range()  # old data at the bottom
        db.put(key(1501), b"mid")
        model[key(1501)] = b"mid"
        for begin, end in [(1500, 1600), (900, 1000), (100, 200)]:  # earliest start last
            db.delete_range(key(begin), key(end))
            delete_model_range(model, key(begin), key(end))
        db.flush()
        (f,) = db._sv[2].levels[0]
        assert f.smallest == key(100)  # not key(1500), the first tombstone added
        assert f.largest == key(1600)
        sample = [key(i) for i in range(0, 2001, 5)] + [key(1501)]
        assert_matches(db, model, sample)
        # Later writes and partial compactions, then a full one: nothing comes back,
        # nothing is lost.
        for i in range(1, 2000, 50):
            db.put(key(i), b"later")
            model[key(i)] = b"later"
        db.flush()
        db.compact_range(key(0), key(150))
        assert_matches(db, model, sample)
        db.compact_range(key(950), key(960))
        assert_matches(db, model, sample)
        db.compact_range()
        db.check()
        assert_matches(db, model, sample)
    with DB.open(tmp_path / "db", small_options()) as db:
        db.check()
        assert_matches(db, model, sample)
