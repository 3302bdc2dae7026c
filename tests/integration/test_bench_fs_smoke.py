"""`scripts/bench_fs --quick` runs every workload on the mount and the raw directory,
prints a figure for each, and leaves no mount or daemon behind. Speeds are not judged
here: the targets live in the benchmark's own PASS/MISS column."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import REPO, require_fuse

from mount.mount_table import mounted_under

pytestmark = pytest.mark.fuse

BENCH = REPO / "scripts" / "bench_fs.py"
FS_ROWS = ("seq_write", "seq_read", "rand_read_4k", "rand_write_4k", "statfs", "small_create",
           "small_stat", "small_read", "small_rename", "small_unlink", "append_fsync")
KV_ROWS = ("rocksdb_fill", "rocksdb_fill_sync")
NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?"


def test_quick_bench_prints_every_row(tmp_path: Path) -> None:
    require_fuse()
    have_rocksdb = importlib.util.find_spec("rocksdict") is not None
    groups = "seq,rand,small,append" + (",rocksdb" if have_rocksdb else "")
    rows = FS_ROWS + (KV_ROWS if have_rocksdb else ())
    env = {k: v for k, v in os.environ.items() if k != "TDEFS_FAILPOINTS"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", groups, "--dir", str(tmp_path),
         "--json", str(tmp_path / "result.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output

    # the final table: a row per workload with raw, tdefs and their ratio
    for name in rows:
        pattern = rf"^{name}\s+\S+\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+-\s+-"
        assert re.search(pattern, proc.stdout, re.MULTILINE), f"no figures for {name}:\n{output}"
    assert re.search(rf"^daemon_peak_rss\s+MiB\s+-\s+{NUMBER}\s", proc.stdout, re.MULTILINE), output

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["failures"] == []
    by_name = {r["workload"]: r for r in result["rows"]}
    assert set(by_name) == {*rows, "daemon_peak_rss"}
    for name in rows:
        assert by_name[name]["raw"] > 0 and by_name[name]["tdefs"] > 0, by_name[name]
    assert 0 < by_name["daemon_peak_rss"]["tdefs"] < 4096

    # everything it mounted is gone, and so is its work directory
    assert mounted_under(tmp_path) == []
    leftover = [p.pid for p in psutil.process_iter(["cmdline"])
                if any(str(tmp_path) in part for part in p.info["cmdline"] or [])]
    assert leftover == [], f"daemons still running: {leftover}"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_sparse_rows_judge_tdefs_against_their_limits(tmp_path: Path) -> None:
    require_fuse()
    env = {k: v for k, v in os.environ.items() if k != "TDEFS_FAILPOINTS"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "sparse", "--dir", str(tmp_path),
         "--json", str(tmp_path / "result.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["workload"]: r for r in json.loads((tmp_path / "result.json").read_text())["rows"]}
    for name, limit in (("truncate_1g", "<= 10 ms"), ("write_at_1g", "<= 10 ms"),
                        ("truncate_1g_alloc", "<= 8 KiB"), ("write_at_1g_alloc", "<= 8 KiB"),
                        ("stat_while_copy_p99", "<= 5 ms")):
        row = rows[name]
        assert row["target"] == limit and row["raw"] is not None and row["tdefs"] is not None
        assert row["result"] == ("PASS" if row["tdefs"] <= float(limit.split()[1]) else "MISS")
    # growing a file through the mount allocates no more than the raw disk does
    assert rows["truncate_1g_alloc"]["tdefs"] <= 8 and rows["write_at_1g_alloc"]["tdefs"] <= 8


def test_reencrypt_rows_measure_tdefs_alone(tmp_path: Path) -> None:
    require_fuse()
    env = {k: v for k, v in os.environ.items() if k != "TDEFS_FAILPOINTS"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--size", "64M", "--only", "reencrypt",
         "--dir", str(tmp_path), "--json", str(tmp_path / "result.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["workload"]: r for r in json.loads((tmp_path / "result.json").read_text())["rows"]}
    assert rows["reencrypt_vs_copy"]["target"] == ">= 0.5 x"
    assert rows["write_slowdown"]["target"] == "<= 25 %"
    for name in ("copy_in", "reencrypt", "write_alone", "write_during_reencrypt"):
        assert rows[name]["tdefs"] > 0 and rows[name]["raw"] is None, rows[name]
    assert rows["reencrypt_vs_copy"]["tdefs"] == pytest.approx(
        rows["reencrypt"]["tdefs"] / rows["copy_in"]["tdefs"], rel=0.01)


def test_bench_refuses_bad_options(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--only", "nonsense"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown workload 'nonsense'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_init_options_reach_the_vault(tmp_path: Path) -> None:
    require_fuse()
    env = {k: v for k, v in os.environ.items() if k != "TDEFS_FAILPOINTS"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "append", "--dir", str(tmp_path),
         "--init-option=--durability=ordered", "--keep"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tdefs init --durability=ordered" in proc.stdout
    (work,) = tmp_path.iterdir()
    vault = json.loads((work / "tdefs" / "backing" / ".tdefs" / "vault.json").read_text())
    assert vault["options"]["durability"] == "ordered"


def test_bench_floor_measures_every_target_and_leaves_nothing(tmp_path: Path) -> None:
    require_fuse()
    env = {k: v for k, v in os.environ.items() if k != "TDEFS_FAILPOINTS"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_floor.py"), "--calls", "200",
         "--rounds", "2", "--dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("empty", "tdefs"):
        assert re.search(rf"^{name}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", proc.stdout, re.MULTILINE), \
            proc.stdout
    assert re.search(r"^empty\s+\S+\s+\S+\s+1\.00$", proc.stdout, re.MULTILINE), proc.stdout
    assert list(tmp_path.iterdir()) == []
    assert mounted_under(tmp_path) == []
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_floor.py"), "--rounds", "0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
