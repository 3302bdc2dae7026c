"""Kill the daemon at every failpoint of re-encryption, and while it is suspended.

For each failpoint a vault with files under key 1 (one sparse, two names of one file,
one from before the vault) is mounted with TDEFS_FAILPOINTS=<name>=crash; the rate is
set, a new key made, and the daemon dies inside its re-encryption. After `tdefs
umount` and a plain remount every file reads back, the rate is still the one set,
re-encryption resumes and completes, every file is then under the new key (its
per-file copy says so: checked on the backing files), the hard-linked pair is still
one inode, and key 1 is retired."""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import time
from pathlib import Path

import pytest

# the FUSE test helpers, one module shared with tests/integration (and its sweep
# of mounts left behind at the end of the session)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
import fuse_harness as fx  # noqa: E402

pytestmark = pytest.mark.fuse

FILES = {"a": b"alpha " * 3000, "d/b": b"beta " * 50, "one": b"linked " * 400}
POINTS = [
    "reencrypt.after-start", "reencrypt.mid-copy", "reencrypt.mid-copy=crash@3",
    "reencrypt.after-copy", "reencrypt.after-first-name", "reencrypt.mid-links",
    "reencrypt.after-switch",
    # the state is saved by `reencrypt rate` and `resume` first, then by re-encryption
    "reencrypt.state.mid-tmp=crash@3", "reencrypt.state.after-tmp=crash@3",
    "reencrypt.state.after-rename=crash@3",
]


def reencrypt_status(v: fx.VaultPaths) -> dict:
    return json.loads(fx.run_tdefs("reencrypt", "status", v.mountpoint, "--json").stdout)


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def key_of(path: Path) -> int | None:
    try:
        return struct.unpack(">I", os.getxattr(path, "user.tdefs.entry")[2:6])[0]
    except OSError:
        return None


def prepare(tmp_path: Path) -> tuple[fx.VaultPaths, dict[str, bytes]]:
    v = fx.make_vault(tmp_path)
    expect = dict(FILES)
    with fx.mounted_at(v):
        m = v.mountpoint
        fx.run_tdefs("reencrypt", "suspend", m)  # until the test says go
        for rel, data in FILES.items():
            (m / rel).parent.mkdir(exist_ok=True)
            (m / rel).write_bytes(data)
        os.link(m / "one", m / "two")
        expect["two"] = FILES["one"]
        with open(m / "sparse", "wb") as f:
            f.seek(400_000)
            f.write(b"end")
        expect["sparse"] = bytes(400_000) + b"end"
    (v.backing / "legacy").write_bytes(b"before the vault " * 100)
    expect["legacy"] = b"before the vault " * 100
    return v, expect


def check_after(v: fx.VaultPaths, expect: dict[str, bytes], rate: float) -> None:
    with fx.mounted_at(v):
        m = v.mountpoint
        for rel, data in expect.items():
            assert (m / rel).read_bytes() == data, rel
        st = reencrypt_status(v)
        assert st["rate_limit_mb"] == rate, st  # the rate set before the crash
        fx.run_tdefs("reencrypt", "rate", m, "0")
        fx.run_tdefs("reencrypt", "wait", m, timeout=120)
        for rel, data in expect.items():
            assert (m / rel).read_bytes() == data, rel
        active = json.loads(fx.run_tdefs("keys", "list", m, "--json").stdout)
        assert [k["id"] for k in active] == [2], active  # key 1 retired
    assert {rel: key_of(v.backing / rel) for rel in expect} == dict.fromkeys(expect, 2)
    assert os.stat(v.backing / "one").st_ino == os.stat(v.backing / "two").st_ino
    assert not list((v.backing / ".tdefs" / "tmp").glob("*"))


@pytest.mark.parametrize("point", POINTS)
def test_daemon_killed_inside_reencryption(tmp_path: Path, point: str) -> None:
    fx.require_fuse()
    v, expect = prepare(tmp_path)
    spec = point if "=" in point else f"{point}=crash"
    try:
        fx.mount(v, env={"TDEFS_FAILPOINTS": spec})
        (daemon,) = fx.daemons_for(v.mountpoint)
        fx.run_tdefs("reencrypt", "rate", v.mountpoint, "40")
        fx.run_tdefs("keys", "rotate", v.mountpoint)
        fx.run_tdefs("reencrypt", "resume", v.mountpoint)
        daemon.wait(60)  # it dies at the failpoint
        assert f"failpoint {point.partition('=')[0]}" not in v.log.read_text()
        fx.run_tdefs("umount", v.mountpoint)
    finally:
        fx.force_cleanup(v.mountpoint)
    check_after(v, expect, rate=40.0)


def test_suspended_state_and_rate_survive_a_killed_daemon(tmp_path: Path) -> None:
    fx.require_fuse()
    v, expect = prepare(tmp_path)
    try:
        fx.mount(v)
        m = v.mountpoint
        fx.run_tdefs("reencrypt", "rate", m, "7.5")
        fx.run_tdefs("keys", "rotate", m)
        wait_until(lambda: reencrypt_status(v)["files_left"] > 0, "a plan")
        (daemon,) = fx.daemons_for(m)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        fx.run_tdefs("umount", m)
        fx.mount(v)
        wait_until(lambda: reencrypt_status(v)["files_left"] > 0, "the plan after remount")
        st = reencrypt_status(v)
        assert st["state"] == "suspended" and st["rate_limit_mb"] == 7.5, st
        # five inodes: the two names of "one" are one file
        assert st["done_files"] == 0 and st["files_left"] == 5, st
        fx.run_tdefs("reencrypt", "resume", m)
        fx.run_tdefs("umount", m)
    finally:
        fx.force_cleanup(v.mountpoint)
    check_after(v, expect, rate=7.5)


@pytest.mark.parametrize("point", ["keys.replace.mid-tmp", "keys.replace.after-tmp",
                                   "keys.replace.after-rename"])
def test_daemon_killed_inside_an_online_master_key_rotation(tmp_path: Path, point: str) -> None:
    """Exactly one of the old and the new master key opens the vault afterwards, and it
    reads every file."""
    from encfs.errors import WrongMasterKey
    from encfs.masterkey import MasterKeySource
    from encfs.vault import Vault

    fx.require_fuse()
    v, expect = prepare(tmp_path)
    new_key = tmp_path / "new.key"
    try:
        fx.mount(v, env={"TDEFS_FAILPOINTS": f"{point}=crash"})
        (daemon,) = fx.daemons_for(v.mountpoint)
        fx.run_tdefs("master-key", "rotate", v.mountpoint, "--new-key-file", new_key,
                     "--generate-key", check=False)
        daemon.wait(60)
        fx.run_tdefs("umount", v.mountpoint)
    finally:
        fx.force_cleanup(v.mountpoint)
    opens = []
    for key in (v.key_file, new_key):
        try:
            Vault.open(v.backing, MasterKeySource.key_file(key)).close()
            opens.append(key)
        except WrongMasterKey:
            pass
    assert len(opens) == 1, opens
    v.key_file = opens[0]
    with fx.mounted_at(v):
        for rel, data in expect.items():
            assert (v.mountpoint / rel).read_bytes() == data, rel
