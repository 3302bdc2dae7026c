"""Filesystem benchmarks: the tdefs mount against a raw directory and, optionally, gocryptfs.

Every workload runs on every target in the same run, one target after the other, so
the ratios compare like with like on a machine whose load drifts. Each target lives
in its own directory under one work directory on the same filesystem; whatever this
script mounts is unmounted again, and its daemons stopped, on any exit (an error, a
Ctrl-C or a SIGTERM).

Every group of workloads runs in two conditions, idle and beside a busy neighbour
(benchlib/neighbour.py), each with its own table: a FUSE round trip costs much more
when the daemon's CPU halts between requests. After each table another sets tdefs's
time per small-file operation beside its floor: the round trips the operation takes
times the cost of one, plus what its files.dict syncs cost on the raw disk.

Figures are rates (higher is better) except the daemon's peak resident memory, the
raw fdatasync time and the "sparse" group's times, allocations and delays (lower is
better).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import pgbench
from benchlib.guard import BenchError, run_guarded
from benchlib.latency import percentile
from benchlib.memory import MemorySampler
from benchlib.neighbour import CONDITIONS, condition, conditions_for
from benchlib.table import fmt_ratio, fmt_value, print_table
from benchlib.targets import (
    TDEFS,
    FuseTarget,
    Target,
    TdefsTarget,
    default_base_dir,
    drop_page_cache,
    open_to_others,
    shared_with_other_users,
    started_targets,
)

from mount.mount_table import filesystem_type, is_mounted

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
RSS_LIMIT_MIB = 200


# ---------------------------------------------------------------------------
# sizes


@dataclass(frozen=True)
class Sizes:
    seq_bytes: int
    rand_file_bytes: int
    rand_ops: int
    small_files: int
    appends: int
    kv_keys: int
    kv_synced_keys: int
    pg_scale: int            # pgbench: scale of the data set, clients, seconds of the run
    pg_clients: int
    pg_seconds: int
    # a workload that runs longer than this stops early; its rate is still exact
    op_time_cap: float


FULL = Sizes(seq_bytes=GiB, rand_file_bytes=256 * MiB, rand_ops=20_000, small_files=5_000,
             appends=2_000, kv_keys=200_000, kv_synced_keys=2_000, pg_scale=10, pg_clients=4,
             pg_seconds=30, op_time_cap=60.0)
QUICK = Sizes(seq_bytes=16 * MiB, rand_file_bytes=8 * MiB, rand_ops=500, small_files=200,
              appends=100, kv_keys=5_000, kv_synced_keys=50, pg_scale=1, pg_clients=2,
              pg_seconds=3, op_time_cap=10.0)
SMALL_FILE_BYTES = 4 * KiB
STATFS_PER_FILE = 4
# a files.dict record is about this size; raw_fdatasync times one append and fdatasync
DICT_RECORD_BYTES = 128
RAW_SYNCS = 200
RAND_BLOCK = 4 * KiB
READERS = 4  # threads of rand_read_4k_qd4
SEQ_BLOCK = MiB
KV_KEY_BYTES = 16
KV_VALUE_BYTES = 100


def parse_size(text: str) -> int:
    units = {"k": KiB, "m": MiB, "g": GiB}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 256M)") from None
    if value < SEQ_BLOCK:
        raise argparse.ArgumentTypeError("size must be at least 1M")
    return value


# ---------------------------------------------------------------------------
# workloads


@dataclass(frozen=True)
class Row:
    """One printed figure: its unit and the target it must meet."""

    name: str
    unit: str
    versus: str | None = None     # "raw" or "gocryptfs": the peer the target compares with
    factor: float = 0.0           # tdefs must reach factor x that peer
    raw_factor: float = 0.0       # and, when set, raw_factor x raw as well
    note: str = ""
    limit: float | None = None    # lower is better, and tdefs must stay at or under this
    floor: float | None = None    # higher is better, and tdefs must reach this itself
    smaller: bool = False         # lower is better, with no target

    @property
    def lower_is_better(self) -> bool:
        return self.limit is not None or self.smaller


ROWS = (
    Row("seq_write", "MiB/s", "gocryptfs", 1.0),
    Row("seq_read", "MiB/s", "gocryptfs", 1.0),
    Row("rand_read_4k", "ops/s", "gocryptfs", 0.9),
    Row("rand_read_4k_qd4", "ops/s", "gocryptfs", 0.9),
    Row("rand_write_4k", "ops/s", "gocryptfs", 1.0),
    Row("statfs", "calls/s"),
    Row("raw_fdatasync", "us", smaller=True),
    Row("small_create", "files/s", "gocryptfs", 0.8),
    Row("small_stat", "files/s"),
    Row("small_read", "files/s", "gocryptfs", 0.9),
    Row("small_rename", "files/s", "gocryptfs", 0.5),
    Row("small_unlink", "files/s", "gocryptfs", 0.8),
    Row("append_fsync", "ops/s", "gocryptfs", 1.0),
    Row("rocksdb_fill", "puts/s", "raw", 0.8),
    Row("rocksdb_fill_sync", "puts/s", "gocryptfs", 1.0, raw_factor=0.5),
    Row("pgbench", "tps", "gocryptfs", 1.3, raw_factor=0.85),
    Row("truncate_1g", "ms", limit=10.0),
    Row("truncate_1g_alloc", "KiB", limit=8.0),
    Row("write_at_1g", "ms", limit=10.0),
    Row("write_at_1g_alloc", "KiB", limit=8.0),
    Row("stat_while_copy_p99", "ms", limit=5.0),
    Row("stat_while_copy_max", "ms"),
    Row("copy_in", "MB/s"),
    Row("reencrypt", "MB/s"),
    Row("reencrypt_vs_copy", "x", floor=0.5),
    Row("write_alone", "MB/s"),
    Row("write_during_reencrypt", "MB/s"),
    Row("write_slowdown", "%", limit=25.0),
)
RSS_ROW = "daemon_peak_rss"
ROW_BY_NAME = {row.name: row for row in ROWS}


@dataclass
class Context:
    target: Target
    sizes: Sizes
    rng: random.Random
    results: dict[str, float] = field(default_factory=dict)
    # tdefs only: per small-file row, the FUSE requests and files.dict fdatasyncs per
    # operation, as the daemon counted them
    per_op: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.target.workdir


@contextlib.contextmanager
def counted(ctx: Context, row: str, ops: int) -> Iterator[None]:
    """Count what the daemon does while the block runs (on tdefs; elsewhere nothing):
    FUSE requests and files.dict fdatasyncs per operation go to ctx.per_op[row]. Dirty
    pages and times of earlier phases are written back first, so they count for none."""
    if not isinstance(ctx.target, TdefsTarget):
        yield
        return
    os.sync()
    before = ctx.target.daemon_counters()
    yield
    after = ctx.target.daemon_counters()
    ctx.per_op[row] = {k: (after[k] - before[k]) / ops for k in after}


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        os.sync()  # earlier workloads' dirty pages are not this one's cost
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.start


def write_file(path: Path, size: int, block: bytes, fsync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, block[:min(left, len(block))])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def seq_workloads(ctx: Context) -> None:
    size = ctx.sizes.seq_bytes
    block = ctx.rng.randbytes(SEQ_BLOCK)
    path = ctx.dir / "seq.bin"
    with Stopwatch() as sw:
        write_file(path, size, block)
    ctx.results["seq_write"] = size / MiB / sw.elapsed

    ctx.target.make_cold()
    path = ctx.dir / "seq.bin"
    with Stopwatch() as sw:
        fd = os.open(path, os.O_RDONLY)
        got = 0
        try:
            while chunk := os.read(fd, SEQ_BLOCK):
                got += len(chunk)
        finally:
            os.close(fd)
    if got != size:
        raise BenchError(f"seq_read read {got} bytes of {size}")
    ctx.results["seq_read"] = size / MiB / sw.elapsed
    os.unlink(path)


def rand_workloads(ctx: Context) -> None:
    size = ctx.sizes.rand_file_bytes
    path = ctx.dir / "rand.bin"
    write_file(path, size, ctx.rng.randbytes(SEQ_BLOCK))
    blocks = size // RAND_BLOCK
    offsets = [ctx.rng.randrange(blocks) * RAND_BLOCK for _ in range(ctx.sizes.rand_ops)]
    cap = ctx.sizes.op_time_cap

    ctx.target.make_cold()
    fd = os.open(ctx.dir / "rand.bin", os.O_RDONLY)
    try:
        with Stopwatch() as sw:
            done = timed_loop(offsets, cap, lambda off: check_len(os.pread(fd, RAND_BLOCK, off)))
    finally:
        os.close(fd)
    ctx.results["rand_read_4k"] = done / sw.elapsed

    # the same reads by READERS threads at once, each taking every READERS-th offset:
    # a database's concurrent lookups, which a disk serves better together
    ctx.target.make_cold()
    fd = os.open(ctx.dir / "rand.bin", os.O_RDONLY)
    counts = [0] * READERS

    def reader(i: int) -> None:
        counts[i] = timed_loop(offsets[i::READERS], cap,
                               lambda off: check_len(os.pread(fd, RAND_BLOCK, off)))

    try:
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(READERS)]
        with Stopwatch() as sw:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        os.close(fd)
    ctx.results["rand_read_4k_qd4"] = sum(counts) / sw.elapsed

    block = ctx.rng.randbytes(RAND_BLOCK)
    fd = os.open(ctx.dir / "rand.bin", os.O_WRONLY)
    try:
        with Stopwatch() as sw:
            done = timed_loop(offsets, cap, lambda off: os.pwrite(fd, block, off))
            os.fsync(fd)
    finally:
        os.close(fd)
    ctx.results["rand_write_4k"] = done / sw.elapsed
    os.unlink(ctx.dir / "rand.bin")


def check_len(data: bytes) -> None:
    if len(data) != RAND_BLOCK:
        raise BenchError(f"a 4 KiB random read returned {len(data)} bytes")


def timed_loop(items: list, cap: float, op: Callable[[object], object]) -> int:
    """Run op over items until done or `cap` seconds passed; returns how many ran."""
    deadline = time.perf_counter() + cap
    for i, item in enumerate(items):
        op(item)
        if i % 64 == 63 and time.perf_counter() > deadline:
            return i + 1
    return len(items)


def small_file_workloads(ctx: Context) -> None:
    n = ctx.sizes.small_files
    top = ctx.dir / "small"
    top.mkdir()
    names = [top / f"f{i:05d}" for i in range(n)]
    payload = ctx.rng.randbytes(SMALL_FILE_BYTES)

    # one request per call on a FUSE mount and no work behind it: what a request
    # costs the daemon at the least, the floor under every other small-file figure
    calls = STATFS_PER_FILE * n
    with Stopwatch() as sw:
        for _ in range(calls):
            os.statvfs(top)
    ctx.results["statfs"] = calls / sw.elapsed

    if ctx.target.name == "raw":
        # what one durable files.dict record costs the disk itself: the floor's syncs
        record = ctx.rng.randbytes(DICT_RECORD_BYTES)
        took = synced_appends(top / "records", record, RAW_SYNCS, os.fdatasync)
        os.unlink(top / "records")
        # the median: another process's burst of I/O must not raise the floor
        ctx.results["raw_fdatasync"] = percentile(sorted(took), 0.5) * 1e6

    with counted(ctx, "small_create", n), Stopwatch() as sw:
        for path in names:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, payload)
            os.close(fd)
    ctx.results["small_create"] = n / sw.elapsed

    with counted(ctx, "small_stat", n), Stopwatch() as sw:
        for path in names:
            if os.stat(path).st_size != SMALL_FILE_BYTES:
                raise BenchError(f"{path.name} has the wrong size")
    ctx.results["small_stat"] = n / sw.elapsed

    ctx.target.make_cold()
    with Stopwatch() as sw:
        for path in names:
            fd = os.open(path, os.O_RDONLY)
            data = os.read(fd, 2 * SMALL_FILE_BYTES)
            os.close(fd)
            if data != payload:
                raise BenchError(f"{path.name} read back different bytes")
    ctx.results["small_read"] = n / sw.elapsed

    renamed = [top / f"g{i:05d}" for i in range(n)]
    with counted(ctx, "small_rename", n), Stopwatch() as sw:
        for src, dst in zip(names, renamed, strict=True):
            os.rename(src, dst)
    ctx.results["small_rename"] = n / sw.elapsed

    with counted(ctx, "small_unlink", n), Stopwatch() as sw:
        for path in renamed:
            os.unlink(path)
    ctx.results["small_unlink"] = n / sw.elapsed
    top.rmdir()


def synced_appends(path: Path, block: bytes, count: int, sync: Callable[[int], None]) -> list[float]:
    """The seconds each of `count` appends of `block` to `path` took, each with the
    `sync` (os.fsync or os.fdatasync) of the file that follows it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    clock = time.perf_counter
    took = []
    try:
        os.sync()  # earlier workloads' dirty pages are not this one's cost
        for _ in range(count):
            start = clock()
            os.write(fd, block)
            sync(fd)
            took.append(clock() - start)
    finally:
        os.close(fd)
    return took


