"""Re-encryption: files under a data key that is no longer active, and files with no
entry once encryption is on, are rewritten under the active key, one file at a time,
crash-safe, rate-limited and resumable; a key no entry uses any more is retired.

One file, whatever its number of names (hard links share one entry and one inode), is
converted in these steps (each followed by a failpoint):

1. ``start``: a new file in ``.tdefs/tmp/`` gets its entry (the active key and a
   fresh IV) durably, is created, and gets its per-file copy of the entry;
2. ``copy``: the plaintext is copied into it under the new cipher at the set rate,
   holes kept holes; mode, owner, extended attributes and times follow; it is fsynced;
3. the caller makes sure nothing wrote to the file meanwhile (the mount watches its
   writes): a file written during its copy is discarded and retried later, never
   half-converted;
4. ``switch``: the copy is renamed over the file's first name with the vault's
   crash-safe rename; for a file with more names, a plan naming them is persisted
   first, and each other name is then linked to the new inode and renamed over too.

A crash leaves every name reading the same plaintext (under the old inode or the new
one), a leftover copy in ``.tdefs/tmp/`` (removed with its entry by ``recover``), or a
link plan half done (finished by ``recover``). The state lives in
``.tdefs/reencrypt.json``, replaced atomically: running or suspended, the rate, the
totals, when the last byte under each key was rewritten and when it was retired, and
the link plan. Which files are left needs no record: the dictionary says it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from encfs import content, entry_copy
from encfs.cipher import PLAINTEXT
from encfs.disk import disk
from encfs.failpoints import failpoint
from encfs.filedict import FileInfo
from encfs.fsops import atomic_replace
from encfs.vault import META_DIR, Vault

STATE_FILE = "reencrypt.json"
DEFAULT_RATE_MB = 16.0
# a file written during its copy waits at least this long before it is tried again
RETRY_AFTER_S = 5.0
RETRY_MAX_S = 300.0
# totals are written back at most this often (the state file is fsynced each time)
SAVE_EVERY_S = 5.0
_MB = 1_000_000

log = logging.getLogger("tdefs.reencrypt")


class Stopped(Exception):
    """The copy was told to stop (shutdown, or the file changed under it)."""


@dataclass
class LinkPlan:
    """The names still to move to a converted file's new inode (hard links)."""

    first: str  # the name the copy was renamed over (backing-relative, fsdecoded)
    new_ino: int
    old_ino: int
    names: list[str]


@dataclass
class State:
    """What ``.tdefs/reencrypt.json`` holds."""

    running: bool = True
    rate_mb: float = DEFAULT_RATE_MB  # MB/s of copies written; 0: no limit
    done_files: int = 0
    done_bytes: int = 0
    # key id (as a string: JSON) -> unix time the last byte under it was rewritten
    last_rewrite: dict[str, float] = field(default_factory=dict)
    retired: dict[str, float] = field(default_factory=dict)  # key id -> when retired
    links: LinkPlan | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> State:
        links = raw.get("links")
        return cls(running=bool(raw.get("running", True)),
                   rate_mb=float(raw.get("rate_mb", DEFAULT_RATE_MB)),
                   done_files=int(raw.get("done_files", 0)),
                   done_bytes=int(raw.get("done_bytes", 0)),
                   last_rewrite={str(k): float(v) for k, v in raw.get("last_rewrite", {}).items()},
                   retired={str(k): float(v) for k, v in raw.get("retired", {}).items()},
                   links=LinkPlan(**links) if links else None)


@dataclass
class Job:
    """One file to convert: all its names, the entry they share, its inode and size."""

    names: list[bytes]
    info: FileInfo | None  # None: plaintext, no entry
    dev: int
    ino: int
    size: int
    not_before: float = 0.0  # retry time after it was written during a copy
    tries: int = 0  # copies thrown away because it was written meanwhile

    @property
    def key(self) -> str:
        """The bucket status counts it in: a key id, or "plaintext"."""
        return "plaintext" if self.info is None else str(self.info.key_id)


@dataclass
class Copy:
    """A finished copy of ``job`` in ``.tdefs/tmp/``, not yet switched."""

    job: Job
    tmp: bytes
    info: FileInfo | None
    new_ino: int
    written: int


def put_off(job: Job) -> None:
    """The file was written during its copy: try again later, later each time (a log
    being appended to is copied again only when it rests)."""
    job.tries += 1
    job.not_before = time.monotonic() + min(RETRY_AFTER_S * 2 ** (job.tries - 1), RETRY_MAX_S)


