"""Reading and writing encrypted file contents at byte offsets, keeping files sparse.

All offset and block arithmetic lives here; callers pass a backing fd and the file's
cipher. The rule (docs/vault-format.md, "File contents"): the backing file is cut
into blocks of BLOCK bytes. A whole block whose bytes are all zero (a hole, or zeros
written by a copy that filled holes) reads as plaintext zeros; every other block,
and the partial block at the end of the file, holds ciphertext in full: each byte is
the keystream at its own offset XOR the plaintext. A whole block of real ciphertext
is all zero only if 4096 keystream bytes equal the plaintext, which has probability
2**-32768; a short last block could be zero by chance, which is why it is never read
as a hole.

So growing a file (a write past the end, a truncate up, fallocate) writes encrypted
zeros only into the partial blocks at its edges and leaves the whole blocks between
them holes: a 1-byte write at 1 TiB writes one block. A write that starts or ends
inside a whole zero block writes that block whole (encrypted zeros around the data),
so no block is ever half hole, half ciphertext.

The fd must not be opened with O_APPEND: Linux ignores pwrite's offset on such fds.
Appending is ``write_at(fd, cipher, data, size)``. A write or size change reads the
size and the blocks at its edges first, so callers serialise the changes to one file
(reads need no lock). An operation that fails (ENOSPC, EFBIG) and would have grown
the file leaves it at its old size.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from encfs.cipher import FileCipher
from encfs.disk import disk
from encfs.fsops import fallocate as _backing_fallocate

BLOCK = 4096
ZERO_BLOCK = bytes(BLOCK)
# a run this long is inside every zero block; searching for it finds candidates fast
_SCREEN = bytes(1024)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_MODES = (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)


def _down(offset: int) -> int:
    return offset - offset % BLOCK


def _up(offset: int) -> int:
    return -(-offset // BLOCK) * BLOCK


def zero_blocks(data: bytes | memoryview) -> list[int]:
    """Offsets (within ``data``, which starts on a block boundary) of its whole
    blocks that are all zero."""
    found: list[int] = []
    if len(data) <= 4 * BLOCK:
        for start in range(0, len(data) - BLOCK + 1, BLOCK):
            if data[start:start + BLOCK] == ZERO_BLOCK:
                found.append(start)
        return found
    raw = data if isinstance(data, bytes) else bytes(data)
    pos = raw.find(_SCREEN)
    while pos >= 0:
        # a zero block starting at or before pos would have been found already
        start = _down(pos)
        if start + BLOCK <= len(raw) and raw[start:start + BLOCK] == ZERO_BLOCK:
            found.append(start)
            pos = raw.find(_SCREEN, start + BLOCK)
        else:
            pos = raw.find(_SCREEN, start + BLOCK)
    return found


class _CachedReads:
    """preadv2(RWF_NOWAIT): a read served only from the page cache, never waiting for
    the disk. Where the backing filesystem refuses the flag, reads just wait."""

    flag = getattr(os, "RWF_NOWAIT", 0)

    @classmethod
    def pread(cls, fd: int, length: int, offset: int) -> bytes | bytearray:
        if cls.flag:
            buf = bytearray(length)
            try:
                n = os.preadv(fd, [buf], offset, cls.flag)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise  # BlockingIOError: not in the page cache
                cls.flag = 0
            else:
                if n < length:
                    # part of it is not cached, or the file ends there: a read that
                    # may wait will tell
                    raise BlockingIOError(errno.EAGAIN, "not all in the page cache")
                return buf
        return os.pread(fd, length, offset)


def prefetch(fd: int, size: int, offset: int) -> None:
    """Have the kernel start reading the blocks ``read_at(fd, _, size, offset)`` needs
    into the page cache, without waiting for them (best effort)."""
    start = _down(offset)
    try:
        os.posix_fadvise(fd, start, _up(offset + size) - start, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass


def read_at(fd: int, cipher: FileCipher, size: int, offset: int,
            cached_only: bool = False) -> bytes:
    """Read up to ``size`` plaintext bytes at ``offset`` (fewer at end of file).
    ``cached_only``: raise BlockingIOError rather than wait for the disk (a short
    read at the end of the file raises it too)."""
    pread = _CachedReads.pread if cached_only else os.pread
    if cipher.is_plaintext:
        return bytes(pread(fd, size, offset))
    start = _down(offset)
    data = pread(fd, _up(offset + size) - start, start)
    skip = offset - start
    if len(data) <= skip:
        return b""
    plain = cipher.apply(data, start)
    holes = zero_blocks(data)
    if holes:
        out = bytearray(plain)
        for at in holes:
            out[at:at + BLOCK] = ZERO_BLOCK
        plain = bytes(out)
    if skip or len(plain) > skip + size:
        return plain[skip:skip + size]
    return plain


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = disk.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _write_zeros(fd: int, cipher: FileCipher, start: int, end: int) -> None:
    """Encrypted zeros over [start, end), which lies within one block."""
    if end > start:
        _pwrite_all(fd, cipher.apply(bytes(end - start), start), start)


def _is_hole(fd: int, block: int, size: int) -> bool:
    """Is the block at ``block`` a whole block of the file that reads as zeros?"""
    return block + BLOCK <= size and os.pread(fd, BLOCK, block) == ZERO_BLOCK


@contextmanager
def _restoring_size(fd: int, size: int) -> Iterator[None]:
    """If what the block does fails, cut the file back to ``size``: a growing
    operation that fails (ENOSPC, EFBIG) leaves the file as it was."""
    try:
        yield
    except BaseException:
        if os.fstat(fd).st_size > size:
            disk.ftruncate(fd, size)
        raise


def write_at(fd: int, cipher: FileCipher, data: bytes | memoryview, offset: int) -> int:
    """Write ``data`` at ``offset``; returns the number of bytes written (all of them).
    A write past the end leaves the whole blocks of the gap as holes."""
    if not data:
        return 0
    if cipher.is_plaintext:
        _pwrite_all(fd, data, offset)
        return len(data)
    size = os.fstat(fd).st_size
    end = offset + len(data)
    with _restoring_size(fd, size):
        first, last = offset, end  # what this write covers, edges padded with zeros
        if size % BLOCK and offset > size:
            # the old partial last block becomes a whole block: ciphertext in full
            tail_end = _up(size)
            if offset <= tail_end:
                first = size
            else:
                _write_zeros(fd, cipher, size, tail_end)
        head = _down(offset)
        if first == offset and offset > head:
            if head >= size or _is_hole(fd, head, size):
                first = head  # a new block, or a hole: the write fills it whole
        tail = _down(end)
        if end > tail and end < size and _is_hole(fd, tail, size):
            last = tail + BLOCK
        if first < offset or last > end:
            buf = bytearray(last - first)
            buf[offset - first:end - first] = data
            data = buf
        _pwrite_all(fd, cipher.apply(data, first), first)
    return end - offset


def _grow(fd: int, cipher: FileCipher, size: int, length: int) -> None:
    """Make a file of ``size`` bytes ``length`` bytes long (length > size): encrypted
    zeros in the old last block and the new one, holes between."""
    with _restoring_size(fd, size):
        near = min(_up(size), length)
        _write_zeros(fd, cipher, size, near)
        if length > near:
            if length % BLOCK:
                _write_zeros(fd, cipher, _down(length), length)
            else:
                disk.ftruncate(fd, length)


def truncate(fd: int, cipher: FileCipher, length: int) -> None:
    """Set the file's size to ``length``; growing leaves holes (which read as zeros)."""
    if length < 0:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if cipher.is_plaintext:
        disk.ftruncate(fd, length)
        return
    size = os.fstat(fd).st_size
    if length > size:
        _grow(fd, cipher, size, length)
        return
    if length < size and length % BLOCK:
        # the new partial last block must be ciphertext: if its block is a hole now,
        # turn the whole block into encrypted zeros first (it reads the same), then cut
        tail = _down(length)
        if _is_hole(fd, tail, size):
            _write_zeros(fd, cipher, tail, tail + BLOCK)
    disk.ftruncate(fd, length)


