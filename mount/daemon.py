"""Serving a mount: the daemon's life once it has detached (mount/launch.py starts it).

It opens the vault (recovery runs, and re-encryption finishes what a crash left),
mounts, answers the kernel's requests (mount/fs.py) and the control socket's
commands, rotates the data key when due, re-encrypts in the background
(mount/reencryption.py), and on SIGTERM or SIGINT flushes the kernel's dirty pages,
unmounts and closes the vault.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import logging.handlers
import os
import signal
import time
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from encfs.cipher import METHODS
from encfs.errors import TdefsError
from encfs.masterkey import MasterKeySource
from encfs.reencrypt import Reencryptor
from encfs.vault import Vault
from mount import control, sd_notify
from mount.fs import VaultFS
from mount.metrics import FILE_EVERY_S as METRICS_FILE_EVERY_S
from mount.metrics import Metrics
from mount.mount_request import MountError, MountRequest
from mount.mount_table import device_of, fusermount_unmount, is_tdefs_mount, sync_mount
from mount.reencryption import Reencryption

log = logging.getLogger("tdefs.daemon")

# FUSE FALLOCATE reaches the daemon only through our patch to pyfuse3 (patches/);
# without it the kernel answers fallocate(2) with EOPNOTSUPP itself
FALLOCATE = "fallocate" in getattr(pyfuse3, "TDEFS_PATCHES", ())
# looking for the next request before sleeping, the same way (patches/README.md)
POLLING = "polling" in getattr(pyfuse3, "TDEFS_PATCHES", ())
# telling the kernel the granularity of file times (--coarse-times), the same way
TIME_GRAN = "time-gran" in getattr(pyfuse3, "TDEFS_PATCHES", ())

READAHEAD_KIB = 512
PROBLEMS_KEPT = 20
# the rotation task sleeps until the next rotation is due, but never longer than this
# at once, so a change of the wall clock is noticed
ROTATION_SLEEP_MAX_S = 3600.0
ROTATION_RETRY_S = 60.0


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
                          writeback_cache=req.writeback_cache, xattrs=req.xattrs,
                          coarse_times=req.coarse_times and TIME_GRAN)
        # what went wrong lately, for status (the log has everything)
        self.problems: collections.deque[dict[str, Any]] = collections.deque(maxlen=PROBLEMS_KEPT)
        self.reencryption = Reencryption(self.fs, reencryptor, on_problem=self.problem)
        self.metrics = Metrics(self)
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
            "metrics": self._metrics,
        })

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.control.serve)
            nursery.start_soon(self._watch_signals)
            nursery.start_soon(self._after_init)
            nursery.start_soon(self._rotate_when_due)
            nursery.start_soon(self.reencryption.run)
            if self.req.metrics_file is not None:
                nursery.start_soon(self._write_metrics_file)
            if POLLING:
                pyfuse3.set_polling(self.req.poll_us)
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
        sd_notify.notify("READY=1", f"MAINPID={os.getpid()}",
                         f"STATUS=serving {self.vault.root} on {self.req.mountpoint}")

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: unmounting", signal.Signals(signum).name)
                sd_notify.notify("STOPPING=1", f"STATUS=unmounting {self.req.mountpoint}")
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
                self.problem(f"rotating the data key failed (trying again in"
                             f" {ROTATION_RETRY_S:.0f} s; see the log)")
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
            "polling": self.polling(),
            "coarse_times": bool(self.fs.time_gran_ns),
            "write_failures": len(self.fs.write_failures),
            "active_key": (None if active is None else
                           {"id": active.id, "method": active.method, "created": active.created}),
            **({"keys": keys} if keys is not None else {}),
            "rotation": {"period_days": self.rotation_period_s / 86400,
                         "next_due": self._next_rotation(),
                         "last_automatic": self.last_rotation},
            "reencrypt": self.reencryption.status(),
            "problems": list(self.problems),
        }

    def polling(self) -> dict[str, Any]:
        """What looking for the next request before sleeping did so far."""
        if not POLLING:
            return {"available": False, "budget_us": 0}
        hits, misses, contended, budget_ns = pyfuse3.polling_stats()
        return {"available": True, "budget_us": self.req.poll_us, "hits": hits,
                "misses": misses, "contended": contended, "current_us": budget_ns // 1000}

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

    def problem(self, what: str) -> None:
        """Something failed that an operator should hear of in status, not only in the
        log (which the caller writes to, with the details)."""
        self.problems.append({"time": time.time(), "what": what})

    async def _metrics(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"text": self.metrics.text()}

    async def _write_metrics_file(self) -> None:
        path = self.req.metrics_file
        assert path is not None
        try:
            while True:
                try:
                    self.metrics.write_file(path)
                except OSError as exc:
                    log.warning("cannot write the metrics to %s: %s", path, exc.strerror)
                    self.problem(f"cannot write the metrics to {path}: {exc.strerror}")
                await trio.sleep(METRICS_FILE_EVERY_S)
        finally:
            with contextlib.suppress(OSError):
                self.metrics.write_file(path)  # the last figures, at unmount

    async def _master_key_rotate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Re-seal keys.dict under the master key the request carries (a key file's path
        and content, a passphrase, or a key command's output); the old master key then
        opens nothing."""
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
        if req.metrics_listen is not None:
            try:
                daemon.metrics.listen(req.metrics_listen)
            except (OSError, ValueError) as exc:
                raise MountError(f"cannot serve metrics at {req.metrics_listen}:"
                                 f" {getattr(exc, 'strerror', None) or exc}") from None
        try:
            pyfuse3.init(daemon.fs, str(req.mountpoint), _options(req))
        except RuntimeError as exc:
            raise MountError(f"cannot mount {req.mountpoint}: {exc}") from None
        log.info("mounted %s on %s (pid %d)", req.backing, req.mountpoint, os.getpid())
        if not FALLOCATE:
            log.warning("this pyfuse3 lacks the fallocate patch (run scripts/setup):"
                        " fallocate(2) on the mount fails with EOPNOTSUPP")
            daemon.problem("fallocate(2) fails with EOPNOTSUPP: this pyfuse3 lacks the"
                           " patch (run scripts/setup)")
        if req.coarse_times and not TIME_GRAN:
            log.warning("this pyfuse3 lacks the time-gran patch (run scripts/setup):"
                        " --coarse-times has no effect")
            daemon.problem("--coarse-times has no effect: this pyfuse3 lacks the patch"
                           " (run scripts/setup)")
        if req.poll_us and not POLLING:
            log.info("this pyfuse3 lacks the polling patch (run scripts/setup): the"
                     " daemon sleeps between requests")
        if not vault.copies.enabled:
            log.warning("%s keeps no user extended attributes: files carry no copy of"
                        " their entry", req.backing)
        try:
            trio.run(daemon.run)
        finally:
            pyfuse3.close(unmount=is_tdefs_mount(req.mountpoint))
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
    try:
        device = device_of(str(mountpoint))
        if device is None:
            return
        (Path("/sys/class/bdi") / device / "read_ahead_kb").write_text(str(READAHEAD_KIB))
    except OSError as exc:
        log.info("readahead left at the kernel's default: %s", exc)


