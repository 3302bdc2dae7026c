"""The names of the files in a database directory, and making a name durable.

    LOCK  CURRENT  OPTIONS  MANIFEST-NNNNNN  NNNNNN.log  NNNNNN.sst
    NNNNNN.dbtmp, OPTIONS.dbtmp, compaction-N-I.tmp     temporary files

``NNNNNN`` is a file number, zero-padded to six digits; one counter (the version
set's) numbers every log, table and MANIFEST. Invariant: a number is never reused,
so a file's name says for good which log, table or MANIFEST it is. CURRENT is only
ever replaced whole (temporary file, fsync, rename, directory fsync), so it always
names a complete MANIFEST.
"""

from __future__ import annotations

import enum
import os
import re

from .errors import Corruption

LOCK = "LOCK"
CURRENT = "CURRENT"
OPTIONS = "OPTIONS"
OPTIONS_TEMP = "OPTIONS.dbtmp"

_PARSE = re.compile(r"^(\d+)\.(sst|log)$|^MANIFEST-(\d+)$|^.*\.dbtmp$|^compaction-.*\.tmp$")
# Wider than _PARSE on purpose: any "digits.letters" name counts, so a file left by a
# crash under a kind of name this version does not know still keeps its number.
_NUMBERED = re.compile(r"^(\d+)\.[a-z]+$|^MANIFEST-(\d+)$")


class FileKind(enum.Enum):
    TABLE = "sst"
    LOG = "log"
    MANIFEST = "manifest"
    TEMP = "tmp"


def table_name(number: int) -> str:
    return f"{number:06d}.sst"


def log_name(number: int) -> str:
    return f"{number:06d}.log"


def manifest_name(number: int) -> str:
    return f"MANIFEST-{number:06d}"


def temp_name(number: int) -> str:
    return f"{number:06d}.dbtmp"


def compaction_temp_prefix(number: int) -> str:
    """The name prefix of one compaction's outputs; the job appends ``I.tmp``."""
    return f"compaction-{number}-"


def parse(name: str) -> tuple[FileKind, int | None] | None:
    """``(kind, number)`` of a database file's name (number None for temporary
    files), or None for LOCK, CURRENT, OPTIONS and names the engine never makes."""
    m = _PARSE.match(name)
    if not m:
        return None
    if m.group(2) == "sst":
        return FileKind.TABLE, int(m.group(1))
    if m.group(2) == "log":
        return FileKind.LOG, int(m.group(1))
    if m.group(3):
        return FileKind.MANIFEST, int(m.group(3))
    return FileKind.TEMP, None


def numbered(names: list[str], kind: FileKind) -> list[int]:
    """The numbers of the files of ``kind`` (not TEMP) among ``names``, ascending."""
    return sorted(n for k, n in filter(None, map(parse, names)) if k is kind and n is not None)


def file_number(name: str) -> int | None:
    """The number a name uses up, if it has one."""
    m = _NUMBERED.match(name)
    return int(m.group(1) or m.group(2)) if m else None


def obsolete_files(names: list[str], *, live_tables: set[int], pending_tables: frozenset[int],
                   table_floor: int, live_logs: set[int], log_floor: int, manifest: int,
                   recovering: bool) -> list[str]:
    """The names among ``names`` that the current state no longer needs.

    A table is dead when no version names it and it is below ``table_floor`` (the
    allocation counter read together with the live set) and not ``pending`` (built
    but not yet installed); while ``recovering`` nothing is being built, so every
    unnamed table is dead. A log is dead below ``log_floor`` unless a memtable still
    writes it; every MANIFEST but the live one is dead; temporary files are dead
    only while recovering (before open, none is in use).
    """
    dead = []
    for name in names:
        parsed = parse(name)
        if parsed is None:
            continue
        kind, n = parsed
        if kind is FileKind.TABLE:
            gone = n not in live_tables and (recovering or (n < table_floor and n not in pending_tables))
        elif kind is FileKind.LOG:
            gone = n < log_floor and n not in live_logs
        elif kind is FileKind.MANIFEST:
            gone = n != manifest
        else:
            gone = recovering
        if gone:
            dead.append(name)
    return dead


def remove_files(dbpath: str, names: list[str]) -> None:
    """Delete these files of ``dbpath``; one already gone is fine."""
    for name in names:
        try:
            os.unlink(os.path.join(dbpath, name))
        except FileNotFoundError:
            pass


def sync_dir(path: str) -> None:
    """Make the names in directory ``path`` durable (a created, renamed or deleted file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_current(dbpath: str) -> str:
    """The name of the MANIFEST that CURRENT names; Corruption if it names none."""
    current = os.path.join(dbpath, CURRENT)
    with open(current, "rb") as f:
        text = f.read()
    name = text.decode("ascii", "replace").strip()
    if not text.endswith(b"\n") or not name.startswith("MANIFEST-") or "/" in name:
        raise Corruption(current, 0, "CURRENT does not name a MANIFEST")
    return name


def set_current(dbpath: str, manifest_number: int) -> None:
    """Point CURRENT at ``MANIFEST-manifest_number`` atomically and durably."""
    tmp = os.path.join(dbpath, temp_name(manifest_number))
    with open(tmp, "wb") as f:
        f.write(manifest_name(manifest_number).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(dbpath, CURRENT))
    sync_dir(dbpath)
