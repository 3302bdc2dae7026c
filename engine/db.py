"""The database: write path, read path, snapshots, recovery and background work.

Writers serialise on ``_lock``: each write is one WAL record, then its versions go
into the active memtable. A full memtable becomes immutable (a new WAL starts) and a
flush thread turns it into a level-0 table; compaction threads merge tables down the
levels. Table building runs in forked children (engine/background.py).

Readers take no lock: ``_sv`` (memtable, immutable memtables, version) is replaced
as one tuple, so a reader always sees a consistent set. A version is published
before the memtable it absorbed is dropped from ``_sv``.

Invariants: every acknowledged write is in the WAL or in a table named by the
MANIFEST; level 0 is read newest ``epoch_number`` first; a compaction's edit is
applied to the version current when it finishes, and a file being compacted is in
``_busy`` until then, so it is never picked twice.
"""

from __future__ import annotations

import fcntl
import heapq
import os
import re
import threading
import time
from bisect import bisect_left as _bisect
from collections.abc import Iterator
from heapq import heapify, heappop, heapreplace
from zlib import crc32

from .background import run_job
from .block_cache import BlockCache
from .bloom import GOLDEN as BLOOM_GOLDEN
from .bloom import masks as bloom_masks
from .bloom import probes_for
from .compaction import Compaction, CompactionPicker, compaction_job, flush_job
from .errors import BackgroundError, Corruption, DBClosed, EngineError, InvalidArgument, LockError
from .memtable import ABSENT, ENTRY_OVERHEAD, MemTable
from .options import Options
from .sst import MISS, TableReader, scan_live, scan_tables
from .version import (
    FileMeta,
    Version,
    VersionEdit,
    VersionSet,
    apply_edit,
    check_version,
    log_name,
    sync_dir,
    table_name,
)
from .wal import (
    CHECK_XOR,
    GOLDEN,
    HEADER,
    SINGLE_PUT,
    LogWriter,
    decode_batch,
    encode_batch,
    frame,
    read_records,
)

_FILE_RE = re.compile(r"^(\d+)\.(sst|log)$|^MANIFEST-(\d+)$|^.*\.dbtmp$|^compaction-.*\.tmp$")
_NUMBER_RE = re.compile(r"^(\d+)\.[a-z]+$|^MANIFEST-(\d+)$")
_NO_SNAPSHOT = -1
# WAL space reserved ahead of the writes, so synced writes rarely change the size.
WAL_PREALLOCATE = 1 << 20
# How far past write_buffer_size the active memtable may grow while flushes run.
MEMTABLE_OVERRUN = 1.5
# Writes into an overrunning memtable are paced only as much as needed for the
# remaining room (up to the hard limit) to last until the running flush is
# expected to end, judged by the last flush's speed (bytes of memtable per second):
# many short sleeps instead of one long wait, and none when writers are slow enough.
# A flush running late is expected to need at least this fraction of its estimate more.
FLUSH_LATE_FRACTION = 0.25
# The flush speed assumed before any flush has been timed.
DEFAULT_FLUSH_RATE = 16 << 20
# Pacing sleeps are taken once the owed delay reaches this, not per write.
MIN_DELAY_SLEEP = 0.001
# Compaction children run below flushes and the foreground on a shared machine.
COMPACTION_NICENESS = 10


def _as_bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise InvalidArgument(f"{what} must be bytes, not {type(value).__name__}")


