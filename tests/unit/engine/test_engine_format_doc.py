"""A reader written only from docs/engine-format.md, checked against a real database.

It follows CURRENT to the MANIFEST, replays the edits, reads every live table block by
block (trailers, index, filter, range tombstones, properties, footer) and every live
write-ahead log, merges them by sequence number, and must find exactly what the
engine's own iterator returns. If the page and the code drift apart, this fails: the
page must stay precise enough for a stranger to read a database."""

from __future__ import annotations

import json
import os
import struct
import zlib
from itertools import pairwise
from pathlib import Path

import lz4.block
import pytest

from engine import DB, Options, SstFileWriter, WriteBatch

MAGIC = 0x7464656673737431


# -- the log framing and its two payloads


def read_log(path: Path) -> list[bytes]:
    data = path.read_bytes()
    payloads, pos = [], 0
    while len(data) - pos >= 12:
        length, crc, check = struct.unpack_from("<III", data, pos)
        if check != ((length * 0x9E3779B1) % 2**32) ^ crc ^ 0xA5A5A5A5:
            assert not any(data[pos + 12:]), f"{path.name}: bad header at {pos}"
            break   # a torn tail: the zeros a WAL reserves ahead of its writes
        payload = data[pos + 12:pos + 12 + length]
        assert len(payload) == length and zlib.crc32(payload) == crc
        payloads.append(payload)
        pos += 12 + length
    return payloads