def append_workload(ctx: Context) -> None:
    n = ctx.sizes.appends
    block = ctx.rng.randbytes(4 * KiB)
    path = ctx.dir / "append.log"
    took = synced_appends(path, block, n, os.fsync)
    if os.stat(path).st_size != n * len(block):
        raise BenchError("append_fsync: the file has the wrong size")
    ctx.results["append_fsync"] = n / sum(took)
    os.unlink(path)


_AT_FDCWD = -100
_AT_STATX_FORCE_SYNC = 0x2000
_STATX_BASIC_STATS = 0x7FF


def stat_from_the_daemon(path: Path) -> float:
    """Seconds one stat of ``path`` takes when it must reach the filesystem (statx with
    AT_STATX_FORCE_SYNC: no attributes cached by the kernel)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)
    start = time.perf_counter()
    if libc.statx(_AT_FDCWD, os.fsencode(path), _AT_STATX_FORCE_SYNC, _STATX_BASIC_STATS, buf):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return time.perf_counter() - start


def allocated_kib(path: Path) -> float:
    return os.stat(path).st_blocks * 512 / KiB


def sparse_workloads(ctx: Context) -> None:
    """Growing a file must not write its gap, and a long operation on one file must
    not hold up requests on another: truncate -s 1G and a 1-byte write at 1 GiB (time
    and allocation, each with the fsync that makes the daemon do its work), then the
    delay of stats of another file while seq_bytes are copied in."""
    path = ctx.dir / "sparse.bin"
    path.write_bytes(b"")
    with Stopwatch() as sw:
        os.truncate(path, GiB)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    ctx.results["truncate_1g"] = sw.elapsed * 1000
    ctx.results["truncate_1g_alloc"] = allocated_kib(path)
    os.unlink(path)

    path.write_bytes(b"")
    fd = os.open(path, os.O_WRONLY)
    try:
        with Stopwatch() as sw:
            os.pwrite(fd, b"x", GiB)
            os.fsync(fd)
    finally:
        os.close(fd)
    ctx.results["write_at_1g"] = sw.elapsed * 1000
    ctx.results["write_at_1g_alloc"] = allocated_kib(path)
    os.unlink(path)

    other = ctx.dir / "other"
    other.write_bytes(b"b")
    copied = ctx.dir / "copied.bin"
    failed: list[BaseException] = []

    def copy_in() -> None:
        try:
            write_file(copied, ctx.sizes.seq_bytes, ctx.rng.randbytes(SEQ_BLOCK))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    os.sync()
    writer = threading.Thread(target=copy_in)
    delays = []
    writer.start()
    while writer.is_alive():
        delays.append(stat_from_the_daemon(other))
    writer.join()
    if failed:
        raise BenchError(f"copying in failed: {failed[0]}")
    delays.sort()
    ctx.results["stat_while_copy_p99"] = percentile(delays, 0.99) * 1000
    ctx.results["stat_while_copy_max"] = delays[-1] * 1000
    os.unlink(copied)
    os.unlink(other)


REENCRYPT_FILES = 16
FOREGROUND_RATE_MB = 50


def reencrypt_workloads(ctx: Context) -> None:
    """tdefs only. Copy seq_bytes in REENCRYPT_FILES files through the mount (re-
    encryption suspended), then rotate the key and time re-encryption of all of them
    at no rate limit: reencrypt_vs_copy compares the two rates. Then write seq_bytes / 4
    sequentially, once with re-encryption suspended and once while it runs at
    FOREGROUND_RATE_MB MB/s after another rotation: write_slowdown."""
    target = ctx.target
    if not isinstance(target, TdefsTarget):
        return
    mnt = target.mountpoint

    def tdefs(*args: str) -> dict:
        out = subprocess.run([*TDEFS, *args, "--json"] if args[0] == "reencrypt" else
                             [*TDEFS, *args], env=target.env, capture_output=True, text=True,
                             timeout=120)
        if out.returncode != 0:
            raise BenchError(f"tdefs {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout) if args[0] == "reencrypt" else {}

    def wait_done(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (st := tdefs("reencrypt", "status", str(mnt)))["state"] != "done":
            if time.monotonic() > deadline:
                raise BenchError(f"re-encryption did not finish in {timeout:.0f} s: {st}")
            time.sleep(0.05)

    block = ctx.rng.randbytes(SEQ_BLOCK)
    size = ctx.sizes.seq_bytes // REENCRYPT_FILES
    tdefs("reencrypt", "suspend", str(mnt))
    top = ctx.dir / "reencrypt"
    top.mkdir()
    with Stopwatch() as sw:
        for i in range(REENCRYPT_FILES):
            write_file(top / f"f{i:02d}", size, block)
    total = size * REENCRYPT_FILES
    ctx.results["copy_in"] = total / 1e6 / sw.elapsed
    tdefs("keys", "rotate", str(mnt))
    tdefs("reencrypt", "rate", str(mnt), "0")
    os.sync()
    start = time.perf_counter()
    tdefs("reencrypt", "resume", str(mnt))
    wait_done(600)
    ctx.results["reencrypt"] = total / 1e6 / (time.perf_counter() - start)
    ctx.results["reencrypt_vs_copy"] = ctx.results["reencrypt"] / ctx.results["copy_in"]

    fg = ctx.sizes.seq_bytes // 4
    tdefs("reencrypt", "suspend", str(mnt))
    tdefs("keys", "rotate", str(mnt))
    with Stopwatch() as sw:
        write_file(ctx.dir / "fg-alone", fg, block)
    ctx.results["write_alone"] = fg / 1e6 / sw.elapsed
    tdefs("reencrypt", "rate", str(mnt), str(FOREGROUND_RATE_MB))
    tdefs("reencrypt", "resume", str(mnt))
    deadline = time.monotonic() + 30
    while (st := tdefs("reencrypt", "status", str(mnt)))["current"] is None:
        if st["state"] == "done" or time.monotonic() > deadline:
            raise BenchError(f"re-encryption was not under way for the foreground write: {st}")
        time.sleep(0.01)  # until a copy is under way
    with Stopwatch() as sw:
        write_file(ctx.dir / "fg-during", fg, block)
    ctx.results["write_during_reencrypt"] = fg / 1e6 / sw.elapsed
    ctx.results["write_slowdown"] = max(
        0.0, 100 * (1 - ctx.results["write_during_reencrypt"] / ctx.results["write_alone"]))
    tdefs("reencrypt", "suspend", str(mnt))
    shutil.rmtree(top)
    for name in ("fg-alone", "fg-during"):
        os.unlink(ctx.dir / name)
    tdefs("reencrypt", "rate", str(mnt), "16")
    tdefs("reencrypt", "resume", str(mnt))


def rocksdb_workloads(ctx: Context) -> None:
    try:
        from rocksdict import Options, Rdict, WriteOptions
    except ImportError:
        raise BenchError("rocksdict is missing: TDEFS_EXTRAS=test,bench scripts/setup") from None

    def fill(name: str, count: int, sync: bool) -> float:
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        keys = ctx.rng.randbytes(KV_KEY_BYTES * count)
        values = ctx.rng.randbytes(KV_VALUE_BYTES * 64)
        write_options = WriteOptions()
        write_options.sync = sync
        db = Rdict(str(ctx.dir / name), options)
        try:
            put = db.put
            step = KV_KEY_BYTES
            with Stopwatch() as sw:
                for i in range(count):
                    v = (i % 64) * KV_VALUE_BYTES
                    put(keys[i * step:(i + 1) * step], values[v:v + KV_VALUE_BYTES],
                        write_options)
        finally:
            db.close()
        return count / sw.elapsed

    ctx.results["rocksdb_fill"] = fill("rocksdb-fill", ctx.sizes.kv_keys, sync=False)
    ctx.results["rocksdb_fill_sync"] = fill("rocksdb-sync", ctx.sizes.kv_synced_keys, sync=True)


def pgbench_workload(ctx: Context) -> None:
    """PostgreSQL with its data directory on the target: pgbench's TPC-B-like script,
    fsync and synchronous_commit on (benchlib/pgbench.py)."""
    why = pgbench.missing()
    if why is not None:
        raise BenchError(f"pgbench: {why}")
    with shared_with_other_users(ctx.target):
        where = ctx.dir / "pgbench"
        where.mkdir()
        try:
            # the work directory and what leads to it, up to the base directory
            open_to_others(where, ctx.target.root.parent.parent)
            ctx.results["pgbench"] = pgbench.run_pgbench(
                where, ctx.sizes.pg_scale, ctx.sizes.pg_clients, ctx.sizes.pg_seconds)
        finally:
            shutil.rmtree(where, ignore_errors=True)


WORKLOADS: dict[str, tuple[Callable[[Context], None], tuple[str, ...]]] = {
    "seq": (seq_workloads, ("seq_write", "seq_read")),
    "rand": (rand_workloads, ("rand_read_4k", "rand_read_4k_qd4", "rand_write_4k")),
    "small": (small_file_workloads,
              ("statfs", "raw_fdatasync", "small_create", "small_stat", "small_read", "small_rename",
               "small_unlink")),
    "append": (append_workload, ("append_fsync",)),
    "rocksdb": (rocksdb_workloads, ("rocksdb_fill", "rocksdb_fill_sync")),
    "pgbench": (pgbench_workload, ("pgbench",)),
    "sparse": (sparse_workloads, ("truncate_1g", "truncate_1g_alloc", "write_at_1g",
                                  "write_at_1g_alloc", "stat_while_copy_p99",
                                  "stat_while_copy_max")),
    "reencrypt": (reencrypt_workloads, ("copy_in", "reencrypt", "reencrypt_vs_copy",
                                        "write_alone", "write_during_reencrypt",
                                        "write_slowdown")),
}


# ---------------------------------------------------------------------------
# reporting


CONDITION_TITLES = {
    "idle": "idle: nothing else runs, so a CPU may halt between requests",
    "busy": "busy neighbour: a spinner at nice 19 on each other CPU keeps it out of halt",
}
# the small-file rows whose time per operation is set beside its floor; small_read is
# not one of them, since its cold reads wait for the disk, which the floor leaves out
FLOOR_ROWS = ("small_create", "small_stat", "small_rename", "small_unlink")

Results = dict[str, dict[str, float]]   # target -> row -> figure


def verdict(row: Row, results: Results) -> tuple[str, str]:
    """(target text, PASS/MISS/n/a) for one row."""
    if row.limit is not None or row.floor is not None:
        mine = results.get("tdefs", {}).get(row.name)
        goal = (f"<= {row.limit:g} {row.unit}" if row.limit is not None
                else f">= {row.floor:g} {row.unit}")
        if mine is None:
            return goal, "n/a"
        met = mine <= row.limit if row.limit is not None else mine >= row.floor  # type: ignore[operator]
        return goal, "PASS" if met else "MISS"
    if row.versus is None:
        return "-", ""
    goal = f">= {row.factor:g} x {row.versus}"
    mine = results.get("tdefs", {}).get(row.name)
    peer = results.get(row.versus, {}).get(row.name)
    if mine is None or peer is None:
        return goal, "n/a"
    met = mine >= row.factor * peer
    if row.raw_factor:
        goal += f", >= {row.raw_factor:g} x raw"
        raw = results.get("raw", {}).get(row.name)
        if raw is None:
            return goal, "n/a"
        met = met and mine >= row.raw_factor * raw
    return goal, "PASS" if met else "MISS"


def report_rows(results: Results, rows: list[Row], peak_rss: float | None,
                title: str) -> list[dict]:
    """Print one condition's table: every row on every target, the ratios, the verdicts."""
    header = ("workload", "unit", "raw", "tdefs", "tdefs/raw", "gocryptfs",
              "tdefs/gocryptfs", "target", "result")
    lines, records = [], []
    for row in rows:
        raw = results.get("raw", {}).get(row.name)
        mine = results.get("tdefs", {}).get(row.name)
        peer = results.get("gocryptfs", {}).get(row.name)
        goal, outcome = verdict(row, results)
        lines.append((row.name, row.unit, fmt_value(raw), fmt_value(mine), fmt_ratio(mine, raw),
                      fmt_value(peer), fmt_ratio(mine, peer), goal, outcome))
        records.append({"workload": row.name, "unit": row.unit, "raw": raw, "tdefs": mine,
                        "gocryptfs": peer, "target": goal, "result": outcome})
    if "tdefs" in results:
        outcome = "n/a" if peak_rss is None else (
            "PASS" if peak_rss < RSS_LIMIT_MIB else "MISS")
        lines.append((RSS_ROW, "MiB", "-", fmt_value(peak_rss), "-", "-", "-",
                      f"< {RSS_LIMIT_MIB} MiB", outcome))
        records.append({"workload": RSS_ROW, "unit": "MiB", "raw": None, "tdefs": peak_rss,
                        "gocryptfs": None, "target": f"< {RSS_LIMIT_MIB} MiB",
                        "result": outcome})
    print_table(header, lines, "llrrrrrll", title=title)
    return records


