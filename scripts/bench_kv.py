"""db_bench-style throughput comparison of the lsmdb engine against RocksDB, LevelDB and SQLite.

Each engine runs every workload in its own fresh child process, so its peak RSS is its
own; the parent only orchestrates, samples memory and prints the tables. The child
times every write and hands the latencies to the parent in a file per workload (4
bytes a write), so sorting them for the percentiles costs the engine's process no
memory. The workloads,
their exact semantics per engine and how to run them are described in
docs/benchmarks.md (section "bench_kv"); this file and that page must agree.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import importlib
import itertools
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from benchlib.guard import run_guarded
from benchlib.latency import percentile
from benchlib.memory import MemorySampler, process_tree
from benchlib.processes import REPO, kill_processes
from benchlib.table import fmt_bytes, fmt_rate, fmt_value, print_table

ENGINES = ("lsmdb", "rocksdb", "leveldb", "sqlite")
BASELINE = "rocksdb"
WORKLOADS = (
    "fillseq",
    "fillrandom",
    "fillbatch",
    "overwrite",
    "readrandom",
    "readmissing",
    "readseq",
    "seekrandom",
    "fillsync",
    "dr_read_before",
    "deleterange",
    "deleterange_all",
    "dr_read_after",
)
# The deleterange group (engines that have a range deletion): RANGES deletions of up to
# RANGE_KEYS keys each, then WIDE_DELETIONS deletions of the whole key space; reads of
# keys no range covers, before and after the RANGES deletions.
RANGES = 1000
RANGE_KEYS = 1000
WIDE_DELETIONS = 100
WRITE_WORKLOADS = ("fillseq", "fillrandom", "fillbatch", "overwrite", "fillsync")
# Writes that need not be durable when the call returns. lsmdb buffers them in its own
# process (64 KiB) before they reach the WAL file, while RocksDB, LevelDB and SQLite
# hand each to the kernel: with lsmdb in the run these rows do not compare like with
# like. In fillsync every engine makes every write durable before it returns.
UNSYNCED_WRITES = ("fillseq", "fillrandom", "fillbatch", "overwrite")
LATENCY_POINTS = (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))

KEY_SIZE = 16
VALUE_SIZE = 100
BATCH_SIZE = 100
SEEK_NEXTS = 10
# A single foreground write slower than this counts as a stall.
STALL_SECONDS = 0.010
VALUE_POOL = 10007

# RocksDB and LevelDB get what lsmdb has on by default (a 10 bits/key bloom filter, a
# 32 MiB block cache); neither turns a bloom filter on by itself.
PEER_BLOOM_BITS = 10
PEER_BLOCK_CACHE = 32 << 20

# What lsmdb should reach on this machine relative to RocksDB in the same run (ops/s).
TARGET_RATIOS = {
    "fillseq": 0.5,
    "fillrandom": 0.5,
    "fillbatch": 0.5,
    "overwrite": 0.5,
    "readrandom": 0.9,
    "seekrandom": 0.9,
    "readseq": 0.9,
    "fillsync": 0.8,
}
# Footprint against RocksDB in the same run: peak RSS and the database's size on disk.
RSS_TARGET_RATIO = 1.5
DISK_TARGET_RATIO = 1.2
# Tails of the writes a foreground waits on: no single write (a batch in fillbatch)
# over STALL_SECONDS, and the 99.9th percentile under TAIL_P999_SECONDS.
TAIL_WORKLOADS = ("fillrandom", "fillbatch", "overwrite")
TAIL_P999_SECONDS = 0.005

# Exit status of a child whose engine module is not installed: a skip, not a failure.
EXIT_SKIP = 3

INSTALL_HINT = {
    "rocksdb": "install the bench extra: TDEFS_EXTRAS=test,bench scripts/setup",
    "leveldb": (
        "install the bench extra: TDEFS_EXTRAS=test,bench scripts/setup "
        "(if pip has to build plyvel from source it needs the LevelDB headers: "
        "apt-get install libleveldb-dev g++)"
    ),
    "lsmdb": "the engine package must import: .venv/bin/python -c 'import engine'",
    "sqlite": "the Python build lacks the sqlite3 module",
}


class EngineMissing(Exception):
    """The engine's Python module cannot be imported on this machine."""


