"""Range tombstones: cutting ``[start, end)`` deletions into non-overlapping pieces,
and the questions point reads, iterators and compactions ask of them.

A range tombstone ``(start, end, seq)`` deletes every version of a key in
``[start, end)`` whose sequence number is below ``seq``, for a reader whose snapshot
sees ``seq``. Tombstones may overlap and arrive in any order; ``fragment`` cuts them
at every start and end into pieces that do not overlap, sorted by start, each
carrying the sequence numbers of every tombstone over it (highest first), so that a
question about one key is one binary search however many tombstones there are.
Invariant: a ``FragmentedTombstones`` covers key k at sequence s exactly when one of
the tombstones it was built from does.

Key ranges of tables are inclusive, a tombstone's end is exclusive: a table holding
the tombstone ``[s, e)`` gets ``largest_covered(e)`` as (at least) its largest key.
That is ``e`` without its last byte when ``e`` ends in 0x00 (no key lies strictly
between ``x`` and ``x + b"\\x00"``), else ``e`` itself, one key more than needed.
Compaction cuts tombstones at output boundaries of the form ``last_key + b"\\x00"``,
so neighbouring outputs never share a key (docs/engine-format.md).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from heapq import heappop, heappush

Tombstone = tuple[bytes, bytes, int]


def largest_covered(end: bytes) -> bytes:
    """The inclusive upper bound a table's key range needs for a tombstone ending
    (exclusively) at ``end``."""
    return end[:-1] if end.endswith(b"\x00") else end


def widen_to_cover(smallest: bytes | None, largest: bytes | None,
                   tombstones: Iterable[tuple[bytes, bytes]]) -> tuple[bytes | None, bytes | None]:
    """A table's key range ``[smallest, largest]`` widened to cover every tombstone
    ``(start, end)``, whatever order they come in (None: no key yet)."""
    for start, end in tombstones:
        if smallest is None or start < smallest:
            smallest = start
        last = largest_covered(end)
        if largest is None or last > largest:
            largest = last
    return smallest, largest


def successor(key: bytes) -> bytes:
    """The smallest key above ``key``."""
    return key + b"\x00"


class FragmentedTombstones:
    """Non-overlapping pieces ``[starts[i], ends[i])`` sorted by start, each with the
    sequence numbers ``seqs[i]`` of the tombstones over it, highest first."""

    __slots__ = ("starts", "ends", "seqs")

    def __init__(self, starts: list[bytes], ends: list[bytes],
                 seqs: list[tuple[int, ...]]) -> None:
        self.starts = starts
        self.ends = ends
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.starts)

    def covering(self, key: bytes, snap: int | None = None) -> int:
        """The highest sequence number of a tombstone over ``key`` that a reader at
        ``snap`` sees (None: every one), or 0 if there is none."""
        i = bisect_right(self.starts, key) - 1
        if i < 0 or key >= self.ends[i]:
            return 0
        seqs = self.seqs[i]
        if snap is None:
            return seqs[0]
        for s in seqs:
            if s <= snap:
                return s
        return 0

    def newest_above(self, key: bytes, seq: int) -> int:
        """The lowest sequence number above ``seq`` of a tombstone over ``key``, or 0:
        the tombstone that deletes version ``seq`` in the fewest snapshots' eyes."""
        i = bisect_right(self.starts, key) - 1
        if i < 0 or key >= self.ends[i]:
            return 0
        best = 0
        for s in self.seqs[i]:
            if s <= seq:
                break
            best = s
        return best

    def visible(self, lower: bytes | None, upper: bytes | None,
                snap: int | None) -> Iterator[Tombstone]:
        """``(start, end, seq)`` for each piece meeting ``[lower, upper)``, with the
        highest sequence number a reader at ``snap`` sees, skipping pieces it sees none of."""
        starts, ends, seqs = self.starts, self.ends, self.seqs
        i = bisect_right(ends, lower) if lower is not None else 0
        n = len(starts)
        while i < n and (upper is None or starts[i] < upper):
            if snap is None:
                yield starts[i], ends[i], seqs[i][0]
            else:
                for s in seqs[i]:
                    if s <= snap:
                        yield starts[i], ends[i], s
                        break
            i += 1

    def with_newest(self, start: bytes, end: bytes, seq: int) -> FragmentedTombstones:
        """These pieces and the tombstone ``[start, end)`` at ``seq``, which must be
        above every sequence number here (a memtable's next one): only the pieces it
        meets are rebuilt, the rest is copied."""
        starts, ends, seqs = self.starts, self.ends, self.seqs
        lo = bisect_right(ends, start)  # the pieces it meets are lo .. hi-1
        hi = bisect_left(starts, end)
        mid_starts: list[bytes] = []
        mid_ends: list[bytes] = []
        mid_seqs: list[tuple[int, ...]] = []

        def piece(s: bytes, e: bytes, over: tuple[int, ...]) -> None:
            mid_starts.append(s)
            mid_ends.append(e)
            mid_seqs.append(over)

        pos = start  # covered up to here
        for i in range(lo, hi):
            s, e, over = starts[i], ends[i], seqs[i]
            if s < start:
                piece(s, start, over)
                s = start
            if pos < s:
                piece(pos, s, (seq,))
            cut = e if e < end else end
            piece(s, cut, (seq, *over))
            if e > end:
                piece(end, e, over)
            pos = cut
        if pos < end:
            piece(pos, end, (seq,))
        return FragmentedTombstones(starts[:lo] + mid_starts + starts[hi:],
                                    ends[:lo] + mid_ends + ends[hi:],
                                    seqs[:lo] + mid_seqs + seqs[hi:])

    def clipped(self, lower: bytes | None, upper: bytes | None) -> Iterator[Tombstone]:
        """Every ``(start, end, seq)`` of the pieces, cut to ``[lower, upper)``."""
        starts, ends, seqs = self.starts, self.ends, self.seqs
        i = bisect_right(ends, lower) if lower is not None else 0
        n = len(starts)
        while i < n and (upper is None or starts[i] < upper):
            start, end = starts[i], ends[i]
            if lower is not None and start < lower:
                start = lower
            if upper is not None and end > upper:
                end = upper
            for s in seqs[i]:
                yield start, end, s
            i += 1


def fragment(tombstones: Iterable[Tombstone]) -> FragmentedTombstones:
    """Cut ``(start, end, seq)`` tombstones (any order, overlapping or not; empty ones
    ignored) into non-overlapping pieces; neighbouring pieces with equal sequence
    numbers are joined."""
    tombs = sorted(t for t in tombstones if t[0] < t[1])
    starts: list[bytes] = []
    ends: list[bytes] = []
    seqs: list[tuple[int, ...]] = []
    if not tombs:
        return FragmentedTombstones(starts, ends, seqs)
    points = sorted({t[0] for t in tombs} | {t[1] for t in tombs})
    active: list[tuple[bytes, int]] = []  # heap of (end, seq) of tombstones begun
    ti, n = 0, len(tombs)
    for j in range(len(points) - 1):
        p, q = points[j], points[j + 1]
        while ti < n and tombs[ti][0] == p:
            heappush(active, (tombs[ti][1], tombs[ti][2]))
            ti += 1
        while active and active[0][0] <= p:
            heappop(active)
        if not active:
            continue
        over = tuple(sorted({s for _, s in active}, reverse=True))
        if ends and ends[-1] == p and seqs[-1] == over:
            ends[-1] = q
        else:
            starts.append(p)
            ends.append(q)
            seqs.append(over)
    return FragmentedTombstones(starts, ends, seqs)

