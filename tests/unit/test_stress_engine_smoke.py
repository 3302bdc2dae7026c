"""scripts/stress_engine: a short run of each mode passes on the engine, and the
checks do catch an engine that loses deletes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "stress_engine.py"


def run(args: list[str], tmp_path: Path, env: dict[str, str] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--dir", str(tmp_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ))


def test_threads_run_every_operation_and_agree_with_the_expected_state(tmp_path: Path) -> None:
    proc = run(["--duration", "4", "--threads", "3", "--seed", "11"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, re.MULTILINE))
    for op in ("put", "delete", "delete_range", "batch", "ingest", "put_once", "single_delete",
               "get", "snapshot_read", "iterate"):
        assert int(counts.get(op, 0)) > 0, (op, proc.stdout)
    assert "stress_engine: ok" in proc.stdout
    assert list(tmp_path.iterdir()) == []   # the database is removed after a pass


def test_crash_loop_finds_every_acknowledged_write_after_each_kill(tmp_path: Path) -> None:
    proc = run(["--crash", "--iterations", "4", "--duration", "60", "--threads", "3",
                "--seed", "12"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = re.search(r"ok, (\d+) kills, (\d+) synced writes", proc.stdout)
    assert summary and int(summary[1]) == 4 and int(summary[2]) > 0, proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_an_engine_that_loses_deletes_is_caught(tmp_path: Path) -> None:
    # a sitecustomize that makes DB.delete do nothing, in the stress's process only
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import engine\nengine.DB.delete = lambda self, key, sync=False: None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), str(REPO)]))
    work = tmp_path / "work"
    work.mkdir()
    proc = run(["--duration", "20", "--threads", "2", "--seed", "13"], work, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stress_engine: FAILED:" in proc.stderr and "expected absent" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(list(work.iterdir())) == 1   # the evidence is kept


def test_bad_options_exit_2(tmp_path: Path) -> None:
    proc = run(["--threads", "0"], tmp_path, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