# --------------------------------------------------------------------------- data


def present_key(n: int) -> bytes:
    """Key number n of the data set (even numbers, zero-padded to 16 bytes)."""
    return b"%016d" % (2 * n)


def missing_key(n: int) -> bytes:
    """A 16-byte key that sorts between present keys n and n+1, never written."""
    return b"%016d" % (2 * n + 1)


def make_values(seed: int) -> list[bytes]:
    """A pool of distinct 100-byte values, each about half compressible (as in db_bench)."""
    rng = random.Random(seed)
    half = VALUE_SIZE // 2
    return [rng.randbytes(half) + bytes([65 + i % 26]) * (VALUE_SIZE - half) for i in range(VALUE_POOL)]


def permutation(n: int, seed: int) -> array:
    """Every number below n exactly once, in a seeded random order (4 bytes per entry)."""
    order = array("I", range(n))
    random.Random(seed).shuffle(order)
    return order


# ------------------------------------------------------------------------ engines


class Adapter:
    """One engine behind the few calls the workloads make.

    Each attribute set by `open` is the engine's own bound method where the engine offers
    one, so the measured loop pays for the engine and not for a wrapper layer.
    """

    name = ""
    module = ""  # the Python module that binds the engine
    put: Callable[[bytes, bytes], object]
    put_sync: Callable[[bytes, bytes], object]
    get: Callable[[bytes], bytes | None]
    # delete every key in [begin, end) as one operation; None: the engine has none
    delete_range: Callable[[bytes, bytes], object] | None = None

    def __init__(self) -> None:
        try:
            self.mod = importlib.import_module(self.module)
        except ImportError as exc:
            raise EngineMissing(f"cannot import {self.module}: {exc}") from exc

    def open(self, path: Path, sync_mode: bool = False) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.db.close()

    def write_batch(self, pairs: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    def scan(self) -> Iterable[tuple[bytes, bytes]]:
        raise NotImplementedError

    def seek(self, key: bytes) -> Iterator[tuple[bytes, bytes]]:
        raise NotImplementedError

    def counters(self) -> dict | None:
        """The engine's own counters (flushes, compactions, stalls), where it keeps them."""
        return None


class LsmdbAdapter(Adapter):
    name = "lsmdb"
    module = "engine"

    def open(self, path: Path, sync_mode: bool = False) -> None:
        self.db = self.mod.DB.open(str(path), self.mod.Options())
        self.put = self.db.put
        self.get = self.db.get
        self.delete_range = self.db.delete_range
        self.put_sync = functools.partial(self.db.put, sync=True)

    def write_batch(self, pairs: list[tuple[bytes, bytes]]) -> None:
        batch = self.mod.WriteBatch()
        for k, v in pairs:
            batch.put(k, v)
        self.db.write(batch)

    def scan(self) -> Iterable[tuple[bytes, bytes]]:
        return self.db.iterator()

    def seek(self, key: bytes) -> Iterator[tuple[bytes, bytes]]:
        return iter(self.db.iterator(lower=key))

    def counters(self) -> dict | None:
        stats = self.db.property("stats")
        return {k: v for k, v in stats.items() if isinstance(v, int)}


class RocksdbAdapter(Adapter):
    name = "rocksdb"
    module = "rocksdict"

    def open(self, path: Path, sync_mode: bool = False) -> None:
        # raw_mode: keys and values are stored as given, not pickled.
        opts = self.mod.Options(raw_mode=True)
        opts.create_if_missing(True)
        table = self.mod.BlockBasedOptions()
        table.set_bloom_filter(PEER_BLOOM_BITS, False)
        table.set_block_cache(self.mod.Cache(PEER_BLOCK_CACHE))
        opts.set_block_based_table_factory(table)
        self.db = self.mod.Rdict(str(path), opts)
        self.put = self.db.put
        self.get = self.db.get
        self.delete_range = self.db.delete_range
        sync = self.mod.WriteOptions()
        sync.sync = True
        self.put_sync = functools.partial(self.db.put, write_opt=sync)

    def write_batch(self, pairs: list[tuple[bytes, bytes]]) -> None:
        batch = self.mod.WriteBatch(raw_mode=True)
        for k, v in pairs:
            batch.put(k, v)
        self.db.write(batch)

    def scan(self) -> Iterable[tuple[bytes, bytes]]:
        return self.db.items()

    def seek(self, key: bytes) -> Iterator[tuple[bytes, bytes]]:
        return iter(self.db.items(from_key=key))


class LeveldbAdapter(Adapter):
    name = "leveldb"
    module = "plyvel"

    def open(self, path: Path, sync_mode: bool = False) -> None:
        self.db = self.mod.DB(str(path), create_if_missing=True,
                              bloom_filter_bits=PEER_BLOOM_BITS, lru_cache_size=PEER_BLOCK_CACHE)
        self.put = self.db.put
        self.get = self.db.get
        self.put_sync = functools.partial(self.db.put, sync=True)

    def write_batch(self, pairs: list[tuple[bytes, bytes]]) -> None:
        with self.db.write_batch() as batch:
            for k, v in pairs:
                batch.put(k, v)

    def scan(self) -> Iterable[tuple[bytes, bytes]]:
        return self.db.iterator()

    def seek(self, key: bytes) -> Iterator[tuple[bytes, bytes]]:
        return self.db.iterator(start=key)


class SqliteAdapter(Adapter):
    """SQLite in WAL mode: one WITHOUT ROWID table, one transaction per put.

    synchronous=NORMAL in WAL mode writes each commit to the WAL without fsync, the same
    promise as an LSM put with sync=False (survives a process crash, not a power cut);
    fillsync switches to synchronous=FULL, one fsync per commit, like put(sync=True).
    """

    name = "sqlite"
    module = "sqlite3"

    def open(self, path: Path, sync_mode: bool = False) -> None:
        path.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, so every INSERT is its own transaction.
        self.conn = self.mod.connect(str(path / "kv.sqlite"), isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={'FULL' if sync_mode else 'NORMAL'}")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID"
        )
        execute = self.conn.execute
        insert = "INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)"
        select = "SELECT v FROM kv WHERE k = ?"

        def put(k: bytes, v: bytes) -> None:
            execute(insert, (k, v))

        def get(k: bytes) -> bytes | None:
            row = execute(select, (k,)).fetchone()
            return None if row is None else row[0]

        self.put = put
        self.put_sync = put
        self.get = get

    def close(self) -> None:
        self.conn.close()

    def write_batch(self, pairs: list[tuple[bytes, bytes]]) -> None:
        self.conn.execute("BEGIN")
        self.conn.executemany("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", pairs)
        self.conn.execute("COMMIT")

    def scan(self) -> Iterable[tuple[bytes, bytes]]:
        return self.conn.execute("SELECT k, v FROM kv ORDER BY k")

    def seek(self, key: bytes) -> Iterator[tuple[bytes, bytes]]:
        return iter(
            self.conn.execute(
                "SELECT k, v FROM kv WHERE k >= ? ORDER BY k LIMIT ?", (key, SEEK_NEXTS + 1)
            )
        )


ADAPTERS: dict[str, type[Adapter]] = {
    "lsmdb": LsmdbAdapter,
    "rocksdb": RocksdbAdapter,
    "leveldb": LeveldbAdapter,
    "sqlite": SqliteAdapter,
}


# ---------------------------------------------------------------------- workloads


class Result:
    """One workload's measurement: ops, seconds, bytes moved, and for a write workload
    the latency of every write (a put, or a batch) in seconds."""

    def __init__(self, ops: int, seconds: float, nbytes: int, latencies: array | None = None):
        self.ops = ops
        self.seconds = seconds
        self.nbytes = nbytes
        self.latencies = latencies

    def as_dict(self) -> dict[str, float]:
        return {"ops": self.ops, "seconds": self.seconds, "bytes": self.nbytes}


def timed_puts(put: Callable[[bytes, bytes], object], order: Iterable[int], values: list[bytes]) -> Result:
    """Put key `order[i]`, timing every call; the latency bookkeeping is the same for all
    engines: a clock read and an append to a float array per put."""
    clock = time.perf_counter
    latencies = array("f")
    note = latencies.append
    start = prev = clock()
    for i, n in enumerate(order):
        put(b"%016d" % (2 * n), values[i % VALUE_POOL])
        now = clock()
        note(now - prev)
        prev = now
    ops = len(latencies)
    return Result(ops, clock() - start, ops * (KEY_SIZE + VALUE_SIZE), latencies)


def timed_batches(adapter: Adapter, order: array, values: list[bytes]) -> Result:
    clock = time.perf_counter
    latencies = array("f")
    note = latencies.append
    write_batch = adapter.write_batch
    start = prev = clock()
    for base in range(0, len(order), BATCH_SIZE):
        pairs = [
            (b"%016d" % (2 * order[i]), values[i % VALUE_POOL])
            for i in range(base, min(base + BATCH_SIZE, len(order)))
        ]
        write_batch(pairs)
        now = clock()
        note(now - prev)
        prev = now
    ops = len(order)
    return Result(ops, clock() - start, ops * (KEY_SIZE + VALUE_SIZE), latencies)


def timed_gets(get: Callable[[bytes], bytes | None], keys: Iterable[bytes], expect_found: bool) -> Result:
    clock = time.perf_counter
    ops = 0
    found = 0
    nbytes = 0
    start = clock()
    for key in keys:
        value = get(key)
        if value is not None:
            found += 1
            nbytes += len(key) + len(value)
        ops += 1
    seconds = clock() - start
    want = ops if expect_found else 0
    if found != want:
        raise RuntimeError(f"found {found} of {ops} keys, expected {want}")
    return Result(ops, seconds, nbytes)


def db_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def run_engine(adapter: Adapter, root: Path, num: int, reads: int, seeks: int, sync_num: int,
               seed: int, report: Callable[[str, Result], None]) -> dict:
    """Every workload in order on one engine; returns the JSON-able results."""
    values = make_values(seed)
    rewrites = [v[::-1] for v in values]
    results: dict[str, dict] = {}

    def record(name: str, result: Result) -> None:
        results[name] = result.as_dict()
        report(name, result)

    # fillseq: a fresh DB, keys in ascending order.
    path = fresh(root / "fillseq")
    adapter.open(path)
    record("fillseq", timed_puts(adapter.put, range(num), values))
    adapter.close()
    shutil.rmtree(path)

    # fillrandom: a fresh DB, every key once in random order.
    path = fresh(root / "fillrandom")
    order = permutation(num, seed + 1)
    adapter.open(path)
    record("fillrandom", timed_puts(adapter.put, order, values))
    adapter.close()
    shutil.rmtree(path)

    # fillbatch: a fresh DB, the same in atomic batches of 100; overwrite then rewrites
    # every key of it, in another random order, and the reads run on the result.
    path = fresh(root / "main")
    order = permutation(num, seed + 2)
    adapter.open(path)
    record("fillbatch", timed_batches(adapter, order, values))
    order = permutation(num, seed + 3)
    record("overwrite", timed_puts(adapter.put, order, rewrites))
    counters = adapter.counters()
    if counters is not None:
        shown = ", ".join(f"{k}={v}" for k, v in counters.items()
                          if k in ("flushes", "compactions", "trivial_moves", "stall_waits"))
        print(f"  {adapter.name:8} counters after the fills in this DB: {shown}", flush=True)
    adapter.close()

    # Reads run on a freshly reopened DB: nothing left in a memtable from the writes.
    adapter.open(path)
    order = permutation(num, seed + 4)
    if reads < num:
        order = order[:reads]
    record("readrandom", timed_gets(adapter.get, (present_key(n) for n in order), True))
    order = permutation(num, seed + 5)
    if reads < num:
        order = order[:reads]
    record("readmissing", timed_gets(adapter.get, (missing_key(n) for n in order), False))

    clock = time.perf_counter
    start = clock()
    count = 0
    nbytes = 0
    for k, v in adapter.scan():
        count += 1
        nbytes += len(k) + len(v)
    seconds = clock() - start
    if count != num:
        raise RuntimeError(f"readseq saw {count} keys, expected {num}")
    record("readseq", Result(count, seconds, nbytes))

    order = permutation(num, seed + 6)[:seeks]
    seek = adapter.seek
    islice = itertools.islice
    start = clock()
    nbytes = 0
    for n in order:
        want = present_key(n)
        first = True
        for k, v in islice(seek(want), SEEK_NEXTS + 1):
            if first and k != want:
                raise RuntimeError(f"seek({want!r}) landed on {k!r}")
            first = False
            nbytes += len(k) + len(v)
    record("seekrandom", Result(len(order), clock() - start, nbytes))
    adapter.close()
    disk = db_size(path)
    shutil.rmtree(path)

    # fillsync: a fresh DB, every put durable (fsync) before it returns.
    path = fresh(root / "fillsync")
    adapter.open(path, sync_mode=True)
    record("fillsync", timed_puts(adapter.put_sync, permutation(sync_num, seed + 7), values))
    adapter.close()
    shutil.rmtree(path)

    if getattr(adapter, "delete_range", None) is not None:
        range_deletions(adapter, root, num, reads, seed, values, record)
    return {"results": results, "disk": disk, "counters": counters}


def range_deletions(adapter: Adapter, root: Path, num: int, reads: int, seed: int,
                    values: list[bytes], record: Callable[[str, Result], None]) -> None:
    """The deleterange group on a fresh DB of `num` keys, reopened before each read phase
    so that what was written is in tables, as in a database that has run a while."""
    path = fresh(root / "deleterange")
    adapter.open(path)
    timed_batches(adapter, permutation(num, seed + 8), values)
    adapter.close()
    stride = max(2, num // RANGES)
    width = min(RANGE_KEYS, stride // 2)
    starts = range(0, num, stride)[:RANGES]
    live = [n for n in permutation(num, seed + 9) if n % stride >= width][:reads]
    adapter.open(path)
    record("dr_read_before", timed_gets(adapter.get, (present_key(n) for n in live), True))
    delete_range = adapter.delete_range
    clock = time.perf_counter
    start = clock()
    for a in starts:
        delete_range(present_key(a), present_key(a + width))
    record("deleterange", Result(len(starts), clock() - start, 0))
    adapter.close()
    adapter.open(path)
    record("dr_read_after", timed_gets(adapter.get, (present_key(n) for n in live), True))
    delete_range = adapter.delete_range   # the reopened database's
    start = clock()
    for _ in range(WIDE_DELETIONS):
        delete_range(present_key(0), present_key(num))
    record("deleterange_all", Result(WIDE_DELETIONS, clock() - start, 0))
    if adapter.get(present_key(live[0])) is not None:
        raise RuntimeError("a key survived the deletion of the whole key space")
    adapter.close()
    shutil.rmtree(path)


def child_main(args: argparse.Namespace) -> int:
    """Run in the per-engine child: all workloads, progress on stdout, results to --result."""
    name = args.child
    try:
        adapter = ADAPTERS[name]()
    except EngineMissing as exc:
        Path(args.result).write_text(json.dumps({"skip": str(exc)}))
        return EXIT_SKIP
    root = Path(args.dir) / name
    root.mkdir(parents=True, exist_ok=True)

    def report(workload: str, r: Result) -> None:
        if r.latencies is not None:
            with open(latency_file(Path(args.result), workload), "wb") as f:
                r.latencies.tofile(f)
        rate = r.ops / r.seconds if r.seconds else 0.0
        print(f"  {name:8} {workload:12} {rate:>12,.0f} ops/s  {r.nbytes / r.seconds / 1e6 if r.seconds else 0:8.1f} MB/s"
              f"  ({r.ops:,} ops in {r.seconds:.2f} s)", flush=True)

    try:
        out = run_engine(adapter, root, args.num, args.reads, args.seeks, args.sync_num,
                         args.seed, report)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["maxrss"] = usage.ru_maxrss * 1024
    Path(args.result).write_text(json.dumps(out))
    return 0


# ------------------------------------------------------------------------ parent


def latency_file(result_file: Path, workload: str) -> Path:
    """Where the child leaves the latencies of one write workload (float32, native order)."""
    return result_file.with_name(f"{result_file.name}.{workload}.latencies")


def latency_summary(path: Path) -> dict[str, float]:
    """p50, p99, p99.9 and max of the latencies in `path` (seconds), and how many
    writes took longer than STALL_SECONDS."""
    latencies = array("f")
    with open(path, "rb") as f:
        latencies.frombytes(f.read())
    ordered = sorted(latencies)
    summary = {name: percentile(ordered, fraction) for name, fraction in LATENCY_POINTS}
    summary["max"] = ordered[-1]
    summary["stalls"] = len(ordered) - bisect.bisect_right(ordered, STALL_SECONDS)
    return summary


def run_child(name: str, args: argparse.Namespace, result_file: Path) -> dict:
    """One engine in a fresh interpreter; returns its results plus peak RSS and wall time.

    Peak memory is the larger of the child's own ru_maxrss and the sampled PSS sum over
    the child and any processes it starts, so work moved to helper processes is counted.
    """
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", name,
        "--num", str(args.num), "--reads", str(args.reads), "--seeks", str(args.seeks),
        "--sync-num", str(args.sync_num), "--seed", str(args.seed), "--dir", str(args.dir),
        "--result", str(result_file),
    ]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        with MemorySampler(lambda: process_tree(proc.pid), interval=0.2, pss=True) as memory:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - start
        try:
            payload = json.loads(result_file.read_text())
        except (OSError, json.JSONDecodeError):
            payload = {}
        if proc.returncode == EXIT_SKIP and "skip" in payload:
            return {"skip": payload["skip"]}
        if proc.returncode != 0 or "results" not in payload:
            return {"error": f"exit status {proc.returncode}"}
        for workload in WRITE_WORKLOADS:
            if workload in payload["results"]:
                payload["results"][workload]["latency"] = latency_summary(
                    latency_file(result_file, workload))
        payload["rss"] = max(memory.peak, usage.ru_maxrss * 1024, payload.get("maxrss", 0))
        payload["wall"] = wall
        return payload
    finally:
        if proc.returncode is None:  # interrupted: the engine must not run on alone
            kill_processes(process_tree(proc.pid))  # it and the helpers it forked
            proc.wait()
            shutil.rmtree(Path(args.dir) / name, ignore_errors=True)  # its databases
        result_file.unlink(missing_ok=True)
        for workload in WRITE_WORKLOADS:
            latency_file(result_file, workload).unlink(missing_ok=True)


def like_for_like(workload: str, engines: list[str]) -> str:
    """Whether a row compares like with like, as printed in the tables' last column."""
    if workload in UNSYNCED_WRITES and "lsmdb" in engines and len(engines) > 1:
        return "no (1)"
    return "yes"


def print_tables(engines: list[str], runs: dict[str, dict]) -> None:
    ok = [e for e in engines if "results" in runs[e]]
    base = runs.get(BASELINE, {}).get("results")
    rows = []
    for w in WORKLOADS:
        cells = []
        for e in ok:
            r = runs[e]["results"].get(w)
            if r is None or not r["seconds"]:
                cells.append("-")
                continue
            rate = r["ops"] / r["seconds"]
            mbs = r["bytes"] / r["seconds"] / 1e6
            ratio = "n/a"
            if base and w in base and base[w]["seconds"]:
                ratio = f"{rate / (base[w]['ops'] / base[w]['seconds']):.2f}x"
            cells.append(f"{fmt_rate(rate) + ' ops/s':>14} {mbs:6.1f} MB/s {ratio:>6}")
        rows.append((w, *cells, like_for_like(w, ok)))
    print_table(("workload", *ok, "like-for-like"), rows, "l" + "r" * len(ok) + "l",
                title="Throughput: ops/s, MB/s, and the ratio to RocksDB (x)")

    rows = []
    for w in WRITE_WORKLOADS:
        for e in ok:
            lat = runs[e]["results"].get(w, {}).get("latency")
            if lat is None:
                continue
            rows.append((w, e, *(fmt_value(lat[p] * 1e6) for p, _ in LATENCY_POINTS),
                         fmt_value(lat["max"] * 1e6), lat["stalls"], like_for_like(w, ok)))
    print_table(("workload", "engine", *(f"{p} us" for p, _ in LATENCY_POINTS), "max us",
                 f"over {STALL_SECONDS * 1000:.0f} ms", "like-for-like"), rows, "llrrrrrl",
                title="Write latency: each put, or each batch of 100 in fillbatch, in microseconds")
    if any(like_for_like(w, ok) != "yes" for w in WORKLOADS):
        print("(1) lsmdb buffers unsynced writes in its own process (64 KiB) before they reach "
              "its WAL file;\n    the other engines hand every write to the kernel before it "
              "returns. fillsync, every write\n    durable in every engine, is the row that "
              "compares writes like with like.")

    rows = [("peak RSS", *(fmt_bytes(runs[e]["rss"]) for e in ok)),
            ("disk size", *(fmt_bytes(runs[e]["disk"]) for e in ok)),
            ("wall time", *(f"{runs[e]['wall']:.1f} s" for e in ok))]
    print_table(("", *ok), rows, "l" + "r" * len(ok), title="Resources")
    print_targets(runs)


def print_targets(runs: dict[str, dict]) -> None:
    """The lsmdb targets of this machine, each marked met or MISSED (exit status unaffected)."""
    ours = runs.get("lsmdb", {}).get("results")
    base = runs.get(BASELINE, {}).get("results")
    if not ours or not base:
        return
    print()
    print("lsmdb targets (ratio of ops/s to RocksDB in this run)")
    for w, want in TARGET_RATIOS.items():
        if w not in ours or w not in base or not ours[w]["seconds"] or not base[w]["seconds"]:
            continue
        ratio = (ours[w]["ops"] / ours[w]["seconds"]) / (base[w]["ops"] / base[w]["seconds"])
        verdict = "met" if ratio >= want else "MISSED"
        print(f"{w:12} {ratio:6.2f}x   target >= {want:.2f}x   {verdict}")
    rate = {w: ours[w]["ops"] / ours[w]["seconds"] for w in ours if ours[w]["seconds"]}
    if "deleterange" in rate and "deleterange_all" in rate:
        # the cost of one deletion must not follow the keys it covers
        cost = rate["deleterange"] / rate["deleterange_all"]
        verdict = "met" if cost <= 2 else "MISSED"
        print(f"{'deleterange':12} {cost:6.2f}x   a whole-key-space deletion costs <= 2x one of"
              f" {RANGE_KEYS:,} keys   {verdict}")
    if "dr_read_before" in rate and "dr_read_after" in rate:
        ratio = rate["dr_read_after"] / rate["dr_read_before"]
        verdict = "met" if ratio >= 0.8 else "MISSED"
        print(f"{'dr_read':12} {ratio:6.2f}x   readrandom with {RANGES:,} range tombstones >="
              f" 0.80x without   {verdict}")
    for w in TAIL_WORKLOADS:
        lat = ours.get(w, {}).get("latency")
        if lat is None:
            continue
        verdict = "met" if lat["max"] <= STALL_SECONDS and lat["p99.9"] < TAIL_P999_SECONDS \
            else "MISSED"
        print(f"{w + ' tail':16} max {lat['max'] * 1e3:6.1f} ms, p99.9 {lat['p99.9'] * 1e3:5.2f} ms"
              f"   target max <= {STALL_SECONDS * 1e3:.0f} ms, p99.9 < "
              f"{TAIL_P999_SECONDS * 1e3:.0f} ms   {verdict}")
    for what, key, limit in (("peak RSS", "rss", RSS_TARGET_RATIO),
                             ("disk size", "disk", DISK_TARGET_RATIO)):
        mine, theirs = runs["lsmdb"][key], runs[BASELINE][key]
        ratio = mine / theirs
        verdict = "met" if ratio <= limit else "MISSED"
        print(f"{what:12} {ratio:6.2f}x   {fmt_bytes(mine)} against {fmt_bytes(theirs)},"
              f" target <= {limit:.1f}x   {verdict}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench_kv",
        description="db_bench-style workloads on lsmdb, RocksDB, LevelDB and SQLite "
        "(see docs/benchmarks.md, section bench_kv)",
    )
    ap.add_argument("--num", type=int, default=1_000_000, help="keys in the data set (default 1000000)")
    ap.add_argument("--reads", type=int, default=None,
                    help="lookups for readrandom and readmissing (default: --num)")
    ap.add_argument("--seeks", type=int, default=None,
                    help="seeks for seekrandom, each followed by 10 next (default: --num / 10)")
    ap.add_argument("--sync-num", type=int, default=None,
                    help="puts for fillsync (default: --num / 100, within 1000..10000)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma-separated subset of {','.join(ENGINES)} (default: all)")
    ap.add_argument("--dir", default=str(REPO / "bench-out" / "kv"),
                    help="where the databases are created (default: bench-out/kv in the repository)")
    ap.add_argument("--seed", type=int, default=20261122, help="seed for key orders and values")
    ap.add_argument("--json", metavar="FILE", help="also write all figures to FILE as JSON")
    ap.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.num < 1:
        ap.error("--num must be at least 1")
    if args.reads is None:
        args.reads = args.num
    if args.seeks is None:
        args.seeks = max(1, args.num // 10)
    if args.sync_num is None:
        args.sync_num = min(10_000, max(1_000, args.num // 100))
    if min(args.reads, args.seeks, args.sync_num) < 1:
        ap.error("--reads, --seeks and --sync-num must be at least 1")
    args.reads = min(args.reads, args.num)
    args.seeks = min(args.seeks, args.num)
    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in names if e not in ENGINES]
    if unknown or not names:
        ap.error(f"--engines: unknown engine {', '.join(unknown) or '(none given)'}; "
                 f"choose from {','.join(ENGINES)}")
    args.engine_list = list(dict.fromkeys(names))
    return args


def main(argv: list[str] | None = None) -> int:
    # Piped into `head`, stop quietly like any command-line tool.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        return child_main(args)
    return run_guarded("bench_kv", lambda: bench(args))


def bench(args: argparse.Namespace) -> int:
    """Every engine in turn, each in its own child process; then the tables."""
    try:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"bench_kv: error: cannot create --dir {args.dir}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"bench_kv: {args.num:,} keys of {KEY_SIZE} B, values of {VALUE_SIZE} B; "
          f"{args.reads:,} reads, {args.seeks:,} seeks (+{SEEK_NEXTS} next), "
          f"{args.sync_num:,} synced puts; engines {','.join(args.engine_list)}; dir {args.dir}",
          flush=True)
    runs: dict[str, dict] = {}
    failed = []
    for name in args.engine_list:
        print(f"{name}:", flush=True)
        run = run_child(name, args, Path(args.dir) / f"{name}.result.json")
        runs[name] = run
        if "skip" in run:
            print(f"  {name}: skipped — {run['skip']}; {INSTALL_HINT[name]}", flush=True)
        elif "error" in run:
            print(f"  {name}: FAILED ({run['error']}); see the error above", flush=True)
            failed.append(name)
    if BASELINE not in runs or "results" not in runs[BASELINE]:
        print(f"bench_kv: note: {BASELINE} did not run, ratios are n/a", flush=True)
    print_tables(args.engine_list, runs)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                               "runs": runs}, indent=2))
    if failed:
        print(f"bench_kv: error: {', '.join(failed)} failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
