"""files.dict: replay, torn tails, corruption with file and offset, salvage, rewrite,
intents, group commit."""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

import pytest

from encfs import filedict
from encfs.disk import disk
from encfs.errors import Corruption
from encfs.filedict import (
    HEADER_SIZE,
    RULE_SRC_GONE,
    RULE_SRC_REPLACED,
    Abort,
    Begin,
    Commit,
    Del,
    FileDictionary,
    FileInfo,
    Put,
)

MAC_KEY = bytes(range(32))


def info(n: int) -> FileInfo:
    return FileInfo("aes-256-ctr", 1 + n % 3, n.to_bytes(16, "big"))


def new_log(tmp_path: Path, **tuning: int) -> FileDictionary:
    path = tmp_path / "files.dict"
    FileDictionary.create(path, MAC_KEY)
    return FileDictionary.open(path, MAC_KEY, **tuning)


def record_offsets(path: Path) -> list[int]:
    """Start offset of every record, plus the end of the file."""
    data = path.read_bytes()
    pos, offsets = HEADER_SIZE, []
    while pos < len(data):
        offsets.append(pos)
        n, _ = filedict._REC_HEAD.unpack_from(data, pos)
        pos += filedict._REC_HEAD.size + n + filedict.MAC_SIZE
    return [*offsets, len(data)]


def test_replay_multi_op_records_and_intents(tmp_path):
    d = new_log(tmp_path)
    d.append([Put(b"a", info(1)), Put(b"b", info(2))])
    d.append([Del(b"a"), Put(b"c/d", info(3))])
    t1 = d.begin(RULE_SRC_GONE, b"b", 7, [Del(b"b"), Put(b"x", info(2))])
    t2 = d.begin(RULE_SRC_GONE, b"c/d", 8, [Del(b"c/d"), Put(b"y", info(3))])
    d.append([Commit(t1)])
    t3 = d.begin(RULE_SRC_GONE, b"x", 9, [Del(b"x")])
    d.append([Abort(t3)])
    assert d.entries == {b"x": info(2), b"c/d": info(3)}
    assert [p.txid for p in d.pending_intents()] == [t2]
    d.close()
    again = FileDictionary.open(d.path, MAC_KEY)
    assert again.entries == {b"x": info(2), b"c/d": info(3)}
    (p,) = again.pending_intents()
    assert (p.txid, p.src) == (t2, b"c/d")
    assert again.begin(RULE_SRC_GONE, b"q", 1, [Del(b"q")]) > t3  # txids never reused
    again.close()


def test_operations_encode_to_the_documented_bytes_and_decode_back():
    iv = bytes(range(16))
    cases = [  # BEGIN first: only there may a record hold it
        (Begin(5, RULE_SRC_REPLACED, b"s", 9),
         b"\x03" + (5).to_bytes(8, "big") + b"\x02" + (9).to_bytes(8, "big") + b"\x00\x01s"),
        (Put(b"a/b", FileInfo("aes-256-ctr", 7, iv)),
         b"\x01\x00\x03a/b\x03\x00\x00\x00\x07" + iv),
        (Del(b"a/b"), b"\x02\x00\x03a/b"),
        (Commit(5), b"\x04" + (5).to_bytes(8, "big")),
        (Abort(6), b"\x05" + (6).to_bytes(8, "big")),
    ]
    for op, raw in cases:
        assert filedict.encode_ops([op]) == raw, op
        assert filedict.decode_ops(raw) == [op]
    ops = [op for op, _ in cases]
    assert filedict.decode_ops(filedict.encode_ops(ops)) == ops
    with pytest.raises(ValueError):
        filedict.encode_ops([("put", b"a", info(1))])  # a tuple is not an operation


