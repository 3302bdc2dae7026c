"""Record framing shared by the write-ahead log (n.log) and the MANIFEST.

A log is a sequence of records, each ``length u32 | payload_crc u32 | check u32 |
payload`` (little-endian; payload_crc is zlib's crc32 of the payload; ``check =
(length * 0x9E3779B1 mod 2^32) xor payload_crc xor 0xA5A5A5A5`` guards the header).
Invariant: a record is either read back whole with both checksums good, or reading
stops: at a torn tail (the last write of a crashed process) silently, anywhere else
with ``Corruption`` naming the file and the record's offset.

WAL payloads are write batches (see ``encode_batch``): ``seq u64 | count u32`` then
``count`` operations, each ``kind u8 | key_len u32 | [value_len u32] | key | [value]``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from zlib import crc32

from .errors import Corruption

HEADER = struct.Struct("<III")
HEADER_SIZE = 12
GOLDEN = 0x9E3779B1
CHECK_XOR = 0xA5A5A5A5

KIND_DELETE = 0
KIND_PUT = 1

BATCH_HEADER = struct.Struct("<QI")
PUT_OP = struct.Struct("<BII")
DELETE_OP = struct.Struct("<BI")
# A one-put batch's fixed part: batch header then the put's op header.
SINGLE_PUT = struct.Struct("<QIBII")


def header_check(length: int, crc: int) -> int:
    return ((length * GOLDEN) & 0xFFFFFFFF) ^ crc ^ CHECK_XOR


def frame(payload: bytes) -> bytes:
    """Return the on-disk bytes of one record carrying ``payload``."""
    n = len(payload)
    c = crc32(payload)
    return HEADER.pack(n, c, ((n * GOLDEN) & 0xFFFFFFFF) ^ c ^ CHECK_XOR) + payload


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
        # Bound method kept for the hot write path.
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
        length, pcrc, check = HEADER.unpack_from(data, pos)
        if header_check(length, pcrc) != check:
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


def encode_batch(seq: int, ops: list[tuple[bytes, bytes | None]]) -> bytes:
    """Encode a write batch starting at sequence ``seq``; a value of None deletes."""
    parts = [BATCH_HEADER.pack(seq, len(ops))]
    append = parts.append
    for key, value in ops:
        if value is None:
            append(DELETE_OP.pack(KIND_DELETE, len(key)))
            append(key)
        else:
            append(PUT_OP.pack(KIND_PUT, len(key), len(value)))
            append(key)
            append(value)
    return b"".join(parts)


def decode_batch(path: str, offset: int, payload: bytes) -> tuple[int, list[tuple[bytes, bytes | None]]]:
    """Decode a batch payload into ``(first_seq, ops)``; malformed bytes are Corruption."""
    try:
        seq, count = BATCH_HEADER.unpack_from(payload, 0)
        pos = BATCH_HEADER.size
        ops: list[tuple[bytes, bytes | None]] = []
        for _ in range(count):
            kind = payload[pos]
            if kind == KIND_PUT:
                _, klen, vlen = PUT_OP.unpack_from(payload, pos)
                pos += PUT_OP.size
                key = payload[pos:pos + klen]
                pos += klen
                value = payload[pos:pos + vlen]
                pos += vlen
                if len(value) != vlen:
                    raise ValueError("short value")
                ops.append((key, value))
            elif kind == KIND_DELETE:
                _, klen = DELETE_OP.unpack_from(payload, pos)
                pos += DELETE_OP.size
                key = payload[pos:pos + klen]
                pos += klen
                ops.append((key, None))
            else:
                raise ValueError(f"unknown operation kind {kind}")
            if len(key) != klen:
                raise ValueError("short key")
        if pos != len(payload):
            raise ValueError("trailing bytes")
    except (struct.error, ValueError, IndexError) as exc:
        raise Corruption(path, offset, f"malformed write batch ({exc})") from None
    return seq, ops
