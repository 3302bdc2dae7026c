"""Writing an external table for ``DB.ingest`` (engine/ingest.py).

``SstFileWriter`` builds an ordinary sorted table (engine/table_builder.py) from
puts and deletes in strictly increasing key order and range tombstones in any
order. Every entry and tombstone carries sequence number 0, and the properties
block holds ``"external": true``: the table gets its real sequence number, one for
the whole file, only when a database ingests it. Invariant: a finished file is a
table that ``DB.ingest`` accepts, and an unfinished or failed one is removed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import InvalidArgument
from .options import Options
from .table_builder import TableBuilder
from .write_batch import as_bytes

# The property that marks a table as written for ingestion.
EXTERNAL_PROPERTY = "external"


@dataclass(frozen=True)
class ExternalSstInfo:
    """What ``SstFileWriter.finish`` wrote."""

    path: str
    size: int
    smallest: bytes
    largest: bytes
    num_entries: int
    num_range_deletions: int


class SstFileWriter:
    """Builds one external table at ``path``; use ``with`` or call ``finish``.

    Block size, compression and bloom filter follow ``options`` (those of the
    database it is meant for; defaults otherwise).
    """

    def __init__(self, path: str | os.PathLike, options: Options | None = None) -> None:
        options = options if options is not None else Options()
        options.validate()
        self.path = os.fspath(path)
        self._builder: TableBuilder | None = TableBuilder(
            self.path, options.block_size, options.compression, options.bloom_bits_per_key)
        self._last: bytes | None = None
        self._range_deletions = 0

    def put(self, key: bytes, value: bytes) -> None:
        """Add ``key = value``; ``key`` must be above every key added before."""
        builder = self._open()
        key = as_bytes(key, "key")
        value = as_bytes(value, "value")
        self._ordered(key)
        builder.add(key, 0, value)

    def delete(self, key: bytes) -> None:
        """Add a deletion of ``key``; ``key`` must be above every key added before."""
        builder = self._open()
        key = as_bytes(key, "key")
        self._ordered(key)
        builder.add(key, 0, None)

    def delete_range(self, begin: bytes, end: bytes) -> None:
        """Delete ``[begin, end)`` in the database the file goes into; any order
        relative to the other calls. ``begin == end`` adds nothing."""
        builder = self._open()
        begin = as_bytes(begin, "begin")
        end = as_bytes(end, "end")
        if begin > end:
            raise InvalidArgument(f"{self.path}: delete_range begin {begin!r} > end {end!r}")
        if begin < end:
            builder.add_range_tombstone(begin, end, 0)
            self._range_deletions += 1

    def finish(self) -> ExternalSstInfo:
        """Write the rest of the table and fsync it; InvalidArgument if nothing was added."""
        builder = self._open()
        if self._last is None and not self._range_deletions:
            self.abandon()
            raise InvalidArgument(f"{self.path}: cannot finish an external table with no entries")
        self._builder = None
        try:
            stats = builder.finish({EXTERNAL_PROPERTY: True})
        except BaseException:
            builder.abandon()
            raise
        return ExternalSstInfo(self.path, stats["size"], stats["smallest"], stats["largest"],
                               stats["num_entries"], self._range_deletions)

    def abandon(self) -> None:
        """Give up: the file is removed."""
        if self._builder is not None:
            self._builder.abandon()
            self._builder = None

    def _open(self) -> TableBuilder:
        if self._builder is None:
            raise InvalidArgument(f"{self.path}: the external table is already finished")
        return self._builder

    def _ordered(self, key: bytes) -> None:
        last = self._last
        if last is not None and key <= last:
            what = "added twice" if key == last else f"after {last!r}"
            raise InvalidArgument(f"{self.path}: keys must be added in strictly increasing "
                                  f"order; {key!r} {what}")
        self._last = key

    def __enter__(self) -> SstFileWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abandon()
        elif self._builder is not None:
            self.finish()
