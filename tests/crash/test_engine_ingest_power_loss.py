"""Ingestion under power cuts: a cut after any sync an ingestion makes leaves a
database that opens, passes its check, and holds all the ingested files or none of
them, with every write synced before; once ``ingest`` has returned, all of them.

The cuts come from engine_fault_fs's layer (only synced names and bytes survive; in
"torn" mode also a random part of what was appended since), taken after every sync
from just before the ingestion until a synced write after it.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from engine import DB, Options, SstFileWriter

HERE = Path(__file__).parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fault_fs = _load("engine_fault_fs")

OPTIONS = dict(write_buffer_size=16 << 10, target_file_size_base=16 << 10, block_size=512,
               level0_file_num_compaction_trigger=100, background_processes=False)
OLD = {b"k%03d" % i: b"old %d" % i for i in range(0, 200, 3)}
INGESTED = [{b"k%03d" % i: b"ingested %d" % i for i in range(0, 100, 2)},
            {b"k%03d" % i: b"ingested %d" % i for i in range(100, 200, 2)}]


class CuttingFS(fault_fs.FaultFS):
    """Takes a power cut (drop and torn) after every sync while ``armed``."""

    def __init__(self, root: Path, into: Path) -> None:
        super().__init__(root)
        self.into = into
        self.armed = False
        self.ingested = False
        self.cuts: list[tuple[Path, bool]] = []

    def after_sync(self, fd: int) -> None:
        super().after_sync(fd)
        if self.armed:
            for mode in ("drop", "torn"):
                where = self.into / f"cut{len(self.cuts):03d}-{mode}"
                self.power_cut(where, random.Random(len(self.cuts)) if mode == "torn" else None)
                self.cuts.append((where, self.ingested))


@pytest.mark.parametrize("move", [False, True])
@pytest.mark.parametrize("mem_key", [b"k001", b"a"], ids=["flushed-first", "no-flush"])
def test_a_power_cut_during_ingestion_keeps_all_files_or_none(tmp_path, move, mem_key):
    sources = []
    for n, puts in enumerate(INGESTED):
        path = tmp_path / f"ext{n}.sst"
        with SstFileWriter(path) as w:
            for k, v in sorted(puts.items()):
                w.put(k, v)
        sources.append(path)
    fs = CuttingFS(tmp_path / "db", tmp_path / "cuts")
    with fault_fs.installed(fs):
        db = DB.open(fs.root, Options(**OPTIONS))
        try:
            for k, v in OLD.items():
                db.put(k, v)
            db.flush()
            # k001 is in an ingested file's range: the ingestion flushes it first.
            db.put(mem_key, b"memtable", sync=True)
            fs.armed = True
            db.ingest(sources, move=move)
            fs.ingested = True
            db.put(b"zz", b"after", sync=True)
            fs.armed = False
        finally:
            db.close()
    assert len(fs.cuts) >= 6
    with_files = without = 0
    for where, returned in fs.cuts:
        with DB.open(where, Options(**OPTIONS)) as db:
            db.check()
            found = dict(db.iterator())
        assert found.get(mem_key) == b"memtable", where.name
        landed = [all(found.get(k) == v for k, v in puts.items()) for puts in INGESTED]
        if any(landed):
            assert all(landed), f"{where.name}: one ingested file without the other"
            with_files += 1
        else:
            assert {k: v for k, v in found.items() if k in OLD and k != mem_key} == \
                {k: v for k, v in OLD.items() if k != mem_key}, where.name
            assert not returned, f"{where.name}: ingest returned, its files are gone"
            without += 1
    assert with_files and without
