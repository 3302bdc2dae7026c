"""Offline consistency check of a vault: the dictionary against the tree.

Finds stale entries, intents left by a crash, a torn files.dict tail, entries naming
missing data keys, and files without an entry (plaintext); counts files per key.
Without repair nothing is written. With repair, recovery runs (intents resolved,
stale entries removed, torn tail cut) and a damaged files.dict is cut at its first
bad record, reporting what the lost records named.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from encfs.errors import Corruption
from encfs.filedict import SalvageReport
from encfs.masterkey import MasterKeySource
from encfs.vault import INIT_DIR, META_DIR, RecoveryReport, Vault


@dataclass
class FsckReport:
    root: str
    repair: bool
    corruption: Corruption | None = None
    salvage: SalvageReport | None = None
    recovery: RecoveryReport = field(default_factory=RecoveryReport)
    plaintext: list[bytes] = field(default_factory=list)  # regular files without an entry
    per_key: dict[int, int] = field(default_factory=dict)  # key id -> files that use it
    missing_keys: dict[int, int] = field(default_factory=dict)  # key id -> entries, key absent
    encrypted: int = 0

    @property
    def problems(self) -> bool:
        """Something is (or was, before repair) wrong with the metadata."""
        r = self.recovery
        return bool(self.corruption or self.salvage or self.missing_keys or r.stale
                    or r.committed or r.aborted or r.dropped_tail)

    @property
    def clean_after(self) -> bool:
        """True when the vault is consistent now (after repair, if asked)."""
        if self.corruption or self.missing_keys:
            return False
        return self.repair or not self.problems


def walk_files(root: bytes) -> list[bytes]:
    """Every regular file below ``root`` (outside the metadata), backing-relative.
    Walks by directory descriptors, so a tree of any depth is fine."""
    skip = {META_DIR.encode(), INIT_DIR.encode()}
    found: list[bytes] = []
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root):
        rel_dir = dirpath[len(root) + 1:]
        if not rel_dir:
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            try:
                if stat.S_ISREG(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
                    found.append(rel_dir + b"/" + name if rel_dir else name)
            except FileNotFoundError:
                continue
    return sorted(found)


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
        stale = set(vault.recovery.stale)
        entries = {p: i for p, i in vault.files.entries.items() if p not in stale}
        for rel in walk_files(os.fsencode(vault.root)):
            info = entries.get(rel)
            if info is None or info.method == "plaintext":
                report.plaintext.append(rel)
                continue
            report.encrypted += 1
            report.per_key[info.key_id] = report.per_key.get(info.key_id, 0) + 1
        for info in entries.values():
            if info.method != "plaintext" and info.key_id not in vault.keys.keys:
                report.missing_keys[info.key_id] = report.missing_keys.get(info.key_id, 0) + 1
    finally:
        vault.close()
    return report
