"""Model-based test of the engine: a hypothesis state machine checked against a dict.

Every operation of the public API runs on the DB and on a plain dict (plus a frozen copy
per live snapshot); every read compares the two. Range deletions cover the keys between
two drawn bounds; single deletions are drawn only from keys the model knows were put
exactly once since they were last deleted (the contract of ``single_delete``); an
ingested external table (puts, deletes, range deletions) is applied to the dict as
the newest write, and snapshots taken before it must not see it. The
options are tiny (2 KiB memtable and files, 8 KiB level base, multiplier 2) so that a few
hundred writes already flush, compact L0 into L1 and push data down to L2 and beyond,
with tombstones and snapshot-pinned versions crossing every level; half the examples
build tables in forked children, half in threads, and both compressions are used. After
the machine has run, the test checks that files reached L1 and L2, that flushes,
compactions and trivial moves all happened, and that range and single deletions were
issued, so a change that stops compaction cannot make it pass vacuously.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from engine import DB, Options, Snapshot, SstFileWriter, WriteBatch

BULK_KEYS = 1000

# Keys that stress bytewise ordering: the empty key, prefixes of each other, NUL and 0xff
# bytes, a long one.
SPECIAL_KEYS = [b"", b"a", b"a\x00", b"ab", b"b", b"\x00", b"\x00\x00", b"\xff", b"\xff\xff", b"z" * 40]


def bulk_key(n: int) -> bytes:
    return b"k%04d" % n


keys = st.one_of(
    st.sampled_from(SPECIAL_KEYS),
    st.integers(0, BULK_KEYS - 1).map(bulk_key),
)
# Bounds include keys that are never written, so seeks land between keys.
bounds = st.one_of(st.none(), keys, st.sampled_from([b"k05055", b"k1", b"a\x01", b"\x01", b"k"]))
values = st.one_of(
    st.binary(max_size=24),
    # Values larger than a block (and than the memtable) take the spill paths.
    st.tuples(st.integers(0, 255), st.integers(200, 3000)).map(lambda t: bytes([t[0]]) * t[1]),
)

# What the machine saw across all examples: levels that held files, compaction seen.
COVERAGE: dict[str, set[int]] = {"levels": set()}
# How many range deletions and single deletions the machine issued, over all examples.
ISSUED: dict[str, int] = {"delete_range": 0, "single_delete": 0, "ingest": 0}
# Engine counters summed over every DB session of every example.
COUNTERS = ("flushes", "compactions", "trivial_moves")
TOTALS: dict[str, int] = dict.fromkeys(COUNTERS, 0)


def make_options(compression: str, background_processes: bool, block_size: int = 256,
                 bloom_bits: int = 10) -> Options:
    return Options(
        create_if_missing=True,
        background_processes=background_processes,
        write_buffer_size=2 * 1024,
        target_file_size_base=2 * 1024,
        max_bytes_for_level_base=8 * 1024,
        max_bytes_for_level_multiplier=2,
        level0_file_num_compaction_trigger=2,
        block_size=block_size,
        block_cache_size=16 * 1024,
        bloom_bits_per_key=bloom_bits,
        compression=compression,
    )


def expected_items(
    state: dict[bytes, bytes], lower: bytes | None, upper: bytes | None, reverse: bool
) -> list[tuple[bytes, bytes]]:
    items = [
        (k, v)
        for k, v in sorted(state.items())
        if (lower is None or k >= lower) and (upper is None or k < upper)
    ]
    if reverse:
        items.reverse()
    return items


def levels_with_files(db: DB) -> set[int]:
    """Levels that currently hold at least one table file, from the engine's own stats."""
    return {level for level, info in enumerate(db.property("levels")) if info["files"]}


class Snap:
    """A snapshot the machine holds: the engine's handle and the dict it froze."""

    def __init__(self, handle: Snapshot, state: dict[bytes, bytes]) -> None:
        self.handle = handle
        self.state = state
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.handle.release()
            self.released = True


