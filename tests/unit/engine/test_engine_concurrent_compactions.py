"""Concurrent compactions made deterministic with sync points (engine/sync_points.py).

Two compactions run at once on disjoint files while a flush lands; nothing is lost,
levels >= 1 never overlap, a file being compacted is never picked again, and a
table leaves the disk only once no version, iterator or read uses it (and then
always: no leak). Invariant checks on install stop the DB on a bad edit.
"""

from __future__ import annotations

import os
import threading

import pytest
from engine_helpers import small_options

from engine import DB
from engine.compaction import Compaction, CompactionPicker
from engine.errors import BackgroundError, Corruption
from engine.filename import FileKind, numbered, table_name
from engine.sst_file_writer import SstFileWriter
from engine.sync_points import SyncPoints
from engine.version import FileMeta, Version, VersionEdit

VALUE = b"v" * 40


def quiet_options(**kw):
    """No compaction is ever due: the test places every table itself."""
    base = dict(level0_file_num_compaction_trigger=100, max_bytes_for_level_base=1 << 30,
                write_buffer_size=1 << 20, max_background_compactions=2)
    base.update(kw)
    return small_options(**base)


def compact_level(db: DB, level: int) -> None:
    """Compact all of ``level`` into the next level, now, on this thread."""
    bg = db._background
    with db._lock:
        c = bg.picker.pick_range(db._sv[2], level, None, None, bg.busy, bg.running)
        assert c is not None
        bg.mark_busy(c)
    try:
        bg.run_compaction(c)
    finally:
        bg.unmark_busy(c)


def tables_on_disk(path) -> set[int]:
    return set(numbered(os.listdir(path), FileKind.TABLE))


def live_tables(db: DB) -> set[int]:
    return {f.number for _, f in db._sv[2].files()}


def assert_levels_ok(db: DB) -> None:
    version = db._sv[2]
    for level, files in enumerate(version.levels):
        for f in files:
            assert f.smallest <= f.largest
        if level:
            for a, b in zip(files, files[1:], strict=False):
                assert a.largest < b.smallest, f"level {level} overlaps: {a.number} {b.number}"
        else:
            assert [f.epoch for f in files] == sorted((f.epoch for f in files), reverse=True)
    db.check()


def assert_contents(db: DB, model: dict[bytes, bytes]) -> None:
    assert dict(db.iterator()) == model
    assert list(db.iterator(reverse=True)) == sorted(model.items(), reverse=True)
    for key, value in model.items():
        assert db.get(key) == value


def build_two_due_compactions(path, bp: bool) -> dict[bytes, bytes]:
    """A closed database in which, under ``due_options``, both level 0 (keys a...)
    and level 1 (keys k..., overlapping level 2) are due for a real (not trivial)
    compaction on disjoint files."""
    model: dict[bytes, bytes] = {}
    with DB.open(path, quiet_options(background_processes=bp)) as db:
        for i in range(0, 600, 2):
            db.put(b"k%04d" % i, VALUE)
            model[b"k%04d" % i] = VALUE
        db.flush()
        compact_level(db, 0)
        compact_level(db, 1)
        for i in range(600):
            db.put(b"k%04d" % i, b"w" * 40)
            model[b"k%04d" % i] = b"w" * 40
        db.flush()
        compact_level(db, 0)
        for i in range(200):
            db.put(b"a%04d" % i, VALUE)
            model[b"a%04d" % i] = VALUE
        db.flush()
        for i in range(0, 200, 2):
            db.put(b"a%04d" % i, b"x%d" % i)
            model[b"a%04d" % i] = b"x%d" % i
        for i in range(1, 200, 7):
            db.delete(b"a%04d" % i)
            model.pop(b"a%04d" % i, None)
        db.flush()
        counts = db.level_file_counts()
        assert counts[0] == 2 and counts[1] >= 1 and counts[2] >= 1
    return model


def due_options(bp: bool):
    return quiet_options(level0_file_num_compaction_trigger=2,
                         max_bytes_for_level_base=16 << 10, background_processes=bp)


def ingest_table(db: DB, path, keys: list[bytes], model: dict[bytes, bytes]) -> None:
    with SstFileWriter(path) as w:
        for key in keys:
            w.put(key, b"ingested-" + key)
            model[key] = b"ingested-" + key
    db.ingest([path])


