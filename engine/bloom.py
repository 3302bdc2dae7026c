"""Whole-table bloom filters, blocked by 64-bit word: the filter block's format,
building it and probing it.

Layout: ``nwords`` 64-bit little-endian words, then one byte ``k``. A key with
``h = crc32(key)`` lives in word ``h % nwords`` and sets the bits of
``MASKS_k[((h * 0x9E3779B1) mod 2^32) >> 16]``; mask ``m`` (0 <= m < 65536) is the OR
of ``1 << ((x_i >> 16) & 63)`` for ``x_0 = m`` and ``x_i = (x_{i-1} * 1103515245 +
12345) mod 2^31``, i = 1..k. One word and one mask per key keep building and probing
to a few interpreter operations. ``build_filter`` and ``BloomFilter.may_contain`` are
the only code that knows where a key's bits are. Invariant: a filter never says no
for a key that was added.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from functools import lru_cache
from zlib import crc32

# The hash a key is filtered by; a point read computes it once for every table.
key_hash = crc32
GOLDEN = 0x9E3779B1


@lru_cache(maxsize=8)
def masks(k: int) -> tuple[int, ...]:
    out = []
    for m in range(1 << 16):
        x = m
        mask = 0
        for _ in range(k):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            mask |= 1 << ((x >> 16) & 63)
        out.append(mask)
    return tuple(out)


def probes_for(bits_per_key: int) -> int:
    return max(1, min(12, int(bits_per_key * 0.69)))


def build_filter(hashes: Sequence[int], bits_per_key: int) -> bytes:
    """Build a filter over keys given by their ``key_hash``."""
    k = probes_for(bits_per_key)
    nwords = max(1, (len(hashes) * bits_per_key + 63) // 64)
    words = array("Q", bytes(8 * nwords))
    table = masks(k)
    for h in hashes:
        words[h % nwords] |= table[((h * GOLDEN) & 0xFFFFFFFF) >> 16]
    if sys.byteorder != "little":
        words.byteswap()
    return words.tobytes() + bytes((k,))


class BloomFilter:
    """A filter block, read; one that is not whole words plus ``k`` matches every key."""

    __slots__ = ("words", "nwords", "masks")

    def __init__(self, data: bytes) -> None:
        if len(data) < 9 or (len(data) - 1) % 8:
            self.words = array("Q")
            self.nwords = 0
            self.masks: tuple[int, ...] = ()
            return
        words = array("Q", data[:-1])
        if sys.byteorder != "little":
            words.byteswap()
        self.words = words
        self.nwords = len(words)
        self.masks = masks(data[-1])

    def may_contain(self, h: int) -> bool:
        """Whether a key with ``key_hash`` ``h`` may have been added."""
        if not self.nwords:
            return True
        m = self.masks[((h * GOLDEN) & 0xFFFFFFFF) >> 16]
        return self.words[h % self.nwords] & m == m
