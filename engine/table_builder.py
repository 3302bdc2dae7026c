"""Building one sorted table from entries added in order (the layout is
engine/table_format.py's, the blocks' engine/block.py's).

Entries collect in lists and are cut into data blocks in bulk, so adding costs a few
list appends per entry. A data block ends after the entry that brings its key and
value bytes to ``block_size`` or more. Invariant: the table's smallest and largest
keys (in its properties and in the stats ``finish`` returns for the MANIFEST) cover
every entry and every range tombstone, whatever order the tombstones came in; a
tombstone's exclusive end counts as ``largest_covered(end)``
(engine/range_tombstones.py).
"""

from __future__ import annotations

import os
from array import array
from bisect import bisect_left
from itertools import accumulate
from operator import add

from .block import encode_block
from .bloom import build_filter, key_hash
from .range_tombstones import widen_to_cover
from .table_format import (
    COMPRESSION_NONE,
    COMPRESSIONS,
    FOOTER_SIZE,
    FORMAT_VERSION,
    HANDLE,
    TRAILER_SIZE,
    compress,
    encode_footer,
    encode_properties,
    trailer,
)
from .tags import KIND_DELETE, KIND_PUT, KIND_RANGE_DELETE


class TableBuilder:
    """Writes one table at ``path``; ``finish`` returns its stats, ``abandon`` drops it."""

    # Pending bytes that trigger cutting complete blocks out of the lists.
    CUT_BYTES = 256 << 10

    def __init__(self, path: str, block_size: int = 4096, compression: str = "lz4",
                 bloom_bits_per_key: int = 10) -> None:
        self.path = path
        self._file = open(path, "wb", buffering=1 << 20)  # noqa: SIM115
        self._offset = 0
        self._block_size = block_size
        self._compression = COMPRESSIONS[compression]
        self._bloom_bits = bloom_bits_per_key
        self._keys: list[bytes] = []
        self._tags: list[int] = []
        self._values: list[bytes] = []
        self._pending = 0
        self._index_keys: list[bytes] = []
        self._index_values: list[bytes] = []
        # 4 bytes a key (key_hash is a crc32), not a Python int each.
        self._hashes = array("I")
        self._range_dels: list[tuple[bytes, int, bytes]] = []
        self.num_entries = 0
        self.num_deletions = 0
        self.smallest_seq = 1 << 62
        self.largest_seq = 0
        self.first_key: bytes | None = None

    @property
    def file_size(self) -> int:
        return self._offset + self._pending

    def add(self, key: bytes, seq: int, value: bytes | None) -> None:
        """Add a version; ``value`` None is a deletion. Keys ascending, seqs descending."""
        self._keys.append(key)
        if value is None:
            self._tags.append(seq << 8 | KIND_DELETE)
            self._values.append(b"")
            self._pending += len(key) + 16
        else:
            self._tags.append(seq << 8 | KIND_PUT)
            self._values.append(value)
            self._pending += len(key) + len(value) + 16
        if self._pending >= self.CUT_BYTES:
            self._cut(False)

    def add_many(self, keys: list[bytes], tags: list[int], values: list[bytes]) -> None:
        """Add sorted entries in bulk; a tag is ``seq << 8 | kind``, deletions (and
        single deletions) carry b''."""
        self._keys += keys
        self._tags += tags
        self._values += values
        self._pending += sum(map(len, keys)) + sum(map(len, values)) + 16 * len(keys)
        if self._pending >= self.CUT_BYTES:
            self._cut(False)

    def _cut(self, final: bool) -> None:
        """Write complete blocks from the pending lists (all of them when ``final``)."""
        keys, tags, values = self._keys, self._tags, self._values
        n = len(keys)
        if not n:
            return
        cum = list(accumulate(map(add, map(len, keys), map(len, values))))
        bs = self._block_size
        s = 0
        while s < n:
            base = cum[s - 1] if s else 0
            e = bisect_left(cum, base + bs, s) + 1
            if e > n:
                if not final:
                    break
                e = n
            self._write_data_block(keys[s:e], tags[s:e], values[s:e])
            s = e
        done_tags = tags[:s]
        if done_tags:
            if self.first_key is None:
                self.first_key = keys[0]
            self._hashes.extend(map(key_hash, keys[:s]))
            self.num_entries += s
            self.num_deletions += s - list(map((0xFF).__and__, done_tags)).count(KIND_PUT)
            self.smallest_seq = min(self.smallest_seq, min(done_tags) >> 8)
            self.largest_seq = max(self.largest_seq, max(done_tags) >> 8)
        self._keys = keys[s:]
        self._tags = tags[s:]
        self._values = values[s:]
        self._pending = sum(map(len, self._keys)) + sum(map(len, self._values)) + 16 * len(self._keys)

    def add_range_tombstone(self, start: bytes, end: bytes, seq: int) -> None:
        """Record that keys in ``[start, end)`` at sequences below ``seq`` are deleted."""
        self._range_dels.append((start, seq, end))
        if seq < self.smallest_seq:
            self.smallest_seq = seq
        if seq > self.largest_seq:
            self.largest_seq = seq

    def _write_block(self, contents: bytes, compressible: bool) -> tuple[int, int]:
        """Append a block and its trailer; return its handle."""
        kind = COMPRESSION_NONE
        if compressible and self._compression != COMPRESSION_NONE:
            packed = compress(contents, self._compression)
            # Only worth a decompression on every read when it saves an eighth.
            if len(packed) < len(contents) - len(contents) // 8:
                contents = packed
                kind = self._compression
        self._file.write(contents + trailer(contents, kind))
        handle = (self._offset, len(contents))
        self._offset += len(contents) + TRAILER_SIZE
        return handle

    def _write_data_block(self, keys: list[bytes], tags: list[int], values: list[bytes]) -> None:
        off, size = self._write_block(encode_block(keys, tags, values), True)
        self._index_keys.append(keys[-1])
        self._index_values.append(HANDLE.pack(off, size))

    def finish(self, extra_properties: dict | None = None) -> dict:
        """Write index, filter, tombstones, properties and footer; fsync; return stats.
        ``extra_properties`` are added to the properties block (an external table's
        ``external`` marker, engine/sst_file_writer.py)."""
        self._cut(True)
        index = self._write_block(
            encode_block(self._index_keys, [0] * len(self._index_keys), self._index_values), False)
        filt = self._write_block(build_filter(self._hashes, self._bloom_bits), False)
        rdels = sorted(self._range_dels)
        rdel = self._write_block(encode_block(
            [r[0] for r in rdels], [r[1] << 8 | KIND_RANGE_DELETE for r in rdels],
            [r[2] for r in rdels]), False)
        smallest = self.first_key
        largest = self._index_keys[-1] if self._index_keys else None
        # The key range covers every range tombstone, whatever order they came in.
        smallest, largest = widen_to_cover(smallest, largest, ((r[0], r[2]) for r in rdels))
        if smallest is None or largest is None:
            smallest = largest = b""
        props = {
            "format_version": FORMAT_VERSION,
            "num_entries": self.num_entries,
            "num_deletions": self.num_deletions,
            "num_range_deletions": len(rdels),
            "num_data_blocks": len(self._index_keys),
            "smallest_key": smallest.hex(),
            "largest_key": largest.hex(),
            "smallest_seq": self.smallest_seq if self.num_entries or rdels else 0,
            "largest_seq": self.largest_seq,
            "compression": self._compression,
        }
        if extra_properties:
            props.update(extra_properties)
        propb = self._write_block(encode_properties(props), False)
        self._file.write(encode_footer([index, filt, rdel, propb]))
        self._offset += FOOTER_SIZE
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {
            "size": self._offset,
            "smallest": smallest,
            "largest": largest,
            "smallest_seq": props["smallest_seq"],
            "largest_seq": self.largest_seq,
            "num_entries": self.num_entries,
        }

    def abandon(self) -> None:
        self._file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
