"""File contents through a real mount: every read decrypts, every write encrypts, at
any offset, and the edge cases databases rely on behave as on a local disk."""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import random
import threading
import time
from pathlib import Path

import pytest
from fuse_harness import VaultPaths, make_vault, mounted_at, require_fuse, run_tdefs

AT_FDCWD = -100
UTIME_OMIT = (1 << 30) - 2  # utimensat: leave this time as it is


@pytest.fixture(scope="module")
def mnt(tmp_path_factory) -> VaultPaths:
    require_fuse()
    v = make_vault(tmp_path_factory.mktemp("files"))
    with mounted_at(v):
        yield v


def backing_bytes(v: VaultPaths, rel: str) -> bytes:
    return (v.backing / rel).read_bytes()


def test_roundtrip_and_backing_holds_ciphertext(mnt: VaultPaths) -> None:
    data = b"the quick brown fox jumps over the lazy dog\n" * 3000
    (mnt.mountpoint / "plain.txt").write_bytes(data)
    assert (mnt.mountpoint / "plain.txt").read_bytes() == data
    raw = backing_bytes(mnt, "plain.txt")
    assert len(raw) == len(data)  # CTR keeps sizes
    assert raw != data
    assert b"quick brown fox" not in raw
    assert os.stat(mnt.mountpoint / "plain.txt").st_size == len(data)


def test_write_past_eof_reads_back_zeros(mnt: VaultPaths) -> None:
    path = mnt.mountpoint / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"head", 0)
        os.pwrite(fd, b"tail", 3 * 2**20 + 5)
        assert os.fstat(fd).st_size == 3 * 2**20 + 9
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:4] == b"head"
    assert data[4:3 * 2**20 + 5] == bytes(3 * 2**20 + 1)
    assert data[-4:] == b"tail"
    # the whole blocks of the gap are holes; the blocks holding data are ciphertext
    raw = backing_bytes(mnt, "sparse")
    assert raw[4096:3 * 2**20] == bytes(3 * 2**20 - 4096)
    assert b"head" not in raw[:4096] and raw[:4096].count(0) < 64
    assert b"tail" not in raw[3 * 2**20:] and raw[3 * 2**20:].count(0) < 64
    assert os.stat(mnt.backing / "sparse").st_blocks * 512 <= 3 * 4096


def test_truncate_grow_shrink_grow(mnt: VaultPaths) -> None:
    path = mnt.mountpoint / "trunc"
    path.write_bytes(b"x" * 10000)
    os.truncate(path, 50000)
    assert path.read_bytes() == b"x" * 10000 + bytes(40000)
    os.truncate(path, 100)
    assert path.read_bytes() == b"x" * 100
    with open(path, "r+b") as f:
        f.truncate(5000)  # ftruncate through a handle
        f.seek(0)
        assert f.read() == b"x" * 100 + bytes(4900)
    assert backing_bytes(mnt, "trunc")[100:5000] != bytes(4900)


def test_o_trunc_rewrites_with_a_fresh_iv(mnt: VaultPaths) -> None:
    path = mnt.mountpoint / "rewritten"
    data = os.urandom(8192)
    path.write_bytes(data)
    first = backing_bytes(mnt, "rewritten")
    path.write_bytes(data)  # open(O_TRUNC) then the same bytes again
    assert path.read_bytes() == data
    second = backing_bytes(mnt, "rewritten")
    assert first != second, "the same plaintext at the same offset reused the keystream"
    os.truncate(path, 0)  # truncate(2) to zero: fresh IV too
    path.open("r+b").write(data)
    assert backing_bytes(mnt, "rewritten") not in (first, second)
    assert path.read_bytes() == data