def report_floors(results: Results, per_op: dict[str, dict[str, float]]) -> list[dict]:
    """Print, for each small-file row measured on tdefs, its µs per operation beside its
    floor: the FUSE requests the daemon counted per operation times tdefs's statfs time
    (one round trip), plus its files.dict fdatasyncs per operation times raw_fdatasync."""
    mine = results.get("tdefs", {})
    statfs = mine.get("statfs")
    sync_us = results.get("raw", {}).get("raw_fdatasync")
    rows = [r for r in FLOOR_ROWS if r in mine and r in per_op]
    if not statfs or not rows:
        return []
    trip_us = 1e6 / statfs
    lines, records = [], []
    for name in rows:
        us = 1e6 / mine[name]
        requests, syncs = per_op[name]["requests"], per_op[name]["dict_syncs"]
        floor = None if syncs and sync_us is None else requests * trip_us + syncs * (sync_us or 0)
        lines.append((name, fmt_value(us), f"{requests:.2f}", f"{syncs:.2f}", fmt_value(floor),
                      fmt_ratio(us, floor)))
        records.append({"workload": name, "tdefs_us": us, "requests": requests,
                        "dict_syncs": syncs, "floor_us": floor})
    print_table(("operation", "tdefs us/op", "requests/op", "dict syncs/op", "floor us/op",
                 "tdefs/floor"), lines, "lrrrrr",
                title=f"tdefs against its floor: requests x {trip_us:.1f} us (its statfs) + "
                      "dict syncs x " + (f"{sync_us:.0f} us (raw_fdatasync)" if sync_us
                                         else "raw_fdatasync (not measured: no raw target)"))
    return records


