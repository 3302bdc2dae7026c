"""Opening a database directory: whether it is one, and bringing its state back.

``check_directory`` decides, by reading only, whether an open creates a database,
opens one, or is refused. ``recover`` then does what docs/engine-format.md ("File
lifecycle", Open) lists after taking LOCK: replay the MANIFEST that CURRENT names,
open and check every table, raise the file-number counter past every numbered file
(a crashed open may have left some), replay the logs the MANIFEST does not cover
into level-0 tables, start a new log and a new MANIFEST holding the whole state,
delete every file that state does not name, and write OPTIONS. A read-only
recovery keeps the logs' writes in a memtable and writes nothing.

Invariant: every record of every log numbered ``log_number`` or above is in the
recovered state, and a recovery killed at any point leaves a directory the next
recovery opens with the same contents (nothing it wrote is named before it is whole).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .block_cache import BlockCache
from .compaction import flush_job
from .errors import Corruption, InvalidArgument
from .filename import (
    CURRENT,
    LOCK,
    FileKind,
    file_number,
    log_name,
    numbered,
    obsolete_files,
    parse,
    remove_files,
    table_name,
)
from .memtable import MemTable
from .options import Options
from .snapshots import NO_SNAPSHOT
from .table_reader import open_table
from .version import FileMeta, VersionEdit, VersionSet, apply_edit, check_version
from .wal import WAL_PREALLOCATE, LogWriter, read_records
from .write_batch import decode_batch, insert_into


@dataclass
class Recovered:
    """What the write path starts from after ``recover``."""

    last_sequence: int
    # The memtable writes go to next: empty, or (read-only) holding the logs' writes.
    mem: MemTable
    # The new log ``mem`` writes to; None when read-only.
    wal: LogWriter | None


def check_directory(path: str, options: Options, read_only: bool) -> bool:
    """Whether opening ``path`` creates a database; raise if it may not be opened.

    A directory is a database when it holds CURRENT. Otherwise one is created only
    if ``options.create_if_missing`` is on, ``read_only`` is off and the directory is
    missing or empty; a directory holding anything else is refused, so a wrong path
    is reported instead of getting database files written into it. Reads only:
    nothing is created or locked until the directory has passed.
    """
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        names = None
    except NotADirectoryError:
        raise InvalidArgument(f"{path}: not a directory") from None
    if names is not None and CURRENT in names:
        if options.error_if_exists:
            raise InvalidArgument(f"{path}: database exists (error_if_exists is on)")
        return False
    # A LOCK alone is what a creation interrupted before writing CURRENT leaves;
    # such a directory still counts as empty, so the creation can be retried.
    others = [n for n in names or () if n != LOCK]
    kinds = {parsed[0] for parsed in map(parse, others) if parsed is not None}
    if FileKind.TABLE in kinds or FileKind.MANIFEST in kinds:
        raise Corruption(os.path.join(path, CURRENT), None,
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


def recover(path: str, options: Options, vs: VersionSet, cache: BlockCache, read_only: bool,
            create: bool) -> Recovered:
    """Load the state into ``vs`` (or start an empty one if ``create``) and replay the
    logs; the caller holds LOCK."""
    # check_directory ran before LOCK was taken; another process may have created
    # the database since, which is then opened like any other.
    if os.path.exists(os.path.join(path, CURRENT)):
        if options.error_if_exists:
            raise InvalidArgument(f"{path}: database exists (error_if_exists is on)")
        vs.recover()
    elif not create:
        raise InvalidArgument(f"{path}: not a database (no CURRENT file)")
    for _, f in vs.current.files():
        open_table(path, f, cache)
    if options.paranoid_checks:
        check_version(vs.current, vs.manifest_path(), vs.next_epoch, vs.next_file_number)

    # A recovery that crashed may have left files numbered past the MANIFEST's
    # counter (a MANIFEST CURRENT never named, tables, logs); never reuse them.
    names = os.listdir(path)
    for name in names:
        number = file_number(name)
        if number is not None:
            vs.next_file_number = max(vs.next_file_number, number + 1)

    # Replay every log the MANIFEST does not cover, oldest first.
    edit = VersionEdit()
    max_seq = vs.last_sequence
    mem = MemTable(0)
    for number in numbered(names, FileKind.LOG):
        vs.next_file_number = max(vs.next_file_number, number + 1)
        if number < vs.log_number:
            continue
        lpath = os.path.join(path, log_name(number))
        for offset, payload in read_records(lpath):
            seq, ops = decode_batch(lpath, offset, payload)
            insert_into(mem, seq, ops, NO_SNAPSHOT)
            max_seq = max(max_seq, seq + len(ops) - 1)
            if mem.size >= options.write_buffer_size and not read_only:
                edit.new_files.append((0, _write_level0(path, options, vs, cache, mem)))
                mem = MemTable(0)
    if read_only:
        # Reads see the logs' writes from memory; every file stays as it was.
        return Recovered(max_seq, mem, None)

    if len(mem):
        edit.new_files.append((0, _write_level0(path, options, vs, cache, mem)))
    vs.last_sequence = max_seq
    log_number = vs.new_file_number()
    vs.log_number = log_number
    if edit.new_files:
        vs.current = apply_edit(vs.current, edit)
    vs.write_snapshot()
    wal = LogWriter(os.path.join(path, log_name(log_number)), preallocate=WAL_PREALLOCATE)
    remove_files(path, obsolete_files(
        os.listdir(path), live_tables={f.number for _, f in vs.current.files()},
        pending_tables=frozenset(), table_floor=vs.next_file_number, live_logs={log_number},
        log_floor=vs.log_number, manifest=vs.manifest_number, recovering=True))
    options.write_file(path)
    return Recovered(max_seq, MemTable(log_number), wal)


def _write_level0(path: str, options: Options, vs: VersionSet, cache: BlockCache,
                  mem: MemTable) -> FileMeta:
    """Flush a recovered memtable synchronously (recovery runs before any thread)."""
    number = vs.new_file_number()
    stats = flush_job(mem, os.path.join(path, table_name(number)), options.block_size,
                      options.compression, options.bloom_bits_per_key)
    f = FileMeta(number, stats["size"], stats["smallest"], stats["largest"],
                 stats["smallest_seq"], stats["largest_seq"], vs.next_epoch,
                 stats["num_entries"])
    vs.next_epoch += 1
    open_table(path, f, cache)
    return f
