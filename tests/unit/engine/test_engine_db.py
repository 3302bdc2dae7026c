"""The database API: reads, writes, batches, snapshots, iterators, recovery, locking."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time

import pytest
from engine_helpers import small_options

from engine import (
    DB,
    BackgroundError,
    Corruption,
    DBClosed,
    EngineError,
    InvalidArgument,
    LockError,
    Options,
    WriteBatch,
)
from engine.wal import read_records


def crash_copy(src, dst):
    """Copy a live database directory the way a crash would leave it."""
    os.makedirs(dst)
    for name in os.listdir(src):
        try:
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
        except FileNotFoundError:
            pass  # deleted by background work meanwhile, as a crash could see


@pytest.fixture
def opts():
    return small_options()


def test_put_get_delete_overwrite(tmp_path, opts):
    with DB.open(tmp_path / "db", opts) as db:
        assert db.get(b"a") is None
        db.put(b"a", b"1")
        db.put(b"a", b"2")
        db.put(b"b", b"")
        assert db.get(b"a") == b"2" and db.get(b"b") == b""
        db.delete(b"a")
        assert db.get(b"a") is None
        db.put(bytearray(b"c"), memoryview(b"3"))
        assert db.get(b"c") == b"3"
        with pytest.raises(InvalidArgument):
            db.put("text", b"x")
    with pytest.raises(DBClosed):
        db.put(b"a", b"1")


def test_options_and_open_modes(tmp_path):
    with pytest.raises(InvalidArgument, match="does not exist"):
        DB.open(tmp_path / "missing", Options(create_if_missing=False))
    DB.open(tmp_path / "db").close()
    with pytest.raises(InvalidArgument, match="exists"):
        DB.open(tmp_path / "db", Options(error_if_exists=True))
    with pytest.raises(InvalidArgument, match="compression"):
        DB.open(tmp_path / "db", Options(compression="snappy"))
    assert "write_buffer_size=" in (tmp_path / "db" / "OPTIONS").read_text()


def test_write_batch_is_atomic_and_ordered(tmp_path, opts):
    path = tmp_path / "db"
    with DB.open(path, opts) as db:
        b = WriteBatch()
        b.put(b"k", b"first")
        b.put(b"other", b"x")
        b.delete(b"k")
        b.put(b"k", b"last")
        db.write(b, sync=True)
        assert db.get(b"k") == b"last" and db.get(b"other") == b"x"
        before = db.property("sequence")
        db.write(WriteBatch())
        assert db.property("sequence") == before
    with DB.open(path, opts) as db:
        assert db.get(b"k") == b"last"


def test_snapshots_see_a_fixed_state(tmp_path, opts):
    with DB.open(tmp_path / "db", opts) as db:
        for i in range(300):
            db.put(b"k%03d" % i, b"v1")
        with db.snapshot() as snap:
            for i in range(0, 300, 2):
                db.put(b"k%03d" % i, b"v2")
            db.delete(b"k001")
            db.flush()
            db.compact_range()
            assert db.get(b"k000") == b"v2"
            assert db.get(b"k000", snapshot=snap) == b"v1"
            assert db.get(b"k001", snapshot=snap) == b"v1"
            assert db.get(b"k001") is None
            view = dict(db.iterator(snapshot=snap))
            assert len(view) == 300 and set(view.values()) == {b"v1"}
        db.compact_range()
        assert db.get(b"k002") == b"v2"


def test_iterator_bounds_and_reverse_across_sources(tmp_path, opts):
    model = {}
    rng = random.Random(7)
    with DB.open(tmp_path / "db", opts) as db:
        for round_ in range(4):
            for _ in range(400):
                k = b"%04d" % rng.randrange(600)
                if rng.random() < 0.2:
                    db.delete(k)
                    model.pop(k, None)
                else:
                    v = b"%d" % round_ * rng.randrange(1, 20)
                    db.put(k, v)
                    model[k] = v
            if round_ < 3:
                db.flush()
        levels = db.property("levels")
        assert sum(lv["files"] for lv in levels) > 1
        expect = sorted(model.items())
        assert list(db.iterator()) == expect
        assert list(db.iterator(reverse=True)) == expect[::-1]
        lo, hi = b"0100", b"0350"
        part = [(k, v) for k, v in expect if lo <= k < hi]
        assert list(db.iterator(lower=lo, upper=hi)) == part
        assert list(db.iterator(lower=lo, upper=hi, reverse=True)) == part[::-1]
        assert list(db.iterator(lower=b"0400", upper=b"0300")) == []
        # An iterator is a fixed view even while writes continue.
        it = db.iterator()
        first = next(it)
        db.put(b"0000", b"late")
        db.put(b"9999", b"late")
        assert [first, *it] == expect


def test_reopen_recovers_wal_and_deletes_obsolete_files(tmp_path, opts):
    path = tmp_path / "db"
    db = DB.open(path, opts)
    for i in range(2000):
        db.put(b"key%05d" % i, b"v%d" % i)
    db.wait_for_compactions()
    # Simulate a crash: copy the directory while the database is open.
    db._wal.flush()
    crash = tmp_path / "crash"
    crash_copy(path, crash)
    db.close()
    (crash / "junk.dbtmp").write_bytes(b"x")
    (crash / "compaction-99-0.tmp").write_bytes(b"x")
    (crash / "999999.sst").write_bytes(b"orphan")
    with DB.open(crash, opts) as db2:
        assert all(db2.get(b"key%05d" % i) == b"v%d" % i for i in range(0, 2000, 37))
        db2.check()
        names = os.listdir(crash)
        assert "junk.dbtmp" not in names and "compaction-99-0.tmp" not in names
        assert "999999.sst" not in names
        assert sum(n.startswith("MANIFEST-") for n in names) == 1
        assert sum(n.endswith(".log") for n in names) == 1


def test_torn_wal_tail_is_tolerated(tmp_path, opts):
    path = tmp_path / "db"
    db = DB.open(path, opts)
    db.put(b"a", b"1", sync=True)
    db.put(b"b", b"2", sync=True)
    images = [tmp_path / "cut", tmp_path / "zeros"]
    for image in images:
        crash_copy(path, image)
    db.close()
    for image, zeros in zip(images, (0, 500), strict=True):
        (log,) = [n for n in os.listdir(image) if n.endswith(".log")]
        data = (image / log).read_bytes()
        offset, payload = list(read_records(str(image / log)))[-1]
        end = offset + 12 + len(payload)
        # The second record is torn: cut short, or cut and followed by zeros.
        (image / log).write_bytes(data[:end - 3] + bytes(zeros))
        with DB.open(image, opts) as db2:
            assert db2.get(b"a") == b"1" and db2.get(b"b") is None


def test_wal_record_corrupt_mid_file_is_corruption(tmp_path, opts):
    path = tmp_path / "db"
    db = DB.open(path, opts)
    for i in range(5):
        db.put(b"key%d" % i, b"value%d" % i, sync=True)
    crash = tmp_path / "crash"
    crash_copy(path, crash)
    db.close()
    (log,) = [n for n in os.listdir(crash) if n.endswith(".log")]
    data = bytearray((crash / log).read_bytes())
    data[len(data) // 2] ^= 0x08
    (crash / log).write_bytes(bytes(data))
    with pytest.raises(Corruption) as info:
        DB.open(crash, opts)
    assert log in str(info.value) and info.value.offset is not None
    with pytest.raises(Corruption):
        DB.open(crash, opts)


def test_manifest_corruption_is_reported(tmp_path, opts):
    path = tmp_path / "db"
    with DB.open(path, opts) as db:
        for i in range(500):
            db.put(b"k%04d" % i, b"v" * 50)
    name = (path / "CURRENT").read_text().strip()
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x20
    (path / name).write_bytes(bytes(data))
    with pytest.raises(Corruption) as info:
        DB.open(path, opts)
    assert name in str(info.value)


def _table_files(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".sst"))


def test_sst_data_block_corruption_raises_not_wrong_data(tmp_path, opts):
    path = tmp_path / "db"
    with DB.open(path, opts) as db:
        for i in range(500):
            db.put(b"k%04d" % i, b"v%04d" % i * 10)
        db.compact_range()
    name = _table_files(path)[0]
    data = bytearray((path / name).read_bytes())
    data[100] ^= 0x01  # inside the first data block
    (path / name).write_bytes(bytes(data))
    with DB.open(path, opts) as db:
        with pytest.raises(Corruption) as info:
            for i in range(500):
                assert db.get(b"k%04d" % i) == b"v%04d" % i * 10
        assert name in str(info.value)
        with pytest.raises(Corruption):
            list(db.iterator())
        with pytest.raises(Corruption):
            db.check()


def test_sst_index_and_footer_corruption_fail_open(tmp_path, opts):
    path = tmp_path / "db"
    with DB.open(path, opts) as db:
        for i in range(300):
            db.put(b"k%04d" % i, b"v" * 40)
        db.compact_range()
    name = _table_files(path)[0]
    good = (path / name).read_bytes()
    bad = bytearray(good)
    bad[-10] ^= 0x01  # footer magic
    (path / name).write_bytes(bytes(bad))
    with pytest.raises(Corruption) as info:
        DB.open(path, opts)
    assert name in str(info.value)
    from engine.table_reader import TableReader

    (path / name).write_bytes(good)
    index_off = TableReader(str(path / name), 0).footer_handles[0][0]
    bad = bytearray(good)
    bad[index_off + 2] ^= 0x01
    (path / name).write_bytes(bytes(bad))
    with pytest.raises(Corruption) as info:
        DB.open(path, opts)
    assert name in str(info.value) and f"offset {index_off}" in str(info.value)


def test_lock_same_process(tmp_path, opts):
    db = DB.open(tmp_path / "db", opts)
    with pytest.raises(LockError, match="locked by another process"):
        DB.open(tmp_path / "db", opts)
    db.close()
    DB.open(tmp_path / "db", opts).close()


def test_lock_other_process(tmp_path, opts):
    path = tmp_path / "db"
    with DB.open(path, opts):
        code = ("import sys\nfrom engine import DB, LockError\n"
                "try:\n    DB.open(sys.argv[1])\nexcept LockError as e:\n"
                "    print(e); sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 3, r.stderr
        assert "locked by another process" in r.stdout


def test_threads_write_and_read_concurrently(tmp_path, opts):
    with DB.open(tmp_path / "db", opts) as db:
        errors = []

        def writer(t):
            try:
                for i in range(1500):
                    db.put(b"t%d-%05d" % (t, i), b"%d" % i)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        def reader():
            try:
                for _ in range(20):
                    for k, v in db.iterator(lower=b"t0-", upper=b"t0-~"):
                        assert int(v) == int(k[3:])
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
        threads.append(threading.Thread(target=reader))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(list(db.iterator())) == 4500
        db.check()


def test_forked_background_jobs_fill_every_level(tmp_path):
    opts = small_options(background_processes=True, write_buffer_size=8 << 10,
                         target_file_size_base=8 << 10, max_bytes_for_level_base=16 << 10,
                         max_bytes_for_level_multiplier=2, num_levels=4)
    model = {}
    rng = random.Random(3)
    path = tmp_path / "db"
    with DB.open(path, opts) as db:
        for _ in range(6000):
            k = b"%05d" % rng.randrange(3000)
            v = os.urandom(rng.randrange(1, 40))
            db.put(k, v)
            model[k] = v
        db.wait_for_compactions()
        stats = db.property("stats")
        assert stats["flushes"] > 5 and stats["compactions"] > 0
        assert db.property("levels")[3]["files"] > 0
        assert list(db.iterator()) == sorted(model.items())
        db.check()
    with DB.open(path, opts) as db:
        assert list(db.iterator()) == sorted(model.items())


def test_level0_stop_trigger_does_not_deadlock(tmp_path):
    opts = small_options(level0_file_num_compaction_trigger=2, level0_slowdown_writes_trigger=2,
                         level0_stop_writes_trigger=3, write_buffer_size=4 << 10)
    with DB.open(tmp_path / "db", opts) as db:
        for i in range(4000):
            db.put(b"%06d" % (i * 7919 % 4000), b"x" * 30)
        assert len(list(db.iterator())) == 4000
        assert len(db.property("level0_epochs")) < 3 + 1


def test_compaction_installs_onto_current_version(tmp_path):
    opts = small_options(level0_file_num_compaction_trigger=100)
    with DB.open(tmp_path / "db", opts) as db:
        for round_ in range(3):
            for i in range(50):
                db.put(b"k%03d" % i, b"r%d" % round_)
            db.flush()
        bg = db._background
        with db._lock:
            c = bg.picker.pick_range(db._sv[2], 0, None, None, bg.busy)
            bg.mark_busy(c)
        try:
            # Files being compacted are never picked again.
            with db._lock:
                assert bg.picker.pick_range(db._sv[2], 0, None, None, bg.busy) is None
            # A flush finishes while the compaction is in flight.
            db.put(b"k000", b"during")
            db.put(b"new", b"during")
            db.flush()
            newest = db._sv[2].levels[0][0]
            bg.run_compaction(c)
        finally:
            bg.unmark_busy(c)
        levels = db._sv[2].levels
        assert levels[0] == [newest]
        assert db.get(b"k000") == b"during" and db.get(b"new") == b"during"
        assert db.get(b"k001") == b"r2"
        db.check()


def test_background_error_stops_writes(tmp_path):
    opts = small_options(level0_file_num_compaction_trigger=100)
    db = DB.open(tmp_path / "db", opts)
    try:
        db.put(b"a", b"1")
        db.flush()
        db.put(b"a", b"2")
        db.flush()
        name = sorted(n for n in os.listdir(tmp_path / "db") if n.endswith(".sst"))[0]
        os.unlink(tmp_path / "db" / name)  # the compaction cannot read its input
        with pytest.raises(EngineError):
            db.compact_range()
        with pytest.raises(BackgroundError, match="background error"):
            db.put(b"b", b"1")
    finally:
        db._bg_error = None
        db.close()


def test_recovery_never_reuses_numbers_of_a_crashed_recovery(tmp_path, opts):
    """A recovery killed after writing its MANIFEST but before renaming CURRENT leaves
    that MANIFEST behind; the next recovery must not reuse its number (and append)."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    db = DB.open(a, opts)
    for i in range(300):
        db.put(b"k%04d" % i, b"v" * 50)
    db.flush()
    for i in range(300):
        db.put(b"k%04d" % i, b"w" * 50, sync=True)
    crash_copy(a, b)  # the state a crash leaves, before any recovery
    crash_copy(a, c)
    db.close()
    DB.open(c, opts).close()  # a whole recovery of the same state
    leftovers = [n for n in set(os.listdir(c)) - set(os.listdir(b)) if n.startswith("MANIFEST-")]
    assert leftovers
    for name in leftovers:  # b now looks like a recovery killed before its CURRENT rename
        shutil.copy(c / name, b / name)
    with DB.open(b, opts) as db2:
        db2.compact_range()
    with DB.open(b, opts) as db2:
        db2.check()
        assert all(db2.get(b"k%04d" % i) == b"w" * 50 for i in range(300))


