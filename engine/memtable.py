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

A put replacing a deletion keeps the deletion in ``older`` even when no snapshot
needs it (see ``add``). Range tombstones are a separate list, ``range_dels``,
appended in sequence order; their fragmented form (engine/range_tombstones.py) is
built when a reader first asks after the list changed, and cached. A single deletion
is stored as a deletion whose sequence number is in ``single_deletes``, so reads
need not tell them apart and a flush writes the right kind.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

from .range_tombstones import FragmentedTombstones, Tombstone, fragment

# Per-entry memory charged against write_buffer_size besides the key and value bytes,
# so the budget bounds what the memtable really occupies, as RocksDB's arena does:
# measured with tracemalloc on CPython 3.11 (tests/unit/engine/test_engine_memtable_bloom_cache.py),
# an entry costs about 130 bytes in the two dicts (slots, index, the sequence
# number's int) and 70 in the headers of its key and value objects.
ENTRY_OVERHEAD = 200

ABSENT = object()

# New range tombstones merged one by one into the cached fragments; beyond this many,
# fragmenting the whole list again is cheaper.
_MERGE_AT_MOST = 16

# ``seqs`` starts with this many placeholder entries (int keys, which never equal a
# bytes key). A dict copies its whole table when it grows, and ``values`` and
# ``seqs`` grow in step, so without the offset one write paid both copies at once
# (about 30 ms at 350k keys, 60 ms at 700k). With it their growth points lie
# tens of thousands of writes apart.
_SEQS_PADDING = dict.fromkeys(range(40_000), 0)

# Entries ``dismantle`` frees between two chances for other threads to run (about
# a quarter of a millisecond of work).
_DISMANTLE_SLICE = 4096


class MemTable:
    __slots__ = ("values", "seqs", "older", "size", "log_number", "_sorted",
                 "range_dels", "single_deletes", "_fragments")

    def __init__(self, log_number: int) -> None:
        self.values: dict[bytes, bytes | None] = {}
        self.seqs: dict[bytes, int] = _SEQS_PADDING.copy()  # type: ignore[assignment]
        self.older: dict[bytes, list[tuple[int, bytes | None]]] = {}
        self.size = 0
        self.log_number = log_number
        self._sorted: list[bytes] = []
        self.range_dels: list[Tombstone] = []
        self.single_deletes: set[int] = set()
        # (len(range_dels) it was built from, the fragmented tombstones).
        self._fragments: tuple[int, FragmentedTombstones] | None = None

    def __len__(self) -> int:
        """Point keys plus range tombstones: zero only for a memtable with nothing to flush."""
        return len(self.values) + len(self.range_dels)

    def add_range_tombstone(self, start: bytes, end: bytes, seq: int) -> None:
        """Delete ``[start, end)`` below ``seq``, at a cost independent of the keys there."""
        self.size += len(start) + len(end) + ENTRY_OVERHEAD
        self.range_dels.append((start, end, seq))

    def add_single_delete(self, seq: int, key: bytes, snap_max: int) -> None:
        self.single_deletes.add(seq)
        self.add(seq, key, None, snap_max)

    def dismantle(self) -> None:
        """Free the entries a slice at a time, yielding the interpreter between slices.

        Dropping a flushed memtable whole frees every entry in one step that holds
        the interpreter (about 10 ms per 100,000 entries), which a foreground write
        would wait out. Only for a memtable no other thread can still reach: its
        caller checks that before.
        """
        keys = self._sorted
        while keys:
            del keys[-_DISMANTLE_SLICE:]
            time.sleep(0)
        for entries in (self.older, self.seqs, self.values):
            popitem = entries.popitem
            while entries:
                for _ in range(min(len(entries), _DISMANTLE_SLICE)):
                    popitem()
                time.sleep(0)

    def tombstones(self) -> FragmentedTombstones:
        """The range tombstones, fragmented; brought up to date only after one was
        added, by merging the few new ones (each newer than all before it) into the
        cached pieces, or by fragmenting them all again after many."""
        cached = self._fragments
        n = len(self.range_dels)
        if cached is None or cached[0] != n:
            done = cached[0] if cached is not None else 0
            if cached is not None and n - done <= _MERGE_AT_MOST:
                frags = cached[1]
                for start, end, seq in self.range_dels[done:n]:
                    frags = frags.with_newest(start, end, seq)
            else:
                frags = fragment(self.range_dels[:n])
            cached = self._fragments = (n, frags)
        return cached[1]

    def add(self, seq: int, key: bytes, value: bytes | None, snap_max: int) -> None:
        """Insert a version; keep the replaced one if a snapshot at ``snap_max`` sees it."""
        self.size += len(key) + (len(value) if value is not None else 0) + ENTRY_OVERHEAD
        old_seq = self.seqs.get(key)
        if old_seq is not None:
            if snap_max >= old_seq:
                kept = self.older.get(key)
                if kept is None:
                    self.older[key] = [(old_seq, self.values[key])]
                else:
                    kept.insert(0, (old_seq, self.values[key]))
            elif value is not None and self.values[key] is None:
                # A put over a deletion keeps the deletion (and only what snapshots
                # need below it): a single deletion of this put vanishes with it in
                # compaction, and the deletion must then still hide older puts.
                self.older[key] = [(old_seq, None)] + [
                    v for v in self.older.get(key, ()) if v[0] <= snap_max]
        self.seqs[key] = seq
        self.values[key] = value

    def get(self, key: bytes, snap: int | None = None) -> tuple[bool, bytes | None]:
        """Return ``(found, value)`` at ``snap``; found with value None means deleted."""
        if snap is None:
            value = self.values.get(key, ABSENT)
            if value is ABSENT:
                return False, None
            return True, value  # type: ignore[return-value]
        found = self.version(key, snap)
        if found is None:
            return False, None
        return True, found[1]

    def version(self, key: bytes, snap: int | None) -> tuple[int, bytes | None] | None:
        """``(seq, value)`` of the newest version of ``key`` visible at ``snap`` (None:
        the newest), or None if there is none."""
        seqs = self.seqs
        while True:
            seq = seqs.get(key)
            if seq is None:
                return None
            value = self.values.get(key)
            if seqs.get(key) == seq:
                break
        if snap is None or seq <= snap:
            return seq, value
        for s, v in self.older.get(key, ()):
            if s <= snap:
                return s, v
        return None

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
             reverse: bool = False, tombstones: FragmentedTombstones | None = None,
             ) -> Iterator[tuple[bytes, int, bytes | None]]:
        """Yield ``(key, rank, value)``, the version visible at ``snap`` per key in range;
        a version under one of ``tombstones`` (the read's, already cut to what ``snap``
        sees) with a higher sequence number is yielded as a deletion."""
        keys = self.sorted_keys()
        lo = bisect_left(keys, lower) if lower is not None else 0
        hi = bisect_left(keys, upper) if upper is not None else len(keys)
        version = self.version
        order = range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)
        for i in order:
            key = keys[i]
            found = version(key, snap)
            if found is not None:
                seq, value = found
                if tombstones is not None and tombstones.covering(key) > seq:
                    value = None
                yield key, rank, value
