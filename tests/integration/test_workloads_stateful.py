"""The mount behaves like a plain directory under random operations.

A hypothesis state machine applies the same operation to a directory on the mount and
to one on the plain disk, and requires the same outcome (result or errno) from both:
writes at random offsets and sizes (past EOF too, leaving holes of many blocks),
O_APPEND and O_TRUNC rewrites, truncate up and down, fallocate in every mode, rename (files and directories, over existing targets, RENAME_NOREPLACE and
RENAME_EXCHANGE), link, unlink, and open handles that outlive renames and unlinks.
After every step both trees must read the same. The mount is made once for the module; each example gets a fresh
subdirectory, and at the end a remount must read every example's tree back.
"""

from __future__ import annotations

import itertools
import os
import random
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fuse_harness import VaultPaths, make_vault, mount, mounted_at, require_fuse, umount
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from encfs.content import FALLOC_MODES
from encfs.fsops import RENAME_EXCHANGE, RENAME_NOREPLACE, fallocate, renameat2

pytestmark = pytest.mark.fuse

FILES = ("a", "b", "p/a", "p/b", "q/c", "r/d")
DIRS = ("p", "q", "r")
MAX_OFFSET = 150_000
MAX_WRITE = 70_000
FAR_OFFSET = 4 << 20

names = st.sampled_from(FILES)
dirs = st.sampled_from(DIRS)
# small, anywhere in a few blocks, and far: holes of many blocks
offsets = st.one_of(st.integers(0, 64), st.integers(0, MAX_OFFSET),
                    st.integers(MAX_OFFSET, FAR_OFFSET))
sizes = st.one_of(st.integers(0, 40), st.integers(0, MAX_WRITE))
seeds = st.integers(0, 2**32 - 1)
handle_picks = st.integers(0, 1_000)


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


Outcome = tuple[str, object]


def outcome_of(op: Callable[[Path], object], root: Path) -> Outcome:
    try:
        return ("ok", op(root))
    except OSError as exc:
        return ("errno", exc.errno)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: type, and for files size, link count and contents."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st_ = os.lstat(path)
            if stat.S_ISDIR(st_.st_mode):
                found[rel] = ("dir",)
            elif stat.S_ISREG(st_.st_mode):
                found[rel] = ("file", st_.st_size, st_.st_nlink, path.read_bytes())
            else:
                found[rel] = ("other", stat.S_IFMT(st_.st_mode))
    return found


def describe_difference(mine: dict[str, tuple], plain: dict[str, tuple]) -> str:
    lines = []
    for rel in sorted(set(mine) | set(plain)):
        a, b = mine.get(rel), plain.get(rel)
        if a == b:
            continue
        if a is None or b is None:
            lines.append(f"{rel}: mount {a and a[:3]} vs plain {b and b[:3]}")
        elif a[0] != "file" or b[0] != "file" or a[:3] != b[:3]:
            lines.append(f"{rel}: mount {a[:3]} vs plain {b[:3]}")
        else:
            first = next(i for i, (x, y) in enumerate(zip(a[3], b[3], strict=True)) if x != y)
            lines.append(f"{rel}: contents differ from byte {first} of {a[1]}")
    return "; ".join(lines)


