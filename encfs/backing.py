"""The backing tree of a vault, reached by paths relative to its root, at any depth.

Every name in the tree is reached from one descriptor of the backing root with the
``*at`` system calls (``dir_fd=`` in Python), never by an absolute path: the depth
of a file is then limited only by each name fitting NAME_MAX, not by PATH_MAX minus
the backing directory's own path. A relative path short enough for one system call
(the common case) costs no extra call; a longer one is walked in pieces, each piece
opened as an ``O_PATH`` directory descriptor relative to the one before, so a path
of any depth costs one extra open per ~3.8 KiB of path and every such descriptor is
closed when the operation ends.

Paths here are backing-relative bytes as the key dictionary uses them (b"" is the
root). Symlinks are never followed at the last component (``lstat``, not ``stat``);
directories on the way are real directories, because the kernel resolves every
symlink through the mount itself before it names a file to us.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from encfs.disk import disk
from encfs.fsops import fsync_dir, renameat2

# a relative path up to this long goes to the kernel whole: PATH_MAX (4096) less room
# for the "/proc/self/fd/N/" prefix that the xattr calls need
PIECE_MAX = 3800
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def pieces(rel: bytes) -> list[bytes]:
    """Split ``rel`` into runs of whole components, each at most PIECE_MAX bytes."""
    out: list[bytes] = []
    current = b""
    for name in rel.split(b"/"):
        if len(name) > PIECE_MAX:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        if current and len(current) + 1 + len(name) > PIECE_MAX:
            out.append(current)
            current = name
        else:
            current = current + b"/" + name if current else name
    out.append(current)
    return out


class BackingTree:
    """The backing directory of a vault, held open; thread-safe."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        self.fd = os.open(root, _DIR_PATH)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- reaching a name --------------------------------------------------------------

    @contextmanager
    def at(self, rel: bytes) -> Iterator[tuple[int, bytes]]:
        """``(dir_fd, rest)`` such that ``rest`` relative to ``dir_fd`` names ``rel``
        and fits one system call. ``rest`` is b"." for the root."""
        if len(rel) <= PIECE_MAX:
            yield self.fd, rel or b"."
            return
        parts = pieces(rel)
        fds: list[int] = []
        try:
            fd = self.fd
            for part in parts[:-1]:
                fd = os.open(part, _DIR_PATH, dir_fd=fd)
                fds.append(fd)
            yield fd, parts[-1]
        finally:
            for fd in fds:
                os.close(fd)

    @contextmanager
    def proc_path(self, rel: bytes) -> Iterator[bytes]:
        """An absolute path naming ``rel`` through /proc, for the calls that take no
        ``dir_fd`` (extended attributes)."""
        with self.at(rel) as (fd, rest):
            yield b"/proc/self/fd/%d/%s" % (fd, rest)

    # -- looking ----------------------------------------------------------------------

    def lstat(self, rel: bytes) -> os.stat_result:
        with self.at(rel) as (fd, rest):
            return os.stat(rest, dir_fd=fd, follow_symlinks=False)

    def lexists(self, rel: bytes) -> bool:
        try:
            self.lstat(rel)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def is_regular(self, rel: bytes) -> bool:
        try:
            return stat.S_ISREG(self.lstat(rel).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def listdir(self, rel: bytes) -> list[bytes]:
        with self.at(rel) as (fd, rest):
            dfd = os.open(rest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        try:
            return [os.fsencode(n) for n in os.listdir(dfd)]
        finally:
            os.close(dfd)

    def walk_files(self, skip: frozenset[bytes] | set[bytes] = frozenset()) -> list[bytes]:
        """Every regular file in the tree, sorted, leaving out the root's entries named
        in ``skip``. Walks by directory descriptors, so any depth is fine."""
        found: list[bytes] = []
        top = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            for dirpath, dirnames, filenames, dirfd in os.fwalk(b".", dir_fd=top):
                rel_dir = dirpath[2:]  # below b"./"
                if not rel_dir:
                    dirnames[:] = [d for d in dirnames if d not in skip]
                for name in filenames:
                    try:
                        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        found.append(rel_dir + b"/" + name if rel_dir else name)
        finally:
            os.close(top)
        return sorted(found)

    def readlink(self, rel: bytes) -> bytes:
        with self.at(rel) as (fd, rest):
            return os.readlink(rest, dir_fd=fd)

    # -- changing ---------------------------------------------------------------------

    def open(self, rel: bytes, flags: int, mode: int = 0o777) -> int:
        with self.at(rel) as (fd, rest):
            return disk.open(rest, flags | os.O_CLOEXEC, mode, dir_fd=fd)

    def mkdir(self, rel: bytes, mode: int) -> None:
        with self.at(rel) as (fd, rest):
            disk.mkdir(rest, mode, dir_fd=fd)

    def rmdir(self, rel: bytes) -> None:
        with self.at(rel) as (fd, rest):
            disk.rmdir(rest, dir_fd=fd)

    def unlink(self, rel: bytes) -> None:
        with self.at(rel) as (fd, rest):
            disk.unlink(rest, dir_fd=fd)

    def mknod(self, rel: bytes, mode: int, device: int = 0) -> None:
        with self.at(rel) as (fd, rest):
            os.mknod(rest, mode, device, dir_fd=fd)

    def symlink(self, target: bytes, rel: bytes) -> None:
        with self.at(rel) as (fd, rest):
            os.symlink(target, rest, dir_fd=fd)

    def chmod(self, rel: bytes, mode: int) -> None:
        with self.at(rel) as (fd, rest):
            os.chmod(rest, mode, dir_fd=fd)

    def chown(self, rel: bytes, uid: int, gid: int) -> None:
        with self.at(rel) as (fd, rest):
            os.chown(rest, uid, gid, dir_fd=fd, follow_symlinks=False)

    def utime(self, rel: bytes, ns: tuple[int, int]) -> None:
        with self.at(rel) as (fd, rest):
            os.utime(rest, ns=ns, dir_fd=fd, follow_symlinks=False)

    def link(self, src: bytes, dst: bytes) -> None:
        with self.at(src) as (sfd, s), self.at(dst) as (dfd, d):
            disk.link(s, d, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    def rename(self, src: bytes, dst: bytes, flags: int = 0) -> None:
        """rename(2), or renameat2(2) with RENAME_NOREPLACE / RENAME_EXCHANGE."""
        with self.at(src) as (sfd, s), self.at(dst) as (dfd, d):
            renameat2(s, d, flags, src_dir_fd=sfd, dst_dir_fd=dfd)

    def fsync_dir(self, rel: bytes) -> None:
        """Make the entries of directory ``rel`` durable."""
        with self.at(rel) as (fd, rest):
            fsync_dir(rest, dir_fd=fd)