class WriteBatch:
    """Puts and deletes applied atomically by ``DB.write``."""

    __slots__ = ("_ops",)

    def __init__(self) -> None:
        self._ops: list[tuple[bytes, bytes | None]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self._ops.append((_as_bytes(key, "key"), _as_bytes(value, "value")))

    def delete(self, key: bytes) -> None:
        self._ops.append((_as_bytes(key, "key"), None))

    def clear(self) -> None:
        self._ops.clear()

    def __len__(self) -> int:
        return len(self._ops)


class Snapshot:
    """A consistent read view; release it (or leave its ``with`` block) when done."""

    __slots__ = ("seq", "_db", "_released")

    def __init__(self, db: DB, seq: int) -> None:
        self.seq = seq
        self._db = db
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._db._release_snapshot(self.seq)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if not self._released:
            try:
                self.release()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


class DB:
    """An open database. Create with ``DB.open(path, options)``."""

    def __init__(self, path: str, options: Options, read_only: bool = False) -> None:
        # Use DB.open(); this only sets fields.
        self.path = path
        self.options = options
        self.read_only = read_only
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._vlock = threading.Lock()
        self._closed = True
        self._closing = False
        self._bg_error: EngineError | None = None
        self._snapshots: dict[int, int] = {}
        self._deferred_releases: list[int] = []
        self._snap_max = _NO_SNAPSHOT
        self._busy: set[int] = set()
        self._running_compactions = 0
        self._manual_compactions = 0
        self._threads: list[threading.Thread] = []
        # Writers call _delay() while level 0 is behind (_l0_slow) or the active
        # memtable overruns while every immutable slot flushes (_paced).
        self._slowdown = False
        self._l0_slow = False
        self._paced = False
        self._write_count = 0
        self._flush_rate = float(DEFAULT_FLUSH_RATE)
        # When the running flush is expected to end, and how long it should take.
        self._flush_deadline = 0.0
        self._flush_estimate = 0.0
        self._pace_until = 0.0
        self._lock_file: int | None = None
        # Table numbers allocated to a flush or compaction but not yet installed.
        self._pending_tables: frozenset[int] = frozenset()
        self.cache = BlockCache(options.block_cache_size)
        self.stats = {"flushes": 0, "compactions": 0, "trivial_moves": 0,
                      "bytes_flushed": 0, "bytes_compacted_in": 0, "bytes_compacted_out": 0,
                      "stall_waits": 0}
        self._vs = VersionSet(path, options.num_levels)
        self._picker = CompactionPicker(options.num_levels,
                                        options.level0_file_num_compaction_trigger,
                                        options.max_bytes_for_level_base,
                                        options.max_bytes_for_level_multiplier)

    # ----------------------------------------------------------------- open

    @classmethod
    def open(cls, path: str | os.PathLike, options: Options | None = None, *,
             read_only: bool = False) -> DB:
        """Open the database at ``path`` or create one; LockError if it is in use.

        A directory is a database when it holds CURRENT. Otherwise one is created only
        if ``options.create_if_missing`` is on, ``read_only`` is off and the directory
        is missing or empty; a directory holding anything else is refused, so a wrong
        path is reported instead of getting database files written into it. These
        checks come before the LOCK file is made: a refused open leaves nothing behind.

        With ``read_only`` the database is opened without writing a byte: the WALs
        are replayed into memory only, writes raise InvalidArgument, and LOCK is held
        shared, so read-only opens coexist with each other but never with a writer.
        """
        options = options if options is not None else Options()
        options.validate()
        path = os.fspath(path)
        create = _must_create(path, options, read_only)
        if create and not os.path.isdir(path):
            os.makedirs(path, exist_ok=True)
        # Built once here so forked table builders inherit it.
        bloom_masks(probes_for(options.bloom_bits_per_key))
        db = cls(path, options, read_only)
        db._acquire_lock()
        try:
            db._recover(create)
        except BaseException:
            db._release_lock()
            raise
        db._closed = False
        if not read_only:
            db._start_threads()
        return db

    def _acquire_lock(self) -> None:
        if self.read_only:
            try:
                fd = os.open(os.path.join(self.path, "LOCK"), os.O_RDONLY)
            except FileNotFoundError:
                # Only a copied or hand-edited database lacks LOCK; making one would
                # be a write, and a writer that opens later creates it anyway.
                return
            mode = fcntl.LOCK_SH
        else:
            fd = os.open(os.path.join(self.path, "LOCK"), os.O_RDWR | os.O_CREAT, 0o644)
            mode = fcntl.LOCK_EX
        try:
            # flock conflicts between two opens even inside one process.
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockError(f"{self.path}: database is locked by another process "
                            "(or is already open in this one)") from None
        self._lock_file = fd

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            os.close(self._lock_file)
            self._lock_file = None

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _open_reader(self, f: FileMeta) -> None:
        path = self._file(table_name(f.number))
        try:
            f.reader = TableReader(path, f.number, self.cache)
        except FileNotFoundError:
            raise Corruption(path, None, "table file named by the MANIFEST is missing") from None
        if f.reader.size != f.size:
            raise Corruption(path, None, f"size {f.reader.size} differs from MANIFEST's {f.size}")

    def _recover(self, create: bool) -> None:
        """Load the state (or start an empty one if ``create``) and replay the WALs."""
        opts = self.options
        vs = self._vs
        # open() checked the directory before locking it; another process may have
        # created the database since, which is then opened like any other.
        if os.path.exists(self._file("CURRENT")):
            if opts.error_if_exists:
                raise InvalidArgument(f"{self.path}: database exists (error_if_exists is on)")
            vs.recover()
        elif not create:
            raise InvalidArgument(f"{self.path}: not a database (no CURRENT file)")
        for _, f in vs.current.files():
            self._open_reader(f)
        if opts.paranoid_checks:
            check_version(vs.current, self._file(f"MANIFEST-{vs.manifest_number:06d}"),
                          vs.next_epoch, vs.next_file_number)

        # A recovery that crashed may have left files numbered past the MANIFEST's
        # counter (a MANIFEST CURRENT never named, tables, logs); never reuse them.
        names = os.listdir(self.path)
        for name in names:
            m = _NUMBER_RE.match(name)
            if m:
                number = int(m.group(1) or m.group(2))
                vs.next_file_number = max(vs.next_file_number, number + 1)

        # Replay every WAL the MANIFEST does not cover, oldest first.
        logs = sorted(int(m.group(1)) for m in map(_FILE_RE.match, names)
                      if m and m.group(2) == "log")
        edit = VersionEdit()
        max_seq = vs.last_sequence
        mem = MemTable(0)
        for number in logs:
            vs.next_file_number = max(vs.next_file_number, number + 1)
            if number < vs.log_number:
                continue
            lpath = self._file(log_name(number))
            for offset, payload in read_records(lpath):
                seq, ops = decode_batch(lpath, offset, payload)
                for i, (key, value) in enumerate(ops):
                    mem.add(seq + i, key, value, _NO_SNAPSHOT)
                max_seq = max(max_seq, seq + len(ops) - 1)
                if mem.size >= opts.write_buffer_size and not self.read_only:
                    edit.new_files.append((0, self._write_level0(mem)))
                    mem = MemTable(0)
        if self.read_only:
            # Reads see the logs' writes from memory; every file stays as it was.
            self._seq = max_seq
            self._mem = mem
            self._imms = []
            self._wal_write = self._refuse_write
            self._publish(vs.current)
            return
        if len(mem):
            edit.new_files.append((0, self._write_level0(mem)))
        vs.last_sequence = max_seq
        log_number = vs.new_file_number()
        vs.log_number = log_number
        if edit.new_files:
            vs.current = apply_edit(vs.current, edit)
        vs.write_snapshot()
        self._seq = max_seq
        self._mem = MemTable(log_number)
        self._imms: list[MemTable] = []
        self._wal = LogWriter(self._file(log_name(log_number)), preallocate=WAL_PREALLOCATE)
        self._wal_write = self._wal.write
        self._wal_dir_synced = False
        self._unsynced_logs: list[str] = []
        self._publish(vs.current)
        self._delete_obsolete_files(recovering=True)
        opts.write_file(self.path)

    def _write_level0(self, mem: MemTable) -> FileMeta:
        """Flush a recovered memtable synchronously (recovery runs before any thread)."""
        vs = self._vs
        number = vs.new_file_number()
        stats = flush_job(mem, self._file(table_name(number)), self.options.block_size,
                          self.options.compression, self.options.bloom_bits_per_key)
        f = FileMeta(number, stats["size"], stats["smallest"], stats["largest"],
                     stats["smallest_seq"], stats["largest_seq"], vs.next_epoch,
                     stats["num_entries"])
        vs.next_epoch += 1
        self._open_reader(f)
        return f

    def _delete_obsolete_files(self, recovering: bool = False) -> None:
        """Remove tables, logs and MANIFESTs the current state no longer names.

        Numbers are never reused, so a table below the allocation floor that is
        neither pending nor live at the moment both are read is dead for good.
        """
        vs = self._vs
        with self._vlock, self._lock:
            floor = vs.next_file_number
            pending = self._pending_tables
            live_tables = {f.number for _, f in vs.current.files()}
            live_logs = {m.log_number for m in self._imms} | {self._mem.log_number}
            log_floor = vs.log_number
            manifest = vs.manifest_number
        for name in os.listdir(self.path):
            m = _FILE_RE.match(name)
            if not m:
                continue
            if m.group(2) == "sst":
                n = int(m.group(1))
                dead = n not in live_tables and (recovering or (n < floor and n not in pending))
            elif m.group(2) == "log":
                n = int(m.group(1))
                dead = n < log_floor and n not in live_logs
            elif m.group(3):
                dead = int(m.group(3)) != manifest
            else:
                # Temporary files of a crashed run; live ones exist only after open.
                dead = recovering
            if dead:
                try:
                    os.unlink(self._file(name))
                except FileNotFoundError:
                    pass

    # ------------------------------------------------------------- publish

    def _publish(self, version: Version) -> None:
        """Make ``version`` and the memtables visible to readers (caller may hold _lock)."""
        self._sv = (self._mem, tuple(reversed(self._imms)), version)
        self._l0_slow = len(version.levels[0]) >= self.options.level0_slowdown_writes_trigger
        self._slowdown = self._l0_slow or self._paced

    # --------------------------------------------------------------- writes

    def _check_writable(self) -> None:
        if self._closed:
            raise DBClosed(f"{self.path}: database is closed")
        if self.read_only:
            raise InvalidArgument(f"{self.path}: database is open read-only")
        if self._bg_error is not None:
            raise BackgroundError(f"{self.path}: writes stopped after a background error: "
                                  f"{self._bg_error}")

    def _refuse_write(self, data: bytes) -> None:
        """A read-only handle's WAL append: every write appends before it changes any
        state, so refusing here costs the writers' fast paths nothing."""
        raise InvalidArgument(f"{self.path}: database is open read-only")

    def put(self, key: bytes, value: bytes, sync: bool = False) -> None:
        if type(key) is not bytes:
            key = _as_bytes(key, "key")
        if type(value) is not bytes:
            value = _as_bytes(value, "value")
        if self._slowdown:
            self._delay(len(key) + len(value) + ENTRY_OVERHEAD)
        with self._lock:
            if self._closed or self._bg_error is not None:
                self._check_writable()
            seq = self._seq + 1
            payload = SINGLE_PUT.pack(seq, 1, 1, len(key), len(value)) + key + value
            n = len(payload)
            c = crc32(payload)
            self._wal_write(HEADER.pack(n, c, ((n * GOLDEN) & 0xFFFFFFFF) ^ c ^ CHECK_XOR) + payload)
            mem = self._mem
            if self._snap_max < 0:
                mem.seqs[key] = seq
                mem.values[key] = value
                mem.size += len(key) + len(value) + ENTRY_OVERHEAD
            else:
                mem.add(seq, key, value, self._snap_max)
            self._seq = seq
            if sync:
                self._sync_wal()
            if mem.size >= self.options.write_buffer_size:
                self._make_room()

    def delete(self, key: bytes, sync: bool = False) -> None:
        batch = WriteBatch()
        batch.delete(key)
        self.write(batch, sync=sync)

    def write(self, batch: WriteBatch, sync: bool = False) -> None:
        """Apply every operation of ``batch`` atomically (one WAL record)."""
        ops = batch._ops
        if not ops:
            if sync:
                with self._lock:
                    self._check_writable()
                    self._sync_wal()
            return
        if self._slowdown:
            self._delay(sum(len(k) + (len(v) if v is not None else 0) + ENTRY_OVERHEAD
                            for k, v in ops))
        with self._lock:
            self._apply(ops, sync)

    def delete_range(self, begin: bytes, end: bytes, sync: bool = False) -> int:
        """Delete every key in ``[begin, end)`` atomically; return how many there were.

        Written as one batch of point deletions while writers wait, so no write can
        land in the range between finding the keys and deleting them. The cost is
        proportional to the keys in the range (the tables' range-tombstone block
        is reserved for a constant-cost form).
        """
        begin = _as_bytes(begin, "begin")
        end = _as_bytes(end, "end")
        if self._slowdown:
            self._delay(0)
        with self._lock:
            # Unconditional: with no key in the range nothing is appended to refuse.
            self._check_writable()
            mem, imms, version = self._sv
            mems = [m for m in (mem, *imms) if len(m)]
            keys = [k for k, _ in self._scan(mems, version, begin, end, False, self._seq)]
            if keys:
                self._apply([(k, None) for k in keys], sync)
            elif sync:
                self._sync_wal()
            return len(keys)

    def _apply(self, ops: list[tuple[bytes, bytes | None]], sync: bool) -> None:
        """Log and apply a batch (caller holds ``_lock``)."""
        if self._closed or self._bg_error is not None:
            self._check_writable()
        first = self._seq + 1
        self._wal_write(frame(encode_batch(first, ops)))
        mem = self._mem
        size = 0
        if self._snap_max < 0:
            # One dict.update is atomic for readers that take no lock.
            values = {}
            seqs = {}
            seq = first
            for key, value in ops:
                values[key] = value
                seqs[key] = seq
                size += len(key) + (len(value) if value is not None else 0) + ENTRY_OVERHEAD
                seq += 1
            mem.seqs.update(seqs)
            mem.values.update(values)
            mem.size += size
        else:
            for i, (key, value) in enumerate(ops):
                mem.add(first + i, key, value, self._snap_max)
        self._seq = first + len(ops) - 1
        if sync:
            self._sync_wal()
        if mem.size >= self.options.write_buffer_size:
            self._make_room()

    def _sync_wal(self) -> None:
        """Make every write so far durable: earlier logs left unsynced at a memtable
        switch, this log, and the first time for a new log its directory entry."""
        while self._unsynced_logs:
            path = self._unsynced_logs.pop()
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # flushed to a table and deleted: already durable
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        self._wal.sync()
        if not self._wal_dir_synced:
            sync_dir(self.path)
            self._wal_dir_synced = True

    def _delay(self, nbytes: int) -> None:
        """Slow writers down while level 0 piles up, so compaction can catch up, and
        pace them while the memtable overruns, so the flush can catch up.

        Pacing is a token bucket whose rate is the room left before the hard limit
        over the time the flush should still take: each write moves ``_pace_until``
        on by its bytes at that rate, and the writer sleeps only once it is at least
        ``MIN_DELAY_SLEEP`` ahead of the clock (so writers slower than the rate
        never sleep).
        """
        if self._paced:
            now = time.monotonic()
            room = self.options.write_buffer_size * MEMTABLE_OVERRUN - self._mem.size
            if room <= 0:
                return  # _make_room waits for the flush
            remaining = max(self._flush_deadline - now,
                            FLUSH_LATE_FRACTION * self._flush_estimate, MIN_DELAY_SLEEP)
            until = max(self._pace_until, now) + nbytes * remaining / room
            self._pace_until = until
            if until - now >= MIN_DELAY_SLEEP:
                time.sleep(until - now)
            return
        self._write_count += 1
        if self._write_count % 32 == 0:
            time.sleep(0.001)

    def _make_room(self, force: bool = False) -> None:
        """Switch to a new memtable, waiting while flushes or level 0 are behind.

        While every immutable slot is still being flushed, the active memtable may
        run past its budget up to ``MEMTABLE_OVERRUN`` times it before writers wait:
        a flush that takes a little longer than filling a memtable then costs
        memory, not a write stall.
        """
        opts = self.options
        while force or self._mem.size >= opts.write_buffer_size:
            if self._bg_error is not None:
                self._check_writable()
            if self._closed:
                raise DBClosed(f"{self.path}: database is closed")
            if len(self._imms) >= opts.max_write_buffer_number - 1:
                if not force and self._mem.size < opts.write_buffer_size * MEMTABLE_OVERRUN:
                    if not self._paced:
                        self._paced = self._slowdown = True
                    return
                self.stats["stall_waits"] += 1
                self._cond.wait(1.0)
                continue
            if len(self._sv[2].levels[0]) >= opts.level0_stop_writes_trigger and not self._closing:
                self.stats["stall_waits"] += 1
                self._cond.wait(1.0)
                continue
            self._switch_memtable()
            return

    def _switch_memtable(self) -> None:
        number = self._vs.new_file_number()
        wal = LogWriter(self._file(log_name(number)), preallocate=WAL_PREALLOCATE)
        self._wal.close()
        self._unsynced_logs.append(self._wal.path)
        self._wal = wal
        self._wal_write = wal.write
        self._wal_dir_synced = False
        self._imms.append(self._mem)
        self._mem = MemTable(number)
        self._paced = False
        self._publish(self._sv[2])
        self._cond.notify_all()

    # ---------------------------------------------------------------- reads

    def get(self, key: bytes, snapshot: Snapshot | None = None) -> bytes | None:
        """The value of ``key`` (at ``snapshot`` if given), or None."""
        if type(key) is not bytes:
            key = _as_bytes(key, "key")
        mem, imms, version = self._sv
        if snapshot is None:
            snap = None
            value = mem.values.get(key, ABSENT)
            if value is not ABSENT:
                return value  # type: ignore[return-value]
            for imm in imms:
                value = imm.values.get(key, ABSENT)
                if value is not ABSENT:
                    return value  # type: ignore[return-value]
        else:
            snap = snapshot.seq
            found, value = mem.get(key, snap)
            if found:
                return value
            for imm in imms:
                found, value = imm.get(key, snap)
                if found:
                    return value
        # One hash serves every table's bloom filter (engine/bloom.py).
        h = crc32(key)
        mi = ((h * BLOOM_GOLDEN) & 0xFFFFFFFF) >> 16
        for f in version.levels[0]:
            if f.smallest <= key <= f.largest:
                r = f.reader
                nw = r.bloom_nwords
                if nw:
                    m = r.bloom_masks[mi]
                    if r.bloom_words[h % nw] & m != m:
                        continue
                r = r.lookup(key, snap)
                if r is not MISS:
                    return r  # type: ignore[return-value]
        for files, largests in version.runs:
            i = _bisect(largests, key)
            if i < len(files):
                f = files[i]
                if f.smallest <= key:
                    r = f.reader
                    nw = r.bloom_nwords
                    if nw:
                        m = r.bloom_masks[mi]
                        if r.bloom_words[h % nw] & m != m:
                            continue
                    r = r.lookup(key, snap)
                    if r is not MISS:
                        return r  # type: ignore[return-value]
        return None

    def iterator(self, lower: bytes | None = None, upper: bytes | None = None,
                 reverse: bool = False,
                 snapshot: Snapshot | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(key, value)`` for keys in ``[lower, upper)``, ascending or descending."""
        if lower is not None:
            lower = _as_bytes(lower, "lower")
        if upper is not None:
            upper = _as_bytes(upper, "upper")
        with self._lock:
            if self._closed:
                raise DBClosed(f"{self.path}: database is closed")
            mem, imms, version = self._sv
            # Memtables are the only mutable part of the view; tables are immutable
            # and the pinned version keeps them readable, so a snapshot is needed
            # only to keep memtable versions this iterator may still read.
            mems = [m for m in (mem, *imms) if len(m)]
            if snapshot is not None:
                seq = snapshot.seq
                own = None
            else:
                seq = self._seq
                own = self._register_snapshot(seq) if mems else None
        if lower is not None and upper is not None and lower >= upper:
            if own is not None:
                own.release()
            return iter(())
        merged = self._scan(mems, version, lower, upper, reverse, seq)
        # The sources read tables and memtables lazily; the version they pinned
        # keeps the tables readable. A registered snapshot lives as long as they do.
        return merged if own is None else _releasing(merged, own)

    def _scan(self, mems: list[MemTable], version: Version, lower: bytes | None,
              upper: bytes | None, reverse: bool, seq: int) -> Iterator[tuple[bytes, bytes]]:
        """Merged live pairs of the memtables and tables in range, as of ``seq``."""
        if lower is not None and upper is not None and lower >= upper:
            return iter(())
        if not reverse and not mems:
            single = self._single_run(version, lower, upper, seq)
            if single is not None:
                return single
        sign = -1 if reverse else 1
        sources = []
        rank = 0
        for m in mems:
            sources.append(m.scan(lower, upper, seq, sign * rank, reverse))
            rank += 1
        for f in version.overlapping(0, lower, upper):
            snap = None if f.largest_seq <= seq else seq
            sources.append(scan_tables(((f.reader, snap),), lower, upper, sign * rank, reverse))
            rank += 1
        for level in range(1, len(version.levels)):
            if version.levels[level]:
                tables = _level_tables(version.levels[level], version.largests[level],
                                       lower, upper, seq, reverse)
                sources.append(scan_tables(tables, lower, upper, sign * rank, reverse))
            rank += 1
        if len(sources) == 1:
            return _live(sources[0])
        return _merge_reverse(sources) if reverse else _merge_forward(sources)

    @staticmethod
    def _single_run(version: Version, lower: bytes | None, upper: bytes | None,
                    seq: int) -> Iterator[tuple[bytes, bytes]] | None:
        """A forward scan straight over the tables when only one sorted run (one
        level-0 table or one level) meets the range; None otherwise."""
        l0 = version.overlapping(0, lower, upper)
        runs = [level for level in range(1, len(version.levels)) if version.levels[level]]
        if len(l0) + len(runs) != 1:
            return None
        if l0:
            f = l0[0]
            tables: Iterator[tuple[TableReader, int | None]] = iter(
                ((f.reader, None if f.largest_seq <= seq else seq),))
        else:
            level = runs[0]
            tables = _level_tables(version.levels[level], version.largests[level],
                                   lower, upper, seq, False)
        return scan_live(tables, lower, upper)

    # ------------------------------------------------------------ snapshots

    def snapshot(self) -> Snapshot:
        """A read view of everything written so far; use ``with`` or ``release()``."""
        with self._lock:
            if self._closed:
                raise DBClosed(f"{self.path}: database is closed")
            return self._register_snapshot(self._seq)

    def _register_snapshot(self, seq: int) -> Snapshot:
        self._drain_releases()
        self._snapshots[seq] = self._snapshots.get(seq, 0) + 1
        if seq > self._snap_max:
            self._snap_max = seq
        return Snapshot(self, seq)

    def _release_snapshot(self, seq: int) -> None:
        # Releases can run from finalizers while this thread holds _lock; never block.
        if not self._lock.acquire(blocking=False):
            self._deferred_releases.append(seq)
            return
        try:
            self._drop_snapshot(seq)
            self._drain_releases()
        finally:
            self._lock.release()

    def _drop_snapshot(self, seq: int) -> None:
        n = self._snapshots.get(seq, 0) - 1
        if n > 0:
            self._snapshots[seq] = n
            return
        self._snapshots.pop(seq, None)
        if seq == self._snap_max:
            self._snap_max = max(self._snapshots, default=_NO_SNAPSHOT)

    def _drain_releases(self) -> None:
        """Apply releases deferred while _lock was busy (caller holds _lock)."""
        while self._deferred_releases:
            self._drop_snapshot(self._deferred_releases.pop())

    # ------------------------------------------------------ background work

    def _start_threads(self) -> None:
        t = threading.Thread(target=self._flush_loop, name=f"lsmdb-flush:{self.path}", daemon=True)
        self._threads.append(t)
        t.start()
        for i in range(self.options.max_background_compactions):
            t = threading.Thread(target=self._compaction_loop,
                                 name=f"lsmdb-compact{i}:{self.path}", daemon=True)
            self._threads.append(t)
            t.start()

    def _set_bg_error(self, exc: BaseException) -> None:
        with self._lock:
            if self._bg_error is None:
                if isinstance(exc, EngineError):
                    self._bg_error = exc
                else:
                    self._bg_error = BackgroundError(f"{type(exc).__name__}: {exc}")
            self._cond.notify_all()

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                while (not self._imms or self._bg_error is not None) and not self._closing:
                    self._cond.wait()
                if not self._imms or self._bg_error is not None:
                    return
                imm = self._imms[0]
            try:
                self._flush_memtable(imm)
            except BaseException as exc:  # noqa: BLE001 - reported to writers
                self._set_bg_error(exc)

    def _flush_memtable(self, imm: MemTable) -> None:
        opts = self.options
        vs = self._vs
        with self._vlock:
            number = vs.new_file_number()
            self._pending_tables = self._pending_tables | {number}
        path = self._file(table_name(number))
        try:
            started = time.monotonic()
            self._flush_estimate = imm.size / self._flush_rate
            self._flush_deadline = started + self._flush_estimate
            stats = run_job(flush_job, imm, path, opts.block_size, opts.compression,
                            opts.bloom_bits_per_key, isolated=opts.background_processes)
            elapsed = time.monotonic() - started
            if elapsed > 0 and imm.size:
                self._flush_rate = max(imm.size / elapsed, float(1 << 20))
            f = FileMeta(number, stats["size"], stats["smallest"], stats["largest"],
                         stats["smallest_seq"], stats["largest_seq"], 0, stats["num_entries"])
            self._open_reader(f)
            sync_dir(self.path)  # the table's name is durable before the MANIFEST names it
            with self._vlock:
                with self._lock:
                    log_number = self._imms[1].log_number if len(self._imms) > 1 \
                        else self._mem.log_number
                f.epoch = vs.next_epoch
                edit = VersionEdit(log_number=log_number, last_sequence=stats["largest_seq"],
                                   next_epoch=vs.next_epoch + 1, new_files=[(0, f)])
                version = vs.log_and_apply(edit)
                with self._lock:
                    self._imms.pop(0)
                    self._publish(version)
                    self.stats["flushes"] += 1
                    self.stats["bytes_flushed"] += f.size
                    self._cond.notify_all()
        finally:
            self._pending_tables = self._pending_tables - {number}
        self._delete_obsolete_files()

    def _compaction_loop(self) -> None:
        while True:
            with self._lock:
                c = None
                while not self._closing:
                    if self._bg_error is None and not self._manual_compactions:
                        c = self._picker.pick(self._sv[2], self._busy)
                        if c is not None:
                            break
                    self._cond.wait()
                if c is None:
                    return
                self._mark_busy(c)
            try:
                self._run_compaction(c)
            except BaseException as exc:  # noqa: BLE001 - reported to writers
                self._set_bg_error(exc)
            finally:
                self._unmark_busy(c)

    def _mark_busy(self, c: Compaction) -> None:
        self._busy.update(f.number for f in c.all_inputs)
        self._running_compactions += 1

    def _unmark_busy(self, c: Compaction) -> None:
        with self._lock:
            self._busy.difference_update(f.number for f in c.all_inputs)
            self._running_compactions -= 1
            self._cond.notify_all()

    def _run_compaction(self, c: Compaction) -> None:
        opts = self.options
        vs = self._vs
        deleted = [(c.level, f.number) for f in c.inputs] + \
                  [(c.output_level, f.number) for f in c.overlapping]
        if c.trivial_move:
            edit = VersionEdit(deleted_files=deleted,
                               new_files=[(c.output_level, f) for f in c.inputs])
            self._install(edit, [])
            self.stats["trivial_moves"] += 1
            return
        if c.level == 0:
            groups = [[self._file(table_name(f.number))] for f in c.inputs]
        else:
            groups = [[self._file(table_name(f.number)) for f in c.inputs]]
        groups.append([self._file(table_name(f.number)) for f in c.overlapping])
        with self._lock:
            self._drain_releases()
            snapshots = list(self._snapshots)
            tag = f"compaction-{vs.new_file_number()}-"
        try:
            outputs = run_job(compaction_job, groups, self._file(tag), snapshots, c.bottommost,
                              opts.target_file_size_base, opts.block_size, opts.compression,
                              opts.bloom_bits_per_key, isolated=opts.background_processes,
                              niceness=COMPACTION_NICENESS)
        except OSError as exc:
            raise BackgroundError(f"compaction failed: {exc}") from None
        epoch = c.epoch
        new_files = []
        try:
            with self._vlock:
                numbers = [vs.new_file_number() for _ in outputs]
                self._pending_tables = self._pending_tables | set(numbers)
            for number, out in zip(numbers, outputs, strict=True):
                os.rename(out["path"], self._file(table_name(number)))
                f = FileMeta(number, out["size"], out["smallest"], out["largest"],
                             out["smallest_seq"], out["largest_seq"], epoch, out["num_entries"])
                self._open_reader(f)
                new_files.append((c.output_level, f))
            sync_dir(self.path)
            self._install(VersionEdit(deleted_files=deleted, new_files=new_files), c.all_inputs)
        finally:
            for out in outputs:
                if os.path.exists(out["path"]):
                    os.unlink(out["path"])
            self._pending_tables = self._pending_tables - {f.number for _, f in new_files}
        self.stats["compactions"] += 1
        self.stats["bytes_compacted_in"] += sum(f.size for f in c.all_inputs)
        self.stats["bytes_compacted_out"] += sum(f.size for _, f in new_files)

    def _install(self, edit: VersionEdit, obsolete: list[FileMeta]) -> None:
        """Apply ``edit`` to the version current now and publish it."""
        with self._vlock:
            version = self._vs.log_and_apply(edit)
            with self._lock:
                # Ingested tables may carry sequence numbers above every write so far.
                if self._vs.last_sequence > self._seq:
                    self._seq = self._vs.last_sequence
                self._publish(version)
                self._cond.notify_all()
        for f in obsolete:
            if f.reader is not None:
                self.cache.erase_table(f.number << 24, f.reader.num_blocks)
            try:
                os.unlink(self._file(table_name(f.number)))
            except FileNotFoundError:
                pass

    # ------------------------------------------------------- manual control

    def flush(self) -> None:
        """Write the memtable to a level-0 table and wait until all flushes are done."""
        with self._lock:
            self._check_writable()
            if len(self._mem):
                self._make_room(force=True)
            while self._imms:
                if self._bg_error is not None:
                    self._check_writable()
                self._cond.wait(1.0)
            self._wal.flush()

    def compact_range(self, begin: bytes | None = None, end: bytes | None = None) -> None:
        """Flush, then merge every level's tables meeting ``[begin, end]`` downwards."""
        if begin is not None:
            begin = _as_bytes(begin, "begin")
        if end is not None:
            end = _as_bytes(end, "end")
        self.flush()
        with self._lock:
            self._manual_compactions += 1
            try:
                while self._running_compactions:
                    self._cond.wait(1.0)
            except BaseException:
                self._manual_compactions -= 1
                raise
        try:
            version = self._sv[2]
            last = max((lv for lv, files in enumerate(version.levels) if files), default=0)
            for level in range(max(last, 1)):
                with self._lock:
                    c = self._picker.pick_range(self._sv[2], level, begin, end, self._busy)
                    if c is None:
                        continue
                    self._mark_busy(c)
                try:
                    self._run_compaction(c)
                except BaseException as exc:
                    self._set_bg_error(exc)
                    raise
                finally:
                    self._unmark_busy(c)
        finally:
            with self._lock:
                self._manual_compactions -= 1
                self._cond.notify_all()

    def wait_for_compactions(self, timeout: float = 60.0) -> None:
        """Block until no compaction is running or pending (for tests and tools)."""
        if self.read_only:
            return  # no background work runs, though the levels may want some
        deadline = time.monotonic() + timeout
        with self._lock:
            while time.monotonic() < deadline:
                if self._bg_error is not None:
                    self._check_writable()
                idle = not self._imms and not self._running_compactions and \
                    self._picker.pick(self._sv[2], self._busy) is None
                if idle:
                    return
                self._cond.wait(0.1)

    # ---------------------------------------------------------- inspection

    def check(self) -> None:
        """Verify level invariants and every block checksum; raise Corruption if bad."""
        if self._closed:
            raise DBClosed(f"{self.path}: database is closed")
        version = self._sv[2]
        vs = self._vs
        check_version(version, self._file(f"MANIFEST-{vs.manifest_number:06d}"),
                      vs.next_epoch, vs.next_file_number)
        for level, f in version.files():
            reader = f.reader
            path = reader.path
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                if any(g is f for _, g in self._sv[2].files()):
                    raise Corruption(path, None, "live table file is missing") from None
                continue  # compacted away since this check began
            if size != f.size:
                raise Corruption(path, None, "table size differs from the MANIFEST")
            reader.verify()
            first = reader.first_key()
            if first is not None:
                if first < f.smallest or reader.index_keys[-1] > f.largest:
                    raise Corruption(path, None, f"keys outside the MANIFEST's range (level {level})")

    def level_file_counts(self) -> dict[int, int]:
        """Number of tables at each level of the current version."""
        return {level: len(files) for level, files in enumerate(self._sv[2].levels)}

    def property(self, name: str) -> object:
        """Introspection: ``levels`` (files and bytes per level), ``stats``, ``sequence``."""
        version = self._sv[2]
        if name == "levels":
            return [{"files": len(files), "bytes": sum(f.size for f in files)}
                    for files in version.levels]
        if name == "level0_epochs":
            return [f.epoch for f in version.levels[0]]
        if name == "sequence":
            return self._seq
        if name == "stats":
            mem, imms, _ = self._sv
            out = dict(self.stats)
            out.update(memtable_bytes=mem.size, immutable_memtables=len(imms),
                       block_cache_usage=self.cache.usage, block_cache_hits=self.cache.hits,
                       block_cache_misses=self.cache.misses, sequence=self._seq,
                       live_snapshots=sum(self._snapshots.values()))
            return out
        raise InvalidArgument(f"unknown property {name!r}")

    # ---------------------------------------------------------------- close

    def close(self) -> None:
        """Flush the memtable, wait for background work, release the lock."""
        if self._closed:
            return
        if self.read_only:
            # Nothing was written and no thread started: just let go of the files.
            with self._lock:
                self._closed = True
                self._vs.close()
                self._release_lock()
                self._close_tables()
            return
        try:
            if self._bg_error is None:
                self.flush()
        finally:
            with self._lock:
                self._closing = True
                self._cond.notify_all()
            for t in self._threads:
                t.join()
            with self._lock:
                self._closed = True
                try:
                    self._wal.close(sync=True)
                finally:
                    self._vs.close()
                    self._release_lock()
                    self._close_tables()

    def _close_tables(self) -> None:
        """Let go of every table's mapping (and the descriptor it keeps) now, rather
        than whenever the collector gets to them: a closed database holds no file open,
        so the filesystem under it can be unmounted."""
        self.cache.clear()
        for _, f in self._vs.current.files():
            if f.reader is not None:
                f.reader.close()

    def __enter__(self) -> DB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


def _must_create(path: str, options: Options, read_only: bool) -> bool:
    """Whether opening ``path`` creates a database; raise if it may not be opened.

    Reads only: nothing is created or locked until the directory has passed.
    """
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        names = None
    except NotADirectoryError:
        raise InvalidArgument(f"{path}: not a directory") from None
    if names is not None and "CURRENT" in names:
        if options.error_if_exists:
            raise InvalidArgument(f"{path}: database exists (error_if_exists is on)")
        return False
    # A LOCK alone is what a creation interrupted before writing CURRENT leaves;
    # such a directory still counts as empty, so the creation can be retried.
    others = [n for n in names or () if n != "LOCK"]
    if any(m and (m.group(2) == "sst" or m.group(3)) for m in map(_FILE_RE.match, others)):
        raise Corruption(os.path.join(path, "CURRENT"), None,
                         "CURRENT is missing but tables or MANIFESTs exist")
    if others:
        if read_only or not options.create_if_missing:
            raise InvalidArgument(f"{path}: not a database (no CURRENT file)")
        raise InvalidArgument(f"{path}: not a database (no CURRENT file) and not empty; "
                              "a database is only created in a missing or empty directory")
    if read_only or not options.create_if_missing:
        what = "no such directory" if names is None else "the directory is empty"
        raise InvalidArgument(f"{path}: database does not exist ({what})")
    return True


def _level_tables(files: list[FileMeta], largests: list[bytes], lower: bytes | None,
                  upper: bytes | None, seq: int,
                  reverse: bool) -> Iterator[tuple[TableReader, int | None]]:
    """The tables of one sorted, non-overlapping level that meet ``[lower, upper)``,
    in scan order, each with the snapshot to read it at; found lazily."""
    if not reverse:
        i = _bisect(largests, lower) if lower is not None else 0
        while i < len(files):
            f = files[i]
            if upper is not None and f.smallest >= upper:
                return
            yield f.reader, None if f.largest_seq <= seq else seq
            i += 1
        return
    i = min(_bisect(largests, upper), len(files) - 1) if upper is not None else len(files) - 1
    while i >= 0:
        f = files[i]
        if lower is not None and f.largest < lower:
            return
        if upper is None or f.smallest < upper:
            yield f.reader, None if f.largest_seq <= seq else seq
        i -= 1


def _releasing(items: Iterator[tuple[bytes, bytes]], snapshot: Snapshot) -> Iterator[tuple[bytes, bytes]]:
    try:
        yield from items
    finally:
        snapshot.release()


def _live(source: Iterator[tuple[bytes, int, bytes | None]]) -> Iterator[tuple[bytes, bytes]]:
    """The pairs of a single source, deletions left out."""
    for key, _, value in source:
        if value is not None:
            yield key, value


def _merge_reverse(sources: list[Iterator[tuple[bytes, int, bytes | None]]]) -> Iterator[tuple[bytes, bytes]]:
    """Like ``_merge_forward`` for sources in descending key order (ranks negated)."""
    last = None
    for key, _, value in heapq.merge(*sources, reverse=True):
        if key == last:
            continue
        last = key
        if value is not None:
            yield key, value


def _merge_forward(sources: list[Iterator[tuple[bytes, int, bytes | None]]]) -> Iterator[tuple[bytes, bytes]]:
    """Merge sources yielding ``(key, rank, value)`` in key order; for a key the lowest
    rank (newest source) wins and a None value (a deletion) hides the key."""
    heap = []
    for src in sources:
        nxt = src.__next__
        try:
            key, rank, value = nxt()
        except StopIteration:
            continue
        heap.append([key, rank, value, nxt])
    heapify(heap)
    last = None
    while len(heap) > 1:
        top = heap[0]
        key = top[0]
        if key != last:
            last = key
            if top[2] is not None:
                yield key, top[2]
        try:
            top[0], _, top[2] = top[3]()
        except StopIteration:
            heappop(heap)
            continue
        heapreplace(heap, top)
    if heap:
        key, _, value, nxt = heap[0]
        while True:
            if key != last and value is not None:
                yield key, value
            try:
                key, _, value = nxt()
            except StopIteration:
                return