def test_torn_last_record_is_dropped_at_every_byte(tmp_path):
    d = new_log(tmp_path)
    for i in range(5):
        d.append([Put(f"f{i}".encode(), info(i))])
    d.append([Put(b"last", info(9)), Del(b"f0")])
    d.close()
    full = d.path.read_bytes()
    offsets = record_offsets(d.path)
    start = offsets[-2]
    expected = {f"f{i}".encode(): info(i) for i in range(5)}
    for cut in range(start, len(full)):
        d.path.write_bytes(full[:cut])
        reopened = FileDictionary.open(d.path, MAC_KEY)
        assert reopened.entries == expected, cut
        assert reopened.dropped_tail == cut - start
        reopened.close()
        # the torn bytes are gone, so the next record chains onto the last good one
        assert d.path.stat().st_size == start
    reopened = FileDictionary.open(d.path, MAC_KEY)
    reopened.append([Put(b"next", info(3))])
    reopened.close()
    assert FileDictionary.open(d.path, MAC_KEY, read_only=True).entries[b"next"] == info(3)


def _flipped_log(tmp_path: Path) -> tuple[FileDictionary, bytes, list[int]]:
    d = new_log(tmp_path)
    for i in range(8):
        d.append([Put(f"f{i}".encode(), info(i))])
    d.close()
    return d, d.path.read_bytes(), record_offsets(d.path)


def test_flipped_byte_mid_log_names_file_and_offset(tmp_path):
    d, full, offsets = _flipped_log(tmp_path)
    bad = 4  # record index
    for pos in range(offsets[bad], offsets[bad + 1]):
        raw = bytearray(full)
        raw[pos] ^= 0x20
        d.path.write_bytes(bytes(raw))
        with pytest.raises(Corruption) as err:
            FileDictionary.open(d.path, MAC_KEY)
        assert err.value.path == str(d.path)
        assert err.value.offset == offsets[bad], pos
        assert str(d.path) in str(err.value) and "offset" in str(err.value)
        assert d.path.read_bytes() == bytes(raw)  # refusing never rewrites the log


def _many_records(tmp_path: Path, key: bytes, n: int = 60) -> tuple[Path, bytes, list[int]]:
    """A log of ``n`` records under MAC key ``key``, record i holding PUT f{i}."""
    path = tmp_path / "files.dict"
    FileDictionary.create(path, key)
    d = FileDictionary.open(path, key)
    for i in range(n):
        d.append([Put(f"f{i}".encode(), info(i))], sync=False)
    d.close()
    return path, path.read_bytes(), record_offsets(path)


def _all_but(n: int, *lost: int) -> dict[bytes, FileInfo]:
    return {f"f{i}".encode(): info(i) for i in range(n) if i not in lost}


def _damaged(path: Path, full: bytes, *flips: tuple[int, int]) -> None:
    raw = bytearray(full)
    for at, bits in flips:
        raw[at] ^= bits
    path.write_bytes(bytes(raw))


def test_salvage_loses_only_the_record_whose_payload_is_damaged(tmp_path):
    key = secrets.token_bytes(32)
    path, full, off = _many_records(tmp_path, key)
    bad = 30
    for at in range(off[bad] + 8, off[bad + 1] - 32):  # every byte of its payload
        _damaged(path, full, (at, 0x04))
        s = FileDictionary.open(path, key, salvage=True, read_only=True)
        assert s.entries == _all_but(60, bad), at
        (region,) = s.salvage.regions
        assert (region.offset, region.length, region.records, region.counted) == \
            (off[bad], off[bad + 1] - off[bad], 1, True)
        assert "MAC mismatch" in region.what and s.salvage.what == region.what
        assert (s.salvage.offset, s.salvage.lost_bytes, s.salvage.lost_records) == \
            (off[bad], off[bad + 1] - off[bad], 1)
    _damaged(path, full, (off[bad + 1] - 40, 0x04))  # in the IV: the path still decodes
    s = FileDictionary.open(path, key, salvage=True, read_only=True)
    assert s.salvage.paths == [b"f30"] and s.salvage.regions[0].paths == [b"f30"]
    assert path.read_bytes() != full  # read_only: the damaged log is left as it is


