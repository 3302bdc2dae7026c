"""The tree through a real mount: names, links, special files, metadata, and the
hidden `.tdefs/` directory."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading

import pytest
from fuse_harness import VaultPaths, make_vault, mounted_at, require_fuse

from encfs.fsops import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2


@pytest.fixture(scope="module")
def mnt(tmp_path_factory) -> VaultPaths:
    require_fuse()
    v = make_vault(tmp_path_factory.mktemp("tree"))
    with mounted_at(v, extra=("--xattrs",)):
        yield v


@pytest.fixture
def d(mnt: VaultPaths, request) -> os.PathLike:
    """A fresh directory on the mount for one test."""
    path = mnt.mountpoint / request.node.name
    path.mkdir()
    return path


def test_mkdir_rmdir_and_listing(d) -> None:
    (d / "sub").mkdir(mode=0o750)
    assert stat.S_IMODE(os.stat(d / "sub").st_mode) == 0o750
    (d / "sub" / "f").write_bytes(b"x")
    with pytest.raises(OSError) as exc:
        os.rmdir(d / "sub")
    assert exc.value.errno == errno.ENOTEMPTY
    os.unlink(d / "sub" / "f")
    os.rmdir(d / "sub")
    assert not (d / "sub").exists()
    names = {f"n{i:04d}" for i in range(1500)}  # more than one readdir reply
    for name in names:
        (d / name).touch()
    assert set(os.listdir(d)) == names
    with os.scandir(d) as it:
        assert all(e.is_file() for e in it)


def test_rename_file_over_existing(d) -> None:
    (d / "new").write_bytes(b"new contents")
    (d / "CURRENT").write_bytes(b"old contents")
    os.rename(d / "new", d / "CURRENT")
    assert (d / "CURRENT").read_bytes() == b"new contents"
    assert not (d / "new").exists()
    assert sorted(os.listdir(d)) == ["CURRENT"]


def test_rename_directory_keeps_children_and_open_files(d) -> None:
    (d / "a" / "b").mkdir(parents=True)
    (d / "a" / "b" / "f").write_bytes(b"deep")
    (d / "a" / "g").write_bytes(b"shallow")
    fd = os.open(d / "a" / "b" / "f", os.O_RDWR)
    try:
        os.rename(d / "a", d / "z")
        assert (d / "z" / "b" / "f").read_bytes() == b"deep"
        assert (d / "z" / "g").read_bytes() == b"shallow"
        os.pwrite(fd, b"DEEP", 0)
        assert (d / "z" / "b" / "f").read_bytes() == b"DEEP"
        (d / "z" / "b" / "new").write_bytes(b"created after the move")
        assert (d / "z" / "b" / "new").read_bytes() == b"created after the move"
    finally:
        os.close(fd)
    assert not (d / "a").exists()


def test_rename_noreplace(d) -> None:
    (d / "src").write_bytes(b"src")
    (d / "dst").write_bytes(b"dst")
    with pytest.raises(OSError) as exc:
        renameat2(d / "src", d / "dst", RENAME_NOREPLACE)
    assert exc.value.errno == errno.EEXIST
    assert (d / "dst").read_bytes() == b"dst" and (d / "src").read_bytes() == b"src"
    renameat2(d / "src", d / "free", RENAME_NOREPLACE)
    assert (d / "free").read_bytes() == b"src" and not (d / "src").exists()


def test_rename_exchange(d) -> None:
    (d / "one").write_bytes(b"first file")
    (d / "two").write_bytes(b"second")
    renameat2(d / "one", d / "two", RENAME_EXCHANGE)
    assert (d / "one").read_bytes() == b"second"
    assert (d / "two").read_bytes() == b"first file"
    (d / "dir").mkdir()
    (d / "dir" / "inside").write_bytes(b"inside")
    renameat2(d / "one", d / "dir", RENAME_EXCHANGE)  # a file and a directory
    assert (d / "one" / "inside").read_bytes() == b"inside"
    assert (d / "dir").read_bytes() == b"second"
    with pytest.raises(OSError) as exc:
        renameat2(d / "two", d / "missing", RENAME_EXCHANGE)
    assert exc.value.errno == errno.ENOENT


def test_link_and_unlink_counts(d) -> None:
    (d / "f").write_bytes(b"x")
    os.link(d / "f", d / "g")
    os.link(d / "g", d / "h")
    assert os.stat(d / "f").st_nlink == 3
    os.unlink(d / "g")
    assert os.stat(d / "h").st_nlink == 2
    with pytest.raises(FileExistsError):
        os.link(d / "f", d / "h")


def test_symlinks(d) -> None:
    (d / "target").write_bytes(b"pointed at")
    (d / "dir").mkdir()
    os.symlink("target", d / "rel")
    os.symlink("dir", d / "dirlink")
    os.symlink("nowhere", d / "dangling")
    assert os.readlink(d / "rel") == "target"
    assert (d / "rel").read_bytes() == b"pointed at"
    (d / "dirlink" / "via").write_bytes(b"through the link")
    assert (d / "dir" / "via").read_bytes() == b"through the link"
    assert os.path.islink(d / "dangling") and not os.path.exists(d / "dangling")
    os.rename(d / "rel", d / "moved")
    assert os.readlink(d / "moved") == "target"
    os.unlink(d / "moved")
    assert (d / "target").exists()


def test_fifo(d) -> None:
    os.mkfifo(d / "pipe", 0o600)
    assert stat.S_ISFIFO(os.stat(d / "pipe").st_mode)
    got = []

    def reader() -> None:
        with open(d / "pipe", "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=reader)
    t.start()
    with open(d / "pipe", "wb") as f:
        f.write(b"through the fifo")
    t.join(10)
    assert got == [b"through the fifo"]


def test_unix_socket(d) -> None:
    path = str(d / "sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        conn, _ = server.accept()
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
        client.close()
    finally:
        server.close()
    os.unlink(path)


def test_chmod_chown_utimens(mnt: VaultPaths, d) -> None:
    f = d / "meta"
    f.write_bytes(b"m")
    os.chmod(f, 0o604)
    os.chown(f, 1234, 5678)
    os.utime(f, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o604
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    raw = os.stat(mnt.backing / d.name / "meta")
    assert (stat.S_IMODE(raw.st_mode), raw.st_uid, raw.st_mtime_ns) == (0o604, 1234, 2_000_000_456)
    with open(f, "r+b") as h:  # the handle-based variants
        os.fchmod(h.fileno(), 0o600)
        os.utime(h.fileno(), ns=(5, 6))
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 6
    os.utime(f, ns=(7, st.st_mtime_ns))  # only atime changes
    assert os.stat(f).st_atime_ns == 7 and os.stat(f).st_mtime_ns == 6


def test_permissions_are_enforced_for_other_users(d) -> None:
    f = d / "private"
    f.write_bytes(b"secret")
    os.chmod(f, 0o600)
    os.chmod(d, 0o755)
    pid = os.fork()
    if pid == 0:  # become nobody and try
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                open(f, "rb")
            except PermissionError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.access(f, os.R_OK | os.W_OK)


def test_statfs(mnt: VaultPaths) -> None:
    through, raw = os.statvfs(mnt.mountpoint), os.statvfs(mnt.backing)
    assert through.f_blocks == raw.f_blocks and through.f_bsize == raw.f_bsize
    assert through.f_namemax == raw.f_namemax
    assert abs(through.f_bfree - raw.f_bfree) < raw.f_blocks // 100


def test_xattrs(d) -> None:
    f = d / "x"
    f.write_bytes(b"")
    os.setxattr(f, "user.one", b"1")
    os.setxattr(f, "user.two", b"\x00binary\xff")
    assert os.getxattr(f, "user.two") == b"\x00binary\xff"
    assert {"user.one", "user.two"} <= set(os.listxattr(f))
    os.removexattr(f, "user.one")
    with pytest.raises(OSError) as exc:
        os.getxattr(f, "user.one")
    assert exc.value.errno == errno.ENODATA
    with pytest.raises(OSError) as exc:
        os.setxattr(f, "user.two", b"again", os.XATTR_CREATE)
    assert exc.value.errno == errno.EEXIST
    (d / "xd").mkdir()
    os.setxattr(d / "xd", "user.dir", b"on a directory")
    assert os.getxattr(d / "xd", "user.dir") == b"on a directory"


def test_the_files_own_copy_of_its_entry_is_invisible_and_untouchable(mnt, d) -> None:
    f = d / "x"
    f.write_bytes(b"secret")
    backing = mnt.backing / d.name / "x"
    copy = os.getxattr(backing, "user.tdefs.entry")  # the vault keeps one per file
    assert "user.tdefs.entry" not in os.listxattr(f)
    with pytest.raises(OSError) as exc:
        os.getxattr(f, "user.tdefs.entry")
    assert exc.value.errno == errno.ENODATA
    for attempt in (lambda: os.setxattr(f, "user.tdefs.entry", b"forged"),
                    lambda: os.removexattr(f, "user.tdefs.entry")):
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EPERM
    assert os.getxattr(backing, "user.tdefs.entry") == copy
    assert f.read_bytes() == b"secret"


def test_meta_dir_is_invisible_and_untouchable(mnt: VaultPaths) -> None:
    m = mnt.mountpoint
    assert (mnt.backing / ".tdefs").is_dir()
    assert ".tdefs" not in os.listdir(m)
    for probe in (m / ".tdefs", m / ".tdefs" / "files.dict", m / ".tdefs" / "keys.dict"):
        assert not os.path.lexists(probe)
        with pytest.raises(FileNotFoundError):
            open(probe, "rb")
    (m / "victim").write_bytes(b"v")
    meta = mnt.backing / ".tdefs"
    before = {p.name: p.read_bytes() for p in meta.iterdir() if p.is_file()}
    attempts = [
        lambda: os.mkdir(m / ".tdefs"),
        lambda: open(m / ".tdefs", "wb"),
        lambda: os.rename(m / "victim", m / ".tdefs"),
        lambda: os.link(m / "victim", m / ".tdefs"),
        lambda: os.symlink("victim", m / ".tdefs"),
        lambda: os.mkfifo(m / ".tdefs"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EPERM
    assert {p.name: p.read_bytes() for p in meta.iterdir() if p.is_file()} == before
    # a directory of that name deeper down is an ordinary directory
    (m / "victim-dir" / ".tdefs").mkdir(parents=True)
    assert os.listdir(m / "victim-dir") == [".tdefs"]


def test_tree_on_a_method_other_than_the_default(tmp_path) -> None:
    v = make_vault(tmp_path, method="sm4-ctr")
    with mounted_at(v):
        (v.mountpoint / "f").write_bytes(b"sm4 contents" * 100)
        assert (v.mountpoint / "f").read_bytes() == b"sm4 contents" * 100
        assert b"sm4 contents" not in (v.backing / "f").read_bytes()


def test_write_drops_file_capabilities(d) -> None:
    f = d / "capable"
    f.write_bytes(b"binary")
    (d / "capable").open("ab").write(b"!")  # the daemon now knows it has none
    caps = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw, v2
    os.setxattr(f, "security.capability", caps)
    assert os.getxattr(f, "security.capability") == caps
    with open(f, "ab") as h:
        h.write(b"changed")  # the kernel removes capabilities on write
    with pytest.raises(OSError) as exc:
        os.getxattr(f, "security.capability")
    assert exc.value.errno == errno.ENODATA


def test_xattrs_are_off_by_default(tmp_path) -> None:
    v = make_vault(tmp_path)
    with mounted_at(v):
        f = v.mountpoint / "f"
        f.write_bytes(b"contents")
        for attempt in (lambda: os.setxattr(f, "user.a", b"1"),
                        lambda: os.getxattr(f, "user.a"),
                        lambda: os.listxattr(f)):
            with pytest.raises(OSError) as exc:
                attempt()
            assert exc.value.errno == errno.EOPNOTSUPP
        with open(f, "ab") as h:
            h.write(b" and more")
        assert f.read_bytes() == b"contents and more"


def test_fsync_of_a_directory(d) -> None:
    (d / "entry").write_bytes(b"x")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
