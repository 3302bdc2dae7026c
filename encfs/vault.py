"""A vault: a backing directory whose file contents are encrypted, plus its metadata.

This is the only code that changes both the key dictionary and the tree, and it does
so in the crash-safe orders of DESIGN.md ("Operation order"):

- create: durable PUT(path), then create the file;
- unlink: remove the file; its DEL is written only once the removal is known durable
  (a later fsync of its directory: by a rename there, a flush of deferred deletes,
  close, or before anything else may appear under that name);
- rename (files, directories, RENAME_EXCHANGE, RENAME_NOREPLACE): a durable intent
  carrying the whole after-state (every entry under a directory, in one record), the
  rename, a directory fsync, then COMMIT (written, synced by whichever sync comes
  next). A crash before COMMIT is on disk is resolved on open by looking at the tree
  (``filedict.Pending.happened``), so every path reads as it was before the rename or
  as it is after it, including "rename tmp over CURRENT";
- link: durable PUT(dst) = info(src), then link;
- truncate_to_zero: truncate and fsync (when it had bytes), then a fresh-IV PUT, so
  keystream is never reused for a rewritten file;
- a rename over an existing name first makes src's own creation durable (an fsync of
  its directory): recovery reads a missing src as a rename that happened.

Invariants (DESIGN.md): an encrypted file always has its entry; an entry without a
regular file is stale, ignored, and dropped on open (recovery) or when met; no crash
leaves a file unreadable; a data key is never dropped while an entry uses it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encfs import entry_copy
from encfs.backing import BackingTree
from encfs.cipher import DEFAULT_METHOD, IV_SIZE, PLAINTEXT, FileCipher, check_method
from encfs.disk import disk
from encfs.errors import VaultError
from encfs.failpoints import failpoint
from encfs.filedict import (
    RULE_SRC_GONE,
    RULE_SRC_REPLACED,
    Abort,
    Commit,
    Del,
    FileDictionary,
    FileInfo,
    Op,
    Put,
)
from encfs.fsops import RENAME_EXCHANGE, RENAME_NOREPLACE, fsync_dir, syncfs, write_all
from encfs.keystore import KeyStore
from encfs.masterkey import MasterKeySource

META_DIR = ".tdefs"
INIT_DIR = ".tdefs.init"  # where init builds the metadata before renaming it into place
VAULT_JSON = "vault.json"
KEYS_DICT = "keys.dict"
FILES_DICT = "files.dict"
INTERNAL_DIR = META_DIR.encode() + b"/tmp"  # the vault's own files: re-encryption's copies
FORMAT_VERSION = 1
MAC_KEY_LABEL = b"tdefs files.dict mac v1"
DEFAULT_OPTIONS: dict[str, Any] = {"rotation_period_days": 7, "reencrypt_rate_mb": 16,
                                   "durability": "strict"}
# "strict": every ordering step is an fsync, so invariants 1-3 hold after a power cut
# on any POSIX filesystem. "ordered": no fsync between the steps, only the order in
# which they are written. A process crash is handled the same in both (written records
# survive it); the log is made durable by vault.sync() (the mount calls it before every
# fsync and fsyncdir) and close(), each after an fsync of the directories whose renames
# and unlinks the log records since the last one. After a power cut "ordered" keeps the
# invariants only up to the last sync: no filesystem promises to persist an append to
# the log before a later change to the tree (ext4 allocates appended blocks at
# writeback). Re-encryption's renames and recovery keep the strict orders in both
# modes (tests/unit/test_encfs_powerloss.py checks both modes at every power cut).
DURABILITY_MODES = ("strict", "ordered")
_CIPHER_CACHE_MAX = 1 << 16
_STALE_PER_RECORD = 4096
# unlinks whose DEL waits for a directory fsync; past this many they are flushed
DEFERRED_DELETES_MAX = 1024
# strict file renames applied but not yet committed (their COMMIT waits for a batched
# fsync of their directories); past this many they are settled at once
UNSETTLED_RENAMES_MAX = 1024


@dataclass
class RecoveryReport:
    """What opening the vault found and fixed (or, read-only, would fix)."""

    committed: list[bytes] = field(default_factory=list)  # intents whose rename had happened
    aborted: list[bytes] = field(default_factory=list)  # intents whose rename had not
    stale: list[bytes] = field(default_factory=list)  # entries without a regular file
    dropped_tail: int = 0  # bytes of torn last record cut off files.dict
    new_dictionary: bool = False  # files.dict was missing; repair started an empty one


def _check_rel(rel: bytes) -> bytes:
    if not isinstance(rel, bytes):
        raise TypeError("vault paths are bytes")
    if not rel or rel.startswith(b"/") or rel.endswith(b"/"):
        raise ValueError(f"not a backing-relative path: {rel!r}")
    parts = rel.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        raise ValueError(f"not a normalised backing-relative path: {rel!r}")
    if parts[0] in (META_DIR.encode(), INIT_DIR.encode()):
        raise PermissionError(errno.EPERM, "the vault's metadata is not accessible", rel.decode(errors="replace"))
    return rel


def _parent(rel: bytes) -> bytes:
    return rel.rpartition(b"/")[0]


def _moved(rel: bytes, src: bytes, dst: bytes, exchange: bool) -> bytes:
    """Where ``rel`` is after renaming ``src`` to ``dst`` (a path below a replaced
    ``dst`` is gone: its nearest remaining ancestor, dst's parent)."""
    if rel == src or rel.startswith(src + b"/"):
        return dst + rel[len(src):]
    if rel == dst or rel.startswith(dst + b"/"):
        return src + rel[len(dst):] if exchange else _parent(dst)
    return rel


class _ClassOrInstance:
    """A method that is ``class_func`` on the class and ``instance_func`` on instances."""

    def __init__(self, class_func: Any, instance_func: Any) -> None:
        self._class_func = class_func
        self._instance_func = instance_func
        self.__doc__ = instance_func.__doc__

    def __get__(self, obj: object, owner: type) -> Any:
        if obj is None:
            return self._class_func.__get__(None, owner)
        return self._instance_func.__get__(obj, owner)


class Vault:
    """An open vault. Thread-safe; one process at a time (an exclusive flock)."""

    def __init__(self, root: Path, lock_fd: int, config: dict[str, Any], keys: KeyStore,
                 files: FileDictionary) -> None:
        self.root = root
        self.tree = BackingTree(os.fsencode(root))
        self._lock_fd = lock_fd
        self.config = config
        self.options: dict[str, Any] = config.get("options", {})
        self.keys = keys
        self.files = files
        self.recovery = RecoveryReport()
        # each encrypted file's own copy of its entry, where the backing filesystem
        # keeps user extended attributes (see encfs/entry_copy.py)
        self.copies = entry_copy.EntryCopies(keys.derive(entry_copy.MAC_LABEL),
                                             entry_copy.supported(root / META_DIR))
        self._strict = self.options.get("durability", "strict") == "strict"
        # "ordered": directories holding renames and unlinks whose COMMIT or DEL is
        # written but whose directory is not yet fsynced; sync() fsyncs them before the
        # log, so that a durable record never says a tree change happened that a power
        # cut could still undo
        self._unsynced_dirs: set[bytes] = set()
        keys.usage = files.count_by_key
        self._ciphers: dict[FileInfo, FileCipher] = {}
        # paths (and directory prefixes) inside an unfinished rename or truncate:
        # cipher_for waits for them so it never returns a half-renamed answer
        self._busy: dict[bytes, int] = {}
        self._busy_cond = threading.Condition()

    # -- lifecycle ------------------------------------------------------------------

    @classmethod
    def create_vault(cls, backing: str | Path, source: MasterKeySource,
                     method: str = DEFAULT_METHOD, durability: str = "strict") -> Vault:
        """Make a vault in ``backing`` (created if missing; existing files stay
        plaintext). Refuses a non-empty ``.tdefs/``. A crash leaves no half vault."""
        check_method(method)
        if durability not in DURABILITY_MODES:
            raise VaultError(f"unknown durability {durability!r} (choose from {', '.join(DURABILITY_MODES)})")
        source.check()
        root = Path(os.path.abspath(backing))
        try:
            root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise VaultError(f"{root} exists and is not a directory") from None
        if not root.is_dir():
            raise VaultError(f"{root} is not a directory")
        meta = root / META_DIR
        if meta.is_symlink() or (meta.exists() and not meta.is_dir()):
            raise VaultError(f"{meta} exists and is not a directory")
        if meta.is_dir() and any(meta.iterdir()):
            raise VaultError(f"{root} already holds a vault ({meta} is not empty)")
        staging = root / INIT_DIR
        if staging.exists():
            shutil.rmtree(staging)  # left by an init that crashed before publishing
        disk.mkdir(staging, 0o700)
        try:
            cls._write_metadata(staging, root, source, method, durability)
            fsync_dir(staging)
            failpoint("init.before-publish")
            disk.rename(staging, meta)  # replaces an empty .tdefs/ too
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(root)
        return cls.open(root, source)

    @staticmethod
    def _write_metadata(staging: Path, root: Path, source: MasterKeySource, method: str,
                        durability: str) -> None:
        keys = KeyStore.create(staging / KEYS_DICT, source, method, vault=str(root))
        FileDictionary.create(staging / FILES_DICT, keys.derive(MAC_KEY_LABEL))
        config = {
            "format": FORMAT_VERSION,
            "options": {**DEFAULT_OPTIONS, "durability": durability},
            "created": int(time.time()),
        }
        fd = disk.open(staging / VAULT_JSON, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
            disk.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def open(cls, backing: str | Path, source: MasterKeySource, *, mode: str = "normal",
             **tuning: int) -> Vault:
        """Open a vault and recover it. ``mode``: "normal"; "check" (read-only: nothing
        is written, ``recovery`` says what would be fixed); "repair" (like normal, but a
        damaged files.dict keeps every record that still verifies: see ``files.salvage``).

        A missing files.dict is refused, except by "repair", which starts an empty one
        (``recovery.new_dictionary``): fsck then rebuilds the entries from the files'
        own copies.

        Raises WrongMasterKey (naming the vault) before touching any file, VaultError,
        Corruption."""
        if mode not in ("normal", "check", "repair"):
            raise ValueError(f"unknown open mode {mode!r}")
        root = Path(os.path.abspath(backing))
        meta = root / META_DIR
        try:
            raw = (meta / VAULT_JSON).read_bytes()
        except FileNotFoundError:
            raise VaultError(f"{root} is not a tdefs vault (no {META_DIR}/{VAULT_JSON}; run tdefs init)") from None
        except NotADirectoryError:
            raise VaultError(f"{root} is not a tdefs vault") from None
        try:
            config = json.loads(raw)
            if config["format"] != FORMAT_VERSION:
                raise VaultError(f"{meta / VAULT_JSON}: format {config['format']} is not supported")
            if "method" in config:  # written by older versions; keys.dict says now
                check_method(config["method"])
            durability = config.get("options", {}).get("durability", "strict")
            if durability not in DURABILITY_MODES:
                raise ValueError(f"unknown durability {durability!r} (choose from"
                                 f" {', '.join(DURABILITY_MODES)})")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VaultError(f"{meta / VAULT_JSON} is malformed ({exc})") from None
        lock_fd = os.open(meta, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise VaultError(f"vault {root} is in use by another process (is it mounted?)") from None
            keys = KeyStore.open(meta / KEYS_DICT, source, vault=str(root))
            if config.get("method") == "plaintext" and keys.active_id is not None:
                # a vault.json of an older version said "plaintext" while keys.dict had
                # an active key: keys.dict says it alone from now on
                if mode == "check":
                    keys.active_id = None
                else:
                    keys.switch_off()
            rebuilt = False
            if not (meta / FILES_DICT).is_file():
                if mode != "repair":
                    raise VaultError(f"vault {root}: {meta / FILES_DICT} is missing (tdefs fsck"
                                     " --repair starts a new one and rebuilds the entries from"
                                     " the files' own copies)")
                FileDictionary.create(meta / FILES_DICT, keys.derive(MAC_KEY_LABEL))
                fsync_dir(meta)
                rebuilt = True
            files = FileDictionary.open(meta / FILES_DICT, keys.derive(MAC_KEY_LABEL),
                                        salvage=mode == "repair", read_only=mode == "check",
                                        **tuning)
        except BaseException:
            os.close(lock_fd)
            raise
        vault = cls(root, lock_fd, config, keys, files)
        vault.recovery.new_dictionary = rebuilt
        try:
            vault._recover(write=mode != "check")
        except BaseException:
            vault.close()
            raise
        return vault

    def sync(self) -> None:
        """Make every dictionary record written so far durable (call before fsyncing
        a backing file: in "ordered" mode nothing else syncs the log). Renames still
        waiting for their COMMIT are settled first, and in "ordered" mode the
        directories of the renames and unlinks those records describe are fsynced
        before the log is."""
        if self.files.applied_count():
            self.flush_deletes()
        self._sync_dirs()
        self.files.sync()

    def _sync_dirs(self) -> None:
        """"ordered": fsync the directories whose renames and unlinks the log now
        records, before the log is synced."""
        while self._unsynced_dirs:
            self._fsync_nearest_dir(self._unsynced_dirs.pop())

    def close(self) -> None:
        """Make every record durable and release the vault."""
        if self._lock_fd < 0:
            return
        try:
            if self.files.deferred_count() or self.files.applied_count():
                self.flush_deletes()
            self._sync_dirs()
            self.files.close()
        finally:
            self.tree.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recover(self, write: bool) -> None:
        """Resolve pending intents by the tree, then drop stale entries."""
        report = self.recovery
        report.dropped_tail = self.files.dropped_tail
        pending = self.files.pending_intents()
        resolutions: list[Op] = []
        for p in pending:
            if p.happened(self.tree.lstat):
                resolutions.append(Commit(p.txid))
                report.committed.append(p.src)
            else:
                resolutions.append(Abort(p.txid))
                report.aborted.append(p.src)
        if pending:
            # what the entries will be once the intents are resolved
            entries = dict(self.files.items())
            for op, p in zip(resolutions, pending, strict=True):
                if isinstance(op, Commit):
                    for o in p.ops:
                        if isinstance(o, Put):
                            entries[o.path] = o.info
                        elif isinstance(o, Del):
                            entries.pop(o.path, None)
            paths = list(entries)
        else:
            paths = self.files.paths()
        report.stale = sorted(p for p in paths if not self._is_regular(p))
        if write:
            if report.committed or report.stale:
                # after a process crash the tree may hold renames and unlinks in the
                # page cache only: they must be durable before a COMMIT or DEL written
                # here says they happened (and any write may reach the disk early)
                syncfs(self.root)
            if resolutions:
                self.files.append(resolutions, sync=False)
            for i in range(0, len(report.stale), _STALE_PER_RECORD):
                self.files.append([Del(p) for p in report.stale[i : i + _STALE_PER_RECORD]],
                                  sync=False)
            self.files.sync()

    # -- lookups --------------------------------------------------------------------

    def _is_regular(self, rel: bytes) -> bool:
        return self.tree.is_regular(rel)

    @property
    def method(self) -> str:
        """The cipher of new files: the active data key's method ("plaintext" when
        there is none). keys.dict is the one source of truth for it."""
        return self.keys.method

    def cipher_of(self, info: FileInfo) -> FileCipher:
        """The cipher an entry describes (cached)."""
        return self._cipher(info)

    def _cipher(self, info: FileInfo) -> FileCipher:
        c = self._ciphers.get(info)
        if c is None:
            if info.method == "plaintext":
                return PLAINTEXT
            c = FileCipher(info.method, self.keys.get(info.key_id).key, info.iv)
            if len(self._ciphers) >= _CIPHER_CACHE_MAX:
                self._ciphers.clear()
            self._ciphers[info] = c
        return c

    def cipher_for(self, rel: bytes) -> FileCipher:
        """The cipher of ``rel``; PLAINTEXT when it has no entry. No I/O."""
        if self._busy:
            self._wait_not_busy(rel)
        info = self.files.get(rel)
        if info is None:
            return PLAINTEXT
        return self._cipher(info)

    def align_copy(self, rel: bytes, fd: int) -> None:
        """Make the per-file copy of ``rel`` (open as ``fd``) say what its entry says.
        Called before a file is first written: a crash between an entry and its copy
        (create, truncation to zero) leaves an empty file whose copy is missing or
        stale, and data must never be written under an entry its copy contradicts."""
        if self.copies.enabled:
            self.copies.agree(fd, self.files.get(rel))

    def _touches_busy(self, rel: bytes) -> bool:
        if rel in self._busy:
            return True
        i = rel.rfind(b"/")
        while i > 0:
            if rel[:i] in self._busy:
                return True
            i = rel.rfind(b"/", 0, i)
        return False

    def _wait_not_busy(self, rel: bytes) -> None:
        with self._busy_cond:
            while self._touches_busy(rel):
                self._busy_cond.wait()

    @contextmanager
    def _busy_paths(self, *paths: bytes) -> Iterator[None]:
        with self._busy_cond:
            for p in paths:
                self._busy[p] = self._busy.get(p, 0) + 1
        try:
            yield
        finally:
            with self._busy_cond:
                for p in paths:
                    n = self._busy[p] - 1
                    if n:
                        self._busy[p] = n
                    else:
                        del self._busy[p]
                self._busy_cond.notify_all()

    def _drop_if_stale(self, rel: bytes) -> None:
        """An operation met ``rel``'s entry but not its file: the entry is stale."""
        if self.files.has_entry(rel) and not self._is_regular(rel):
            self._settle_renames_at(rel)
            self.files.append([Del(rel)], sync=False)

    def _settle_renames_at(self, *paths: bytes) -> None:
        """Before a record touches ``paths``, commit the renames that hold them (see
        rename): the log must never reorder two operations on one name."""
        if self.files.applied_count() and self.files.touches_applied(paths):
            self.flush_deletes()

    def new_info(self) -> FileInfo | None:
        """A new file's entry: the active key and a fresh IV; None when new files are
        plaintext (no active key)."""
        key = self.keys.active
        if key is None:
            return None
        return FileInfo(key.method, key.id, secrets.token_bytes(IV_SIZE))

    # -- crash-ordered operations ----------------------------------------------------

    def create_file(self, rel: bytes, flags: int, mode: int) -> tuple[int, FileCipher]:
        """Create ``rel`` (durable entry first) and open it with ``flags``; returns
        (fd, cipher). An existing file is opened as O_CREAT without O_EXCL would, and
        with O_TRUNC gets a fresh IV (truncate_to_zero)."""
        _check_rel(rel)
        tree = self.tree
        if tree.lexists(rel):
            if flags & os.O_EXCL:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(rel))
            fd = tree.open(rel, (flags | os.O_CREAT) & ~os.O_TRUNC, mode)
            if (flags & os.O_ACCMODE) != os.O_RDONLY:
                try:
                    if flags & os.O_TRUNC:
                        return fd, self.truncate_to_zero(rel, fd)
                    self.align_copy(rel, fd)
                except BaseException:
                    os.close(fd)
                    raise
            return fd, self.cipher_for(rel)
        info = self.new_info()
        if info is None:
            self._settle_renames_at(rel)
            self._clear_name(rel)
            return tree.open(rel, flags | os.O_CREAT, mode), PLAINTEXT
        self._settle_renames_at(rel)
        previous = self.files.get(rel)
        self._settle(rel)
        self.files.append([Put(rel, info)], sync=self._strict)
        failpoint("create.after-new")
        try:
            fd = tree.open(rel, flags | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            # created behind the vault's back since the lstat: give it its entry back
            undo: Op = Put(rel, previous) if previous is not None else Del(rel)
            self.files.append([undo])
            raise
        except BaseException:
            self.files.append([Del(rel)], sync=False)  # the entry would be stale
            raise
        self.copies.write(fd, info)
        return fd, self._cipher(info)

    def unlink(self, rel: bytes) -> None:
        """Remove a non-directory; its entry goes once the removal is durable."""
        _check_rel(rel)
        self._settle_renames_at(rel)
        try:
            self.tree.unlink(rel)
        except FileNotFoundError:
            self._drop_if_stale(rel)
            raise
        failpoint("unlink.after-unlink")
        if self.files.has_entry(rel):
            # a DEL that reached the disk before the unlink would leave ciphertext
            # without its entry after a power cut, and a directory fsync per unlink
            # is costly: the DEL waits until the unlink is known durable
            self.files.defer_delete(rel)
            if self.files.deferred_count() >= DEFERRED_DELETES_MAX:
                self.flush_deletes()

    def flush_deletes(self) -> None:
        """Make the deferred unlinks and the renames waiting for their COMMIT durable
        (one fsync per directory), then write their DELs and COMMITs in one record."""
        paths = self.files.deferred_paths()
        txids, renamed = self.files.applied_intents()
        dirs = {_parent(p) for p in (*paths, *renamed)}
        if self._strict:
            for d in dirs:
                self._fsync_nearest_dir(d)
        else:
            self._unsynced_dirs |= dirs
        failpoint("deletes.after-fsync")
        self.files.append_deferred(paths, extra=[Commit(txid) for txid in txids])

    def _settle(self, rel: bytes) -> None:
        """Before a file may appear at ``rel`` again, make its deferred unlink durable."""
        if self.files.is_deferred(rel):
            if self._strict:
                self._fsync_nearest_dir(_parent(rel))
            else:
                self._unsynced_dirs.add(_parent(rel))

    def _clear_name(self, rel: bytes) -> None:
        """Before a file without an entry (plaintext) appears at ``rel``, make sure no
        entry, stale or deferred, can apply to it, even after a power cut."""
        if self.files.has_entry(rel) or self.files.is_deferred(rel):
            self._settle(rel)
            self.files.append([Del(rel)], sync=self._strict)

    def _fsync_nearest_dir(self, rel_dir: bytes) -> None:
        """fsync ``rel_dir``, or if it is gone, the nearest ancestor still there
        (whose fsync makes the removal of what was below durable)."""
        while True:
            try:
                self.tree.fsync_dir(rel_dir)
                return
            except (FileNotFoundError, NotADirectoryError):
                if not rel_dir:
                    raise
                rel_dir = _parent(rel_dir)

    def link(self, src: bytes, dst: bytes) -> None:
        """Hard link ``dst`` to ``src``; the new name gets src's entry first."""
        _check_rel(src)
        _check_rel(dst)
        self._link(src, dst)

    def _link(self, src: bytes, dst: bytes) -> None:
        self._settle_renames_at(src, dst)
        tree = self.tree
        info = self.files.get(src)
        if info is not None and not self._is_regular(src):
            self._drop_if_stale(src)  # then fail (or link a non-file) as link(2) would
            info = None
        if info is None:
            if not tree.lexists(dst):
                self._clear_name(dst)
            tree.link(src, dst)
            return
        if tree.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst))
        self._settle(dst)
        self.files.append([Put(dst, info)], sync=self._strict)
        failpoint("link.after-new")
        try:
            tree.link(src, dst)
        except BaseException:
            self.files.append([Del(dst)], sync=False)
            raise

    def truncate_to_zero(self, rel: bytes, fd: int | None = None) -> FileCipher:
        """Truncate ``rel`` to 0 (through ``fd`` if given), then give it a fresh IV.
        Returns the cipher to use from now on. With st_nlink > 1 the entry (and IV)
        is kept, since the other names share it."""
        _check_rel(rel)
        self._settle_renames_at(rel)
        with self._busy_paths(rel):
            own = fd is None
            if own:
                try:
                    fd = self.tree.open(rel, os.O_WRONLY)
                except FileNotFoundError:
                    self._drop_if_stale(rel)
                    raise
            try:
                had_bytes = os.fstat(fd).st_size > 0
                disk.ftruncate(fd, 0)
                if had_bytes:
                    # the new IV must never be durable while old bytes are: in "ordered"
                    # mode too, as the next sync of the log makes it durable
                    disk.fsync(fd)
                nlink = os.fstat(fd).st_nlink
                failpoint("truncate.after-truncate")
                info = self.files.get(rel)
                if nlink > 1:
                    return PLAINTEXT if info is None else self._cipher(info)
                if info is not None and self.files.deferred_shares(info):
                    # another name of this file was unlinked, not durably: a power cut
                    # would bring it back on the old IV over the new bytes
                    self.flush_deletes()
                new = self.new_info()
                if new is None:
                    if info is not None:
                        self.files.append([Del(rel)], sync=self._strict)
                        self.copies.write(fd, None)
                    return PLAINTEXT
                self.files.append([Put(rel, new)], sync=self._strict)
                self.copies.write(fd, new)
                return self._cipher(new)
            finally:
                if own:
                    os.close(fd)

    def rename(self, src: bytes, dst: bytes, flags: int = 0) -> None:
        """rename(2) / renameat2(2) of files or directories, crash-safe."""
        _check_rel(src)
        _check_rel(dst)
        self._rename(src, dst, flags)

    def _rename(self, src: bytes, dst: bytes, flags: int, durable: bool | None = None) -> None:
        """``durable``: the intent is synced before the rename even in "ordered" mode
        (re-encryption's renames, which no application asked for or syncs after)."""
        durable = self._strict if durable is None else durable
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        tree = self.tree
        try:
            st_src = tree.lstat(src)
            try:
                st_dst: os.stat_result | None = tree.lstat(dst)
            except FileNotFoundError:
                st_dst = None
        except OSError:
            self._drop_if_stale(src)
            # the rename cannot work; let the kernel say why, as rename(2) would
            tree.rename(src, dst, flags)
            raise
        exchange = bool(flags & RENAME_EXCHANGE)
        if exchange and st_dst is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fsdecode(dst))
        if flags & RENAME_NOREPLACE and st_dst is not None:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst))
        if (src == dst or (st_dst is not None and st_dst.st_ino == st_src.st_ino
                           and st_dst.st_dev == st_src.st_dev and not exchange)):
            # same file under both names: rename(2) does nothing, and neither do we
            tree.rename(src, dst, flags)
            return
        src_is_dir = stat.S_ISDIR(st_src.st_mode)
        dst_is_dir = st_dst is not None and stat.S_ISDIR(st_dst.st_mode)
        if src_is_dir or dst_is_dir:
            if self.files.applied_count():
                self.flush_deletes()  # a subtree may hold any of their paths
        else:
            self._settle_renames_at(src, dst)
        ops = self._rename_ops(src, src_is_dir, dst, dst_is_dir, exchange)
        if not ops:
            tree.rename(src, dst, flags)
            return
        rule = RULE_SRC_REPLACED if exchange else RULE_SRC_GONE
        # unlinks deferred inside a directory being moved (or replaced) must be durable
        # first: the fsyncs below cover only the parents of src and dst
        inner = {_parent(p) for p in (*self.files.deferred_at_or_under(src),
                                      *self.files.deferred_at_or_under(dst))} - {_parent(src), _parent(dst)}
        if self._strict:
            for d in inner:
                self._fsync_nearest_dir(d)
        if durable and st_dst is not None:
            # recovery takes a missing src for a rename that happened: src's own
            # creation (the tmp file of "write tmp, rename over CURRENT") must be
            # durable before the intent, or a power cut that undid both would give
            # dst src's entry over dst's old bytes
            self._fsync_nearest_dir(_parent(src))
        if durable and not self._strict:
            self._sync_dirs()  # the log is about to be synced: what it records first
        txid = self.files.begin(rule, src, st_src.st_ino, ops, sync=durable)
        failpoint("rename.after-intent")
        # until the entries say what the tree says, lookups of these names wait from
        # the rename on (the intent, already durable, covers a crash from here)
        with self._busy_paths(src, dst):
            try:
                tree.rename(src, dst, flags)
            except BaseException:
                self.files.append([Abort(txid)], sync=False)
                raise
            failpoint("rename.after-rename")
            if not self._strict:
                # the next sync fsyncs those directories under their names from now on
                self._unsynced_dirs.update(_moved(d, src, dst, exchange) for d in inner)
            if self._strict and not (src_is_dir or dst_is_dir):
                # the COMMIT must not be durable before the rename is, which takes a
                # directory fsync: it waits for flush_deletes, which fsyncs every
                # directory concerned once for many renames. Until then the durable
                # intent lets recovery decide by the tree, and no record may touch
                # these names (_settle_renames_at).
                self.files.apply_intent(txid)
            else:
                # the rename must be on disk before a durable COMMIT can say it is; the
                # same fsyncs make earlier unlinks there durable, so their DELs can go too
                parents = {_parent(src), _parent(dst)}
                settled = self.files.deferred_in(parents)
                if durable:
                    for d in parents:
                        tree.fsync_dir(d)
                else:
                    self._unsynced_dirs |= parents
                # not synced: until a later sync carries it, a crash leaves the intent,
                # which recovery resolves by the tree to the same answer
                self.files.append_deferred(settled, extra=[Commit(txid)])
        failpoint("rename.after-commit")
        if self.files.applied_count() >= UNSETTLED_RENAMES_MAX:
            self.flush_deletes()

    def _rename_ops(self, src: bytes, src_is_dir: bool, dst: bytes, dst_is_dir: bool,
                    exchange: bool) -> list[Op]:
        """The dictionary's after-state of a rename, as DELs then PUTs."""
        files = self.files

        def subtree(top: bytes, is_dir: bool) -> dict[bytes, FileInfo]:
            found = {}
            for p in [top, *files.paths_under(top)] if is_dir else [top]:
                info = files.get(p)
                if info is not None:
                    found[p] = info
            return found

        a = subtree(src, src_is_dir)
        # a directory moving to a free name: stale entries below that name would
        # otherwise apply to the files arriving there
        b = subtree(dst, dst_is_dir or src_is_dir)
        # names whose DEL is deferred: their entries are still in the log
        ghosts = {*files.deferred_at_or_under(src), *files.deferred_at_or_under(dst)}
        dels: list[Op] = [Del(p) for p in sorted({*a, *b, *ghosts})]
        puts: list[Op] = [Put(dst + p[len(src):], i) for p, i in a.items()]
        if exchange:
            puts += [Put(src + p[len(dst):], i) for p, i in b.items()]
        # otherwise dst (a replaced file, an empty directory, or nothing) loses all its
        # entries; when dst does not exist those entries are stale anyway
        return dels + puts

    # -- internal files (re-encryption's copies) ----------------------------------------

    def metadata_names(self) -> set[bytes]:
        """Names at the root of the backing tree that are the vault's, not the user's."""
        return {META_DIR.encode(), INIT_DIR.encode()}

    def create_internal(self, info: FileInfo | None) -> tuple[bytes, int]:
        """A new, empty file in .tdefs/tmp/ with entry ``info`` (durable first, as for
        any create) and its per-file copy; returns its path and a read-write fd.
        Such a file becomes a user's file only through ``replace_with_internal``."""
        self._tmp_dir()
        rel = INTERNAL_DIR + b"/" + secrets.token_hex(8).encode()
        if info is not None:
            self.files.append([Put(rel, info)], sync=self._strict)
        try:
            fd = self.tree.open(rel, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except BaseException:
            if info is not None:
                self.files.append([Del(rel)], sync=False)
            raise
        self.copies.write(fd, info)
        return rel, fd

    def link_internal(self, src: bytes) -> bytes:
        """A new name in .tdefs/tmp/ for the file ``src`` (a hard link, with src's
        entry first); for moving a file's other names to it one by one."""
        _check_rel(src)
        self._tmp_dir()
        rel = INTERNAL_DIR + b"/" + secrets.token_hex(8).encode()
        self._link(src, rel)
        return rel

    def replace_with_internal(self, tmp: bytes, dst: bytes) -> None:
        """Rename the internal file ``tmp`` over the user's file ``dst``, crash-safe:
        afterwards ``dst`` reads through ``tmp``'s entry; a crash leaves it as before
        or as after."""
        if not tmp.startswith(INTERNAL_DIR + b"/"):
            raise ValueError(f"not an internal file: {tmp!r}")
        _check_rel(dst)
        # durable in either mode: the file was at rest, and must read the same after a
        # power cut whatever it interrupts
        self._rename(tmp, dst, 0, durable=True)

    def remove_internal(self, tmp: bytes) -> None:
        """Remove an internal file that was never put in place, and its entry."""
        if not tmp.startswith(INTERNAL_DIR + b"/"):
            raise ValueError(f"not an internal file: {tmp!r}")
        try:
            self.tree.unlink(tmp)
        except FileNotFoundError:
            pass
        if self.files.has_entry(tmp) or self.files.is_deferred(tmp):
            self._settle_renames_at(tmp)
            self.files.append([Del(tmp)], sync=False)

    def remove_leftover_internals(self) -> list[bytes]:
        """Remove what a crash left in .tdefs/tmp/ (copies never put in place)."""
        try:
            names = self.tree.listdir(INTERNAL_DIR)
        except FileNotFoundError:
            return []
        removed = [INTERNAL_DIR + b"/" + n for n in names]
        for rel in removed:
            self.remove_internal(rel)
        return removed

    def _tmp_dir(self) -> None:
        try:
            self.tree.mkdir(INTERNAL_DIR, 0o700)
        except FileExistsError:
            return
        self.tree.fsync_dir(META_DIR.encode())

    # ``Vault.create(backing, source)`` makes a vault; ``vault.create(rel, flags, mode)``
    # creates a file in an open one: one name, told apart by how it is reached
    create = _ClassOrInstance(create_vault, create_file)

    # -- keys ----------------------------------------------------------------------

    def key_usage(self) -> list[dict[str, Any]]:
        """Each data key (id, method, created, active), how many files use it and their
        total size in bytes (a hard-linked file once). Stats every file: on a mount,
        run it in a worker thread."""
        sizes: dict[int, int] = {}
        seen: set[tuple[int, int]] = set()
        for rel, info in self.files.items():  # a snapshot: a mount changes them meanwhile
            try:
                st = self.tree.lstat(rel)
            except (FileNotFoundError, NotADirectoryError):
                continue  # a stale entry: its file is gone
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            sizes[info.key_id] = sizes.get(info.key_id, 0) + st.st_size
        return [{"id": k.id, "method": k.method, "created": k.created, "active": k.active,
                 "files": k.files, "bytes": sizes.get(k.id, 0)} for k in self.keys.list()]

    def rotation_due(self, now: float | None = None) -> bool:
        """Is the active data key older than the vault's rotation period?"""
        days = float(self.options.get("rotation_period_days", 0) or 0)
        active = self.keys.active
        if days <= 0 or active is None:
            return False  # with no active key a rotation would switch encryption on
        now = time.time() if now is None else now
        return now - active.created >= days * 86400

    def rotate_if_due(self, now: float | None = None) -> int | None:
        """Rotate the data key when the rotation period has passed; the new key's id."""
        return self.keys.rotate() if self.rotation_due(now) else None

    # -- key retirement ---------------------------------------------------------------

    def retire_unused_keys(self) -> list[int]:
        """Drop data keys that no entry or pending intent uses (never the active one)."""
        if self.files.deferred_count() or self.files.applied_count():
            # deleted files' entries are still in the log until then, and a rename not
            # yet durable (re-encryption's last one) could be undone onto the old key
            self.flush_deletes()
        if not self._strict:
            self.sync()  # the records that moved files off these keys, and their renames
        return self.keys.retire(list(self.keys.keys), self.files.referenced_keys())
