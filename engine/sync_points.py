"""Test-only sync points: named places in the engine's background work where a test
can hold a thread, or make it wait until another thread has passed another point.

The engine calls ``sync_point("name", detail)`` at each point. With nothing armed
this is one lookup of an empty module-level dict. A test arms points through a
``SyncPoints`` (a context manager; leaving it disarms everything and releases every
held thread):

    with SyncPoints() as sp:
        sp.pause("compaction:picked")          # the next thread to reach it waits
        ...start the work...
        hit = sp.wait_paused("compaction:picked")   # blocks until a thread is held
        ...run other work to completion...
        sp.release("compaction:picked")

``sp.order("a", "b")`` makes every thread reaching ``b`` wait until some thread has
passed ``a``; ``sp.callback(name, fn)`` calls ``fn(detail)`` on the thread that
reaches ``name``. Points (the engine's code names them where they are):

    flush:built             a flush's table is written, not yet in the MANIFEST
                            (detail: its FileMeta)
    flush:before_install    just before the flush's edit is logged (holds _vlock)
    flush:finished          installed, and files nothing names deleted
    flush:retired           the flushed memtable was freed by shards (detail: True)
                            or left to whoever still reads it (False)
    compaction:picked       a compaction has claimed its inputs (detail: the Compaction)
    compaction:before_install  outputs are written, the edit not yet logged
                            (detail: the VersionEdit)
    compaction:installed    the edit is logged and published, inputs still busy
                            (detail: the Compaction)
    unlink_dropped:before   dropped tables no reader uses are about to be unlinked
                            (detail: their numbers)
    delete_obsolete:before  after a flush, files nothing names (old logs, MANIFESTs,
                            abandoned tables) are about to be deleted (detail: names)

Invariant: nothing here runs unless a test armed it; production code never arms.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

# name -> the SyncPoints that armed it. Empty except inside a test.
_armed: dict[str, SyncPoints] = {}


def sync_point(name: str, detail: Any = None) -> None:
    """Mark that this thread reached ``name``; may block while a test holds it."""
    if _armed:
        sp = _armed.get(name)
        if sp is not None:
            sp._reached(name, detail)


class SyncPoints:
    """The points one test armed; use as a context manager."""

    def __init__(self, timeout: float = 30.0) -> None:
        # A held thread gives up after ``timeout`` so a failing test cannot hang.
        self.timeout = timeout
        self._cond = threading.Condition()
        self._paused: dict[str, int] = {}     # name -> threads still to hold there
        self._pause_when: dict[str, Callable[[Any], bool]] = {}
        self._held: dict[str, list[Any]] = {}  # name -> details of threads held now
        self._passed: dict[str, int] = {}     # name -> times passed
        self._after: dict[str, list[str]] = {}  # name -> points that must be passed first
        self._callbacks: dict[str, Callable[[Any], None]] = {}
        self.timed_out: list[str] = []

    def __enter__(self) -> SyncPoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disarm()

    def _arm(self, name: str) -> None:
        owner = _armed.setdefault(name, self)
        if owner is not self:
            raise RuntimeError(f"sync point {name!r} is armed by another test")

    def pause(self, name: str, count: int = 1,
              when: Callable[[Any], bool] | None = None) -> None:
        """Hold the next ``count`` threads that reach ``name`` (only those whose
        detail satisfies ``when``, if given) until ``release``."""
        with self._cond:
            self._paused[name] = self._paused.get(name, 0) + count
            if when is not None:
                self._pause_when[name] = when
        self._arm(name)

    def order(self, first: str, then: str) -> None:
        """Threads reaching ``then`` wait until ``first`` has been passed."""
        with self._cond:
            self._after.setdefault(then, []).append(first)
        self._arm(first)
        self._arm(then)

    def callback(self, name: str, fn: Callable[[Any], None]) -> None:
        """Call ``fn(detail)`` on each thread reaching ``name``."""
        with self._cond:
            self._callbacks[name] = fn
        self._arm(name)

    def watch(self, name: str) -> None:
        """Count passes of ``name`` (``passed``) without holding anyone."""
        self._arm(name)

    def passed(self, name: str) -> int:
        with self._cond:
            return self._passed.get(name, 0)

    def wait_passed(self, name: str, times: int = 1) -> None:
        """Block until ``name`` (armed by this test) has been passed ``times`` times."""
        if _armed.get(name) is not self:
            raise RuntimeError(f"sync point {name!r} is not armed: watch() it first")
        with self._cond:
            if not self._cond.wait_for(lambda: self._passed.get(name, 0) >= times, self.timeout):
                raise TimeoutError(f"sync point {name!r} not passed {times} times")

    def wait_paused(self, name: str) -> Any:
        """Block until a thread is held at ``name``; return the detail it passed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._held.get(name), self.timeout):
                raise TimeoutError(f"no thread reached sync point {name!r}")
            return self._held[name][0]

    def release(self, name: str) -> None:
        """Let every thread held at ``name`` go on; hold no more there."""
        with self._cond:
            self._paused.pop(name, None)
            self._pause_when.pop(name, None)
            self._held.pop(name, None)
            self._cond.notify_all()

    def disarm(self) -> None:
        with self._cond:
            for name in [n for n, sp in _armed.items() if sp is self]:
                del _armed[name]
            self._paused.clear()
            self._pause_when.clear()
            self._after.clear()
            self._callbacks.clear()
            self._held.clear()
            self._cond.notify_all()

    def _reached(self, name: str, detail: Any) -> None:
        with self._cond:
            fn = self._callbacks.get(name)
            firsts = self._after.get(name, ())
            if firsts and not self._cond.wait_for(
                    lambda: all(self._passed.get(f, 0) for f in firsts) or name not in self._after,
                    self.timeout):
                self.timed_out.append(name)
            when = self._pause_when.get(name)
            if self._paused.get(name, 0) > 0 and (when is None or when(detail)):
                self._paused[name] -= 1
                held = self._held.setdefault(name, [])
                held.append(detail)
                self._cond.notify_all()
                # Held until release() or disarm() takes this detail off the list.
                if not self._cond.wait_for(
                        lambda: not any(d is detail for d in self._held.get(name, ())),
                        self.timeout):
                    self.timed_out.append(name)
                    held.remove(detail)
            self._passed[name] = self._passed.get(name, 0) + 1
            self._cond.notify_all()
        if fn is not None:
            fn(detail)