class Pacer:
    """Holds copies to the rate, and pauses them while suspended. Thread-safe: the
    copy runs in a worker thread, the commands come from the daemon."""

    def __init__(self, rate_mb: float, running: bool) -> None:
        self._cond = threading.Condition()
        self._rate = rate_mb * _MB
        self._running = running
        self._stopping = False
        self._next = time.monotonic()

    def set(self, *, rate_mb: float | None = None, running: bool | None = None) -> None:
        with self._cond:
            if rate_mb is not None:
                self._rate = rate_mb * _MB
                self._next = time.monotonic()
            if running is not None:
                self._running = running
            self._cond.notify_all()

    def stop(self) -> None:
        """Every copy waiting here raises Stopped (daemon shutdown)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def __call__(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more may be written."""
        with self._cond:
            while True:
                if self._stopping:
                    raise Stopped("stopping")
                if not self._running:
                    self._cond.wait()
                    continue
                if self._rate <= 0:
                    return
                now = time.monotonic()
                # no credit saved up from idle time beyond a tenth of a second
                start = max(self._next, now - 0.1)
                if start <= now:
                    self._next = start + nbytes / self._rate
                    return
                self._cond.wait(start - now)


class Reencryptor:
    """Re-encryption of one open vault. The daemon drives it; see the module doc."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self.path = vault.root / META_DIR / STATE_FILE
        self.state = self._load()
        self.pacer = Pacer(self.state.rate_mb, self.state.running)
        self._lock = threading.Lock()
        self._saved = 0.0

    # -- state ------------------------------------------------------------------------

    def _load(self) -> State:
        try:
            return State.from_json(json.loads(self.path.read_bytes()))
        except FileNotFoundError:
            # until `tdefs reencrypt rate` says otherwise, vault.json's option
            return State(rate_mb=float(self.vault.options.get("reencrypt_rate_mb",
                                                              DEFAULT_RATE_MB)))
        except (ValueError, TypeError, KeyError) as exc:
            # informational totals and settings: a damaged file costs them, not data
            # (a link plan lost here is found again: the names still on the old inode
            # keep their entries and are converted on their own)
            log.warning("%s is damaged (%s); starting from the defaults", self.path, exc)
            return State()

    def save(self) -> None:
        with self._lock:
            data = json.dumps(asdict(self.state), indent=1, sort_keys=True).encode()
            atomic_replace(self.path, data, "reencrypt.state")
            self._saved = time.monotonic()

    def _save_soon(self) -> None:
        if time.monotonic() - self._saved >= SAVE_EVERY_S:
            self.save()

    def set_running(self, running: bool) -> None:
        self.state.running = running
        self.pacer.set(running=running)
        self.save()

    def set_rate(self, rate_mb: float) -> None:
        if rate_mb < 0:
            raise ValueError("the rate must be >= 0 MB/s (0: no limit)")
        self.state.rate_mb = rate_mb
        self.pacer.set(rate_mb=rate_mb)
        self.save()

    # -- what is left ------------------------------------------------------------------

    def target(self) -> FileInfo | None:
        """A fresh entry under the active key, or None when new files are plaintext."""
        return self.vault.new_info()

    def pending(self) -> list[Job]:
        """Every file not under the active key, one job per inode, by first name. Walks
        the tree for files without an entry when encryption is on."""
        vault = self.vault
        active = vault.keys.active_id
        jobs: dict[tuple[int, int], Job] = {}

        def add(rel: bytes, info: FileInfo | None) -> None:
            try:
                st = vault.tree.lstat(rel)
            except (FileNotFoundError, NotADirectoryError):
                return
            if not stat.S_ISREG(st.st_mode):
                return
            job = jobs.get((st.st_dev, st.st_ino))
            if job is None:
                jobs[(st.st_dev, st.st_ino)] = Job([rel], info, st.st_dev, st.st_ino, st.st_size)
            else:
                job.names.append(rel)

        for rel, info in vault.files.items():
            if rel.startswith(META_DIR.encode() + b"/"):
                continue
            if info.method == "plaintext" or info.key_id != active:
                add(rel, info if info.method != "plaintext" else None)
        if active is not None:
            for rel in vault.tree.walk_files(skip=vault.metadata_names()):
                if vault.files.get(rel) is None:
                    add(rel, None)
        for job in jobs.values():
            job.names.sort()
        return sorted(jobs.values(), key=lambda j: j.names[0])

    # -- one file ----------------------------------------------------------------------

    def copy(self, job: Job, stop: Callable[[], bool] = lambda: False) -> Copy:
        """Steps 1 and 2: a durable new copy of ``job`` under the active key. Raises
        Stopped when ``stop()`` turns true, FileNotFoundError when the file is gone;
        the half-made copy is removed either way."""
        vault = self.vault
        first = job.names[0]
        src = vault.tree.open(first, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(src)
            if (st.st_dev, st.st_ino) != (job.dev, job.ino):
                raise FileNotFoundError(errno.ENOENT, "replaced since it was planned", first)
            info = vault.files.get(first)
            if info != job.info:
                raise Stopped("its entry changed since it was planned")
            new = self.target()
            tmp, dst = vault.create_internal(new)
            try:
                failpoint("reencrypt.after-start")
                src_cipher = PLAINTEXT if info is None else vault.cipher_of(info)
                dst_cipher = PLAINTEXT if new is None else vault.cipher_of(new)

                def pace(n: int) -> None:
                    if stop():
                        raise Stopped("stopped")
                    self.pacer(n)
                    failpoint("reencrypt.mid-copy")

                written = content.copy_reencrypted(src, src_cipher, dst, dst_cipher,
                                                   st.st_size, pace)
                _copy_metadata(src, dst, st)
                disk.fsync(dst)
                new_ino = os.fstat(dst).st_ino
            except BaseException:
                os.close(dst)
                vault.remove_internal(tmp)
                raise
            os.close(dst)
        finally:
            os.close(src)
        failpoint("reencrypt.after-copy")
        return Copy(job, tmp, new, new_ino, written)

    def discard(self, done: Copy) -> None:
        """Step 3 said no: drop the copy; the file is tried again later."""
        self.vault.remove_internal(done.tmp)
        put_off(done.job)

    def still_current(self, job: Job) -> bool:
        """Do all the job's names still lead to its inode with its entry?"""
        vault = self.vault
        for rel in job.names:
            try:
                st = vault.tree.lstat(rel)
            except (FileNotFoundError, NotADirectoryError):
                return False
            if (st.st_dev, st.st_ino) != (job.dev, job.ino) or vault.files.get(rel) != job.info:
                return False
        return True

    def switch(self, done: Copy) -> list[int]:
        """Step 4: the copy takes the place of the file under all its names. Returns
        the data keys retired because nothing uses them any more."""
        job = done.job
        first, rest = job.names[0], job.names[1:]
        if rest:
            self.state.links = LinkPlan(os.fsdecode(first), done.new_ino, job.ino,
                                        [os.fsdecode(n) for n in rest])
            self.save()  # the plan is durable before the first name moves
        self.vault.replace_with_internal(done.tmp, first)
        failpoint("reencrypt.after-first-name")
        if rest:
            self._finish_links()
        failpoint("reencrypt.after-switch")
        return self._account(job, done.written)

    def _finish_links(self) -> None:
        """Move the planned names still on the old inode to the new one."""
        plan = self.state.links
        if plan is None:
            return
        vault = self.vault
        first = os.fsencode(plan.first)
        try:
            moved = vault.tree.lstat(first).st_ino == plan.new_ino
        except (FileNotFoundError, NotADirectoryError):
            moved = False
        if moved:
            for name in plan.names:
                rel = os.fsencode(name)
                try:
                    if vault.tree.lstat(rel).st_ino != plan.old_ino:
                        continue  # moved already, or replaced through the mount since
                except (FileNotFoundError, NotADirectoryError):
                    continue
                tmp = vault.link_internal(first)
                vault.replace_with_internal(tmp, rel)
                failpoint("reencrypt.mid-links")
        self.state.links = None
        self.save()

    def _account(self, job: Job, written: int) -> list[int]:
        now = time.time()
        self.state.done_files += 1
        self.state.done_bytes += written
        self.state.last_rewrite[job.key] = now
        retired = self.vault.retire_unused_keys()
        for key_id in retired:
            self.state.retired[str(key_id)] = now
        if retired:
            self.save()
        else:
            self._save_soon()
        return retired

    # -- after a crash -----------------------------------------------------------------

    def recover(self) -> None:
        """On open, after the vault's own recovery: finish a link plan, then remove
        copies a crash left in .tdefs/tmp/ with their entries."""
        if self.state.links is not None:
            self._finish_links()
        self.vault.remove_leftover_internals()


def _copy_metadata(src: int, dst: int, st: os.stat_result) -> None:
    """What the new inode must keep of the old one: mode, owner, extended attributes
    (but the per-file copy of the entry, which is its own), and times."""
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    try:
        os.fchown(dst, st.st_uid, st.st_gid)
    except PermissionError:
        pass  # a daemon that is not root keeps its own uid, as any copy would
    try:
        names = os.listxattr(src)
    except OSError:
        names = []
    for name in names:
        if name.encode() == entry_copy.XATTR:
            continue
        try:
            disk.setxattr(dst, name, os.getxattr(src, name))
        except OSError:
            pass  # a namespace this user may not write (trusted.*): as cp -a does
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))

