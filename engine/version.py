"""Versions of the table set, version edits and the MANIFEST.

A ``Version`` is an immutable list of levels of ``FileMeta``: level 0 sorted by
``epoch_number`` descending (newest first; reads and compactions use this order,
never sequence numbers), levels >= 1 sorted by smallest key and non-overlapping.
The MANIFEST is a log (engine/wal.py framing) of ``VersionEdit`` records, each a
JSON object; its first record is a full snapshot of the state. ``CURRENT`` names the
live MANIFEST (engine/filename.py replaces it).
Invariant: ``VersionSet.current`` is always the result of applying, in order, every
edit durably recorded in the live MANIFEST.
"""

from __future__ import annotations

import json
import os
import threading
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import Corruption
from .filename import manifest_name, read_current, set_current
from .wal import LogWriter, read_records


@dataclass(eq=False, slots=True)
class FileMeta:
    number: int
    size: int
    smallest: bytes
    largest: bytes
    smallest_seq: int
    largest_seq: int
    epoch: int
    num_entries: int = 0
    reader: Any = None  # an open TableReader; not persisted
    # An ingested table's global sequence number (engine/ingest.py): every entry in
    # it reads with this number. None for a table the engine built.
    global_seq: int | None = None

    def to_json(self, level: int) -> list:
        row = [level, self.number, self.size, self.smallest.hex(), self.largest.hex(),
               self.smallest_seq, self.largest_seq, self.epoch, self.num_entries]
        if self.global_seq is not None:
            row.append(self.global_seq)
        return row

    @classmethod
    def from_json(cls, row: list) -> tuple[int, FileMeta]:
        # A tenth element, the global sequence number, is optional (older MANIFESTs
        # and tables the engine built have none).
        level, number, size, smallest, largest, sseq, lseq, epoch, n, *rest = row
        if len(rest) > 1:
            raise ValueError(f"new_files row of {len(row)} elements")
        gseq = int(rest[0]) if rest and rest[0] is not None else None
        return int(level), cls(int(number), int(size), bytes.fromhex(smallest),
                               bytes.fromhex(largest), int(sseq), int(lseq), int(epoch), int(n),
                               global_seq=gseq)


def _l0_order(f: FileMeta) -> tuple[int, int]:
    return (-f.epoch, -f.number)


class Version:
    """One immutable table set. ``largests[L]`` lists the largest keys of level L."""

    __slots__ = ("levels", "largests", "runs", "has_range_tombstones", "pins")

    def __init__(self, levels: list[list[FileMeta]]) -> None:
        self.levels = levels
        self.largests = [[f.largest for f in files] for files in levels]
        # (files, largest keys) of the non-empty levels >= 1, for point reads.
        self.runs = [(files, self.largests[level]) for level, files in enumerate(levels)
                     if level and files]
        # Whether any table holds a range tombstone: reads take the path that checks
        # them only then. Known once the tables are open; the DB sets it on publishing.
        self.has_range_tombstones = False
        # One item per reader using this version (list append and pop are atomic,
        # so pinning takes no lock); its tables are not unlinked while any remain.
        self.pins: list[None] = []

    def files(self) -> list[tuple[int, FileMeta]]:
        return [(level, f) for level, files in enumerate(self.levels) for f in files]

    def note_range_tombstones(self) -> None:
        """Set ``has_range_tombstones`` from the open tables."""
        self.has_range_tombstones = any(
            f.reader is not None and f.reader.tombstones is not None for _, f in self.files())

    def level_bytes(self, level: int) -> int:
        return sum(f.size for f in self.levels[level])

    def overlapping(self, level: int, lo: bytes | None, hi: bytes | None) -> list[FileMeta]:
        """Files of ``level`` whose key range meets ``[lo, hi]`` (None is unbounded)."""
        files = self.levels[level]
        if level == 0:
            return [f for f in files
                    if (lo is None or f.largest >= lo) and (hi is None or f.smallest <= hi)]
        i = bisect_left(self.largests[level], lo) if lo is not None else 0
        out = []
        while i < len(files) and (hi is None or files[i].smallest <= hi):
            out.append(files[i])
            i += 1
        return out