# ---------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_fs",
        description="Benchmark the tdefs mount against the raw disk and (optionally) gocryptfs.")
    parser.add_argument("--size", type=parse_size,
                        help="bytes for the sequential workloads (default 1G; 16M with --quick)")
    parser.add_argument("--dir", type=Path,
                        help="where to put backing dirs and mounts (default /tmp, or /var/tmp "
                             "when /tmp is in memory)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help=f"comma-separated workload groups (default: {','.join(WORKLOADS)})")
    parser.add_argument("--targets", default="raw,tdefs",
                        help="comma-separated targets among raw,tdefs (default: raw,tdefs)")
    parser.add_argument("--peers", default="",
                        help="other encrypting filesystems to compare with: gocryptfs")
    parser.add_argument("--init-option", action="append", default=[], metavar="OPT",
                        help="pass OPT to `tdefs init` (repeatable), e.g. "
                             "--init-option=--durability=ordered")
    parser.add_argument("--mount-option", action="append", default=[], metavar="OPT",
                        help="pass OPT to `tdefs mount` (repeatable), e.g. --mount-option=--xattrs")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run every workload N times and keep the best figure (default 1)")
    parser.add_argument("--condition", choices=(*CONDITIONS, "both"), default="both",
                        help="run idle, beside a busy neighbour (a niced spinner on each "
                             "other CPU), or both, each with its own table (default both)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = parser.parse_args(argv)

    def names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
        chosen = [n.strip() for n in text.split(",") if n.strip()]
        for n in chosen:
            if n not in allowed:
                parser.error(f"unknown {what} {n!r} (choose from {', '.join(allowed)})")
        return chosen

    args.only = names(args.only, tuple(WORKLOADS), "workload")
    args.targets = names(args.targets, ("raw", "tdefs"), "target")
    args.targets += [p for p in names(args.peers, ("gocryptfs",), "peer")
                     if p not in args.targets]
    if not args.only or not args.targets:
        parser.error("nothing to run")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def sizes_for(args: argparse.Namespace) -> Sizes:
    base = QUICK if args.quick else FULL
    if args.size is None:
        return base
    return Sizes(**{**base.__dict__, "seq_bytes": args.size})


def bench(args: argparse.Namespace) -> int:
    sizes = sizes_for(args)
    conditions = conditions_for(args.condition)
    TdefsTarget.extra_init_args = tuple(args.init_option)
    TdefsTarget.extra_mount_args = tuple(args.mount_option)
    base = args.dir if args.dir is not None else default_base_dir()
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tdefs-bench-", dir=base))
    print(f"bench_fs: work dir {root} ({filesystem_type(root)}), targets "
          f"{', '.join(args.targets)}, workloads {', '.join(args.only)}, "
          f"sequential {sizes.seq_bytes / MiB:.0f} MiB, {' and '.join(conditions)}"
          + (f", best of {args.repeat}" if args.repeat > 1 else "")
          + (f", tdefs init {' '.join(args.init_option)}" if args.init_option else "")
          + (f", tdefs mount {' '.join(args.mount_option)}" if args.mount_option else ""),
          flush=True)
    if not drop_page_cache():
        print("bench_fs: cannot drop the page cache (not root): cold reads only remount",
              flush=True)
    results: dict[str, Results] = {c: {name: {} for name in args.targets} for c in conditions}
    per_op: dict[str, dict[str, dict[str, float]]] = {c: {} for c in conditions}
    peaks: dict[str, float] = {}
    failures: list[str] = []
    try:
        with started_targets(root, args.targets) as targets, \
                MemorySampler(targets["tdefs"].daemons if "tdefs" in targets else None,
                              interval=0.05, find_every=1.0) as memory:
            for round_no, group in ((r, g) for r in range(args.repeat) for g in args.only):
                if args.repeat > 1 and group == args.only[0]:
                    print(f"  round {round_no + 1} of {args.repeat}", flush=True)
                # each group in each condition in turn, so drifting load meets both alike
                for cond in conditions:
                    memory.take_peak()
                    with condition(cond):
                        run_group(group, cond, targets, sizes, args.seed, results[cond],
                                  per_op[cond], failures)
                    peak = memory.take_peak()
                    if peak is not None:
                        peaks[cond] = max(peaks.get(cond, 0.0), peak / MiB)
    finally:
        if args.keep:
            print(f"bench_fs: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    chosen_rows = [row for group in args.only for row in ROWS if row.name in WORKLOADS[group][1]]
    tables = {}
    for cond in conditions:
        rows = report_rows(results[cond], chosen_rows, peaks.get(cond), CONDITION_TITLES[cond])
        floors = report_floors(results[cond], per_op[cond])
        tables[cond] = {"rows": rows, "floors": floors}
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes.__dict__, "targets": args.targets,
                                         "conditions": tables, "failures": failures}, indent=2))
    for failure in failures:
        print(f"bench_fs: error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def run_group(group: str, cond: str, targets: dict[str, Target], sizes: Sizes, seed: int,
              results: Results, per_op: dict[str, dict[str, float]], failures: list[str]) -> None:
    """One workload group on every target in turn; each figure kept if it is the best yet."""
    func, row_names = WORKLOADS[group]
    for name, target in targets.items():
        ctx = Context(target, sizes, random.Random(f"{seed}-{group}"))
        t0 = time.perf_counter()
        try:
            func(ctx)
        except (OSError, BenchError) as exc:
            failures.append(f"{group} on {name} ({cond}): {exc}")
            print(f"  {group:<8} {cond:<4} {name:<10} FAILED: {exc}", flush=True)
            if isinstance(target, FuseTarget) and not is_mounted(target.mountpoint):
                raise BenchError(f"{name} is no longer mounted") from exc
            continue
        for row, value in ctx.results.items():
            # best of the rounds: noise from other load only ever slows a run
            best = min if ROW_BY_NAME[row].lower_is_better else max
            results[name][row] = best(value, results[name].get(row, value))
        per_op.update(ctx.per_op)
        figures = "  ".join(
            f"{r} {fmt_value(ctx.results[r])}"
            + (f" ({fmt_ratio(ctx.results[r], results['raw'].get(r))} x raw)"
               if name != "raw" and "raw" in results else "")
            for r in row_names if r in ctx.results)
        print(f"  {group:<8} {cond:<4} {name:<10} {figures}  [{time.perf_counter() - t0:.1f} s]",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_guarded("bench_fs", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
