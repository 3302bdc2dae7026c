"""Real workloads on the mount: what lands in the backing directory is ciphertext,
SQLite in WAL mode survives a remount (and a killed writer), and the backing directory
copied elsewhere with `cp -a` mounts and reads back with the key alone."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fuse_harness import VaultPaths, mounted_at

pytestmark = pytest.mark.fuse

MARKER = b"TDEFS-PLAINTEXT-MARKER:"


def backing_files(backing: Path) -> dict[str, bytes]:
    """Every regular file of the user's tree in the backing directory (not .tdefs/)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(backing):
        if Path(dirpath) == backing and ".tdefs" in dirnames:
            dirnames.remove(".tdefs")
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                found[str(path.relative_to(backing))] = path.read_bytes()
    return found


# -- (b) the backing bytes are not the plaintext ------------------------------


def test_backing_files_hold_ciphertext(vault: VaultPaths) -> None:
    marked = MARKER * 2000                       # ~46 KiB of an easily found pattern
    small = b"attack at dawn"                    # shorter than one AES block
    gap_tail = b"after the hole"
    plain: dict[str, bytes] = {"marked": marked, "twin": marked, "small": small,
                               "odd": marked[:16 * 1000 + 7]}

    with mounted_at(vault) as v:
        mnt = v.mountpoint
        (mnt / "dir").mkdir()
        for name, data in plain.items():
            (mnt / name).write_bytes(data)
        # a write 100 KiB past EOF: whole blocks of the gap stay holes (they read as
        # zeros); the block the data lands in is ciphertext in full
        with open(mnt / "dir" / "sparse", "wb") as f:
            f.seek(100_000)
            f.write(gap_tail)
        plain["dir/sparse"] = bytes(100_000) + gap_tail
        # a growing truncate: the old last block and the new one get encrypted zeros
        os.truncate(mnt / "small", 5000)
        plain["small"] = small + bytes(5000 - len(small))

    on_disk = backing_files(vault.backing)
    for name, data in plain.items():
        assert name in on_disk, f"{name} is missing from the backing directory"
        cipher = on_disk[name]
        assert len(cipher) == len(data), f"{name}: CTR keeps sizes, got {len(cipher)}"
        assert cipher != data
        assert MARKER[:16] not in cipher, f"plaintext of {name} is visible in the backing file"
        # no 64-byte window of the plaintext appears in the ciphertext at the same
        # offset, outside holes: whole 4 KiB blocks of zeros that read as zeros
        blocks = range(0, len(data), 4096)
        holes = {b for b in blocks if cipher[b:b + 4096] == bytes(4096)}
        assert all(data[b:b + 4096] == bytes(4096) for b in holes), f"{name}: a hole over data"
        same = sum(a == b for i, (a, b) in enumerate(zip(cipher, data, strict=True))
                   if i - i % 4096 not in holes)
        assert same < len(data) // 64 + 16, f"{name}: {same} bytes equal to the plaintext"
    assert on_disk["marked"] != on_disk["twin"], "two files share a keystream (IV reuse)"
    sparse = on_disk["dir/sparse"]
    assert sparse[:98_304] == bytes(98_304), "the whole blocks of the gap are holes"
    assert sparse[98_304:].count(0) < 64, "the block holding the data is ciphertext in full"
    assert on_disk["small"][len(small):].count(0) < 5000 // 64, "the grown tail is zeros on disk"
    for name, data in backing_files(vault.backing / ".tdefs").items():
        assert MARKER[:16] not in data, f".tdefs/{name} holds plaintext"

    # the same bytes rewritten from scratch must not reuse the old keystream
    before = on_disk["marked"]
    with mounted_at(vault) as v:
        for name, data in plain.items():
            assert (v.mountpoint / name).read_bytes() == data, f"{name} read back wrong"
        (v.mountpoint / "marked").write_bytes(marked)       # open(O_TRUNC) + write
        assert (v.mountpoint / "marked").read_bytes() == marked
    after = (vault.backing / "marked").read_bytes()
    assert after != before, "rewriting a file from scratch reused its IV"


# -- (c) SQLite in WAL mode -------------------------------------------------------

ROWS = 20_000
BATCH = 1_000


def fill_sqlite(path: Path) -> str:
    """Fill a WAL-mode database with updates and deletes; returns the expected digest."""
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v BLOB)")
        for start in range(0, ROWS, BATCH):
            with con:
                con.executemany("INSERT INTO t VALUES (?, ?, ?)",
                                ((i, f"key-{i:08d}", MARKER + os.urandom(40) + str(i).encode())
                                 for i in range(start, start + BATCH)))
        with con:
            con.execute("UPDATE t SET v = ? WHERE id % 7 = 0", (MARKER + b"updated",))
            con.execute("DELETE FROM t WHERE id % 11 = 0")
            con.execute("CREATE INDEX t_v ON t (v)")
        return table_digest(con)
    finally:
        con.close()


