"""Background re-encryption in the daemon.

One trio task asks the vault's Reencryptor (encfs/reencrypt.py) which files are not
under the active key, copies them one at a time in a worker thread at the set rate,
and puts each copy in place through the filesystem's ``swap_backing``, so open
handles, FUSE inode numbers and hard links are kept. A file written during its copy
is retried later. The task sleeps while there is nothing to do or while suspended,
and wakes on a key rotation, a resume or a rate change. ``stop`` ends a copy in
progress at once (at unmount), leaving a copy in ``.tdefs/tmp/`` that the next open
removes.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from encfs.reencrypt import Job, Reencryptor, Stopped, put_off
from mount.fs import VaultFS

log = logging.getLogger("tdefs.reencrypt")

RATE_WINDOW_S = 10.0  # the measured rate is over this long


class Reencryption:
    def __init__(self, fs: VaultFS, reencryptor: Reencryptor,
                 on_problem: Callable[[str], None] = lambda what: None) -> None:
        self.fs = fs
        self._on_problem = on_problem
        self.reenc = reencryptor
        self.left: list[Job] = []  # the plan: files not yet converted
        self.planned = False  # a plan was made since the last wake
        self.current: Job | None = None
        self.finished_at: float | None = None  # when the plan last ran out
        self._wake = trio.Event()
        self._stopping = False
        self._written: collections.deque[tuple[float, int]] = collections.deque()

    # -- commands ----------------------------------------------------------------------

    def wake(self) -> None:
        """Something changed (a rotation, a resume, a new rate): plan again. Until the
        new plan is made, status says "planning" (so `wait` does not stop early)."""
        self.planned = False
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self.reenc.pacer.stop()
        self._wake.set()

    async def suspend(self) -> None:
        await trio.to_thread.run_sync(self.reenc.set_running, False)
        log.info("re-encryption suspended")
        self.wake()

    async def resume(self) -> None:
        await trio.to_thread.run_sync(self.reenc.set_running, True)
        log.info("re-encryption resumed")
        self.wake()

    async def set_rate(self, rate_mb: float) -> None:
        await trio.to_thread.run_sync(self.reenc.set_rate, rate_mb)
        log.info("re-encryption rate set to %s", f"{rate_mb:g} MB/s" if rate_mb else "no limit")
        self.wake()

    def status(self) -> dict[str, Any]:
        state = self.reenc.state
        left: dict[str, dict[str, int]] = {}
        for job in self.left:
            bucket = left.setdefault(job.key, {"files": 0, "bytes": 0})
            bucket["files"] += 1
            bucket["bytes"] += job.size
        files_left = sum(b["files"] for b in left.values())
        bytes_left = sum(b["bytes"] for b in left.values())
        rate = self.measured_rate()
        if not state.running:
            phase = "suspended"
        elif not self.planned:
            phase = "planning"
        elif files_left:
            phase = "running"
        else:
            phase = "done"
        return {
            "state": phase,
            "rate_limit_mb": state.rate_mb,
            "rate_mb": rate / 1e6,
            "files_left": files_left,
            "bytes_left": bytes_left,
            "left_by_key": left,
            "done_files": state.done_files,
            "done_bytes": state.done_bytes,
            "current": self.current.names[0].decode(errors="replace") if self.current else None,
            "seconds_left": bytes_left / rate if rate > 0 and bytes_left else None,
            "last_rewrite": state.last_rewrite,
            "retired": state.retired,
            "finished_at": self.finished_at,
        }

    def measured_rate(self) -> float:
        """Bytes per second written by copies over the last RATE_WINDOW_S."""
        now = time.monotonic()
        while self._written and self._written[0][0] < now - RATE_WINDOW_S:
            self._written.popleft()
        if not self._written:
            return 0.0
        span = max(now - self._written[0][0], 1.0)
        return sum(n for _, n in self._written) / span

    # -- the task ----------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while not self._stopping:
            self._wake = trio.Event()
            # planned even while suspended, so status says what is left
            self.left = await trio.to_thread.run_sync(self.reenc.pending)
            self.planned = True
            if self.left:
                self.finished_at = None
                log.info("re-encryption: %d files (%d bytes) to rewrite under the active key",
                         len(self.left), sum(j.size for j in self.left))
            while (self.left and self.reenc.state.running and not self._stopping
                   and not self._wake.is_set()):
                job = self._next_ready()
                if job is None:
                    wait = min(j.not_before for j in self.left) - time.monotonic()
                    with trio.move_on_after(max(wait, 0.01)):
                        await self._wake.wait()
                    continue
                await self._convert(job)
            if not self.left and self.finished_at is None:
                self.finished_at = time.time()
                if self.reenc.state.done_files:
                    log.info("re-encryption: every file is under the active key")
            await self._wake.wait()  # a rotation, a resume, a new rate, or the end

    def _next_ready(self) -> Job | None:
        now = time.monotonic()
        for i, job in enumerate(self.left):
            if job.not_before <= now:
                return self.left.pop(i)
        return None

    async def _convert(self, job: Job) -> None:
        fs, reenc = self.fs, self.reenc
        conversion = fs.watch(job.ino)
        self.current = job
        try:
            try:
                done = await trio.to_thread.run_sync(
                    reenc.copy, job, lambda: conversion.dirty or self._stopping)
            except (Stopped, FileNotFoundError, NotADirectoryError) as exc:
                if conversion.dirty and not self._stopping:
                    put_off(job)
                    self.left.append(job)  # written during its copy: later
                log.debug("re-encryption of %r put off: %s", job.names[0], exc)
                return
            self._written.append((time.monotonic(), done.written))
            cipher = None if done.info is None else self.fs.vault.cipher_of(done.info)
            swapped, retired = await fs.swap_backing(
                conversion, job.ino, done.new_ino, job.names[0], cipher,
                lambda: reenc.still_current(job), lambda: reenc.switch(done))
            if not swapped:
                await trio.to_thread.run_sync(reenc.discard, done)
                if conversion.dirty:
                    self.left.append(job)  # written meanwhile: try again later
                return
            for key_id in retired:
                log.info("re-encryption: data key %d is used by no file any more: retired",
                         key_id)
        except Exception:
            log.exception("re-encrypting %r failed; it will be tried again", job.names[0])
            self._on_problem(f"re-encrypting {job.names[0].decode(errors='replace')} failed"
                             " (tried again in a minute; see the log)")
            job.not_before = time.monotonic() + 60.0
            self.left.append(job)
        finally:
            fs.unwatch(job.ino)
            self.current = None
