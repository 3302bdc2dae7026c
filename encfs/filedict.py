"""The key dictionary, ``.tdefs/files.dict``: backing path -> FileInfo(method, key_id, iv).

An append-only log (byte layout in docs/vault-format.md): a header, then records
``[length][length check][payload][MAC]``. Each MAC is HMAC-SHA256 under a key derived
from the vault secret, over the previous record's MAC (the header's for the first
record), the length and the payload, so a changed, dropped, reordered or forged record
breaks the chain. A record holds one or more operations (values of the types
``Put``, ``Del``, ``Begin``, ``Commit``, ``Abort``; ``Op`` is any of them) and is
applied whole:

- PUT(path, info) and DEL(path) change one entry;
- BEGIN(txid, rule, src, src_ino) opens an intent: the record's remaining operations
  are held pending until a later COMMIT(txid) applies them or ABORT(txid) drops them.
  An intent left pending by a crash is resolved by the vault on open, by looking at
  whether the rename it describes happened (see ``Pending.happened``).
  ``apply_intent`` applies an intent in memory before its COMMIT is written (the
  vault batches those COMMITs): until then no other record may touch its paths, so
  that resolving it at the end of a replay gives what applying it in place did.

Invariants: the in-memory state always equals the replay of the records written so
far, with the intents in ``applied`` committed; a record is either wholly in the log or (torn tail, only at the end) dropped on
open and truncated away; ``sync(seq)`` returns only once record ``seq`` is durable,
and concurrent callers share one fdatasync (group commit). When the log holds many
more records than live entries it is rewritten as a snapshot, in a thread of its own
that holds writers up only to splice in what they appended meanwhile (``rewrite``).
Callers read the state through FileDictionary's methods (``get``, ``items``,
``is_deferred``, ...) rather than its dicts.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import hmac
import itertools
import os
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from encfs.disk import disk
from encfs.errors import Corruption
from encfs.failpoints import ARMED, failpoint
from encfs.fsops import fsync_dir, write_all
from encfs.sync_points import sync_point

MAGIC = b"TDEFSFDL"
VERSION = 1
_HEADER_BODY = struct.Struct(">8sHHQ16s")  # magic, version, flags, generation, nonce
HEADER_SIZE = _HEADER_BODY.size + 32  # + HMAC of the header body
_REC_HEAD = struct.Struct(">II")  # payload length, crc32 of the 4 length bytes
MAC_SIZE = 32
MAX_RECORD = 1 << 28
SNAPSHOT_OPS_PER_RECORD = 4096
SNAPSHOT_SYNC_BYTES = 2 << 20  # a rewrite syncs its snapshot this often as it writes it

# operation codes
PUT, DEL, BEGIN, COMMIT, ABORT = 1, 2, 3, 4, 5
# intent resolution rules (see Pending.happened)
RULE_SRC_GONE, RULE_SRC_REPLACED = 1, 2

METHOD_CODES = {"plaintext": 0, "aes-128-ctr": 1, "aes-192-ctr": 2, "aes-256-ctr": 3, "sm4-ctr": 4}
METHOD_NAMES = {v: k for k, v in METHOD_CODES.items()}

_U16 = struct.Struct(">H")
_PUT_TAIL = struct.Struct(">BI16s")  # method code, key id, iv
_BEGIN_HEAD = struct.Struct(">QBQ")  # txid, rule, src inode
_TX = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class FileInfo:
    """How one backing file is encrypted."""

    method: str
    key_id: int
    iv: bytes

    def __repr__(self) -> str:
        return f"FileInfo({self.method!r}, key={self.key_id}, iv={self.iv.hex()})"


@dataclass(frozen=True, slots=True)
class Put:
    """PUT: ``path``'s entry becomes ``info``."""

    path: bytes
    info: FileInfo


@dataclass(frozen=True, slots=True)
class Del:
    """DEL: ``path`` has no entry (if it had one)."""

    path: bytes


@dataclass(frozen=True, slots=True)
class Begin:
    """BEGIN: opens intent ``txid``, the rename of ``src`` (inode ``src_ino``); the
    rest of its record is held until a COMMIT or ABORT of ``txid``."""

    txid: int
    rule: int
    src: bytes
    src_ino: int


@dataclass(frozen=True, slots=True)
class Commit:
    """COMMIT: apply intent ``txid``'s operations, then forget it."""

    txid: int


@dataclass(frozen=True, slots=True)
class Abort:
    """ABORT: forget intent ``txid``."""

    txid: int


Op = Put | Del | Begin | Commit | Abort


@dataclass
class Pending:
    """An intent waiting for its COMMIT or ABORT."""

    txid: int
    rule: int
    src: bytes
    src_ino: int
    ops: list[Op] = field(default_factory=list)

    def happened(self, lstat: Callable[[bytes], os.stat_result]) -> bool:
        """Did the rename this intent describes reach the tree? ``lstat`` looks up a
        backing-relative path in it (``BackingTree.lstat``).

        It did iff ``src`` is no longer the inode it was when the intent was made:
        gone (a plain rename), or another inode (an exchange, where both names exist
        before and after, or a name made anew after a plain rename). The original
        inode lives on under its new name, so its number cannot have been reused.
        The rule (RULE_SRC_GONE or RULE_SRC_REPLACED) records which kind of rename
        it was; the test is the same.
        """
        try:
            st = lstat(self.src)
        except (FileNotFoundError, NotADirectoryError):
            return True
        return st.st_ino != self.src_ino


