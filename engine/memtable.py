"""The in-memory write buffer.

Three dicts keyed by user key: ``values`` holds the newest value (None is a
deletion), ``seqs`` its sequence number, and ``older`` the versions a live snapshot
may still read (newest first), for the few keys that have them. Keeping bytes and
ints in plain dicts, with no per-write tuple, keeps the garbage collector out of
the write path. Invariant: every version a live snapshot can see is kept; any
other older version is replaced in place. Sorted order is built lazily and cached
until a new key arrives (keys are never removed, so the cache is valid while the
size is equal).

Writers update ``older``, then ``seqs``, then ``values``; a reader at a snapshot
reads ``seqs`` before and after ``values`` and retries if they differ, so it never
pairs a value with another version's sequence number.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

# Per-entry bookkeeping charged against write_buffer_size besides key and value.
ENTRY_OVERHEAD = 24

ABSENT = object()

# ``seqs`` starts with this many placeholder entries (int keys, which never equal a
# bytes key). A dict copies its whole table when it grows, and ``values`` and
# ``seqs`` grow in step, so without the offset one write paid both copies at once
# (about 30 ms at 350k keys, 60 ms at 700k). With it their growth points lie
# tens of thousands of writes apart.
_SEQS_PADDING = dict.fromkeys(range(40_000), 0)


class MemTable:
    __slots__ = ("values", "seqs", "older", "size", "log_number", "_sorted")

    def __init__(self, log_number: int) -> None:
        self.values: dict[bytes, bytes | None] = {}
        self.seqs: dict[bytes, int] = _SEQS_PADDING.copy()  # type: ignore[assignment]
        self.older: dict[bytes, list[tuple[int, bytes | None]]] = {}
        self.size = 0
        self.log_number = log_number
        self._sorted: list[bytes] = []

    def __len__(self) -> int:
        return len(self.values)

    def add(self, seq: int, key: bytes, value: bytes | None, snap_max: int) -> None:
        """Insert a version; keep the replaced one if a snapshot at ``snap_max`` sees it."""
        self.size += len(key) + (len(value) if value is not None else 0) + ENTRY_OVERHEAD
        old_seq = self.seqs.get(key)
        if old_seq is not None and snap_max >= old_seq:
            kept = self.older.get(key)
            if kept is None:
                self.older[key] = [(old_seq, self.values[key])]
            else:
                kept.insert(0, (old_seq, self.values[key]))
        self.seqs[key] = seq
        self.values[key] = value

    def get(self, key: bytes, snap: int | None = None) -> tuple[bool, bytes | None]:
        """Return ``(found, value)`` at ``snap``; found with value None means deleted."""
        if snap is None:
            value = self.values.get(key, ABSENT)
            if value is ABSENT:
                return False, None
            return True, value  # type: ignore[return-value]
        seqs = self.seqs
        while True:
            seq = seqs.get(key)
            if seq is None:
                return False, None
            value = self.values.get(key)
            if seqs.get(key) == seq:
                break
        if seq <= snap:
            return True, value
        for s, v in self.older.get(key, ()):
            if s <= snap:
                return True, v
        return False, None

    def sorted_keys(self) -> list[bytes]:
        s = self._sorted
        if len(s) != len(self.values):
            s = self._sorted = sorted(self.values)
        return s

    def entries(self) -> Iterator[tuple[bytes, int, bytes | None]]:
        """All versions as ``(key, seq, value)`` in key order, newest version first."""
        values, seqs, older = self.values, self.seqs, self.older
        for key in self.sorted_keys():
            yield key, seqs[key], values[key]
            for seq, value in older.get(key, ()):
                yield key, seq, value

    def scan(self, lower: bytes | None, upper: bytes | None, snap: int, rank: int,
             reverse: bool = False) -> Iterator[tuple[bytes, int, bytes | None]]:
        """Yield ``(key, rank, value)``, the version visible at ``snap`` per key in range."""
        keys = self.sorted_keys()
        lo = bisect_left(keys, lower) if lower is not None else 0
        hi = bisect_left(keys, upper) if upper is not None else len(keys)
        get = self.get
        order = range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)
        for i in order:
            key = keys[i]
            found, value = get(key, snap)
            if found:
                yield key, rank, value
