"""Sorted string tables (``n.sst``): building and reading.

Layout (all integers little-endian; docs/engine-format.md is the full description)::

    data block 0 | trailer ... data block n-1 | trailer
    index block | trailer          last key of each data block -> (offset u64, size u32)
    filter block | trailer         bloom filter over all user keys (engine/bloom.py)
    range-tombstone block | trailer  start key -> end key, tag carries the sequence
    properties block | trailer     JSON object
    footer (64 bytes)              four block handles, format version, crc32, magic

Every block is followed by a 5-byte trailer ``compression u8 | crc32 u32`` where the
crc covers the stored block bytes and the compression byte. A block's contents::

    key bytes | value bytes | key_offsets u32[n+1] | value_offsets u32[n+1] | tags u64[n] | n u32

Entries are sorted by user key ascending, then tag (``seq << 8 | kind``) descending.
Invariant: a reader returns bytes only from blocks whose checksum verified; anything
else raises ``Corruption`` naming the file and the block offset.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from functools import lru_cache
from itertools import accumulate
from operator import add
from zlib import crc32

from .block_cache import BlockCache
from .bloom import GOLDEN, BloomFilter, build_filter
from .errors import Corruption

MAGIC = 0x7464656673737431  # "tdefsst1"
FORMAT_VERSION = 1
FOOTER = struct.Struct("<QIQIQIQIIIQ")
FOOTER_SIZE = FOOTER.size  # 64
TRAILER_SIZE = 5
HANDLE = struct.Struct("<QI")
U32 = struct.Struct("<I")
_TRAILER = struct.Struct("<BI")
_KIND_BYTES = [bytes((i,)) for i in range(256)]

KIND_DELETE = 0
KIND_PUT = 1
KIND_RANGE_DELETE = 2

COMPRESSION_NONE = 0
COMPRESSION_ZLIB = 1
COMPRESSIONS = {"none": COMPRESSION_NONE, "zlib": COMPRESSION_ZLIB}
# Cached blocks are unpacked on reuse only while the cache is this full or less.
PROMOTE_BELOW = 0.9



class _Miss:
    """The key has no visible version in this source."""

    def __repr__(self) -> str:
        return "MISS"


MISS = _Miss()


def encode_block(keys: list[bytes], tags: list[int], values: list[bytes]) -> bytes:
    n = len(keys)
    key_data = b"".join(keys)
    value_data = b"".join(values)
    koffs = list(accumulate(map(len, keys), initial=0))
    voffs = list(accumulate(map(len, values), initial=len(key_data)))
    return b"".join((
        key_data, value_data,
        struct.pack(f"<{n + 1}I", *koffs),
        struct.pack(f"<{n + 1}I", *voffs),
        struct.pack(f"<{n}Q", *tags),
        U32.pack(n),
    ))


@lru_cache(maxsize=512)
def _array(count: int, code: str) -> struct.Struct:
    return struct.Struct(f"<{count}{code}")


U64 = struct.Struct("<Q")
U32X2 = struct.Struct("<II")


def open_block(buf: bytes | mmap.mmap, base: int, size: int, path: str, offset: int) -> list:
    """Check the layout of the block stored at ``buf[base:base + size]`` and return its
    view ``[buf, n, key_offsets_at, value_offsets_at, tags_at, keys, tags,
    value_offsets, base]``; the ``*_at`` positions are absolute in ``buf``, key and
    value offsets (as stored) are relative to ``base``.

    ``buf`` is the table's mmap for a stored block, so a view copies nothing and
    holds a few ints: the block cache keeps many of them, and a cached block is not
    checksummed again. Entries are sliced out only when visited; ``promote`` unpacks
    keys, tags and value offsets (None until then) for a block that is read again.
    """
    if size < 8:
        raise Corruption(path, offset, "block too short")
    (n,) = U32.unpack_from(buf, base + size - 4)
    rel = size - 4 - 8 * n - 8 * (n + 1)
    if rel < 0:
        raise Corruption(path, offset, "block entry count out of range")
    kstart = base + rel
    voff = kstart + 4 * (n + 1)
    k0, = U32.unpack_from(buf, kstart)
    kn, = U32.unpack_from(buf, kstart + 4 * n)
    v0, = U32.unpack_from(buf, voff)
    vn, = U32.unpack_from(buf, voff + 4 * n)
    if k0 != 0 or kn != v0 or vn != rel:
        raise Corruption(path, offset, "block offsets inconsistent")
    return [buf, n, kstart, voff, voff + 4 * (n + 1), None, None, None, base]


def key_offsets(view: list) -> tuple[int, ...]:
    """The n + 1 key offsets of a block view, relative to its base."""
    return _array(view[1] + 1, "I").unpack_from(view[0], view[2])


BlockView = list


def promote(view: BlockView) -> None:
    """Unpack keys, tags and value offsets into the view (readers test keys last)."""
    buf, ko, b = view[0], key_offsets(view), view[8]
    view[6], view[7] = block_arrays(view)
    view[5] = [buf[b + s:b + e] for s, e in zip(ko, ko[1:], strict=False)]


def block_seek(view: BlockView, key: bytes, ko: tuple[int, ...] | None) -> int:
    """Index of the first entry whose key is ``>= key`` (``ko``: ``key_offsets``,
    needed unless the view is promoted)."""
    keys = view[5]
    if keys is not None:
        return bisect_left(keys, key)
    buf, n, b = view[0], view[1], view[8]
    assert ko is not None
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) >> 1
        if buf[b + ko[mid]:b + ko[mid + 1]] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _key_at(buf: bytes | mmap.mmap, kstart: int, base: int, j: int) -> bytes:
    s, e = U32X2.unpack_from(buf, kstart + 4 * j)
    return buf[base + s:base + e]


def block_arrays(view: BlockView) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(tags, value_offsets)`` of a block view, offsets relative to its base."""
    if view[5] is not None:
        return view[6], view[7]
    buf, n, _, voff, toff = view[:5]
    return _array(n, "Q").unpack_from(buf, toff), _array(n + 1, "I").unpack_from(buf, voff)


