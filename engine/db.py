"""The database handle: the public API, the write path and point reads.

``DB.open`` checks the directory, takes LOCK and recovers (engine/recovery.py);
range reads merge their sources in engine/iterator.py; snapshots are counted in
engine/snapshots.py; write pacing is decided by engine/write_controller.py; flushes
and compactions run on engine/background.py's threads.

Locks. Writers serialise on ``_lock``: each write is one WAL record, then its
versions go into the active memtable. A full memtable becomes immutable (a new WAL
starts) and the flush thread turns it into a level-0 table. ``_cond`` (on ``_lock``)
wakes writers waiting for room and the background threads. ``_vlock`` serialises
MANIFEST edits and the file-number counter; a thread holding both takes ``_vlock``
first.

Range tombstones (``delete_range``) are read through engine/range_tombstones.py:
while the read view holds any, ``get`` takes a path that asks each source's
fragmented tombstones, and iterators combine them (engine/iterator.py).

Readers take no lock: ``_sv`` (memtable, immutable memtables newest first, version)
is replaced as one tuple, so a reader always sees a consistent set. A version is
published before the memtable it absorbed is dropped from ``_sv``. A reader pins
the version it reads (``Version.pins``: ``get`` for its duration, an iterator until
closed); a table a compaction dropped is unlinked only once neither the current
version nor a pinned one names it (``_unlink_dropped_tables``).

Invariants: every acknowledged write is in the WAL or in a table named by the
MANIFEST; level 0 is read newest ``epoch_number`` first; an edit is applied to the
version current when it is installed, never to the one its work started from.
"""

from __future__ import annotations

import fcntl
import os
import threading
from bisect import bisect_left as _bisect
from collections.abc import Iterable, Iterator

from .background import BackgroundWork
from .block_cache import BlockCache
from .bloom import key_hash, probes_for
from .bloom import masks as bloom_masks
from .errors import BackgroundError, Corruption, DBClosed, EngineError, InvalidArgument, LockError
from .filename import LOCK, log_name, obsolete_files, remove_files, sync_dir, table_name
from .ingest import ingest_files
from .iterator import releasing, scan
from .memtable import ABSENT, ENTRY_OVERHEAD, SHARD_MASK, MemTable
from .options import Options
from .range_tombstones import largest_covered
from .recovery import check_directory, recover
from .snapshots import Snapshot, SnapshotList
from .sync_points import sync_point
from .table_reader import MISS, TableReader
from .version import FileMeta, Version, VersionEdit, VersionPin, VersionSet, check_version
from .wal import WAL_PREALLOCATE, LogWriter, frame
from .write_batch import Op, WriteBatch, as_bytes, encode_batch, insert_into, op_bytes, put_record
from .write_controller import Room, WriteController


