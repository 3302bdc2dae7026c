"""The memory of running processes, sampled in a background thread.

RSS counts every page a process maps, shared or not; PSS splits each shared page
among the processes mapping it, so a forked helper that shares most of its parent's
pages copy-on-write is not counted twice. PSS costs a read of /proc/PID/smaps, so it
suits a slow sampling rate; RSS is cheap.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import psutil


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (empty once it is gone)."""
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def memory_of(proc: psutil.Process, pss: bool) -> int:
    """Bytes of `proc`: its PSS (RSS where smaps may not be read) or its RSS."""
    if pss:
        try:
            return proc.memory_full_info().pss
        except (psutil.AccessDenied, AttributeError):
            pass
    return proc.memory_info().rss


class MemorySampler:
    """The peak of the summed memory of the processes `find` returns, sampled every
    `interval` seconds while the sampler is entered.

    `find` runs again when every process it found is gone and, in any case, at least
    every `find_every` seconds (finding processes by command line is costly; a tree
    below a known pid is not)."""

    def __init__(self, find: Callable[[], list[psutil.Process]] | None, interval: float,
                 pss: bool = False, find_every: float = 0.0) -> None:
        self.find = find
        self.interval = interval
        self.pss = pss
        self.find_every = find_every
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        if self.find is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def take_peak(self) -> int | None:
        """The peak since the last call (None when nothing was sampled), and start anew."""
        peak, samples = self.peak, self.samples
        self.peak = self.samples = 0
        return peak if samples else None

    def _run(self) -> None:
        procs: list[psutil.Process] = []
        last_find = 0.0
        while True:
            now = time.monotonic()
            if not procs or now - last_find >= self.find_every:
                with contextlib.suppress(psutil.Error, OSError):
                    procs = self.find()  # type: ignore[misc]
                last_find = now
            total, alive = 0, []
            for proc in procs:
                try:
                    total += memory_of(proc, self.pss)
                    alive.append(proc)
                except psutil.Error:
                    pass
            procs = alive
            if alive:
                self.samples += 1
                self.peak = max(self.peak, total)
            if self._stop.wait(self.interval):
                return