def read_batch(payload: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """(seq, kind, key, value) of each operation of a WAL record."""
    seq, count = struct.unpack_from("<QI", payload, 0)
    ops, pos = [], 12
    for i in range(count):
        kind = payload[pos]
        pos += 1
        if kind in (1, 2):  # a put's key and value, a range delete's begin and end
            klen, vlen = struct.unpack_from("<II", payload, pos)
            pos += 8
            key, value = payload[pos:pos + klen], payload[pos + klen:pos + klen + vlen]
            pos += klen + vlen
        else:
            assert kind in (0, 3), f"unknown operation kind {kind}"
            (klen,) = struct.unpack_from("<I", payload, pos)
            pos += 4
            key, value = payload[pos:pos + klen], b""
            pos += klen
        ops.append((seq + i, kind, key, value))
    assert pos == len(payload)
    return ops


def replay_manifest(path: Path) -> tuple[dict, list[list]]:
    """The fields of the last edits, and the live tables as
    [level, number, size, smallest, largest, smallest_seq, largest_seq, epoch, entries]
    and, for an ingested table, its global sequence number tenth."""
    fields: dict = {}
    live: dict[int, list] = {}
    for payload in read_log(path):
        edit = json.loads(payload.decode())
        for level, number in edit.get("deleted_files", []):
            assert live.pop(number)[0] == level
        for entry in edit.get("new_files", []):
            live[entry[1]] = entry
        fields.update({k: v for k, v in edit.items() if k not in ("new_files", "deleted_files")})
    return fields, list(live.values())


# -- the sorted table


# The compression bytes block_at has met, so a test can show its kind was read.
KINDS_SEEN: set[int] = set()


def block_at(data: bytes, handle: tuple[int, int]) -> bytes:
    offset, size = handle
    stored, compression = data[offset:offset + size], data[offset + size]
    (crc,) = struct.unpack_from("<I", data, offset + size + 1)
    assert zlib.crc32(stored + bytes([compression])) == crc
    assert compression in (0, 1, 2)
    KINDS_SEEN.add(compression)
    if compression == 2:  # the uncompressed size as u32, then one LZ4 block
        (length,) = struct.unpack_from("<I", stored)
        contents = lz4.block.decompress(stored[4:], uncompressed_size=length)
        assert len(contents) == length
        return contents
    return zlib.decompress(stored) if compression == 1 else stored


def entries_of(block: bytes) -> list[tuple[bytes, int, bytes]]:
    (n,) = struct.unpack_from("<I", block, len(block) - 4)
    tags_at = len(block) - 4 - 8 * n
    values_at = tags_at - 4 * (n + 1)
    keys_at = values_at - 4 * (n + 1)
    key_offsets = struct.unpack_from(f"<{n + 1}I", block, keys_at)
    value_offsets = struct.unpack_from(f"<{n + 1}I", block, values_at)
    tags = struct.unpack_from(f"<{n}Q", block, tags_at)
    assert key_offsets[0] == 0 and key_offsets[n] == value_offsets[0]
    assert value_offsets[n] == keys_at
    return [(block[key_offsets[i]:key_offsets[i + 1]], tags[i],
             block[value_offsets[i]:value_offsets[i + 1]]) for i in range(n)]


def bloom_may_contain(filt: bytes, key: bytes) -> bool:
    if len(filt) < 9:
        return True
    nwords, k = (len(filt) - 1) // 8, filt[-1]
    h = zlib.crc32(key)
    m = ((h * 0x9E3779B1) % 2**32) >> 16
    mask, x = 0, m
    for _ in range(k):
        x = (x * 1103515245 + 12345) % 2**31
        mask |= 1 << ((x >> 16) & 63)
    (word,) = struct.unpack_from("<Q", filt, 8 * (h % nwords))
    return word & mask == mask


def read_table(path: Path):
    """(entries as (key, tag, value), range tombstones as (start, end, tag), properties)."""
    data = path.read_bytes()
    footer = data[-64:]
    handles = [struct.unpack_from("<QI", footer, 12 * i) for i in range(4)]
    version, crc, magic = struct.unpack_from("<IIQ", footer, 48)
    assert (version, magic) == (1, MAGIC) and zlib.crc32(footer[:52]) == crc
    index_h, filter_h, rdel_h, props_h = handles
    entries = []
    for last_key, _, value in entries_of(block_at(data, index_h)):
        block = entries_of(block_at(data, struct.unpack("<QI", value)))
        assert block[-1][0] == last_key
        entries += block
    keys = [(key, -tag) for key, tag, _ in entries]
    assert keys == sorted(keys), f"{path.name}: entries out of order"
    filt = block_at(data, filter_h)
    assert all(bloom_may_contain(filt, key) for key, _, _ in entries)
    tombstones = [(start, end, tag) for start, tag, end in entries_of(block_at(data, rdel_h))]
    assert all(tag & 0xFF == 2 for _, _, tag in tombstones)
    props = json.loads(block_at(data, props_h))
    return entries, tombstones, props


# -- the whole database


def read_database(path: Path) -> dict[bytes, bytes]:
    current = (path / "CURRENT").read_text()
    assert current.endswith("\n") and current.startswith("MANIFEST-")
    fields, tables = replay_manifest(path / current.strip())
    for level in {t[0] for t in tables} - {0}:   # levels >= 1: sorted, not overlapping
        ranges = sorted((bytes.fromhex(t[3]), bytes.fromhex(t[4])) for t in tables if t[0] == level)
        assert all(a[1] < b[0] for a, b in pairwise(ranges))
    # newest version of each key: (seq, kind, value); a range tombstone deletes every
    # older version of the keys it covers
    versions: dict[bytes, list[tuple[int, int, bytes]]] = {}
    tombstones: list[tuple[bytes, bytes, int]] = []
    for row in tables:
        _level, number, size, smallest, largest, _sseq, largest_seq, epoch, count, *more = row
        # an ingested table: every entry and tombstone, stored at sequence 0, has this one
        global_seq = more[0] if more else None
        table = path / f"{number:06d}.sst"
        assert table.stat().st_size == size
        entries, rdels, props = read_table(table)
        if global_seq is not None:
            assert props["external"] is True
            assert all(tag >> 8 == 0 for _, tag, _ in entries)
            assert all(tag >> 8 == 0 for _, _, tag in rdels)
            entries = [(key, global_seq << 8 | tag, value) for key, tag, value in entries]
            rdels = [(start, end, global_seq << 8 | tag) for start, end, tag in rdels]
        assert len(entries) == count == props["num_entries"]
        assert epoch < fields["next_epoch"] and number < fields["next_file_number"]
        for key, tag, value in entries:
            assert bytes.fromhex(smallest) <= key <= bytes.fromhex(largest)
            assert tag >> 8 <= largest_seq
            versions.setdefault(key, []).append((tag >> 8, tag & 0xFF, value))
        for start, end, tag in rdels:
            # the largest key covers an exclusive end e: e less its last byte if that is 0
            covered_end = end[:-1] if end.endswith(b"\x00") else end
            assert bytes.fromhex(smallest) <= start < end
            assert covered_end <= bytes.fromhex(largest)
            tombstones.append((start, end, tag >> 8))
    logs = sorted(int(name.split(".")[0]) for name in os.listdir(path) if name.endswith(".log"))
    for number in logs:
        if number < fields["log_number"]:
            continue
        for payload in read_log(path / f"{number:06d}.log"):
            for seq, kind, key, value in read_batch(payload):
                if kind == 2:
                    tombstones.append((key, value, seq))
                else:
                    versions.setdefault(key, []).append((seq, kind, value))
    state = {}
    for key, found in versions.items():
        seq, kind, value = max(found)
        covered = any(start <= key < end and tseq > seq for start, end, tseq in tombstones)
        if kind == 1 and not covered:
            state[key] = value
    return state


@pytest.mark.parametrize("compression", ["zlib", "lz4"])
def test_a_database_read_with_only_the_format_page(tmp_path, compression):
    options = Options(write_buffer_size=32 << 10, target_file_size_base=16 << 10,
                      level0_file_num_compaction_trigger=2, compression=compression,
                      background_processes=False)
    path = tmp_path / "db"
    with DB.open(path, options) as db:
        for i in range(3000):
            db.put(b"key%05d" % (i * 7 % 3000), b"value %d " % i * 3)
        for i in range(0, 3000, 5):
            db.delete(b"key%05d" % i)
        snap = db.snapshot()  # keeps range tombstones in the tables through compaction
        db.delete_range(b"key00500", b"key00900")
        db.delete_range(b"key00100", b"key00150")  # out of order: the earlier start last
        db.single_delete(b"key00001")
        db.flush()
        db.delete_range(b"key02000", b"key02010\x00")
        db.compact_range()
        snap.release()
        assert any(f.reader.range_tombstones for _, f in db._sv[2].files())
        db.wait_for_compactions()
        # an external table over older data: it shadows it with its global sequence
        with SstFileWriter(tmp_path / "ext.sst", options) as w:
            w.delete_range(b"key01000", b"key01100")
            w.put(b"key01001", b"ingested")
            w.delete(b"key01200")
            w.put(b"key01201", b"ingested too")
        db.ingest([tmp_path / "ext.sst"])
        assert any(f.global_seq is not None for _, f in db._sv[2].files())
        batch = WriteBatch()
        batch.put(b"key00001", b"in the log")
        batch.delete(b"key00002")
        batch.delete_range(b"key00003", b"key00009")
        batch.single_delete(b"key00011")
        db.write(batch, sync=True)
        db.put(b"zzz", b"last", sync=True)
        expected = dict(db.iterator())
        assert sum(db.level_file_counts().values()) >= 2
        # read while the database is open: its log is live, not yet in a table
        assert read_database(path) == expected
    KINDS_SEEN.clear()
    assert read_database(path) == expected
    assert {"zlib": 1, "lz4": 2}[compression] in KINDS_SEEN
