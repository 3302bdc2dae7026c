"""The life of a mount: checks, daemonizing, serving, and unmounting.

`tdefs mount` checks what it can in the foreground (mountpoint, /dev/fuse, the
master key source), then forks a daemon (double fork, new session) that opens the
vault, mounts, and reports "ready" or the one-line error over a pipe; the
foreground process prints that error and exits non-zero, or exits 0 only once the
kernel has completed the FUSE handshake, so the mount is live. The daemon logs to
the --log file (its stdout and stderr go there too), never to the terminal it
left. SIGTERM and SIGINT flush the kernel's dirty pages, unmount, and close the
vault; so does `tdefs umount`, which also cleans up after a daemon that died.
"""

from __future__ import annotations

import faulthandler
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pyfuse3
import trio

from encfs.cipher import METHODS
from encfs.errors import TdefsError
from encfs.fsops import syncfs
from encfs.masterkey import MasterKeySource
from encfs.reencrypt import Reencryptor
from encfs.vault import Vault
from mount import control
from mount.fs import VaultFS
from mount.reencryption import Reencryption

log = logging.getLogger("tdefs.daemon")

# FUSE FALLOCATE reaches the daemon only through our patch to pyfuse3 (patches/);
# without it the kernel answers fallocate(2) with EOPNOTSUPP itself
FALLOCATE = "fallocate" in getattr(pyfuse3, "TDEFS_PATCHES", ())

FSTYPE = "fuse.tdefs"
READY = b"ready\n"
UNMOUNT_WAIT_S = 30.0
READAHEAD_KIB = 512
# the rotation task sleeps until the next rotation is due, but never longer than this
# at once, so a change of the wall clock is noticed
ROTATION_SLEEP_MAX_S = 3600.0
ROTATION_RETRY_S = 60.0


class MountError(TdefsError):
    """The mount cannot be made, found or removed."""


@dataclass
class MountRequest:
    backing: Path
    mountpoint: Path
    source: MasterKeySource
    foreground: bool = False
    allow_other: bool = False
    log_file: Path | None = None
    writeback_cache: bool = True
    xattrs: bool = False
    # None: the vault's own option (vault.json rotation_period_days); 0: never
    rotation_period_days: float | None = None


# ------------------------------------------------------------------ mount table


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entry(mountpoint: str | os.PathLike) -> tuple[str, str] | None:
    """(source, fstype) of what is mounted exactly at `mountpoint`, or None."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and _unescape(fields[1]) == target:
                found = (_unescape(fields[0]), fields[2])  # the last one is on top
    return found


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


# --------------------------------------------------------------------- serving


def _options(req: MountRequest) -> set[str]:
    fsname = str(req.backing).replace("\\", "\\\\").replace(",", "\\,")
    options = {f"fsname={fsname}", "subtype=tdefs"}
    if req.allow_other:
        # other users reach the files through a daemon with the mounting user's
        # rights: the kernel must check each caller against the modes
        options |= {"allow_other", "default_permissions"}
    # Otherwise only the mounting user can reach the mount at all (the kernel refuses
    # everyone else), and the daemon acts with that very user's rights, so the
    # backing filesystem's own checks are the right ones. The kernel then need not
    # fetch a directory's attributes again after every change in it to check modes.
    return options


def _setup_logging(log_file: Path | None, foreground: bool) -> None:
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


def sync_mount(mountpoint: str | os.PathLike) -> None:
    """Push the kernel's dirty pages of the mount down to the daemon (syncfs(2))."""
    syncfs(mountpoint)


def fusermount_unmount(mountpoint: str | os.PathLike, lazy: bool = False) -> subprocess.CompletedProcess:
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    return subprocess.run(cmd, capture_output=True, text=True)