class EngineModel(RuleBasedStateMachine):
    snapshots = Bundle("snapshots")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="engine-model-"))
        self.path = str(self.dir / "db")
        self.state: dict[bytes, bytes] = {}
        # Puts of each key since it was last deleted: single_delete needs exactly one.
        self.puts: dict[bytes, int] = {}
        self.live: list[Snap] = []
        self.db: DB | None = None
        self.options: Options | None = None

    @initialize(compression=st.sampled_from(["none", "zlib", "lz4"]), forked=st.booleans())
    def open_db(self, compression: str, forked: bool) -> None:
        # forked: flushes and compactions build their tables in child processes.
        self.options = make_options(compression, forked)
        self.db = DB.open(self.path, self.options)

    def teardown(self) -> None:
        try:
            if self.db is not None:
                self._release_all()
                self._close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _release_all(self) -> None:
        for snap in self.live:
            snap.release()
        self.live.clear()

    def _close(self) -> None:
        stats = self.db.property("stats")
        for name in COUNTERS:
            TOTALS[name] += stats[name]
        self.db.close()

    def _note_levels(self) -> None:
        COVERAGE["levels"] |= levels_with_files(self.db)

    def _model_put(self, key: bytes, value: bytes) -> None:
        self.state[key] = value
        self.puts[key] = self.puts.get(key, 0) + 1

    def _model_delete(self, key: bytes) -> None:
        self.state.pop(key, None)
        self.puts.pop(key, None)

    def _model_delete_range(self, begin: bytes, end: bytes) -> None:
        for key in [k for k in self.state if begin <= k < end]:
            self._model_delete(key)
        for key in [k for k in self.puts if begin <= k < end]:
            self._model_delete(key)

    # ------------------------------------------------------------------ writes

    @rule(key=keys, value=values, sync=st.booleans())
    def put(self, key: bytes, value: bytes, sync: bool) -> None:
        self.db.put(key, value, sync=sync)
        self._model_put(key, value)

    @rule(key=keys, sync=st.booleans())
    def delete(self, key: bytes, sync: bool) -> None:
        self.db.delete(key, sync=sync)
        self._model_delete(key)

    @rule(begin=keys, end=bounds, sync=st.booleans())
    def delete_range(self, begin: bytes, end: bytes | None, sync: bool) -> None:
        if end is None:
            end = b"\xff" * 3  # above every key the machine writes
        begin, end = min(begin, end), max(begin, end)
        self.db.delete_range(begin, end, sync=sync)
        self._model_delete_range(begin, end)
        ISSUED["delete_range"] += 1

    @precondition(lambda self: any(n == 1 for n in self.puts.values()))
    @rule(data=st.data(), sync=st.booleans())
    def single_delete(self, data: st.DataObject, sync: bool) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, n in self.puts.items() if n == 1)))
        self.db.single_delete(key, sync=sync)
        self._model_delete(key)
        ISSUED["single_delete"] += 1

    @rule(key=keys, value=values, flush=st.booleans())
    def delete_put_once_single_delete(self, key: bytes, value: bytes, flush: bool) -> None:
        """Within the contract: the single deletion meets the one put since the
        deletion, which must still hide any older put once the pair has vanished."""
        self.db.delete(key)
        self.db.put(key, value)
        if flush:
            self.db.flush()
        self.db.single_delete(key)
        self._model_delete(key)
        ISSUED["single_delete"] += 1

    @rule(
        ops=st.lists(st.tuples(keys, st.one_of(st.none(), values, st.tuples(keys))),
                     max_size=12),
        sync=st.booleans(),
    )
    def write_batch(self, ops: list[tuple[bytes, bytes | None | tuple[bytes]]],
                    sync: bool) -> None:
        """A batch of puts, deletes and range deletes (``(key, (end,))``), in order."""
        batch = WriteBatch()
        for key, value in ops:
            if value is None:
                batch.delete(key)
            elif isinstance(value, tuple):
                batch.delete_range(min(key, value[0]), max(key, value[0]))
            else:
                batch.put(key, value)
        self.db.write(batch, sync=sync)
        # Later operations on the same key win, as in the engine.
        for key, value in ops:
            if value is None:
                self._model_delete(key)
            elif isinstance(value, tuple):
                self._model_delete_range(min(key, value[0]), max(key, value[0]))
            else:
                self._model_put(key, value)

    @rule(
        start=st.integers(0, BULK_KEYS - 1),
        count=st.integers(20, 400),
        stride=st.sampled_from([1, 2, 3, 7]),
        tag=st.integers(0, 255),
        delete_every=st.sampled_from([0, 0, 3, 5]),
    )
    def bulk_write(self, start: int, count: int, stride: int, tag: int, delete_every: int) -> None:
        """Many writes in one step: enough bytes to fill memtables and push levels down."""
        for i in range(count):
            key = bulk_key((start + i * stride) % BULK_KEYS)
            if delete_every and i % delete_every == 0:
                self.db.delete(key)
                self._model_delete(key)
            else:
                value = b"%d:%d:" % (tag, i) + bytes([tag]) * (20 + (i * 7) % 60)
                self.db.put(key, value)
                self._model_put(key, value)
        self._note_levels()

    @rule(
        entries=st.dictionaries(keys, st.one_of(st.none(), values), max_size=12),
        ranges=st.lists(st.tuples(keys, bounds), max_size=3),
        move=st.booleans(),
    )
    def ingest(self, entries: dict[bytes, bytes | None],
               ranges: list[tuple[bytes, bytes | None]], move: bool) -> None:
        """An external table of sorted puts, deletes and range deletions, ingested as
        the newest data. All its entries share one sequence number, so its range
        deletions hide older data but not the file's own puts."""
        spans = []
        for begin, end in ranges:
            if end is None:
                end = b"\xff" * 3
            begin, end = min(begin, end), max(begin, end)
            if begin < end:
                spans.append((begin, end))
        if not entries and not spans:
            return
        ISSUED["ingest"] += 1
        path = self.dir / f"external-{ISSUED['ingest']}.sst"
        with SstFileWriter(path, self.options) as writer:
            for begin, end in spans:
                writer.delete_range(begin, end)
            for key, value in sorted(entries.items()):
                if value is None:
                    writer.delete(key)
                else:
                    writer.put(key, value)
        self.db.ingest([path], move=move)
        path.unlink()  # the database has its own copy or link
        for begin, end in spans:
            self._model_delete_range(begin, end)
        for key, value in entries.items():
            if value is None:
                self._model_delete(key)
            else:
                self._model_put(key, value)
        self._note_levels()

    # ------------------------------------------------------------------- reads

    @rule(key=keys)
    def get(self, key: bytes) -> None:
        assert self.db.get(key) == self.state.get(key)

    @rule(lower=bounds, upper=bounds, reverse=st.booleans())
    def scan(self, lower: bytes | None, upper: bytes | None, reverse: bool) -> None:
        got = list(self.db.iterator(lower=lower, upper=upper, reverse=reverse))
        assert got == expected_items(self.state, lower, upper, reverse)

    @rule(lower=bounds, upper=bounds, reverse=st.booleans(), take=st.integers(0, 5))
    def scan_partly(self, lower: bytes | None, upper: bytes | None, reverse: bool, take: int) -> None:
        """Abandon an iterator after a few items; it must not hold anything that blocks later steps."""
        it = iter(self.db.iterator(lower=lower, upper=upper, reverse=reverse))
        got = [item for _, item in zip(range(take), it, strict=False)]
        assert got == expected_items(self.state, lower, upper, reverse)[:take]
        del it

    @rule(
        lower=bounds, upper=bounds, reverse=st.booleans(), take=st.integers(0, 3),
        start=st.integers(0, BULK_KEYS - 1), compact=st.booleans(),
    )
    def scan_across_writes(self, lower: bytes | None, upper: bytes | None, reverse: bool,
                           take: int, start: int, compact: bool) -> None:
        """An iterator keeps the view of its creation while writes, a flush and a compaction
        replace the memtable and the files it reads from."""
        want = expected_items(self.state, lower, upper, reverse)
        it = iter(self.db.iterator(lower=lower, upper=upper, reverse=reverse))
        got = [item for _, item in zip(range(take), it, strict=False)]
        for i in range(60):
            key = bulk_key((start + i) % BULK_KEYS)
            if i % 4 == 0:
                self.db.delete(key)
                self._model_delete(key)
            else:
                value = b"across:%d:" % i + b"x" * 40
                self.db.put(key, value)
                self._model_put(key, value)
        self.db.delete_range(bulk_key(start), bulk_key(start) + b"\x00")
        self._model_delete_range(bulk_key(start), bulk_key(start) + b"\x00")
        self.db.delete(SPECIAL_KEYS[0])
        self._model_delete(SPECIAL_KEYS[0])
        self.db.flush()
        if compact:
            self.db.compact_range()
        got.extend(it)
        assert got == want
        self._note_levels()

    # --------------------------------------------------------------- snapshots

    @rule(target=snapshots)
    def take_snapshot(self) -> Snap:
        snap = Snap(self.db.snapshot(), dict(self.state))
        self.live.append(snap)
        return snap

    @rule(key=keys, value=values)
    def snapshot_as_context(self, key: bytes, value: bytes) -> None:
        """A write inside a `with db.snapshot()` block is invisible through it."""
        before = self.state.get(key)
        with self.db.snapshot() as snap:
            self.db.put(key, value)
            self._model_put(key, value)
            assert self.db.get(key, snapshot=snap) == before
            assert self.db.get(key) == value

    @rule(snap=snapshots, key=keys)
    def get_at_snapshot(self, snap: Snap, key: bytes) -> None:
        if snap.released:
            return
        assert self.db.get(key, snapshot=snap.handle) == snap.state.get(key)

    @rule(snap=snapshots, lower=bounds, upper=bounds, reverse=st.booleans())
    def scan_at_snapshot(self, snap: Snap, lower: bytes | None, upper: bytes | None, reverse: bool) -> None:
        if snap.released:
            return
        got = list(self.db.iterator(lower=lower, upper=upper, reverse=reverse, snapshot=snap.handle))
        assert got == expected_items(snap.state, lower, upper, reverse)

    @rule(snap=consumes(snapshots))
    def release_snapshot(self, snap: Snap) -> None:
        if snap.released:
            return
        snap.release()
        self.live.remove(snap)

    # ------------------------------------------------------------- maintenance

    @rule()
    def flush(self) -> None:
        self.db.flush()
        self._note_levels()

    @rule(begin=bounds, end=bounds)
    def compact_range(self, begin: bytes | None, end: bytes | None) -> None:
        self.db.compact_range(begin, end)
        self._note_levels()

    @rule(
        compression=st.sampled_from(["none", "zlib", "lz4"]),
        block_size=st.sampled_from([256, 1024]),
        bloom_bits=st.sampled_from([10, 0]),
    )
    def reopen(self, compression: str, block_size: int, bloom_bits: int) -> None:
        """Close and reopen, possibly with other table options: old tables keep being read
        with the settings they were written with."""
        # Snapshots do not survive a close; their readers are released first.
        self._release_all()
        self._close()
        self.options = make_options(compression, self.options.background_processes,
                                    block_size, bloom_bits)
        self.db = DB.open(self.path, self.options)
        self.db.check()
        self._note_levels()
        assert list(self.db.iterator()) == sorted(self.state.items())

    @rule()
    def check(self) -> None:
        self.db.check()

    @invariant()
    def one_cheap_read(self) -> None:
        # A single point read per step catches a write that failed to land at once.
        if self.db is not None and self.state:
            key = min(self.state)
            assert self.db.get(key) == self.state[key]


def test_engine_matches_dict_model() -> None:
    COVERAGE["levels"].clear()
    TOTALS.update(dict.fromkeys(COUNTERS, 0))
    ISSUED.update(dict.fromkeys(ISSUED, 0))
    run_state_machine_as_test(
        EngineModel,
        settings=settings(
            max_examples=60,
            stateful_step_count=50,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
    deepest = max(COVERAGE["levels"], default=-1)
    assert 1 in COVERAGE["levels"] and deepest >= 2, (
        f"the model never saw files below L0 (levels with files: {sorted(COVERAGE['levels'])}); "
        "the options no longer drive compaction"
    )
    assert TOTALS["flushes"] and TOTALS["compactions"] and TOTALS["trivial_moves"], TOTALS
    assert ISSUED["delete_range"] > 20 and ISSUED["single_delete"] > 20, ISSUED
    assert ISSUED["ingest"] > 20, ISSUED
