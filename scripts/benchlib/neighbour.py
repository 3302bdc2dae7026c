"""Idle or beside a busy neighbour: the two conditions a benchmark runs every target in.

On this virtual machine a FUSE round trip costs ~50-60 µs more when the daemon's CPU
has halted between requests (waking a halted vCPU is slow, and the guest's
halt-polling is off), whatever the daemon is written in; gocryptfs's Go runtime spins
briefly before it parks, so it pays less of that. A loaded server, or a VM with
halt-polling on, keeps its CPUs out of halt. `BusyNeighbour` does so on purpose: one
spinning process at nice 19 per other CPU, so it takes no CPU time a benchmark
wants, only keeps the CPUs awake. docs/benchmarks.md shows the difference.

Every spinner is stopped on the way out of the `with` block; one whose parent dies
without that (SIGKILL) is killed by the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

import psutil

CONDITIONS = ("idle", "busy")
SPINNER_NICE = 19

# The spinner asks for SIGKILL when the thread that started it exits (prctl
# PR_SET_PDEATHSIG = 1), then checks its parent did not exit before that took hold.
_SPINNER = f"""
import ctypes, os, sys
ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit()
os.nice({SPINNER_NICE})
while True:
    pass
"""
SPINNER_TAG = "tdefs-bench-busy-neighbour"


def conditions_for(option: str) -> tuple[str, ...]:
    """The conditions a `--condition idle|busy|both` option asks for, in run order."""
    return CONDITIONS if option == "both" else (option,)


def spinner_count() -> int:
    """One spinner per CPU this process may run on, but for one: the benchmark's."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def spinners() -> list[psutil.Process]:
    """Every busy-neighbour spinner of this machine, this run's or a lost one's."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if SPINNER_TAG in (proc.info["cmdline"] or []):
                found.append(proc)
    return found


class BusyNeighbour:
    """`spinner_count()` niced processes that spin while the block runs."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> BusyNeighbour:
        try:
            for _ in range(spinner_count()):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", _SPINNER, str(os.getpid()), SPINNER_TAG],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Kill every spinner and reap it; never raises, may run more than once."""
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.procs.clear()


@contextlib.contextmanager
def condition(name: str) -> Iterator[None]:
    """Run the block in condition `name`: "idle" as it is, "busy" beside a BusyNeighbour."""
    if name == "busy":
        with BusyNeighbour():
            yield
    elif name == "idle":
        yield
    else:
        raise ValueError(f"unknown condition {name!r}")