def fallocate(fd: int, cipher: FileCipher, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on an encrypted file, keeping the rule: allocated and zeroed whole
    blocks read as zeros; partial blocks at the edges get encrypted zeros instead.
    A mode the backing filesystem refuses raises its errno."""
    if offset < 0 or length <= 0:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if mode not in FALLOC_MODES:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    if cipher.is_plaintext:
        _backing_fallocate(fd, mode, offset, length)
        return
    size = os.fstat(fd).st_size
    end = offset + length
    if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
        _zero_range(fd, cipher, mode, size, offset, min(end, size))
        if mode & FALLOC_FL_ZERO_RANGE and not mode & FALLOC_FL_KEEP_SIZE and end > size:
            _allocate(fd, cipher, size, size, end)
        return
    if mode & FALLOC_FL_KEEP_SIZE:
        # blocks past the end, or holes inside it: allocated blocks read as zeros
        _backing_fallocate(fd, mode, offset, length)
        return
    _allocate(fd, cipher, size, offset, end)


def _allocate(fd: int, cipher: FileCipher, size: int, offset: int, end: int) -> None:
    """Allocate [offset, end), growing the file to ``end`` if it is shorter."""
    with _restoring_size(fd, size):
        _backing_fallocate(fd, 0, offset, end - offset)
        if end > size:
            # the space is reserved: these writes land in allocated blocks
            _write_zeros(fd, cipher, size, min(_up(size), end))
            if end % BLOCK and _down(end) >= _up(size):
                _write_zeros(fd, cipher, _down(end), end)


def _zero_range(fd: int, cipher: FileCipher, mode: int, size: int, start: int, stop: int
                ) -> None:
    """Make [start, stop) (inside the file) read as zeros: the whole blocks by the
    backing filesystem (punched or zeroed), the partial ones with encrypted zeros."""
    if stop <= start:
        return
    inner_start = min(_up(start), stop)
    inner_stop = max(_down(stop), inner_start)
    _zero_partial(fd, cipher, size, start, inner_start)
    if inner_stop > inner_start:
        _backing_fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, inner_start, inner_stop - inner_start)
    _zero_partial(fd, cipher, size, inner_stop, stop)


def _zero_partial(fd: int, cipher: FileCipher, size: int, start: int, stop: int) -> None:
    """Make [start, stop), inside one block of the file, read as zeros."""
    if stop > start and not _is_hole(fd, _down(start), size):
        _write_zeros(fd, cipher, start, stop)  # a hole reads as zeros already


COPY_CHUNK = 256 * 1024


def copy_reencrypted(src_fd: int, src_cipher: FileCipher, dst_fd: int, dst_cipher: FileCipher,
                     size: int, pace: Callable[[int], None]) -> int:
    """Copy the first ``size`` plaintext bytes of ``src_fd`` into the empty file
    ``dst_fd`` under ``dst_cipher``, keeping the holes rule: whole zero blocks stay
    holes, everything else is written, the short last block always. ``pace(n)`` is
    called before each write of n bytes (rate limits, pauses, cancellation). Returns
    the bytes written."""
    written = 0
    tail = _down(size) if size % BLOCK else size  # a short last block, never a hole
    pos = 0
    while pos < size:
        try:
            pos = max(pos, _down(os.lseek(src_fd, pos, os.SEEK_DATA)))
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            break  # holes to the end
        if pos >= size:
            break
        n = min(COPY_CHUNK, size - pos)
        plain = read_at(src_fd, src_cipher, n, pos)
        holes = set(zero_blocks(plain))
        run = None
        for at in range(0, len(plain) + BLOCK, BLOCK):
            if at < len(plain) and at not in holes:
                run = at if run is None else run
                continue
            if run is not None:
                piece = plain[run:at]
                pace(len(piece))
                out = piece if dst_cipher.is_plaintext else dst_cipher.apply(piece, pos + run)
                _pwrite_all(dst_fd, out, pos + run)
                written += len(piece)
                run = None
        pos += n
    if tail < size and not dst_cipher.is_plaintext and os.fstat(dst_fd).st_size < size:
        # the short last block was a hole in the source: it must be ciphertext here
        piece = read_at(src_fd, src_cipher, size - tail, tail)
        pace(len(piece))
        _pwrite_all(dst_fd, dst_cipher.apply(piece, tail), tail)
        written += len(piece)
    disk.ftruncate(dst_fd, size)
    return written
