"""Offline consistency check of a vault: the dictionary against the tree and against
each file's own copy of its entry.

Finds what a crash leaves (stale entries, intents, a torn files.dict tail: expected
and harmless, reported as information), and what is wrong: a damaged files.dict,
entries naming missing data keys, files whose entry was lost (their per-file copy
still says how they are encrypted), entries that disagree with their copy, and files
with neither whose bytes look like ciphertext. Without repair nothing is written.
With repair, recovery runs (intents resolved, stale entries removed, torn tail cut), a
damaged files.dict keeps every record that still verifies, lost entries are rebuilt
from the per-file copies, and missing or stale copies are rewritten.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

from encfs.entry_copy import Damaged
from encfs.errors import Corruption
from encfs.filedict import FileInfo, Put, SalvageReport
from encfs.masterkey import MasterKeySource
from encfs.vault import RecoveryReport, Vault

SAMPLE_BYTES = 16 * 1024  # read from the start of a file without an entry
_RECORD_OPS = 4096


@dataclass
class FsckReport:
    root: str
    repair: bool
    corruption: Corruption | None = None
    salvage: SalvageReport | None = None
    recovery: RecoveryReport = field(default_factory=RecoveryReport)
    copies_enabled: bool = True
    plaintext: list[bytes] = field(default_factory=list)  # no entry, bytes look like plaintext
    suspect: list[bytes] = field(default_factory=list)  # no entry, bytes look like ciphertext
    restored: list[bytes] = field(default_factory=list)  # entry lost, rebuilt from its copy
    conflicts: list[bytes] = field(default_factory=list)  # entry and copy disagree (non-empty)
    damaged_copies: list[bytes] = field(default_factory=list)  # copy fails its MAC
    copies_missing: list[bytes] = field(default_factory=list)  # entry without a (right) copy
    per_key: dict[int, int] = field(default_factory=dict)  # key id -> files that use it
    missing_keys: dict[int, int] = field(default_factory=dict)  # key id -> entries, key absent
    encrypted: int = 0

    @property
    def crash_leftovers(self) -> bool:
        """What a killed process or a power cut leaves: expected, and fixed on open."""
        r = self.recovery
        return bool(r.stale or r.committed or r.aborted or r.dropped_tail)

    @property
    def problems(self) -> bool:
        """Something is (or was, before repair) wrong beyond crash leftovers."""
        return bool(self.corruption or self.salvage or self.recovery.new_dictionary
                    or self.missing_keys or self.suspect or self.restored or self.conflicts
                    or self.damaged_copies)

    @property
    def clean_after(self) -> bool:
        """True when every file reads right now (after repair, if asked)."""
        if self.corruption or self.missing_keys or self.suspect:
            return False
        return self.repair or not self.problems


def check(backing: str | os.PathLike[str], source: MasterKeySource, repair: bool = False) -> FsckReport:
    """Check (and with ``repair``, fix) the vault at ``backing``."""
    report = FsckReport(root=os.path.abspath(backing), repair=repair)
    try:
        vault = Vault.open(backing, source, mode="repair" if repair else "check")
    except Corruption as exc:
        report.corruption = exc
        return report
    try:
        report.salvage = vault.files.salvage
        report.recovery = vault.recovery
        report.copies_enabled = vault.copies.enabled
        stale = set(vault.recovery.stale)
        entries = {p: i for p, i in vault.files.items() if p not in stale}
        puts: list[tuple[bytes, FileInfo]] = []
        for rel in vault.tree.walk_files(skip=vault.metadata_names()):
            info = _check_file(vault, report, rel, entries.get(rel))
            if info is not None and info is not entries.get(rel):
                puts.append((rel, info))
            if info is None:
                continue
            report.encrypted += 1
            report.per_key[info.key_id] = report.per_key.get(info.key_id, 0) + 1
            if info.method != "plaintext" and info.key_id not in vault.keys.keys:
                report.missing_keys[info.key_id] = report.missing_keys.get(info.key_id, 0) + 1
        if repair:
            for i in range(0, len(puts), _RECORD_OPS):
                vault.files.append([Put(p, info) for p, info in puts[i:i + _RECORD_OPS]])
    finally:
        vault.close()
    return report


def _check_file(vault: Vault, report: FsckReport, rel: bytes, entry: FileInfo | None
                ) -> FileInfo | None:
    """Compare one file's entry with its copy (repairing its copy if asked); return
    the entry it should have (``entry`` itself when that is right), or None."""
    fd = vault.tree.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        copy = vault.copies.read(fd) if vault.copies.enabled else None
        if isinstance(copy, Damaged):
            report.damaged_copies.append(rel)
            copy = None
        if copy is not None and copy.key_id not in vault.keys.keys and entry is not None:
            copy = None  # a copy naming a key that is gone cannot be the truth
        if entry is None and copy is None:
            if looks_encrypted(os.pread(fd, SAMPLE_BYTES, 0)):
                report.suspect.append(rel)
            else:
                report.plaintext.append(rel)
            return None
        if entry is None:
            report.restored.append(rel)  # the dictionary lost it; the copy kept it
            return copy
        if copy == entry or not vault.copies.enabled:
            return entry
        if copy is not None and os.fstat(fd).st_size > 0:
            if report.salvage is not None or report.recovery.new_dictionary:
                # records were lost: a later entry the copy kept may be one of them
                report.restored.append(rel)
                return copy
            report.conflicts.append(rel)  # the dictionary is intact: it is the truth
        else:
            report.copies_missing.append(rel)
        if report.repair:
            vault.copies.write(fd, entry)
        return entry
    finally:
        os.close(fd)


# -- does a file without an entry hold ciphertext? -------------------------------------

# formats whose bytes look random but that are plaintext as far as tdefs is concerned
_COMPRESSED_MAGIC = (
    b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x04\x22\x4d\x18",
    b"PK\x03\x04", b"7z\xbc\xaf\x27\x1c", b"Rar!", b"\x89PNG", b"\xff\xd8\xff", b"GIF8",
    b"RIFF", b"OggS", b"fLaC", b"%PDF",
)


def looks_encrypted(sample: bytes) -> bool:
    """Do these leading bytes of a file look like counter-mode ciphertext (uniformly
    random bytes) rather than plaintext? A heuristic: plaintext that is itself random
    (compressed data without a known header, random keys) is named too, so a person
    can look; empty and very short files cannot be told and pass."""
    n = len(sample)
    if n < 16 or sample.startswith(_COMPRESSED_MAGIC):
        return False
    try:
        sample.decode("utf-8")
        return False  # text (random bytes are valid UTF-8 with odds ~2^-n/2)
    except UnicodeDecodeError:
        pass
    histogram = Counter(sample)
    counts = [histogram.get(b, 0) for b in range(256)]
    if n < 1024:
        # too few bytes for a histogram test: random bytes repeat rarely
        distinct = sum(1 for c in counts if c)
        expected = 256 * (1 - (255 / 256) ** n)
        return distinct >= 0.85 * expected
    e = n / 256
    chi2 = sum((c - e) ** 2 for c in counts) / e
    # uniform bytes give chi2 about 255 with standard deviation sqrt(510); text,
    # structured binary and most compressed formats land far above
    return chi2 < 255 + 6 * math.sqrt(510)
