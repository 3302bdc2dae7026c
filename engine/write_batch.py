"""Write batches: what ``DB.write`` applies atomically, and their encoding, which is
the payload of one WAL record (docs/engine-format.md, "WAL payload: a write batch")::

    seq u64 | count u32 | count operations
    put:           kind u8 = KIND_PUT           | key_len u32 | value_len u32 | key | value
    delete:        kind u8 = KIND_DELETE        | key_len u32 | key
    range delete:  kind u8 = KIND_RANGE_DELETE  | begin_len u32 | end_len u32 | begin | end
    single delete: kind u8 = KIND_SINGLE_DELETE | key_len u32 | key

Operation i takes sequence number ``seq + i``. In memory an operation is ``(key,
value)``: value bytes puts, None deletes, ``SINGLE_DELETE`` single-deletes and a
``RangeEnd`` deletes ``[key, end)``. Invariant: ``decode_batch`` accepts exactly what
``encode_batch`` and ``put_record`` produce and reports anything else as
``Corruption``; a batch is one record, so recovery applies it whole or not at all.
"""

from __future__ import annotations

import struct
from zlib import crc32

from .errors import Corruption, InvalidArgument
from .memtable import ENTRY_OVERHEAD, MemTable
from .tags import KIND_DELETE, KIND_PUT, KIND_RANGE_DELETE, KIND_SINGLE_DELETE
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


class RangeEnd:
    """The value of a range deletion ``(begin, RangeEnd(end))`` among a batch's
    operations: it deletes ``[begin, end)``."""

    __slots__ = ("end",)

    def __init__(self, end: bytes) -> None:
        self.end = end

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeEnd) and other.end == self.end

    def __hash__(self) -> int:
        return hash(self.end)

    def __repr__(self) -> str:
        return f"RangeEnd({self.end!r})"


class _SingleDelete:
    def __repr__(self) -> str:
        return "SINGLE_DELETE"


# The value of a single deletion among a batch's operations.
SINGLE_DELETE = _SingleDelete()

# An operation: value bytes puts, None deletes, SINGLE_DELETE or a RangeEnd.
Op = tuple[bytes, "bytes | None | RangeEnd | _SingleDelete"]


class WriteBatch:
    """Puts, deletes, range deletes and single deletes applied atomically by
    ``DB.write``."""

    __slots__ = ("_ops", "_plain")

    def __init__(self) -> None:
        # (key, value) in order (see the module docstring).
        self._ops: list[Op] = []
        # Only puts and deletes so far: the write path's fast form applies.
        self._plain = True

    def put(self, key: bytes, value: bytes) -> None:
        self._ops.append((as_bytes(key, "key"), as_bytes(value, "value")))

    def delete(self, key: bytes) -> None:
        self._ops.append((as_bytes(key, "key"), None))

    def delete_range(self, begin: bytes, end: bytes) -> None:
        """Delete every key in ``[begin, end)``: one tombstone, whatever the range holds.
        An empty range (``begin == end``) adds nothing; ``begin > end`` is InvalidArgument."""
        begin = as_bytes(begin, "begin")
        end = as_bytes(end, "end")
        if begin > end:
            raise InvalidArgument(f"delete_range: begin {begin!r} is after end {end!r}")
        if begin < end:
            self._ops.append((begin, RangeEnd(end)))
            self._plain = False

    def single_delete(self, key: bytes) -> None:
        """Delete ``key``, which must have been put exactly once since it was last
        deleted (engine/compaction.py has the contract)."""
        self._ops.append((as_bytes(key, "key"), SINGLE_DELETE))
        self._plain = False

    def clear(self) -> None:
        self._ops.clear()
        self._plain = True

    def __len__(self) -> int:
        return len(self._ops)


def op_bytes(ops: list[Op]) -> int:
    """What ``ops`` add to a memtable's size (engine/memtable.py's accounting)."""
    total = 0
    for key, value in ops:
        total += len(key) + ENTRY_OVERHEAD
        if isinstance(value, bytes):
            total += len(value)
        elif type(value) is RangeEnd:
            total += len(value.end)
    return total


def insert_into(mem: MemTable, first_seq: int, ops: list[Op], snap_max: int) -> None:
    """Apply ``ops`` to ``mem``, operation i at sequence ``first_seq + i``; a replaced
    version is kept if a snapshot at ``snap_max`` sees it."""
    for i, (key, value) in enumerate(ops):
        if type(value) is RangeEnd:
            mem.add_range_tombstone(key, value.end, first_seq + i)
        elif value is SINGLE_DELETE:
            mem.add_single_delete(first_seq + i, key, snap_max)
        else:
            mem.add(first_seq + i, key, value, snap_max)  # type: ignore[arg-type]


def encode_batch(seq: int, ops: list[Op]) -> bytes:
    """Encode a write batch starting at sequence ``seq``."""
    parts = [BATCH_HEADER.pack(seq, len(ops))]
    append = parts.append
    for key, value in ops:
        if value is None:
            append(DELETE_OP.pack(KIND_DELETE, len(key)))
            append(key)
        elif isinstance(value, bytes):
            append(PUT_OP.pack(KIND_PUT, len(key), len(value)))
            append(key)
            append(value)
        elif value is SINGLE_DELETE:
            append(DELETE_OP.pack(KIND_SINGLE_DELETE, len(key)))
            append(key)
        else:
            end = value.end  # type: ignore[union-attr]
            append(PUT_OP.pack(KIND_RANGE_DELETE, len(key), len(end)))
            append(key)
            append(end)
    return b"".join(parts)


def put_record(seq: int, key: bytes, value: bytes) -> bytes:
    """The framed WAL record of a batch holding one put: ``frame(encode_batch(seq,
    [(key, value)]))``, built in one step for ``DB.put``."""
    payload = _SINGLE_PUT.pack(seq, 1, KIND_PUT, len(key), len(value)) + key + value
    return record_header(len(payload), crc32(payload)) + payload


def decode_batch(path: str, offset: int, payload: bytes) -> tuple[int, list[Op]]:
    """Decode a batch payload into ``(first_seq, ops)``; malformed bytes are Corruption."""
    try:
        seq, count = BATCH_HEADER.unpack_from(payload, 0)
        pos = BATCH_HEADER.size
        ops: list[Op] = []
        for _ in range(count):
            kind = payload[pos]
            if kind == KIND_PUT or kind == KIND_RANGE_DELETE:
                _, klen, vlen = PUT_OP.unpack_from(payload, pos)
                pos += PUT_OP.size
                key = payload[pos:pos + klen]
                pos += klen
                value = payload[pos:pos + vlen]
                pos += vlen
                if len(value) != vlen:
                    raise ValueError("short value")
                if kind == KIND_PUT:
                    ops.append((key, value))
                elif len(key) == klen and key < value:
                    ops.append((key, RangeEnd(value)))
                else:
                    raise ValueError("empty or inverted range")
            elif kind == KIND_DELETE or kind == KIND_SINGLE_DELETE:
                _, klen = DELETE_OP.unpack_from(payload, pos)
                pos += DELETE_OP.size
                key = payload[pos:pos + klen]
                pos += klen
                ops.append((key, None if kind == KIND_DELETE else SINGLE_DELETE))
            else:
                raise ValueError(f"unknown operation kind {kind}")
            if len(key) != klen:
                raise ValueError("short key")
        if pos != len(payload):
            raise ValueError("trailing bytes")
    except (struct.error, ValueError, IndexError) as exc:
        raise Corruption(path, offset, f"malformed write batch ({exc})") from None
    return seq, ops