def table_digest(con: sqlite3.Connection) -> str:
    h = hashlib.sha256()
    for row in con.execute("SELECT id, k, v FROM t ORDER BY id"):
        h.update(repr(row).encode())
    return h.hexdigest()


KILLED_WRITER = textwrap.dedent("""
    import os, sqlite3, sys, time
    con = sqlite3.connect(sys.argv[1])
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")   # committed rows stay in the WAL only
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v BLOB)")
    for start in range(0, 5000, 500):
        with con:
            con.executemany("INSERT INTO t VALUES (?, ?, ?)",
                            ((i, f"key-{i:08d}", b"v" * (i % 300)) for i in range(start, start + 500)))
    print("committed", flush=True)
    time.sleep(600)
""")


def test_sqlite_wal_survives_remount_and_killed_writer(vault: VaultPaths) -> None:
    with mounted_at(vault) as v:
        expected = fill_sqlite(v.mountpoint / "app.db")
        # a second database whose writer dies with all its commits still in the WAL
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER,
                                   str(v.mountpoint / "killed.db")], stdout=subprocess.PIPE)
        try:
            assert writer.stdout.readline().strip() == b"committed"
            assert (v.mountpoint / "killed.db-wal").stat().st_size > 0
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()

    db_bytes = (vault.backing / "app.db").read_bytes()
    assert db_bytes[:16] != b"SQLite format 3\x00", "the database header is plaintext on disk"
    assert MARKER not in db_bytes

    with mounted_at(vault) as v:
        con = sqlite3.connect(v.mountpoint / "app.db")
        try:
            assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            kept = ROWS - len([i for i in range(ROWS) if i % 11 == 0])
            assert con.execute("SELECT count(*) FROM t").fetchone()[0] == kept
            assert table_digest(con) == expected
        finally:
            con.close()
        con = sqlite3.connect(v.mountpoint / "killed.db")
        try:
            assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert con.execute("SELECT count(*), sum(length(v)) FROM t").fetchone() == (
                5000, sum(i % 300 for i in range(5000)))
        finally:
            con.close()


# -- (d) the backing directory plus the key is the whole vault ------------------


SET_MTIME = 1_600_000_000_123_456_789


def make_tree(root: Path) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    for size in (0, 1, 15, 16, 17, 4095, 4096, 4097, 70_000, 1_048_579):
        (root / "a" / f"f{size}").write_bytes(os.urandom(size))
    (root / "a" / "b" / "c" / "deep").write_bytes(MARKER * 100)
    os.link(root / "a" / "f4096", root / "a" / "b" / "hardlink")
    os.symlink("../f17", root / "a" / "b" / "symlink")
    os.mkfifo(root / "a" / "fifo")
    os.chmod(root / "a" / "f1", 0o600)
    os.utime(root / "a" / "f15", ns=(SET_MTIME, SET_MTIME))


def describe_tree(root: Path) -> dict[str, tuple]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st_ = os.lstat(path)
            kind = stat.S_IFMT(st_.st_mode)
            entry: tuple = (kind, stat.S_IMODE(st_.st_mode))
            if stat.S_ISREG(st_.st_mode):
                entry += (st_.st_nlink, st_.st_mtime_ns, hashlib.sha256(path.read_bytes()).digest())
            elif stat.S_ISLNK(st_.st_mode):
                entry += (os.readlink(path),)
            found[str(path.relative_to(root))] = entry
    return found


def test_copied_backing_directory_mounts_with_the_key(vault: VaultPaths, tmp_path: Path) -> None:
    with mounted_at(vault) as v:
        make_tree(v.mountpoint)
        expected = describe_tree(v.mountpoint)
    assert expected["a/f4096"][2] == 2 and expected["a/b/hardlink"] == expected["a/f4096"]

    copy = VaultPaths(backing=tmp_path / "copy-backing", mountpoint=tmp_path / "copy-mnt",
                      key_file=vault.key_file, log=tmp_path / "copy.log")
    subprocess.run(["cp", "-a", str(vault.backing), str(copy.backing)], check=True)
    copy.mountpoint.mkdir()
    shutil.rmtree(vault.backing)          # nothing but the copy (and the key) is left

    with mounted_at(copy) as c:
        assert describe_tree(c.mountpoint) == expected
        assert (c.mountpoint / "a" / "f15").stat().st_mtime_ns == SET_MTIME
        assert os.path.samefile(c.mountpoint / "a" / "f4096", c.mountpoint / "a" / "b" / "hardlink")
        # the copy is a working vault, not a read-only relic
        (c.mountpoint / "a" / "new").write_bytes(b"written after the copy")
    with mounted_at(copy) as c:
        assert (c.mountpoint / "a" / "new").read_bytes() == b"written after the copy"
        assert describe_tree(c.mountpoint)["a/f70000"] == expected["a/f70000"]
