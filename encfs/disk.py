"""The encryption core's I/O whose durability matters, in one replaceable place.

Every write, size change, sync, name change and extended-attribute change that the
encryption core makes — the files.dict appends and rewrite, the keys.dict and
reencrypt.json replaces, the steps of each file operation (create, rename, link,
unlink, truncate, the per-file copy of the entry), the copy made by re-encryption, and
the fsyncs of files and directories — goes through ``disk``. Reads do not.

In production ``disk``'s attributes are the ``os`` functions themselves (and two
libc calls ``os`` lacks), so a call costs one attribute lookup more than calling
``os`` directly. A power-loss test swaps them for a recorder (``disk.replaced_by``)
that logs each call with the identity of the file it touches, to work out every
on-disk state a power cut could leave (tests/unit/powerloss.py).

Invariant: code in ``encfs/`` never calls the functions below through ``os`` for a
file of a vault; whatever it changed on disk, the recorder saw.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc_renameat2 = _libc.renameat2
_libc_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc_renameat2.restype = ctypes.c_int
_libc_fallocate = _libc.fallocate
_libc_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc_fallocate.restype = ctypes.c_int


def renameat2(src: bytes, dst: bytes, flags: int, *, src_dir_fd: int | None = None,
              dst_dir_fd: int | None = None) -> None:
    """renameat2(2): rename with RENAME_NOREPLACE / RENAME_EXCHANGE; raises OSError."""
    sfd = _AT_FDCWD if src_dir_fd is None else src_dir_fd
    dfd = _AT_FDCWD if dst_dir_fd is None else dst_dir_fd
    if _libc_renameat2(sfd, src, dfd, dst, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(src), None, os.fsdecode(dst))


def syncfs(fd: int) -> None:
    """syncfs(2): make everything on the filesystem holding ``fd`` durable."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode bits (FALLOC_FL_*); raises OSError with its errno."""
    if _libc_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# name -> the production function; a replacement must provide every one of them
CALLS: dict[str, Any] = {
    "open": os.open,  # only calls that may create or truncate must come here
    "write": os.write,
    "pwrite": os.pwrite,
    "ftruncate": os.ftruncate,
    "fallocate": fallocate,
    "fsync": os.fsync,
    "fdatasync": os.fdatasync,
    "syncfs": syncfs,
    "rename": os.rename,
    "renameat2": renameat2,
    "link": os.link,
    "unlink": os.unlink,
    "mkdir": os.mkdir,
    "rmdir": os.rmdir,
    "setxattr": os.setxattr,
    "removexattr": os.removexattr,
}


class Disk:
    """The calls in ``CALLS``, as attributes: ``disk.fsync(fd)``."""

    open: Any
    write: Any
    pwrite: Any
    ftruncate: Any
    fallocate: Any
    fsync: Any
    fdatasync: Any
    syncfs: Any
    rename: Any
    renameat2: Any
    link: Any
    unlink: Any
    mkdir: Any
    rmdir: Any
    setxattr: Any
    removexattr: Any

    def __init__(self) -> None:
        self.__dict__.update(CALLS)

    @contextmanager
    def replaced_by(self, other: object) -> Iterator[None]:
        """For the duration of the block, every call goes to ``other``'s method of
        the same name (tests only: not thread-safe against calls in flight)."""
        self.__dict__.update({name: getattr(other, name) for name in CALLS})
        try:
            yield
        finally:
            self.__dict__.update(CALLS)


disk = Disk()
