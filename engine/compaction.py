"""Choosing compactions and the jobs that build tables (flush and compaction).

Leveled compaction: level 0 is compacted into level 1 when it holds
``level0_file_num_compaction_trigger`` files; level L >= 1 is compacted into L + 1
when its bytes exceed ``max_bytes_for_level_base * multiplier ** (L - 1)``. A file
is picked only when neither it nor any file it would merge with is already being
compacted (the caller's ``busy`` set). Job functions take only plain data and paths
so they can run in a forked child (engine/background.py).

Invariant of the merge: for each user key the newest version is kept, an older one
only while a snapshot sees it, and a deletion is dropped only at the bottom of the
tree when no snapshot could see an older version beneath it.
"""

from __future__ import annotations

import heapq
import os
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass

from .memtable import MemTable
from .sst import TableBuilder, TableReader
from .version import FileMeta, Version


@dataclass
class Compaction:
    level: int
    output_level: int
    inputs: list[FileMeta]
    overlapping: list[FileMeta]
    bottommost: bool

    @property
    def all_inputs(self) -> list[FileMeta]:
        return self.inputs + self.overlapping

    @property
    def trivial_move(self) -> bool:
        return len(self.inputs) == 1 and not self.overlapping

    @property
    def epoch(self) -> int:
        return min(f.epoch for f in self.all_inputs)


def _key_range(files: list[FileMeta]) -> tuple[bytes, bytes]:
    return min(f.smallest for f in files), max(f.largest for f in files)


class CompactionPicker:
    def __init__(self, num_levels: int, l0_trigger: int, level_base: int, multiplier: float) -> None:
        self.num_levels = num_levels
        self.l0_trigger = l0_trigger
        self.level_base = level_base
        self.multiplier = multiplier
        self._pointers: dict[int, bytes] = {}

    def max_bytes(self, level: int) -> float:
        return self.level_base * self.multiplier ** (level - 1)

    def scores(self, version: Version) -> list[tuple[float, int]]:
        out = [(len(version.levels[0]) / self.l0_trigger, 0)]
        for level in range(1, self.num_levels - 1):
            out.append((version.level_bytes(level) / self.max_bytes(level), level))
        return sorted(out, reverse=True)

    def pick(self, version: Version, busy: set[int]) -> Compaction | None:
        for score, level in self.scores(version):
            if score < 1:
                return None
            c = self._pick_level0(version, busy) if level == 0 else self._pick_level(version, level, busy)
            if c is not None:
                return c
        return None

    def _finish(self, version: Version, level: int, inputs: list[FileMeta],
                busy: set[int]) -> Compaction | None:
        lo, hi = _key_range(inputs)
        over = version.overlapping(level + 1, lo, hi)
        if any(f.number in busy for f in over):
            return None
        lo, hi = _key_range(inputs + over)
        deeper = any(version.overlapping(d, lo, hi) for d in range(level + 2, len(version.levels)))
        return Compaction(level, level + 1, inputs, over, bottommost=not deeper)

    def _pick_level0(self, version: Version, busy: set[int]) -> Compaction | None:
        files = version.levels[0]
        # All of level 0 goes down together, so no older overlapping file stays above.
        if not files or any(f.number in busy for f in files):
            return None
        return self._finish(version, 0, list(files), busy)

    def _pick_level(self, version: Version, level: int, busy: set[int]) -> Compaction | None:
        files = version.levels[level]
        if not files:
            return None
        start = bisect_left(version.largests[level], self._pointers.get(level, b""))
        if start < len(files) and files[start].largest == self._pointers.get(level):
            start += 1
        for i in range(len(files)):
            f = files[(start + i) % len(files)]
            if f.number in busy:
                continue
            c = self._finish(version, level, [f], busy)
            if c is not None:
                self._pointers[level] = f.largest
                return c
        return None

    def pick_range(self, version: Version, level: int, begin: bytes | None, end: bytes | None,
                   busy: set[int]) -> Compaction | None:
        """The compaction of ``level`` files meeting ``[begin, end]`` into the next level."""
        files = version.overlapping(level, begin, end)
        if not files:
            return None
        if level == 0:
            files = list(version.levels[0])
        if any(f.number in busy for f in files):
            return None
        return self._finish(version, level, files, busy)


def flush_job(mem: MemTable, path: str, block_size: int, compression: str,
              bloom_bits: int) -> dict:
    """Write the memtable's versions to one table at ``path``; return its stats."""
    builder = TableBuilder(path, block_size, compression, bloom_bits)
    try:
        add = builder.add
        for key, seq, value in mem.entries():
            add(key, seq, value)
        return builder.finish()
    except BaseException:
        builder.abandon()
        raise


def _source(paths: list[str], rank: int) -> Iterator[tuple[bytes, int, int, bytes | None]]:
    for path in paths:
        for key, tag, value in TableReader(path, 0).entries():
            yield key, rank, -tag, value


def compaction_job(groups: list[list[str]], tmp_prefix: str, snapshots: list[int],
                   bottommost: bool, target_size: int, block_size: int, compression: str,
                   bloom_bits: int) -> list[dict]:
    """Merge the tables in ``groups`` (newest group first, each sorted and disjoint).

    Outputs go to ``{tmp_prefix}{i}.tmp``, split at ``target_size`` on user-key
    boundaries; returns their stats with the path under ``"path"``.
    """
    snaps = sorted(snapshots)
    nsnaps = len(snaps)
    outputs: list[dict] = []
    builder: TableBuilder | None = None
    cur: bytes | None = None
    newer_seq = 0
    last_added: bytes | None = None
    try:
        for key, _, ntag, value in heapq.merge(*(_source(g, r) for r, g in enumerate(groups))):
            seq = (-ntag) >> 8
            if key != cur:
                cur = key
                keep = True
            else:
                # An older version survives only if some snapshot falls in [seq, newer_seq).
                i = bisect_left(snaps, seq)
                keep = i < nsnaps and snaps[i] < newer_seq
            newer_seq = seq
            if not keep:
                continue
            if value is None and bottommost and (not nsnaps or snaps[0] >= seq):
                continue
            if builder is not None and key != last_added and builder.file_size >= target_size:
                stats = builder.finish()
                stats["path"] = builder.path
                outputs.append(stats)
                builder = None
            if builder is None:
                builder = TableBuilder(f"{tmp_prefix}{len(outputs)}.tmp", block_size,
                                       compression, bloom_bits)
            builder.add(key, seq, value)
            last_added = key
        if builder is not None:
            stats = builder.finish()
            stats["path"] = builder.path
            outputs.append(stats)
            builder = None
    except BaseException:
        if builder is not None:
            builder.abandon()
        for out in outputs:
            try:
                os.unlink(out["path"])
            except FileNotFoundError:
                pass
        raise
    return outputs
