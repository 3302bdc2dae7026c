"""The mount's life cycle from the command line: errors are one line with a non-zero
exit, the daemon survives failing requests, signals and dead daemons are cleaned up."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import pytest
import trio
from fuse_harness import (
    REPO,
    TDEFS,
    VaultPaths,
    daemons_for,
    force_cleanup,
    is_mounted,
    make_vault,
    mount,
    mounted_at,
    require_fuse,
    run_tdefs,
    umount,
)

from encfs.backing import BackingTree
from mount.fs import VaultFS
from mount.mount_table import mount_options


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    err = proc.stderr.decode().strip().splitlines()
    err = [line for line in err if not line.startswith("tdefs: warning:")]
    assert len(err) == 1 and err[0].startswith("tdefs: error: "), err
    assert b"Traceback" not in proc.stderr
    return err[0]


def wait_gone(v: VaultPaths, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (daemons_for(v.mountpoint) or is_mounted(v.mountpoint)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(v.mountpoint)
    assert not daemons_for(v.mountpoint)


@pytest.fixture
def v(tmp_path: Path) -> VaultPaths:
    require_fuse()
    vault = make_vault(tmp_path)
    yield vault
    force_cleanup(vault.mountpoint)


def test_wrong_key_is_one_line_error(v: VaultPaths, tmp_path: Path) -> None:
    other = make_vault(tmp_path, name="other")
    proc = run_tdefs("mount", v.backing, v.mountpoint, "--key-file", other.key_file,
                     "--log", v.log, check=False)
    line = one_line_error(proc)
    assert "key" in line.lower()
    assert not is_mounted(v.mountpoint) and not daemons_for(v.mountpoint)


def test_missing_vault_and_not_a_vault(v: VaultPaths, tmp_path: Path) -> None:
    proc = run_tdefs("mount", tmp_path / "nowhere", v.mountpoint, *v.key_args(), check=False)
    assert "nowhere" in one_line_error(proc)
    plain = tmp_path / "plain-dir"
    plain.mkdir()
    proc = run_tdefs("mount", plain, v.mountpoint, *v.key_args(), check=False)
    assert "not a tdefs vault" in one_line_error(proc)
    assert not is_mounted(v.mountpoint)


def test_missing_mountpoint(v: VaultPaths, tmp_path: Path) -> None:
    proc = run_tdefs("mount", v.backing, tmp_path / "no-such-dir", *v.key_args(), check=False)
    assert "does not exist" in one_line_error(proc)


def test_mountpoint_inside_the_vault_is_refused(v: VaultPaths) -> None:
    inner = v.backing / "mnt"
    inner.mkdir()
    proc = run_tdefs("mount", v.backing, inner, *v.key_args(), check=False)
    assert "contain" in one_line_error(proc)


def test_mount_over_a_non_empty_directory_warns_and_mounts(v: VaultPaths) -> None:
    (v.mountpoint / "left-behind").write_bytes(b"under the mount")
    (v.mountpoint / "subdir").mkdir()
    try:
        proc = run_tdefs("mount", v.backing, v.mountpoint, *v.key_args(), "--log", v.log)
        assert proc.stderr.decode() == (
            f"tdefs: warning: mountpoint {os.path.realpath(v.mountpoint)} is not empty: the 2"
            " entries in it are hidden while the vault is mounted\n")
        assert is_mounted(v.mountpoint)
        assert os.listdir(v.mountpoint) == []  # the vault's (empty) tree, not what is under it
        (v.mountpoint / "through").write_bytes(b"written through the mount")
        assert (v.mountpoint / "through").read_bytes() == b"written through the mount"
        umount(v)
    finally:
        force_cleanup(v.mountpoint)
    assert sorted(os.listdir(v.mountpoint)) == ["left-behind", "subdir"]
    assert (v.mountpoint / "left-behind").read_bytes() == b"under the mount"
    stored = (v.backing / "through").read_bytes()
    assert len(stored) == len(b"written through the mount") and b"written" not in stored


def test_busy_mountpoint(v: VaultPaths, tmp_path: Path) -> None:
    with mounted_at(v):
        other = make_vault(tmp_path, name="second")
        proc = run_tdefs("mount", other.backing, v.mountpoint, *other.key_args(), check=False)
        assert "busy" in one_line_error(proc)
        # the same vault twice, on another mountpoint: the vault is locked
        proc = run_tdefs("mount", v.backing, other.mountpoint, *v.key_args(), check=False)
        assert "in use" in one_line_error(proc)
        assert not is_mounted(other.mountpoint)
        assert (v.mountpoint / ".").exists()  # the first mount is untouched


def test_no_dev_fuse(v: VaultPaths) -> None:
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run this test, but unshare --mount does not work here")
        pytest.skip("unshare --mount is not available here (outside CI)")
    script = "mount -t tmpfs none /dev && exec " + " ".join(
        [sys.executable, "-m", "mount.cli", "mount", str(v.backing), str(v.mountpoint),
         *v.key_args()])
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, cwd=Path(__file__).resolve().parents[2])
    assert "/dev/fuse" in one_line_error(proc)


def test_status_and_umount_errors(v: VaultPaths) -> None:
    proc = run_tdefs("status", v.mountpoint, check=False)
    assert "not mounted" in one_line_error(proc)
    proc = run_tdefs("umount", v.mountpoint, check=False)
    assert "not mounted" in one_line_error(proc)
    with mounted_at(v):
        out = run_tdefs("status", v.mountpoint).stdout.decode()
        pid = daemons_for(v.mountpoint)[0].pid
        assert f"pid:            {pid}" in out
        assert str(v.backing) in out and "aes-256-ctr" in out
        dev = os.stat(v.mountpoint).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        if os.geteuid() == 0 and bdi.exists():
            assert bdi.read_text().strip() == "512"  # raised after the FUSE handshake
        with open(v.mountpoint / "held", "wb"):
            proc = run_tdefs("umount", v.mountpoint, check=False)
            assert "busy" in one_line_error(proc)
            assert is_mounted(v.mountpoint)


def test_sigterm_flushes_and_unmounts(v: VaultPaths) -> None:
    mount(v)
    try:
        (v.mountpoint / "unsynced").write_bytes(b"only in the page cache" * 1000)
        [daemon] = daemons_for(v.mountpoint)
        daemon.send_signal(signal.SIGTERM)
        wait_gone(v)
        assert "SIGTERM" in v.log.read_text()
    finally:
        force_cleanup(v.mountpoint)
    with mounted_at(v):
        assert (v.mountpoint / "unsynced").read_bytes() == b"only in the page cache" * 1000


def test_umount_cleans_up_after_a_daemon_killed_inside_rename(v: VaultPaths) -> None:
    with mounted_at(v):
        (v.mountpoint / "CURRENT").write_bytes(b"old")
    mount(v, env={"TDEFS_FAILPOINTS": "rename.after-intent=crash"})
    try:
        (v.mountpoint / "tmp").write_bytes(b"new")
        with pytest.raises(OSError) as exc:
            os.rename(v.mountpoint / "tmp", v.mountpoint / "CURRENT")
        assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        deadline = time.monotonic() + 10
        while daemons_for(v.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not daemons_for(v.mountpoint)
        assert is_mounted(v.mountpoint)  # a dead mount is left behind
        proc = run_tdefs("mount", v.backing, v.mountpoint, *v.key_args(), check=False)
        assert "busy" in one_line_error(proc)
        run_tdefs("umount", v.mountpoint)
        assert not is_mounted(v.mountpoint)
    finally:
        force_cleanup(v.mountpoint)
    with mounted_at(v):
        assert (v.mountpoint / "CURRENT").read_bytes() == b"old"
        assert (v.mountpoint / "tmp").read_bytes() == b"new"


def test_failing_request_gets_an_errno_and_the_daemon_stays(v: VaultPaths) -> None:
    with mounted_at(v, env={"TDEFS_FAILPOINTS": "link.after-new=error"}):
        m = v.mountpoint
        (m / "a").write_bytes(b"contents")
        with pytest.raises(OSError) as exc:
            os.link(m / "a", m / "b")
        assert exc.value.errno == errno.EIO
        assert not (m / "b").exists()
        (m / "c").write_bytes(b"still serving")
        assert (m / "c").read_bytes() == b"still serving"
        assert len(daemons_for(m)) == 1
    assert "failpoint link.after-new" in v.log.read_text()


class _BrokenVault:
    """A vault whose every operation fails with an exception nobody expects."""

    root = "/"

    def __getattr__(self, name: str):
        def broken(*args):
            raise RuntimeError(f"{name} exploded")
        return broken


def test_unexpected_exception_becomes_eio(tmp_path: Path, caplog) -> None:
    vault = _BrokenVault()
    vault.root = str(tmp_path)
    vault.tree = BackingTree(os.fsencode(tmp_path))
    (tmp_path / "f").write_bytes(b"x")
    fs = VaultFS(vault)  # type: ignore[arg-type]

    async def attempt():
        ctx = None
        entry = await fs.lookup(pyfuse3.ROOT_INODE, b"f", ctx)
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await fs.unlink(pyfuse3.ROOT_INODE, b"f", ctx)
        assert exc.value.errno == errno.EIO
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await fs.open(entry.st_ino, os.O_RDONLY, ctx)
        assert exc.value.errno == errno.EIO
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await fs.getattr(12345, ctx)
        assert exc.value.errno == errno.ENOENT

    trio.run(attempt)
    assert "unlink exploded" in caplog.text and "cipher_for exploded" in caplog.text
    assert (tmp_path / "f").exists()


class _Ctx:
    def __init__(self, uid: int, gid: int) -> None:
        self.uid, self.gid, self.pid = uid, gid, os.getpid()


def test_access_checks_modes_like_the_kernel(tmp_path: Path) -> None:
    vault = _BrokenVault()
    vault.root = str(tmp_path)
    vault.tree = BackingTree(os.fsencode(tmp_path))
    f = tmp_path / "f"
    f.write_bytes(b"x")
    os.chown(f, 1000, 1000)
    os.chmod(f, 0o640)
    fs = VaultFS(vault)  # type: ignore[arg-type]

    async def check():
        ino = (await fs.lookup(pyfuse3.ROOT_INODE, b"f", _Ctx(0, 0))).st_ino
        assert await fs.access(ino, os.R_OK | os.W_OK, _Ctx(1000, 1000))
        assert not await fs.access(ino, os.X_OK, _Ctx(1000, 1000))
        assert await fs.access(ino, os.R_OK, _Ctx(2000, 1000))  # group
        assert not await fs.access(ino, os.W_OK, _Ctx(2000, 1000))
        assert not await fs.access(ino, os.R_OK, _Ctx(3000, 3000))  # other
        assert await fs.access(ino, os.R_OK | os.W_OK, _Ctx(0, 0))  # root
        assert not await fs.access(ino, os.X_OK, _Ctx(0, 0))  # no x bit at all

    trio.run(check)


def test_foreground_mode_and_ctrl_c(v: VaultPaths) -> None:
    env = {k: val for k, val in os.environ.items() if k != "TDEFS_FAILPOINTS"}
    proc = subprocess.Popen([sys.executable, "-m", "mount.cli", "mount", str(v.backing),
                             str(v.mountpoint), *v.key_args(), "--foreground"],
                            cwd=Path(__file__).resolve().parents[2], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(v.mountpoint):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the foreground mount never came up"
            time.sleep(0.05)
        (v.mountpoint / "fg").write_bytes(b"written in the foreground")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert not is_mounted(v.mountpoint)
        assert b"unmounted" in proc.stderr.read()  # the log went to the terminal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_cleanup(v.mountpoint)
    with mounted_at(v):
        assert (v.mountpoint / "fg").read_bytes() == b"written in the foreground"


def _fuse_options(mountpoint: Path) -> set[str]:
    options = mount_options(mountpoint)
    assert options is not None, f"{mountpoint} is not mounted"
    return options


def _as_nobody(where: Path, path: str) -> int:
    """errno of stat(path) from a child in ``where`` running as nobody (0 if it worked)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.chdir(where)  # as root: the directories above need not let nobody in
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.stat(path)
        except OSError as exc:
            code = exc.errno or 255
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_permission_checks_follow_allow_other(v: VaultPaths) -> None:
    with mounted_at(v):
        # only the mounting user gets in, so the backing filesystem's own checks on
        # the daemon (that same user) are the right ones: the kernel need not check
        assert "default_permissions" not in _fuse_options(v.mountpoint)
        assert _as_nobody(v.mountpoint.parent, v.mountpoint.name) == errno.EACCES
        (v.mountpoint / "f").write_bytes(b"x")
    with mounted_at(v, extra=("--allow-other",)):
        assert {"default_permissions", "allow_other"} <= _fuse_options(v.mountpoint)
        assert _as_nobody(v.mountpoint, "f") == 0


def test_a_key_file_given_by_a_relative_path_mounts(tmp_path: Path) -> None:
    """The daemon changes directory to / when it detaches: a relative key path must
    still name the file the user meant."""
    require_fuse()
    v = make_vault(tmp_path)
    env = {k: val for k, val in os.environ.items() if k != "TDEFS_FAILPOINTS"}
    env["PYTHONPATH"] = str(REPO)
    try:
        proc = subprocess.run([*TDEFS, "mount", v.backing.name, v.mountpoint.name,
                               "--key-file", v.key_file.name, "--log", str(v.log)],
                              cwd=tmp_path, env=env, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        (v.mountpoint / "f").write_bytes(b"through a relative key path")
        assert (v.mountpoint / "f").read_bytes() == b"through a relative key path"
        run_tdefs("umount", v.mountpoint)
    finally:
        force_cleanup(v.mountpoint)