@pytest.mark.parametrize("bp", [False, True], ids=["in-process", "forked"])
@pytest.mark.parametrize("held_level", [0, 1])
def test_paused_compaction_races_flush_ingest_and_second_compaction(tmp_path, bp, held_level):
    """Hold the compaction of ``held_level`` after it picked its inputs; meanwhile
    the compaction of the other level, two flushes and two ingestions complete."""
    path = tmp_path / "db"
    model = build_two_due_compactions(path, bp)
    picked: list[Compaction] = []
    held: list[Compaction] = []
    with SyncPoints() as sp:
        sp.pause("compaction:picked", when=lambda c: c.level == held_level)
        sp.watch("compaction:installed")

        def on_pick(c: Compaction) -> None:
            # Runs on the compaction's thread once it passes the point (the held
            # one only after it is released): while it is held, nothing it claimed
            # may be claimed again.
            if held and held[0] is not c:
                claimed = {f.number for f in held[0].all_inputs}
                assert not claimed & {f.number for f in c.all_inputs}, "picked a busy file"
            picked.append(c)

        sp.callback("compaction:picked", on_pick)
        db = DB.open(path, due_options(bp))
        try:
            first = sp.wait_paused("compaction:picked")
            held.append(first)
            assert first.level == held_level and not first.trivial_move
            first_inputs = {f.number for f in first.all_inputs}
            assert first_inputs <= tables_on_disk(path)
            # The other compaction has claimed its inputs before anything lands.
            sp.wait_passed("compaction:picked", 1)
            second = picked[0]
            assert second.level == 1 - held_level and not second.trivial_move
            assert not first_inputs & {f.number for f in second.all_inputs}

            # Two flushes land while the first compaction is held: overwrites in
            # both compactions' ranges, and new keys; with two level-0 tables,
            # level 0 is due again and meets the held compaction's files.
            for i in range(0, 600, 5):
                db.put(b"k%04d" % i, b"new%d" % i)
                model[b"k%04d" % i] = b"new%d" % i
            db.flush()
            for i in range(0, 200, 3):
                db.put(b"a%04d" % i, b"na%d" % i)
                model[b"a%04d" % i] = b"na%d" % i
            for i in range(50):
                db.put(b"m%04d" % i, VALUE)
                model[b"m%04d" % i] = VALUE
            db.delete(b"k0001")
            model.pop(b"k0001", None)
            db.flush()
            # Two ingestions: one meeting the held compaction's keys, one apart.
            ingest_table(db, tmp_path / "over.sst",
                         [b"a%04d" % i for i in range(0, 200, 11)]
                         + [b"k%04d" % i for i in range(3, 600, 13)], model)
            ingest_table(db, tmp_path / "apart.sst", [b"q%04d" % i for i in range(40)], model)

            sp.wait_passed("compaction:installed", 1)
            assert first_inputs <= live_tables(db)
            assert first_inputs <= tables_on_disk(path)
            # Asked now, the picker offers nothing that is being compacted.
            bg = db._background
            with db._lock:
                c = bg.picker.pick(db._sv[2], bg.busy, bg.running)
            assert c is None or not first_inputs & {f.number for f in c.all_inputs}

            sp.release("compaction:picked")
            db.wait_for_compactions()
            assert first in picked
            assert_levels_ok(db)
            assert_contents(db, model)
            # Every input of a real compaction is gone from disk; nothing leaked.
            for c in picked:
                if not c.trivial_move:
                    assert not {f.number for f in c.all_inputs} & tables_on_disk(path)
            assert tables_on_disk(path) == live_tables(db)
            assert not sp.timed_out
        finally:
            sp.disarm()
            db.close()
    with DB.open(path, due_options(bp)) as db:
        db.wait_for_compactions()
        assert_levels_ok(db)
        assert_contents(db, model)
        assert tables_on_disk(path) == live_tables(db)


def two_overlapping_level0_tables(db: DB, model: dict[bytes, bytes]) -> None:
    for i in range(300):
        db.put(b"key%04d" % i, VALUE)
        model[b"key%04d" % i] = VALUE
    db.flush()
    for i in range(0, 300, 3):
        db.put(b"key%04d" % i, b"second%d" % i)
        model[b"key%04d" % i] = b"second%d" % i
    for i in range(1, 300, 10):
        db.delete(b"key%04d" % i)
        model.pop(b"key%04d" % i, None)
    db.flush()


