"""Small filesystem primitives: renameat2, fallocate, directory fsync, syncfs, atomic replace.

Every call here that changes or syncs something goes through ``encfs.disk``.

``atomic_replace`` is the one way tdefs replaces a metadata file: write a tmp file
next to it, fsync it, rename it over the target, fsync the directory. A crash at any
point leaves either the old or the new file under the target name (a leftover tmp
file is ignored and overwritten next time).
"""

from __future__ import annotations

import os
from pathlib import Path

from encfs.disk import RENAME_EXCHANGE, RENAME_NOREPLACE, disk
from encfs.failpoints import ARMED, failpoint

__all__ = ["RENAME_EXCHANGE", "RENAME_NOREPLACE", "atomic_replace", "fallocate", "fsync_dir",
           "renameat2", "syncfs", "write_all"]


def renameat2(src: str | bytes | Path, dst: str | bytes | Path, flags: int, *,
              src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
    """rename(2) with flags (RENAME_NOREPLACE, RENAME_EXCHANGE); raises OSError.
    Relative paths are taken relative to ``src_dir_fd`` / ``dst_dir_fd`` if given."""
    s = os.fsencode(src)
    d = os.fsencode(dst)
    if flags == 0:
        disk.rename(s, d, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    disk.renameat2(s, d, flags, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode bits (FALLOC_FL_*); raises OSError with its errno."""
    disk.fallocate(fd, mode, offset, length)


def fsync_dir(path: str | bytes | Path, *, dir_fd: int | None = None) -> None:
    """Make the entries of directory ``path`` (creations, renames, unlinks) durable;
    a relative ``path`` is taken relative to ``dir_fd`` if given."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        disk.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str | bytes | Path) -> None:
    """syncfs(2) on the filesystem holding directory ``path``; raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        disk.syncfs(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fsdecode(path)) from None
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` at the fd's position (os.write may write less)."""
    view = memoryview(data)
    while view:
        n = disk.write(fd, view)
        view = view[n:]


def atomic_replace(path: str | Path, data: bytes, failpoint_prefix: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new content.

    ``failpoint_prefix`` names the failpoints fired inside: ``<prefix>.mid-tmp`` (half
    of the tmp file written), ``<prefix>.after-tmp`` (tmp complete and synced, not
    renamed) and ``<prefix>.after-rename`` (renamed, directory not synced).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = disk.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        if ARMED:
            half = len(data) // 2
            write_all(fd, data[:half])
            failpoint(f"{failpoint_prefix}.mid-tmp")
            write_all(fd, data[half:])
        else:
            write_all(fd, data)
        disk.fsync(fd)
    finally:
        os.close(fd)
    failpoint(f"{failpoint_prefix}.after-tmp")
    disk.rename(tmp, path)
    failpoint(f"{failpoint_prefix}.after-rename")
    fsync_dir(path.parent)
