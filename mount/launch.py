"""Starting and stopping a mount: the foreground checks, daemonizing, unmounting.

`tdefs mount` checks what it can in the foreground (mountpoint, /dev/fuse, the
master key source), then forks a daemon (double fork, new session) that opens the
vault, mounts, and reports "ready" or the one-line error over a pipe; the
foreground process prints that error and exits non-zero, or exits 0 only once the
kernel has completed the FUSE handshake, so the mount is live. The daemon logs to
the --log file (its stdout and stderr go there too), never to the terminal it
left. `tdefs umount` flushes, unmounts and waits for the daemon to close the vault;
it also cleans up after a daemon that died. What the daemon does while it serves is
in mount/daemon.py.
"""

from __future__ import annotations

import faulthandler
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from encfs.errors import TdefsError
from mount import control
from mount.mount_request import MountError, MountRequest
from mount.mount_table import FSTYPE, fusermount_unmount, mount_entry, sync_mount

log = logging.getLogger("tdefs.daemon")

READY = b"ready\n"
UNMOUNT_WAIT_S = 30.0


# ------------------------------------------------------------ foreground checks


def _check_fuse_device() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: this machine has no FUSE (see docs/mount.md)")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        raise MountError(f"cannot open /dev/fuse: {exc.strerror}") from None


def _check_mountpoint(mountpoint: Path, backing: Path) -> None:
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as exc:
        if mount_entry(mountpoint):
            raise MountError(f"mountpoint {mountpoint} is busy: a dead mount is still there "
                             f"(run: tdefs umount {mountpoint})") from None
        raise MountError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    entry = mount_entry(mountpoint)
    if entry is not None:
        raise MountError(f"mountpoint {mountpoint} is busy: {entry[0]} ({entry[1]}) "
                         "is already mounted there")
    del st
    real_mnt, real_backing = os.path.realpath(mountpoint), os.path.realpath(backing)
    for inner, outer in ((real_mnt, real_backing), (real_backing, real_mnt)):
        if inner == outer or inner.startswith(outer.rstrip("/") + "/"):
            raise MountError(f"the mountpoint {mountpoint} and the vault {backing} must not "
                             "contain each other")
    try:
        hidden = len(os.listdir(mountpoint))
    except OSError:
        hidden = 0  # cannot list it: the mount itself will say what is wrong
    if hidden:
        entries = "entry in it is" if hidden == 1 else "entries in it are"
        print(f"tdefs: warning: mountpoint {mountpoint} is not empty: the {hidden} {entries}"
              " hidden while the vault is mounted", file=sys.stderr)


def check(req: MountRequest) -> None:
    """Everything that can be checked before the vault is opened; MountError if not."""
    if not req.backing.is_dir():
        raise MountError(f"vault {req.backing} does not exist or is not a directory")
    _check_mountpoint(req.mountpoint, req.backing)
    _check_fuse_device()


# ------------------------------------------------------------------- logging