@pytest.mark.parametrize("reverse", [False, True])
def test_iterator_keeps_dropped_tables_until_closed(tmp_path, reverse):
    model: dict[bytes, bytes] = {}
    with DB.open(tmp_path / "db", quiet_options()) as db, SyncPoints() as sp:
        sp.watch("flush:finished")
        two_overlapping_level0_tables(db, model)
        inputs = live_tables(db)
        expected = sorted(model.items(), reverse=reverse)
        it = db.iterator(reverse=reverse)
        head = [next(it) for _ in range(10)]
        db.compact_range()
        assert not inputs & live_tables(db)
        # Still on disk: the iterator's version names them.
        assert inputs <= tables_on_disk(tmp_path / "db")
        db.put(b"key0005", b"after")  # not seen by the open iterator
        db.flush()  # deletes obsolete files, but not these
        sp.wait_passed("flush:finished", 3)
        assert inputs <= tables_on_disk(tmp_path / "db")
        rest = list(it)
        assert head + rest == expected
        # Exhausted: the pin is released and the dropped tables go.
        assert not inputs & tables_on_disk(tmp_path / "db")
        assert tables_on_disk(tmp_path / "db") == live_tables(db)


def test_iterator_closed_or_dropped_early_releases_tables(tmp_path):
    model: dict[bytes, bytes] = {}
    path = tmp_path / "db"
    with DB.open(path, quiet_options()) as db:
        two_overlapping_level0_tables(db, model)
        inputs = live_tables(db)
        started = db.iterator()
        next(started)
        never_started = db.iterator(lower=b"key0100")
        db.compact_range()
        assert inputs <= tables_on_disk(path)
        started.close()
        assert inputs <= tables_on_disk(path)  # the other still pins them
        del never_started
        assert not inputs & tables_on_disk(path)
        assert tables_on_disk(path) == live_tables(db)
        assert_contents(db, model)


def test_tables_pinned_at_close_are_removed_at_next_open(tmp_path):
    model: dict[bytes, bytes] = {}
    path = tmp_path / "db"
    db = DB.open(path, quiet_options())
    two_overlapping_level0_tables(db, model)
    inputs = live_tables(db)
    it = db.iterator()
    next(it)
    db.compact_range()
    db.close()
    assert inputs <= tables_on_disk(path)  # still pinned by the open iterator
    with DB.open(path, quiet_options()) as db2:
        assert not inputs & tables_on_disk(path)
        assert tables_on_disk(path) == live_tables(db2)
        assert_contents(db2, model)
        it.close()  # the old handle's late release unlinks nothing of the new one's
        assert tables_on_disk(path) == live_tables(db2)


def test_unlink_waits_for_every_pinned_version(tmp_path):
    """Two iterators on two versions: a table dropped from both goes only after
    both close; a flush between them (a new version that drops nothing) counts."""
    model: dict[bytes, bytes] = {}
    path = tmp_path / "db"
    with DB.open(path, quiet_options()) as db, SyncPoints() as sp:
        sp.watch("unlink_dropped:before")
        two_overlapping_level0_tables(db, model)
        inputs = live_tables(db)
        old = db.iterator()
        next(old)
        db.put(b"zz", b"1")
        model[b"zz"] = b"1"
        db.flush()
        newer = db.iterator()
        next(newer)
        compact_level(db, 0)
        old.close()
        assert inputs <= tables_on_disk(path)
        assert sp.passed("unlink_dropped:before") == 0
        newer.close()
        assert sp.passed("unlink_dropped:before") == 1
        assert not inputs & tables_on_disk(path)
        assert_contents(db, model)


def test_get_in_flight_keeps_its_tables_until_it_returns(tmp_path):
    """A point read holding a table (its lookup made to wait) while a compaction
    drops that table: the file stays until the read returns the right value."""
    model: dict[bytes, bytes] = {}
    path = tmp_path / "db"
    with DB.open(path, quiet_options()) as db:
        two_overlapping_level0_tables(db, model)
        inputs = live_tables(db)
        newest = db._sv[2].levels[0][0]
        entered, go = threading.Event(), threading.Event()
        lookup = newest.reader.lookup

        def waiting_lookup(*args, **kw):
            entered.set()
            assert go.wait(30)
            return lookup(*args, **kw)

        newest.reader.lookup = waiting_lookup
        got: list[bytes | None] = []
        reader = threading.Thread(target=lambda: got.append(db.get(b"key0003")))
        reader.start()
        assert entered.wait(30)
        db.compact_range()
        assert not inputs & live_tables(db)
        assert inputs <= tables_on_disk(path)  # the read in flight pins them
        go.set()
        reader.join(30)
        assert got == [model[b"key0003"]]
        assert not inputs & tables_on_disk(path)
        assert tables_on_disk(path) == live_tables(db)
        assert not db._sv[2].pins


