"""Reading one sorted table: opening and checking it, its blocks through the block
cache, and point lookups (the layout is engine/table_format.py's, the blocks'
engine/block.py's).

A table is read through an mmap. Opening checks the footer and loads the index,
filter, range-tombstone and properties blocks (each checksummed); a data block is
checksummed when it is read into the block cache, and a cached block is a checked
view of the mapping that is not checked again. Invariant: a reader returns bytes
only from blocks whose checksum verified; anything else raises ``Corruption``
naming the file and the block offset.

An ingested table (engine/ingest.py) is written with sequence number 0 everywhere
and given one *global sequence number* when it joins the database (kept in the
MANIFEST, not in the file). A reader opened with ``global_seq`` presents every entry
and range tombstone with that number: the substitution happens where blocks are
decoded (engine/block.py's ``BlockView``), so point reads, scans, snapshots,
compaction and the tombstone logic all see only the global one.
"""

from __future__ import annotations

import mmap
import os
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .block import U32X2, U64, BlockView, decode_block, key_at
from .block_cache import BlockCache
from .bloom import BloomFilter
from .errors import Corruption
from .filename import table_name
from .range_tombstones import FragmentedTombstones, fragment
from .table_format import (
    FOOTER_SIZE,
    HANDLE,
    TRAILER_SIZE,
    decode_footer,
    decode_properties,
    read_block,
)
from .tags import KIND_PUT

if TYPE_CHECKING:
    from .version import FileMeta

# A whole-table pass drops the pages it has read from its mapping in steps this large.
_DROP_BEHIND_BYTES = 1 << 20

# Cached blocks are unpacked on reuse only while the cache is this full or less.
PROMOTE_BELOW = 0.9


class _Miss:
    """The key has no visible version in this source."""

    def __repr__(self) -> str:
        return "MISS"


MISS = _Miss()