def decode_block(data: bytes, path: str, offset: int) -> tuple[list[bytes], tuple[int, ...], tuple[int, ...], bytes]:
    """Decode block contents into ``(keys, tags, value_offsets, data)``."""
    view = open_block(data, 0, len(data), path, offset)
    ko = key_offsets(view)
    tags, vo = block_arrays(view)
    return [data[s:e] for s, e in zip(ko, ko[1:], strict=False)], tags, vo, data


class TableBuilder:
    """Writes one SST from entries added in sorted order; ``finish`` returns its stats.

    Entries collect in lists and are cut into blocks in bulk, so adding costs a few
    list appends per entry.
    """

    # Pending bytes that trigger cutting complete blocks out of the lists.
    CUT_BYTES = 256 << 10

    def __init__(self, path: str, block_size: int = 4096, compression: str = "none",
                 bloom_bits_per_key: int = 10) -> None:
        self.path = path
        self._file = open(path, "wb", buffering=1 << 20)  # noqa: SIM115
        self._offset = 0
        self._block_size = block_size
        self._compression = COMPRESSIONS[compression]
        self._bloom_bits = bloom_bits_per_key
        self._keys: list[bytes] = []
        self._tags: list[int] = []
        self._values: list[bytes] = []
        self._pending = 0
        self._index_keys: list[bytes] = []
        self._index_values: list[bytes] = []
        self._hashes: list[int] = []
        self._range_dels: list[tuple[bytes, int, bytes]] = []
        self.num_entries = 0
        self.num_deletions = 0
        self.smallest_seq = 1 << 62
        self.largest_seq = 0
        self.first_key: bytes | None = None

    @property
    def file_size(self) -> int:
        return self._offset + self._pending

    def add(self, key: bytes, seq: int, value: bytes | None) -> None:
        """Add a version; ``value`` None is a deletion. Keys ascending, seqs descending."""
        self._keys.append(key)
        if value is None:
            self._tags.append(seq << 8 | KIND_DELETE)
            self._values.append(b"")
            self._pending += len(key) + 16
        else:
            self._tags.append(seq << 8 | KIND_PUT)
            self._values.append(value)
            self._pending += len(key) + len(value) + 16
        if self._pending >= self.CUT_BYTES:
            self._cut(False)

    def add_many(self, keys: list[bytes], tags: list[int], values: list[bytes]) -> None:
        """Add sorted entries in bulk; a tag is ``seq << 8 | kind``, deletions carry b''."""
        self._keys += keys
        self._tags += tags
        self._values += values
        self._pending += sum(map(len, keys)) + sum(map(len, values)) + 16 * len(keys)
        if self._pending >= self.CUT_BYTES:
            self._cut(False)

    def _cut(self, final: bool) -> None:
        """Write complete blocks from the pending lists (all of them when ``final``)."""
        keys, tags, values = self._keys, self._tags, self._values
        n = len(keys)
        if not n:
            return
        cum = list(accumulate(map(add, map(len, keys), map(len, values))))
        bs = self._block_size
        s = 0
        while s < n:
            base = cum[s - 1] if s else 0
            e = bisect_left(cum, base + bs, s) + 1
            if e > n:
                if not final:
                    break
                e = n
            self._write_data_block(keys[s:e], tags[s:e], values[s:e])
            s = e
        done_tags = tags[:s]
        if done_tags:
            if self.first_key is None:
                self.first_key = keys[0]
            self._hashes += map(crc32, keys[:s])
            self.num_entries += s
            self.num_deletions += list(map((0xFF).__and__, done_tags)).count(KIND_DELETE)
            self.smallest_seq = min(self.smallest_seq, min(done_tags) >> 8)
            self.largest_seq = max(self.largest_seq, max(done_tags) >> 8)
        self._keys = keys[s:]
        self._tags = tags[s:]
        self._values = values[s:]
        self._pending = sum(map(len, self._keys)) + sum(map(len, self._values)) + 16 * len(self._keys)

    def add_range_tombstone(self, start: bytes, end: bytes, seq: int) -> None:
        """Record that keys in ``[start, end)`` at sequences below ``seq`` are deleted."""
        self._range_dels.append((start, seq, end))
        if seq < self.smallest_seq:
            self.smallest_seq = seq
        if seq > self.largest_seq:
            self.largest_seq = seq

    def _write_block(self, contents: bytes, compress: bool) -> tuple[int, int]:
        kind = COMPRESSION_NONE
        if compress and self._compression == COMPRESSION_ZLIB:
            packed = zlib.compress(contents, 1)
            if len(packed) < len(contents) - len(contents) // 8:
                contents = packed
                kind = COMPRESSION_ZLIB
        trailer_kind = bytes((kind,))
        crc = crc32(trailer_kind, crc32(contents))
        self._file.write(contents + trailer_kind + U32.pack(crc))
        handle = (self._offset, len(contents))
        self._offset += len(contents) + TRAILER_SIZE
        return handle

    def _write_data_block(self, keys: list[bytes], tags: list[int], values: list[bytes]) -> None:
        off, size = self._write_block(encode_block(keys, tags, values), True)
        self._index_keys.append(keys[-1])
        self._index_values.append(HANDLE.pack(off, size))

    def finish(self) -> dict:
        """Write index, filter, tombstones, properties and footer; fsync; return stats."""
        self._cut(True)
        index = self._write_block(
            encode_block(self._index_keys, [0] * len(self._index_keys), self._index_values), False)
        filt = self._write_block(build_filter(self._hashes, self._bloom_bits), False)
        rdels = sorted(self._range_dels)
        rdel = self._write_block(encode_block(
            [r[0] for r in rdels], [r[1] << 8 | KIND_RANGE_DELETE for r in rdels],
            [r[2] for r in rdels]), False)
        smallest = self.first_key
        largest = self._index_keys[-1] if self._index_keys else None
        # The key range covers every range tombstone, whatever order they came in.
        for start, _, end in rdels:
            if smallest is None or start < smallest:
                smallest = start
            if largest is None or end > largest:
                largest = end
        if smallest is None or largest is None:
            smallest = largest = b""
        props = {
            "format_version": FORMAT_VERSION,
            "num_entries": self.num_entries,
            "num_deletions": self.num_deletions,
            "num_range_deletions": len(rdels),
            "num_data_blocks": len(self._index_keys),
            "smallest_key": smallest.hex(),
            "largest_key": largest.hex(),
            "smallest_seq": self.smallest_seq if self.num_entries or rdels else 0,
            "largest_seq": self.largest_seq,
            "compression": self._compression,
        }
        propb = self._write_block(json.dumps(props, sort_keys=True).encode(), False)
        head = FOOTER.pack(*index, *filt, *rdel, *propb, FORMAT_VERSION, 0, MAGIC)
        crc = crc32(head[:52])
        self._file.write(head[:52] + U32.pack(crc) + head[56:])
        self._offset += FOOTER_SIZE
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {
            "size": self._offset,
            "smallest": smallest,
            "largest": largest,
            "smallest_seq": props["smallest_seq"],
            "largest_seq": self.largest_seq,
            "num_entries": self.num_entries,
        }

    def abandon(self) -> None:
        self._file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class TableReader:
    """Reads one SST through mmap; footer, index, filter and tombstones load at open."""

    def __init__(self, path: str, number: int, cache: BlockCache | None = None) -> None:
        self.path = path
        self.number = number
        self.cache = cache
        self._cache_base = number << 24
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < FOOTER_SIZE:
                raise Corruption(path, 0, f"file of {size} bytes is too short for a footer")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.size = size
        foot_off = size - FOOTER_SIZE
        footer = self._mm[foot_off:]
        fields = FOOTER.unpack(footer)
        if fields[-1] != MAGIC:
            raise Corruption(path, foot_off, "bad table magic number in footer")
        if crc32(footer[:52]) != fields[9]:
            raise Corruption(path, foot_off, "bad footer checksum")
        if fields[8] != FORMAT_VERSION:
            raise Corruption(path, foot_off, f"unsupported table format version {fields[8]}")
        handles = [(fields[i], fields[i + 1]) for i in (0, 2, 4, 6)]
        for off, sz in handles:
            if off + sz + TRAILER_SIZE > foot_off:
                raise Corruption(path, foot_off, "block handle in footer points past the end")
        self.footer_handles = handles
        ikeys, _, ivo, idata = decode_block(self._read(*handles[0]), path, handles[0][0])
        self.index_keys = ikeys
        self.handles: list[tuple[int, int]] = []
        for i in range(len(ikeys)):
            v = idata[ivo[i]:ivo[i + 1]]
            if len(v) != HANDLE.size:
                raise Corruption(path, handles[0][0], "bad block handle in index")
            off, sz = HANDLE.unpack(v)
            if off + sz + TRAILER_SIZE > handles[0][0]:
                raise Corruption(path, handles[0][0], "index points past the data blocks")
            self.handles.append((off, sz))
        self.num_blocks = len(self.handles)
        self.bloom = BloomFilter(self._read(*handles[1]))
        # The filter's parts, flat, for the probe the database inlines in its reads.
        self.bloom_words = self.bloom.words
        self.bloom_nwords = self.bloom.nwords
        self.bloom_masks = self.bloom.masks
        rkeys, rtags, rvo, rdata = decode_block(self._read(*handles[2]), path, handles[2][0])
        self.range_tombstones = [
            (rkeys[i], rdata[rvo[i]:rvo[i + 1]], rtags[i] >> 8) for i in range(len(rkeys))]
        try:
            self.properties = json.loads(self._read(*handles[3]))
        except ValueError:
            raise Corruption(path, handles[3][0], "properties block is not JSON") from None

    def _read(self, off: int, size: int) -> bytes:
        """Read and verify the block at ``off``; return its uncompressed contents."""
        buf, base = self._locate(off, size)
        return buf[base:base + size] if buf is self._mm else buf  # type: ignore[return-value]

    def _locate(self, off: int, size: int) -> tuple[bytes | mmap.mmap, int]:
        """Verify the block at ``off``; return where its contents are: ``(mmap, off)``
        for a stored block (nothing is copied), ``(bytes, 0)`` once decompressed."""
        mm = self._mm
        end = off + size
        if end + TRAILER_SIZE > self.size:
            raise Corruption(self.path, off, "block runs past the end of the file")
        kind, crc = _TRAILER.unpack_from(mm, end)
        stored = memoryview(mm)[off:end]
        try:
            if crc32(_KIND_BYTES[kind], crc32(stored)) != crc:
                raise Corruption(self.path, off, "block checksum mismatch")
            if kind == COMPRESSION_NONE:
                return mm, off
            if kind == COMPRESSION_ZLIB:
                try:
                    return zlib.decompress(stored), 0
                except zlib.error:
                    raise Corruption(self.path, off, "block does not decompress") from None
        finally:
            stored.release()
        raise Corruption(self.path, off, f"unknown block compression {kind}")

    def block(self, i: int) -> BlockView:
        """Data block ``i`` as ``open_block`` returns it, through the block cache."""
        cache = self.cache
        if cache is not None:
            blk = cache.get(self._cache_base + i)
            if blk is not None:
                if blk[5] is None and cache.usage < cache.capacity * PROMOTE_BELOW:
                    # Read again while the cache has room: the working set fits,
                    # so unpacking for fast searches pays off.
                    promote(blk)
                    cache.insert(self._cache_base + i, blk, self._charge(blk) + 200 * blk[1])
                return blk
        off, size = self.handles[i]
        buf, base = self._locate(off, size)
        blk = open_block(buf, base, size if buf is self._mm else len(buf), self.path, off)
        if cache is not None:
            cache.insert(self._cache_base + i, blk, self._charge(blk))
        return blk

    def _charge(self, blk: BlockView) -> int:
        """Memory of a fresh view (a short list of ints and its cache entry), plus
        the bytes when the block was decompressed."""
        return (0 if blk[0] is self._mm else len(blk[0])) + 400

    def get(self, key: bytes, h: int, snap: int | None) -> object:
        """Newest version of ``key`` visible at ``snap``: bytes, None (deleted) or MISS."""
        bloom = self.bloom
        if bloom.nwords:
            m = bloom.masks[((h * GOLDEN) & 0xFFFFFFFF) >> 16]
            if bloom.words[h % bloom.nwords] & m != m:
                return MISS
        return self.lookup(key, snap)

    def lookup(self, key: bytes, snap: int | None) -> object:
        """``get`` without the bloom filter (for callers that already asked it)."""
        index_keys = self.index_keys
        i = bisect_left(index_keys, key)
        n = self.num_blocks
        while i < n:
            blk = self.block(i)
            data, m, kstart, voff, toff, keys = blk[:6]
            base = blk[8]
            if keys is not None:
                j = bisect_left(keys, key)
                tags, vo = blk[6], blk[7]
                while j < m and keys[j] == key:
                    tag = tags[j]
                    if snap is None or tag >> 8 <= snap:
                        if tag & 0xFF == KIND_PUT:
                            return data[base + vo[j]:base + vo[j + 1]]
                        return None
                    j += 1
                if j < m:
                    return MISS
                i += 1
                continue
            lo, hi = 0, m
            while lo < hi:
                mid = (lo + hi) >> 1
                s, e = U32X2.unpack_from(data, kstart + 4 * mid)
                if data[base + s:base + e] < key:
                    lo = mid + 1
                else:
                    hi = mid
            j = lo
            while j < m and _key_at(data, kstart, base, j) == key:
                (tag,) = U64.unpack_from(data, toff + 8 * j)
                if snap is None or tag >> 8 <= snap:
                    if tag & 0xFF == KIND_PUT:
                        s, e = U32X2.unpack_from(data, voff + 4 * j)
                        return data[base + s:base + e]
                    return None
                j += 1
            if j < m:
                return MISS
            i += 1  # versions of this key continue in the next block
        return MISS

    def scan(self, lower: bytes | None, upper: bytes | None, snap: int | None, rank: int,
             reverse: bool = False) -> Iterator[tuple[bytes, int, bytes | None]]:
        """Yield ``(key, rank, value)``: per key in range the newest version visible."""
        return scan_tables(((self, snap),), lower, upper, rank, reverse)

    def blocks(self) -> Iterator[tuple[list[bytes], list[int], list[bytes]]]:
        """Every data block as ``(keys, tags, values)``, bypassing the block cache."""
        for off, size in self.handles:
            keys, tags, vo, data = decode_block(self._read(off, size), self.path, off)
            yield keys, tags, [data[s:e] for s, e in zip(vo, vo[1:], strict=False)]

    def entries(self) -> Iterator[tuple[bytes, int, bytes | None]]:
        """Every version as ``(key, tag, value-or-None)``, bypassing the block cache."""
        for off, size in self.handles:
            keys, tags, vo, data = decode_block(self._read(off, size), self.path, off)
            for j, k in enumerate(keys):
                tag = tags[j]
                yield k, tag, data[vo[j]:vo[j + 1]] if tag & 0xFF else None

    def verify(self) -> int:
        """Check every block's checksum and the ordering of all entries; return entry count."""
        prev: tuple[bytes, int] | None = None
        count = 0
        for bi, (off, size) in enumerate(self.handles):
            keys, tags, _, _ = decode_block(self._read(off, size), self.path, off)
            if not keys:
                raise Corruption(self.path, off, "empty data block")
            if keys[-1] != self.index_keys[bi]:
                raise Corruption(self.path, off, "index key does not match the block's last key")
            for k, t in zip(keys, tags, strict=True):
                if prev is not None and (k < prev[0] or (k == prev[0] and t >= prev[1])):
                    raise Corruption(self.path, off, "entries out of order")
                prev = (k, t)
                count += 1
        if count != self.properties.get("num_entries", count):
            raise Corruption(self.path, None, "entry count differs from properties")
        return count

    def first_key(self) -> bytes | None:
        if not self.num_blocks:
            return None
        view = self.block(0)
        ko, b = key_offsets(view), view[8]
        return view[0][b + ko[0]:b + ko[1]]

    def close(self) -> None:
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass


def scan_tables(tables: Iterable[tuple[TableReader, int | None]], lower: bytes | None,
                upper: bytes | None, rank: int,
                reverse: bool = False) -> Iterator[tuple[bytes, int, bytes | None]]:
    """Scan a sorted run of tables (one table, or the files of a level in key order,
    descending when ``reverse``); each comes with the snapshot to read it at (None:
    every version is visible). Yields ``(key, rank, value)``, value None for a
    deletion, one item per key: the newest visible version. One generator for the
    whole run keeps the per-item cost to a single resumption.
    """
    if reverse:
        return _scan_tables_reverse(tables, lower, upper, rank)
    return _scan_tables_forward(tables, lower, upper, rank, False)


def scan_live(tables: Iterable[tuple[TableReader, int | None]], lower: bytes | None,
              upper: bytes | None) -> Iterator[tuple[bytes, bytes]]:
    """Forward ``scan_tables`` of a run that is the only source of a read: yields
    ``(key, value)`` and leaves deletions out."""
    return _scan_tables_forward(tables, lower, upper, 0, True)  # type: ignore[return-value]


def _scan_tables_forward(tables: Iterable[tuple[TableReader, int | None]], lower: bytes | None,
                         upper: bytes | None, rank: int,
                         live: bool) -> Iterator[tuple[bytes, int, bytes | None]]:
    prev = None
    for reader, snap in tables:
        n = reader.num_blocks
        bi = bisect_left(reader.index_keys, lower) if lower is not None else 0
        first = True
        while bi < n:
            view = reader.block(bi)
            data, m, keys, b = view[0], view[1], view[5], view[8]
            ko = key_offsets(view) if keys is None else None
            tags, vo = block_arrays(view)
            start = block_seek(view, lower, ko) if first and lower is not None else 0
            first = False
            last = keys[-1] if keys is not None else data[b + ko[m - 1]:b + ko[m]]  # type: ignore[index]
            bounded = upper is not None and last >= upper
            for j in range(start, m):
                k = keys[j] if keys is not None else data[b + ko[j]:b + ko[j + 1]]  # type: ignore[index]
                if k == prev:
                    continue
                if bounded and k >= upper:  # type: ignore[operator]
                    return
                tag = tags[j]
                if snap is not None and tag >> 8 > snap:
                    continue
                prev = k
                if tag & 0xFF:
                    if live:
                        yield k, data[b + vo[j]:b + vo[j + 1]]  # type: ignore[misc]
                    else:
                        yield k, rank, data[b + vo[j]:b + vo[j + 1]]
                elif not live:
                    yield k, rank, None
            bi += 1