class _Daemon:
    """One mounted vault being served."""

    def __init__(self, req: MountRequest, vault: Vault, reencryptor: Reencryptor,
                 on_ready: Any) -> None:
        self.req = req
        self.vault = vault
        self.source = req.source  # the master key sealing keys.dict now
        self.started = time.time()
        self.last_rotation: dict[str, Any] | None = None  # the last automatic one
        self._on_ready = on_ready
        self._initialized = trio.Event()
        self.fs = VaultFS(vault, on_ready=self._initialized.set,
                          writeback_cache=req.writeback_cache, xattrs=req.xattrs)
        self.reencryption = Reencryption(self.fs, reencryptor)
        self.control = control.ControlServer(str(req.mountpoint), {
            "status": self._status,
            "keys.list": self._keys_list,
            "keys.rotate": self._keys_rotate,
            "master_key.rotate": self._master_key_rotate,
            "write_failures": self._write_failures,
            "reencrypt.status": self._reencrypt_status,
            "reencrypt.suspend": self._reencrypt_suspend,
            "reencrypt.resume": self._reencrypt_resume,
            "reencrypt.rate": self._reencrypt_rate,
        })

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.control.serve)
            nursery.start_soon(self._watch_signals)
            nursery.start_soon(self._after_init)
            nursery.start_soon(self._rotate_when_due)
            nursery.start_soon(self.reencryption.run)
            await pyfuse3.main()
            log.info("unmounted %s", self.req.mountpoint)
            self.reencryption.stop()  # a copy in progress ends now; the next open cleans up
            nursery.cancel_scope.cancel()

    async def _after_init(self) -> None:
        """Once the kernel has our answer to its INIT, tune the mount and say "ready"."""
        await self._initialized.wait()
        await trio.sleep(0)  # the INIT reply went out in the same step as init()
        _tune_bdi(self.req.mountpoint)  # after INIT, which resets the readahead
        if self._on_ready is not None:
            self._on_ready()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: unmounting", signal.Signals(signum).name)
                try:
                    await trio.to_thread.run_sync(self._unmount_self)
                except Exception:
                    log.exception("unmounting on %s failed", signal.Signals(signum).name)

    def _unmount_self(self) -> None:
        mnt = self.req.mountpoint
        try:
            sync_mount(mnt)
        except OSError as exc:
            log.warning("flushing %s before unmount: %s", mnt, exc)
        result = fusermount_unmount(mnt)
        if result.returncode != 0:
            log.warning("unmount %s: %s; detaching it lazily", mnt, result.stderr.strip())
            result = fusermount_unmount(mnt, lazy=True)
        if result.returncode != 0:
            # not mounted any more (or never was): stop the loop ourselves
            log.warning("unmount %s: %s", mnt, result.stderr.strip())
            trio.from_thread.run_sync(pyfuse3.terminate)

    # -- automatic key rotation ----------------------------------------------------

    @property
    def rotation_period_s(self) -> float:
        return float(self.vault.options.get("rotation_period_days", 0) or 0) * 86400

    def _next_rotation(self) -> float | None:
        """When the active data key becomes due for rotation (unix time), or None: off."""
        period = self.rotation_period_s
        active, last = self.vault.keys.active, self.last_rotation
        if period <= 0 or active is None:
            return None  # off, or no key to rotate (new files are plaintext)
        due = active.created + period
        if last is not None and last["new_key"] == active.id:
            # keys record whole seconds: a period shorter than one must not make the
            # key that was just made look due at once
            due = max(due, last["time"] + period)
        return due

    async def _rotate_when_due(self) -> None:
        """Rotate the data key whenever the active one is older than the rotation period:
        checked at mount, then asleep until the next due time."""
        while (due := self._next_rotation()) is not None:
            wait = due - time.time()
            if wait > 0:
                # a rotation through `tdefs keys rotate` meanwhile moves the due time
                # later: on waking it is computed again
                await trio.sleep(min(wait, ROTATION_SLEEP_MAX_S))
                continue
            try:
                await trio.to_thread.run_sync(self._rotate_if_due)
            except Exception:
                log.exception("rotating the data key failed; trying again in %.0f s",
                              ROTATION_RETRY_S)
                await trio.sleep(ROTATION_RETRY_S)

    def _rotate_if_due(self) -> None:
        old, now = self.vault.keys.active, time.time()
        key_id = self.vault.rotate_if_due(now)
        if key_id is None:
            return
        new = self.vault.keys.get(key_id)
        age = (now - old.created) / 86400
        self.last_rotation = {"time": now, "new_key": key_id, "method": new.method,
                              "old_key": old.id, "old_age_days": age}
        log.info("rotated the data key: new active key %d (%s), key %d was %.3g days old",
                 key_id, new.method, old.id, age)
        trio.from_thread.run_sync(self.reencryption.wake)

    # -- control commands ------------------------------------------------------------

    async def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        # the files and bytes per key cost a stat of every file: only when asked (not
        # by `tdefs umount`, which must hear back quickly)
        keys = (await trio.to_thread.run_sync(self.vault.key_usage)
                if request.get("keys") else None)
        active = self.vault.keys.active
        return {
            **control.process_status(self.started),
            "backing": str(self.vault.root),
            "mountpoint": str(self.req.mountpoint),
            "method": self.vault.method,
            "open_files": self.fs.open_files(),
            "inodes": len(self.fs.inodes),
            "writeback_cache": self.req.writeback_cache,
            "xattrs": self.req.xattrs,
            "entry_copies": self.vault.copies.enabled,
            "fallocate": FALLOCATE,
            "write_failures": len(self.fs.write_failures),
            "active_key": (None if active is None else
                           {"id": active.id, "method": active.method, "created": active.created}),
            **({"keys": keys} if keys is not None else {}),
            "rotation": {"period_days": self.rotation_period_s / 86400,
                         "next_due": self._next_rotation(),
                         "last_automatic": self.last_rotation},
            "reencrypt": self.reencryption.status(),
        }

    async def _write_failures(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"failures": sorted(self.fs.write_failures.values(), key=lambda f: f["first"])}

    async def _keys_list(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"keys": await trio.to_thread.run_sync(self.vault.key_usage)}

    async def _keys_rotate(self, request: dict[str, Any]) -> dict[str, Any]:
        method = request.get("method")
        if method is not None and (method not in METHODS or method == "plaintext"):
            raise TdefsError(f"a data key cannot use the method {method!r}")
        key_id = await trio.to_thread.run_sync(self.vault.keys.rotate, method)
        log.info("rotated the data key on request: new active key %d (%s)", key_id,
                 self.vault.keys.get(key_id).method)
        self.reencryption.wake()
        return {"key_id": key_id, "method": self.vault.keys.get(key_id).method}

    async def _reencrypt_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.reencryption.status()

    async def _reencrypt_suspend(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.reencryption.suspend()
        return self.reencryption.status()

    async def _reencrypt_resume(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.reencryption.resume()
        return self.reencryption.status()

    async def _reencrypt_rate(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            rate = float(request["rate_mb"])
            if rate < 0 or rate != rate:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise TdefsError("the rate is a number of MB/s, 0 for no limit") from None
        await self.reencryption.set_rate(rate)
        return self.reencryption.status()

    async def _master_key_rotate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Re-seal keys.dict under the master key the request carries (a key file's path
        and content, or a passphrase); the old master key then opens nothing."""
        old_opens = await trio.to_thread.run_sync(self._reseal, request)
        return {"backing": str(self.vault.root), "old_opens": old_opens}

    def _reseal(self, request: dict[str, Any]) -> bool:
        # the key file is read again right here, so one that changed since the client
        # read it is refused rather than half-trusted
        source = MasterKeySource.from_message(request)
        self.vault.keys.reseal(source)
        old, self.source = self.source, source
        try:
            old_opens = self.vault.keys.opens_with(old)
        except TdefsError:
            old_opens = False  # e.g. the old key file is gone: it opens nothing either
        log.info("re-sealed keys.dict under a new master key (%s)", source.describe())
        return old_opens


def serve(req: MountRequest, on_ready: Any = None) -> None:
    """Open the vault, mount it and serve until unmounted. Raises TdefsError on failure."""
    os.umask(0)  # modes arrive from the kernel with the caller's umask applied
    vault = Vault.open(req.backing, req.source)
    try:
        if req.rotation_period_days is not None:
            vault.options["rotation_period_days"] = req.rotation_period_days
        reencryptor = Reencryptor(vault)
        reencryptor.recover()  # what a crash left half done, before anything is served
        daemon = _Daemon(req, vault, reencryptor, on_ready)
        try:
            pyfuse3.init(daemon.fs, str(req.mountpoint), _options(req))
        except RuntimeError as exc:
            raise MountError(f"cannot mount {req.mountpoint}: {exc}") from None
        log.info("mounted %s on %s (pid %d)", req.backing, req.mountpoint, os.getpid())
        if not FALLOCATE:
            log.warning("this pyfuse3 lacks the fallocate patch (run scripts/setup):"
                        " fallocate(2) on the mount fails with EOPNOTSUPP")
        if not vault.copies.enabled:
            log.warning("%s keeps no user extended attributes: files carry no copy of"
                        " their entry", req.backing)
        try:
            trio.run(daemon.run)
        finally:
            entry = mount_entry(req.mountpoint)
            pyfuse3.close(unmount=entry is not None and entry[1] == FSTYPE)
    finally:
        vault.close()
        log.info("vault %s closed", req.backing)


def _tune_bdi(mountpoint: Path) -> None:
    """Raise the mount's readahead to READAHEAD_KIB (best effort: needs root).

    Measured here, interleaved against an untuned mount of the same code: 512 KiB
    instead of the kernel's 128 KiB halves the daemon's CPU per MiB of cold
    sequential reads (fewer requests and thread hops) and reads about 1.5x as fast;
    1 MiB requests cost more again (large buffers). Letting the mount hold more
    dirty pages than FUSE's 1% (max_ratio 10) looked 1.2x faster for 64 MiB writes
    but was 0.8x for 512 MiB, with more CPU per MiB, so that stays at the default."""
    # never stat the mountpoint (realpath does) here: the loop that would answer is
    # not running yet; `mountpoint` is already a real path
    target = str(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            devices = [line.split()[2] for line in f if _unescape(line.split()[4]) == target]
        if not devices:
            return
        bdi = Path("/sys/class/bdi") / devices[-1]
        (bdi / "read_ahead_kb").write_text(str(READAHEAD_KIB))
    except OSError as exc:
        log.info("readahead left at the kernel's default: %s", exc)


# ------------------------------------------------------------------ daemonizing


def mount(req: MountRequest) -> int:
    """`tdefs mount`: returns 0 once the mount is live; MountError (one line) if not."""
    req.backing = req.backing.absolute()
    req.mountpoint = Path(os.path.realpath(req.mountpoint))
    if req.log_file is not None:
        req.log_file = req.log_file.absolute()
    check(req)
    if req.foreground:
        _setup_logging(req.log_file, foreground=True)
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
        _setup_logging(req.log_file, foreground=False)

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
