"""Table-building jobs in child processes (engine/forked_job.py): a forked child, or
a fresh interpreter for large compactions. Either returns the job's result or its
error, and dies with its parent."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from engine_helpers import child_facts, small_options

import engine.background as background
from engine import DB
from engine.compaction import compaction_job
from engine.errors import Corruption
from engine.forked_job import run_job


@pytest.mark.parametrize("fresh", [False, True], ids=["forked", "fresh"])
def test_a_job_runs_in_a_child_of_this_process(fresh):
    parent, has_test_modules = run_job(child_facts, fresh=fresh)
    assert parent == os.getpid()
    assert has_test_modules is not fresh  # a fresh interpreter is no copy of this one


@pytest.mark.parametrize("executable", ["", "/nonexistent/python3", "/bin/false"])
def test_a_fresh_job_is_forked_when_no_fresh_interpreter_starts(monkeypatch, executable):
    monkeypatch.setattr(sys, "executable", executable)
    parent, has_test_modules = run_job(child_facts, fresh=True)
    assert parent == os.getpid() and has_test_modules  # a fork of this process


def test_a_fresh_child_ignores_an_engine_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("raise SystemExit('the wrong engine')\n")
    monkeypatch.chdir(tmp_path)
    parent, has_test_modules = run_job(child_facts, fresh=True)
    assert parent == os.getpid() and not has_test_modules


@pytest.mark.parametrize("fresh", [False, True], ids=["forked", "fresh"])
def test_a_childs_corruption_comes_back_with_its_file_and_offset(tmp_path, fresh):
    bad = tmp_path / "000007.sst"
    bad.write_bytes(b"not a table")
    with pytest.raises(Corruption, match=r"000007\.sst.*at offset 0.*too short"):
        run_job(compaction_job, [[str(bad)]], str(tmp_path / "out-"), [], True, 1 << 20,
                4096, "lz4", 10, fresh=fresh)


def test_large_compactions_run_in_a_fresh_interpreter(tmp_path, monkeypatch):
    jobs = []
    real_run_job = background.run_job

    def watched(fn, *args, **kw):
        jobs.append((fn.__name__, kw.get("fresh", False)))
        return real_run_job(fn, *args, **kw)

    monkeypatch.setattr(background, "run_job", watched)
    monkeypatch.setattr(background, "FRESH_INTERPRETER_BYTES", 1)  # every compaction
    expected = {}
    with DB.open(tmp_path / "db", small_options(background_processes=True)) as db:
        for i in range(3000):
            key, value = b"k%05d" % (i * 7 % 2000), b"v%d" % i
            db.put(key, value)
            expected[key] = value
        db.compact_range()
        assert dict(db.iterator()) == expected
        db.check()
    assert ("compaction_job", True) in jobs and ("flush_job", False) in jobs
    with DB.open(tmp_path / "db", small_options()) as db:
        assert dict(db.iterator()) == expected


def test_a_fresh_child_dies_with_its_parent(tmp_path):
    pid_file = tmp_path / "child.pid"
    here = str(Path(__file__).parent)
    parent = subprocess.Popen([
        sys.executable, "-c",
        "import sys; sys.path[:0] = sys.argv[1:3]\n"
        "import engine_helpers\n"
        "from engine.forked_job import run_job\n"
        "run_job(engine_helpers.report_pid_then_wait, sys.argv[3], fresh=True)\n",
        here, str(Path(__file__).parents[3]), str(pid_file)])
    child = None
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert parent.poll() is None, "the parent ended before its child started"
            assert time.monotonic() < deadline, "the child never wrote its pid"
            time.sleep(0.01)
        child = psutil.Process(int(pid_file.read_text()))
        assert child.ppid() == parent.pid
        parent.kill()
        parent.wait()
        child.wait(timeout=30)  # raises TimeoutExpired if it outlives its parent
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and child.is_running():
            child.kill()
