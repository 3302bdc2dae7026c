"""Ingesting external tables into a database (``DB.ingest``).

An external table (engine/sst_file_writer.py) holds strictly increasing keys, every
entry and range tombstone at sequence number 0, and ``"external": true`` in its
properties. Ingesting files is, in order:

1. *Check* every file before touching the database: it opens, every block checksum
   verifies, keys are strictly increasing, every sequence number is 0, the
   properties agree with the contents, it is external and not already one of this
   database's tables, and no two files share a key. Any failure raises
   ``IngestionError`` naming the file; nothing has changed.
2. *Place* each file in the database directory under a new table number: a copy
   (fsynced), or with ``move`` a hard link (a copy across filesystems); then the
   directory is fsynced. Until its edit is installed the number is in the
   background's ``pending_tables``, so obsolete-file deletion leaves it alone.
3. *Install*, holding ``_vlock`` and then ``_lock`` (the DB's order), so no write, no
   snapshot and no other version edit comes between choosing the sequence number
   and publishing the version. If the active or an immutable memtable holds a key or
   range tombstone in any file's key range, the locks are let go, the memtables
   flushed, and the step starts again. Then all the files get one global sequence
   number ``G``, above every write so far, and each a new ``epoch_number``; each goes
   to the deepest level ``L`` such that no table in levels ``0..L`` meets its range
   and no running compaction writes into levels ``1..L`` over it (else level 0).
   One MANIFEST edit (``last_sequence = G``, the files with ``G`` as their global
   sequence number) is applied to the current version, as flushes do, and published.

Invariant: an ingested file's data is newer than every write acknowledged before
``ingest`` returned and older than every write after it, for point reads,
iterators, snapshots (a snapshot taken before sees none of it) and compaction.
"""

from __future__ import annotations

import errno
import os
import shutil
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import Corruption, IngestionError
from .filename import sync_dir, table_name
from .memtable import MemTable
from .range_tombstones import widen_to_cover
from .sst_file_writer import EXTERNAL_PROPERTY
from .table_reader import TableReader, open_table
from .tags import KIND_DELETE, KIND_PUT, KIND_SINGLE_DELETE
from .version import FileMeta, Version, VersionEdit

if TYPE_CHECKING:
    from .compaction import Compaction
    from .db import DB

# A hard link fails with these when a copy would work (another filesystem, or one
# without links).
_LINK_FALLBACK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


@dataclass
class ExternalTable:
    """A checked external table: where it is and the keys it covers (inclusive)."""

    path: str
    size: int
    smallest: bytes
    largest: bytes
    num_entries: int


def check_external_table(path: str) -> ExternalTable:
    """Open and fully check the external table at ``path``; IngestionError if it
    cannot be ingested."""

    def refuse(why: str) -> IngestionError:
        return IngestionError(f"cannot ingest {path}: {why}")

    try:
        reader = TableReader(path, 0)
    except FileNotFoundError:
        raise refuse("no such file") from None
    except Corruption as exc:
        raise refuse(str(exc)) from None
    except OSError as exc:
        raise refuse(exc.strerror or str(exc)) from None
    try:
        props = reader.properties
        if not isinstance(props, dict) or props.get(EXTERNAL_PROPERTY) is not True:
            raise refuse("not an external table (write it with SstFileWriter)")
        try:
            reader.verify()
        except Corruption as exc:
            raise refuse(str(exc)) from None
        prev: bytes | None = None
        first: bytes | None = None
        count = deletions = 0
        for key, tag, _ in reader.entries():
            if tag >> 8:
                raise refuse(f"key {key!r} has sequence number {tag >> 8}, not 0")
            if tag & 0xFF not in (KIND_PUT, KIND_DELETE, KIND_SINGLE_DELETE):
                raise refuse(f"key {key!r} has unknown kind {tag & 0xFF}")
            if prev is not None and key <= prev:
                raise refuse(f"keys out of order: {key!r} after {prev!r}")
            if first is None:
                first = key
            prev = key
            count += 1
            deletions += tag & 0xFF != KIND_PUT
        for start, end, seq in reader.range_tombstones:
            if seq:
                raise refuse(f"range tombstone {start!r}..{end!r} has sequence number {seq}, not 0")
            if not start < end:
                raise refuse(f"empty range tombstone {start!r}..{end!r}")
        smallest, largest = widen_to_cover(first, prev, ((s, e) for s, e, _ in reader.range_tombstones))
        if smallest is None or largest is None:
            raise refuse("the table is empty")
        expected = {"num_entries": count, "num_deletions": deletions,
                    "num_range_deletions": len(reader.range_tombstones),
                    "smallest_key": smallest.hex(), "largest_key": largest.hex(),
                    "smallest_seq": 0, "largest_seq": 0}
        for name, value in expected.items():
            if props.get(name) != value:
                raise refuse(f"property {name} is {props.get(name)!r}, the contents say {value!r}")
        return ExternalTable(path, reader.size, smallest, largest, count)
    finally:
        reader.close()


