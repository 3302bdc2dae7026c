"""What a power cut would leave of a database directory: a fault-injection layer for the
engine's files, in the manner of RocksDB's FaultInjectionTestFS.

A process crash keeps the page cache; a power cut keeps only what was synced. The
engine makes data durable with exactly two kinds of call: ``fsync``/``fdatasync`` of a
file (its contents) and ``fsync`` of a directory (its names). While installed, this
layer wraps those two calls (``os.fsync`` and ``os.fdatasync``, which every engine
module reaches through the ``os`` module) and records, for files under the watched
directory, each file's contents at its last sync and the directory's listing at its
last sync. It also wraps ``os.unlink``, ``os.remove``, ``os.rename`` and ``os.replace``
only to tell a file from a later one that reuses its inode number.

``power_cut(into)`` writes the state a power cut at this moment could leave:

- a name is present only if it was in the directory when the directory was last
  synced, and refers to the file it named then (creates, renames and deletes since
  are undone; a file deleted since comes back);
- each file holds what it held at its last sync (nothing, if never synced), plus, in
  "torn" mode, a random part of what was appended since: the page cache may have
  written some of it back, from the start, cut at any byte.

The engine runs in this process (``background_processes=False``), so every sync is
seen. The model is as pessimistic as a journaling filesystem allows: it keeps no name
the directory's sync did not cover and no byte a file's sync did not cover.
"""

from __future__ import annotations

import contextlib
import os
import random
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FileId = tuple[int, int]   # (inode number, generation: bumped when the inode is freed)


@dataclass
class FaultFS:
    root: Path
    synced_content: dict[FileId, bytes] = field(default_factory=dict)
    synced_listing: dict[str, FileId] = field(default_factory=dict)
    generation: dict[int, int] = field(default_factory=dict)
    syncs: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)

    def start(self) -> None:
        """Everything in the directory now counts as durable."""
        self.root.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(self.root):
            if entry.is_file(follow_symlinks=False):
                ident = self._ident(entry.inode())
                self.synced_content[ident] = Path(entry.path).read_bytes()
                self.synced_listing[entry.name] = ident

    def _ident(self, ino: int) -> FileId:
        return ino, self.generation.get(ino, 0)

    def _watched(self, path: str) -> bool:
        return os.path.dirname(os.path.abspath(path)) == str(self.root)

    # -- what the wrappers record

    def after_sync(self, fd: int) -> None:
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return
        st = os.fstat(fd)
        with self.lock:
            if stat.S_ISDIR(st.st_mode):
                if where == str(self.root):
                    self.synced_listing = {e.name: self._ident(e.inode())
                                           for e in os.scandir(self.root)
                                           if e.is_file(follow_symlinks=False)}
                    self.syncs += 1
                return
            if where.endswith(" (deleted)") or not self._watched(where):
                return   # a deleted file's name comes back only with what it had before
            with open(f"/proc/self/fd/{fd}", "rb") as f:
                self.synced_content[self._ident(st.st_ino)] = f.read()
            self.syncs += 1

    def before_unlink(self, path: str) -> None:
        """``path`` loses its name; if that was the inode's last, a later file may get
        its number and must not be taken for it."""
        if not self._watched(path):
            return
        with contextlib.suppress(OSError):
            st = os.stat(path, follow_symlinks=False)
            if st.st_nlink == 1:
                with self.lock:
                    # the durable listing may still name it, under the old identity
                    self.generation[st.st_ino] = self.generation.get(st.st_ino, 0) + 1

    # -- the crash

    def power_cut(self, into: Path, torn: random.Random | None = None) -> int:
        """Write into ``into`` the directory a power cut now could leave; the number of
        files. With ``torn``, each file also keeps a random prefix of its unsynced
        appends."""
        with self.lock:
            into.mkdir(parents=True)
            for name, ident in self.synced_listing.items():
                data = self.synced_content.get(ident, b"")
                if torn is not None:
                    data = self._torn(name, ident, data, torn)
                (into / name).write_bytes(data)
            return len(self.synced_listing)

    def _torn(self, name: str, ident: FileId, synced: bytes, rng: random.Random) -> bytes:
        """``synced`` plus a random prefix of what the live file appended after it."""
        live = self.root / name
        try:
            st = os.stat(live)
            if self._ident(st.st_ino) != ident:
                return synced
            current = live.read_bytes()
        except OSError:
            return synced
        if len(current) <= len(synced) or not current.startswith(synced):
            return synced
        extra = len(current) - len(synced)
        return current[:len(synced) + rng.choice([0, extra, rng.randrange(extra + 1)])]


@contextlib.contextmanager
def installed(fs: FaultFS) -> Iterator[FaultFS]:
    """Wrap the os calls for the duration of the block."""
    real = {name: getattr(os, name) for name in
            ("fsync", "fdatasync", "unlink", "remove", "rename", "replace")}

    def fsync(fd: int) -> None:
        real["fsync"](fd)
        fs.after_sync(fd)

    def fdatasync(fd: int) -> None:
        real["fdatasync"](fd)
        fs.after_sync(fd)

    def unlink(path, *args, **kwargs) -> None:
        fs.before_unlink(os.fspath(path))
        real["unlink"](path, *args, **kwargs)

    def rename(src, dst, *args, **kwargs) -> None:
        fs.before_unlink(os.fspath(dst))   # an existing dst loses its name
        real["rename"](src, dst, *args, **kwargs)

    fs.start()
    os.fsync, os.fdatasync = fsync, fdatasync
    os.unlink = os.remove = unlink
    os.rename = os.replace = rename
    try:
        yield fs
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)
