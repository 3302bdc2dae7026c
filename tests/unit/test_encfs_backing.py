"""encfs.backing: backing paths of any depth, through directory descriptors."""

from __future__ import annotations

import errno
import os

import pytest

from encfs import content
from encfs.backing import PIECE_MAX, BackingTree, pieces
from encfs.masterkey import MasterKeySource, generate_key_file
from encfs.vault import Vault

NAME = b"n" * 127
DEPTH = 40  # 40 levels of 127-byte names: 5,120 bytes, deeper than PATH_MAX


def deep_dir(tree: BackingTree, depth: int = DEPTH) -> bytes:
    rel = b""
    for _ in range(depth):
        rel = rel + b"/" + NAME if rel else NAME
        tree.mkdir(rel, 0o755)
    return rel


def test_pieces_fit_one_call_and_rejoin():
    rel = b"/".join([NAME] * DEPTH)
    parts = pieces(rel)
    assert len(parts) > 1 and all(len(p) <= PIECE_MAX for p in parts)
    assert b"/".join(parts) == rel
    assert pieces(b"a/b") == [b"a/b"]
    with pytest.raises(OSError) as exc:
        pieces(b"x" * (PIECE_MAX + 1))
    assert exc.value.errno == errno.ENAMETOOLONG


def test_tree_reaches_paths_deeper_than_path_max(tmp_path):
    tree = BackingTree(os.fsencode(tmp_path))
    try:
        top = deep_dir(tree)
        assert len(top) > 4096
        f = top + b"/file"
        fd = tree.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"deep")
        os.close(fd)
        assert tree.is_regular(f) and tree.listdir(top) == [b"file"]
        tree.rename(f, b"shallow")
        tree.rename(b"shallow", f)
        tree.link(f, top + b"/link")
        assert tree.lstat(top + b"/link").st_nlink == 2
        tree.symlink(b"file", top + b"/sym")
        assert tree.readlink(top + b"/sym") == b"file"
        tree.chmod(f, 0o640)
        tree.utime(f, (1, 2))
        st = tree.lstat(f)
        assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o640, 2)
        tree.fsync_dir(top)
        with pytest.raises(FileNotFoundError):
            tree.lstat(top + b"/missing")
        with pytest.raises(FileNotFoundError):
            tree.lstat(top + b"/missing/" + b"/".join([NAME] * 40))
        for name in (b"/file", b"/link", b"/sym"):
            tree.unlink(top + name)
        tree.rmdir(top)
        assert not tree.lexists(top)
        fds_before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            tree.lexists(top + b"/x")
        assert len(os.listdir("/proc/self/fd")) == fds_before  # nothing leaks
    finally:
        tree.close()


def test_vault_operations_at_any_depth(tmp_path):
    key = tmp_path / "k"
    generate_key_file(key)
    source = MasterKeySource.key_file(key)
    # the backing directory's own path eats into PATH_MAX too
    backing = tmp_path / ("b" * 200) / ("c" * 200)
    v = Vault.create(backing, source)
    try:
        top = deep_dir(v.tree)
        a, b = top + b"/a", top + b"/b"
        fd, cipher = v.create(a, os.O_RDWR, 0o644)
        content.write_at(fd, cipher, b"secret " * 100, 0)
        os.close(fd)
        v.link(a, top + b"/hard")
        v.rename(a, b)
        v.rename(b, b"up")
        v.rename(b"up", a)
        v.truncate_to_zero(top + b"/hard")
        v.unlink(top + b"/hard")
        fd = v.tree.open(a, os.O_RDONLY)
        try:
            assert content.read_at(fd, v.cipher_for(a), 1000, 0) == b""
            assert os.pread(fd, 1, 0) == b""
        finally:
            os.close(fd)
        fd, cipher = v.create(b, os.O_RDWR, 0o644)
        content.write_at(fd, cipher, b"plain words", 0)
        os.close(fd)
        # a directory rename moves the deep entries with it
        v.rename(NAME, b"moved")
        moved_b = b"moved" + b[len(NAME):]
        assert v.cipher_for(moved_b) == cipher and b not in v.files.entries
    finally:
        v.close()
    v = Vault.open(backing, source)  # recovery walks the deep entries
    try:
        assert v.recovery.stale == []
        fd = v.tree.open(moved_b, os.O_RDONLY)
        try:
            assert content.read_at(fd, v.cipher_for(moved_b), 100, 0) == b"plain words"
        finally:
            os.close(fd)
    finally:
        v.close()
