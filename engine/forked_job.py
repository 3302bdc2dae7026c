"""Running a table-building job (flush or compaction) in a forked child, outside the
foreground interpreter; engine/background.py's threads decide what runs.

``run_job(fn, *args, isolated=True)`` forks a child that calls ``fn(*args)``, sends
the picklable result back over a pipe and exits; the parent thread waits without
holding the GIL, so foreground reads and writes keep the interpreter. The child
inherits the parent's memory (an immutable memtable needs no copying) and touches
only objects the job owns. Invariant: the caller gets either the job's result or the
job's error re-raised (``Corruption`` keeps its file and offset).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import traceback
from collections.abc import Callable
from typing import Any

from .errors import BackgroundError, Corruption

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this child when the parent dies (Linux prctl).

    A child outliving a killed parent could still be writing a table whose number
    the next opener's recovery hands out again.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _child_main(fn: Callable[..., Any], args: tuple, wfd: int, niceness: int,
                parent: int) -> None:
    status = 0
    try:
        _die_with_parent(parent)
        try:
            if niceness:
                os.nice(niceness)
        except OSError:
            pass
        result: tuple = ("ok", fn(*args))
    except Corruption as exc:
        result = ("corruption", exc.path, exc.offset, exc.what)
        status = 1
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        result = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=5))
        status = 1
    try:
        data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(data)
        while view:
            n = os.write(wfd, view)
            view = view[n:]
    finally:
        os._exit(status)


def run_job(fn: Callable[..., Any], *args: Any, isolated: bool = True, niceness: int = 0) -> Any:
    """Return ``fn(*args)``, computed in a forked child when ``isolated``.

    ``niceness`` lowers the child's CPU priority, so work that can wait (compaction)
    yields to work writers wait for (flush) and to the foreground.
    """
    if not isolated:
        return fn(*args)
    rfd, wfd = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        # No memory or process slot for a child: do the work here rather than fail.
        os.close(rfd)
        os.close(wfd)
        return fn(*args)
    if pid == 0:
        os.close(rfd)
        _child_main(fn, args, wfd, niceness, parent)
    os.close(wfd)
    chunks = []
    try:
        while True:
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    if not chunks:
        raise BackgroundError(f"background job died (wait status {status})")
    result = pickle.loads(b"".join(chunks))
    if result[0] == "ok":
        return result[1]
    if result[0] == "corruption":
        raise Corruption(result[1], result[2], result[3])
    raise BackgroundError(f"background job failed: {result[1]}")
