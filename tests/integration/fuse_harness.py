"""What tests on a real FUSE mount share: vaults, mounting, cleaning up.

Every mount made here is unmounted, and every daemon stopped, even when the test
fails: `mounted_at` cleans up in `finally`, and the session hook in conftest.py
sweeps any mount left under the test directories. Without a usable /dev/fuse the
tests skip locally and fail in CI (CI=true). Test modules import it by this name,
never as `conftest`, which names a different module in each test directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from mount.mount_table import is_mounted  # noqa: F401 - the tests' one way to ask

REPO = Path(__file__).resolve().parents[2]
TDEFS = [sys.executable, "-m", "mount.cli"]
_MOUNTPOINTS: set[Path] = set()


@dataclass
class VaultPaths:
    backing: Path
    mountpoint: Path
    key_file: Path
    log: Path

    def key_args(self) -> list[str]:
        return ["--key-file", str(self.key_file)]


def fuse_problem() -> str | None:
    """Why this machine cannot mount, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc.strerror}"
    if not any(os.access(os.path.join(d, "fusermount3"), os.X_OK)
               for d in os.environ.get("PATH", "/usr/bin:/bin").split(":")):
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


def require_fuse() -> None:
    problem = fuse_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the FUSE tests, but {problem}")
    pytest.skip(f"no FUSE here (outside CI): {problem}")


def run_tdefs(*args: str | os.PathLike, env: dict | None = None, check: bool = True,
              timeout: float = 60, input: bytes | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("TDEFS_FAILPOINTS", None)
    if env:
        full_env.update(env)
    proc = subprocess.run([*TDEFS, *map(str, args)], cwd=REPO, env=full_env, input=input,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"tdefs {' '.join(map(str, args))} exited {proc.returncode}:\n"
            f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}")
    return proc


def daemons_for(mountpoint: Path) -> list[psutil.Process]:
    target = str(mountpoint)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.pid != os.getpid() and target in cmd and "mount" in cmd:
            found.append(proc)
    return found


def force_cleanup(mountpoint: Path) -> None:
    """Unmount by every means and stop the daemon; never raises."""
    if is_mounted(mountpoint):
        try:
            run_tdefs("umount", mountpoint, check=False, timeout=30)
        except subprocess.TimeoutExpired:
            pass
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    for proc in daemons_for(mountpoint):
        try:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        except psutil.Error:
            pass
    if is_mounted(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def make_vault(root: Path, name: str = "v", method: str | None = None,
               backing_root: Path | None = None) -> VaultPaths:
    """A new vault under ``root`` (its backing directory under ``backing_root`` if given)."""
    v = VaultPaths(backing=(backing_root or root) / f"{name}-backing",
                   mountpoint=root / f"{name}-mnt",
                   key_file=root / f"{name}.key", log=root / f"{name}.log")
    v.backing.mkdir()
    v.mountpoint.mkdir()
    args = ["init", v.backing, "--key-file", v.key_file, "--generate-key"]
    if method:
        args += ["--method", method]
    run_tdefs(*args)
    return v


def mount(v: VaultPaths, env: dict | None = None, extra: tuple[str, ...] = ()) -> None:
    _MOUNTPOINTS.add(v.mountpoint)
    run_tdefs("mount", v.backing, v.mountpoint, *v.key_args(), "--log", v.log, *extra, env=env)
    assert is_mounted(v.mountpoint), f"tdefs mount returned but {v.mountpoint} is not mounted"


def umount(v: VaultPaths) -> None:
    run_tdefs("umount", v.mountpoint)
    deadline = time.monotonic() + 10
    while daemons_for(v.mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(v.mountpoint)


@contextmanager
def mounted_at(v: VaultPaths, env: dict | None = None,
               extra: tuple[str, ...] = ()) -> Iterator[VaultPaths]:
    """Mount for the duration of the block; always clean up, and unmount cleanly on success."""
    require_fuse()
    try:
        mount(v, env=env, extra=extra)
        yield v
        umount(v)
    finally:
        force_cleanup(v.mountpoint)


@contextmanager
def small_filesystem(where: Path, size: str, kind: str = "tmpfs") -> Iterator[Path]:
    """A filesystem of ``size`` mounted at ``where`` (made if missing) for the block: a
    tmpfs, or ``kind="ext4"`` on a loop device backed by a sparse image next to it. A
    disk a test may fill, and a cap on anything that runs away writing. Needs root;
    fails in CI and skips elsewhere without it."""
    where.mkdir(parents=True, exist_ok=True)
    image = where.with_name(where.name + ".img")
    if kind == "ext4":
        with open(image, "wb") as f:
            f.truncate(int(size.rstrip("m")) << 20)
        setup = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True,
                               text=True)
        cmd = ["mount", "-o", "loop", str(image), str(where)]
    else:
        setup = subprocess.CompletedProcess([], 0, "", "")
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)]
    proc = setup if setup.returncode else subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        image.unlink(missing_ok=True)
        problem = f"cannot mount a {kind} at {where}: {proc.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run this test, but {problem}")
        pytest.skip(problem)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        image.unlink(missing_ok=True)
