"""Several processes at once on one mount, each running random writes, renames,
unlinks and truncates in its own directory and checking the contents against its own
model: the daemon's worker threads, per-inode locks and inode table under load."""

from __future__ import annotations

import multiprocessing
import os
import random
import re
from pathlib import Path

from fuse_harness import VaultPaths, mounted_at, run_tdefs

WORKERS = 4
STEPS = 250


def _worker(args: tuple[str, int]) -> str | None:
    """Run one client; returns a description of the first mismatch, or None."""
    root, seed = args
    rng = random.Random(seed)
    d = Path(root) / f"w{seed}"
    d.mkdir()
    model: dict[str, bytes] = {}
    for step in range(STEPS):
        name = f"f{rng.randrange(6)}"
        path = d / name
        op = rng.random()
        if op < 0.4:
            data = rng.randbytes(rng.randrange(0, 200_000))
            off = rng.randrange(0, 150_000)
            with open(path, "r+b" if name in model else "w+b") as f:
                f.seek(off)
                f.write(data)
                if rng.random() < 0.2:
                    f.flush()
                    os.fsync(f.fileno())
            cur = bytearray(model.get(name, b""))
            cur.extend(bytes(max(0, off - len(cur))))
            cur[off:off + len(data)] = data
            model[name] = bytes(cur)
        elif op < 0.55 and name in model:
            other = f"f{rng.randrange(6)}"
            os.rename(path, d / other)
            model[other] = model.pop(name)
        elif op < 0.65 and name in model:
            os.unlink(path)
            del model[name]
        elif op < 0.75 and name in model:
            size = rng.randrange(0, 300_000)
            os.truncate(path, size)
            model[name] = model[name][:size] + bytes(max(0, size - len(model[name])))
        elif name in model and path.read_bytes() != model[name]:
            return f"client {seed}, step {step}: {name} reads back different bytes"
    for name, data in model.items():
        if (d / name).read_bytes() != data:
            return f"client {seed}, at the end: {name} reads back different bytes"
    if sorted(os.listdir(d)) != sorted(model):
        return f"client {seed}: listing {sorted(os.listdir(d))} != {sorted(model)}"
    return None


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_concurrent_clients_match_their_models(vault: VaultPaths) -> None:
    ctx = multiprocessing.get_context("fork")
    with mounted_at(vault):
        with ctx.Pool(WORKERS) as pool:
            problems = pool.map(_worker, [(str(vault.mountpoint), seed) for seed in range(WORKERS)])
        assert [p for p in problems if p] == []
        before = _snapshot(vault.mountpoint)  # each client checked its part against its model
    with mounted_at(vault):
        assert _snapshot(vault.mountpoint) == before


READERS = 4
READS_EACH = 200


def _read_at_random(args: tuple[str, int, int]) -> list[tuple[int, bytes]]:
    path, seed, size = args
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDONLY)
    try:
        offs = [rng.randrange(size // 4096) * 4096 for _ in range(READS_EACH)]
        return [(off, os.pread(fd, 4096, off)) for off in offs]
    finally:
        os.close(fd)


def _cold_copy(v: VaultPaths, data: bytes) -> None:
    """Write data.bin through the mount; once unmounted, evict its backing pages."""
    with mounted_at(v):
        (v.mountpoint / "data.bin").write_bytes(data)
    fd = os.open(v.backing / "data.bin", os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _prefetched_reads(v: VaultPaths) -> float:
    text = run_tdefs("metrics", v.mountpoint).stdout.decode()
    return float(re.search(r"^tdefs_prefetched_reads_total (\S+)$", text,
                           re.MULTILINE).group(1))


def test_cold_reads_of_concurrent_readers_wait_for_the_disk_together(vault: VaultPaths) -> None:
    """A READ that must wait for the disk while other requests wait starts its disk
    read and lets the loop take them (they start theirs) before it waits; a lone
    reader's READs just wait, inline."""
    size = 16 << 20
    data = random.Random(5).randbytes(size)
    _cold_copy(vault, data)
    with mounted_at(vault):
        path = str(vault.mountpoint / "data.bin")
        for off, got in _read_at_random((path, 99, size)):
            assert got == data[off:off + 4096]
        assert _prefetched_reads(vault) == 0
    _cold_copy(vault, data)
    with mounted_at(vault):
        with multiprocessing.Pool(READERS) as pool:
            results = pool.map(_read_at_random, [(path, seed, size) for seed in range(READERS)])
        for result in results:
            for off, got in result:
                assert got == data[off:off + 4096]
        assert _prefetched_reads(vault) > 0