class DB:
    """An open database. Create with ``DB.open(path, options)``."""

    def __init__(self, path: str, options: Options, read_only: bool = False) -> None:
        # Use DB.open(): it fills the write path's fields from recovery.
        self.path = path
        self.options = options
        self.read_only = read_only
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._vlock = threading.Lock()
        self._lock_file: int | None = None
        self._closed = True
        self._closing = False
        # The first failure of a flush or compaction; writes are refused once set.
        self._bg_error: EngineError | None = None
        self.cache = BlockCache(options.block_cache_size)
        self.stats = {"flushes": 0, "compactions": 0, "trivial_moves": 0,
                      "bytes_flushed": 0, "bytes_compacted_in": 0, "bytes_compacted_out": 0,
                      "stall_waits": 0}
        self._vs = VersionSet(path, options.num_levels)
        self._vs.on_invalid_edit = self._stop_writes
        self._snapshots = SnapshotList(self._lock)
        self._write_controller = WriteController(options)
        self._background = BackgroundWork(self)
        # The write path (guarded by _lock): the last sequence number used, the active
        # memtable and the append of its log, the immutable memtables (oldest first),
        # and the logs that may hold writes not yet synced.
        self._seq = 0
        self._mem = MemTable(0)
        self._imms: list[MemTable] = []
        self._wal: LogWriter | None = None
        # Bound to the log's write once open; a read-only handle keeps this refusal.
        self._wal_write = self._refuse_write
        self._wal_dir_synced = False
        self._unsynced_logs: list[str] = []
        self._write_buffer_size = options.write_buffer_size
        # What readers see: (memtable, immutable memtables newest first, version).
        self._sv: tuple[MemTable, tuple[MemTable, ...], Version] = (self._mem, (), self._vs.current)
        # Tables in use after they left the current version. ``_retired``: versions
        # replaced while a reader pinned them; ``_dropped``: tables a compaction
        # removed, by number, not yet unlinked. Changed under _lock; read by
        # _unlink_dropped_tables without it.
        self._retired: list[Version] = []
        self._dropped: dict[int, FileMeta] = {}
        self._unlink_lock = threading.Lock()
        self._unlink_wanted = False

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
        create = check_directory(path, options, read_only)
        if create and not os.path.isdir(path):
            os.makedirs(path, exist_ok=True)
        # Built once here so forked table builders inherit it.
        bloom_masks(probes_for(options.bloom_bits_per_key))
        db = cls(path, options, read_only)
        db._acquire_lock()
        try:
            state = recover(path, options, db._vs, db.cache, read_only, create)
        except BaseException:
            db._release_lock()
            raise
        db._seq = state.last_sequence
        db._mem = state.mem
        if state.wal is not None:
            db._wal = state.wal
            db._wal_write = state.wal.write
        db._publish(db._vs.current)
        db._closed = False
        if not read_only:
            db._background.start()
        return db

    def _acquire_lock(self) -> None:
        if self.read_only:
            try:
                fd = os.open(os.path.join(self.path, LOCK), os.O_RDONLY)
            except FileNotFoundError:
                # Only a copied or hand-edited database lacks LOCK; making one would
                # be a write, and a writer that opens later creates it anyway.
                return
            mode = fcntl.LOCK_SH
        else:
            fd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
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

    # ------------------------------------------------------------ versions

    def _publish(self, version: Version) -> None:
        """Make ``version`` and the memtables visible to readers (caller may hold _lock)."""
        version.note_range_tombstones()
        old = self._sv[2]
        self._sv = (self._mem, tuple(reversed(self._imms)), version)
        # Checked after the swap: a reader pinning ``old`` later sees the swap and
        # lets go (``get``), or pins under _lock, which the caller holds (iterator).
        if old is not version and old.pins:
            self._retired.append(old)
        self._write_controller.set_level0_files(len(version.levels[0]))

    def _install(self, edit: VersionEdit, obsolete: list[FileMeta]) -> None:
        """Apply ``edit`` to the version current now, publish it, and unlink the
        tables in ``obsolete`` (which it no longer names) once no reader uses them."""
        with self._vlock:
            version = self._vs.log_and_apply(edit)
            with self._lock:
                # Ingested tables may carry sequence numbers above every write so far.
                if self._vs.last_sequence > self._seq:
                    self._seq = self._vs.last_sequence
                self._publish(version)
                for f in obsolete:
                    self._dropped[f.number] = f
                self._cond.notify_all()
        self._unlink_dropped_tables()

    def _pin_current(self) -> Version:
        """Pin the current version for a read; ``_unpin`` when done. Lock-free: the
        pin is re-checked after the version is read, so a version replaced in
        between (whose tables may already be going) is never used."""
        while True:
            version = self._sv[2]
            version.pins.append(None)
            if self._sv[2] is version:
                return version
            version.pins.pop()

    def _unpin(self, version: Version) -> None:
        version.pins.pop()
        if not version.pins and version is not self._sv[2]:
            self._unlink_dropped_tables()

    def _unlink_dropped_tables(self) -> None:
        """Unlink the dropped tables that neither the current version nor a pinned
        one names. Takes no DB lock and never blocks: a reader's release may run
        here from a finalizer on a thread that holds one. A call finding another
        at work leaves it a note to run once more."""
        self._unlink_wanted = True
        while self._unlink_wanted and self._unlink_lock.acquire(blocking=False):
            try:
                self._unlink_wanted = False
                # Dropped first, then the versions: a table is added to _dropped
                # only after the version that stopped naming it was published.
                dropped = list(self._dropped.values())
                if not dropped:
                    continue
                current = self._sv[2]
                in_use = {f.number for _, f in current.files()}
                for v in list(self._retired):
                    if v.pins and v is not current:
                        in_use.update(f.number for _, f in v.files())
                    else:
                        self._retired.remove(v)
                gone = [f for f in dropped if f.number not in in_use]
                if not gone:
                    continue
                sync_point("unlink_dropped:before", sorted(f.number for f in gone))
                for f in gone:
                    if f.reader is not None:
                        f.reader.evict()
                        f.reader.close()
                    try:
                        os.unlink(os.path.join(self.path, table_name(f.number)))
                    except FileNotFoundError:
                        pass
                    self._dropped.pop(f.number, None)
            finally:
                self._unlink_lock.release()

    def _delete_obsolete_files(self) -> None:
        """Remove tables, logs and MANIFESTs the current state no longer names."""
        vs = self._vs
        with self._vlock, self._lock:
            # Read together: a table below the counter that is neither pending nor
            # live at this moment is dead for good, as numbers are never reused.
            floor = vs.next_file_number
            pending = self._background.pending_tables
            # Dropped tables are unlinked by _unlink_dropped_tables once unused.
            live_tables = {f.number for _, f in vs.current.files()} | set(self._dropped)
            live_logs = {m.log_number for m in self._imms} | {self._mem.log_number}
            log_floor = vs.log_number
            manifest = vs.manifest_number
        dead = obsolete_files(
            os.listdir(self.path), live_tables=live_tables, pending_tables=pending,
            table_floor=floor, live_logs=live_logs, log_floor=log_floor, manifest=manifest,
            recovering=False)
        sync_point("delete_obsolete:before", dead)
        remove_files(self.path, dead)

    def _stop_writes(self, exc: EngineError) -> None:
        """Refuse writes from now on because of ``exc`` (a version edit that failed
        its check). Takes no lock: the caller may hold _vlock and _lock; a write
        reads ``_bg_error`` under _lock, so the next one sees it."""
        if self._bg_error is None:
            self._bg_error = exc

    def _set_bg_error(self, exc: BaseException) -> None:
        with self._lock:
            if self._bg_error is None:
                if isinstance(exc, EngineError):
                    self._bg_error = exc
                else:
                    self._bg_error = BackgroundError(f"{type(exc).__name__}: {exc}")
            self._cond.notify_all()

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
            key = as_bytes(key, "key")
        if type(value) is not bytes:
            value = as_bytes(value, "value")
        if self._write_controller.slowdown:
            self._write_controller.delay(len(key) + len(value) + ENTRY_OVERHEAD, self._mem.size)
        with self._lock:
            if self._closed or self._bg_error is not None:
                self._check_writable()
            seq = self._seq + 1
            self._wal_write(put_record(seq, key, value))
            mem = self._mem
            shard = hash(key) & SHARD_MASK
            values = mem.shard_values[shard]
            # Over a deletion, MemTable.add decides what to keep.
            if self._snapshots.newest < 0 and values.get(key, key) is not None:
                mem.shard_seqs[shard][key] = seq
                values[key] = value
                mem.size += len(key) + len(value) + ENTRY_OVERHEAD
            else:
                mem.add(seq, key, value, self._snapshots.newest)
            self._seq = seq
            if sync:
                self._sync_wal()
            if mem.size >= self._write_buffer_size:
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
        if self._write_controller.slowdown:
            self._write_controller.delay(op_bytes(ops), self._mem.size)
        with self._lock:
            self._apply(ops, sync, batch._plain)

    def delete_range(self, begin: bytes, end: bytes, sync: bool = False) -> None:
        """Delete every key in ``[begin, end)``: one range tombstone, whose cost does
        not depend on how many keys the range holds. ``begin == end`` deletes nothing;
        ``begin > end`` is InvalidArgument."""
        batch = WriteBatch()
        batch.delete_range(begin, end)
        self.write(batch, sync=sync)

    def single_delete(self, key: bytes, sync: bool = False) -> None:
        """Delete ``key``, which must have been put exactly once since it was last
        deleted; in compaction the deletion and that put vanish together. Putting the
        key twice, or mixing in ``delete``, breaks the contract: what reads return
        then is undefined (an older value may come back), but nothing crashes and no
        file is damaged (docs/engine-format.md, "Single deletion")."""
        batch = WriteBatch()
        batch.single_delete(key)
        self.write(batch, sync=sync)

    def _apply(self, ops: list[Op], sync: bool, plain: bool = True) -> None:
        """Log and apply a batch (caller holds ``_lock``); ``plain``: only puts and
        deletes, which take the fast form."""
        if self._closed or self._bg_error is not None:
            self._check_writable()
        first = self._seq + 1
        self._wal_write(frame(encode_batch(first, ops)))
        mem = self._mem
        size = 0
        newest_snapshot = self._snapshots.newest
        if plain and newest_snapshot < 0:
            # A put over a deletion (in the memtable or earlier in the batch) is
            # MemTable.add's to apply, so then the batch takes the general form
            # below. Snapshots and iterators, taken under _lock, see the batch
            # whole; a lone get sees each key before or after it.
            shard_values, shard_seqs = mem.shard_values, mem.shard_seqs
            staged: dict[bytes, bytes | None] = {}
            for key, value in ops:
                if value is not None and (
                        staged.get(key, key) is None
                        or shard_values[hash(key) & SHARD_MASK].get(key, key) is None):
                    plain = False
                    break
                staged[key] = value  # type: ignore[assignment]
                size += len(key) + (len(value) if value is not None else 0) + ENTRY_OVERHEAD
            else:
                seq = first
                for key, value in ops:
                    shard = hash(key) & SHARD_MASK
                    shard_seqs[shard][key] = seq
                    shard_values[shard][key] = value  # type: ignore[assignment]
                    seq += 1
                mem.size += size
        if not plain or newest_snapshot >= 0:
            insert_into(mem, first, ops, newest_snapshot)
        self._seq = first + len(ops) - 1
        if sync:
            self._sync_wal()
        if mem.size >= self._write_buffer_size:
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
        assert self._wal is not None
        self._wal.sync()
        if not self._wal_dir_synced:
            sync_dir(self.path)
            self._wal_dir_synced = True

    def _make_room(self, force: bool = False) -> None:
        """Switch to a new memtable, or pace, or wait while flushes or level 0 are
        behind: the write controller decides which (caller holds ``_lock``)."""
        pacing = self._write_controller
        while force or self._mem.size >= self._write_buffer_size:
            if self._bg_error is not None:
                self._check_writable()
            if self._closed:
                raise DBClosed(f"{self.path}: database is closed")
            room = pacing.make_room(self._mem.size, len(self._imms), len(self._sv[2].levels[0]),
                                    force, self._closing)
            if room is Room.PACE:
                return
            if room is Room.STALL:
                self.stats["stall_waits"] += 1
                self._cond.wait(1.0)
                continue
            self._switch_memtable()
            return

    def _switch_memtable(self) -> None:
        assert self._wal is not None
        number = self._vs.new_file_number()
        wal = LogWriter(os.path.join(self.path, log_name(number)), preallocate=WAL_PREALLOCATE)
        self._wal.close()
        self._unsynced_logs.append(self._wal.path)
        self._wal = wal
        self._wal_write = wal.write
        self._wal_dir_synced = False
        self._imms.append(self._mem)
        self._mem = MemTable(number)
        self._write_controller.memtable_switched()
        self._publish(self._sv[2])
        self._cond.notify_all()

    # ---------------------------------------------------------------- reads

    def get(self, key: bytes, snapshot: Snapshot | None = None) -> bytes | None:
        """The value of ``key`` (at ``snapshot`` if given), or None."""
        if type(key) is not bytes:
            key = as_bytes(key, "key")
        # Pinned so a compaction finishing meanwhile does not unlink its tables:
        # ``_pin_current`` written out, as this is the hottest path.
        while True:
            mem, imms, version = self._sv
            pins = version.pins
            pins.append(None)
            if self._sv[2] is version:
                break
            pins.pop()
        try:
            if mem.range_dels or version.has_range_tombstones or (
                    imms and any(imm.range_dels for imm in imms)):
                return self._get_under_tombstones(
                    key, None if snapshot is None else snapshot.seq, mem, imms, version)
            if snapshot is None:
                snap = None
                shard = hash(key) & SHARD_MASK
                value = mem.shard_values[shard].get(key, ABSENT)
                if value is not ABSENT:
                    return value  # type: ignore[return-value]
                # Tested first: most reads meet no immutable memtable, and an empty loop
                # still makes an iterator.
                if imms:
                    for imm in imms:
                        value = imm.shard_values[shard].get(key, ABSENT)
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
            # One hash serves every table's filter.
            h = key_hash(key)
            for f in version.levels[0]:
                if f.smallest <= key <= f.largest:
                    r = f.reader
                    if r.bloom.may_contain(h):
                        r = r.lookup(key, snap)
                        if r is not MISS:
                            return r  # type: ignore[return-value]
            runs = version.runs
            if runs:
                for files, largests in runs:
                    i = _bisect(largests, key)
                    if i < len(files):
                        f = files[i]
                        if f.smallest <= key:
                            r = f.reader
                            if r.bloom.may_contain(h):
                                r = r.lookup(key, snap)
                                if r is not MISS:
                                    return r  # type: ignore[return-value]
            return None
        finally:
            pins.pop()
            if not pins and self._sv[2] is not version:
                self._unlink_dropped_tables()

    def _get_under_tombstones(self, key: bytes, snap: int | None, mem: MemTable,
                              imms: tuple[MemTable, ...], version: Version) -> bytes | None:
        """``get`` in a view holding range tombstones. Sources are read newest first;
        the version found is deleted when a tombstone over ``key`` that the read sees,
        in its source or a newer one, has a higher sequence number. Each source answers
        with one binary search in its fragmented tombstones."""
        covered = 0
        for m in (mem, *imms):
            if m.range_dels:
                t = m.tombstones().covering(key, snap)
                if t > covered:
                    covered = t
            found = m.version(key, snap)
            if found is not None:
                return None if found[0] < covered else found[1]
        h = key_hash(key)
        for f in version.levels[0]:
            if f.smallest <= key <= f.largest:
                covered, found = _table_get(f.reader, key, h, snap, covered)
                if found is not MISS:
                    return found  # type: ignore[return-value]
        for files, largests in version.runs:
            i = _bisect(largests, key)
            if i < len(files) and files[i].smallest <= key:
                covered, found = _table_get(files[i].reader, key, h, snap, covered)
                if found is not MISS:
                    return found  # type: ignore[return-value]
        return None

    def iterator(self, lower: bytes | None = None, upper: bytes | None = None,
                 reverse: bool = False,
                 snapshot: Snapshot | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(key, value)`` for keys in ``[lower, upper)``, ascending or descending."""
        if lower is not None:
            lower = as_bytes(lower, "lower")
        if upper is not None:
            upper = as_bytes(upper, "upper")
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
                own = self._snapshots.register(seq) if mems else None
            if lower is not None and upper is not None and lower >= upper:
                if own is not None:
                    own.release()
                return iter(())
            # Under _lock, so the version cannot be replaced before it is pinned.
            pin = VersionPin(version, self._unpin)
        merged = scan(mems, version, lower, upper, reverse, seq)
        # The sources read tables and memtables lazily; the pinned version keeps
        # the tables on disk and readable. A registered snapshot lives as long.
        return releasing(merged, pin) if own is None else releasing(merged, pin, own)

    def snapshot(self) -> Snapshot:
        """A read view of everything written so far; use ``with`` or ``release()``."""
        with self._lock:
            if self._closed:
                raise DBClosed(f"{self.path}: database is closed")
            return self._snapshots.register(self._seq)

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
            assert self._wal is not None
            self._wal.flush()

    def ingest(self, paths: Iterable[str | os.PathLike], move: bool = False) -> None:
        """Add the external tables at ``paths`` (engine/sst_file_writer.py) as the
        newest data: all get one new sequence number, each a new epoch, and each goes
        to the deepest level where it overlaps nothing above (engine/ingest.py).
        Every file is checked first; IngestionError names a bad one, and then the
        database is unchanged. A memtable overlapping them is flushed first. The files
        are copied, or hard-linked with ``move`` (copied across filesystems)."""
        ingest_files(self, paths, move)

    def compact_range(self, begin: bytes | None = None, end: bytes | None = None) -> None:
        """Flush, then merge every level's tables meeting ``[begin, end]`` downwards."""
        if begin is not None:
            begin = as_bytes(begin, "begin")
        if end is not None:
            end = as_bytes(end, "end")
        self.flush()
        self._background.compact_range(begin, end)

    def wait_for_compactions(self, timeout: float = 60.0) -> None:
        """Block until no compaction is running or pending (for tests and tools)."""
        if self.read_only:
            return  # no background work runs, though the levels may want some
        self._background.wait_idle(timeout)

    # ---------------------------------------------------------- inspection

    def check(self) -> None:
        """Verify level invariants and every block checksum; raise Corruption if bad."""
        if self._closed:
            raise DBClosed(f"{self.path}: database is closed")
        # Pinned: a compaction finishing meanwhile leaves these tables in place.
        version = self._pin_current()
        try:
            self._check_version_tables(version)
        finally:
            self._unpin(version)

    def _check_version_tables(self, version: Version) -> None:
        """``check`` of a pinned version: the level rules, then per table its size,
        every block (checksum, entry order: ``TableReader.verify``), its keys and
        range tombstones inside the MANIFEST's bounds, tombstones in start order, and
        a filter that matches every key it holds (a filter missing one would make
        point reads skip the key)."""
        vs = self._vs
        check_version(version, vs.manifest_path(), vs.next_epoch, vs.next_file_number)
        for level, f in version.files():
            reader = f.reader
            path = reader.path
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                raise Corruption(path, None, "live table file is missing") from None
            if size != f.size:
                raise Corruption(path, None, "table size differs from the MANIFEST")
            reader.verify()
            first = reader.first_key()
            if first is not None:
                if first < f.smallest or reader.index_keys[-1] > f.largest:
                    raise Corruption(path, None, f"keys outside the MANIFEST's range (level {level})")
            prev_start = None
            for start, end, _ in reader.range_tombstones:
                if not start < end or start < f.smallest or largest_covered(end) > f.largest:
                    raise Corruption(path, None, "range tombstone outside the MANIFEST's range "
                                                 f"(level {level})")
                if prev_start is not None and start < prev_start:
                    raise Corruption(path, reader.footer_handles[2][0],
                                     "range tombstones out of order")
                prev_start = start
            may_contain = reader.bloom.may_contain
            for (off, _), (keys, _, _) in zip(reader.handles, reader.blocks(), strict=True):
                for key in keys:
                    if not may_contain(key_hash(key)):
                        raise Corruption(path, reader.footer_handles[1][0],
                                         f"filter does not match key {key!r} of the block "
                                         f"at offset {off}")

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
                       live_snapshots=self._snapshots.count())
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
            self._background.join()
            # Tables an open iterator still pins stay; the next open removes them.
            self._unlink_dropped_tables()
            with self._lock:
                self._closed = True
                try:
                    assert self._wal is not None
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


def _table_get(r: TableReader, key: bytes, h: int, snap: int | None,
               covered: int) -> tuple[int, object]:
    """One table's step of ``DB._get_under_tombstones``: ``covered`` raised by the
    table's tombstones over ``key``, and the value it holds (None: deleted) or MISS;
    ``h`` is the key's filter hash."""
    tombs = r.tombstones
    if tombs is not None:
        t = tombs.covering(key, snap)
        if t > covered:
            covered = t
    if r.bloom.may_contain(h):
        found = r.lookup(key, snap, True)
        if found is not MISS:
            seq, value = found  # type: ignore[misc]
            return covered, None if seq < covered else value
    return covered, MISS
