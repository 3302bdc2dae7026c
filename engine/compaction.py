"""Choosing compactions and the jobs that build tables (flush and compaction).

Leveled compaction: level 0 is compacted into level 1 when it holds
``level0_file_num_compaction_trigger`` files or more bytes than
``max_bytes_for_level_base``; level L >= 1 is compacted into L + 1
when its bytes exceed ``max_bytes_for_level_base * multiplier ** (L - 1)``. A file
is picked only when neither it nor any file it would merge with is already being
compacted (the caller's ``busy`` set), and a compaction is picked only when its
output range does not meet the output range of a running one at the same level
(``running``): two results installed side by side must not overlap in a level >= 1.
Job functions take only plain data and paths so they can run in a forked child
(engine/background.py).

Invariant of the merge: for each user key the newest version is kept, an older one
only while a snapshot sees it, and a deletion is dropped only at the bottom of the
tree when no snapshot could see an older version beneath it.

Range tombstones. A version under a tombstone of the inputs with a higher sequence
number is dropped when no snapshot lies between the two (no reader sees the version
but not the tombstone). A tombstone is dropped when a newer one over the same keys
hides it from every snapshot, or at the bottom of the tree when no snapshot is older
than it: nothing it could cover remains below. Outputs are cut between user keys;
each output gets the tombstones cut to its share of the key space, ``[successor of
the previous output's last key, successor of its own last key)`` (the first output
from the start, the last to the end), so outputs never share a key and levels >= 1
never overlap (engine/range_tombstones.py).

Single deletion contract: a ``single_delete`` is issued only for a key put exactly
once since its last deletion. A single deletion meeting, as the next older version
with no snapshot between them, a put drops and is dropped with it, at any level;
the versions below them are then judged as if the pair had never been written (a
deletion there still hides older puts; engine/memtable.py keeps a deletion a put
replaces for this). Otherwise it behaves as a deletion. If the contract was broken
(two puts, or mixed with ``delete``), an older value may come back to reads:
undefined, as in RocksDB, but every step above still only keeps or drops whole
entries, so no file is damaged.
"""

from __future__ import annotations

import os
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import neg, or_

from .memtable import MemTable
from .range_tombstones import FragmentedTombstones, fragment, successor
from .table_builder import TableBuilder
from .table_reader import TableReader
from .tags import KIND_DELETE, KIND_PUT, KIND_SINGLE_DELETE
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

    @property
    def key_range(self) -> tuple[bytes, bytes]:
        """The keys its outputs can hold (inclusive): those of all its inputs."""
        return _key_range(self.all_inputs)

    def output_meets(self, level: int, lo: bytes, hi: bytes) -> bool:
        """Whether its outputs, at their level, could meet ``[lo, hi]`` at ``level``."""
        if level != self.output_level:
            return False
        mine_lo, mine_hi = self.key_range
        return mine_lo <= hi and lo <= mine_hi


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

    def pick(self, version: Version, busy: set[int],
             running: Sequence[Compaction] = ()) -> Compaction | None:
        for score, level in self.scores(version):
            if score < 1:
                return None
            c = self._pick_level0(version, busy, running) if level == 0 else \
                self._pick_level(version, level, busy, running)
            if c is not None:
                return c
        return None

    def _finish(self, version: Version, level: int, inputs: list[FileMeta],
                busy: set[int], running: Sequence[Compaction]) -> Compaction | None:
        if any(f.number in busy for f in inputs):
            return None
        lo, hi = _key_range(inputs)
        over = version.overlapping(level + 1, lo, hi)
        if any(f.number in busy for f in over):
            return None
        lo, hi = _key_range(inputs + over)
        if any(r.output_meets(level + 1, lo, hi) for r in running):
            return None
        deeper = any(version.overlapping(d, lo, hi) for d in range(level + 2, len(version.levels)))
        return Compaction(level, level + 1, inputs, over, bottommost=not deeper)

    def _pick_level0(self, version: Version, busy: set[int],
                     running: Sequence[Compaction]) -> Compaction | None:
        files = version.levels[0]
        # All of level 0 goes down together, so no older overlapping file stays above.
        if not files or any(f.number in busy for f in files):
            return None
        return self._finish(version, 0, list(files), busy, running)

    def _pick_level(self, version: Version, level: int, busy: set[int],
                    running: Sequence[Compaction]) -> Compaction | None:
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
            c = self._finish(version, level, [f], busy, running)
            if c is not None:
                self._pointers[level] = f.largest
                return c
        return None

    def pick_range(self, version: Version, level: int, begin: bytes | None, end: bytes | None,
                   busy: set[int], running: Sequence[Compaction] = ()) -> Compaction | None:
        """The compaction of ``level`` files meeting ``[begin, end]`` into the next level."""
        files = version.overlapping(level, begin, end)
        if not files:
            return None
        if level == 0:
            files = list(version.levels[0])
        return self._finish(version, level, files, busy, running)


