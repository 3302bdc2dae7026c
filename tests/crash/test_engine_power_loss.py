"""Power cuts, not just kills: the engine keeps every write made with sync=True, and
everything before it, when the page cache is lost.

The engine writes numbered batches (tests/crash/engine_crash_driver.py's, whose
content is a pure function of the number) in this process, with flushes, compactions
and reopens, under engine_fault_fs's layer. Again and again, as it runs, the layer
writes the directory a power cut at that moment could leave: only synced names and
synced bytes ("drop"), or those plus a random part of the unsynced appends ("torn").
Each such state must open, pass the consistency check, and hold exactly the state
after some prefix of the batches that reaches the last batch acknowledged as synced.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest

from engine import DB, Options

HERE = Path(__file__).parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


driver = _load("engine_crash_driver")
fault_fs = _load("engine_fault_fs")

BATCHES = 1500
CUT_EVERY = 25          # batches between two power cuts
OPTIONS = dict(driver.ENGINE_OPTIONS, background_processes=False)


def run_and_cut(tmp_path: Path, seed: int) -> list[tuple[Path, int, int, str]]:
    """Write the batches, cutting the power every CUT_EVERY of them; each cut's
    directory, the number of batches acknowledged as synced before it, the number
    written before it, and its mode."""
    rng = random.Random(seed)
    fs = fault_fs.FaultFS(tmp_path / "db")
    cuts: list[tuple[Path, int, int, str]] = []
    synced_upto = 0   # batches 0 .. synced_upto - 1 are durable by acknowledgement
    with fault_fs.installed(fs):
        db = DB.open(fs.root, Options(**OPTIONS))
        try:
            for batch_id in range(BATCHES):
                if driver.write_batch(db, batch_id):
                    synced_upto = batch_id + 1
                roll = rng.random()
                if roll < 0.01:
                    db.flush()
                elif roll < 0.015:
                    db.compact_range()
                elif roll < 0.02:
                    db.close()                  # a clean close syncs everything
                    synced_upto = batch_id + 1
                    db = DB.open(fs.root, Options(**OPTIONS))
                if batch_id % CUT_EVERY == CUT_EVERY - 1:
                    for mode in ("drop", "torn"):
                        where = tmp_path / f"cut{len(cuts):03d}-{mode}"
                        fs.power_cut(where, random.Random(f"{seed}-{batch_id}")
                                     if mode == "torn" else None)
                        cuts.append((where, synced_upto, batch_id + 1, mode))
        finally:
            db.close()
    assert fs.syncs > 0
    return cuts


def recovered_prefix(path: Path) -> int:
    """Open a power-cut directory, check it, and return the length of the prefix of
    batches whose state it holds; fail if it holds no prefix's state."""
    with DB.open(path, Options(**OPTIONS)) as db:
        db.check()
        found = dict(db.iterator())
    markers = [int(k[len(driver.MARKER_PREFIX):]) for k in found
               if k.startswith(driver.MARKER_PREFIX)]
    prefix = max(markers) + 1 if markers else 0
    assert sorted(markers) == list(range(prefix)), f"{path.name}: batches missing amid the prefix"
    state: dict[bytes, bytes] = {}
    for batch_id in range(prefix):
        driver.apply_batch(state, batch_id)
    assert found == state, f"{path.name}: not the state after batches 0..{prefix - 1}"
    return prefix


@pytest.mark.parametrize("seed", [1, 2])
def test_every_power_cut_keeps_every_synced_batch_and_a_clean_prefix(tmp_path, seed, capsys):
    cuts = run_and_cut(tmp_path, seed)
    lost_unsynced = 0
    for where, synced_upto, written, mode in cuts:
        prefix = recovered_prefix(where)
        assert prefix >= synced_upto, (
            f"{where.name} ({mode}): batches {prefix}..{synced_upto - 1} were acknowledged as"
            f" synced and are gone")
        assert prefix <= written
        lost_unsynced += prefix < written
    with capsys.disabled():
        print(f"\nengine power loss, seed {seed}: {len(cuts)} crash states checked"
              f" ({len(cuts) // 2} drop, {len(cuts) // 2} torn); unsynced batches lost in"
              f" {lost_unsynced} of them")


def test_the_layer_drops_what_was_not_synced(tmp_path):
    """The model itself: a name not yet covered by a directory sync is gone, bytes not
    covered by a file sync are gone (or, torn, partly there), a deleted name comes back
    with what it had at its last sync."""
    fs = fault_fs.FaultFS(tmp_path / "d")
    with fault_fs.installed(fs):
        dir_fd = os.open(fs.root, os.O_RDONLY)
        log = open(fs.root / "log", "wb")    # noqa: SIM115 - kept open across the cuts
        log.write(b"synced")
        log.flush()
        os.fdatasync(log.fileno())
        log.write(b" appended")
        log.flush()
        with open(fs.root / "gone", "wb") as f:
            f.write(b"kept")
            f.flush()
            os.fsync(f.fileno())
        os.fsync(dir_fd)                     # names now durable: "log", "gone"
        with open(fs.root / "new", "wb") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())             # its contents are synced, its name is not
        os.unlink(fs.root / "gone")          # and this deletion is not synced either
        os.close(dir_fd)
        fs.power_cut(tmp_path / "cut")
        torn = [fs.power_cut(tmp_path / f"torn{i}", random.Random(i)) for i in range(12)]
        log.close()
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["gone", "log"]
    assert (tmp_path / "cut" / "log").read_bytes() == b"synced"
    assert (tmp_path / "cut" / "gone").read_bytes() == b"kept"
    assert torn == [2] * 12
    seen = {(tmp_path / f"torn{i}" / "log").read_bytes() for i in range(12)}
    assert all(b"synced appended".startswith(s) and s.startswith(b"synced") for s in seen)
    assert {b"synced", b"synced appended"} <= seen and len(seen) > 2
