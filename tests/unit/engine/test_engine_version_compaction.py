"""Version edits, the MANIFEST, level invariants, compaction picking and merging."""

from __future__ import annotations

import pytest

from engine.compaction import CompactionPicker, compaction_job
from engine.errors import Corruption
from engine.table_builder import TableBuilder
from engine.table_reader import TableReader
from engine.version import (
    FileMeta,
    Version,
    VersionEdit,
    VersionSet,
    apply_edit,
    check_version,
)


def meta(number, smallest, largest, epoch=1, size=100):
    return FileMeta(number, size, smallest, largest, 1, 10, epoch, 5)


def test_edit_round_trip():
    edit = VersionEdit(log_number=3, next_file_number=9, last_sequence=44, next_epoch=6,
                       new_files=[(1, meta(7, b"a\x00", b"z", epoch=4))],
                       deleted_files=[(0, 5)])
    back = VersionEdit.decode(edit.encode(), "M", 0)
    assert back.log_number == 3 and back.next_file_number == 9
    assert back.last_sequence == 44 and back.next_epoch == 6
    assert back.deleted_files == [(0, 5)]
    (level, f), = back.new_files
    assert level == 1 and (f.number, f.smallest, f.largest, f.epoch) == (7, b"a\x00", b"z", 4)


def test_malformed_edit_is_corruption():
    with pytest.raises(Corruption, match="malformed version edit"):
        VersionEdit.decode(b"{not json", "MANIFEST-000001", 12)


def test_apply_orders_level0_by_epoch_not_number():
    v = Version([[] for _ in range(3)])
    v = apply_edit(v, VersionEdit(new_files=[(0, meta(10, b"a", b"c", epoch=2)),
                                             (0, meta(4, b"a", b"c", epoch=7)),
                                             (1, meta(5, b"m", b"n")),
                                             (1, meta(6, b"a", b"b"))]))
    assert [f.number for f in v.levels[0]] == [4, 10]
    assert [f.number for f in v.levels[1]] == [6, 5]
    with pytest.raises(KeyError):
        apply_edit(v, VersionEdit(deleted_files=[(1, 10)]))


def test_check_version_finds_broken_invariants():
    good = Version([[meta(2, b"a", b"c", 3), meta(1, b"b", b"d", 2)], [meta(3, b"a", b"b")], []])
    check_version(good, "M", 10, 10)
    overlap = Version([[], [meta(1, b"a", b"c"), meta(2, b"c", b"d")], []])
    with pytest.raises(Corruption, match="overlap"):
        check_version(overlap, "M", 10, 10)
    epochs = Version([[meta(1, b"a", b"c", 3), meta(2, b"a", b"c", 3)], [], []])
    with pytest.raises(Corruption, match="epoch order"):
        check_version(epochs, "M", 10, 10)
    backwards = Version([[], [meta(1, b"z", b"a")], []])
    with pytest.raises(Corruption, match="smallest key > largest"):
        check_version(backwards, "M", 10, 10)
    with pytest.raises(Corruption, match="epoch"):
        check_version(good, "M", 3, 10)


def test_version_set_persists_and_recovers(tmp_path):
    vs = VersionSet(str(tmp_path), 4)
    vs.write_snapshot()
    vs.log_and_apply(VersionEdit(new_files=[(0, meta(vs.new_file_number(), b"a", b"b", 1))],
                                 next_epoch=2, last_sequence=10, log_number=1))
    vs.log_and_apply(VersionEdit(new_files=[(2, meta(vs.new_file_number(), b"c", b"d", 1))]))
    vs.close()
    back = VersionSet(str(tmp_path), 4)
    back.recover()
    assert [[f.number for f in files] for files in back.current.levels] == [[3], [], [4], []]
    assert back.next_epoch == 2 and back.last_sequence == 10 and back.log_number == 1
    assert back.next_file_number >= 5


def test_flipped_byte_in_manifest_is_corruption(tmp_path):
    vs = VersionSet(str(tmp_path), 4)
    vs.write_snapshot()
    vs.log_and_apply(VersionEdit(new_files=[(0, meta(vs.new_file_number(), b"a", b"b", 1))],
                                 next_epoch=2))
    vs.close()
    name = (tmp_path / "CURRENT").read_text().strip()
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    data[20] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(Corruption) as info:
        VersionSet(str(tmp_path), 4).recover()
    assert name in str(info.value)