def test_salvage_after_damage_to_a_stored_mac_loses_the_next_record_too(tmp_path):
    # the next record's MAC covers the damaged one's: it cannot be verified any more
    key = secrets.token_bytes(32)
    path, full, off = _many_records(tmp_path, key)
    _damaged(path, full, (off[31] - 5, 0x80))
    s = FileDictionary.open(path, key, salvage=True, read_only=True)
    assert s.entries == _all_but(60, 30, 31)
    (region,) = s.salvage.regions
    assert (region.offset, region.length, region.records) == (off[30], off[32] - off[30], 2)
    assert region.paths == [b"f30", b"f31"]


def test_salvage_loses_only_the_record_whose_length_is_damaged(tmp_path):
    key = secrets.token_bytes(32)
    path, full, off = _many_records(tmp_path, key)
    bad = 30
    for at in range(off[bad], off[bad] + 8):  # every byte of the length and its CRC
        for bits in (0x01, 0x80):
            _damaged(path, full, (at, bits))
            with pytest.raises(Corruption) as err:
                FileDictionary.open(path, key)
            assert err.value.offset == off[bad]
            s = FileDictionary.open(path, key, salvage=True, read_only=True)
            assert s.entries == _all_but(60, bad), (at, bits)
            (region,) = s.salvage.regions
            assert (region.offset, region.length, region.records) == \
                (off[bad], off[bad + 1] - off[bad], 1), (at, bits)
            assert region.what == "bad record length" and not region.counted
            assert s.salvage.paths == [b"f30"]  # decoded from where the record must lie


def test_salvage_skips_each_of_several_damaged_regions(tmp_path):
    key = secrets.token_bytes(32)
    path, full, off = _many_records(tmp_path, key)
    _damaged(path, full, (off[10] + 12, 0x10), (off[25] + 2, 0x01), (off[40] + 20, 0x02),
             (off[41] + 1, 0x40))
    s = FileDictionary.open(path, key, salvage=True, read_only=True)
    assert s.entries == _all_but(60, 10, 25, 40, 41)
    assert [(r.offset, r.records) for r in s.salvage.regions] == [(off[10], 1), (off[25], 1), (off[40], 2)]
    assert s.salvage.offset == off[10] and s.salvage.lost_records == 4
    assert s.salvage.lost_bytes == (off[11] - off[10]) + (off[26] - off[25]) + (off[42] - off[40])
    # the flip at off[10] + 12 hit the path itself: the names are only best effort
    assert s.salvage.paths == [b"f!0", b"f25", b"f40", b"f41"]


def test_salvage_damage_in_the_first_and_in_the_last_record(tmp_path):
    key = secrets.token_bytes(32)
    path, full, off = _many_records(tmp_path, key, 12)
    assert off[0] == HEADER_SIZE
    for flips in ([(HEADER_SIZE + 9, 0x01)], [(HEADER_SIZE + 1, 0x01)]):  # payload, length
        _damaged(path, full, *flips)
        s = FileDictionary.open(path, key, salvage=True, read_only=True)
        assert s.entries == _all_but(12, 0)
        assert s.salvage.offset == HEADER_SIZE and s.salvage.lost_records == 1
    _damaged(path, full, (HEADER_SIZE + 9, 0x01), (off[11] + 9, 0x01))
    s = FileDictionary.open(path, key, salvage=True, read_only=True)
    assert s.entries == _all_but(12, 0, 11)
    assert [(r.offset, r.length) for r in s.salvage.regions] == \
        [(off[0], off[1] - off[0]), (off[11], len(full) - off[11])]


