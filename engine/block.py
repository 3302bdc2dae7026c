"""Block contents, the unit of a table's data, index and range-tombstone blocks
(docs/engine-format.md, "Block contents")::

    key bytes | value bytes | key_offsets u32[n+1] | value_offsets u32[n+1] | tags u64[n] | n u32

Entry i's key is ``[key_offsets[i], key_offsets[i+1])`` and its value
``[value_offsets[i], value_offsets[i+1])``, offsets counted from the start of the
contents. ``encode_block`` writes this layout and ``BlockView`` reads it; nothing
else parses it. Invariant: a ``BlockView`` exists only for contents whose entry count
and offset arrays are consistent (the constructor raises ``Corruption`` otherwise),
so readers may slice with its offsets without further checks.
"""

from __future__ import annotations

import mmap
import struct
from bisect import bisect_left
from functools import lru_cache
from itertools import accumulate

from .errors import Corruption

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
# A key's (or value's) start and end offset, read together.
U32X2 = struct.Struct("<II")


@lru_cache(maxsize=512)
def _array(count: int, code: str) -> struct.Struct:
    return struct.Struct(f"<{count}{code}")


def encode_block(keys: list[bytes], tags: list[int], values: list[bytes]) -> bytes:
    """The contents of a block holding these entries, in this order."""
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


class BlockView:
    """A checked block, read in place: where each part of it lies in ``buf``.

    ``buf`` is the table's mmap for a block stored uncompressed (a view copies
    nothing and holds a few ints, so the block cache can keep many) or the
    decompressed contents; the contents start at ``base``. ``key_offsets_at``,
    ``value_offsets_at`` and ``tags_at`` are absolute positions in ``buf``; the
    offsets stored there count from ``base``. Entries are sliced out only when
    visited; ``promote`` unpacks ``keys``, ``tags`` and ``value_offsets`` (None until
    then) for a block that is read again.
    """

    __slots__ = ("buf", "count", "key_offsets_at", "value_offsets_at", "tags_at",
                 "keys", "tags", "value_offsets", "base")

    def __init__(self, buf: bytes | mmap.mmap, base: int, size: int, path: str,
                 offset: int, global_seq: int | None = None) -> None:
        """Check the layout of the contents at ``buf[base:base + size]``; ``path`` and
        ``offset`` (the block's place in its table) name it in a Corruption. With
        ``global_seq`` (a block of an ingested table, whose entries are written with
        sequence 0) the view is unpacked at once and every tag carries that sequence
        number instead, so no reader ever sees the stored one."""
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
        self.buf = buf
        self.count = n
        self.key_offsets_at = kstart
        self.value_offsets_at = voff
        self.tags_at = voff + 4 * (n + 1)
        self.keys: list[bytes] | None = None
        self.tags: tuple[int, ...] | None = None
        self.value_offsets: tuple[int, ...] | None = None
        self.base = base
        if global_seq is not None:
            self.promote()
            high = global_seq << 8
            self.tags = tuple([high | (tag & 0xFF) for tag in self.tags])  # type: ignore[union-attr]

    def key_offsets(self) -> tuple[int, ...]:
        """The n + 1 key offsets, counted from ``base``."""
        return _array(self.count + 1, "I").unpack_from(self.buf, self.key_offsets_at)

    def arrays(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(tags, value_offsets)``, offsets counted from ``base``."""
        if self.keys is not None:
            return self.tags, self.value_offsets  # type: ignore[return-value]
        n = self.count
        return (_array(n, "Q").unpack_from(self.buf, self.tags_at),
                _array(n + 1, "I").unpack_from(self.buf, self.value_offsets_at))

    def promote(self) -> None:
        """Unpack keys, tags and value offsets, for a block searched again and again."""
        buf, ko, b = self.buf, self.key_offsets(), self.base
        self.tags, self.value_offsets = self.arrays()
        self.keys = [buf[b + s:b + e] for s, e in zip(ko, ko[1:], strict=False)]

    def seek(self, key: bytes, ko: tuple[int, ...] | None) -> int:
        """Index of the first entry whose key is ``>= key`` (``ko``: ``key_offsets()``,
        needed unless the view is promoted)."""
        keys = self.keys
        if keys is not None:
            return bisect_left(keys, key)
        buf, b = self.buf, self.base
        assert ko is not None
        lo, hi = 0, self.count
        while lo < hi:
            mid = (lo + hi) >> 1
            if buf[b + ko[mid]:b + ko[mid + 1]] < key:
                lo = mid + 1
            else:
                hi = mid
        return lo


def key_at(buf: bytes | mmap.mmap, key_offsets_at: int, base: int, j: int) -> bytes:
    """Key ``j`` of an unpromoted view's block, from its fields."""
    s, e = U32X2.unpack_from(buf, key_offsets_at + 4 * j)
    return buf[base + s:base + e]


def decode_block(data: bytes, path: str, offset: int, global_seq: int | None = None,
                 ) -> tuple[list[bytes], tuple[int, ...], tuple[int, ...], bytes]:
    """Decode whole contents into ``(keys, tags, value_offsets, data)``; tags carry
    ``global_seq`` when given (see ``BlockView``)."""
    view = BlockView(data, 0, len(data), path, offset, global_seq)
    ko = view.key_offsets()
    tags, vo = view.arrays()
    return [data[s:e] for s, e in zip(ko, ko[1:], strict=False)], tags, vo, data