def test_bad_current_is_corruption(tmp_path):
    (tmp_path / "CURRENT").write_text("garbage")
    with pytest.raises(Corruption, match="CURRENT"):
        VersionSet(str(tmp_path), 4).recover()


def test_picker_level0_trigger_and_busy_files():
    p = CompactionPicker(4, 2, 1000, 10)
    l0 = [meta(5, b"a", b"m", 3), meta(4, b"k", b"z", 2)]
    l1 = [meta(1, b"a", b"c"), meta(2, b"x", b"y"), meta(3, b"zz", b"zzz")]
    v = Version([l0, l1, [], []])
    c = p.pick(v, set())
    assert c is not None and c.level == 0 and c.output_level == 1
    assert [f.number for f in c.inputs] == [5, 4]
    assert sorted(f.number for f in c.overlapping) == [1, 2]
    assert c.epoch == 1 and c.bottommost and not c.trivial_move
    assert p.pick(v, {4}) is None  # part of level 0 is already being compacted
    assert p.pick(v, {2}) is None  # an overlapping level-1 file is busy
    assert p.pick(Version([l0[:1], [], [], []]), set()) is None  # below the trigger


def test_picker_level_by_size_skips_busy_and_moves_trivially():
    p = CompactionPicker(4, 4, 1000, 10)
    l1 = [meta(1, b"a", b"b", size=600), meta(2, b"c", b"d", size=600)]
    l2 = [meta(3, b"c", b"cc")]
    v = Version([[], l1, l2, []])
    c = p.pick(v, set())
    assert c is not None and c.level == 1
    first = c.inputs[0].number
    assert c.trivial_move == (first == 1)
    c2 = p.pick(v, {first})
    assert c2 is not None and c2.inputs[0].number != first
    assert p.pick(v, {1, 2}) is None


def _table(path, entries):
    b = TableBuilder(str(path), block_size=64)
    for e in entries:
        b.add(*e)
    b.finish()
    return str(path)


def test_compaction_job_keeps_what_snapshots_see(tmp_path):
    newer = _table(tmp_path / "1.sst", [(b"a", 30, b"a30"), (b"b", 31, None), (b"c", 32, b"c32")])
    older = _table(tmp_path / "2.sst", [(b"a", 10, b"a10"), (b"a", 5, b"a5"), (b"b", 11, b"b11"),
                                         (b"d", 12, None)])
    outs = compaction_job([[newer], [older]], str(tmp_path / "out-"), [20], True, 1 << 20,
                          4096, "none", 10)
    (out,) = outs
    got = list(TableReader(out["path"], 0).entries())
    assert got == [
        (b"a", 30 << 8 | 1, b"a30"),
        (b"a", 0 << 8 | 1, b"a10"),     # seen by the snapshot at 20 (every snapshot): seq 0
        (b"b", 31 << 8 | 0, None),      # tombstone kept: the snapshot sees b11 beneath it
        (b"b", 0 << 8 | 1, b"b11"),
        (b"c", 32 << 8 | 1, b"c32"),
    ]                                   # a5 and the bottommost d tombstone are gone
    outs = compaction_job([[newer], [older]], str(tmp_path / "out2-"), [], True, 1 << 20,
                          4096, "none", 10)
    got = [(k, t >> 8, v) for k, t, v in TableReader(outs[0]["path"], 0).entries()]
    assert got == [(b"a", 0, b"a30"), (b"c", 0, b"c32")]  # no snapshot: every put at 0
    outs = compaction_job([[newer], [older]], str(tmp_path / "out3-"), [20], False, 1 << 20,
                          4096, "none", 10)
    got = [(k, t >> 8, v) for k, t, v in TableReader(outs[0]["path"], 0).entries()]
    assert (b"a", 10, b"a10") in got  # above the bottommost level numbers stay


def test_compaction_job_splits_outputs_between_keys(tmp_path):
    entries = []
    for i in range(400):
        entries.append((b"k%04d" % i, 1000 + i, b"x" * 50))
        entries.append((b"k%04d" % i, i + 1, b"y" * 50))
    src = _table(tmp_path / "1.sst", entries)
    outs = compaction_job([[src]], str(tmp_path / "o-"), [500], False, 4000, 512, "zlib", 10)
    assert len(outs) > 3
    prev_largest = None
    for out in outs:
        keys = [k for k, _, _ in TableReader(out["path"], 0).entries()]
        assert keys[0] == out["smallest"] and keys[-1] == out["largest"]
        if prev_largest is not None:
            assert prev_largest < out["smallest"]  # versions of a key never straddle files
        prev_largest = out["largest"]
