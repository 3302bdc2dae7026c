"""The in-memory write buffer.

A dict maps a user key to its newest version ``(seq, value)`` (value None is a
deletion) or, while a snapshot needs an older version, to a list of versions newest
first. Invariant: every version a live snapshot can see is kept; any other older
version is replaced in place. Sorted order is built lazily and cached until a new
key arrives (keys are never removed, so the cache is valid while the size is equal).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

# Per-entry bookkeeping charged against write_buffer_size besides key and value.
ENTRY_OVERHEAD = 24


class MemTable:
    __slots__ = ("table", "size", "log_number", "_sorted")

    def __init__(self, log_number: int) -> None:
        self.table: dict[bytes, tuple | list] = {}
        self.size = 0
        self.log_number = log_number
        self._sorted: list[bytes] = []

    def __len__(self) -> int:
        return len(self.table)

    def add(self, seq: int, key: bytes, value: bytes | None, snap_max: int) -> None:
        """Insert a version; keep the replaced one if a snapshot at ``snap_max`` sees it."""
        table = self.table
        old = table.get(key)
        self.size += len(key) + (len(value) if value is not None else 0) + ENTRY_OVERHEAD
        if old is None:
            table[key] = (seq, value)
            return
        if type(old) is tuple:
            table[key] = (seq, value) if snap_max < old[0] else [(seq, value), old]
        elif snap_max < old[0][0]:
            # No snapshot sees the replaced newest version; older ones may be needed.
            old[0] = (seq, value)
        else:
            old.insert(0, (seq, value))

    def get(self, key: bytes, snap: int | None = None) -> tuple[bool, bytes | None]:
        """Return ``(found, value)``; found with value None means deleted."""
        e = self.table.get(key)
        if e is None:
            return False, None
        if type(e) is tuple:
            if snap is None or e[0] <= snap:
                return True, e[1]
            return False, None
        for seq, value in e:
            if snap is None or seq <= snap:
                return True, value
        return False, None

    def sorted_keys(self) -> list[bytes]:
        s = self._sorted
        if len(s) != len(self.table):
            s = self._sorted = sorted(self.table)
        return s

    def entries(self) -> Iterator[tuple[bytes, int, bytes | None]]:
        """All versions as ``(key, seq, value)`` in key order, newest version first."""
        table = self.table
        for key in self.sorted_keys():
            e = table[key]
            if type(e) is tuple:
                yield key, e[0], e[1]
            else:
                for seq, value in e:
                    yield key, seq, value

    def scan(self, lower: bytes | None, upper: bytes | None, snap: int, rank: int,
             reverse: bool = False) -> Iterator[tuple[bytes, int, bytes | None]]:
        """Yield ``(key, rank, value)``, the version visible at ``snap`` per key in range."""
        keys = self.sorted_keys()
        lo = bisect_left(keys, lower) if lower is not None else 0
        hi = bisect_left(keys, upper) if upper is not None else len(keys)
        table = self.table
        order = range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)
        for i in order:
            key = keys[i]
            e = table[key]
            if type(e) is tuple:
                if e[0] <= snap:
                    yield key, rank, e[1]
                continue
            for seq, value in e:
                if seq <= snap:
                    yield key, rank, value
                    break
