"""Paths of any depth through a real mount: 40 levels of 127-byte names.

A path through the mount this deep is longer than PATH_MAX, so the test walks it
with directory descriptors, as a program must; the daemon must reach the backing
files the same way, whatever the length of its backing directory's own path."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from fuse_harness import make_vault, mount, mounted_at, require_fuse, umount

NAME = "n" * 127
DEPTH = 40
_DIR = os.O_RDONLY | os.O_DIRECTORY


def walk_down(top: str, create: bool) -> int:
    """A descriptor of the deepest directory below ``top``, made on the way if asked."""
    fd = os.open(top, _DIR)
    for _ in range(DEPTH):
        if create:
            os.mkdir(NAME, 0o755, dir_fd=fd)
        nxt = os.open(NAME, _DIR, dir_fd=fd)
        os.close(fd)
        fd = nxt
    return fd


def test_every_operation_forty_levels_deep(tmp_path):
    require_fuse()
    # a long backing path too: the daemon must not prepend it to the names
    root = tmp_path / ("r" * 150)
    root.mkdir()
    v = make_vault(root)
    with mounted_at(v):
        fd = walk_down(str(v.mountpoint), create=True)
        top = os.open(str(v.mountpoint), _DIR)
        try:
            # a missing deep name is ENOENT, not ENAMETOOLONG
            with pytest.raises(FileNotFoundError):
                os.stat("missing", dir_fd=fd)
            f = os.open("file", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
            os.write(f, b"deep secret")
            os.close(f)
            os.mkdir("sub", dir_fd=fd)
            os.mkfifo("fifo", dir_fd=fd)
            os.mknod("node", stat.S_IFREG | 0o600, dir_fd=fd)
            os.symlink("file", "sym", dir_fd=fd)
            os.link("file", "hard", src_dir_fd=fd, dst_dir_fd=fd)
            assert os.stat("hard", dir_fd=fd).st_nlink == 2
            os.rename("file", "up", src_dir_fd=fd, dst_dir_fd=top)  # deep -> shallow
            os.rename("up", "file", src_dir_fd=top, dst_dir_fd=fd)  # shallow -> deep
            os.chmod("file", 0o600, dir_fd=fd)
            os.chown("file", 1234, 5678, dir_fd=fd)
            st = os.stat("file", dir_fd=fd)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 1234, 5678)
            assert stat.S_ISFIFO(os.stat("fifo", dir_fd=fd).st_mode)
            assert stat.S_ISREG(os.stat("node", dir_fd=fd).st_mode)
            assert os.readlink("sym", dir_fd=fd) == "file"
            f = os.open("file", os.O_RDWR, dir_fd=fd)
            try:
                assert os.pread(f, 100, 0) == b"deep secret"
                os.ftruncate(f, 4)
                assert os.pread(f, 100, 0) == b"deep"
            finally:
                os.close(f)
            for name in ("hard", "sym", "fifo", "node"):
                os.unlink(name, dir_fd=fd)
            os.rmdir("sub", dir_fd=fd)
            assert sorted(os.listdir(fd)) == ["file"]
            with pytest.raises(OSError) as exc:
                os.rmdir("missing", dir_fd=fd)
            assert exc.value.errno == errno.ENOENT
        finally:
            os.close(fd)
            os.close(top)
        umount(v)
        # the backing file is encrypted, and its entry survives a remount
        fd = walk_down(str(v.backing), create=False)
        try:
            f = os.open("file", os.O_RDONLY, dir_fd=fd)
            assert os.read(f, 100) not in (b"deep", b"")
            os.close(f)
        finally:
            os.close(fd)
        mount(v)
        fd = walk_down(str(v.mountpoint), create=False)
        try:
            f = os.open("file", os.O_RDONLY, dir_fd=fd)
            assert os.read(f, 100) == b"deep"
            os.close(f)
        finally:
            os.close(fd)
