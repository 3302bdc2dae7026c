"""Choosing compactions and the jobs that build tables (flush and compaction).

Leveled compaction: level 0 is compacted into level 1 when it holds
``level0_file_num_compaction_trigger`` files or more bytes than
``max_bytes_for_level_base``; level L >= 1 is compacted into L + 1
when its bytes exceed ``max_bytes_for_level_base * multiplier ** (L - 1)``. A file
is picked only when neither it nor any file it would merge with is already being
compacted (the caller's ``busy`` set). Job functions take only plain data and paths
so they can run in a forked child (engine/background.py).

Invariant of the merge: for each user key the newest version is kept, an older one
only while a snapshot sees it, and a deletion is dropped only at the bottom of the
tree when no snapshot could see an older version beneath it.
"""

from __future__ import annotations

import os
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat
from operator import neg, or_

from .memtable import MemTable
from .table_builder import TableBuilder
from .table_reader import TableReader
from .tags import KIND_DELETE, KIND_PUT
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
        """Inputs can change level by an edit alone: nothing below overlaps them and
        they do not overlap each other."""
        if self.overlapping:
            return False
        files = sorted(self.inputs, key=lambda f: f.smallest)
        return all(a.largest < b.smallest for a, b in zip(files, files[1:], strict=False))

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
        # Level 0 is due by file count, or (as in RocksDB) once it holds more bytes
        # than level 1 may: a few large flushes then do not pile up unmerged.
        l0 = version.levels[0]
        out = [(max(len(l0) / self.l0_trigger,
                    version.level_bytes(0) / self.level_base if l0 else 0.0), 0)]
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
        keys = mem.sorted_keys()
        if mem.older:
            for key, seq, value in mem.entries():
                builder.add(key, seq, value)
        else:
            seqs = list(map(mem.seqs.__getitem__, keys))
            values = list(map(mem.values.__getitem__, keys))
            if None in values:
                tags = [seq << 8 | (KIND_DELETE if value is None else KIND_PUT)
                        for seq, value in zip(seqs, values, strict=True)]
                values = [b"" if value is None else value for value in values]
            else:
                # seq << 8 | KIND_PUT for every key, in C.
                tags = list(map(or_, map((256).__mul__, seqs), repeat(KIND_PUT)))
            step = 1 << 14
            for i in range(0, len(keys), step):
                builder.add_many(keys[i:i + step], tags[i:i + step], values[i:i + step])
        return builder.finish()
    except BaseException:
        builder.abandon()
        raise


class _Cursor:
    """Walks one sorted run of tables block by block."""

    __slots__ = ("_blocks", "keys", "tags", "values", "pos", "rank")

    def __init__(self, paths: list[str], rank: int) -> None:
        self._blocks = (blk for path in paths for blk in TableReader(path, 0).blocks())
        self.rank = rank
        self.keys: list[bytes] | None = None
        self.advance()

    def advance(self) -> bool:
        for keys, tags, values in self._blocks:
            if keys:
                self.keys, self.tags, self.values = keys, tags, values
                self.pos = 0
                return True
        self.keys = None
        return False


def _merged_windows(groups: list[list[str]]) -> Iterator[list[tuple[bytes, int, int, bytes]]]:
    """Yield sorted lists of ``(key, rank, -tag, value)``; every version of a key is
    in one list, and lists come in key order.

    A window takes, from every run, the entries below the smallest last key ``w`` of
    the runs' current blocks (all of them sit in current blocks); when that is empty,
    it takes every version of ``w``. Sorting a window merges its runs in C.
    """
    cursors = [c for c in (_Cursor(g, r) for r, g in enumerate(groups)) if c.keys is not None]
    while cursors:
        w = min(c.keys[-1] for c in cursors)  # type: ignore[index]
        batch: list[tuple[bytes, int, int, bytes]] = []
        for c in cursors:
            e = bisect_left(c.keys, w, c.pos)  # type: ignore[arg-type]
            if e > c.pos:
                p = c.pos
                batch += zip(c.keys[p:e], repeat(c.rank), map(neg, c.tags[p:e]), c.values[p:e])  # type: ignore[index]
                c.pos = e
        if not batch:
            for c in cursors:
                while c.keys is not None and c.keys[c.pos] == w:
                    p = c.pos
                    e = bisect_right(c.keys, w, p)
                    batch += zip(c.keys[p:e], repeat(c.rank), map(neg, c.tags[p:e]), c.values[p:e])
                    c.pos = e
                    if e == len(c.keys):
                        c.advance()
            cursors = [c for c in cursors if c.keys is not None]
        batch.sort()
        yield batch


def compaction_job(groups: list[list[str]], tmp_prefix: str, snapshots: list[int],
                   bottommost: bool, target_size: int, block_size: int, compression: str,
                   bloom_bits: int) -> list[dict]:
    """Merge the tables in ``groups`` (newest group first, each sorted and disjoint).

    Outputs go to ``{tmp_prefix}{i}.tmp``, split at ``target_size`` between user
    keys; returns their stats with the path under ``"path"``.
    """
    snaps = sorted(snapshots)
    nsnaps = len(snaps)
    outputs: list[dict] = []
    builder: TableBuilder | None = None
    cur: bytes | None = None
    newer_seq = 0
    try:
        for batch in _merged_windows(groups):
            keys: list[bytes] = []
            tags: list[int] = []
            values: list[bytes] = []
            for key, _, ntag, value in batch:
                tag = -ntag
                seq = tag >> 8
                if key != cur:
                    cur = key
                    newer_seq = seq
                elif nsnaps:
                    # An older version survives only if a snapshot falls in [seq, newer_seq).
                    i = bisect_left(snaps, seq)
                    keep = i < nsnaps and snaps[i] < newer_seq
                    newer_seq = seq
                    if not keep:
                        continue
                else:
                    continue
                if tag & 0xFF == KIND_DELETE and bottommost and (not nsnaps or snaps[0] >= seq):
                    continue
                keys.append(key)
                tags.append(tag)
                values.append(value)
            if not keys:
                continue
            if builder is None:
                builder = TableBuilder(f"{tmp_prefix}{len(outputs)}.tmp", block_size,
                                       compression, bloom_bits)
            builder.add_many(keys, tags, values)
            if builder.file_size >= target_size:
                stats = builder.finish()
                stats["path"] = builder.path
                outputs.append(stats)
                builder = None
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
