"""The busy neighbour of scripts/bench_fs and bench_floor: one spinner at nice 19 per
other CPU while the block runs, and none after it, however the block or the process
that started them ends."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from benchlib.neighbour import (  # noqa: E402
    BusyNeighbour,
    condition,
    conditions_for,
    spinner_count,
    spinners,
)


def spinners_of(pid: int) -> list[psutil.Process]:
    """The spinners process `pid` started that still run."""
    found = []
    for proc in spinners():
        with contextlib.suppress(psutil.NoSuchProcess):
            if str(pid) in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def wait_until(check, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_spinners_run_niced_in_the_block_and_stop_after_it() -> None:
    with BusyNeighbour() as busy:
        assert len(busy.procs) == spinner_count() >= 1
        running = spinners_of(os.getpid())
        assert len(running) == spinner_count()
        assert wait_until(lambda: all(p.nice() == 19 for p in running))
    assert busy.procs == []
    assert spinners_of(os.getpid()) == []


def test_an_error_in_the_block_stops_them_too() -> None:
    with pytest.raises(RuntimeError), condition("busy"):
        assert spinners_of(os.getpid())
        raise RuntimeError("a workload failed")
    assert spinners_of(os.getpid()) == []


def test_a_killed_parent_takes_its_spinners_with_it() -> None:
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from benchlib.neighbour import BusyNeighbour;"
            "BusyNeighbour().__enter__(); print('ready', flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", code, str(REPO / "scripts")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline() == "ready\n"
        assert spinners_of(parent.pid)
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not spinners_of(parent.pid)), spinners_of(parent.pid)
    finally:
        parent.kill()
        parent.wait()


def test_conditions_and_their_order() -> None:
    assert conditions_for("both") == ("idle", "busy")
    assert conditions_for("busy") == ("busy",)
    with condition("idle"):
        pass
    with pytest.raises(ValueError), condition("loaded"):
        pass