# ------------------------------------------------------------------ the picker

def meta(number: int, lo: bytes, hi: bytes, epoch: int = 1, size: int = 100) -> FileMeta:
    return FileMeta(number, size, lo, hi, 1, 1, epoch, 1)


def test_picker_never_picks_a_busy_file_or_meets_a_running_output():
    picker = CompactionPicker(4, 2, 100, 10)
    l1 = [meta(10, b"a", b"c"), meta(11, b"e", b"g"), meta(12, b"m", b"p")]
    version = Version([[], l1, [meta(20, b"b", b"b")], []])
    c = picker.pick(version, set())
    assert c is not None and c.level == 1
    busy = {f.number for f in c.all_inputs}
    running = [c]
    seen = [c]
    while True:
        nxt = picker.pick(version, busy, running)
        if nxt is None:
            break
        assert not busy & {f.number for f in nxt.all_inputs}
        for r in running:
            lo, hi = nxt.key_range
            assert not r.output_meets(nxt.output_level, lo, hi)
        busy |= {f.number for f in nxt.all_inputs}
        running.append(nxt)
        seen.append(nxt)
    assert {f.number for c in seen for f in c.inputs} == {10, 11, 12}
    # A running compaction whose output spans [d, n] at level 2 (say its level-2
    # inputs were wide) blocks 11 and 12 (outputs e..g and m..p would meet it).
    wide = Compaction(1, 2, [meta(99, b"d", b"d")], [meta(98, b"d", b"n")], False)
    got = []
    while (nxt := picker.pick(version, {99, 98} | {f.number for c in got for f in c.all_inputs},
                              [wide, *got])) is not None:
        got.append(nxt)
    assert [f.number for c in got for f in c.inputs] == [10]
    # Level 0 goes all together: with one level-0 table busy, none is picked.
    l0 = [meta(30, b"a", b"z", epoch=3), meta(31, b"a", b"z", epoch=2)]
    version = Version([l0, [], [], []])
    assert picker.pick(version, {31}) is None
    assert picker.pick(version, set()) is not None


# ----------------------------------------------------- invariant checks on install

def test_bad_flush_edit_stops_writes_with_reason(tmp_path):
    path = tmp_path / "db"
    with SyncPoints() as sp:
        def swap_bounds(f: FileMeta) -> None:
            f.smallest, f.largest = b"zz", b"aa"

        db = DB.open(path, quiet_options())
        try:
            db.put(b"k", b"v")
            sp.callback("flush:built", swap_bounds)
            with pytest.raises(BackgroundError) as info:
                db.flush()
            message = str(info.value)
            assert "\n" not in message
            assert "smallest key > largest key" in message
            with pytest.raises(BackgroundError):
                db.put(b"k2", b"v")
        finally:
            sp.disarm()
            db.close()
    # Nothing bad reached the MANIFEST: the write is recovered from the log.
    with DB.open(path, quiet_options()) as db:
        assert db.get(b"k") == b"v"
        db.check()


def test_overlapping_compaction_edit_stops_writes_with_reason(tmp_path):
    path = tmp_path / "db"
    model: dict[bytes, bytes] = {}
    db = DB.open(path, quiet_options())
    with SyncPoints() as sp:
        try:
            for i in range(50):
                db.put(b"k%03d" % i, VALUE)
                model[b"k%03d" % i] = VALUE
            db.flush()
            compact_level(db, 0)
            two_overlapping_level0_tables(db, model)

            def widen(edit: VersionEdit) -> None:
                edit.new_files[0][1].smallest = b"a"  # now meets the k... table

            sp.callback("compaction:before_install", widen)
            with pytest.raises(Corruption, match="overlap"):
                db.compact_range()
            with pytest.raises(BackgroundError, match="level 1 tables .* overlap"):
                db.put(b"a", b"b")
        finally:
            sp.disarm()
            db.close()
    with DB.open(path, quiet_options()) as db:
        assert_levels_ok(db)
        assert_contents(db, model)


