"""scripts/bench_kv end to end on a tiny data set: every workload runs and is tabled.

Only lsmdb and SQLite (both always installed), so the test does not depend on the bench
extra; the figures themselves are not asserted (speed targets live in the script).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = [
    "fillseq", "fillrandom", "fillbatch", "overwrite", "readrandom",
    "readmissing", "readseq", "seekrandom", "fillsync",
    "dr_read_before", "deleterange", "deleterange_all", "dr_read_after",
]
# engines without a range deletion (SQLite here) print "-" in the deleterange group
DELETERANGE = ["dr_read_before", "deleterange", "deleterange_all", "dr_read_after"]
WRITES = ["fillseq", "fillrandom", "fillbatch", "overwrite", "fillsync"]
UNSYNCED = ["fillseq", "fillrandom", "fillbatch", "overwrite"]


def test_bench_kv_runs_every_workload(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(REPO / "scripts" / "bench_kv"), "--num", "2000", "--sync-num", "200",
         "--engines", "lsmdb,sqlite", "--dir", str(tmp_path / "kv"),
         "--json", str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "skipped" not in out, out
    table = out[out.index("Throughput"):out.index("Write latency")].splitlines()
    header = table[1].split()
    assert header == ["workload", "lsmdb", "sqlite", "like-for-like"], table[1]
    rows = {line.split()[0]: line for line in table[3:] if line.strip()}
    assert sorted(rows) == sorted(WORKLOADS)
    for name, line in rows.items():
        # One "ops/s" cell per engine; RocksDB did not run, so ratios are n/a.
        engines = 1 if name in DELETERANGE else 2
        assert line.count("ops/s") == engines, line
        assert line.count("n/a") == engines, line
        # unsynced writes land in lsmdb's own buffer, in the others' kernel: not alike
        assert line.endswith("no (1)" if name in UNSYNCED else "yes"), line
    assert "fillsync, every write" in out

    # a latency row per write workload and engine: p50 <= p99 <= p99.9 <= max
    latency = out[out.index("Write latency"):out.index("Resources")].splitlines()
    assert latency[1].split()[:6] == ["workload", "engine", "p50", "us", "p99", "us"], latency[1]
    seen = {(line.split()[0], line.split()[1]) for line in latency[3:] if line.strip()
            and not line.startswith(("(1)", " "))}
    assert seen == {(w, e) for w in WRITES for e in ("lsmdb", "sqlite")}, latency
    result = json.loads((tmp_path / "result.json").read_text())
    for engine in ("lsmdb", "sqlite"):
        for w in WRITES:
            lat = result["runs"][engine]["results"][w]["latency"]
            assert 0 < lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"], (engine, w, lat)
            assert 0 <= lat["stalls"] <= result["runs"][engine]["results"][w]["ops"]
    assert "peak RSS" in out and "disk size" in out
    # The databases and the latency files are removed after the run.
    assert not any((tmp_path / "kv").rglob("*.sst"))
    assert list((tmp_path / "kv").iterdir()) == []


def test_sigterm_stops_the_engine_and_removes_its_databases(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "bench_kv"), "--num", "2000000", "--engines", "lsmdb",
         "--dir", str(tmp_path / "kv")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)

    def engine_children() -> list[psutil.Process]:
        found = []
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if "--child" in child.cmdline():
                    found.append(child)
        return found

    deadline = time.monotonic() + 60
    while not (children := engine_children()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert list((tmp_path / "kv").iterdir()) == []
