"""Reading and writing encrypted file contents at byte offsets.

All offset and gap arithmetic lives here; callers pass a backing fd and the file's
cipher. Invariant: every byte of an encrypted backing file is the keystream at its
own offset XOR the plaintext, including bytes nobody wrote: a gap made by a write
past the end or by growing truncate holds encrypted zeros, so it reads back as
zeros. Gaps are filled in bounded chunks, so a huge gap never needs huge memory.

The fd must not be opened with O_APPEND: Linux ignores pwrite's offset on such fds.
Appending is ``write_at(fd, cipher, data, size)``. Filling a gap reads the size and
then writes, so callers serialize writes to one file that may extend it (a gap fill
must not overwrite a concurrent write landing inside the gap).
"""

from __future__ import annotations

import os

from encfs.cipher import FileCipher

GAP_CHUNK = 1 << 20  # bytes of encrypted zeros produced per step when filling a gap
_ZEROS = bytes(GAP_CHUNK)


def read_at(fd: int, cipher: FileCipher, size: int, offset: int) -> bytes:
    """Read up to ``size`` plaintext bytes at ``offset`` (fewer at end of file)."""
    data = os.pread(fd, size, offset)
    if cipher.is_plaintext or not data:
        return data
    return cipher.apply(data, offset)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _fill_zeros(fd: int, cipher: FileCipher, start: int, end: int) -> None:
    """Write encrypted zeros over [start, end)."""
    pos = start
    while pos < end:
        n = min(GAP_CHUNK, end - pos)
        _pwrite_all(fd, cipher.apply(memoryview(_ZEROS)[:n], pos), pos)
        pos += n


def write_at(fd: int, cipher: FileCipher, data: bytes | memoryview, offset: int) -> int:
    """Write ``data`` at ``offset``; a write starting past the end first fills the gap
    with encrypted zeros. Returns the number of bytes written (all of them)."""
    if not cipher.is_plaintext and offset > 0:
        size = os.fstat(fd).st_size
        if offset > size:
            _fill_zeros(fd, cipher, size, offset)
    if not data:
        return 0
    out = data if cipher.is_plaintext else cipher.apply(data, offset)
    _pwrite_all(fd, out, offset)
    return len(data)


def truncate(fd: int, cipher: FileCipher, length: int) -> None:
    """Set the file's size to ``length``; growing fills encrypted zeros."""
    if length < 0:
        raise ValueError("length must be >= 0")
    if not cipher.is_plaintext:
        size = os.fstat(fd).st_size
        if length > size:
            _fill_zeros(fd, cipher, size, length)
            return
    os.ftruncate(fd, length)