class MirrorMachine(RuleBasedStateMachine):
    """Same operations on the mount (roots[0]) and the plain disk (roots[1])."""

    mount_root: Path
    plain_root: Path
    counter: Iterator[int]

    def __init__(self) -> None:
        super().__init__()
        n = next(self.counter)
        self.roots = (self.mount_root / f"ex{n}", self.plain_root / f"ex{n}")
        for root in self.roots:
            root.mkdir()
            for d in DIRS:
                (root / d).mkdir()
        self.handles: list[tuple[int, int]] = []

    # the plain side is the model: it says which names exist
    def existing_files(self) -> list[str]:
        return [n for n in FILES if (self.roots[1] / n).is_file()]

    def existing_dirs(self) -> list[str]:
        return [d for d in DIRS if (self.roots[1] / d).is_dir()]

    def pick_file(self, pick: int) -> str:
        present = self.existing_files()
        return present[pick % len(present)]

    def both(self, op: Callable[[Path], object], what: str) -> Outcome:
        on_mount, on_plain = (outcome_of(op, root) for root in self.roots)
        assert on_mount == on_plain, f"{what}: mount gave {on_mount}, plain dir gave {on_plain}"
        return on_mount

    def each_handle(self, pick: int, op: Callable[[int], object], what: str) -> None:
        pair = self.handles[pick % len(self.handles)]
        on_mount, on_plain = (outcome_of(lambda _r, fd=fd: op(fd), Path()) for fd in pair)
        assert on_mount == on_plain, f"{what}: mount gave {on_mount}, plain dir gave {on_plain}"

    # -- whole-file operations by name ----------------------------------------

    @rule(name=names, offset=offsets, size=sizes, seed=seeds)
    def write_at(self, name: str, offset: int, size: int, seed: int) -> None:
        data = payload(seed, size)

        def op(root: Path) -> int:
            fd = os.open(root / name, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.both(op, f"pwrite {size} bytes at {offset} to {name}")

    @rule(name=names, size=sizes, seed=seeds)
    def append(self, name: str, size: int, seed: int) -> None:
        data = payload(seed, size)

        def op(root: Path) -> int:
            fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(op, f"append {size} bytes to {name}")

    @rule(name=names, size=sizes, seed=seeds)
    def rewrite(self, name: str, size: int, seed: int) -> None:
        data = payload(seed, size)

        def op(root: Path) -> int:
            fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(op, f"O_TRUNC rewrite of {name} with {size} bytes")

    @precondition(lambda self: self.existing_files())
    @rule(pick=handle_picks,
          length=st.one_of(st.integers(0, 40), st.integers(0, MAX_OFFSET + MAX_WRITE)))
    def truncate(self, pick: int, length: int) -> None:
        name = self.pick_file(pick)
        self.both(lambda root: os.truncate(root / name, length), f"truncate {name} to {length}")

    @precondition(lambda self: self.existing_files())
    @rule(pick=handle_picks, dst=names)
    def rename(self, pick: int, dst: str) -> None:
        src = self.pick_file(pick)
        self.both(lambda root: os.rename(root / src, root / dst), f"rename {src} -> {dst}")

    @precondition(lambda self: self.existing_files())
    @rule(pick=handle_picks, dst=st.sampled_from(FILES + DIRS),
          flag=st.sampled_from((RENAME_NOREPLACE, RENAME_EXCHANGE)))
    def rename_with_flag(self, pick: int, dst: str, flag: int) -> None:
        src = self.pick_file(pick)
        self.both(lambda root: renameat2(root / src, root / dst, flag),
                  f"renameat2 {src} -> {dst} flags {flag}")

    @precondition(lambda self: self.existing_dirs())
    @rule(pick=handle_picks, dst=dirs, flag=st.sampled_from((0, RENAME_NOREPLACE, RENAME_EXCHANGE)))
    def rename_dir(self, pick: int, dst: str, flag: int) -> None:
        present = self.existing_dirs()
        src = present[pick % len(present)]
        self.both(lambda root: renameat2(root / src, root / dst, flag),
                  f"rename dir {src} -> {dst} flags {flag}")

    @precondition(lambda self: len(self.existing_dirs()) < len(DIRS))
    @rule(pick=handle_picks)
    def mkdir(self, pick: int) -> None:
        missing = [d for d in DIRS if d not in self.existing_dirs()]
        d = missing[pick % len(missing)]
        self.both(lambda root: os.mkdir(root / d), f"mkdir {d}")

    @precondition(lambda self: self.existing_files())
    @rule(pick=handle_picks, dst=names)
    def link(self, pick: int, dst: str) -> None:
        src = self.pick_file(pick)
        self.both(lambda root: os.link(root / src, root / dst), f"link {src} -> {dst}")

    @precondition(lambda self: self.existing_files())
    @rule(pick=handle_picks)
    def unlink(self, pick: int) -> None:
        name = self.pick_file(pick)
        self.both(lambda root: os.unlink(root / name), f"unlink {name}")

    # -- open handles, which outlive renames and unlinks of their names -------

    @precondition(lambda self: len(self.handles) < 4 and self.existing_files())
    @rule(pick=handle_picks, truncating=st.booleans())
    def open_handle(self, pick: int, truncating: bool) -> None:
        name = self.pick_file(pick)
        flags = os.O_RDWR | (os.O_TRUNC if truncating else 0)
        on_mount, on_plain = (outcome_of(lambda r: os.open(r / name, flags), root)
                              for root in self.roots)
        if on_mount[0] == on_plain[0] == "ok":
            self.handles.append((on_mount[1], on_plain[1]))
            return
        for kind, fd in (on_mount, on_plain):
            if kind == "ok":
                os.close(fd)
        assert on_mount == on_plain, f"open {name}: mount gave {on_mount}, plain dir gave {on_plain}"

    @precondition(lambda self: self.handles)
    @rule(pick=handle_picks, offset=offsets, size=sizes, seed=seeds)
    def handle_write(self, pick: int, offset: int, size: int, seed: int) -> None:
        data = payload(seed, size)
        self.each_handle(pick, lambda fd: os.pwrite(fd, data, offset),
                         f"pwrite {size} at {offset} through a handle")

    @precondition(lambda self: self.handles)
    @rule(pick=handle_picks, offset=offsets, size=sizes)
    def handle_read(self, pick: int, offset: int, size: int) -> None:
        self.each_handle(pick, lambda fd: os.pread(fd, size, offset),
                         f"pread {size} at {offset} through a handle")

    @precondition(lambda self: self.handles)
    @rule(pick=handle_picks, length=st.integers(0, MAX_OFFSET))
    def handle_truncate(self, pick: int, length: int) -> None:
        self.each_handle(pick, lambda fd: os.ftruncate(fd, length), f"ftruncate to {length}")

    @precondition(lambda self: self.handles)
    @rule(pick=handle_picks, mode=st.sampled_from(FALLOC_MODES), offset=offsets,
          length=st.integers(1, MAX_WRITE))
    def handle_fallocate(self, pick: int, mode: int, offset: int, length: int) -> None:
        self.each_handle(pick, lambda fd: fallocate(fd, mode, offset, length),
                         f"fallocate mode {mode:#x} of {length} at {offset}")

    @precondition(lambda self: self.handles)
    @rule(pick=handle_picks)
    def handle_fsync(self, pick: int) -> None:
        self.each_handle(pick, os.fsync, "fsync")
        self.each_handle(pick, lambda fd: os.fstat(fd).st_size, "fstat size")

    @precondition(lambda self: self.handles)
    @rule(pick=handle_picks)
    def close_handle(self, pick: int) -> None:
        for fd in self.handles.pop(pick % len(self.handles)):
            os.close(fd)

    # -- the two trees read the same after every step -------------------------

    @invariant()
    def trees_match(self) -> None:
        mine, plain = (snapshot(root) for root in self.roots)
        assert mine == plain, describe_difference(mine, plain)

    def teardown(self) -> None:
        for pair in self.handles:
            for fd in pair:
                os.close(fd)
        self.handles.clear()


@pytest.fixture(scope="module")
def shared_vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VaultPaths]:
    require_fuse()
    v = make_vault(tmp_path_factory.mktemp("stateful"))
    with mounted_at(v):
        yield v


def test_mount_matches_plain_directory(shared_vault: VaultPaths, tmp_path: Path) -> None:
    mount_root = shared_vault.mountpoint / "stateful"
    plain_root = tmp_path / "plain"
    mount_root.mkdir()
    plain_root.mkdir()

    class Machine(MirrorMachine):
        pass
    Machine.mount_root, Machine.plain_root = mount_root, plain_root
    Machine.counter = itertools.count()

    run_state_machine_as_test(Machine, settings=settings(
        max_examples=40, stateful_step_count=40, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))

    # what the daemon wrote to the backing files decrypts to the same trees after a remount
    umount(shared_vault)
    mount(shared_vault)
    mine, plain = snapshot(mount_root), snapshot(plain_root)
    assert mine == plain, describe_difference(mine, plain)