def _scan_tables_reverse(tables: Iterable[tuple[TableReader, int | None]], lower: bytes | None,
                         upper: bytes | None, rank: int) -> Iterator[tuple[bytes, int, bytes | None]]:
    pend_key = None
    pend_val = None
    have = False
    for reader, snap in tables:
        last = reader.num_blocks - 1
        bi = min(bisect_left(reader.index_keys, upper), last) if upper is not None else last
        while bi >= 0:
            view = reader.block(bi)
            data, m, keys, b = view[0], view[1], view[5], view[8]
            ko = key_offsets(view) if keys is None else None
            tags, vo = block_arrays(view)
            for j in range(m - 1, -1, -1):
                k = keys[j] if keys is not None else data[b + ko[j]:b + ko[j + 1]]  # type: ignore[index]
                if upper is not None and k >= upper:
                    continue
                if lower is not None and k < lower:
                    if have:
                        yield pend_key, rank, pend_val  # type: ignore[misc]
                    return
                if k != pend_key:
                    if have:
                        yield pend_key, rank, pend_val  # type: ignore[misc]
                    pend_key = k
                    have = False
                tag = tags[j]
                if snap is None or tag >> 8 <= snap:
                    # Walking backwards, later hits for the same key are newer versions.
                    have = True
                    pend_val = data[b + vo[j]:b + vo[j + 1]] if tag & 0xFF else None
            bi -= 1
    if have:
        yield pend_key, rank, pend_val  # type: ignore[misc]
