"""Whole-table bloom filters.

Layout: ``bits`` (a multiple of 8) then one byte ``k``, the probe count. Probe i of a
key with ``h = crc32(key)`` tests bit ``(h + i * delta) mod 2^32 mod nbits`` where
``delta = rotate_right(h, 17)`` (double hashing). A filter never says no for a key
that was added.
"""

from __future__ import annotations

from zlib import crc32

key_hash = crc32


def build_filter(hashes: list[int], bits_per_key: int) -> bytes:
    """Build a filter over keys given by their ``key_hash``."""
    k = max(1, min(30, int(bits_per_key * 0.69)))
    nbits = max(64, len(hashes) * bits_per_key)
    nbytes = (nbits + 7) // 8
    nbits = nbytes * 8
    bits = bytearray(nbytes)
    for h in hashes:
        delta = ((h >> 17) | (h << 15)) & 0xFFFFFFFF
        for _ in range(k):
            pos = h % nbits
            bits[pos >> 3] |= 1 << (pos & 7)
            h = (h + delta) & 0xFFFFFFFF
    bits.append(k)
    return bytes(bits)


class BloomFilter:
    __slots__ = ("bits", "nbits", "k")

    def __init__(self, data: bytes) -> None:
        if len(data) < 2:
            self.bits = b""
            self.nbits = 0
            self.k = 0
            return
        self.bits = data[:-1]
        self.nbits = len(self.bits) * 8
        self.k = data[-1]

    def may_contain(self, h: int) -> bool:
        nbits = self.nbits
        if not nbits:
            return True
        bits = self.bits
        delta = ((h >> 17) | (h << 15)) & 0xFFFFFFFF
        for _ in range(self.k):
            pos = h % nbits
            if not bits[pos >> 3] & (1 << (pos & 7)):
                return False
            h = (h + delta) & 0xFFFFFFFF
        return True
