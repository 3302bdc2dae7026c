"""The layout of a sorted table (``n.sst``) around its blocks (docs/engine-format.md,
"Sorted table")::

    data block 0 | trailer ... data block n-1 | trailer
    index block | trailer            last key of each data block -> handle
    filter block | trailer           bloom filter over all user keys (engine/bloom.py)
    range-tombstone block | trailer  start key -> end key, tag carries the sequence
    properties block | trailer       JSON object
    footer (64 bytes)                four handles, format version, crc32, magic

A *handle* is ``offset u64 | size u32``: where a block's stored bytes start and how
many there are. Every block is followed by a trailer ``compression u8 | crc32 u32``
whose crc covers the stored bytes and the compression byte. Block contents are
engine/block.py's; this module owns everything around them. Invariant:
``read_block`` returns bytes only from a block whose checksum verified, and every
failure is ``Corruption`` naming the file and the offset of the block or footer.
"""

from __future__ import annotations

import json
import mmap
import struct
import zlib
from zlib import crc32

import lz4.block

from .errors import Corruption

MAGIC = 0x7464656673737431  # "tdefsst1"
FORMAT_VERSION = 1
HANDLE = struct.Struct("<QI")
# index, filter, range-tombstone and properties handles | version | crc32 | magic
FOOTER = struct.Struct("<QIQIQIQIIIQ")
FOOTER_SIZE = FOOTER.size  # 64
_FOOTER_CRC_AT = 52  # the crc covers the bytes before it
TRAILER = struct.Struct("<BI")
TRAILER_SIZE = TRAILER.size  # 5
_KIND_BYTES = [bytes((i,)) for i in range(256)]

COMPRESSION_NONE = 0
COMPRESSION_ZLIB = 1
# LZ4's block format, the uncompressed size first as a u32 (lz4.block's store_size).
COMPRESSION_LZ4 = 2
COMPRESSIONS = {"none": COMPRESSION_NONE, "zlib": COMPRESSION_ZLIB, "lz4": COMPRESSION_LZ4}


def compress(contents: bytes, kind: int) -> bytes:
    """``contents`` compressed as ``kind`` (not COMPRESSION_NONE)."""
    if kind == COMPRESSION_LZ4:
        return lz4.block.compress(contents, store_size=True)
    return zlib.compress(contents, 1)


def block_crc(stored: bytes | memoryview, compression: int) -> int:
    """The trailer's crc of a block's stored bytes and its compression byte."""
    return crc32(_KIND_BYTES[compression], crc32(stored))


def trailer(stored: bytes, compression: int) -> bytes:
    return TRAILER.pack(compression, block_crc(stored, compression))


def read_block(mm: mmap.mmap, file_size: int, off: int, size: int,
               path: str) -> tuple[bytes | mmap.mmap, int]:
    """Verify the block whose handle is ``(off, size)``; return where its contents
    are: ``(mm, off)`` for a block stored uncompressed (nothing is copied),
    ``(bytes, 0)`` once decompressed."""
    end = off + size
    if end + TRAILER_SIZE > file_size:
        raise Corruption(path, off, "block runs past the end of the file")
    kind, crc = TRAILER.unpack_from(mm, end)
    stored = memoryview(mm)[off:end]
    try:
        if block_crc(stored, kind) != crc:
            raise Corruption(path, off, "block checksum mismatch")
        if kind == COMPRESSION_NONE:
            return mm, off
        if kind == COMPRESSION_LZ4:
            try:
                return lz4.block.decompress(stored), 0
            except (lz4.block.LZ4BlockError, ValueError):
                raise Corruption(path, off, "block does not decompress") from None
        if kind == COMPRESSION_ZLIB:
            try:
                return zlib.decompress(stored), 0
            except zlib.error:
                raise Corruption(path, off, "block does not decompress") from None
    finally:
        stored.release()
    raise Corruption(path, off, f"unknown block compression {kind}")


def encode_footer(handles: list[tuple[int, int]]) -> bytes:
    """The footer of a table whose index, filter, range-tombstone and properties
    blocks have these handles."""
    head = FOOTER.pack(*(x for handle in handles for x in handle), FORMAT_VERSION, 0, MAGIC)
    return head[:_FOOTER_CRC_AT] + struct.pack("<I", crc32(head[:_FOOTER_CRC_AT])) + \
        head[_FOOTER_CRC_AT + 4:]


def decode_footer(footer: bytes, path: str, offset: int) -> list[tuple[int, int]]:
    """The four block handles of the footer found at ``offset`` (the file's last
    ``FOOTER_SIZE`` bytes), after checking its magic, crc, version and that every
    handle lies before it."""
    fields = FOOTER.unpack(footer)
    if fields[-1] != MAGIC:
        raise Corruption(path, offset, "bad table magic number in footer")
    if crc32(footer[:_FOOTER_CRC_AT]) != fields[9]:
        raise Corruption(path, offset, "bad footer checksum")
    if fields[8] != FORMAT_VERSION:
        raise Corruption(path, offset, f"unsupported table format version {fields[8]}")
    handles = [(fields[i], fields[i + 1]) for i in (0, 2, 4, 6)]
    for off, sz in handles:
        if off + sz + TRAILER_SIZE > offset:
            raise Corruption(path, offset, "block handle in footer points past the end")
    return handles


def encode_properties(props: dict) -> bytes:
    return json.dumps(props, sort_keys=True).encode()


def decode_properties(data: bytes, path: str, offset: int) -> dict:
    try:
        return json.loads(data)
    except ValueError:
        raise Corruption(path, offset, "properties block is not JSON") from None
