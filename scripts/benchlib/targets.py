"""The directories a benchmark runs in: a raw directory, a tdefs mount and a
gocryptfs mount, each under one work directory on the same disk.

A target is started before the first workload and stopped on every way out
(`started_targets`); `stop` never raises and leaves nothing mounted and no daemon
running, even after a daemon died or a mount went stale. `make_cold` makes the next
read of the target's files go to the disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from benchlib.guard import BenchError
from benchlib.processes import (
    clean_env,
    kill_processes,
    processes_serving,
    run_command,
    wait_gone,
)
from mount.mount_table import filesystem_type, is_mounted

TDEFS = [sys.executable, "-m", "mount.cli"]


def drop_page_cache() -> bool:
    """Write back and drop the kernel's page, dentry and inode caches (needs root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def default_base_dir() -> Path:
    """Where to make the work directory: on a disk, never in memory."""
    # tmpfs would measure RAM, not a disk, for the raw target and the backing files
    for candidate in (Path(tempfile.gettempdir()), Path("/var/tmp")):
        if candidate.is_dir() and filesystem_type(candidate) not in ("tmpfs", "ramfs"):
            return candidate
    raise BenchError("both /tmp and /var/tmp are in memory; give --dir on a disk")


class Target:
    """A directory to benchmark in, and how to make its caches cold."""

    name = "?"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.workdir = root

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def make_cold(self) -> None:
        """Forget every cached page of this target, so the next read goes to the disk."""
        drop_page_cache()

    def stop(self) -> None:
        """Unmount and stop daemons; never raises, may run more than once."""

    def daemons(self) -> list[psutil.Process]:
        return []


class RawTarget(Target):
    """A plain directory on the same filesystem as the encrypted targets' backing dirs."""

    name = "raw"


class FuseTarget(Target):
    """A FUSE mount over a backing directory, remounted to make its caches cold."""

    program: str | None = None
    # mounted so that users other than the mounting one may enter (allow_other)
    shared = False

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.backing = root / "backing"
        self.mountpoint = root / "mnt"
        self.workdir = self.mountpoint

    def start(self) -> None:
        self.backing.mkdir(parents=True)
        self.mountpoint.mkdir()
        self.init()
        self.mount()

    def init(self) -> None:
        raise NotImplementedError

    def mount(self) -> None:
        raise NotImplementedError

    def unmount(self) -> None:
        raise NotImplementedError

    def make_cold(self) -> None:
        # the kernel keeps a FUSE file's pages across opens; remounting is the sure way
        self.unmount()
        drop_page_cache()
        self.mount()

    def daemons(self) -> list[psutil.Process]:
        return processes_serving(self.mountpoint, self.program)

    def stop(self) -> None:
        if is_mounted(self.mountpoint):
            with contextlib.suppress(BenchError, subprocess.TimeoutExpired, OSError):
                self.unmount()
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        kill_processes(self.daemons())
        if is_mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)


class TdefsTarget(FuseTarget):
    name = "tdefs"
    program = None  # a Python process; its exact command line is the daemon's business

    extra_init_args: tuple[str, ...] = ()
    extra_mount_args: tuple[str, ...] = ()

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.key_file = root / "master.key"
        self.log = root / "daemon.log"
        self.env = clean_env()

    def init(self) -> None:
        run_command([*TDEFS, "init", str(self.backing), "--key-file", str(self.key_file),
                     "--generate-key", *self.extra_init_args], env=self.env)

    def mount(self) -> None:
        run_command([*TDEFS, "mount", str(self.backing), str(self.mountpoint),
                     "--key-file", str(self.key_file), "--log", str(self.log),
                     *self.extra_mount_args, *(["--allow-other"] if self.shared else [])],
                    env=self.env)
        if not is_mounted(self.mountpoint):
            raise BenchError(f"tdefs mount returned, but {self.mountpoint} is not mounted")

    def unmount(self) -> None:
        run_command([*TDEFS, "umount", str(self.mountpoint)], env=self.env)
        wait_gone(self.daemons)

    def daemon_counters(self) -> dict[str, float]:
        """What the daemon has counted since it mounted: "requests", the FUSE requests
        it answered, and "dict_syncs", its fdatasyncs of files.dict."""
        from prometheus_client.parser import text_string_to_metric_families

        from encfs.errors import TdefsError
        from mount.control import request

        try:
            text = request(self.mountpoint, "metrics")["text"]
        except TdefsError as exc:
            raise BenchError(f"cannot read the metrics of {self.mountpoint}: {exc}") from None
        totals = {"tdefs_requests": 0.0, "tdefs_dictionary_syncs": 0.0}
        for family in text_string_to_metric_families(text):
            if family.name in totals:
                totals[family.name] = sum(sample.value for sample in family.samples
                                          if sample.name.endswith("_total"))
        return {"requests": totals["tdefs_requests"], "dict_syncs": totals["tdefs_dictionary_syncs"]}


class GocryptfsTarget(FuseTarget):
    name = "gocryptfs"
    program = "gocryptfs"
    password_cmd = "echo bench-password"

    def init(self) -> None:
        if shutil.which("gocryptfs") is None:
            raise BenchError("gocryptfs is not installed (apt-get install gocryptfs)")
        # scryptn 10 keeps the key derivation out of the mount time
        run_command(["gocryptfs", "-init", "-q", "-extpass", self.password_cmd,
                     "-scryptn", "10", str(self.backing)])

    def mount(self) -> None:
        run_command(["gocryptfs", "-q", "-extpass", self.password_cmd,
                     *(["-allow_other"] if self.shared else []), str(self.backing),
                     str(self.mountpoint)])
        if not is_mounted(self.mountpoint):
            raise BenchError(f"gocryptfs returned, but {self.mountpoint} is not mounted")

    def unmount(self) -> None:
        run_command(["fusermount3", "-u", str(self.mountpoint)])
        wait_gone(self.daemons)


TARGET_CLASSES: dict[str, type[Target]] = {
    "raw": RawTarget, "tdefs": TdefsTarget, "gocryptfs": GocryptfsTarget}


@contextlib.contextmanager
def shared_with_other_users(target: Target) -> Iterator[None]:
    """Within the block, other users may enter the target: a FUSE target is remounted
    with allow_other, and back without it afterwards."""
    if not isinstance(target, FuseTarget):
        yield
        return
    target.unmount()
    target.shared = True
    target.mount()
    try:
        yield
    finally:
        target.unmount()
        target.shared = False
        target.mount()


def open_to_others(path: Path, top: Path) -> None:
    """Let every user reach `path`: it and each directory above it, up to but not
    including `top`, become readable and searchable by all."""
    path = path.resolve()
    top = top.resolve()
    while path != top and top in path.parents:
        path.chmod(path.stat().st_mode | 0o755)
        path = path.parent


@contextlib.contextmanager
def started_targets(root: Path, names: list[str],
                    classes: dict[str, type[Target]] = TARGET_CLASSES) -> Iterator[dict[str, Target]]:
    """Start each named target in `root / name`; stop every one started on the way out."""
    targets: dict[str, Target] = {}
    try:
        for name in names:
            target = classes[name](root / name)
            targets[name] = target
            t0 = time.perf_counter()
            target.start()
            print(f"  {name:<10} ready in {target.workdir} ({time.perf_counter() - t0:.2f} s)",
                  flush=True)
        yield targets
    finally:
        for target in targets.values():
            target.stop()