def test_o_append_from_two_handles(mnt: VaultPaths) -> None:
    path = mnt.mountpoint / "log"
    path.write_bytes(b"start;")
    a = os.open(path, os.O_WRONLY | os.O_APPEND)
    b = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        for i in range(20):
            os.write(a if i % 2 else b, f"{i};".encode())
        os.lseek(b, 0, os.SEEK_SET)
        os.write(b, b"end")  # O_APPEND ignores the position
    finally:
        os.close(a)
        os.close(b)
    expected = b"start;" + b"".join(f"{i};".encode() for i in range(20)) + b"end"
    assert path.read_bytes() == expected


def test_shared_writable_mmap(mnt: VaultPaths) -> None:
    path = mnt.mountpoint / "mapped"
    path.write_bytes(bytes(3 * 4096))
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 3 * 4096, mmap.MAP_SHARED) as m:
            m[10:15] = b"hello"
            m[8190:8194] = b"span"  # across a page boundary
            m.flush()
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[10:15] == b"hello" and data[8190:8194] == b"span"
    assert data.count(0) == len(data) - 9
    assert b"hello" not in backing_bytes(mnt, "mapped")


def test_unlinked_open_file_keeps_working(mnt: VaultPaths) -> None:
    path = mnt.mountpoint / "ghost"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"before unlink;")
        os.unlink(path)
        assert not path.exists()
        assert not (mnt.backing / "ghost").exists()
        os.write(fd, b"after unlink")
        os.fsync(fd)
        os.fdatasync(fd)
        assert os.pread(fd, 100, 0) == b"before unlink;after unlink"
        os.ftruncate(fd, 6)
        assert os.fstat(fd).st_size == 6
        assert os.pread(fd, 100, 0) == b"before"
        # a second open of the same unlinked file, through /proc
        again = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            assert os.read(again, 100) == b"before"
        finally:
            os.close(again)
    finally:
        os.close(fd)


def test_hard_links_share_contents(mnt: VaultPaths) -> None:
    a, b = mnt.mountpoint / "link-a", mnt.mountpoint / "link-b"
    a.write_bytes(b"shared contents")
    os.link(a, b)
    assert b.read_bytes() == b"shared contents"
    assert os.stat(a).st_ino == os.stat(b).st_ino and os.stat(a).st_nlink == 2
    with open(b, "r+b") as f:
        f.seek(7)
        f.write(b"CONTENTS")
    assert a.read_bytes() == b"shared CONTENTS"
    os.unlink(a)
    assert b.read_bytes() == b"shared CONTENTS"
    assert os.stat(b).st_nlink == 1


