"""files.dict: replay, torn tails, corruption with file and offset, salvage, rewrite,
intents, group commit."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from encfs import filedict
from encfs.errors import Corruption
from encfs.filedict import HEADER_SIZE, RULE_SRC_GONE, FileDictionary, FileInfo

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
    d.append([("put", b"a", info(1)), ("put", b"b", info(2))])
    d.append([("del", b"a"), ("put", b"c/d", info(3))])
    t1 = d.begin(RULE_SRC_GONE, b"b", 7, [("del", b"b"), ("put", b"x", info(2))])
    t2 = d.begin(RULE_SRC_GONE, b"c/d", 8, [("del", b"c/d"), ("put", b"y", info(3))])
    d.append([("commit", t1)])
    t3 = d.begin(RULE_SRC_GONE, b"x", 9, [("del", b"x")])
    d.append([("abort", t3)])
    assert d.entries == {b"x": info(2), b"c/d": info(3)}
    assert list(d.pending) == [t2]
    d.close()
    again = FileDictionary.open(d.path, MAC_KEY)
    assert again.entries == {b"x": info(2), b"c/d": info(3)}
    assert list(again.pending) == [t2] and again.pending[t2].src == b"c/d"
    assert again.begin(RULE_SRC_GONE, b"q", 1, [("del", b"q")]) > t3  # txids never reused
    again.close()


def test_torn_last_record_is_dropped_at_every_byte(tmp_path):
    d = new_log(tmp_path)
    for i in range(5):
        d.append([("put", f"f{i}".encode(), info(i))])
    d.append([("put", b"last", info(9)), ("del", b"f0")])
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
    reopened.append([("put", b"next", info(3))])
    reopened.close()
    assert FileDictionary.open(d.path, MAC_KEY, read_only=True).entries[b"next"] == info(3)


def _flipped_log(tmp_path: Path) -> tuple[FileDictionary, bytes, list[int]]:
    d = new_log(tmp_path)
    for i in range(8):
        d.append([("put", f"f{i}".encode(), info(i))])
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


def test_salvage_keeps_every_record_before_the_damage(tmp_path):
    d, full, offsets = _flipped_log(tmp_path)
    raw = bytearray(full)
    raw[offsets[5] + 12] ^= 1  # inside record 5's payload
    d.path.write_bytes(bytes(raw))
    s = FileDictionary.open(d.path, MAC_KEY, salvage=True)
    assert s.entries == {f"f{i}".encode(): info(i) for i in range(5)}
    assert s.salvage is not None and s.salvage.offset == offsets[5]
    assert s.salvage.lost_records == 3 and s.salvage.lost_bytes == len(full) - offsets[5]
    assert b"f6" in s.salvage.paths and b"f7" in s.salvage.paths
    s.append([("put", b"after", info(1))])
    s.close()
    assert b"after" in FileDictionary.open(d.path, MAC_KEY).entries


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
    d.append([("put", b"keep", info(1))])
    t = d.begin(RULE_SRC_GONE, b"keep", 5, [("del", b"keep"), ("put", b"moved", info(1))])
    for i in range(40):
        d.append([("put", b"tmp", info(i))])
        d.append([("del", b"tmp")])
    assert d.rewrites >= 1
    assert d.records < 20
    size = d.path.stat().st_size
    assert size < 600, size
    d.close()
    again = FileDictionary.open(d.path, MAC_KEY)
    assert again.entries == {b"keep": info(1)}
    assert again.generation > 1
    assert t in again.pending  # a pending intent survives the snapshot
    again.append([("commit", t)])
    assert again.entries == {b"moved": info(1)}
    again.close()


def test_failed_write_leaves_no_partial_record(tmp_path, monkeypatch):
    d = new_log(tmp_path)
    d.append([("put", b"a", info(1))])
    real_write = os.write

    def short_then_fail(fd, data):
        real_write(fd, bytes(data)[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filedict, "write_all", lambda fd, data: short_then_fail(fd, data))
    with pytest.raises(OSError):
        d.append([("put", b"b", info(2))])
    monkeypatch.undo()
    d.append([("put", b"c", info(3))])
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

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    threads_n, per_thread = 8, 10
    durable_at_return = []

    def worker(t):
        for i in range(per_thread):
            seq = d.append([("put", f"t{t}/{i}".encode(), info(i))])
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
    d.append([("put", b"a", info(1))])

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError):
        d.append([("put", b"b", info(2))])
    monkeypatch.undo()
    # the kernel may have dropped the pages: a retry must not be believed
    with pytest.raises(OSError, match="earlier fdatasync failed"):
        d.append([("put", b"c", info(3))])
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
    d.append([("put", p, info(i)) for i, p in enumerate(names)])
    assert sorted(d.paths_under(b"a")) == [b"a/b/z", b"a/x", b"a/y"]
    assert d.paths_under(b"a/b") == [b"a/b/z"]
    assert sorted(d.paths_under(b"")) == sorted(names)
    d.append([("del", b"a/b/z"), ("put", b"a/x", info(9))])
    assert sorted(d.paths_under(b"a")) == [b"a/x", b"a/y"]
    assert d.paths_under(b"a/b") == []
    d.defer_delete(b"a/y")
    d.defer_delete(b"ab/w")
    assert d.paths_under(b"a") == [b"a/x"]
    assert d.deferred_at_or_under(b"a") == [b"a/y"]
    assert d.deferred_at_or_under(b"a/y") == [b"a/y"]
    assert sorted(d.deferred_in({b"a", b"ab"})) == [b"a/y", b"ab/w"]
    d.append([("put", b"a/y", info(5))])  # made anew: no longer deferred
    assert d.deferred_in({b"a"}) == [] and sorted(d.paths_under(b"a")) == [b"a/x", b"a/y"]
    # a reopened log rebuilds the same index from the records
    d.close()
    again = FileDictionary.open(d.path, MAC_KEY)
    assert sorted(again.paths_under(b"a")) == [b"a/x", b"a/y"]
    again.close()