def test_corruption_found_by_a_forked_compaction_names_the_file(tmp_path):
    opts = small_options(background_processes=True, level0_file_num_compaction_trigger=100)
    path = tmp_path / "db"
    with DB.open(path, opts) as db:
        for i in range(400):
            db.put(b"k%04d" % i, b"v" * 40)
        db.flush()
        for i in range(0, 400, 2):
            db.put(b"k%04d" % i, b"w" * 40)
        db.flush()
    name = _table_files(path)[0]
    data = bytearray((path / name).read_bytes())
    data[200] ^= 0x04  # a data block; open only checks footer, index and filter
    (path / name).write_bytes(bytes(data))
    db = DB.open(path, opts)
    try:
        with pytest.raises(Corruption) as info:
            db.compact_range()
        assert name in str(info.value) and info.value.offset is not None
        with pytest.raises(BackgroundError):
            db.put(b"x", b"y")
    finally:
        db._bg_error = None
        db.close()


def test_scan_of_a_single_table_skips_deletions_and_honours_snapshots(tmp_path):
    opts = small_options(level0_file_num_compaction_trigger=100)
    with DB.open(tmp_path / "db", opts) as db:
        for i in range(50):
            db.put(b"k%02d" % i, b"old")
        snap = db.snapshot()
        for i in range(0, 50, 3):
            db.delete(b"k%02d" % i)
        db.put(b"k01", b"new")
        db.flush()  # one level-0 table holds everything, tombstones and kept versions
        assert db.level_file_counts()[0] == 1
        expect = [(b"k%02d" % i, b"new" if i == 1 else b"old") for i in range(50) if i % 3]
        assert list(db.iterator()) == expect
        assert list(db.iterator(lower=b"k10", upper=b"k20")) == [kv for kv in expect
                                                                   if b"k10" <= kv[0] < b"k20"]
        assert list(db.iterator(snapshot=snap)) == [(b"k%02d" % i, b"old") for i in range(50)]
        snap.release()