def test_random_io_matches_a_model(mnt: VaultPaths) -> None:
    rng = random.Random(1234)
    path = mnt.mountpoint / "model"
    model = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in range(300):
            op = rng.random()
            if op < 0.6:
                off = rng.randrange(0, len(model) + 70000)
                data = rng.randbytes(rng.choice((1, 15, 17, 4096, rng.randrange(1, 200000))))
                os.pwrite(fd, data, off)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + len(data)] = data
            elif op < 0.75:
                size = rng.randrange(0, len(model) + 50000)
                os.ftruncate(fd, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            else:
                off = rng.randrange(0, len(model) + 10)
                size = rng.randrange(0, 100000)
                assert os.pread(fd, size, off) == bytes(model[off:off + size])
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(model)


def test_large_sequential_io(mnt: VaultPaths) -> None:
    path = mnt.mountpoint / "big"
    chunk = os.urandom(2**20)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(16):
            block = chunk[i:] + chunk[:i]
            digest.update(block)
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    check = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(3 * 2**19):
            check.update(block)
    assert check.hexdigest() == digest.hexdigest()


def test_concurrent_writers_at_and_past_eof(mnt: VaultPaths) -> None:
    path = mnt.mountpoint / "concurrent"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    pieces = {i: bytes([65 + i]) * 50000 for i in range(8)}

    def writer(i: int) -> None:
        # reversed order: the later offsets land first and leave gaps behind them
        os.pwrite(fd, pieces[i], (7 - i) * 60000)

    try:
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os.fsync(fd)
    finally:
        os.close(fd)
    data = path.read_bytes()
    for i in range(8):
        off = (7 - i) * 60000
        assert data[off:off + 50000] == pieces[i]
        if i:
            assert data[off + 50000:off + 60000] == bytes(10000)


def test_files_that_predate_the_vault_read_as_plaintext(tmp_path: Path) -> None:
    v = make_vault(tmp_path)
    (v.backing / "old").mkdir()
    (v.backing / "old" / "legacy.txt").write_bytes(b"written before encryption")
    (v.backing / "old" / "other.txt").write_bytes(b"also from before")
    # re-encryption suspended (its state file, as vault-format.md describes it), so
    # the files stay as they are until it is resumed
    (v.backing / ".tdefs" / "reencrypt.json").write_text('{"running": false}')
    with mounted_at(v):
        legacy = v.mountpoint / "old" / "legacy.txt"
        assert legacy.read_bytes() == b"written before encryption"
        with open(legacy, "r+b") as f:  # written in place: stays plaintext
            f.seek(8)
            f.write(b"BEFORE")
        assert legacy.read_bytes() == b"written BEFORE encryption"
        assert (v.backing / "old" / "legacy.txt").read_bytes() == b"written BEFORE encryption"
        legacy.write_bytes(b"rewritten from scratch")  # O_TRUNC: encrypted from now on
        assert legacy.read_bytes() == b"rewritten from scratch"
        assert (v.backing / "old" / "legacy.txt").read_bytes() != b"rewritten from scratch"
        assert (v.backing / "old" / "other.txt").read_bytes() == b"also from before"
        # re-encryption converts the others
        run_tdefs("reencrypt", "resume", v.mountpoint)
        run_tdefs("reencrypt", "wait", v.mountpoint, timeout=60)
        assert (v.backing / "old" / "other.txt").read_bytes() != b"also from before"
        assert (v.mountpoint / "old" / "other.txt").read_bytes() == b"also from before"


def test_remount_reads_everything_back(tmp_path: Path) -> None:
    v = make_vault(tmp_path)
    rng = random.Random(7)
    files = {f"d{i % 3}/sub{i % 2}/f{i}": rng.randbytes(rng.randrange(0, 300000)) for i in range(30)}
    with mounted_at(v, extra=("--xattrs",)):
        m = v.mountpoint
        for rel, data in files.items():
            (m / rel).parent.mkdir(parents=True, exist_ok=True)
            (m / rel).write_bytes(data)
        os.link(m / "d0/sub0/f0", m / "hard")
        os.symlink("d1/sub1/f1", m / "sym")
        os.mkfifo(m / "fifo")
        os.chmod(m / "d2/sub0/f2", 0o640)
        os.setxattr(m / "d0/sub0/f0", "user.tag", b"kept")
        with open(m / "d1/sub1/f1", "r+b") as f:  # last write not synced, not closed early
            f.seek(100)
            f.write(b"late write")
        files["d1/sub1/f1"] = files["d1/sub1/f1"][:100] + b"late write" + files["d1/sub1/f1"][110:]
    with mounted_at(v, extra=("--xattrs",)):
        m = v.mountpoint
        for rel, data in files.items():
            assert (m / rel).read_bytes() == data, rel
            assert (v.backing / rel).read_bytes() != data or not data
        assert (m / "hard").read_bytes() == files["d0/sub0/f0"]
        assert os.stat(m / "hard").st_ino == os.stat(m / "d0/sub0/f0").st_ino
        assert os.readlink(m / "sym") == "d1/sub1/f1"
        assert (m / "sym").read_bytes() == files["d1/sub1/f1"]
        assert os.path.exists(m / "fifo") and (os.stat(m / "fifo").st_mode & 0o170000) == 0o010000
        assert os.stat(m / "d2/sub0/f2").st_mode & 0o777 == 0o640
        assert os.getxattr(m / "d0/sub0/f0", "user.tag") == b"kept"


def test_mtime_survives_remount(tmp_path: Path) -> None:
    v = make_vault(tmp_path)
    with mounted_at(v):
        path = v.mountpoint / "stamped"
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"x" * 100000)  # in the same clock tick as the create
        time.sleep(0.2)  # the data reaches the daemon well after write(2)
        os.close(fd)
        seen = os.stat(path).st_mtime_ns
        with open(v.mountpoint / "later", "wb") as f:
            f.write(b"y")
            time.sleep(0.2)
        seen_later = os.stat(v.mountpoint / "later").st_mtime_ns
    with mounted_at(v):
        assert os.stat(v.mountpoint / "stamped").st_mtime_ns == seen
        assert os.stat(v.mountpoint / "later").st_mtime_ns == seen_later


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _touch_mtime(path: Path, seconds: int) -> None:
    """Set the mtime alone, atime left as it is, without opening the file (touch -m
    would open and close it): the SETATTR the kernel itself sends with the times it
    stamped at write(2), before an fsync or when it writes the inode back."""
    libc = ctypes.CDLL(None, use_errno=True)
    times = (_Timespec * 2)(_Timespec(0, UTIME_OMIT), _Timespec(seconds, 0))
    if libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def test_an_fdatasync_leaves_the_times_to_close_or_fsync(tmp_path: Path) -> None:
    """With the writeback cache, an mtime set on an open file is kept by the daemon
    and given to the backing file at the next fsync or at close, never at an
    fdatasync (which would then also write the inode: 70-90 us here)."""
    v = make_vault(tmp_path)
    first, second = 1_000_000_000, 1_100_000_000
    with mounted_at(v):
        path = v.mountpoint / "db.wal"
        path.write_bytes(b"x" * 8192)
        backing = v.backing / "db.wal"
        fd = os.open(path, os.O_RDWR)
        try:
            _touch_mtime(path, first)
            assert os.stat(path).st_mtime_ns == first * 10**9
            os.fdatasync(fd)
            assert os.stat(backing).st_mtime_ns != first * 10**9
            os.fsync(fd)  # an fsync makes the times durable too
            assert os.stat(backing).st_mtime_ns == first * 10**9
            os.pwrite(fd, b"y" * 100, 0)
            _touch_mtime(path, second)
            os.fdatasync(fd)
            assert os.stat(backing).st_mtime_ns != second * 10**9
            shown = os.stat(path).st_mtime_ns
            assert shown == second * 10**9
        finally:
            os.close(fd)
        assert os.stat(backing).st_mtime_ns == shown
    with mounted_at(v):
        assert os.stat(v.mountpoint / "db.wal").st_mtime_ns == shown
        assert (v.mountpoint / "db.wal").read_bytes() == b"y" * 100 + b"x" * 8092


def test_without_the_writeback_cache(tmp_path: Path) -> None:
    v = make_vault(tmp_path)
    with mounted_at(v, extra=("--no-writeback-cache",)):
        m = v.mountpoint
        (m / "f").write_bytes(b"abc" * 5000)
        with open(m / "f", "ab") as f:  # O_APPEND without the kernel's cache
            f.write(b"tail")
        fd = os.open(m / "f", os.O_RDWR)
        try:
            os.pwrite(fd, b"far", 40000)
            with mmap.mmap(fd, 4096, mmap.MAP_SHARED) as mm:
                mm[0:3] = b"XYZ"
                mm.flush()
        finally:
            os.close(fd)
        data = (m / "f").read_bytes()
        assert data[:3] == b"XYZ" and data[3:15000] == (b"abc" * 5000)[3:]
        assert data[15000:15004] == b"tail" and data[15004:40000] == bytes(40000 - 15004)
        assert data[40000:] == b"far"
        assert b"abcabc" not in (v.backing / "f").read_bytes()
