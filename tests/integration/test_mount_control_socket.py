"""The control socket of a real mount: `tdefs mount` refuses an unsafe socket directory
before it mounts anything, and a daemon made in a private one answers its user, also
with a secret. The refusals one by one are in tests/unit/test_control_socket.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuse_harness import (
    VaultPaths,
    daemons_for,
    force_cleanup,
    is_mounted,
    make_vault,
    mounted_at,
    require_fuse,
    run_tdefs,
)

from mount import control


@pytest.fixture
def v(tmp_path: Path) -> VaultPaths:
    require_fuse()
    vault = make_vault(tmp_path)
    yield vault
    force_cleanup(vault.mountpoint)


def test_mount_refuses_a_socket_directory_wider_than_0700(v: VaultPaths, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o755)
    proc = run_tdefs("mount", v.backing, v.mountpoint, *v.key_args(), "--log", v.log,
                     env={"TDEFS_RUN_DIR": str(run_dir)}, check=False)
    assert proc.returncode != 0 and b"Traceback" not in proc.stderr
    assert proc.stderr.decode().splitlines() == [
        f"tdefs: error: unsafe control socket directory {run_dir}: its mode is 0755, not"
        f" 0700; run: chmod 700 {run_dir}"]
    assert not is_mounted(v.mountpoint) and not daemons_for(v.mountpoint)
    assert list(run_dir.iterdir()) == []


def test_a_daemon_in_a_private_directory_answers_its_user(
        v: VaultPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"  # not there yet: the daemon makes it
    env = {"TDEFS_RUN_DIR": str(run_dir)}
    with mounted_at(v, env=env):
        assert run_dir.stat().st_mode & 0o7777 == 0o700
        [sock] = run_dir.iterdir()
        assert sock.stat().st_mode & 0o777 == 0o600
        assert "pid:" in run_tdefs("status", v.mountpoint, env=env).stdout.decode()
        monkeypatch.setenv("TDEFS_RUN_DIR", str(run_dir))
        reply = control.request(v.mountpoint, "status", carries_secret=True)
        assert reply["pid"] == daemons_for(v.mountpoint)[0].pid
