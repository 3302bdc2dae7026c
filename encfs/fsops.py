"""Small filesystem primitives: renameat2, fallocate, directory fsync, syncfs, atomic replace.

``atomic_replace`` is the one way tdefs replaces a metadata file: write a tmp file
next to it, fsync it, rename it over the target, fsync the directory. A crash at any
point leaves either the old or the new file under the target name (a leftover tmp
file is ignored and overwritten next time).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from encfs.failpoints import ARMED, failpoint

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def renameat2(src: str | bytes | Path, dst: str | bytes | Path, flags: int, *,
              src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
    """rename(2) with flags (RENAME_NOREPLACE, RENAME_EXCHANGE); raises OSError.
    Relative paths are taken relative to ``src_dir_fd`` / ``dst_dir_fd`` if given."""
    s = os.fsencode(src)
    d = os.fsencode(dst)
    if flags == 0:
        os.rename(s, d, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    sfd = _AT_FDCWD if src_dir_fd is None else src_dir_fd
    dfd = _AT_FDCWD if dst_dir_fd is None else dst_dir_fd
    if _renameat2(sfd, s, dfd, d, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(s), None, os.fsdecode(d))


_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode bits (FALLOC_FL_*); raises OSError with its errno."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fsync_dir(path: str | bytes | Path, *, dir_fd: int | None = None) -> None:
    """Make the entries of directory ``path`` (creations, renames, unlinks) durable;
    a relative ``path`` is taken relative to ``dir_fd`` if given."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str | bytes | Path) -> None:
    """syncfs(2) on the filesystem holding directory ``path``; raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fsdecode(path))
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` at the fd's position (os.write may write less)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_replace(path: str | Path, data: bytes, failpoint_prefix: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new content.

    ``failpoint_prefix`` names the failpoints fired inside: ``<prefix>.mid-tmp`` (half
    of the tmp file written), ``<prefix>.after-tmp`` (tmp complete and synced, not
    renamed) and ``<prefix>.after-rename`` (renamed, directory not synced).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        if ARMED:
            half = len(data) // 2
            write_all(fd, data[:half])
            failpoint(f"{failpoint_prefix}.mid-tmp")
            write_all(fd, data[half:])
        else:
            write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    failpoint(f"{failpoint_prefix}.after-tmp")
    os.rename(tmp, path)
    failpoint(f"{failpoint_prefix}.after-rename")
    fsync_dir(path.parent)