@dataclass
class DamagedRegion:
    """One stretch of a damaged log that salvage skipped: from the first record that
    failed to verify up to the next record that verifies (or the end of the file)."""

    offset: int  # where the first record that failed starts
    length: int  # bytes skipped
    records: int  # records in those bytes (best effort unless ``counted``)
    counted: bool  # every length field in the region was intact, so ``records`` is exact
    what: str  # why the record at ``offset`` failed
    # paths named by the skipped records, as far as their payloads still decode: best
    # effort, and the names may themselves be damaged (a flipped bit in a path)
    paths: list[bytes]


@dataclass
class SalvageReport:
    """What ``open(..., salvage=True)`` skipped in a damaged log: each damaged region,
    in log order. Every record outside them verified and was replayed.

    ``paths`` is every path the skipped records name where they still decode (best
    effort: they may themselves be damaged, and a record whose payload no longer
    decodes names none). The skipped records' operations are lost: a lost DEL can
    leave a stale entry, a lost PUT a file without one, a lost COMMIT an intent left
    pending. Those consequences are the vault's recovery's and fsck's business (stale
    entries are dropped, pending intents resolved by the tree), not the log's."""

    regions: list[DamagedRegion]
    paths: list[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.paths = sorted({p for r in self.regions for p in r.paths})

    @property
    def offset(self) -> int:
        """Offset of the first damage."""
        return self.regions[0].offset

    @property
    def what(self) -> str:
        """What was wrong at the first damage."""
        return self.regions[0].what

    @property
    def lost_bytes(self) -> int:
        return sum(r.length for r in self.regions)

    @property
    def lost_records(self) -> int:
        """Records skipped, exact when every region is ``counted``."""
        return sum(r.records for r in self.regions)


# -- encoding ------------------------------------------------------------------------


def _path_bytes(path: bytes) -> bytes:
    if len(path) > 0xFFFF:
        raise ValueError("path too long for files.dict")
    return _U16.pack(len(path)) + path


def encode_ops(ops: Iterable[Op]) -> bytes:
    """A record payload holding ``ops``, in order."""
    out = bytearray()
    # isinstance, not match: a class pattern costs several times more per operation
    for op in ops:
        if isinstance(op, Put):
            info = op.info
            out.append(PUT)
            out += _path_bytes(op.path)
            out += _PUT_TAIL.pack(METHOD_CODES[info.method], info.key_id, info.iv)
        elif isinstance(op, Del):
            out.append(DEL)
            out += _path_bytes(op.path)
        elif isinstance(op, Begin):
            out.append(BEGIN)
            out += _BEGIN_HEAD.pack(op.txid, op.rule, op.src_ino)
            out += _path_bytes(op.src)
        elif isinstance(op, Commit):
            out.append(COMMIT)
            out += _TX.pack(op.txid)
        elif isinstance(op, Abort):
            out.append(ABORT)
            out += _TX.pack(op.txid)
        else:
            raise ValueError(f"unknown operation {op!r}")
    return bytes(out)


def decode_ops(payload: bytes) -> list[Op]:
    """Parse a record payload; ValueError if it is malformed."""
    ops: list[Op] = []
    _decode_into(payload, ops)
    if not ops:
        raise ValueError("empty record")
    return ops


def _decode_into(payload: bytes, ops: list[Op]) -> None:
    """Append the operations of ``payload`` to ``ops`` one by one; ValueError at the
    first malformed one (``ops`` then holds those before it)."""
    pos = 0
    n = len(payload)

    def path_at(p: int) -> tuple[bytes, int]:
        if p + 2 > n:
            raise ValueError("truncated path length")
        (ln,) = _U16.unpack_from(payload, p)
        if p + 2 + ln > n:
            raise ValueError("truncated path")
        return bytes(payload[p + 2 : p + 2 + ln]), p + 2 + ln

    while pos < n:
        code = payload[pos]
        pos += 1
        if code == PUT:
            path, pos = path_at(pos)
            if pos + _PUT_TAIL.size > n:
                raise ValueError("truncated PUT")
            mcode, key_id, iv = _PUT_TAIL.unpack_from(payload, pos)
            pos += _PUT_TAIL.size
            if mcode not in METHOD_NAMES:
                raise ValueError(f"unknown method code {mcode}")
            ops.append(Put(path, FileInfo(METHOD_NAMES[mcode], key_id, iv)))
        elif code == DEL:
            path, pos = path_at(pos)
            ops.append(Del(path))
        elif code == BEGIN:
            if ops or pos + _BEGIN_HEAD.size > n:
                raise ValueError("BEGIN not first in its record or truncated")
            txid, rule, src_ino = _BEGIN_HEAD.unpack_from(payload, pos)
            pos += _BEGIN_HEAD.size
            if rule not in (RULE_SRC_GONE, RULE_SRC_REPLACED):
                raise ValueError(f"unknown intent rule {rule}")
            src, pos = path_at(pos)
            ops.append(Begin(txid, rule, src, src_ino))
        elif code in (COMMIT, ABORT):
            if pos + _TX.size > n:
                raise ValueError("truncated COMMIT/ABORT")
            (txid,) = _TX.unpack_from(payload, pos)
            pos += _TX.size
            ops.append(Commit(txid) if code == COMMIT else Abort(txid))
        else:
            raise ValueError(f"unknown operation code {code}")


def _header(mac_key: bytes, generation: int) -> bytes:
    body = _HEADER_BODY.pack(MAGIC, VERSION, 0, generation, secrets.token_bytes(16))
    return body + hmac.new(mac_key, body, hashlib.sha256).digest()


def _record(mac_key: bytes, prev_mac: bytes, payload: bytes) -> tuple[bytes, bytes]:
    if len(payload) > MAX_RECORD:
        raise ValueError("record too large")
    n = struct.pack(">I", len(payload))
    mac = hmac.new(mac_key, prev_mac + n + payload, hashlib.sha256).digest()
    return _REC_HEAD.pack(len(payload), zlib.crc32(n)) + payload + mac, mac


class FileDictionary:
    """The in-memory key dictionary backed by its log. Thread-safe."""

    def __init__(self, path: Path, mac_key: bytes, *, rewrite_min_records: int = 4096,
                 rewrite_factor: int = 2, _shadow: bool = False) -> None:
        self.path = path
        self._mac_key = mac_key
        # a rewrite's shadow replay keeps its entries in many small dicts and no
        # directory index: it runs beside writers, and resizing one dict of a million
        # entries holds the interpreter lock for tens of milliseconds
        self.entries: dict[bytes, FileInfo] = _Shards() if _shadow else {}  # type: ignore[assignment]
        self.pending: dict[int, Pending] = {}
        # intents applied in memory whose COMMIT is not written yet (apply_intent), and
        # how many of them touch each path
        self.applied: dict[int, Pending] = {}
        self._applied_paths: dict[bytes, int] = {}
        # deleted in memory, DEL not yet written: the log still holds these entries
        # (stale once the unlink is durable), see defer_delete
        self.deferred: dict[bytes, FileInfo] = {}
        # the paths of both by directory, so the ones below a directory are found
        # without scanning them all
        self._entry_dirs = _NoIndex() if _shadow else _DirIndex()
        self._deferred_dirs = _DirIndex()
        self.rewrite_min_records = rewrite_min_records
        self.rewrite_factor = rewrite_factor
        self.dropped_tail = 0  # bytes of torn tail cut off on open
        self.salvage: SalvageReport | None = None
        self.generation = 0
        self.records = 0  # records in the current log file
        self.rewrites = 0
        self.syncs = 0  # fdatasyncs of the log (each may cover many records)
        self._rewrite_lock = threading.Lock()  # one rewrite at a time
        self._rewriting = False  # a background rewrite is under way
        self._rewrite_thread: threading.Thread | None = None
        self.rewrite_error: Exception | None = None  # why the last background one failed
        self._next_txid = 1
        self._prev_mac = b""
        self._size = 0
        self._fd = -1
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._written = 0  # sequence number of the last record written
        self._durable = 0  # records up to this sequence number are on disk
        self._syncing = False
        # after a failed fdatasync the kernel may have dropped the dirty pages, so a
        # later "successful" one proves nothing: refuse to go on until reopened
        self._sync_error: OSError | None = None

    # -- opening -------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, mac_key: bytes) -> None:
        """Write an empty log (header only) to the new file ``path`` and fsync it."""
        fd = disk.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, _header(mac_key, 1))
            disk.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: str | Path, mac_key: bytes, *, salvage: bool = False,
             read_only: bool = False, **tuning: int) -> FileDictionary:
        """Replay the log. A torn last record is dropped (and, unless ``read_only``,
        truncated away). Any other damage raises Corruption(path, offset), unless
        ``salvage``: then every damaged region is skipped, every record that still
        verifies is replayed (see ``_replay``), ``.salvage`` says what was lost and,
        unless ``read_only``, the log is rewritten at once as a snapshot of what
        survived, so that it verifies again from its header on."""
        d = cls(Path(path), mac_key, **tuning)
        d._replay(salvage)
        if not read_only:
            cut = d._size
            d._fd = os.open(d.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            if d.salvage is not None:
                # the surviving records no longer chain from the header
                d.rewrite(from_memory=True)
            elif os.fstat(d._fd).st_size != cut:
                disk.ftruncate(d._fd, cut)
                disk.fsync(d._fd)
        return d

    def _replay(self, salvage: bool, data: bytes | None = None) -> None:
        """Replay the log into memory.

        With ``salvage``, a record that fails (bad length CRC, bad MAC, undecodable
        payload) starts a damaged region, and replay resumes at the next offset ``p``
        after it where a record header parses (length CRC good, length within
        MAX_RECORD and within the file) and whose MAC verifies with the 32 bytes just
        before ``p`` as the previous MAC. A record whose payload is damaged keeps its
        stored MAC, so the next record resumes the chain; when a length field is
        damaged, the scan finds where the next record starts. What salvage keeps is
        thus every record that verifies against its predecessor's stored MAC; it is
        replayed in log order, as if the damaged regions had never been written. A
        record right after a damaged one's MAC bytes cannot be verified and is lost
        with it. A torn tail (a record cut short at the end, or zeros to the end) is
        dropped as without salvage.

        A record kept after a damaged region is vouched for by its own MAC and its
        predecessor's stored one, no longer by a chain from the header: that is what
        the user accepts by asking for a repair.
        """
        if data is None:
            data = self.path.read_bytes()
        where = str(self.path)
        if len(data) < HEADER_SIZE:
            raise Corruption(where, 0, "file too short for a files.dict header")
        body, mac = data[: _HEADER_BODY.size], data[_HEADER_BODY.size : HEADER_SIZE]
        magic, version, _flags, generation, _nonce = _HEADER_BODY.unpack(body)
        if magic != MAGIC:
            raise Corruption(where, 0, "not a tdefs files.dict (bad magic)")
        if version != VERSION:
            raise Corruption(where, 8, f"unsupported files.dict version {version}")
        if not hmac.compare_digest(mac, hmac.new(self._mac_key, body, hashlib.sha256).digest()):
            raise Corruption(where, 0, "header MAC mismatch: damaged, or not the files.dict of this keys.dict")
        self.generation = generation
        regions: list[DamagedRegion] = []
        prev = mac
        pos = HEADER_SIZE
        end = len(data)
        while pos < end:
            if end - pos < _REC_HEAD.size:
                self.dropped_tail = end - pos  # torn inside the record header
                break
            n, check = _REC_HEAD.unpack_from(data, pos)
            problem = None
            if check != zlib.crc32(struct.pack(">I", n)) or n > MAX_RECORD:
                problem = "bad record length"
            elif pos + _REC_HEAD.size + n + MAC_SIZE > end:
                self.dropped_tail = end - pos  # the last record was cut short
                break
            else:
                start = pos + _REC_HEAD.size
                payload = data[start : start + n]
                stored = data[start + n : start + n + MAC_SIZE]
                expect = hmac.new(self._mac_key, prev + struct.pack(">I", n) + payload,
                                  hashlib.sha256).digest()
                if not hmac.compare_digest(stored, expect):
                    problem = "record MAC mismatch (damaged, reordered or forged record)"
                else:
                    try:
                        ops = decode_ops(payload)
                    except ValueError as exc:
                        problem = f"malformed record ({exc})"
            if problem is not None and data.count(0, pos) == end - pos:
                # only zeros from here on: a power cut extended the file before its
                # data landed (no real record is all zeros: its MAC is not)
                self.dropped_tail = end - pos
                break
            if problem is not None:
                if not salvage:
                    raise Corruption(where, pos, problem + "; tdefs fsck --repair salvages the log")
                resume = _resync(self._mac_key, data, pos)
                regions.append(_describe_loss(data, pos, end if resume is None else resume, problem))
                if resume is None:
                    break  # nothing after the damage verifies: the log ends at ``pos``
                prev = data[resume - MAC_SIZE : resume]
                pos = resume
                continue
            self._apply(ops)
            prev = stored
            pos = start + n + MAC_SIZE
            self.records += 1
        if regions:
            self.salvage = SalvageReport(regions)
        self._prev_mac = prev
        self._size = pos

    # -- reading -------------------------------------------------------------------

    @property
    def records_written(self) -> int:
        """Records appended since this process opened the log (not the rewrites)."""
        return self._written
    # Lookups and counts take no lock: each is one operation on a dict, atomic under
    # the GIL, and ``get`` is on the path of every open. Snapshots copy in one call.

    def get(self, path: bytes) -> FileInfo | None:
        """``path``'s entry, or None when it has none."""
        return self.entries.get(path)

    def has_entry(self, path: bytes) -> bool:
        """Does ``path`` have an entry?"""
        return path in self.entries

    def count(self) -> int:
        """How many entries there are."""
        return len(self.entries)

    def items(self) -> list[tuple[bytes, FileInfo]]:
        """A snapshot of every entry, as (path, info)."""
        return list(self.entries.items())

    def paths(self) -> list[bytes]:
        """A snapshot of every path that has an entry."""
        return list(self.entries)

    def is_deferred(self, path: bytes) -> bool:
        """Is ``path``'s DEL deferred (see defer_delete)?"""
        return path in self.deferred

    def deferred_paths(self) -> list[bytes]:
        """A snapshot of the paths whose DEL is deferred."""
        return list(self.deferred)

    def deferred_count(self) -> int:
        """How many paths have their DEL deferred."""
        return len(self.deferred)

    def deferred_shares(self, info: FileInfo) -> bool:
        """Does a path whose DEL is deferred have entry ``info`` (a hard link of that
        file, unlinked but not durably)?"""
        with self._lock:
            return any(i == info for i in self.deferred.values())

    def applied_count(self) -> int:
        """How many intents are applied but not committed (see apply_intent)."""
        return len(self.applied)

    def pending_intents(self) -> list[Pending]:
        """A snapshot of the intents waiting for their COMMIT or ABORT, oldest first."""
        return list(self.pending.values())

    def paths_under(self, prefix: bytes) -> list[bytes]:
        """Entry paths strictly below directory ``prefix`` (costs one look at each
        directory holding entries, not at each entry)."""
        with self._lock:
            return self._entry_dirs.below(prefix)

    def deferred_at_or_under(self, top: bytes) -> list[bytes]:
        """Deferred-delete paths equal to ``top`` or below it."""
        with self._lock:
            found = self._deferred_dirs.below(top)
            if top in self.deferred:
                found.append(top)
            return found

    def deferred_in(self, dirs: set[bytes]) -> list[bytes]:
        """Deferred-delete paths whose parent directory is in ``dirs`` (b"" = root)."""
        with self._lock:
            return self._deferred_dirs.in_dirs(dirs)

    def applied_intents(self) -> tuple[list[int], set[bytes]]:
        """The intents applied but not committed, and every path they touch."""
        with self._lock:
            return list(self.applied), set(self._applied_paths)

    def touches_applied(self, paths: Iterable[bytes]) -> bool:
        """Does any of ``paths`` belong to an intent applied but not committed?"""
        with self._lock:
            return any(p in self._applied_paths for p in paths)

    def count_by_key(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        with self._lock:
            for info in self.entries.values():
                counts[info.key_id] = counts.get(info.key_id, 0) + 1
        return counts

    def referenced_keys(self) -> set[int]:
        """Key ids used by any entry or any pending intent (never retire these)."""
        with self._lock:
            keys = {info.key_id for info in self.entries.values()}
            keys.update(info.key_id for info in self.deferred.values())
            for p in self.pending.values():
                keys.update(op.info.key_id for op in p.ops if isinstance(op, Put))
            return keys

    # -- writing -------------------------------------------------------------------

    def defer_delete(self, path: bytes) -> None:
        """Forget ``path``'s entry now, write its DEL later (``append_deferred``).

        For an unlink: the DEL must not reach the disk before the unlink does, and
        making the unlink durable (a directory fsync) per call is costly. Until the
        DEL is written the log keeps the entry, which is stale once the unlink is
        durable (recovery drops it) and right if a power cut undid the unlink.
        Whoever makes a file appear at a deferred path must first make the unlink
        durable (see Vault)."""
        with self._lock:
            info = self._forget(path)
            if info is not None:
                self.deferred[path] = info
                self._deferred_dirs.add(path)

    def append_deferred(self, paths: Iterable[bytes], *, extra: Sequence[Op] = (),
                        sync: bool = False) -> int:
        """Append one record: ``extra`` plus a DEL for each of ``paths`` that is still
        deferred. The caller has made those paths' unlinks durable. Returns the
        record's sequence number, or 0 when there was nothing to write."""
        return self.append(extra, sync=sync, deferred=list(paths))

    def append(self, ops: Sequence[Op], *, sync: bool = True,
               deferred: Sequence[bytes] = ()) -> int:
        """Write one record holding ``ops`` and apply it; returns its sequence number.
        With ``sync`` (the default) returns once the record is durable. ``deferred``:
        see append_deferred."""
        with self._lock:
            if deferred:
                # decided under the lock: a path made anew meanwhile is no longer deferred.
                # The DELs go first: they record unlinks that happened before ``ops``.
                if ops and isinstance(ops[0], Begin):
                    raise ValueError("deferred DELs cannot join an intent record")
                ops = [*(Del(p) for p in deferred if p in self.deferred), *ops]
            if not ops:
                return 0
            if self._applied_paths:
                self._refuse_applied_paths(ops)
            payload = encode_ops(ops)
            if self._fd < 0:
                raise OSError(errno.EBADF, f"{self.path} is not open for writing")
            self._check_sync_error()
            rec, mac = _record(self._mac_key, self._prev_mac, payload)
            try:
                if ARMED:
                    write_all(self._fd, rec[: len(rec) // 2])
                    failpoint("dict.append.mid-write")
                    write_all(self._fd, rec[len(rec) // 2 :])
                else:
                    write_all(self._fd, rec)
            except BaseException:
                # never leave a partial record in the middle of the log
                disk.ftruncate(self._fd, self._size)
                raise
            self._size += len(rec)
            self._prev_mac = mac
            self._apply(list(ops))
            self.records += 1
            self._written += 1
            seq = self._written
        failpoint("dict.append.after-write")
        if sync:
            self.sync(seq)
        if self._should_rewrite():
            self._rewrite_in_background()
        return seq

    def _rewrite_in_background(self) -> None:
        """Start a rewrite in its own thread (one at a time): the append that found the
        log too long returns at once, and others go on while it runs."""
        with self._lock:
            if self._rewriting:
                return
            self._rewriting = True

        def run() -> None:
            try:
                self.rewrite()
            except Exception as exc:  # noqa: BLE001 - the old log stands; said here
                self.rewrite_error = exc
            finally:
                with self._cond:
                    self._rewriting = False
                    self._cond.notify_all()

        self._rewrite_thread = threading.Thread(target=run, name="files.dict rewrite",
                                                daemon=True)
        self._rewrite_thread.start()

    def wait_for_rewrite(self) -> None:
        """Return once no background rewrite runs (close, tests)."""
        thread = self._rewrite_thread
        if thread is not None:
            thread.join()

    def apply_intent(self, txid: int) -> None:
        """Apply pending intent ``txid`` in memory now; its COMMIT comes later (a record
        holding ``Commit(txid)``). Until then no record may touch its paths: append
        refuses one that does."""
        with self._lock:
            p = self.pending.pop(txid)
            self.applied[txid] = p
            for path in _intent_paths(p):
                self._applied_paths[path] = self._applied_paths.get(path, 0) + 1
            self._apply(p.ops)

    def begin(self, rule: int, src: bytes, src_ino: int, ops: Sequence[Op], *,
              sync: bool = True) -> int:
        """Record an intent whose ``ops`` apply on COMMIT (durably unless ``sync`` is
        False); returns its txid."""
        with self._lock:
            txid = self._next_txid
            self._next_txid += 1
        self.append([Begin(txid, rule, src, src_ino), *ops], sync=sync)
        return txid

    def sync(self, seq: int | None = None) -> None:
        """Return once record ``seq`` (default: every record written) is durable.
        One caller (the leader) runs fdatasync for everything written so far; others
        arriving meanwhile wait and are covered by it or lead the next one."""
        while True:
            with self._cond:
                target = self._written if seq is None else seq
                if self._durable >= target:
                    return
                self._check_sync_error()
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                upto = self._written
                fd = self._fd
            ok = False
            try:
                disk.fdatasync(fd)
                self.syncs += 1
                ok = True
            except OSError as exc:
                self._sync_error = exc
                raise
            finally:
                with self._cond:
                    self._syncing = False
                    if ok:
                        self._durable = max(self._durable, upto)
                    self._cond.notify_all()

    def _check_sync_error(self) -> None:
        if self._sync_error is not None:
            raise OSError(errno.EIO, f"{self.path}: an earlier fdatasync failed"
                          f" ({self._sync_error.strerror}); reopen the vault")

    def _refuse_applied_paths(self, ops: Sequence[Op]) -> None:
        """Replay resolves an applied intent after every later record: a later record
        touching its paths would be applied in the wrong order."""
        touched = [op.path for op in ops if isinstance(op, (Put, Del))]
        if isinstance(ops[0], Begin):
            touched.append(ops[0].src)
        for path in touched:
            if path in self._applied_paths:
                raise RuntimeError(f"{path!r} belongs to an intent whose COMMIT is not written")

    def _should_rewrite(self) -> bool:
        if self._rewriting:
            return False
        live = len(self.entries) + len(self.pending) + len(self.deferred)
        return self.records > self.rewrite_min_records and self.records > self.rewrite_factor * live

    def rewrite(self, *, from_memory: bool = False) -> None:
        """Replace the log with a snapshot of what it says, without stopping writers.

        1. Under the lock, only note where the log ends (``mark``).
        2. Without it, read the log up to ``mark`` again, verifying every MAC, replay it
           into a shadow state, and write that state as a snapshot to files.dict.tmp:
           entries (deferred deletes among them, whose DELs are not written yet) and
           open intents (an intent applied in memory is open in the log too).
        3. Under the lock again, append to the tmp file the records written after
           ``mark``, chained anew, fsync it, rename it over the log, fsync .tdefs/.
        A create waits at most for step 3, which copies only what came meanwhile. The
        snapshot is built from the log, not from memory, so it says exactly what a
        replay of the old log would: nothing appended meanwhile is lost (git's
        reftable once lost updates by writing back a list read before them), and a
        crash at any point leaves the old log or the new one, both whole.

        ``from_memory`` (after a salvage, when the log on disk no longer verifies)
        writes the state in memory instead; nothing else runs meanwhile then.

        The cyclic garbage collector is off while it runs: the shadow state is
        millions of small objects on a large vault, and a full collection over them
        (and over the live state) would stop every thread for a tenth of a second or
        more; they are all freed by reference counting anyway."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._rewrite(from_memory)
        finally:
            if collecting:
                gc.enable()

    def _rewrite(self, from_memory: bool) -> None:
        with self._rewrite_lock:
            with self._cond:
                if self._fd < 0:
                    raise OSError(errno.EBADF, f"{self.path} is not open for writing")
                mark = self._size
                generation = self.generation + 1
            if from_memory:
                shadow = self
            else:
                shadow = FileDictionary(self.path, self._mac_key, _shadow=True)
                with open(self.path, "rb") as f:
                    shadow._replay(False, f.read(mark))
            sync_point("dict.rewrite.after-read")
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = disk.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                prev, count, size = self._write_snapshot(fd, shadow, generation)
                if shadow is not self:
                    _dismantle(shadow)
                del shadow
                disk.fsync(fd)
                failpoint("dict.rewrite.after-snapshot")
                sync_point("dict.rewrite.before-splice")
                # what came while the snapshot was built, still without the lock: the
                # log up to ``upto`` holds whole records (an append moves _size only
                # once its record is written)
                upto = self._size
                prev, spliced, size = self._splice(fd, mark, upto, prev, size)
                disk.fsync(fd)
                with self._cond:
                    while self._syncing:
                        self._cond.wait()
                    if self._fd < 0:
                        raise OSError(errno.EBADF, f"{self.path} was closed during its rewrite")
                    # the last few, with appenders held
                    prev, last, size = self._splice(fd, upto, self._size, prev, size)
                    disk.fsync(fd)
                    failpoint("dict.rewrite.after-tmp")
                    disk.rename(tmp, self.path)
                    failpoint("dict.rewrite.after-rename")
                    try:
                        # before any append goes to the new log, the rename must be
                        # durable: a power cut must not bring back the old log without it
                        fsync_dir(self.path.parent)
                        new_fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                    except OSError as exc:
                        # appends would now go to the old log, which no longer has a
                        # name: refuse them all; a reopen finds one whole log or the other
                        self._sync_error = exc
                        raise
                    old = self._fd
                    self._fd = new_fd
                    self.generation = generation
                    self._prev_mac = prev
                    self._size = size
                    self.records = count + spliced + last
                    self.rewrites += 1
                    self._durable = self._written  # the new log holds every record, synced
                # the old log's last descriptor: freeing its blocks can take a while
                os.close(old)
            finally:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    disk.unlink(tmp)  # left only when the rewrite failed

    def _write_snapshot(self, fd: int, shadow: FileDictionary, generation: int
                        ) -> tuple[bytes, int, int]:
        """Write ``shadow``'s state as a new log to ``fd``; returns (last MAC,
        records, bytes)."""
        head = _header(self._mac_key, generation)
        prev = head[_HEADER_BODY.size :]
        write_all(fd, head)
        size, count = len(head), 0
        entries = iter(shadow.entries.items())
        total = len(shadow.entries)
        # a record of SNAPSHOT_OPS_PER_RECORD entries at a time: no list of them all
        synced = 0
        for start in range(0, total, SNAPSHOT_OPS_PER_RECORD):
            chunk = [Put(p, i) for p, i in itertools.islice(entries, SNAPSHOT_OPS_PER_RECORD)]
            rec, prev = _record(self._mac_key, prev, encode_ops(chunk))
            write_all(fd, rec)
            size += len(rec)
            count += 1
            if size - synced >= SNAPSHOT_SYNC_BYTES:
                # a little at a time: one fsync of it all at the end would hold up the
                # appenders' own fdatasyncs behind its writeback
                disk.fdatasync(fd)
                synced = size
            if start <= total // 2 < start + SNAPSHOT_OPS_PER_RECORD:
                failpoint("dict.rewrite.mid-tmp")
        if not total:
            failpoint("dict.rewrite.mid-tmp")
        for p in shadow.pending.values():
            rec, prev = _record(self._mac_key, prev,
                                encode_ops([Begin(p.txid, p.rule, p.src, p.src_ino), *p.ops]))
            write_all(fd, rec)
            size += len(rec)
            count += 1
        return prev, count, size

    def _splice(self, fd: int, start: int, end: int, prev: bytes, size: int
                ) -> tuple[bytes, int, int]:
        """Append the log's records between offsets ``start`` and ``end`` to ``fd``,
        chained anew from ``prev``; returns (last MAC, records, new size)."""
        with open(self.path, "rb") as f:
            f.seek(start)
            tail = f.read(end - start)
        pos, spliced = 0, 0
        while pos < len(tail):
            n, _check = _REC_HEAD.unpack_from(tail, pos)
            payload = tail[pos + _REC_HEAD.size : pos + _REC_HEAD.size + n]
            rec, prev = _record(self._mac_key, prev, payload)
            write_all(fd, rec)
            size += len(rec)
            spliced += 1
            pos += _REC_HEAD.size + n + MAC_SIZE
        return prev, spliced, size

    def close(self) -> None:
        self.wait_for_rewrite()
        if self._fd >= 0:
            if self._sync_error is None:
                self.sync()
            with self._cond:
                os.close(self._fd)
                self._fd = -1

    # -- applying ------------------------------------------------------------------

    def _apply(self, ops: list[Op]) -> None:
        """Apply one record's operations to memory (caller holds the lock or replays)."""
        first = ops[0]
        if isinstance(first, Begin):
            self.pending[first.txid] = Pending(first.txid, first.rule, first.src, first.src_ino,
                                               ops[1:])
            self._next_txid = max(self._next_txid, first.txid + 1)
            return
        for op in ops:
            if isinstance(op, Put):
                path = op.path
                if path not in self.entries:
                    self._entry_dirs.add(path)
                self.entries[path] = op.info
                self._undefer(path)
            elif isinstance(op, Del):
                self._forget(op.path)
                self._undefer(op.path)
            elif isinstance(op, Commit):
                p = self.pending.pop(op.txid, None)
                if p is not None:
                    self._apply(p.ops)
                else:
                    self._forget_applied(op.txid)
            elif isinstance(op, Abort):
                self.pending.pop(op.txid, None)
            else:
                raise ValueError(f"operation {op!r} outside the start of a record")


    def _forget(self, path: bytes) -> FileInfo | None:
        """Drop ``path``'s entry from memory (caller holds the lock or replays)."""
        info = self.entries.pop(path, None)
        if info is not None:
            self._entry_dirs.discard(path)
        return info

    def _forget_applied(self, txid: int) -> None:
        """Its COMMIT is written: the intent no longer holds its paths."""
        p = self.applied.pop(txid, None)
        if p is None:
            return
        for path in _intent_paths(p):
            n = self._applied_paths[path] - 1
            if n:
                self._applied_paths[path] = n
            else:
                del self._applied_paths[path]

    def _undefer(self, path: bytes) -> None:
        if self.deferred.pop(path, None) is not None:
            self._deferred_dirs.discard(path)


class _Shards:
    """A mapping spread over many dicts (by hash), none of them large: what a rewrite's
    shadow replay needs of a dict (see FileDictionary.__init__)."""

    __slots__ = ("_parts",)
    _N = 512

    def __init__(self) -> None:
        self._parts: list[dict[bytes, FileInfo]] = [{} for _ in range(self._N)]

    def _part(self, key: bytes) -> dict[bytes, FileInfo]:
        return self._parts[hash(key) % self._N]

    def __contains__(self, key: object) -> bool:
        return key in self._part(key)  # type: ignore[arg-type]

    def __setitem__(self, key: bytes, value: FileInfo) -> None:
        self._part(key)[key] = value

    def get(self, key: bytes, default: FileInfo | None = None) -> FileInfo | None:
        return self._part(key).get(key, default)

    def pop(self, key: bytes, default: FileInfo | None = None) -> FileInfo | None:
        return self._part(key).pop(key, default)

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts)

    def items(self) -> Iterator[tuple[bytes, FileInfo]]:
        for part in self._parts:
            yield from part.items()

    def clear_in_pieces(self) -> None:
        """Free it one small dict at a time, letting other threads run between."""
        for i in range(len(self._parts)):
            self._parts[i] = {}
            time.sleep(0)


class _NoIndex:
    """No directory index (a shadow replay never asks what is below a directory)."""

    def add(self, path: bytes) -> None:
        return None

    def discard(self, path: bytes) -> None:
        return None


def _dismantle(shadow: FileDictionary) -> None:
    """Free a shadow's large state a piece at a time, yielding between pieces: dropping
    a million entries at once is one call that holds the interpreter lock for a
    quarter of a second, and every other thread (a create through the mount) would
    wait."""
    entries = shadow.entries
    if isinstance(entries, _Shards):
        entries.clear_in_pieces()


def _intent_paths(p: Pending) -> set[bytes]:
    return {p.src, *(op.path for op in p.ops if isinstance(op, (Put, Del)))}


class _DirIndex:
    """A set of paths grouped by parent directory (b"" for the root)."""

    __slots__ = ("_by_dir",)

    def __init__(self) -> None:
        self._by_dir: dict[bytes, set[bytes]] = {}

    def add(self, path: bytes) -> None:
        self._by_dir.setdefault(path.rpartition(b"/")[0], set()).add(path)

    def discard(self, path: bytes) -> None:
        parent = path.rpartition(b"/")[0]
        names = self._by_dir.get(parent)
        if names is not None:
            names.discard(path)
            if not names:
                del self._by_dir[parent]

    def below(self, top: bytes) -> list[bytes]:
        """The paths strictly below directory ``top``: one look per directory."""
        head = top + b"/"
        return [p for d, names in self._by_dir.items()
                if d == top or d.startswith(head) or not top for p in names]

    def in_dirs(self, dirs: set[bytes]) -> list[bytes]:
        """The paths directly in one of ``dirs``."""
        return [p for d in dirs for p in self._by_dir.get(d, ())]


def _record_length(data: bytes, pos: int, stop: int) -> int | None:
    """The payload length of a record header at ``pos`` if it parses (length CRC good,
    length within MAX_RECORD) and the whole record ends by ``stop``; else None."""
    if pos + _REC_HEAD.size + MAC_SIZE > stop:
        return None
    n, check = _REC_HEAD.unpack_from(data, pos)
    if n > MAX_RECORD or pos + _REC_HEAD.size + n + MAC_SIZE > stop:
        return None
    if check != zlib.crc32(data[pos : pos + 4]):
        return None
    return n


def _headers(data: bytes, start: int, stop: int) -> Iterator[tuple[int, int]]:
    """Every offset ``p`` in [start, stop) where a record header parses and the whole
    record ends by ``stop``, with its payload length. Costs a length check at every
    offset (within 16 MiB of ``stop`` only at the zero bytes, as a length that fits
    starts with one) and a CRC of 4 bytes where the length fits; off a record boundary
    a header parses by chance about once in 2^32 offsets."""
    last = stop - _REC_HEAD.size - MAC_SIZE
    unpack = _REC_HEAD.unpack_from
    crc32 = zlib.crc32
    p = start
    while p <= last:
        if last - p < 1 << 24:
            p = data.find(b"\0", p, last + 1)
            if p < 0:
                return
        n, check = unpack(data, p)
        if n <= last - p and n <= MAX_RECORD and check == crc32(data[p : p + 4]):
            yield p, n
        p += 1


def _resync(mac_key: bytes, data: bytes, bad: int) -> int | None:
    """The first offset after ``bad`` where a record starts whose MAC verifies with
    the 32 bytes before it as the previous MAC; None if there is none.

    A verifying MAC does not happen by chance, so the first one found is where replay
    safely resumes. Cost: a scan of the offsets up to that record (see ``_headers``),
    with an HMAC only where a header parses: linear in the bytes skipped, not in the
    log."""
    for p, n in _headers(data, bad + 1, len(data)):
        body = p + _REC_HEAD.size
        mac = hmac.new(mac_key, data[p - MAC_SIZE : p] + data[p : p + 4] + data[body : body + n],
                       hashlib.sha256).digest()
        if hmac.compare_digest(mac, data[body + n : body + n + MAC_SIZE]):
            return p
    return None


def _describe_loss(data: bytes, offset: int, stop: int, problem: str) -> DamagedRegion:
    """Best effort: how many records lie in ``data[offset:stop]`` and which paths they
    name. Records are walked by their length fields. A damaged one is taken to run up
    to the next offset where a header parses from which the walk reaches ``stop``
    exactly (else the first where a header parses at all, else ``stop``): right unless
    one damage hit several length fields."""
    paths: set[bytes] = set()
    records = 0
    counted = True
    known: dict[int, bool] = {}  # offset -> does the walk from it reach ``stop``
    pos = offset
    while pos < stop:
        n = _record_length(data, pos, stop)
        if n is not None:
            nxt = pos + _REC_HEAD.size + n + MAC_SIZE
        else:
            counted = False
            first = None
            for q, _ in _headers(data, pos + 1, stop):
                if _walks_to(data, q, stop, known):
                    nxt = q
                    break
                if first is None:
                    first = q
            else:
                nxt = stop if first is None else first
            n = max(0, nxt - pos - _REC_HEAD.size - MAC_SIZE)
        records += 1
        ops: list[Op] = []
        try:
            _decode_into(data[pos + _REC_HEAD.size : pos + _REC_HEAD.size + n], ops)
        except ValueError:
            pass  # keep the operations decoded before the damage
        for op in ops:
            if isinstance(op, (Put, Del)):
                paths.add(op.path)
            elif isinstance(op, Begin):
                paths.add(op.src)
        pos = nxt
    return DamagedRegion(offset, stop - offset, records, counted, problem, sorted(paths))


def _walks_to(data: bytes, pos: int, stop: int, known: dict[int, bool]) -> bool:
    """Do the length fields from ``pos`` on lead exactly to ``stop``? ``known`` holds
    the answers for offsets already walked, so that walks from many offsets of one
    region cost one pass over it."""
    seen = []
    ok = True
    while pos != stop:
        if pos in known:
            ok = known[pos]
            break
        seen.append(pos)
        n = _record_length(data, pos, stop)
        if n is None:
            ok = False
            break
        pos += _REC_HEAD.size + n + MAC_SIZE
    for q in seen:
        known[q] = ok
    return ok
