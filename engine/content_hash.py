"""A hash of a database's logical contents, blind to how they are laid out.

Two databases that hold the same keys with the same values hash alike whatever their
memtables, levels, tables, tombstones or compression; one differing byte, one key
more or less, changes the hash. Each pair is hashed as its two lengths (u32 little
endian) and its bytes, in key order, with BLAKE2b-256.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

_LENGTHS = struct.Struct("<II")


def content_hash(pairs: Iterable[tuple[bytes, bytes]]) -> tuple[str, int]:
    """The hex digest of ``(key, value)`` pairs given in key order, and their count."""
    digest = hashlib.blake2b(digest_size=32, person=b"lsmdb-contents")
    count = 0
    for key, value in pairs:
        digest.update(_LENGTHS.pack(len(key), len(value)))
        digest.update(key)
        digest.update(value)
        count += 1
    return digest.hexdigest(), count