def ingest_files(db: DB, paths: Iterable[str | os.PathLike], move: bool) -> None:
    """``DB.ingest``: check, place and install ``paths`` (see the module docstring)."""
    if isinstance(paths, str | bytes | os.PathLike):
        paths = [paths]  # type: ignore[list-item]
    paths = [os.fsdecode(p) for p in paths]
    db._check_writable()
    if not paths:
        return
    tables = [check_external_table(p) for p in paths]
    _refuse_own_tables(db, tables)
    ordered = sorted(tables, key=lambda t: t.smallest)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.largest >= b.smallest:
            raise IngestionError(f"cannot ingest {a.path} and {b.path} together: "
                                 "their key ranges overlap")
    background = db._background
    with db._vlock:
        numbers = [db._vs.new_file_number() for _ in tables]
        background.pending_tables = background.pending_tables | set(numbers)
    installed = False
    try:
        for t, number in zip(tables, numbers, strict=True):
            _place(t, os.path.join(db.path, table_name(number)), move)
        sync_dir(db.path)
        _install(db, list(zip(tables, numbers, strict=True)))
        installed = True
    finally:
        with db._vlock:
            background.pending_tables = background.pending_tables - set(numbers)
        if not installed:
            for number in numbers:
                try:
                    os.unlink(os.path.join(db.path, table_name(number)))
                except FileNotFoundError:
                    pass


def _refuse_own_tables(db: DB, tables: list[ExternalTable]) -> None:
    """IngestionError for a file in the database directory or one that is (a link to)
    a live table of it: those are already ingested."""
    here = os.path.realpath(db.path)
    own = set()
    for _, f in db._vs.current.files():
        try:
            st = os.stat(os.path.join(db.path, table_name(f.number)))
        except FileNotFoundError:
            continue
        own.add((st.st_dev, st.st_ino))
    for t in tables:
        st = os.stat(t.path)
        if (st.st_dev, st.st_ino) in own or \
                os.path.dirname(os.path.realpath(t.path)) == here:
            raise IngestionError(f"cannot ingest {t.path}: it is already a table of {db.path}")


def _place(t: ExternalTable, dest: str, move: bool) -> None:
    """Put ``t`` at ``dest``: hard-linked with ``move`` when the filesystem allows,
    copied otherwise; fsynced either way (the directory is the caller's)."""
    if move:
        try:
            os.link(t.path, dest)
        except OSError as exc:
            if exc.errno not in _LINK_FALLBACK:
                raise
        else:
            fd = os.open(dest, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return
    with open(t.path, "rb") as src, open(dest, "xb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())
    if os.path.getsize(dest) != t.size:
        raise IngestionError(f"cannot ingest {t.path}: it changed while being copied")


def _memtables_overlap(mems: list[MemTable], tables: list[ExternalTable]) -> bool:
    """Whether a key or range tombstone of ``mems`` lies in a table's key range."""
    for m in mems:
        if not len(m):
            continue
        keys = m.sorted_keys()
        for t in tables:
            i = bisect_left(keys, t.smallest)
            if i < len(keys) and keys[i] <= t.largest:
                return True
            for start, end, _ in m.range_dels:
                if start <= t.largest and t.smallest < end:
                    return True
    return False


def target_level(version: Version, running: Sequence[Compaction], lo: bytes,
                 hi: bytes) -> int:
    """The deepest level a table covering ``[lo, hi]`` can go to as the newest data
    there: no table in it or above meets the range, nor the output of a ``running``
    compaction (older data, about to land there); 0 when level 0 already meets it."""
    if version.overlapping(0, lo, hi):
        return 0
    chosen = 0
    for level in range(1, len(version.levels)):
        if version.overlapping(level, lo, hi) or \
                any(c.output_meets(level, lo, hi) for c in running):
            break
        chosen = level
    return chosen


def _install(db: DB, placed: list[tuple[ExternalTable, int]]) -> None:
    tables = [t for t, _ in placed]
    vs = db._vs
    while True:
        with db._vlock, db._lock:
            db._check_writable()
            if not _memtables_overlap([db._mem, *db._imms], tables):
                seq = db._seq + 1
                version = vs.current
                epoch = vs.next_epoch
                new_files = []
                for t, number in placed:
                    f = FileMeta(number, t.size, t.smallest, t.largest, seq, seq, epoch,
                                 t.num_entries, global_seq=seq)
                    epoch += 1
                    open_table(db.path, f, db.cache)
                    level = target_level(version, db._background.running, t.smallest,
                                         t.largest)
                    new_files.append((level, f))
                edit = VersionEdit(last_sequence=seq, next_epoch=epoch, new_files=new_files)
                version = vs.log_and_apply(edit)
                db._seq = seq
                db._publish(version)
                db._cond.notify_all()
                return
        # Flushed first, the memtables' versions of these keys sit in a level-0
        # table below the ingested files, where their older sequence numbers belong.
        db.flush()
