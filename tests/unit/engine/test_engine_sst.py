"""Sorted tables: building, point reads, scans, tombstones and corruption."""

from __future__ import annotations

import os

import pytest

from engine.bloom import key_hash
from engine.errors import Corruption
from engine.table_builder import TableBuilder
from engine.table_format import FOOTER_SIZE
from engine.table_reader import MISS, TableReader
from engine.table_scan import scan_tables


def build(path, entries, **kw):
    b = TableBuilder(str(path), **kw)
    for key, seq, value in entries:
        b.add(key, seq, value)
    return b.finish()


def sample_entries(n=2000):
    entries = []
    for i in range(n):
        key = b"key%06d" % i
        if i % 7 == 0:
            entries.append((key, 3 * n + i, None))
        entries.append((key, 2 * n + i, b"new%d" % i * 5))
        entries.append((key, i + 1, b"old%d" % i))
    return entries


@pytest.mark.parametrize("compression", ["none", "zlib", "lz4"])
def test_point_reads_with_versions_and_snapshots(tmp_path, compression):
    path = tmp_path / "000005.sst"
    entries = sample_entries()
    stats = build(path, entries, block_size=256, compression=compression)
    assert stats["num_entries"] == len(entries)
    assert stats["smallest"] == b"key000000" and stats["largest"] == b"key001999"
    r = TableReader(str(path), 5)
    assert r.num_blocks > 10
    for i in (0, 1, 7, 500, 1999):
        key = b"key%06d" % i
        h = key_hash(key)
        expect_now = None if i % 7 == 0 else b"new%d" % i * 5
        assert r.get(key, h, None) == expect_now
        assert r.get(key, h, 2 * 2000 + i) == b"new%d" % i * 5
        assert r.get(key, h, i + 1) == b"old%d" % i
        assert r.get(key, h, i) is MISS
    assert r.get(b"nope", key_hash(b"nope"), None) is MISS
    assert r.verify() == len(entries)


def test_versions_spanning_blocks_are_found(tmp_path):
    path = tmp_path / "000001.sst"
    entries = [(b"k", 100 - i, b"v%d" % i) for i in range(50)] + [(b"z", 1, b"last")]
    build(path, entries, block_size=32)
    r = TableReader(str(path), 1)
    assert r.num_blocks > 5
    assert r.get(b"k", key_hash(b"k"), 51) == b"v49"
    assert r.get(b"k", key_hash(b"k"), 60) == b"v40"
    assert r.get(b"z", key_hash(b"z"), None) == b"last"


def test_scan_forward_and_reverse(tmp_path):
    path = tmp_path / "000001.sst"
    entries = sample_entries(300)
    build(path, entries, block_size=128)
    r = TableReader(str(path), 1)
    fwd = list(scan_tables([(r, None)], b"key000010", b"key000020", 3))
    assert [k for k, _, _ in fwd] == [b"key%06d" % i for i in range(10, 20)]
    assert fwd[4] == (b"key000014", 3, None)  # 14 % 7 == 0: deleted
    assert fwd[0][2] == b"new10" * 5
    rev = list(scan_tables([(r, 2 * 300 + 12)], b"key000010", b"key000020", 0, reverse=True))
    assert [k for k, _, _ in rev] == [b"key%06d" % i for i in range(19, 9, -1)]
    # At that snapshot keys <= 12 have their "new" versions, later ones only "old".
    assert dict((k, v) for k, _, v in rev)[b"key000012"] == b"new12" * 5
    assert dict((k, v) for k, _, v in rev)[b"key000013"] == b"old13"
    assert list(scan_tables([(r, None)], None, None, 0)) == list(
        scan_tables([(r, None)], None, None, 0, reverse=True))[::-1]


def test_range_tombstones_widen_key_range_in_any_order(tmp_path):
    path = tmp_path / "000001.sst"
    b = TableBuilder(str(path))
    b.add(b"m", 5, b"v")
    b.add_range_tombstone(b"x", b"zz", 9)
    b.add_range_tombstone(b"a", b"c", 7)
    stats = b.finish()
    assert stats["smallest"] == b"a" and stats["largest"] == b"zz"
    assert stats["smallest_seq"] == 5 and stats["largest_seq"] == 9
    r = TableReader(str(path), 1)
    assert r.range_tombstones == [(b"a", b"c", 7), (b"x", b"zz", 9)]


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_data_block_is_corruption(tmp_path):
    path = tmp_path / "000009.sst"
    build(path, sample_entries(200), block_size=256)
    r = TableReader(str(path), 9)
    off, size = r.handles[3]
    r.close()
    _flip(path, off + size // 2)
    r = TableReader(str(path), 9)
    key = r.index_keys[3]
    with pytest.raises(Corruption) as info:
        r.get(key, key_hash(key), None)
    assert info.value.path == str(path) and info.value.offset == off
    assert "000009.sst" in str(info.value)
    with pytest.raises(Corruption):
        r.verify()


def test_flipped_byte_in_index_is_corruption(tmp_path):
    path = tmp_path / "000009.sst"
    build(path, sample_entries(200), block_size=256)
    r = TableReader(str(path), 9)
    off, size = r.footer_handles[0]
    r.close()
    _flip(path, off + 3)
    with pytest.raises(Corruption) as info:
        TableReader(str(path), 9)
    assert info.value.offset == off and "000009.sst" in str(info.value)


@pytest.mark.parametrize("where", [1, 20, 50, 60])
def test_flipped_byte_in_footer_is_corruption(tmp_path, where):
    path = tmp_path / "000009.sst"
    build(path, sample_entries(50))
    size = path.stat().st_size
    _flip(path, size - FOOTER_SIZE + where)
    with pytest.raises(Corruption) as info:
        TableReader(str(path), 9)
    assert "000009.sst" in str(info.value)


def test_short_file_is_corruption(tmp_path):
    path = tmp_path / "000009.sst"
    path.write_bytes(b"tiny")
    with pytest.raises(Corruption, match="too short"):
        TableReader(str(path), 9)


def resident_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_a_whole_table_pass_leaves_the_pages_it_read_out_of_memory(tmp_path):
    path = tmp_path / "000001.sst"
    build(path, [(b"key%07d" % i, i + 1, os.urandom(200)) for i in range(20_000)],
          compression="none")
    reader = TableReader(str(path), 1, None)
    try:
        assert os.path.getsize(path) > 4 << 20
        entries = sum(len(keys) for keys, _, _ in reader.blocks())
        assert entries == 20_000
        # what is left mapped: the last step not yet dropped, index, filter, footer
        assert resident_kib(path) < 2048, resident_kib(path)
        assert sum(1 for _ in reader.entries()) == 20_000  # a plain pass maps them again
        assert resident_kib(path) > 4096
    finally:
        reader.close()
