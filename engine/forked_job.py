"""Running a table-building job (flush or compaction) in a child process, outside
the foreground interpreter; engine/background.py's threads decide what runs.

``run_job(fn, *args, isolated=True)`` forks a child that calls ``fn(*args)``, sends
the picklable result back over a pipe and exits; the parent thread waits without
holding the GIL, so foreground reads and writes keep the interpreter. The child
inherits the parent's memory (an immutable memtable needs no copying) and touches
only objects the job owns.

With ``fresh=True`` the child is a new interpreter instead (``python -m
engine.fresh_child``), started without copying the parent, which sends it ``fn``
and ``args`` pickled: for a long job whose arguments are plain data (a large
compaction). A fork shares every page of the parent until one side writes it, so
while a forked child runs for seconds, each page the parent writes (freeing a
flushed memtable touches nearly all of its pages) costs a copy, and the fork itself
copies the page tables of a large process. When no fresh interpreter gets as far
as the job (no usable ``sys.executable``, as in a program embedding Python), the
job is forked after all.

Invariant: the caller gets either the job's result or the job's error re-raised
(``Corruption`` keeps its file and offset); a child dies with its parent.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import subprocess
import sys
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


def child_main(fn: Callable[..., Any], args: tuple, wfd: int, niceness: int,
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


def run_job(fn: Callable[..., Any], *args: Any, isolated: bool = True, niceness: int = 0,
            fresh: bool = False) -> Any:
    """Return ``fn(*args)``, computed in a forked child when ``isolated`` (in a fresh
    interpreter when ``fresh`` too).

    ``niceness`` lowers the child's CPU priority, so work that can wait (compaction)
    yields to work writers wait for (flush) and to the foreground.
    """
    if not isolated:
        return fn(*args)
    if fresh:
        outcome = _run_fresh(fn, args, niceness)
        if outcome is not _NOT_STARTED:
            return outcome
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
        child_main(fn, args, wfd, niceness, parent)
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
    return _outcome(b"".join(chunks), f"wait status {status}")


# What _run_fresh returns when no fresh interpreter ran the job.
_NOT_STARTED = object()
# The first byte a fresh child sends once it holds the job and is about to run it.
STARTED = b"J"


def _run_fresh(fn: Callable[..., Any], args: tuple, niceness: int) -> Any:
    """The job's outcome from a fresh interpreter, or _NOT_STARTED when none could
    run it (no executable for one, as in an embedding program: the caller forks)."""
    # The child finds the engine, and ``fn``'s module, where this process did; -P
    # keeps the working directory, which may hold another "engine", off its path.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    job = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
    if not sys.executable:
        return _NOT_STARTED
    try:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "engine.fresh_child", str(os.getpid()), str(niceness)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    except OSError:
        return _NOT_STARTED
    out, _ = proc.communicate(job)
    if not out.startswith(STARTED):  # it never got as far as the job
        return _NOT_STARTED
    return _outcome(out[len(STARTED):], f"exit status {proc.returncode}")


def _outcome(data: bytes, how_it_ended: str) -> Any:
    """The result a child sent, or its error raised here."""
    if not data:
        raise BackgroundError(f"background job died ({how_it_ended})")
    result = pickle.loads(data)
    if result[0] == "ok":
        return result[1]
    if result[0] == "corruption":
        raise Corruption(result[1], result[2], result[3])
    raise BackgroundError(f"background job failed: {result[1]}")

