"""Scanning a sorted run of tables: one table, or the files of a level in key order.

A scan yields, per user key in ``[lower, upper)``, the newest version visible at
the snapshot each table comes with; it walks the run's blocks in place through
the block cache (engine/table_reader.py). One generator for the whole run keeps
the per-item cost to a single resumption: this is the inner loop of every range
read. A read that meets range tombstones passes them in, fragmented and cut to
what its snapshot sees; a version under one with a higher sequence number is yielded
as a deletion. Invariant: keys come strictly ascending (descending when reversed),
each exactly once per run.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from .range_tombstones import FragmentedTombstones
from .table_reader import TableReader
from .tags import KIND_PUT


def scan_tables(tables: Iterable[tuple[TableReader, int | None]], lower: bytes | None,
                upper: bytes | None, rank: int, reverse: bool = False,
                tombstones: FragmentedTombstones | None = None,
                ) -> Iterator[tuple[bytes, int, bytes | None]]:
    """Scan a sorted run of tables (descending when ``reverse``); each comes with the
    snapshot to read it at (None: every version is visible). Yields ``(key, rank,
    value)``, value None for a deletion, one item per key: the newest visible version.
    """
    if reverse:
        return _scan_tables_reverse(tables, lower, upper, rank, tombstones)
    return _scan_tables_forward(tables, lower, upper, rank, False, tombstones)


def scan_live(tables: Iterable[tuple[TableReader, int | None]], lower: bytes | None,
              upper: bytes | None) -> Iterator[tuple[bytes, bytes]]:
    """Forward ``scan_tables`` of a run that is the only source of a read: yields
    ``(key, value)`` and leaves deletions out."""
    return _scan_tables_forward(tables, lower, upper, 0, True, None)  # type: ignore[return-value]


def _scan_tables_forward(tables: Iterable[tuple[TableReader, int | None]], lower: bytes | None,
                         upper: bytes | None, rank: int, live: bool,
                         tombstones: FragmentedTombstones | None,
                         ) -> Iterator[tuple[bytes, int, bytes | None]]:
    covering = tombstones.covering if tombstones is not None else None
    prev = None
    for reader, snap in tables:
        n = reader.num_blocks
        bi = bisect_left(reader.index_keys, lower) if lower is not None else 0
        first = True
        while bi < n:
            view = reader.block(bi)
            data, m, keys, b = view.buf, view.count, view.keys, view.base
            ko = view.key_offsets() if keys is None else None
            tags, vo = view.arrays()
            start = view.seek(lower, ko) if first and lower is not None else 0
            first = False
            last = keys[-1] if keys is not None else data[b + ko[m - 1]:b + ko[m]]  # type: ignore[index]
            bounded = upper is not None and last >= upper
            for j in range(start, m):
                k = keys[j] if keys is not None else data[b + ko[j]:b + ko[j + 1]]  # type: ignore[index]
                if k == prev:
                    continue
                if bounded and k >= upper:  # type: ignore[operator]
                    return
                tag = tags[j]
                if snap is not None and tag >> 8 > snap:
                    continue
                prev = k
                if tag & 0xFF == KIND_PUT and (covering is None or covering(k) <= tag >> 8):
                    if live:
                        yield k, data[b + vo[j]:b + vo[j + 1]]  # type: ignore[misc]
                    else:
                        yield k, rank, data[b + vo[j]:b + vo[j + 1]]
                elif not live:
                    yield k, rank, None
            bi += 1


def _scan_tables_reverse(tables: Iterable[tuple[TableReader, int | None]], lower: bytes | None,
                         upper: bytes | None, rank: int,
                         tombstones: FragmentedTombstones | None,
                         ) -> Iterator[tuple[bytes, int, bytes | None]]:
    covering = tombstones.covering if tombstones is not None else None
    pend_key = None
    pend_val = None
    have = False
    for reader, snap in tables:
        last = reader.num_blocks - 1
        bi = min(bisect_left(reader.index_keys, upper), last) if upper is not None else last
        while bi >= 0:
            view = reader.block(bi)
            data, m, keys, b = view.buf, view.count, view.keys, view.base
            ko = view.key_offsets() if keys is None else None
            tags, vo = view.arrays()
            for j in range(m - 1, -1, -1):
                k = keys[j] if keys is not None else data[b + ko[j]:b + ko[j + 1]]  # type: ignore[index]
                if upper is not None and k >= upper:
                    continue
                if lower is not None and k < lower:
                    if have:
                        yield pend_key, rank, pend_val  # type: ignore[misc]
                    return
                if k != pend_key:
                    if have:
                        yield pend_key, rank, pend_val  # type: ignore[misc]
                    pend_key = k
                    have = False
                tag = tags[j]
                if snap is None or tag >> 8 <= snap:
                    # Walking backwards, later hits for the same key are newer versions.
                    have = True
                    if tag & 0xFF == KIND_PUT and (covering is None or covering(k) <= tag >> 8):
                        pend_val = data[b + vo[j]:b + vo[j + 1]]
                    else:
                        pend_val = None
            bi -= 1
    if have:
        yield pend_key, rank, pend_val  # type: ignore[misc]
