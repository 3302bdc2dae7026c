"""scripts/bench_kv end to end on a tiny data set: every workload runs and is tabled.

Only lsmdb and SQLite (both always installed), so the test does not depend on the bench
extra; the figures themselves are not asserted (speed targets live in the script).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = [
    "fillseq", "fillrandom", "fillbatch", "overwrite", "readrandom",
    "readmissing", "readseq", "seekrandom", "fillsync",
]


def test_bench_kv_runs_every_workload(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(REPO / "scripts" / "bench_kv"), "--num", "2000", "--sync-num", "200",
         "--engines", "lsmdb,sqlite", "--dir", str(tmp_path / "kv")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "skipped" not in out, out
    table = out[out.index("Throughput"):out.index("Write stalls")].splitlines()
    header = table[1].split()
    assert header == ["workload", "lsmdb", "sqlite"], table[1]
    rows = {line.split()[0]: line for line in table[2:] if line.strip()}
    assert sorted(rows) == sorted(WORKLOADS)
    for line in rows.values():
        # One "ops/s" cell per engine; RocksDB did not run, so ratios are n/a.
        assert line.count("ops/s") == 2, line
        assert line.count("n/a") == 2, line
    assert "peak RSS" in out and "disk size" in out
    # The databases are removed after the run.
    assert not any((tmp_path / "kv").rglob("*.sst"))
