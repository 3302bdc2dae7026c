"""Commands and processes: run a command to completion, find the daemons serving a
mount, wait until processes are gone, stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from benchlib.guard import BenchError

REPO = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    """The environment for a tdefs command: this one without failure injection."""
    return {k: v for k, v in os.environ.items() if k != "TDEFS_FAILPOINTS"}


def run_command(cmd: list[str], env: dict | None = None, timeout: float = 120) -> None:
    """Run `cmd` in the repository; BenchError with its last line of output if it fails."""
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        last = out.splitlines()[-1] if out else f"exit status {proc.returncode}"
        raise BenchError(f"{' '.join(map(str, cmd[:4]))} ...: {last}")


def gone(proc: psutil.Process) -> bool:
    """Whether `proc` has exited: a zombie holds no files, and pid 1 here may take a
    second or two to reap what was reparented to it."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(find: Callable[[], list[psutil.Process]], timeout: float = 10) -> bool:
    """Wait until `find` finds no process that has not exited; False at the deadline."""
    deadline = time.monotonic() + timeout
    while [proc for proc in find() if not gone(proc)]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def processes_serving(mountpoint: Path, program: str | None = None) -> list[psutil.Process]:
    """The daemons serving `mountpoint`, found by their command line (`program`, when
    given, must be in the name of the executable)."""
    target = str(mountpoint)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.pid == os.getpid() or target not in cmd:
            continue
        if os.path.basename(cmd[0]) in ("fusermount3", "fusermount", "umount", "mount"):
            continue
        if "umount" in cmd or (program is not None and program not in cmd[0]):
            continue
        found.append(proc)
    return found


def kill_processes(procs: list[psutil.Process]) -> None:
    """SIGKILL each of `procs` and wait for it; never raises."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