def test_background_compaction_with_bad_edit_sets_background_error(tmp_path):
    path = tmp_path / "db"
    model = build_two_due_compactions(path, False)
    with SyncPoints() as sp:
        def break_order(edit: VersionEdit) -> None:
            if edit.new_files:
                f = edit.new_files[0][1]
                f.smallest, f.largest = f.largest + b"\xff", f.smallest

        sp.callback("compaction:before_install", break_order)
        db = DB.open(path, due_options(False))
        try:
            with pytest.raises(BackgroundError) as info:
                db.wait_for_compactions()
            assert "smallest key > largest key" in str(info.value)
            with pytest.raises(BackgroundError, match="smallest key > largest key"):
                db.put(b"a", b"b")
        finally:
            sp.disarm()
            db.close()
    with DB.open(path, due_options(False)) as db:
        db.wait_for_compactions()
        assert_levels_ok(db)
        assert_contents(db, model)


def test_epoch_order_is_checked_on_install(tmp_path):
    with DB.open(tmp_path / "db", quiet_options()) as db:
        db.put(b"a", b"1")
        db.flush()
        f = db._sv[2].levels[0][0]
        twin = FileMeta(f.number, f.size, f.smallest, f.largest, f.smallest_seq,
                        f.largest_seq, f.epoch, f.num_entries)
        twin.number = db._vs.new_file_number()
        with pytest.raises(Corruption, match="epoch order"):
            db._vs.log_and_apply(VersionEdit(new_files=[(0, twin)]))
        assert live_tables(db) == {f.number}
        assert os.path.exists(os.path.join(db.path, table_name(f.number)))
        # Whoever installs (here no background thread), writes stop, with the reason.
        with pytest.raises(BackgroundError, match="out of epoch order"):
            db.put(b"b", b"2")
        assert db.get(b"a") == b"1"
    with DB.open(tmp_path / "db", quiet_options()) as db:
        assert db.get(b"a") == b"1"
        db.check()


# ------------------------------------------------------------------ under load

@pytest.mark.parametrize("bp", [False, True], ids=["in-process", "forked"])
def test_two_compaction_threads_under_load_lose_nothing_and_leak_nothing(tmp_path, bp):
    """Writes, deletes and range deletes over a wide key space with tiny buffers,
    two compaction threads, and iterators held open across many compactions, each
    checked against the model as it was when the iterator was made."""
    import random

    rng = random.Random(1234)
    path = tmp_path / "db"
    opts = small_options(write_buffer_size=8 << 10, target_file_size_base=8 << 10,
                         max_bytes_for_level_base=24 << 10, max_bytes_for_level_multiplier=2,
                         max_background_compactions=2, background_processes=bp)
    model: dict[bytes, bytes] = {}
    most_running = [0]
    open_iters: list[tuple[object, list[tuple[bytes, bytes]], list]] = []
    with DB.open(path, opts) as db, SyncPoints() as sp:
        sp.callback("compaction:picked",
                    lambda c: most_running.__setitem__(
                        0, max(most_running[0], len(db._background.running))))
        for n in range(6000):
            key = b"%05d" % rng.randrange(3000)
            op = rng.random()
            if op < 0.8:
                value = b"%d-" % n + b"x" * rng.randrange(10, 60)
                db.put(key, value)
                model[key] = value
            elif op < 0.97:
                db.delete(key)
                model.pop(key, None)
            else:
                end = b"%05d" % (int(key) + rng.randrange(1, 30))
                db.delete_range(key, end)
                for k in [k for k in model if key <= k < end]:
                    del model[k]
            if n % 500 == 0:
                open_iters.append((db.iterator(), sorted(model.items()), []))
            for it, _, seen in open_iters:
                for _ in range(2):
                    item = next(it, None)
                    if item is not None:
                        seen.append(item)
            while len(open_iters) > 3:
                it, expected, seen = open_iters.pop(0)
                seen.extend(it)
                assert seen == expected
        for it, expected, seen in open_iters:
            seen.extend(it)
            assert seen == expected
        open_iters.clear()
        db.wait_for_compactions()
        assert_levels_ok(db)
        assert_contents(db, model)
        assert tables_on_disk(path) == live_tables(db)
        assert db.property("stats")["compactions"] > 5
    assert most_running[0] >= 1
