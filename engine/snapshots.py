"""Snapshots: read views pinned at a sequence number, and the list of the live ones.

A snapshot at ``seq`` sees exactly the writes numbered ``seq`` or lower. Two things
depend on which snapshots are live: a memtable keeps a replaced version while some
snapshot may read it (writers pass ``SnapshotList.newest``), and a compaction keeps
an older version while a snapshot falls between it and the next newer one
(``SnapshotList.sequences``).

Invariant: every sequence number an unreleased ``Snapshot`` holds is counted, so no
version it can see is dropped. Registering happens under the DB's lock, so the
number and the writes it covers agree; a release may come from a finalizer on any
thread at any moment (even one holding that lock), so it never blocks: while the
lock is busy it is deferred, and the next holder applies it.
"""

from __future__ import annotations

import threading

# ``SnapshotList.newest`` when no snapshot is live; below every sequence number.
NO_SNAPSHOT = -1


class Snapshot:
    """A consistent read view; release it (or leave its ``with`` block) when done."""

    __slots__ = ("seq", "_owner", "_released")

    def __init__(self, owner: SnapshotList, seq: int) -> None:
        self.seq = seq
        self._owner = owner
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner.release(self.seq)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if not self._released:
            try:
                self.release()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


class SnapshotList:
    """The live snapshots of one database, counted per sequence number."""

    __slots__ = ("newest", "_lock", "_counts", "_deferred")

    def __init__(self, lock: threading.Lock) -> None:
        # The highest live snapshot (NO_SNAPSHOT if none): every write reads it.
        self.newest = NO_SNAPSHOT
        # The DB's lock, which register's callers hold.
        self._lock = lock
        self._counts: dict[int, int] = {}
        self._deferred: list[int] = []

    def register(self, seq: int) -> Snapshot:
        """A new snapshot at ``seq`` (caller holds the lock)."""
        self.drain()
        self._counts[seq] = self._counts.get(seq, 0) + 1
        if seq > self.newest:
            self.newest = seq
        return Snapshot(self, seq)

    def release(self, seq: int) -> None:
        """Drop one snapshot at ``seq``; never blocks (see the module docstring)."""
        if not self._lock.acquire(blocking=False):
            self._deferred.append(seq)
            return
        try:
            self._drop(seq)
            self.drain()
        finally:
            self._lock.release()

    def _drop(self, seq: int) -> None:
        n = self._counts.get(seq, 0) - 1
        if n > 0:
            self._counts[seq] = n
            return
        self._counts.pop(seq, None)
        if seq == self.newest:
            self.newest = max(self._counts, default=NO_SNAPSHOT)

    def drain(self) -> None:
        """Apply releases deferred while the lock was busy (caller holds the lock)."""
        while self._deferred:
            self._drop(self._deferred.pop())

    def sequences(self) -> list[int]:
        """The sequence numbers of the live snapshots (caller holds the lock)."""
        self.drain()
        return list(self._counts)

    def count(self) -> int:
        """How many snapshots are live."""
        return sum(self._counts.values())
