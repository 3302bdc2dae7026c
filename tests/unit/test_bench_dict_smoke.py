"""scripts/bench_dict end to end on a small dictionary: the rewrite runs beside a
writer, loses none of its appends, and the table is printed (figures not asserted)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_dict_runs_and_loses_no_append(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(REPO / "scripts" / "bench_dict"), "--entries", "20000", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "none lost" in proc.stdout, proc.stdout
    rows = [line.split()[0] for line in proc.stdout.splitlines()
            if line.startswith(("before", "during"))]
    assert rows == ["before", "during"], proc.stdout
    assert list(tmp_path.iterdir()) == []   # the scratch dictionary is removed


def test_bench_dict_refuses_bad_sizes() -> None:
    proc = subprocess.run([str(REPO / "scripts" / "bench_dict"), "--entries", "0"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
