"""The background threads: one flushes immutable memtables into level-0 tables, the
others run compactions; and the manual forms of both (``DB.compact_range``).

Tables are built by the job functions of engine/compaction.py, in child processes
(engine/forked_job.py); the threads here choose the work, hand out file numbers and
install each result as one MANIFEST edit through ``DB._install``. They work on the
DB's state under the DB's locks (engine/db.py describes both).

Invariants: a table number handed to a job stays in ``pending_tables`` until its
edit is installed or the job is abandoned, so obsolete-file deletion never takes
it; a table being compacted stays in ``busy`` until its compaction is installed or
has failed, so it is never picked twice, and a compaction stays in ``running`` as
long, so none is picked whose outputs could meet its outputs in a level (up to
``max_background_compactions`` run at once); an immutable memtable leaves the DB's
list only together with the version holding its table. Test-only sync points
(engine/sync_points.py) mark the steps a test may hold.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from .compaction import Compaction, CompactionPicker, compaction_job, flush_job
from .errors import BackgroundError
from .filename import compaction_temp_prefix, sync_dir, table_name
from .forked_job import run_job
from .memtable import MemTable
from .sync_points import sync_point
from .table_reader import open_table
from .version import FileMeta, VersionEdit

if TYPE_CHECKING:
    from .db import DB

# Compaction children run below flushes and the foreground on a shared machine.
COMPACTION_NICENESS = 10

# Compactions reading at least this many bytes run in a fresh interpreter, not a
# fork of this process (engine/forked_job.py says why); its start, about 0.1 s, is
# small beside theirs.
FRESH_INTERPRETER_BYTES = 8 << 20

# sys.getrefcount of a flushed memtable held only by the flush loop's variable: that
# variable and getrefcount's own argument. Then no reader can reach it any more.
_ONLY_THE_FLUSH_LOOP = 2


class BackgroundWork:
    """The flush and compaction threads of one open database."""

    def __init__(self, db: DB) -> None:
        self._db = db
        options = db.options
        self.picker = CompactionPicker(options.num_levels,
                                       options.level0_file_num_compaction_trigger,
                                       options.max_bytes_for_level_base,
                                       options.max_bytes_for_level_multiplier)
        # Numbers of the tables being compacted, and the compactions running
        # (guarded by the DB's _lock).
        self.busy: set[int] = set()
        self.running: list[Compaction] = []
        self.running_compactions = 0
        # While a manual compaction runs, the threads pick nothing.
        self.manual_compactions = 0
        # Table numbers allocated to a flush or compaction but not yet installed;
        # replaced whole, so readers need no lock.
        self.pending_tables: frozenset[int] = frozenset()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        db = self._db
        t = threading.Thread(target=self._flush_loop, name=f"lsmdb-flush:{db.path}", daemon=True)
        self._threads.append(t)
        t.start()
        for i in range(db.options.max_background_compactions):
            t = threading.Thread(target=self._compaction_loop,
                                 name=f"lsmdb-compact{i}:{db.path}", daemon=True)
            self._threads.append(t)
            t.start()

    def join(self) -> None:
        """Wait for the threads to end (the DB has set ``_closing`` and woken them)."""
        for t in self._threads:
            t.join()

    # ------------------------------------------------------------------ flush

    def _flush_loop(self) -> None:
        db = self._db
        while True:
            with db._lock:
                while (not db._imms or db._bg_error is not None) and not db._closing:
                    db._cond.wait()
                if not db._imms or db._bg_error is not None:
                    return
                imm = db._imms[0]
            try:
                self.flush_memtable(imm)
            except BaseException as exc:  # noqa: BLE001 - reported to writers
                db._set_bg_error(exc)
            else:
                # Freed a shard at a time, here, before the next flush forks (pages
                # a live child shares would be copied on write), not in one step
                # wherever the last reference goes (a write would wait that out).
                unreachable = sys.getrefcount(imm) == _ONLY_THE_FLUSH_LOOP
                if unreachable:
                    imm.release()
                sync_point("flush:retired", unreachable)
            del imm

    def flush_memtable(self, imm: MemTable) -> None:
        """Write the oldest immutable memtable ``imm`` to a level-0 table and install it."""
        db = self._db
        opts = db.options
        vs = db._vs
        pacing = db._write_controller
        with db._vlock:
            number = vs.new_file_number()
            self.pending_tables = self.pending_tables | {number}
        path = os.path.join(db.path, table_name(number))
        try:
            started = pacing.flush_started(imm.size)
            stats = run_job(flush_job, imm, path, opts.block_size, opts.compression,
                            opts.bloom_bits_per_key, isolated=opts.background_processes)
            pacing.flush_finished(imm.size, started)
            f = FileMeta(number, stats["size"], stats["smallest"], stats["largest"],
                         stats["smallest_seq"], stats["largest_seq"], 0, stats["num_entries"])
            open_table(db.path, f, db.cache)
            sync_dir(db.path)  # the table's name is durable before the MANIFEST names it
            sync_point("flush:built", f)
            with db._vlock:
                sync_point("flush:before_install", f)
                with db._lock:
                    log_number = db._imms[1].log_number if len(db._imms) > 1 \
                        else db._mem.log_number
                f.epoch = vs.next_epoch
                edit = VersionEdit(log_number=log_number, last_sequence=stats["largest_seq"],
                                   next_epoch=vs.next_epoch + 1, new_files=[(0, f)])
                version = vs.log_and_apply(edit)
                with db._lock:
                    db._imms.pop(0)
                    db._publish(version)
                    db.stats["flushes"] += 1
                    db.stats["bytes_flushed"] += f.size
                    db._cond.notify_all()
        finally:
            self._release_numbers({number})
        db._delete_obsolete_files()
        sync_point("flush:finished", f)

    # ------------------------------------------------------------- compaction

    def _compaction_loop(self) -> None:
        db = self._db
        while True:
            with db._lock:
                c = None
                while not db._closing:
                    if db._bg_error is None and not self.manual_compactions:
                        c = self.picker.pick(db._sv[2], self.busy, self.running)
                        if c is not None:
                            break
                    db._cond.wait()
                if c is None:
                    return
                self.mark_busy(c)
            try:
                self.run_compaction(c)
            except BaseException as exc:  # noqa: BLE001 - reported to writers
                db._set_bg_error(exc)
            finally:
                self.unmark_busy(c)

    def mark_busy(self, c: Compaction) -> None:
        """Claim the inputs of ``c`` (caller holds the DB's _lock)."""
        self.busy.update(f.number for f in c.all_inputs)
        self.running.append(c)
        self.running_compactions += 1

    def unmark_busy(self, c: Compaction) -> None:
        db = self._db
        with db._lock:
            self.busy.difference_update(f.number for f in c.all_inputs)
            self.running.remove(c)
            self.running_compactions -= 1
            db._cond.notify_all()

    def _release_numbers(self, numbers: set[int]) -> None:
        """Table numbers handed out are no longer pending: installed, or abandoned.
        Under ``_vlock``, like every change of ``pending_tables``, so that two threads
        releasing and allocating at once lose neither's change."""
        with self._db._vlock:
            self.pending_tables = self.pending_tables - numbers

    def run_compaction(self, c: Compaction) -> None:
        """Merge the inputs of ``c`` (claimed by ``mark_busy``) and install the outputs."""
        db = self._db
        opts = db.options
        vs = db._vs
        sync_point("compaction:picked", c)
        deleted = [(c.level, f.number) for f in c.inputs] + \
                  [(c.output_level, f.number) for f in c.overlapping]
        if c.trivial_move:
            edit = VersionEdit(deleted_files=deleted,
                               new_files=[(c.output_level, f) for f in c.inputs])
            sync_point("compaction:before_install", edit)
            db._install(edit, [])
            sync_point("compaction:installed", c)
            db.stats["trivial_moves"] += 1
            return

        def paths(files: list[FileMeta]) -> list[str]:
            return [os.path.join(db.path, table_name(f.number)) for f in files]

        # Level-0 inputs may overlap, so each is a run of its own; deeper ones form one.
        groups = [paths([f]) for f in c.inputs] if c.level == 0 else [paths(c.inputs)]
        groups.append(paths(c.overlapping))
        with db._lock:
            snapshots = db._snapshots.sequences()
            prefix = compaction_temp_prefix(vs.new_file_number())
        try:
            outputs = run_job(compaction_job, groups, os.path.join(db.path, prefix), snapshots,
                              c.bottommost, opts.target_file_size_base, opts.block_size,
                              opts.compression, opts.bloom_bits_per_key,
                              {path: f.global_seq for f in c.all_inputs
                               if f.global_seq is not None for path in paths([f])},
                              isolated=opts.background_processes, niceness=COMPACTION_NICENESS,
                              fresh=sum(f.size for f in c.all_inputs) >= FRESH_INTERPRETER_BYTES)
        except OSError as exc:
            raise BackgroundError(f"compaction failed: {exc}") from None
        new_files = []
        numbers: list[int] = []
        try:
            with db._vlock:
                numbers = [vs.new_file_number() for _ in outputs]
                self.pending_tables = self.pending_tables | set(numbers)
            for number, out in zip(numbers, outputs, strict=True):
                os.rename(out["path"], os.path.join(db.path, table_name(number)))
                f = FileMeta(number, out["size"], out["smallest"], out["largest"],
                             out["smallest_seq"], out["largest_seq"], c.epoch, out["num_entries"])
                open_table(db.path, f, db.cache)
                new_files.append((c.output_level, f))
            sync_dir(db.path)
            edit = VersionEdit(deleted_files=deleted, new_files=new_files)
            sync_point("compaction:before_install", edit)
            db._install(edit, c.all_inputs)
            sync_point("compaction:installed", c)
        finally:
            for out in outputs:
                if os.path.exists(out["path"]):
                    os.unlink(out["path"])
            self._release_numbers(set(numbers))
        db.stats["compactions"] += 1
        db.stats["bytes_compacted_in"] += sum(f.size for f in c.all_inputs)
        db.stats["bytes_compacted_out"] += sum(f.size for _, f in new_files)

    def compact_range(self, begin: bytes | None, end: bytes | None) -> None:
        """Merge every level's tables meeting ``[begin, end]`` downwards, with the
        compaction threads held off (the DB has flushed first)."""
        db = self._db
        with db._lock:
            self.manual_compactions += 1
            try:
                while self.running_compactions:
                    db._cond.wait(1.0)
            except BaseException:
                self.manual_compactions -= 1
                raise
        try:
            version = db._sv[2]
            last = max((lv for lv, files in enumerate(version.levels) if files), default=0)
            for level in range(max(last, 1)):
                with db._lock:
                    c = self.picker.pick_range(db._sv[2], level, begin, end, self.busy,
                                               self.running)
                    if c is None:
                        continue
                    self.mark_busy(c)
                try:
                    self.run_compaction(c)
                except BaseException as exc:
                    db._set_bg_error(exc)
                    raise
                finally:
                    self.unmark_busy(c)
        finally:
            with db._lock:
                self.manual_compactions -= 1
                db._cond.notify_all()

    def wait_idle(self, timeout: float) -> None:
        """Block until no flush or compaction is running or due, or ``timeout`` passes."""
        db = self._db
        deadline = time.monotonic() + timeout
        with db._lock:
            while time.monotonic() < deadline:
                if db._bg_error is not None:
                    db._check_writable()
                idle = not db._imms and not self.running_compactions and \
                    self.picker.pick(db._sv[2], self.busy, self.running) is None
                if idle:
                    return
                db._cond.wait(0.1)
