"""The in-memory write buffer.

Dicts keyed by user key: ``values`` holds the newest value (None is a deletion),
``seqs`` its sequence number, and ``older`` the versions a live snapshot may still
read (newest first), for the few keys that have them. ``values`` and ``seqs`` are
each split into ``SHARDS`` dicts by the key's hash (``shard_values[hash(key) &
SHARD_MASK]``), so no single step handles more than a sixteenth of the entries:
growing a dict copies its whole table, and freeing a flushed memtable frees every
entry, each in one step that holds the interpreter (whole, about 10 ms per 100,000
entries, which a foreground write would wait out). Keeping bytes and ints in plain
dicts, with no per-write tuple, keeps the garbage collector out of the write path. Invariant: every version a live snapshot can see is kept; any
other older version is replaced in place. Sorted order is built lazily and cached
until a new key arrives (keys are never removed, so the cache is valid while the
size is equal).

Writers update ``older``, then ``seqs``, then ``values`` (the key's shard of
each); a reader at a snapshot
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
from itertools import chain

from .range_tombstones import FragmentedTombstones, Tombstone, fragment

# Per-entry memory charged against write_buffer_size besides the key and value bytes,
# so the budget bounds what the memtable really occupies, as RocksDB's arena does:
# measured with tracemalloc on CPython 3.11 (tests/unit/engine/test_engine_memtable_bloom_cache.py),
# an entry costs about 130 bytes in the two dicts (slots, index, the sequence
# number's int) and 70 in the headers of its key and value objects.
ENTRY_OVERHEAD = 200

ABSENT = object()

# How many dicts ``values`` and ``seqs`` are each split into (a power of two).
SHARDS = 16
SHARD_MASK = SHARDS - 1

# New range tombstones merged one by one into the cached fragments; beyond this many,
# fragmenting the whole list again is cheaper.
_MERGE_AT_MOST = 16

# Keys of the sorted cache ``release`` frees in one step.
_RELEASE_SLICE = 16384
# The pause between two steps of ``release``: a real sleep, so a waiting thread takes
# the interpreter (after sleep(0), or at the switch interval, the releasing thread
# often takes it straight back).
_RELEASE_PAUSE = 0.0005


class MemTable:
    __slots__ = ("shard_values", "shard_seqs", "older", "size", "log_number", "_sorted",
                 "range_dels", "single_deletes", "_fragments")

    def __init__(self, log_number: int) -> None:
        self.shard_values: list[dict[bytes, bytes | None]] = [{} for _ in range(SHARDS)]
        self.shard_seqs: list[dict[bytes, int]] = [{} for _ in range(SHARDS)]
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
        return self.key_count() + len(self.range_dels)

    def key_count(self) -> int:
        return sum(map(len, self.shard_values))

    def add_range_tombstone(self, start: bytes, end: bytes, seq: int) -> None:
        """Delete ``[start, end)`` below ``seq``, at a cost independent of the keys there."""
        self.size += len(start) + len(end) + ENTRY_OVERHEAD
        self.range_dels.append((start, end, seq))

    def add_single_delete(self, seq: int, key: bytes, snap_max: int) -> None:
        self.single_deletes.add(seq)
        self.add(seq, key, None, snap_max)

    def release(self) -> None:
        """Free the entries a shard at a time, pausing between shards so a waiting
        thread takes the interpreter, instead of all in one step wherever the last
        reference goes (a foreground write would wait that out). Only for a memtable
        no other thread can still reach (its caller checks); it is empty and unusable
        afterwards."""
        keys = self._sorted
        while keys:
            del keys[-_RELEASE_SLICE:]
            time.sleep(_RELEASE_PAUSE)
        for shards in (self.shard_values, self.shard_seqs):
            while shards:
                shards.pop()
                time.sleep(_RELEASE_PAUSE)
        self.older.clear()

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
        shard = hash(key) & SHARD_MASK
        seqs, values = self.shard_seqs[shard], self.shard_values[shard]
        old_seq = seqs.get(key)
        if old_seq is not None:
            if snap_max >= old_seq:
                kept = self.older.get(key)
                if kept is None:
                    self.older[key] = [(old_seq, values[key])]
                else:
                    kept.insert(0, (old_seq, values[key]))
            elif value is not None and values[key] is None:
                # A put over a deletion keeps the deletion (and only what snapshots
                # need below it): a single deletion of this put vanishes with it in
                # compaction, and the deletion must then still hide older puts.
                self.older[key] = [(old_seq, None)] + [
                    v for v in self.older.get(key, ()) if v[0] <= snap_max]
        seqs[key] = seq
        values[key] = value

    def get(self, key: bytes, snap: int | None = None) -> tuple[bool, bytes | None]:
        """Return ``(found, value)`` at ``snap``; found with value None means deleted."""
        if snap is None:
            value = self.shard_values[hash(key) & SHARD_MASK].get(key, ABSENT)
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
        shard = hash(key) & SHARD_MASK
        seqs, values = self.shard_seqs[shard], self.shard_values[shard]
        while True:
            seq = seqs.get(key)
            if seq is None:
                return None
            value = values.get(key)
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
        if len(s) != self.key_count():
            s = self._sorted = sorted(chain.from_iterable(self.shard_values))
        return s

    def columns(self, keys: list[bytes]) -> tuple[list[int], list[bytes | None]]:
        """The sequence numbers and the values of ``keys`` (each one present), in
        order: for a flush, which reads every key (no merged copy of the shards)."""
        shard_seqs, shard_values = self.shard_seqs, self.shard_values
        shards = [hash(key) & SHARD_MASK for key in keys]
        return ([shard_seqs[i][key] for i, key in zip(shards, keys, strict=True)],
                [shard_values[i][key] for i, key in zip(shards, keys, strict=True)])

    def entries(self) -> Iterator[tuple[bytes, int, bytes | None]]:
        """All versions as ``(key, seq, value)`` in key order, newest version first."""
        keys = self.sorted_keys()
        seqs, values = self.columns(keys)
        older = self.older
        for key, seq, value in zip(keys, seqs, values, strict=True):
            yield key, seq, value
            for seq_, value_ in older.get(key, ()):
                yield key, seq_, value_

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
