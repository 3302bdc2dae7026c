"""Range reads: merging the sorted sources of a read view into the user's iterator.

``scan`` makes one source per memtable, per level-0 table and per deeper level, each
yielding ``(key, rank, value)`` in key order with the newest version visible at the
read's sequence number (value None for a deletion, or for a version under a range
tombstone the read sees); ``rank`` orders the sources newest first. The merge
yields, for each key, the version of the lowest rank and leaves the key out when
that version is a deletion. When one sorted run is the only
source of a forward read, it is scanned straight through, with no merge.

Invariant: an iterator yields every key live at its sequence number in
``[lower, upper)`` exactly once, in order. Everything it reads stays readable while
it runs: the version it captured pins the tables, and a snapshot it holds
(``releasing``) pins the memtable versions; the version pin keeps the tables on
disk until the iterator is closed.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Iterator
from heapq import heapify, heappop, heapreplace

from .memtable import MemTable
from .range_tombstones import FragmentedTombstones, Tombstone, fragment
from .snapshots import Snapshot
from .table_reader import TableReader
from .table_scan import scan_live, scan_tables
from .version import FileMeta, Version, VersionPin

Source = Iterator[tuple[bytes, int, bytes | None]]


def scan(mems: list[MemTable], version: Version, lower: bytes | None, upper: bytes | None,
         reverse: bool, seq: int) -> Iterator[tuple[bytes, bytes]]:
    """Merged live pairs of the memtables (newest first) and tables in range, as of ``seq``."""
    if lower is not None and upper is not None and lower >= upper:
        return iter(())
    tombs = read_tombstones(mems, version, lower, upper, seq)
    if not reverse and not mems and tombs is None:
        single = _single_run(version, lower, upper, seq)
        if single is not None:
            return single
    sign = -1 if reverse else 1
    sources = []
    rank = 0
    for m in mems:
        sources.append(m.scan(lower, upper, seq, sign * rank, reverse, tombs))
        rank += 1
    for f in version.overlapping(0, lower, upper):
        snap = None if f.largest_seq <= seq else seq
        sources.append(scan_tables(((f.reader, snap),), lower, upper, sign * rank, reverse,
                                   tombs))
        rank += 1
    for level in range(1, len(version.levels)):
        if version.levels[level]:
            tables = level_tables(version.levels[level], version.largests[level],
                                  lower, upper, seq, reverse)
            sources.append(scan_tables(tables, lower, upper, sign * rank, reverse, tombs))
        rank += 1
    if len(sources) == 1:
        return _live(sources[0])
    return _merge_reverse(sources) if reverse else _merge_forward(sources)


def read_tombstones(mems: list[MemTable], version: Version, lower: bytes | None,
                    upper: bytes | None, seq: int) -> FragmentedTombstones | None:
    """The range tombstones of every source that meet ``[lower, upper)`` and that a
    read at ``seq`` sees, fragmented into one list (each piece with its highest
    sequence number); None when there are none. Each source's own list is already
    fragmented, so only the pieces in range are visited."""
    raw: list[Tombstone] = []
    for m in mems:
        if m.range_dels:
            raw += m.tombstones().visible(lower, upper, seq)
    if version.has_range_tombstones:
        for level in range(len(version.levels)):
            for f in version.overlapping(level, lower, upper):
                t = f.reader.tombstones
                if t is not None:
                    raw += t.visible(lower, upper, seq)
    return fragment(raw) if raw else None


def _single_run(version: Version, lower: bytes | None, upper: bytes | None,
                seq: int) -> Iterator[tuple[bytes, bytes]] | None:
    """A forward scan straight over the tables when only one sorted run (one
    level-0 table or one level) meets the range; None otherwise."""
    l0 = version.overlapping(0, lower, upper)
    runs = [level for level in range(1, len(version.levels)) if version.levels[level]]
    if len(l0) + len(runs) != 1:
        return None
    if l0:
        f = l0[0]
        tables: Iterator[tuple[TableReader, int | None]] = iter(
            ((f.reader, None if f.largest_seq <= seq else seq),))
    else:
        level = runs[0]
        tables = level_tables(version.levels[level], version.largests[level],
                              lower, upper, seq, False)
    return scan_live(tables, lower, upper)


def level_tables(files: list[FileMeta], largests: list[bytes], lower: bytes | None,
                 upper: bytes | None, seq: int,
                 reverse: bool) -> Iterator[tuple[TableReader, int | None]]:
    """The tables of one sorted, non-overlapping level that meet ``[lower, upper)``,
    in scan order, each with the snapshot to read it at (None when every version in
    it is visible); found lazily."""
    if not reverse:
        i = bisect_left(largests, lower) if lower is not None else 0
        while i < len(files):
            f = files[i]
            if upper is not None and f.smallest >= upper:
                return
            yield f.reader, None if f.largest_seq <= seq else seq
            i += 1
        return
    i = min(bisect_left(largests, upper), len(files) - 1) if upper is not None else len(files) - 1
    while i >= 0:
        f = files[i]
        if lower is not None and f.largest < lower:
            return
        if upper is None or f.smallest < upper:
            yield f.reader, None if f.largest_seq <= seq else seq
        i -= 1


def releasing(items: Iterator[tuple[bytes, bytes]],
              *held: Snapshot | VersionPin) -> Iterator[tuple[bytes, bytes]]:
    """``items``, releasing each of ``held`` when they end or the iterator is closed
    (one dropped before its first item is released by the holds' finalizers)."""
    try:
        yield from items
    finally:
        for h in held:
            h.release()


def _live(source: Source) -> Iterator[tuple[bytes, bytes]]:
    """The pairs of a single source, deletions left out."""
    for key, _, value in source:
        if value is not None:
            yield key, value


def _merge_reverse(sources: list[Source]) -> Iterator[tuple[bytes, bytes]]:
    """Like ``_merge_forward`` for sources in descending key order (ranks negated)."""
    last = None
    for key, _, value in heapq.merge(*sources, reverse=True):
        if key == last:
            continue
        last = key
        if value is not None:
            yield key, value


def _merge_forward(sources: list[Source]) -> Iterator[tuple[bytes, bytes]]:
    """Merge sources yielding ``(key, rank, value)`` in key order; for a key the lowest
    rank (newest source) wins and a None value (a deletion) hides the key."""
    heap = []
    for src in sources:
        nxt = src.__next__
        try:
            key, rank, value = nxt()
        except StopIteration:
            continue
        heap.append([key, rank, value, nxt])
    heapify(heap)
    last = None
    while len(heap) > 1:
        top = heap[0]
        key = top[0]
        if key != last:
            last = key
            if top[2] is not None:
                yield key, top[2]
        try:
            top[0], _, top[2] = top[3]()
        except StopIteration:
            heappop(heap)
            continue
        heapreplace(heap, top)
    if heap:
        key, _, value, nxt = heap[0]
        while True:
            if key != last and value is not None:
                yield key, value
            try:
                key, _, value = nxt()
            except StopIteration:
                return