def setup_logging(log_file: Path | None, foreground: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    if log_file is not None:
        handler: logging.Handler = logging.FileHandler(log_file)
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        fmt = logging.Formatter("tdefs[%(process)d]: %(levelname)s %(name)s: %(message)s")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(fmt)
    root.handlers[:] = [handler]


# ------------------------------------------------------------------ daemonizing


def mount(req: MountRequest) -> int:
    """`tdefs mount`: returns 0 once the mount is live; MountError (one line) if not."""
    req.backing = req.backing.absolute()
    req.mountpoint = Path(os.path.realpath(req.mountpoint))
    if req.log_file is not None:
        req.log_file = req.log_file.absolute()
    check(req)
    from mount.daemon import serve  # the daemon's side: loads pyfuse3

    if req.foreground:
        setup_logging(req.log_file, foreground=True)
        serve(req)
        return 0
    return _daemonize(req)


def _daemonize(req: MountRequest) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _daemon_child(req, write_end)  # never returns
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    message = b"".join(chunks)
    if message == READY:
        return 0
    if message.startswith(b"error: "):
        raise MountError(message[7:].decode(errors="replace").strip())
    where = f"; see {req.log_file}" if req.log_file else ""
    raise MountError(f"the daemon exited before {req.mountpoint} was mounted{where}")


def _daemon_child(req: MountRequest, report_fd: int) -> None:
    code = 1
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        os.chdir("/")
        _detach_stdio(req.log_file)
        setup_logging(req.log_file, foreground=False)

        def report(message: bytes) -> None:
            nonlocal report_fd
            if report_fd < 0:
                return
            try:
                os.write(report_fd, message)
            except OSError:
                pass  # `tdefs mount` was killed while waiting: nobody to tell
            os.close(report_fd)
            report_fd = -1

        def ready() -> None:
            report(READY)

        from mount.daemon import serve

        try:
            serve(req, on_ready=ready)
            code = 0
        except TdefsError as exc:
            log.error("%s", exc)
            report(f"error: {exc}\n".encode())
        except BaseException as exc:
            log.exception("the daemon failed")
            report(f"error: unexpected {type(exc).__name__}: {exc}\n".encode())
    finally:
        logging.shutdown()
        os._exit(code)


def _detach_stdio(log_file: Path | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if log_file else null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    faulthandler.enable(sys.stderr)


# ------------------------------------------------------------------- unmounting


def _pid_alive(pid: int) -> bool:
    try:
        # a daemon reparented to an init that does not reap stays a zombie: it is gone
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def unmount(mountpoint: Path, lazy: bool = False) -> tuple[str, list[dict[str, Any]]]:
    """`tdefs umount`: flush, unmount, wait for the daemon to close the vault.

    Also removes a mount whose daemon died. Returns what was done, for the user, and
    the files whose cached writes the daemon could not write back (disk full, I/O
    error) since it mounted, as it recorded them once the flush was done."""
    mountpoint = Path(os.path.realpath(mountpoint))
    entry = mount_entry(mountpoint)
    if entry is None:
        raise MountError(f"{mountpoint} is not mounted")
    if entry[1] != FSTYPE:
        raise MountError(f"{mountpoint} is not a tdefs mount ({entry[1]})")
    gone = "removed the mount of a daemon that is gone"
    try:
        pid: int | None = int(control.request(mountpoint, "status", timeout=10)["pid"])
    except control.NoDaemon:
        pid = None
    except TdefsError:
        pid = None  # it does not answer: unmount anyway, without flushing through it
        gone = "removed the mount; its daemon did not answer and may still hold the vault"
    if pid is None:
        result = fusermount_unmount(mountpoint)
        if result.returncode != 0:
            result = fusermount_unmount(mountpoint, lazy=True)
        if result.returncode != 0:
            raise MountError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")
        control.ControlServer(str(mountpoint), {}).remove()
        return gone, []
    try:
        sync_mount(mountpoint)
    except OSError as exc:
        print(f"tdefs: warning: flushing {mountpoint}: {exc.strerror}", file=sys.stderr)
    try:
        failures = control.request(mountpoint, "write_failures", timeout=10)["failures"]
    except TdefsError:
        failures = []  # the daemon went away meanwhile; its log still has them
    result = fusermount_unmount(mountpoint, lazy=lazy)
    if result.returncode != 0:
        detail = result.stderr.strip().removeprefix("fusermount3: ")
        raise MountError(f"cannot unmount {mountpoint}: {detail}"
                         " (close the files open on it, or use --lazy)")
    deadline = time.monotonic() + UNMOUNT_WAIT_S
    while _pid_alive(pid) and not lazy:
        if time.monotonic() > deadline:
            raise MountError(f"{mountpoint} is unmounted but daemon {pid} has not exited")
        time.sleep(0.02)
    return "unmounted", failures