def flush_job(mem: MemTable, path: str, block_size: int, compression: str,
              bloom_bits: int) -> dict:
    """Write the memtable's versions to one table at ``path``; return its stats."""
    builder = TableBuilder(path, block_size, compression, bloom_bits)
    try:
        keys = mem.sorted_keys()
        if mem.older or mem.single_deletes:
            sdels = mem.single_deletes
            keys, tags, values = [], [], []
            for key, seq, value in mem.entries():
                keys.append(key)
                if value is None:
                    tags.append(seq << 8 | (KIND_SINGLE_DELETE if seq in sdels else KIND_DELETE))
                    values.append(b"")
                else:
                    tags.append(seq << 8 | KIND_PUT)
                    values.append(value)
            builder.add_many(keys, tags, values)
        else:
            # A slice of keys at a time, so the columns of the whole memtable never
            # exist at once in the child.
            step = 1 << 14
            for i in range(0, len(keys), step):
                part = keys[i:i + step]
                seqs, values = mem.columns(part)
                if None in values:
                    tags = [seq << 8 | (KIND_DELETE if value is None else KIND_PUT)
                            for seq, value in zip(seqs, values, strict=True)]
                    values = [b"" if value is None else value for value in values]
                else:
                    # seq << 8 | KIND_PUT for every key, in C.
                    tags = list(map(or_, map((256).__mul__, seqs), repeat(KIND_PUT)))
                builder.add_many(part, tags, values)
        for start, end, seq in mem.range_dels:
            builder.add_range_tombstone(start, end, seq)
        return builder.finish()
    except BaseException:
        builder.abandon()
        raise


class _Cursor:
    """Walks one sorted run of tables block by block."""

    __slots__ = ("_blocks", "keys", "tags", "values", "pos", "rank")

    def __init__(self, readers: list[TableReader], rank: int) -> None:
        self._blocks = (blk for reader in readers for blk in reader.blocks())
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


def _merged_windows(groups: list[list[TableReader]],
                    ) -> Iterator[list[tuple[bytes, int, int, bytes]]]:
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


def _surviving_tombstones(tombs: FragmentedTombstones, snaps: list[int],
                          bottommost: bool) -> FragmentedTombstones:
    """The pieces of ``tombs`` with the sequence numbers a compaction must keep: per
    piece, the newest of each snapshot stripe (an older one in the same stripe is
    hidden from every reader by the newer), none at the bottom of the tree in the
    stripe below every snapshot."""
    starts: list[bytes] = []
    ends: list[bytes] = []
    seqs: list[tuple[int, ...]] = []
    for start, end, over in zip(tombs.starts, tombs.ends, tombs.seqs, strict=True):
        kept = []
        last_stripe = -1
        for t in over:  # highest first
            stripe = bisect_left(snaps, t)
            if stripe == last_stripe:
                continue
            last_stripe = stripe
            if bottommost and stripe == 0:
                continue
            kept.append(t)
        if kept:
            starts.append(start)
            ends.append(end)
            seqs.append(tuple(kept))
    return FragmentedTombstones(starts, ends, seqs)


