"""Several processes at once on one mount, each running random writes, renames,
unlinks and truncates in its own directory and checking the contents against its own
model: the daemon's worker threads, per-inode locks and inode table under load."""

from __future__ import annotations

import multiprocessing
import os
import random
from pathlib import Path

from fuse_harness import VaultPaths, mounted_at

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
