"""How long a create waits while files.dict is rewritten as a snapshot.

Builds a dictionary of --entries live entries (default 1,000,000) in a scratch
directory, then rewrites it in one thread while another appends durable one-entry
records (what a create through the mount appends) back to back, and prints the
rewrite's duration and the appends' latency during it against the same appends
before it. Target: the longest stall of an append during the rewrite under 50 ms.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib.latency import percentile
from benchlib.table import print_table

from encfs.filedict import SNAPSHOT_OPS_PER_RECORD, FileDictionary, FileInfo, Put

MAC_KEY = bytes(range(32))
TARGET_MS = 50.0


def info(n: int) -> FileInfo:
    return FileInfo("aes-256-ctr", 1, n.to_bytes(16, "big"))


def build(path: Path, entries: int) -> FileDictionary:
    FileDictionary.create(path, MAC_KEY)
    d = FileDictionary.open(path, MAC_KEY, rewrite_min_records=1 << 62)
    for start in range(0, entries, SNAPSHOT_OPS_PER_RECORD):
        stop = min(start + SNAPSHOT_OPS_PER_RECORD, entries)
        d.append([Put(f"dir{i % 1000:03d}/file{i:07d}".encode(), info(i))
                  for i in range(start, stop)], sync=False)
    d.sync()
    return d


def appends(d: FileDictionary, until: threading.Event, first: int, limit: int) -> list[float]:
    """Durable one-entry appends until ``until`` is set (or ``limit`` of them)."""
    latencies = []
    i = first
    while not until.is_set() and len(latencies) < limit:
        start = time.perf_counter()
        d.append([Put(f"new/file{i:07d}".encode(), info(i))], sync=True)
        latencies.append(time.perf_counter() - start)
        i += 1
    return latencies


def summary(latencies: list[float]) -> tuple[float, float, float]:
    """Median, 99th percentile and longest, in milliseconds."""
    ordered = sorted(latencies)
    return (percentile(ordered, 0.5) * 1000, percentile(ordered, 0.99) * 1000,
            ordered[-1] * 1000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_dict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args(argv)
    if args.entries < 1:
        parser.error("--entries must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="tdefs-bench-dict-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        d = build(work / "files.dict", args.entries)
        print(f"bench_dict: {args.entries:,} entries built in {time.perf_counter() - t0:.1f} s"
              f" ({(work / 'files.dict').stat().st_size / 2**20:.0f} MiB)", flush=True)
        done = threading.Event()
        before = appends(d, done, 0, 500)
        rewrite_s: list[float] = []

        def rewrite() -> None:
            start = time.perf_counter()
            d.rewrite()
            rewrite_s.append(time.perf_counter() - start)
            done.set()

        t = threading.Thread(target=rewrite)
        t.start()
        during = appends(d, done, 500, 1 << 30)
        t.join()
        d.close()
        again = FileDictionary.open(work / "files.dict", MAC_KEY, read_only=True)
        if len(again.entries) != args.entries + len(before) + len(during):
            print("bench_dict: error: entries were lost in the rewrite", file=sys.stderr)
            return 1
        b, dr = summary(before), summary(during)
        verdict = "PASS" if dr[2] <= TARGET_MS else "MISS"
        print(f"\nrewrite of {args.entries:,} entries: {rewrite_s[0]:.2f} s, {len(during):,}"
              " durable appends meanwhile, none lost")
        print_table(("appends", "median ms", "p99 ms", "max ms", "target"),
                    [("before", *(f"{x:.2f}" for x in b), ""),
                     ("during rewrite", *(f"{x:.2f}" for x in dr),
                      f"max <= {TARGET_MS:g} ms: {verdict}")], "lrrrl")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
