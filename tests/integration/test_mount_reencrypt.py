"""Key rotation with online re-encryption through a real mount: engines keep writing,
open files keep reading and appending, hard links stay one inode, the rate holds, and
what status says matches the backing tree."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path

import pytest
from fuse_harness import VaultPaths, make_vault, mount, mounted_at, require_fuse, run_tdefs, umount

from encfs.keystore import KeyStore
from encfs.masterkey import MasterKeySource

pytestmark = pytest.mark.fuse

MB = 1_000_000


def tdefs_json(*args: object) -> dict:
    return json.loads(run_tdefs(*args, "--json").stdout)


def status(v: VaultPaths) -> dict:
    return tdefs_json("reencrypt", "status", v.mountpoint)


def wait_for(predicate, what: str, timeout: float = 120.0, every: float = 0.05):
    """Poll ``predicate`` until it returns something true, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def key_ids_from_backing(backing: Path) -> dict[str, int | None]:
    """Every regular file's data key, read from the backing files alone: the key id
    in its per-file copy of its entry (None: no copy, a plaintext file)."""
    found: dict[str, int | None] = {}
    for dirpath, dirnames, filenames in os.walk(backing):
        if Path(dirpath) == backing:
            dirnames[:] = [d for d in dirnames if d != ".tdefs"]
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            try:
                copy = os.getxattr(path, "user.tdefs.entry")
            except OSError:
                found[str(path.relative_to(backing))] = None
                continue
            found[str(path.relative_to(backing))] = struct.unpack(">I", copy[2:6])[0]
    return found


def test_rotation_while_engines_write_rewrites_every_file(tmp_path: Path) -> None:
    from rocksdict import Options, Rdict, WriteOptions

    from engine import DB

    require_fuse()
    v = make_vault(tmp_path)
    (v.backing / "legacy.txt").write_bytes(b"written before the vault existed\n" * 100)
    with mounted_at(v):
        m = v.mountpoint
        lsm = DB.open(str(m / "lsm"))
        rocks_opts = Options(raw_mode=True)
        rocks_opts.create_if_missing(True)
        rocks = Rdict(str(m / "rocks"), rocks_opts)
        synced = WriteOptions()
        synced.sync = True
        written: dict[str, dict[bytes, bytes]] = {"lsm": {}, "rocks": {}}
        errors: list[BaseException] = []
        rotated = threading.Event()

        def lsm_writer() -> None:
            try:
                for i in range(6000):
                    key, value = f"k{i:06d}".encode(), os.urandom(100)
                    lsm.put(key, value, sync=i % 100 == 0)
                    written["lsm"][key] = value
                    if i == 2000:
                        rotated.wait(60)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def rocks_writer() -> None:
            try:
                for i in range(6000):
                    key, value = f"r{i:06d}".encode(), os.urandom(100)
                    if i % 100 == 0:
                        rocks.put(key, value, synced)
                    else:
                        rocks[key] = value
                    written["rocks"][key] = value
                    if i == 2000:
                        rotated.wait(60)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        writers = [threading.Thread(target=lsm_writer), threading.Thread(target=rocks_writer)]
        for w in writers:
            w.start()
        try:
            wait_for(lambda: len(written["lsm"]) > 2000 and len(written["rocks"]) > 2000,
                     "the first writes")
            old_key = tdefs_json("keys", "list", m)[0]["id"]
            run_tdefs("keys", "rotate", m)
            run_tdefs("reencrypt", "rate", m, "0")
        finally:
            rotated.set()
            for w in writers:
                w.join(300)
        assert not errors, errors
        wait_for(lambda: status(v)["state"] == "running" or status(v)["done_files"],
                 "re-encryption to start")
        lsm.close()
        rocks.close()
        run_tdefs("reencrypt", "wait", m, timeout=300)
        final = status(v)
        assert final["state"] == "done" and final["files_left"] == 0
        assert str(old_key) in final["retired"], final
        keys = tdefs_json("keys", "list", m)
        assert [k["id"] for k in keys] == [old_key + 1], keys
        lsm = DB.open(str(m / "lsm"))
        try:
            for key, value in written["lsm"].items():
                assert lsm.get(key) == value
        finally:
            lsm.close()
        rocks = Rdict(str(m / "rocks"), rocks_opts)
        try:
            for key, value in written["rocks"].items():
                assert rocks[key] == value
        finally:
            rocks.close()
        assert (m / "legacy.txt").read_bytes() == b"written before the vault existed\n" * 100
    # from the backing files alone: every file carries the new key, and keys.dict
    # holds no other key
    by_file = key_ids_from_backing(v.backing)
    assert by_file and set(by_file.values()) == {old_key + 1}, by_file
    store = KeyStore.open(v.backing / ".tdefs" / "keys.dict", MasterKeySource.key_file(v.key_file))
    assert list(store.keys) == [old_key + 1]


