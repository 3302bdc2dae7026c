"""The inode table of the mount: FUSE inode numbers over the backing tree's files.

The kernel names files by inode number; the vault names them by backing-relative
path. This table maps between the two. Invariants:

- A FUSE inode number is never reused while the daemon runs, so a backing inode
  number recycled by the backing filesystem (a file deleted while still open, then
  a new file) never aliases the old, still-open file.
- While a backing file exists, it keeps the FUSE inode number it was first given
  (hard links share one), so `st_ino` seen through the mount is stable.
- An `Inode` object lives while the kernel holds a lookup reference to it or a
  handle is open on it; its `paths` are the names known to lead to it, kept
  current through unlink and rename (directory renames rewrite every known path
  below them).
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pyfuse3

ROOT_INODE: int = pyfuse3.ROOT_INODE


class Inode:
    """One file as the kernel knows it."""

    __slots__ = ("ino", "backing_ino", "paths", "lookups", "fds", "cipher", "lock",
                 "mtime_ns", "written", "last_st", "no_capability", "unsynced", "swap",
                 "reads_away", "drained")

    def __init__(self, ino: int, backing_ino: int | None) -> None:
        self.ino = ino
        self.backing_ino = backing_ino  # None once the backing file is gone
        self.paths: set[bytes] = set()
        self.lookups = 0
        self.fds: set[int] = set()  # backing fds of the open handles
        self.cipher: Any = None  # the FileCipher shared by all handles, while any is open
        self.lock: Any = None  # serialises content changes (set by the filesystem)
        # With the writeback cache the kernel keeps its own mtime of a regular file:
        # the one it was first told, then the ones it sends in setattr. `written` says
        # the backing mtime may differ from it: our pwrites moved it, or a setattr of
        # an open file kept the new mtime for its close or next fsync.
        self.mtime_ns: int | None = None
        self.written = False
        self.last_st: os.stat_result | None = None  # as last told to the kernel
        self.no_capability = False  # known to have no security.capability attribute
        self.unsynced = 0  # bytes written through the mount since the last fsync
        # re-encryption replacing the backing file: set while it does (reads and
        # opens wait for it), with the count of reads away from the loop (in worker
        # threads, or yielding while their disk reads start) and the event that says
        # they are all done
        self.swap: Any = None
        self.reads_away = 0
        self.drained: Any = None

    def any_path(self) -> bytes:
        """A backing-relative path of this inode; FileNotFoundError when it has none."""
        if not self.paths:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        # min() keeps the choice stable between calls
        return min(self.paths)

    def any_fd(self) -> int | None:
        return next(iter(self.fds)) if self.fds else None


def join(parent: bytes, name: bytes) -> bytes:
    """The backing-relative path of `name` in directory `parent` (b"" is the root)."""
    return name if not parent else parent + b"/" + name


def parent_of(rel: bytes) -> bytes:
    return rel.rpartition(b"/")[0]


class InodeTable:
    def __init__(self, root_backing_ino: int) -> None:
        root = Inode(ROOT_INODE, root_backing_ino)
        root.paths.add(b"")
        root.lookups = 1  # the kernel never forgets the root
        self._inodes: dict[int, Inode] = {ROOT_INODE: root}
        self._by_path: dict[bytes, Inode] = {b"": root}
        self._ino_of_backing: dict[int, int] = {root_backing_ino: ROOT_INODE}
        self._next_ino = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._inodes)

    def get(self, ino: int) -> Inode:
        inode = self._inodes.get(ino)
        if inode is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return inode

    def remember(self, rel: bytes, st: os.stat_result, fresh: bool = False) -> Inode:
        """The inode for the file at `rel`, whose lstat/fstat is `st`.

        `fresh` says the backing file was just created: any earlier mapping of its
        backing inode number belongs to a file that no longer exists.
        """
        if fresh:
            self._detach_backing(st.st_ino)
        ino = self._ino_of_backing.get(st.st_ino)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._ino_of_backing[st.st_ino] = ino
        inode = self._inodes.get(ino)
        if inode is None:
            inode = self._inodes[ino] = Inode(ino, st.st_ino)
        if rel not in inode.paths:
            self._unbind_path(rel)
            inode.paths.add(rel)
            self._by_path[rel] = inode
        return inode

    def find(self, ino: int) -> Inode | None:
        return self._inodes.get(ino)

    def fuse_ino_of(self, backing_ino: int) -> int | None:
        """The FUSE inode number given to a backing inode, if it was given one."""
        return self._ino_of_backing.get(backing_ino)

    def alias(self, backing_ino: int, ino: int) -> None:
        """A second backing inode (a re-encrypted copy about to take the file's place)
        stands for FUSE inode ``ino`` too."""
        self._ino_of_backing[backing_ino] = ino

    def unalias(self, backing_ino: int, ino: int) -> None:
        if self._ino_of_backing.get(backing_ino) == ino:
            del self._ino_of_backing[backing_ino]

    def moved(self, old_backing: int, new_backing: int, ino: int) -> None:
        """FUSE inode ``ino`` now lives in backing inode ``new_backing``: st_ino seen
        through the mount does not change."""
        self.unalias(old_backing, ino)
        self._ino_of_backing[new_backing] = ino
        inode = self._inodes.get(ino)
        if inode is not None:
            inode.backing_ino = new_backing

    def release_if_unused(self, inode: Inode) -> None:
        if inode.lookups > 0 or inode.fds or inode.ino == ROOT_INODE:
            return
        for rel in inode.paths:
            if self._by_path.get(rel) is inode:
                del self._by_path[rel]
        self._inodes.pop(inode.ino, None)
        if inode.backing_ino is None:
            inode.cipher = None

    def forget(self, ino: int, nlookup: int) -> None:
        inode = self._inodes.get(ino)
        if inode is None:
            return
        inode.lookups = max(0, inode.lookups - nlookup)
        self.release_if_unused(inode)

    def removed(self, rel: bytes, gone: bool) -> None:
        """The name `rel` was unlinked or rmdir'ed; `gone` says the backing file went with it."""
        inode = self._unbind_path(rel)
        if inode is not None and gone:
            self._detach_backing(inode.backing_ino)

    def renamed(self, src: bytes, dst: bytes, dst_gone: bool, is_dir: bool) -> None:
        """`src` was renamed over `dst`; `dst_gone` says the file `dst` named no longer exists."""
        self.removed(dst, dst_gone)
        self._put_subtree(self._take_subtree(src, is_dir), src, dst)

    def exchanged(self, a: bytes, b: bytes, a_is_dir: bool, b_is_dir: bool) -> None:
        moved_a = self._take_subtree(a, a_is_dir)
        moved_b = self._take_subtree(b, b_is_dir)
        self._put_subtree(moved_a, a, b)
        self._put_subtree(moved_b, b, a)

    def _take_subtree(self, top: bytes, is_dir: bool) -> list[tuple[bytes, Inode]]:
        names = [top] if top in self._by_path else []
        if is_dir:
            prefix = top + b"/"
            names += [rel for rel in self._by_path if rel.startswith(prefix)]
        taken = []
        for rel in names:
            inode = self._by_path.pop(rel)
            inode.paths.discard(rel)
            taken.append((rel, inode))
        return taken

    def _put_subtree(self, taken: list[tuple[bytes, Inode]], old: bytes, new: bytes) -> None:
        for rel, inode in taken:
            moved = new + rel[len(old):]
            self._unbind_path(moved)
            inode.paths.add(moved)
            self._by_path[moved] = inode

    def _unbind_path(self, rel: bytes) -> Inode | None:
        inode = self._by_path.pop(rel, None)
        if inode is not None:
            inode.paths.discard(rel)
        return inode

    def _detach_backing(self, backing_ino: int | None) -> None:
        if backing_ino is None:
            return
        ino = self._ino_of_backing.pop(backing_ino, None)
        inode = self._inodes.get(ino) if ino is not None else None
        if inode is not None and inode.ino != ROOT_INODE:
            inode.backing_ino = None