class VersionPin:
    """A reader's hold on a version: its tables stay on disk until ``release``
    (called once; the collector calls it for a reader dropped unfinished)."""

    __slots__ = ("version", "_on_release", "_released")

    def __init__(self, version: Version, on_release: Callable[[Version], None]) -> None:
        version.pins.append(None)
        self.version = version
        self._on_release = on_release
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._on_release(self.version)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


@dataclass
class VersionEdit:
    log_number: int | None = None
    next_file_number: int | None = None
    last_sequence: int | None = None
    next_epoch: int | None = None
    new_files: list[tuple[int, FileMeta]] = field(default_factory=list)
    deleted_files: list[tuple[int, int]] = field(default_factory=list)

    def encode(self) -> bytes:
        obj: dict[str, Any] = {}
        for name in ("log_number", "next_file_number", "last_sequence", "next_epoch"):
            value = getattr(self, name)
            if value is not None:
                obj[name] = value
        if self.new_files:
            obj["new_files"] = [f.to_json(level) for level, f in self.new_files]
        if self.deleted_files:
            obj["deleted_files"] = [[level, number] for level, number in self.deleted_files]
        return json.dumps(obj, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes, path: str, offset: int) -> VersionEdit:
        try:
            obj = json.loads(payload)
            edit = cls(
                log_number=obj.get("log_number"),
                next_file_number=obj.get("next_file_number"),
                last_sequence=obj.get("last_sequence"),
                next_epoch=obj.get("next_epoch"),
                new_files=[FileMeta.from_json(row) for row in obj.get("new_files", [])],
                deleted_files=[(int(a), int(b)) for a, b in obj.get("deleted_files", [])],
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise Corruption(path, offset, f"malformed version edit ({exc})") from None
        return edit


def apply_edit(version: Version, edit: VersionEdit) -> Version:
    """Return the version ``edit`` makes of ``version``; KeyError if a deletion misses."""
    levels = [list(files) for files in version.levels]
    for level, number in edit.deleted_files:
        files = levels[level]
        for i, f in enumerate(files):
            if f.number == number:
                del files[i]
                break
        else:
            raise KeyError(f"file {number} is not in level {level}")
    for level, f in edit.new_files:
        while level >= len(levels):
            levels.append([])
        levels[level].append(f)
    levels[0].sort(key=_l0_order)
    for files in levels[1:]:
        files.sort(key=lambda f: f.smallest)
    return Version(levels)


def check_level(files: list[FileMeta], level: int, where: str) -> None:
    """Raise Corruption unless one level obeys its rules: every table's smallest key
    <= its largest; level 0 in strictly descending epoch order; a deeper level
    sorted by key with no key in two tables. Cheap enough for every install."""
    prev: FileMeta | None = None
    for f in files:
        if f.smallest > f.largest:
            raise Corruption(where, None, f"table {f.number}: smallest key > largest key "
                                          f"(level {level})")
        if prev is not None:
            if level == 0 and prev.epoch <= f.epoch:
                raise Corruption(where, None,
                                 f"level 0 tables {prev.number} and {f.number} out of epoch order")
            if level > 0 and prev.largest >= f.smallest:
                raise Corruption(where, None,
                                 f"level {level} tables {prev.number} and {f.number} overlap")
        prev = f


def check_version(version: Version, where: str, next_epoch: int, next_file: int) -> None:
    """Raise Corruption unless the table set obeys the level invariants."""
    seen: set[int] = set()
    for level, files in enumerate(version.levels):
        check_level(files, level, where)
        for f in files:
            if f.number in seen:
                raise Corruption(where, None, f"table {f.number} appears twice")
            seen.add(f.number)
            if f.number >= next_file:
                raise Corruption(where, None, f"table {f.number} >= next file number {next_file}")
            if f.epoch >= next_epoch:
                raise Corruption(where, None, f"table {f.number}: epoch {f.epoch} >= next epoch")


class VersionSet:
    """The live version plus the counters the MANIFEST persists."""

    def __init__(self, dbpath: str, num_levels: int) -> None:
        self.dbpath = dbpath
        self.num_levels = num_levels
        self.current = Version([[] for _ in range(num_levels)])
        self.next_file_number = 2
        self.last_sequence = 0
        self.log_number = 0
        self.next_epoch = 1
        self.manifest_number = 0
        self._manifest: LogWriter | None = None
        self._counter_lock = threading.Lock()
        # Called with the Corruption of an edit that failed its check, before it is
        # raised; may run with any of the DB's locks held, so it must not take one.
        self.on_invalid_edit: Callable[[Corruption], None] | None = None

    def new_file_number(self) -> int:
        with self._counter_lock:
            n = self.next_file_number
            self.next_file_number += 1
            return n

    def path(self, name: str) -> str:
        return os.path.join(self.dbpath, name)

    def manifest_path(self) -> str:
        """The live MANIFEST's path (where the consistency check reports problems)."""
        return self.path(manifest_name(self.manifest_number))

    def recover(self) -> None:
        """Load the state named by CURRENT; Corruption on any damage."""
        name = read_current(self.dbpath)
        mpath = self.path(name)
        if not os.path.exists(mpath):
            raise Corruption(mpath, None, "the MANIFEST named by CURRENT is missing")
        version = Version([[] for _ in range(self.num_levels)])
        count = 0
        for offset, payload in read_records(mpath):
            edit = VersionEdit.decode(payload, mpath, offset)
            try:
                version = apply_edit(version, edit)
            except (KeyError, IndexError) as exc:
                raise Corruption(mpath, offset, f"edit does not apply ({exc})") from None
            self._absorb(edit)
            count += 1
        if count == 0:
            raise Corruption(mpath, 0, "MANIFEST holds no complete record")
        while len(version.levels) < self.num_levels:
            version.levels.append([])
            version.largests.append([])
        self.current = version
        self.manifest_number = int(name.split("-", 1)[1])
        self.next_file_number = max(self.next_file_number, self.manifest_number + 1)

    def _absorb(self, edit: VersionEdit) -> None:
        if edit.log_number is not None:
            self.log_number = edit.log_number
        if edit.next_file_number is not None:
            with self._counter_lock:
                self.next_file_number = max(self.next_file_number, edit.next_file_number)
        if edit.last_sequence is not None:
            self.last_sequence = max(self.last_sequence, edit.last_sequence)
        if edit.next_epoch is not None:
            self.next_epoch = max(self.next_epoch, edit.next_epoch)
        for _, f in edit.new_files:
            self.next_epoch = max(self.next_epoch, f.epoch + 1)
            with self._counter_lock:
                self.next_file_number = max(self.next_file_number, f.number + 1)

    def write_snapshot(self) -> None:
        """Start a new MANIFEST holding the whole state and point CURRENT at it."""
        number = self.new_file_number()
        edit = VersionEdit(log_number=self.log_number, next_file_number=self.next_file_number,
                           last_sequence=self.last_sequence, next_epoch=self.next_epoch,
                           new_files=self.current.files())
        writer = LogWriter(self.path(manifest_name(number)))
        writer.add(edit.encode())
        writer.sync()
        set_current(self.dbpath, number)
        if self._manifest is not None:
            self._manifest.close()
        self._manifest = writer
        self.manifest_number = number

    def log_and_apply(self, edit: VersionEdit) -> Version:
        """Apply ``edit`` to the current version, record it durably, make it current.

        The levels the edit touches are checked first (``check_level``): an edit
        that would break them is neither logged nor applied; ``on_invalid_edit``
        hears of it (the DB stops writes) and Corruption is raised.
        """
        version = apply_edit(self.current, edit)
        where = f"{self.manifest_path()} (edit not applied)"
        try:
            for level in sorted({lv for lv, _ in edit.new_files}
                                | {lv for lv, _ in edit.deleted_files}):
                check_level(version.levels[level], level, where)
        except Corruption as exc:
            if self.on_invalid_edit is not None:
                self.on_invalid_edit(exc)
            raise
        if edit.next_file_number is None:
            edit.next_file_number = self.next_file_number
        if edit.next_epoch is None:
            edit.next_epoch = self.next_epoch
        assert self._manifest is not None
        self._manifest.add(edit.encode())
        self._manifest.sync()
        self._absorb(edit)
        self.current = version
        return version

    def close(self) -> None:
        if self._manifest is not None:
            self._manifest.close()
            self._manifest = None