def compaction_job(groups: list[list[str]], tmp_prefix: str, snapshots: list[int],
                   bottommost: bool, target_size: int, block_size: int, compression: str,
                   bloom_bits: int, global_seqs: dict[str, int] | None = None) -> list[dict]:
    """Merge the tables in ``groups`` (newest group first, each sorted and disjoint).

    Outputs go to ``{tmp_prefix}{i}.tmp``, split at ``target_size`` between user
    keys; returns their stats with the path under ``"path"``. ``global_seqs`` maps
    the path of each ingested input to its global sequence number; the outputs are
    ordinary tables holding the versions with it.

    At the bottommost level a put every snapshot sees is written with sequence
    number 0, as RocksDB does: nothing older is left anywhere for it to be ordered
    against, every newer version has a higher number, and a block of zero sequence
    numbers compresses to almost nothing. Not while a range tombstone survives the
    compaction: then every number stays, so no put can come to look older than a
    tombstone it is newer than.
    """
    snaps = sorted(snapshots)
    nsnaps = len(snaps)
    gseqs = global_seqs or {}
    readers = [[TableReader(path, 0, None, gseqs.get(path)) for path in group] for group in groups]
    tombs = fragment(t for group in readers for r in group for t in r.range_tombstones)
    newest_above = tombs.newest_above if len(tombs) else None
    kept_tombs = _surviving_tombstones(tombs, snaps, bottommost)
    # Puts with a number at or below this are written with sequence number 0.
    zero_upto = (snaps[0] if nsnaps else 1 << 62) if bottommost and not len(kept_tombs) else -1
    # Where the next output's share of the tombstones begins (None: from the start).
    tomb_lower: bytes | None = None
    outputs: list[dict] = []
    builder: TableBuilder | None = None
    cur: bytes | None = None
    newer_seq = 0

    def finish(last_key: bytes | None) -> None:
        """Give ``builder`` its tombstones up to just past ``last_key`` (None: all the
        rest) and finish it."""
        nonlocal builder, tomb_lower
        assert builder is not None
        upper = successor(last_key) if last_key is not None else None
        for start, end, seq in kept_tombs.clipped(tomb_lower, upper):
            builder.add_range_tombstone(start, end, seq)
        tomb_lower = upper
        stats = builder.finish()
        stats["path"] = builder.path
        outputs.append(stats)
        builder = None

    try:
        for batch in _merged_windows(readers):
            keys: list[bytes] = []
            tags: list[int] = []
            values: list[bytes] = []
            n = len(batch)
            vanish = -1  # the index of a put that goes with the single deletion before it
            for idx in range(n):
                key, _, ntag, value = batch[idx]
                if idx == vanish:
                    # Older versions are judged as if the pair had never been written.
                    cur = None
                    continue
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
                if newest_above is not None:
                    t = newest_above(key, seq)
                    # Covered, and no snapshot sees this version without the tombstone.
                    if t and (not nsnaps or (i := bisect_left(snaps, seq)) == nsnaps
                              or snaps[i] >= t):
                        continue
                kind = tag & 0xFF
                if kind != KIND_PUT:
                    if bottommost and (not nsnaps or snaps[0] >= seq):
                        continue
                    if kind == KIND_SINGLE_DELETE and idx + 1 < n:
                        nkey, _, nntag, _ = batch[idx + 1]
                        if nkey == key and -nntag & 0xFF == KIND_PUT:
                            i = bisect_left(snaps, -nntag >> 8)
                            if i == nsnaps or snaps[i] >= seq:  # no snapshot between
                                vanish = idx + 1
                                continue
                if kind == KIND_PUT and seq <= zero_upto:
                    tag = KIND_PUT
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
                finish(keys[-1])
        if builder is None and next(kept_tombs.clipped(tomb_lower, None), None) is not None:
            # Tombstones past the last output (or with no point entry left at all).
            builder = TableBuilder(f"{tmp_prefix}{len(outputs)}.tmp", block_size,
                                   compression, bloom_bits)
        if builder is not None:
            finish(None)
    except BaseException:
        if builder is not None:
            builder.abandon()
        for out in outputs:
            try:
                os.unlink(out["path"])
            except FileNotFoundError:
                pass
        raise
    finally:
        for group in readers:
            for r in group:
                r.close()
    return outputs