def test_salvaged_log_reopens_without_salvage_and_appends_verify(tmp_path):
    key = secrets.token_bytes(32)
    FileDictionary.create(tmp_path / "files.dict", key)
    d = FileDictionary.open(tmp_path / "files.dict", key)
    for i in range(20):
        d.append([Put(f"f{i}".encode(), info(i))], sync=False)
    t = d.begin(RULE_SRC_GONE, b"f3", 7, [Del(b"f3"), Put(b"g3", info(3))])
    d.append([Put(b"last", info(5))])
    d.close()
    full, off = d.path.read_bytes(), record_offsets(d.path)
    _damaged(d.path, full, (off[8] + 2, 0x01), (off[12] + 11, 0x08))
    s = FileDictionary.open(d.path, key, salvage=True)
    expected = {**_all_but(20, 8, 12), b"last": info(5)}
    assert s.entries == expected and [p.txid for p in s.pending_intents()] == [t]
    assert s.generation == 2  # rewritten at once as a snapshot of what survived
    s.append([Put(b"after", info(9))])
    s.close()
    again = FileDictionary.open(d.path, key)
    assert again.salvage is None and again.entries == {**expected, b"after": info(9)}
    again.append([Commit(t)])
    again.append([Put(b"more", info(4))])
    again.close()
    last = FileDictionary.open(d.path, key, read_only=True)
    assert last.entries[b"g3"] == info(3) and b"f3" not in last.entries
    assert last.entries[b"more"] == info(4) and last.records == s.records + 2


def test_header_damage_and_wrong_key(tmp_path):
    d, full, _ = _flipped_log(tmp_path)
    with pytest.raises(Corruption, match="header MAC"):
        FileDictionary.open(d.path, bytes(32))
    d.path.write_bytes(b"XXXX" + full[4:])
    with pytest.raises(Corruption, match="magic"):
        FileDictionary.open(d.path, MAC_KEY)
    d.path.write_bytes(full[:10])
    with pytest.raises(Corruption):
        FileDictionary.open(d.path, MAC_KEY)


def test_swapped_records_break_the_chain(tmp_path):
    d, full, off = _flipped_log(tmp_path)
    a, b, c = full[off[2]:off[3]], full[off[3]:off[4]], full[off[4]:]
    d.path.write_bytes(full[:off[2]] + b + a + c)
    with pytest.raises(Corruption) as err:
        FileDictionary.open(d.path, MAC_KEY)
    assert err.value.offset == off[2]


def test_rewrite_when_records_outgrow_live_entries(tmp_path):
    d = new_log(tmp_path, rewrite_min_records=20, rewrite_factor=2)
    d.append([Put(b"keep", info(1))])
    t = d.begin(RULE_SRC_GONE, b"keep", 5, [Del(b"keep"), Put(b"moved", info(1))])
    for i in range(40):
        d.append([Put(b"tmp", info(i))])
        d.append([Del(b"tmp")])
        d.wait_for_rewrite()  # it runs in the background; one at a time for this test
    assert d.rewrites >= 1
    assert d.records <= 21  # without rewrites: 82
    size = d.path.stat().st_size
    assert size < 2000, size  # without: about 5,700 bytes
    d.close()
    again = FileDictionary.open(d.path, MAC_KEY)
    assert again.entries == {b"keep": info(1)}
    assert again.generation > 1
    assert [p.txid for p in again.pending_intents()] == [t]  # a pending intent survives the snapshot
    again.append([Commit(t)])
    assert again.entries == {b"moved": info(1)}
    again.close()


