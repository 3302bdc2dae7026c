"""Write batches: what ``DB.write`` applies atomically, and their encoding, which is
the payload of one WAL record (docs/engine-format.md, "WAL payload: a write batch")::

    seq u64 | count u32 | count operations
    put:     kind u8 = KIND_PUT    | key_len u32 | value_len u32 | key | value
    delete:  kind u8 = KIND_DELETE | key_len u32 | key

Operation i takes sequence number ``seq + i``. Invariant: ``decode_batch`` accepts
exactly what ``encode_batch`` and ``put_record`` produce and reports anything else as
``Corruption``; a batch is one record, so recovery applies it whole or not at all.
"""

from __future__ import annotations

import struct
from zlib import crc32

from .errors import Corruption, InvalidArgument
from .tags import KIND_DELETE, KIND_PUT
from .wal import record_header

BATCH_HEADER = struct.Struct("<QI")
PUT_OP = struct.Struct("<BII")
DELETE_OP = struct.Struct("<BI")
# A one-put batch's fixed part: the batch header, then the put's operation header.
_SINGLE_PUT = struct.Struct("<" + BATCH_HEADER.format.lstrip("<") + PUT_OP.format.lstrip("<"))


def as_bytes(value: object, what: str) -> bytes:
    """``value`` as bytes (bytearray and memoryview are copied); InvalidArgument otherwise."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise InvalidArgument(f"{what} must be bytes, not {type(value).__name__}")


class WriteBatch:
    """Puts and deletes applied atomically by ``DB.write``."""

    __slots__ = ("_ops",)

    def __init__(self) -> None:
        # (key, value) in order; value None deletes.
        self._ops: list[tuple[bytes, bytes | None]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self._ops.append((as_bytes(key, "key"), as_bytes(value, "value")))

    def delete(self, key: bytes) -> None:
        self._ops.append((as_bytes(key, "key"), None))

    def clear(self) -> None:
        self._ops.clear()

    def __len__(self) -> int:
        return len(self._ops)


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


def put_record(seq: int, key: bytes, value: bytes) -> bytes:
    """The framed WAL record of a batch holding one put: ``frame(encode_batch(seq,
    [(key, value)]))``, built in one step for ``DB.put``."""
    payload = _SINGLE_PUT.pack(seq, 1, KIND_PUT, len(key), len(value)) + key + value
    return record_header(len(payload), crc32(payload)) + payload


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