def test_open_files_and_hard_links_across_their_reencryption(tmp_path: Path) -> None:
    require_fuse()
    v = make_vault(tmp_path)
    with mounted_at(v):
        m = v.mountpoint
        run_tdefs("reencrypt", "suspend", m)
        data = os.urandom(3 * MB)
        (m / "read").write_bytes(data)
        (m / "appended").write_bytes(b"start\n")
        (m / "one").write_bytes(b"linked " * 1000)
        os.link(m / "one", m / "two")
        inos = {n: os.stat(m / n).st_ino for n in ("read", "appended", "one", "two")}
        reader = os.open(m / "read", os.O_RDONLY)
        appender = os.open(m / "appended", os.O_WRONLY | os.O_APPEND)
        try:
            assert os.pread(reader, 100, 0) == data[:100]  # before
            run_tdefs("keys", "rotate", m)
            run_tdefs("reencrypt", "rate", m, "1")  # 3 MB: about three seconds for "read"
            run_tdefs("reencrypt", "resume", m)
            appended = [b"start\n"]
            wait_for(lambda: status(v)["current"] == "read", "the copy of 'read' to begin")
            for i in range(50):  # during: reads through the open handle, and appends
                off = (i * 61_231) % (len(data) - 1000)
                assert os.pread(reader, 1000, off) == data[off:off + 1000]
                line = f"line {i}\n".encode()
                os.write(appender, line)
                appended.append(line)
                os.fsync(appender)
            run_tdefs("reencrypt", "rate", m, "0")
            os.close(appender)
            appender = -1
            run_tdefs("reencrypt", "wait", m, timeout=120)
            assert os.pread(reader, len(data) + 1, 0) == data  # after, same handle
        finally:
            os.close(reader)
            if appender >= 0:
                os.close(appender)
        assert (m / "appended").read_bytes() == b"".join(appended)
        assert {n: os.stat(m / n).st_ino for n in inos} == inos  # numbers seen do not change
        assert os.stat(v.backing / "one").st_ino == os.stat(v.backing / "two").st_ino
        assert os.stat(v.backing / "one").st_nlink == 2
        assert (m / "two").read_bytes() == b"linked " * 1000
        assert set(key_ids_from_backing(v.backing).values()) == {2}


def allocated_in_copies(backing: Path) -> int:
    tmp = backing / ".tdefs" / "tmp"
    return sum(p.stat().st_blocks * 512 for p in tmp.iterdir()) if tmp.exists() else 0


def test_rate_suspend_resume_and_status_match_the_backing_tree(tmp_path: Path) -> None:
    require_fuse()
    v = make_vault(tmp_path)
    with mounted_at(v):
        m = v.mountpoint
        run_tdefs("reencrypt", "suspend", m)
        with open(m / "big", "wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
        for i in range(30):
            (m / f"small{i}").write_bytes(os.urandom(1000 + i))
        run_tdefs("keys", "rotate", m)
        # suspended: status counts what is left, as the backing tree does
        st = wait_for(lambda: (s := status(v))["left_by_key"] and s, "a plan")
        by_file = key_ids_from_backing(v.backing)
        sizes = {name: os.stat(v.backing / name).st_size for name in by_file}
        assert st["state"] == "suspended"
        assert st["left_by_key"] == {"1": {"files": len(by_file), "bytes": sum(sizes.values())}}
        assert set(by_file.values()) == {1}
        # the rate holds within 20 % over 10 s, measured on the backing directory
        run_tdefs("reencrypt", "rate", m, "3")
        run_tdefs("reencrypt", "resume", m)
        wait_for(lambda: status(v)["current"] == "big", "the copy of 'big' to begin")
        start_bytes, start = allocated_in_copies(v.backing), time.monotonic()
        time.sleep(10)  # the measurement window itself, not a synchronisation
        rate = (allocated_in_copies(v.backing) - start_bytes) / (time.monotonic() - start)
        assert 0.8 * 3 * MB <= rate <= 1.2 * 3 * MB, f"{rate / MB:.2f} MB/s"
        # suspended, nothing more is written
        run_tdefs("reencrypt", "suspend", m)
        held = allocated_in_copies(v.backing)
        time.sleep(1)
        assert allocated_in_copies(v.backing) == held
        # and both survive a remount
        umount(v)
        mount(v)
        assert status(v)["state"] == "suspended" and status(v)["rate_limit_mb"] == 3
        run_tdefs("reencrypt", "rate", m, "0")
        run_tdefs("reencrypt", "resume", m)
        run_tdefs("reencrypt", "wait", m, timeout=120)
        assert set(key_ids_from_backing(v.backing).values()) == {2}


def test_status_says_the_cipher_the_active_key_gives_new_files(tmp_path: Path) -> None:
    require_fuse()
    v = make_vault(tmp_path)
    with mounted_at(v):
        m = v.mountpoint
        assert tdefs_json("status", m)["method"] == "aes-256-ctr"
        run_tdefs("keys", "rotate", m, "--method", "sm4-ctr")
        st = tdefs_json("status", m)
        assert st["method"] == "sm4-ctr" and st["active_key"]["method"] == "sm4-ctr", st
        (m / "new").write_bytes(b"under sm4")
    with mounted_at(v):
        assert tdefs_json("status", v.mountpoint)["method"] == "sm4-ctr"
        assert (v.mountpoint / "new").read_bytes() == b"under sm4"
