"""Log files: the record framing shared by the write-ahead log (n.log) and the MANIFEST.

A log is a sequence of records, each ``length u32 | payload_crc u32 | check u32 |
payload`` (little-endian; payload_crc is zlib's crc32 of the payload; ``check =
(length * 0x9E3779B1 mod 2^32) xor payload_crc xor 0xA5A5A5A5`` guards the header).
``record_header`` is the only place that rule is written. A WAL record's payload is a
write batch (engine/write_batch.py), a MANIFEST record's a version edit
(engine/version.py).

Invariant: a record is either read back whole with both checksums good, or reading
stops: at a torn tail (the last write of a crashed process) silently, anywhere else
with ``Corruption`` naming the file and the record's offset.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from zlib import crc32

from .errors import Corruption

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
GOLDEN = 0x9E3779B1
CHECK_XOR = 0xA5A5A5A5
# Space a WAL reserves ahead of its writes, so synced writes rarely change its size.
WAL_PREALLOCATE = 1 << 20


def record_header(length: int, crc: int) -> bytes:
    """The 12 header bytes of a record whose payload has ``length`` bytes and crc32 ``crc``."""
    return HEADER.pack(length, crc, ((length * GOLDEN) & 0xFFFFFFFF) ^ crc ^ CHECK_XOR)


def frame(payload: bytes) -> bytes:
    """Return the on-disk bytes of one record carrying ``payload``."""
    return record_header(len(payload), crc32(payload)) + payload


class LogWriter:
    """Writes records to a new log file; buffered until ``flush`` or ``sync``.

    The file is created empty (truncating any leftover of a crashed run): a log is
    never continued, so no record can follow another process's torn tail. With
    ``preallocate``, space is reserved ahead of the writes (zero-filled, in chunks
    of that many bytes) so that a sync need not also commit a new file size; a
    reader stops at the zeros as at a torn tail, and ``close`` trims them.
    """

    def __init__(self, path: str, buffer_size: int = 1 << 16, preallocate: int = 0) -> None:
        self.path = path
        self._file = open(path, "wb", buffering=buffer_size)  # noqa: SIM115
        # Appends framed records (``frame``); bound once for the hot write path.
        self.write = self._file.write
        self._chunk = preallocate
        self._reserved = 0
        if preallocate:
            self._reserve(0)

    def _reserve(self, pos: int) -> None:
        try:
            os.posix_fallocate(self._file.fileno(), pos, self._chunk)
        except OSError:
            self._chunk = 0  # not supported here: grow as written
            return
        self._reserved = pos + self._chunk

    def add(self, payload: bytes) -> None:
        self.write(frame(payload))

    def flush(self) -> None:
        self._file.flush()

    def sync(self) -> None:
        self._file.flush()
        if self._chunk:
            pos = self._file.tell()
            if pos + (self._chunk >> 2) > self._reserved:
                self._reserve(max(pos, self._reserved))
        os.fdatasync(self._file.fileno())

    def close(self, sync: bool = False) -> None:
        if self._file.closed:
            return
        if self._reserved:
            self._chunk = 0
            self._file.flush()
            self._file.truncate(self._file.tell())
        if sync:
            self.sync()
        self._file.close()


def _all_zero(data: bytes | memoryview, start: int) -> bool:
    tail = data[start:]
    return not any(tail) if len(tail) < 4096 else bytes(tail).count(0) == len(tail)


def read_records(path: str, data: bytes | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, payload)`` for every whole record of the log at ``path``.

    A torn tail ends the iteration quietly: a partial header, a record that runs
    past the end of the file, or a last record whose unwritten part reads as zeros
    (a preallocated log, or a filesystem that zero-fills): a bad header followed
    by nothing but zeros, or a bad payload ending in a zero byte with nothing but
    zeros after it. Any other checksum failure raises ``Corruption`` with the
    record's offset.
    """
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    size = len(data)
    pos = 0
    while pos < size:
        if size - pos < HEADER_SIZE:
            return
        header = data[pos:pos + HEADER_SIZE]
        length, pcrc, _ = HEADER.unpack(header)
        if record_header(length, pcrc) != header:
            if _all_zero(data, pos + HEADER_SIZE):
                return
            raise Corruption(path, pos, "bad record header checksum")
        start = pos + HEADER_SIZE
        end = start + length
        if end > size:
            return
        payload = data[start:end]
        if crc32(payload) != pcrc:
            if length and payload[-1] == 0 and _all_zero(data, end):
                return
            raise Corruption(path, pos, "bad record payload checksum")
        yield pos, payload
        pos = end