class TableReader:
    """Reads one table through mmap; footer, index, filter and tombstones load at open."""

    def __init__(self, path: str, number: int, cache: BlockCache | None = None,
                 global_seq: int | None = None) -> None:
        self.path = path
        self.number = number
        self.cache = cache
        # The sequence number every entry of an ingested table reads as; None otherwise.
        self.global_seq = global_seq
        # Block i of this table is cached under key _cache_base + i.
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
        handles = decode_footer(self._mm[foot_off:], path, foot_off)
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
        # Point reads probe it for every table whose key range holds the key.
        self.bloom = BloomFilter(self._read(*handles[1]))
        rkeys, rtags, rvo, rdata = decode_block(self._read(*handles[2]), path, handles[2][0],
                                                global_seq)
        self.range_tombstones = [
            (rkeys[i], rdata[rvo[i]:rvo[i + 1]], rtags[i] >> 8) for i in range(len(rkeys))]
        # Fragmented once per table, for every read that meets it; None when empty.
        self.tombstones: FragmentedTombstones | None = \
            fragment(self.range_tombstones) if self.range_tombstones else None
        self.properties = decode_properties(self._read(*handles[3]), path, handles[3][0])

    def _read(self, off: int, size: int) -> bytes:
        """Read and verify the block at ``off``; return its uncompressed contents."""
        buf, base = read_block(self._mm, self.size, off, size, self.path)
        return buf[base:base + size] if buf is self._mm else buf  # type: ignore[return-value]

    def block(self, i: int) -> BlockView:
        """Data block ``i``, through the block cache."""
        cache = self.cache
        if cache is not None:
            blk = cache.get(self._cache_base + i)
            if blk is not None:
                if blk.keys is None and cache.usage < cache.capacity * PROMOTE_BELOW:
                    # Read again while the cache has room: the working set fits,
                    # so unpacking for fast searches pays off.
                    blk.promote()
                    cache.insert(self._cache_base + i, blk, self._charge(blk) + 200 * blk.count)
                return blk
        off, size = self.handles[i]
        buf, base = read_block(self._mm, self.size, off, size, self.path)
        blk = BlockView(buf, base, size if buf is self._mm else len(buf), self.path, off,
                        self.global_seq)
        if cache is not None:
            charge = self._charge(blk)
            if blk.keys is not None:
                charge += 200 * blk.count  # unpacked at once (an ingested table's block)
            cache.insert(self._cache_base + i, blk, charge)
        return blk

    def _charge(self, blk: BlockView) -> int:
        """Memory of a fresh view (a few ints and its cache entry), plus the bytes
        when the block was decompressed."""
        return (0 if blk.buf is self._mm else len(blk.buf)) + 400

    def get(self, key: bytes, h: int, snap: int | None) -> object:
        """Newest version of ``key`` visible at ``snap``: bytes, None (deleted) or MISS;
        ``h`` is the key's filter hash (engine/bloom.py)."""
        if not self.bloom.may_contain(h):
            return MISS
        return self.lookup(key, snap)

    def lookup(self, key: bytes, snap: int | None, with_seq: bool = False) -> object:
        """``get`` without the filter (for callers that already asked it); with
        ``with_seq`` a found version comes as ``(seq, value)``."""
        index_keys = self.index_keys
        i = bisect_left(index_keys, key)
        n = self.num_blocks
        while i < n:
            blk = self.block(i)
            data = blk.buf
            m = blk.count
            base = blk.base
            keys = blk.keys
            if keys is not None:
                j = bisect_left(keys, key)
                tags, vo = blk.tags, blk.value_offsets
                while j < m and keys[j] == key:
                    tag = tags[j]  # type: ignore[index]
                    if snap is None or tag >> 8 <= snap:
                        if tag & 0xFF == KIND_PUT:
                            value = data[base + vo[j]:base + vo[j + 1]]  # type: ignore[index]
                        else:
                            value = None
                        return (tag >> 8, value) if with_seq else value
                    j += 1
                if j < m:
                    return MISS
                i += 1
                continue
            kstart = blk.key_offsets_at
            # Binary search reading only the offsets it probes: an unpromoted block
            # is usually visited once, so unpacking all of them would not pay.
            lo, hi = 0, m
            while lo < hi:
                mid = (lo + hi) >> 1
                s, e = U32X2.unpack_from(data, kstart + 4 * mid)
                if data[base + s:base + e] < key:
                    lo = mid + 1
                else:
                    hi = mid
            j = lo
            while j < m and key_at(data, kstart, base, j) == key:
                (tag,) = U64.unpack_from(data, blk.tags_at + 8 * j)
                if snap is None or tag >> 8 <= snap:
                    if tag & 0xFF == KIND_PUT:
                        s, e = U32X2.unpack_from(data, blk.value_offsets_at + 4 * j)
                        value = data[base + s:base + e]
                    else:
                        value = None
                    return (tag >> 8, value) if with_seq else value
                j += 1
            if j < m:
                return MISS
            i += 1  # versions of this key continue in the next block
        return MISS

    def blocks(self) -> Iterator[tuple[list[bytes], list[int], list[bytes]]]:
        """Every data block as ``(keys, tags, values)``, bypassing the block cache.

        A whole-table pass (a compaction's) reads each page once, so the pages it
        has passed are dropped from this process's mapping as it goes: they stay in
        the page cache, not in the process's resident memory. What it yields are
        copies, never views of the mapping."""
        dropped = 0
        for off, size in self.handles:
            keys, tags, vo, data = decode_block(self._read(off, size), self.path, off,
                                                self.global_seq)
            yield keys, tags, [data[s:e] for s, e in zip(vo, vo[1:], strict=False)]
            if off + size - dropped >= _DROP_BEHIND_BYTES:
                passed = (off + size) & -mmap.PAGESIZE
                self._mm.madvise(mmap.MADV_DONTNEED, dropped, passed - dropped)
                dropped = passed

    def entries(self) -> Iterator[tuple[bytes, int, bytes | None]]:
        """Every version as ``(key, tag, value-or-None)``, bypassing the block cache."""
        for off, size in self.handles:
            keys, tags, vo, data = decode_block(self._read(off, size), self.path, off,
                                                self.global_seq)
            for j, k in enumerate(keys):
                tag = tags[j]
                yield k, tag, data[vo[j]:vo[j + 1]] if tag & 0xFF == KIND_PUT else None

    def verify(self) -> int:
        """Check every block's checksum and the ordering of all entries; return entry count."""
        prev: tuple[bytes, int] | None = None
        count = 0
        for bi, (off, size) in enumerate(self.handles):
            keys, tags, _, _ = decode_block(self._read(off, size), self.path, off,
                                            self.global_seq)
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
        ko, b = view.key_offsets(), view.base
        return view.buf[b + ko[0]:b + ko[1]]

    def evict(self) -> None:
        """Drop this table's blocks from the block cache (the table is going away)."""
        if self.cache is not None:
            self.cache.erase_table(self._cache_base, self.num_blocks)

    def close(self) -> None:
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass


def open_table(dbpath: str, f: FileMeta, cache: BlockCache | None) -> None:
    """Open the table ``f`` names in ``dbpath`` as ``f.reader``; Corruption if the file
    is missing or its size differs from the MANIFEST's."""
    path = os.path.join(dbpath, table_name(f.number))
    try:
        f.reader = TableReader(path, f.number, cache, f.global_seq)
    except FileNotFoundError:
        raise Corruption(path, None, "table file named by the MANIFEST is missing") from None
    if f.reader.size != f.size:
        raise Corruption(path, None, f"size {f.reader.size} differs from MANIFEST's {f.size}")