def test_delete_range(tmp_path, opts):
    path = tmp_path / "db"
    with DB.open(path, opts) as db:
        for i in range(300):
            db.put(b"k%03d" % i, b"v%d" % i)
        db.flush()
        for i in range(100, 150):
            db.put(b"k%03d" % i, b"newer")  # some of the range lives in the memtable
        snap = db.snapshot()
        db.delete_range(b"k100", b"k200")
        db.delete_range(b"k100", b"k200")
        db.delete_range(b"k150", b"k150")  # empty: nothing
        with pytest.raises(InvalidArgument):
            db.delete_range(b"k9", b"k1")
        assert db.get(b"k099") == b"v99" and db.get(b"k200") == b"v200"
        assert all(db.get(b"k%03d" % i) is None for i in range(100, 200))
        assert len(list(db.iterator())) == 200
        assert db.get(b"k120", snapshot=snap) == b"newer"
        assert len(list(db.iterator(snapshot=snap))) == 300
        snap.release()
    with DB.open(path, opts) as db:
        assert len(list(db.iterator())) == 200
        assert db.get(b"k150") is None


def test_concurrent_writers_readers_flushes_and_compactions(tmp_path):
    """Writers on disjoint keys, snapshot readers and manual flushes/compactions run
    at once for a few seconds (two compaction threads, forked jobs); the result
    equals the writers' models, snapshot views stay fixed, and checks pass."""
    opts = small_options(write_buffer_size=32 << 10, target_file_size_base=16 << 10,
                         max_bytes_for_level_base=64 << 10, max_bytes_for_level_multiplier=4,
                         max_background_compactions=2, background_processes=True,
                         block_cache_size=128 << 10)
    db = DB.open(tmp_path / "db", opts)
    models: list[dict] = [{}, {}]
    errors: list[str] = []
    deadline = time.monotonic() + 4

    def writer(t: int) -> None:
        rng = random.Random(t)
        m = models[t]
        try:
            while time.monotonic() < deadline:
                k = b"w%d-%04d" % (t, rng.randrange(1500))
                r = rng.random()
                if r < 0.7:
                    v = os.urandom(rng.randrange(1, 50))
                    db.put(k, v)
                    m[k] = v
                elif r < 0.8:
                    db.delete(k)
                    m.pop(k, None)
                else:
                    b = WriteBatch()
                    for i in range(10):
                        kk = b"w%d-%04d" % (t, (int(k[3:]) + i) % 1500)
                        b.put(kk, b"batch")
                        m[kk] = b"batch"
                    db.write(b)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"writer: {exc!r}")

    def reader() -> None:
        try:
            while time.monotonic() < deadline:
                with db.snapshot() as s:
                    a = list(db.iterator(lower=b"w0-", upper=b"w0-~", snapshot=s))
                    assert a == list(db.iterator(lower=b"w0-", upper=b"w0-~", snapshot=s))
                    assert a[::-1] == list(db.iterator(lower=b"w0-", upper=b"w0-~",
                                                       snapshot=s, reverse=True))
                    for k, v in a[:20]:
                        assert db.get(k, snapshot=s) == v
        except Exception as exc:  # noqa: BLE001
            errors.append(f"reader: {exc!r}")

    def admin() -> None:
        try:
            while time.monotonic() < deadline:
                time.sleep(0.5)
                db.flush()
                db.compact_range(b"w1-", b"w1-~")
                db.check()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"admin: {exc!r}")

    threads = [threading.Thread(target=writer, args=(0,)), threading.Thread(target=writer, args=(1,)),
               threading.Thread(target=reader), threading.Thread(target=admin)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        expect = {**models[0], **models[1]}
        assert dict(db.iterator()) == expect
        assert db.property("stats")["compactions"] > 0
        db.check()
    finally:
        db.close()
    with DB.open(tmp_path / "db", opts) as db2:
        assert dict(db2.iterator()) == expect


def test_writes_into_an_overrunning_memtable_are_paced_not_stopped(tmp_path):
    """While the only immutable slot is still flushing, writes past write_buffer_size
    sleep in small steps at the delayed write rate; the switch after the flush ends it."""
    # 20 KiB of paced writes fit below the hard limit of 1.5 x 64 KiB.
    db = DB.open(str(tmp_path / "db"), small_options(write_buffer_size=64 << 10))
    release = threading.Event()
    flush = db._background.flush_memtable

    def held_flush(imm):
        release.wait(30)
        flush(imm)

    db._background.flush_memtable = held_flush
    pacing = db._write_controller
    try:
        value = b"v" * 1000
        i = 0
        while not db._imms:  # fill the first memtable; it becomes immutable and stays
            db.put(b"a%05d" % i, value)
            i += 1
        while not pacing.paced:  # then overrun the active one
            db.put(b"b%05d" % i, value)
            i += 1
        assert pacing.slowdown and db.stats["stall_waits"] == 0
        # The held flush is due in 1 s: the ~30 KiB of room left must last that long.
        pacing.flush_estimate = 1.0
        pacing.flush_deadline = time.monotonic() + 1.0
        start = time.monotonic()
        for j in range(15):
            db.put(b"c%05d" % j, value)
        # 15 of the ~30 KiB: about half the remaining second is spent in short sleeps.
        assert time.monotonic() - start >= 0.3
        assert db.stats["stall_waits"] == 0 and len(db._imms) == 1
    finally:
        release.set()
    db.flush()
    assert not pacing.paced and not pacing.slowdown
    assert db.get(b"c00014") == value and db.get(b"a00000") == value
    db.close()