def test_failed_write_leaves_no_partial_record(tmp_path, monkeypatch):
    d = new_log(tmp_path)
    d.append([Put(b"a", info(1))])
    real_write = os.write

    def short_then_fail(fd, data):
        real_write(fd, bytes(data)[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filedict, "write_all", lambda fd, data: short_then_fail(fd, data))
    with pytest.raises(OSError):
        d.append([Put(b"b", info(2))])
    monkeypatch.undo()
    d.append([Put(b"c", info(3))])
    d.close()
    assert FileDictionary.open(d.path, MAC_KEY).entries == {b"a": info(1), b"c": info(3)}


def test_group_commit_shares_fsyncs(tmp_path, monkeypatch):
    d = new_log(tmp_path)
    calls = []
    real = os.fdatasync

    def slow_fdatasync(fd):
        calls.append(fd)
        time.sleep(0.01)
        real(fd)

    monkeypatch.setattr(disk, "fdatasync", slow_fdatasync)
    threads_n, per_thread = 8, 10
    durable_at_return = []

    def worker(t):
        for i in range(per_thread):
            seq = d.append([Put(f"t{t}/{i}".encode(), info(i))])
            durable_at_return.append(d._durable >= seq)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    appends = threads_n * per_thread
    assert all(durable_at_return) and len(durable_at_return) == appends
    assert len(calls) < appends / 2, f"{len(calls)} fdatasyncs for {appends} appends"
    d.close()
    assert len(FileDictionary.open(d.path, MAC_KEY).entries) == appends


def test_a_failed_fdatasync_poisons_the_log_until_reopened(tmp_path, monkeypatch):
    d = new_log(tmp_path)
    d.append([Put(b"a", info(1))])

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(disk, "fdatasync", failing)
    with pytest.raises(OSError):
        d.append([Put(b"b", info(2))])
    monkeypatch.undo()
    # the kernel may have dropped the pages: a retry must not be believed
    with pytest.raises(OSError, match="earlier fdatasync failed"):
        d.append([Put(b"c", info(3))])
    with pytest.raises(OSError, match="earlier fdatasync failed"):
        d.sync()
    d.close()
    assert FileDictionary.open(d.path, MAC_KEY).entries[b"a"] == info(1)


def test_a_tail_of_zeros_is_a_torn_tail(tmp_path):
    # a power cut can leave the file longer than the data that reached the disk
    d, full, offsets = _flipped_log(tmp_path)
    for zeros in (1, 7, 8, 100, 5000):
        d.path.write_bytes(full + bytes(zeros))
        again = FileDictionary.open(d.path, MAC_KEY)
        assert len(again.entries) == 8 and again.dropped_tail == zeros
        again.close()
        assert d.path.read_bytes() == full
    # but zeros in the middle, with a record after them, are damage
    d.path.write_bytes(full[: offsets[3]] + bytes(offsets[4] - offsets[3]) + full[offsets[4]:])
    with pytest.raises(Corruption) as err:
        FileDictionary.open(d.path, MAC_KEY)
    assert err.value.offset == offsets[3]


def test_paths_below_a_directory_are_found_by_directory(tmp_path):
    d = new_log(tmp_path)
    names = [b"top", b"a/x", b"a/y", b"a/b/z", b"ab/w", b"c/a/v"]
    d.append([Put(p, info(i)) for i, p in enumerate(names)])
    assert sorted(d.paths_under(b"a")) == [b"a/b/z", b"a/x", b"a/y"]
    assert d.paths_under(b"a/b") == [b"a/b/z"]
    assert sorted(d.paths_under(b"")) == sorted(names)
    d.append([Del(b"a/b/z"), Put(b"a/x", info(9))])
    assert sorted(d.paths_under(b"a")) == [b"a/x", b"a/y"]
    assert d.paths_under(b"a/b") == []
    d.defer_delete(b"a/y")
    d.defer_delete(b"ab/w")
    assert d.paths_under(b"a") == [b"a/x"]
    assert d.deferred_at_or_under(b"a") == [b"a/y"]
    assert d.deferred_at_or_under(b"a/y") == [b"a/y"]
    assert sorted(d.deferred_in({b"a", b"ab"})) == [b"a/y", b"ab/w"]
    d.append([Put(b"a/y", info(5))])  # made anew: no longer deferred
    assert d.deferred_in({b"a"}) == [] and sorted(d.paths_under(b"a")) == [b"a/x", b"a/y"]
    # a reopened log rebuilds the same index from the records
    d.close()
    again = FileDictionary.open(d.path, MAC_KEY)
    assert sorted(again.paths_under(b"a")) == [b"a/x", b"a/y"]
    again.close()
