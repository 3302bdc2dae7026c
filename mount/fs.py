"""The FUSE filesystem: pyfuse3 operations over a vault's backing tree.

Invariants:
- Every change to the tree that the key dictionary cares about (create, unlink,
  rename, link, truncation to zero) goes through the vault's crash-ordered
  operations; directories, symlinks and special files are made with plain os calls.
- Contents pass through `encfs.content` with the inode's one `FileCipher`, shared by
  every handle of the inode, so an unlinked file that is still open keeps working and
  hard links read the same bytes. No crypto arithmetic happens here.
- `.tdefs/` at the root is invisible (lookup says ENOENT, readdir skips it) and
  cannot be created, renamed over or linked to.
- No request can take the daemon down: every handler answers an unexpected
  exception with EIO after logging it.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from encfs import content, entry_copy
from encfs.vault import META_DIR, Vault
from mount.inodes import ROOT_INODE, Inode, InodeTable, join, parent_of
from mount.tree_gate import TreeGate

log = logging.getLogger("tdefs.mount")

# Everything reaches the backing tree through this daemon, so the kernel may cache
# names for long; the tree changes only through requests we answer. Attributes are
# cached for a second only: with the writeback cache, a write(2) asks the daemon for
# nothing until they expire, so this is how long a program keeps writing into the
# page cache of a mount whose daemon has died before it gets ENOTCONN.
ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 1.0
COARSE_TIME_NS = 1_000_000_000  # --coarse-times: whole seconds, as ext4 with small inodes

# Writes at least this large always run in a worker thread, and reads this large do
# when other requests are in flight, so the loop keeps serving other requests (a stat
# during a large copy waited up to 15 ms at p99 behind inline 1 MiB writes, 1.5 ms
# with them in threads, for 12 % of sequential write speed); smaller ones cost less
# inline than a thread hop.
THREAD_IO_BYTES = 128 * 1024
# A READ served in the loop that must wait for the disk while other requests wait
# starts its disk read, then yields to the loop up to this many times so they can
# start theirs.
PREFETCH_YIELDS = 8
# An fsync of a file with more than this written since its last fsync may take
# long: it always runs in a worker thread, so other files' requests never wait.
FSYNC_INLINE_BYTES = 1 << 20
# write-back failures remembered for `tdefs umount` and status (the log has all)
WRITE_FAILURES_KEPT = 1000

_META = META_DIR.encode()
_CAPABILITY = b"security.capability"
_ENTRY_COPY = entry_copy.XATTR  # the vault's own: invisible and untouchable through the mount
# Open flags that describe the request, not how the daemon opens the backing file:
# the kernel computes O_APPEND offsets itself, truncation is the vault's business,
# O_DIRECT would impose alignment on our own buffers.
_STRIPPED_FLAGS = (os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_NOCTTY
                   | getattr(os, "O_DIRECT", 0))

# whether a request waits on the FUSE descriptor (our polling patch to pyfuse3;
# without it only requests already being answered count)
_requests_waiting: Callable[[], bool] = getattr(pyfuse3, "requests_waiting", lambda: False)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _answer_errors(fn: F) -> F:
    """Turn anything a handler raises into an errno for the kernel."""

    op = fn.__name__

    @functools.wraps(fn)
    async def handler(self: VaultFS, *args: Any) -> Any:
        self._in_flight += 1
        self.requests[op] += 1
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError as exc:
            self.errors[(op, exc.errno)] += 1
            raise
        except OSError as exc:
            if exc.errno is None or exc.errno == errno.EIO:
                log.warning("%s%r: %s", op, args[:2], exc)
            self.errors[(op, exc.errno or errno.EIO)] += 1
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", op, args[:2])
            self.errors[(op, errno.EIO)] += 1
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self._in_flight -= 1

    return handler  # type: ignore[return-value]


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


def _changes_names(fn: F) -> F:
    """The handler changes names (or opens by name): it passes the tree gate shared,
    so it never runs while re-encryption puts a new copy of a file in place."""

    @functools.wraps(fn)
    async def handler(self: VaultFS, *args: Any) -> Any:
        async with self.gate.shared():
            return await fn(self, *args)

    return handler  # type: ignore[return-value]


class _Handle:
    __slots__ = ("fd", "inode", "flags")

    def __init__(self, fd: int, inode: Inode, flags: int) -> None:
        self.fd = fd
        self.inode = inode
        self.flags = flags  # how the backing file was opened, to open its successor


@dataclass
class Conversion:
    """A file being copied by re-encryption: did anything change it meanwhile?"""

    dirty: bool = False


class _DirHandle:
    __slots__ = ("inode", "names")

    def __init__(self, inode: Inode) -> None:
        self.inode = inode
        self.names: list[bytes] | None = None


class VaultFS(pyfuse3.Operations):
    """The mount's request handlers. Construct with an open Vault."""

    enable_writeback_cache = True
    supports_dot_lookup = True

    def __init__(self, vault: Vault, on_ready: Callable[[], None] | None = None,
                 writeback_cache: bool = True, xattrs: bool = True,
                 coarse_times: bool = False) -> None:
        super().__init__()
        self.vault = vault
        self.enable_writeback_cache = writeback_cache
        # read by pyfuse3 at INIT (our time-gran patch): the kernel keeps file times
        # in whole seconds, so writes within a second leave them alone and an fsync
        # then sends no SETATTR of the times
        self.time_gran_ns = COARSE_TIME_NS if coarse_times else 0
        # Without xattrs every xattr request answers ENOSYS, which the kernel
        # remembers for the mount: it then stops asking for security.capability
        # before each write(2), so a write that hits the page cache costs no request.
        self.xattrs = xattrs
        self.tree = vault.tree
        self._on_ready = on_ready
        self.inodes = InodeTable(self.tree.lstat(b"").st_ino)
        self._handles: dict[int, _Handle] = {}
        self._dirs: dict[int, _DirHandle] = {}
        self._next_dir_fh = 1
        self._is_root = os.geteuid() == 0
        self._in_flight = 0  # requests being handled now
        self.thread_reads = 0  # READs answered from a worker thread
        self.prefetched_reads = 0  # READs whose disk read started while others were taken
        self.gate = TreeGate()
        # backing inode number -> its conversion, for files re-encryption is copying
        self._converting: dict[int, Conversion] = {}
        # path -> {"path", "errno", "count", "first", "last"}: write-backs that failed
        self.write_failures: dict[str, dict[str, Any]] = {}
        # plain counters on the hot path; mount/metrics.py reads them when scraped
        self.requests: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[tuple[str, int]] = collections.Counter()
        self.bytes_decrypted = 0  # plaintext bytes read out of encrypted files
        self.bytes_encrypted = 0  # plaintext bytes written into encrypted files

    # ----------------------------------------------------------------- helpers

    def init(self) -> None:
        if self._on_ready is not None:
            self._on_ready()

    def open_files(self) -> int:
        return len(self._handles)

    def _child(self, parent: int, name: bytes) -> bytes:
        inode = self.inodes.get(parent)
        rel_parent = inode.any_path()
        if parent == ROOT_INODE and name == _META:
            raise _fail(errno.EPERM)
        return join(rel_parent, name)

    def _entry(self, inode: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        if inode.mtime_ns is None and stat.S_ISREG(st.st_mode):
            inode.mtime_ns = st.st_mtime_ns
        inode.last_st = st
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode.ino
        e.generation = 0
        e.entry_timeout = ENTRY_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size  # CTR keeps sizes equal
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _stat(self, inode: Inode) -> os.stat_result:
        fd = inode.any_fd()
        if fd is not None:
            return os.fstat(fd)
        return self.tree.lstat(inode.any_path())

    def _learn(self, rel: bytes, st: os.stat_result, fresh: bool = False) -> pyfuse3.EntryAttributes:
        """Remember `rel` and count one kernel lookup of it."""
        inode = self.inodes.remember(rel, st, fresh=fresh)
        inode.lookups += 1
        return self._entry(inode, st)

    def _give_to_caller(self, rel: bytes, ctx: pyfuse3.RequestContext,
                        fd: int | None = None) -> None:
        """New nodes belong to the caller, as on a local filesystem (we run as root)."""
        if not self._is_root or (ctx.uid == 0 and ctx.gid == 0):
            return
        gid = ctx.gid
        parent_st = self.tree.lstat(parent_of(rel))
        if parent_st.st_mode & stat.S_ISGID:
            gid = parent_st.st_gid
        if fd is not None:
            os.fchown(fd, ctx.uid, gid)
        else:
            self.tree.chown(rel, ctx.uid, gid)

    @staticmethod
    def _backing_flags(flags: int) -> int:
        flags &= ~_STRIPPED_FLAGS
        # With the writeback cache the kernel reads pages through any handle of the
        # inode, including one opened write-only.
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags | os.O_CLOEXEC

    def _open_backing(self, inode: Inode, flags: int) -> int:
        if inode.paths:
            rel = inode.any_path()

            def opener(f: int) -> int:
                return self.tree.open(rel, f | os.O_NOFOLLOW)
        else:
            fd = inode.any_fd()
            if fd is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))

            def opener(f: int) -> int:
                return os.open(f"/proc/self/fd/{fd}", f)  # reopening an unlinked file
        try:
            return opener(flags)
        except PermissionError:
            if flags & os.O_ACCMODE != os.O_RDWR:
                raise
            # a daemon that is not root may only write this file; reads of partial
            # pages through this handle will fail, as they would without a cache
            return opener((flags & ~os.O_ACCMODE) | os.O_WRONLY)

    def _add_handle(self, inode: Inode, fd: int, cipher: Any, flags: int) -> pyfuse3.FileInfo:
        inode.fds.add(fd)
        inode.cipher = cipher
        if inode.lock is None:
            inode.lock = trio.Lock()
        self._handles[fd] = _Handle(fd, inode, flags)
        # the page cache stays valid across opens: all writes come through us
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            raise _fail(errno.EBADF)
        return h

    def _cipher(self, inode: Inode) -> Any:
        return inode.cipher if inode.cipher is not None else \
            self.vault.cipher_for(inode.any_path())

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking call; in a worker thread when other requests are waiting for
        the loop. A thread hop costs about 100 us here, more than a cached pread or an
        fsync of a small file, so a lone request runs inline."""
        if self._in_flight > 1:
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    @staticmethod
    async def _long(fn: Callable[..., Any], *args: Any) -> Any:
        """Run a call that may take long (a size change, an fsync of much data) in a
        worker thread always: requests for other files keep being served meanwhile,
        even those the kernel has not sent yet."""
        return await trio.to_thread.run_sync(fn, *args)

    def _write_failed(self, inode: Inode, what: str, exc: OSError) -> None:
        """A write-back the kernel made (or an fsync) failed: the cached data is lost.
        Say so in the log, with the path, and keep it for `tdefs umount`. (Without the
        writeback cache the program's own write(2) gets the error: nothing is lost.)"""
        if not self.enable_writeback_cache:
            return
        path = os.fsdecode(inode.any_path()) if inode.paths else f"(unlinked inode {inode.ino})"
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        log.error("%s of %s failed (%s: %s): data cached for it is lost", what, path, name,
                  exc.strerror)
        now = time.time()
        seen = self.write_failures.get(path)
        if seen is None:
            if len(self.write_failures) >= WRITE_FAILURES_KEPT:
                return
            seen = self.write_failures[path] = {"path": path, "errno": name, "count": 0,
                                                "first": now}
        seen["count"] += 1
        seen["last"] = now

    # ---------------------------------------------------- re-encryption's part

    def watch(self, backing_ino: int) -> Conversion:
        """Start noting changes to the file whose backing inode is ``backing_ino``."""
        conversion = self._converting[backing_ino] = Conversion()
        return conversion

    def unwatch(self, backing_ino: int) -> None:
        self._converting.pop(backing_ino, None)

    def _touched(self, inode: Inode) -> None:
        """Its contents or size change: a copy of it being made is out of date."""
        if self._converting and inode.backing_ino is not None:
            conversion = self._converting.get(inode.backing_ino)
            if conversion is not None:
                conversion.dirty = True

    async def swap_backing(self, conversion: Conversion, old_ino: int, new_ino: int,
                           first: bytes, new_cipher: Any, check: Callable[[], bool],
                           switch: Callable[[], Any]) -> tuple[bool, Any]:
        """Put the new backing file ``new_ino`` (a re-encrypted copy) in place of
        ``old_ino`` under all its names, invisibly: no name changes meanwhile (the
        tree gate), no write or truncation of the file (its lock), no read away from
        the loop (drained); then ``switch()`` renames, and the FUSE inode number, the
        open handles (same descriptors, now on the new file) and the cipher follow.
        Does nothing, returning (False, None), if the file changed while it was copied
        or ``check()`` says its names moved."""
        async with self.gate.exclusive(), AsyncExitStack() as stack:
            fuse_ino = self.inodes.fuse_ino_of(old_ino)
            node = self.inodes.find(fuse_ino) if fuse_ino is not None else None
            if node is not None:
                if node.lock is None:
                    node.lock = trio.Lock()
                await stack.enter_async_context(node.lock)
            if conversion.dirty or not await trio.to_thread.run_sync(check):
                return False, None
            if node is not None:
                node.swap = trio.Event()
                stack.callback(self._swap_done, node)
                while node.reads_away:
                    node.drained = trio.Event()
                    await node.drained.wait()
                node.drained = None
            if fuse_ino is not None:
                self.inodes.alias(new_ino, fuse_ino)  # lookups meanwhile find the same inode
            try:
                result = await trio.to_thread.run_sync(switch)
            except BaseException:
                if fuse_ino is not None and not self._leads_to(first, new_ino):
                    self.inodes.unalias(new_ino, fuse_ino)
                raise
            if fuse_ino is not None:
                self.inodes.moved(old_ino, new_ino, fuse_ino)
            if node is not None and node.fds:
                for fd in list(node.fds):
                    h = self._handles.get(fd)
                    flags = h.flags if h is not None else os.O_RDWR | os.O_CLOEXEC
                    successor = self.tree.open(first, flags | os.O_NOFOLLOW)
                    try:
                        os.dup2(successor, fd, inheritable=False)
                    finally:
                        os.close(successor)
                node.cipher = new_cipher
            return True, result

    @staticmethod
    def _swap_done(node: Inode) -> None:
        event, node.swap = node.swap, None
        if event is not None:
            event.set()

    def _leads_to(self, rel: bytes, backing_ino: int) -> bool:
        try:
            return self.tree.lstat(rel).st_ino == backing_ino
        except OSError:
            return False

    # ------------------------------------------------------------------ names

    @_answer_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self.inodes.get(parent_inode)
        if name == b".":
            rel = parent.any_path()
        elif name == b"..":
            rel = parent_of(parent.any_path())
        elif parent_inode == ROOT_INODE and name == _META:
            return self._negative()
        else:
            rel = join(parent.any_path(), name)
        try:
            st = self.tree.lstat(rel)
        except FileNotFoundError:
            return self._negative()
        return self._learn(rel, st)

    @staticmethod
    def _negative() -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0  # a cached "no such entry"
        e.entry_timeout = ENTRY_TIMEOUT
        return e

    async def forget(self, inode_list: Any) -> None:
        try:
            for ino, nlookup in inode_list:
                self.inodes.forget(ino, nlookup)
        except Exception:
            log.exception("forget failed")

    @_answer_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.inodes.get(inode)
        return self._entry(node, self._stat(node))

    @_answer_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.inodes.get(inode)
        fd = self._handle(fh).fd if fh is not None else node.any_fd()
        if fd is not None and self._keeps_mtime(node, fields):
            # the kernel handing back the mtime it stamped at write(2) (before an
            # fsync, or when it writes the inode back): kept here and given to the
            # backing file at close or at the next fsync of the times, not now. A
            # utime costs the next fdatasync of the file an inode write (70-90 us),
            # and an fdatasync promises the data, not the times.
            node.mtime_ns = attr.st_mtime_ns
            node.written = True
            e = self._entry(node, self._stat(node))
            e.st_mtime_ns = attr.st_mtime_ns
            return e
        if fd is None and not node.paths and node.last_st is not None:
            # the kernel writing back the times of a file deleted since: nothing
            # holds it any more, so there is nothing to change
            return self._entry(node, node.last_st)
        # an open fd works for an unlinked file; a path works for everything else
        rel = node.any_path() if fd is None else b""
        if fields.update_size:
            await self._truncate(node, fd, attr.st_size)
        if fields.update_mode:
            if stat.S_ISLNK(self._stat(node).st_mode):
                raise _fail(errno.EOPNOTSUPP)
            if fd is not None:
                os.fchmod(fd, stat.S_IMODE(attr.st_mode))
            else:
                self.tree.chmod(rel, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                self.tree.chown(rel, uid, gid)
        if fields.update_atime or fields.update_mtime:
            st = self._stat(node)
            times = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                     attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
            if fd is not None:
                os.utime(fd, ns=times)
            else:
                self.tree.utime(rel, times)
            if fields.update_mtime:
                node.mtime_ns = attr.st_mtime_ns
                node.written = False
        return self._entry(node, self._stat(node))

    def _keeps_mtime(self, node: Inode, fields: pyfuse3.SetattrFields) -> bool:
        """Whether a SETATTR changes only the mtime (and ctime) of an open regular
        file whose times the kernel keeps itself (the writeback cache), so that the
        backing file may take the new mtime later (see ``_restore_mtime``)."""
        return (self.enable_writeback_cache and fields.update_mtime
                and not (fields.update_atime or fields.update_size or fields.update_mode
                         or fields.update_uid or fields.update_gid)
                and node.mtime_ns is not None)

    async def _truncate(self, node: Inode, fd: int | None, length: int) -> None:
        if node.lock is None:
            node.lock = trio.Lock()
        async with self.gate.shared(), node.lock:
            self._touched(node)
            if length == 0 and node.paths:
                # a file rewritten from scratch gets a fresh IV: no keystream reuse
                rel = node.any_path()
                cipher = await self._io(self.vault.truncate_to_zero, rel, fd)
                if node.fds:
                    node.cipher = cipher
                return
            cipher = self._cipher(node)
            if fd is not None:
                await self._long(content.truncate, fd, cipher, length)
                return
            tmp = self._open_backing(node, os.O_RDWR | os.O_CLOEXEC)
            try:
                await self._long(content.truncate, tmp, cipher, length)
            finally:
                os.close(tmp)

    @_answer_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.tree.readlink(self.inodes.get(inode).any_path())

    @_answer_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.inodes.get(inode)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = _DirHandle(node)
        return fh

    @_answer_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._dirs.get(fh)
        if d is None:
            raise _fail(errno.EBADF)
        rel_dir = d.inode.any_path()
        if d.names is None or start_id == 0:
            # one listing per pass, so entries are neither skipped nor repeated when
            # the directory changes under a reader
            names = sorted(self.tree.listdir(rel_dir))
            if d.inode.ino == ROOT_INODE:
                names = [n for n in names if n != _META]
            d.names = names
        for index in range(start_id, len(d.names)):
            name = d.names[index]
            rel = join(rel_dir, name)
            try:
                st = self.tree.lstat(rel)
            except FileNotFoundError:
                continue
            inode = self.inodes.remember(rel, st)
            if not pyfuse3.readdir_reply(token, name, self._entry(inode, st), index + 1):
                self.inodes.release_if_unused(inode)
                return
            inode.lookups += 1

    @_answer_errors
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_answer_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        d = self._dirs.get(fh)
        if d is None:
            raise _fail(errno.EBADF)
        await self._io(self.vault.sync)
        await self._io(self.tree.fsync_dir, d.inode.any_path())

    @_answer_errors
    @_changes_names
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        rel = self._child(parent_inode, name)
        self.tree.mkdir(rel, stat.S_IMODE(mode))
        self._give_to_caller(rel, ctx)
        return self._learn(rel, self.tree.lstat(rel), fresh=True)

    @_answer_errors
    @_changes_names
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        rel = self._child(parent_inode, name)
        self.tree.rmdir(rel)
        self.inodes.removed(rel, gone=True)

    @_answer_errors
    @_changes_names
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        rel = self._child(parent_inode, name)
        st = self.tree.lstat(rel)
        if stat.S_ISDIR(st.st_mode):
            raise _fail(errno.EISDIR)
        await self._io(self.vault.unlink, rel)
        self.inodes.removed(rel, gone=st.st_nlink <= 1)

    @_answer_errors
    @_changes_names
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        src = self._child(parent_inode_old, name_old)
        dst = self._child(parent_inode_new, name_new)
        src_st = self.tree.lstat(src)
        try:
            dst_st: os.stat_result | None = self.tree.lstat(dst)
        except FileNotFoundError:
            dst_st = None
        await self._io(self.vault.rename, src, dst, flags)
        src_dir = stat.S_ISDIR(src_st.st_mode)
        if flags & pyfuse3.RENAME_EXCHANGE:
            assert dst_st is not None
            self.inodes.exchanged(src, dst, src_dir, stat.S_ISDIR(dst_st.st_mode))
        elif dst_st is not None and (dst_st.st_ino, dst_st.st_dev) == (src_st.st_ino, src_st.st_dev):
            pass  # two names of one file: rename(2) leaves both in place
        else:
            dst_gone = dst_st is not None and (stat.S_ISDIR(dst_st.st_mode) or dst_st.st_nlink <= 1)
            self.inodes.renamed(src, dst, dst_gone, src_dir)

    @_answer_errors
    @_changes_names
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.inodes.get(inode)
        src = node.any_path()
        dst = self._child(new_parent_inode, new_name)
        await self._io(self.vault.link, src, dst)
        return self._learn(dst, self.tree.lstat(dst))

    @_answer_errors
    @_changes_names
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        rel = self._child(parent_inode, name)
        self.tree.symlink(target, rel)
        self._give_to_caller(rel, ctx)
        return self._learn(rel, self.tree.lstat(rel), fresh=True)

    @_answer_errors
    @_changes_names
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        rel = self._child(parent_inode, name)
        if stat.S_ISREG(mode):
            fd, _ = await self._io(self.vault.create, rel, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC,
                                   stat.S_IMODE(mode))
            try:
                self._give_to_caller(rel, ctx, fd)
            finally:
                os.close(fd)
        else:
            self.tree.mknod(rel, mode, rdev)
            self._give_to_caller(rel, ctx)
        return self._learn(rel, self.tree.lstat(rel), fresh=True)

    # ----------------------------------------------------------------- contents

    @_answer_errors
    @_changes_names
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return await self._open(self.inodes.get(inode), flags)

    async def _open(self, node: Inode, flags: int) -> pyfuse3.FileInfo:
        backing_flags = self._backing_flags(flags)
        fd = self._open_backing(node, backing_flags)
        try:
            cipher = node.cipher if node.fds else self._cipher(node)
            if flags & os.O_TRUNC and node.paths:
                if node.lock is None:
                    node.lock = trio.Lock()
                async with node.lock:
                    self._touched(node)
                    cipher = await self._io(self.vault.truncate_to_zero, node.any_path(), fd)
            elif flags & os.O_ACCMODE != os.O_RDONLY and node.paths:
                self.vault.align_copy(node.any_path(), fd)
            return self._add_handle(node, fd, cipher, backing_flags)
        except BaseException:
            os.close(fd)
            raise

    @_answer_errors
    @_changes_names
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        rel = self._child(parent_inode, name)
        if self.tree.lexists(rel):
            # the kernel's view was stale: open the existing file as open(2) would
            if flags & os.O_EXCL:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
            entry = self._learn(rel, self.tree.lstat(rel))
            return await self._open(self.inodes.get(entry.st_ino), flags), entry
        backing_flags = self._backing_flags(flags)
        try:
            fd, cipher = await self._io(self.vault.create, rel, backing_flags | os.O_EXCL,
                                        stat.S_IMODE(mode))
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # another opener created it first: open it as open(2) would
            entry = self._learn(rel, self.tree.lstat(rel))
            return await self._open(self.inodes.get(entry.st_ino), flags), entry
        try:
            self._give_to_caller(rel, ctx, fd)
            st = os.fstat(fd)
            inode = self.inodes.remember(rel, st, fresh=True)
            info = self._add_handle(inode, fd, cipher, backing_flags)
        except BaseException:
            os.close(fd)
            raise
        inode.lookups += 1
        return info, self._entry(inode, st)

    @_answer_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        inode = h.inode
        if inode.swap is not None:
            await inode.swap.wait()  # its backing file is being replaced
        cipher = inode.cipher
        if size >= THREAD_IO_BYTES and self._in_flight > 1:
            data = await self._read_away(inode, h.fd, cipher, size, off, thread=True)
        else:
            try:
                data = content.read_at(h.fd, cipher, size, off, cached_only=True)
            except BlockingIOError:
                # the disk must be waited for; a lone read waits inline, where a thread
                # hop or a yield would only delay it
                if self._in_flight > 1 or _requests_waiting():
                    data = await self._read_away(inode, h.fd, cipher, size, off, thread=False)
                else:
                    data = content.read_at(h.fd, cipher, size, off)
        if not cipher.is_plaintext:
            self.bytes_decrypted += len(data)
        return data

    async def _read_away(self, inode: Inode, fd: int, cipher: Any, size: int, off: int,
                         thread: bool) -> bytes:
        """A read during which the loop answers other requests: in a worker thread, or
        (``thread`` False) by starting its disk read, then yielding while the requests
        waiting start theirs, so the disk sees them together, and then waiting for it.
        A swap of the backing file waits for these reads (``drained``)."""
        inode.reads_away += 1
        try:
            if thread:
                self.thread_reads += 1
                return await trio.to_thread.run_sync(content.read_at, fd, cipher, size, off)
            content.prefetch(fd, size, off)
            self.prefetched_reads += 1
            for _ in range(PREFETCH_YIELDS):
                await trio.lowlevel.checkpoint()
                if not _requests_waiting():
                    break
            return content.read_at(fd, cipher, size, off)
        finally:
            inode.reads_away -= 1
            if not inode.reads_away and inode.drained is not None:
                inode.drained.set()

    @_answer_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        inode = h.inode
        # one writer per inode: a write past EOF fills the gap, which must not
        # overwrite a concurrent write landing inside that gap
        try:
            inode.lock.acquire_nowait()  # the common case, without a trip through the scheduler
        except trio.WouldBlock:
            await inode.lock.acquire()
        try:
            inode.written = True
            inode.unsynced += len(buf)
            self._touched(inode)
            if len(buf) >= THREAD_IO_BYTES:
                written = await self._long(content.write_at, h.fd, inode.cipher, buf, off)
            else:
                written = content.write_at(h.fd, inode.cipher, buf, off)
            if not inode.cipher.is_plaintext:
                self.bytes_encrypted += written
            return written
        except OSError as exc:
            self._write_failed(inode, "write", exc)
            raise
        finally:
            inode.lock.release()

    @_answer_errors
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        h = self._handle(fh)
        inode = h.inode
        async with inode.lock:
            self._touched(inode)
            await self._long(content.fallocate, h.fd, inode.cipher, mode, offset, length)

    def _restore_mtime(self, inode: Inode, fd: int) -> None:
        """Give the backing file the mtime the kernel shows for it: at close, and
        before an fsync of the times (never before an fdatasync).

        With the writeback cache the kernel stamps mtime at write(2) and sends it only
        when that stamp changed, in a SETATTR that ``setattr`` may keep for later; our
        pwrite of the data, later, moves the backing mtime regardless, so without this
        a remount would show a different mtime."""
        if not (self.enable_writeback_cache and inode.written and inode.mtime_ns is not None):
            return
        inode.written = False
        st = os.fstat(fd)
        if st.st_mtime_ns != inode.mtime_ns:
            os.utime(fd, ns=(st.st_atime_ns, inode.mtime_ns))

    @_answer_errors
    async def flush(self, fh: int) -> None:
        h = self._handle(fh)
        self._restore_mtime(h.inode, h.fd)

    @_answer_errors
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        inode = h.inode
        try:
            self._restore_mtime(inode, fh)
        finally:
            inode.fds.discard(fh)
            if not inode.fds:
                inode.cipher = None  # reread from the dictionary at the next open
            self.inodes.release_if_unused(inode)
            os.close(fh)

    @_answer_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        if not datasync:
            self._restore_mtime(h.inode, h.fd)
        # the file's dictionary entry must be on disk no later than its data (in the
        # vault's "ordered" durability mode nothing else syncs the log)
        await self._io(self.vault.sync)
        inode = h.inode
        sync = os.fdatasync if datasync else os.fsync
        unsynced, inode.unsynced = inode.unsynced, 0
        try:
            if unsynced > FSYNC_INLINE_BYTES:
                await self._long(sync, h.fd)
            else:
                await self._io(sync, h.fd)
        except OSError as exc:
            self._write_failed(inode, "fsync", exc)
            raise

    # ------------------------------------------------------------ the rest

    @_answer_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.tree.fd)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                      "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, field, getattr(sv, field))
        return data

    def _xattr_call(self, inode: int, fn: Callable[..., Any], *args: Any) -> Any:
        if not self.xattrs:
            raise _fail(errno.ENOSYS)
        node = self.inodes.get(inode)
        fd = node.any_fd()
        if fd is not None:
            return fn(fd, *args)  # also reaches an unlinked file that is still open
        with self.tree.proc_path(node.any_path()) as path:
            return fn(path, *args, follow_symlinks=False)

    @_answer_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if name == _ENTRY_COPY and self.xattrs:
            raise _fail(errno.EPERM)
        self.inodes.get(inode).no_capability = False
        self._xattr_call(inode, os.setxattr, name, value)

    @_answer_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == _ENTRY_COPY and self.xattrs:
            raise _fail(errno.ENODATA)
        if name != _CAPABILITY or not self.xattrs:
            return self._xattr_call(inode, os.getxattr, name)
        # asked before every write(2): answer from memory once the file is known to
        # have none (attributes change only through this daemon)
        node = self.inodes.get(inode)
        if node.no_capability:
            raise _fail(errno.ENODATA)
        try:
            return self._xattr_call(inode, os.getxattr, name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                node.no_capability = True
            raise

    @_answer_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = [os.fsencode(n) for n in self._xattr_call(inode, os.listxattr)]
        return [n for n in names if n != _ENTRY_COPY]

    @_answer_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name == _ENTRY_COPY and self.xattrs:
            raise _fail(errno.EPERM)
        self.inodes.get(inode).no_capability = False
        self._xattr_call(inode, os.removexattr, name)

    @_answer_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        st = self._stat(self.inodes.get(inode))
        if mode == os.F_OK:
            return True
        if ctx.uid == 0:
            # root passes read/write checks; execute needs some x bit (or a directory)
            return not mode & os.X_OK or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
        if ctx.uid == st.st_uid:
            bits = (st.st_mode >> 6) & 7
        elif ctx.gid == st.st_gid or st.st_gid in pyfuse3.get_sup_groups(ctx.pid):
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return mode & bits == mode
