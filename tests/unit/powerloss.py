"""Power-loss simulation for the encryption core: record, enumerate, check.

The way RocksDB's FaultInjectionTestFS, SQLite's crash tests and ALICE do it. A test
starts from a vault at rest (everything on it durable), swaps ``encfs.disk`` for a
``Recorder`` (every write, size change, sync, name change and extended attribute the
core makes goes through it, and happens for real too) and runs one operation the way
the mount would, marking what the application was told. ``crash_states`` then works
out, for every point the power could have gone out, every on-disk state the
filesystem may have left, and ``check_states`` materialises each one in a temporary
directory, opens the vault there as the mount does after a crash, and checks
DESIGN.md's invariants against the marks.

The persistence model (a superset of what ext4 ``data=ordered`` can leave; the
numbers in docs/vault-format.md were counted under it):

- File contents. A write or size change of a file is durable once that file is
  fsynced or fdatasynced after it. The ones not yet durable persist as a prefix of
  the file's own sequence of them (a modelling choice, like FaultInjectionTestFS's
  cut at the last synced size: a later write of one file never lands without an
  earlier one of the same file), and the first one left out may be torn: a prefix
  of it, cut at a 512-byte sector boundary (the first, the middle and the last such
  boundary are tried). For the vault's own files (``.tdefs/``) a write that extended the file may
  also land as its new size with zeros for contents (a filesystem that extends the
  size before the data lands). Files are independent of each other and of names:
  any file's unsynced data may persist while another's, or a name, does not.
- Names. A create, mkdir, link, unlink or rename is durable once its directory is
  fsynced after it (a rename between two directories: once either is, as it is one
  atomic change). The ones not yet durable persist as a prefix of their directory's
  sequence, each directory independently (ext4 persists one global prefix of them
  all, which is one of these), a rename between two directories in both or in
  neither. An fsync of a file does not make its name durable.
- Extended attributes. Durable once the file is fsynced (not fdatasynced) after;
  before, a prefix of the file's sequence of changes.
- syncfs makes everything before it durable.

What counts as acknowledged, and which paths must never read as garbage, follows
docs/vault-format.md; each test says it with ``Recorder.begin`` and ``ack``.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import itertools
import os
import random
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from encfs import content, fsck
from encfs.backing import BackingTree
from encfs.disk import CALLS, RENAME_EXCHANGE, RENAME_NOREPLACE, disk
from encfs.errors import Corruption, VaultError
from encfs.masterkey import MasterKeySource
from encfs.vault import META_DIR, Vault

SECTOR = 512
ABSENT = None  # a version of a path: the path does not exist
STATE_CAP = 4000  # crash states checked per case at most (sampled beyond)
_PER_POINT_CAP = 600  # combinations tried per crash point before sampling


# -- the model of a tree --------------------------------------------------------------


@dataclass
class Tree:
    """A backing tree as the model sees it: nodes (files and directories) by id."""

    kind: dict[int, str] = field(default_factory=dict)  # "f" or "d"
    data: dict[int, bytes] = field(default_factory=dict)
    xattrs: dict[int, dict[bytes, bytes]] = field(default_factory=dict)
    dirs: dict[int, dict[bytes, int]] = field(default_factory=dict)

    def copy(self) -> Tree:
        return Tree(dict(self.kind), dict(self.data),
                    {n: dict(x) for n, x in self.xattrs.items()},
                    {n: dict(d) for n, d in self.dirs.items()})

    def signature(self, root: int) -> bytes:
        """What a materialisation of the tree would hold, as a digest."""
        h = hashlib.blake2b(digest_size=16)
        seen: dict[int, int] = {}

        def walk(node: int, path: bytes) -> None:
            for name in sorted(self.dirs[node]):
                child = self.dirs[node][name]
                sub = path + b"/" + name
                h.update(sub + b"\0" + self.kind[child].encode())
                if self.kind[child] == "d":
                    walk(child, sub)
                    continue
                if child in seen:
                    h.update(b"link%d" % seen[child])
                    continue
                seen[child] = len(seen)
                h.update(b"n%d" % child)  # inode identity matters (intents compare it)
                h.update(hashlib.blake2b(self.data[child], digest_size=16).digest())
                for k in sorted(self.xattrs[child]):
                    h.update(k + b"=" + self.xattrs[child][k])

        walk(root, b"")
        return h.digest()


@dataclass(frozen=True)
class Op:
    """One recorded call, in model terms, or a mark of what the application was told."""

    kind: str  # write trunc sync syncall create mkdir link unlink rename xattr mark
    args: tuple
    meta: bool = False  # a write or size change of a file under .tdefs/


def apply(tree: Tree, op: Op, variant: tuple | None = None) -> None:
    a = op.args
    k = op.kind
    if k == "write":
        node, offset, data = a
        cur = tree.data.get(node, b"")  # a file whose name may not have landed
        if variant is not None:
            if variant[0] == "torn":
                data = data[: variant[1]]
            else:  # "zeros": the new size landed, the bytes did not
                end = offset + len(data)
                if end > len(cur):
                    tree.data[node] = cur + bytes(end - len(cur))
                return
        buf = bytearray(cur)
        if offset > len(buf):
            buf += bytes(offset - len(buf))
        buf[offset : offset + len(data)] = data
        tree.data[node] = bytes(buf)
    elif k == "trunc":
        node, size = a
        cur = tree.data.get(node, b"")
        tree.data[node] = cur[:size] if size <= len(cur) else cur + bytes(size - len(cur))
    elif k in ("create", "mkdir"):
        parent, name, node = a
        tree.dirs[parent][name] = node
        tree.kind[node] = "f" if k == "create" else "d"
        tree.xattrs.setdefault(node, {})
        if k == "create":
            tree.data.setdefault(node, b"")
        else:
            tree.dirs.setdefault(node, {})
    elif k == "link":
        parent, name, node = a
        tree.dirs[parent][name] = node
    elif k == "unlink":
        parent, name = a
        del tree.dirs[parent][name]
    elif k == "rename":
        sp, sn, dp, dn, flags = a
        node = tree.dirs[sp][sn]
        if flags & RENAME_EXCHANGE:
            tree.dirs[sp][sn] = tree.dirs[dp][dn]
            tree.dirs[dp][dn] = node
        elif tree.dirs[dp].get(dn) != node:
            del tree.dirs[sp][sn]
            tree.dirs[dp][dn] = node
    elif k == "xattr":
        node, name, value = a
        if value is None:
            tree.xattrs.setdefault(node, {}).pop(name, None)
        else:
            tree.xattrs.setdefault(node, {})[name] = value


def _units(op: Op) -> list[tuple[str, int]]:
    """The sequences an op belongs to: a file's data, a file's xattrs, a directory."""
    a = op.args
    if op.kind in ("write", "trunc"):
        return [("data", a[0])]
    if op.kind == "xattr":
        return [("xattr", a[0])]
    if op.kind in ("create", "mkdir", "link", "unlink"):
        return [("dir", a[0])]
    if op.kind == "rename":
        return [("dir", a[0])] if a[0] == a[2] else [("dir", a[0]), ("dir", a[2])]
    return []


def _covered_units(op: Op) -> list[tuple[str, int]]:
    """What a sync makes durable: an fsync of a directory its entries, of a file its
    data (and, unless fdatasync, its extended attributes)."""
    node, is_dir, full, _ = op.args
    if is_dir:
        return [("dir", node)]
    return [("data", node), ("xattr", node)] if full else [("data", node)]


# -- recording --------------------------------------------------------------------------


def _path(p: object) -> bytes:
    return os.fsencode(p)  # type: ignore[arg-type]


class Recorder:
    """Stands in for ``encfs.disk``: does each call for real and logs it in model
    terms. ``snapshot`` first takes the tree as it is (all of it durable)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fsencode(os.path.abspath(root))
        self.ops: list[Op] = []
        self.tree = Tree()
        self.ino: dict[int, int] = {}  # node -> inode number it had when recorded
        self._node_of_ino: dict[int, int] = {}
        self._next = 0
        self.root_node = self._walk_in()
        self._dict_path = os.path.join(self.root, META_DIR.encode(), b"files.dict")
        self._meta_prefix = os.path.join(self.root, META_DIR.encode(), b"")
        # one thread: the order of the log is the order of the calls (a background
        # rewrite of files.dict would interleave with it unseen)
        self._thread = threading.get_ident()

    # -- the starting state

    def _new_node(self, ino: int) -> int:
        self._next += 1
        self._node_of_ino[ino] = self._next
        self.ino[self._next] = ino
        return self._next

    def _walk_in(self) -> int:
        tree = self.tree

        def visit(path: bytes) -> int:
            st = os.lstat(path)
            if st.st_ino in self._node_of_ino:
                return self._node_of_ino[st.st_ino]
            node = self._new_node(st.st_ino)
            tree.xattrs[node] = {os.fsencode(n): os.getxattr(path, n, follow_symlinks=False)
                                 for n in os.listxattr(path, follow_symlinks=False)
                                 if n.startswith("user.")}
            if stat.S_ISDIR(st.st_mode):
                tree.kind[node] = "d"
                tree.dirs[node] = {name: visit(os.path.join(path, name))
                                   for name in sorted(os.listdir(path))}
            elif stat.S_ISREG(st.st_mode):
                tree.kind[node] = "f"
                with open(path, "rb") as f:
                    tree.data[node] = f.read()
            else:
                raise NotImplementedError(f"the model has no {path!r} (not a file or directory)")
            return node

        return visit(self.root)

    # -- identities

    def _node_at(self, path: bytes, dir_fd: int | None = None) -> int:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
        return self._node_of_ino[st.st_ino]

    def _node_of_fd(self, fd: int) -> int:
        return self._node_of_ino[os.fstat(fd).st_ino]

    def _parent(self, path: object, dir_fd: int | None) -> tuple[int, bytes]:
        p = _path(path)
        head, _, name = p.rpartition(b"/")
        if not head and p.startswith(b"/"):
            head = b"/"
        return self._node_at(head or b".", dir_fd), name

    def _log(self, kind: str, *args: object, meta: bool = False) -> None:
        if threading.get_ident() != self._thread:
            raise RuntimeError("the recorder takes calls from the thread that made it only")
        self.ops.append(Op(kind, args, meta))

    # -- the calls of encfs.disk

    def open(self, path, flags, mode=0o777, *, dir_fd=None):  # noqa: ANN001, ANN201
        truncates = flags & os.O_TRUNC and (flags & os.O_ACCMODE) != os.O_RDONLY
        if not (flags & os.O_CREAT or truncates):
            return CALLS["open"](path, flags, mode, dir_fd=dir_fd)
        try:
            os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
            existed = True
        except FileNotFoundError:
            existed = False
        fd = CALLS["open"](path, flags, mode, dir_fd=dir_fd)
        if not existed:
            parent, name = self._parent(path, dir_fd)
            node = self._new_node(os.fstat(fd).st_ino)
            self._log("create", parent, name, node)
        elif flags & os.O_TRUNC:
            self._log("trunc", self._node_of_fd(fd), 0, meta=self._in_meta(fd))
        return fd

    def _in_meta(self, fd: int) -> bool:
        """Is ``fd`` one of the vault's own files (under .tdefs/)?"""
        return os.readlink(b"/proc/self/fd/%d" % fd).startswith(self._meta_prefix)

    def write(self, fd, data):  # noqa: ANN001, ANN201
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            offset = os.fstat(fd).st_size
        else:
            offset = os.lseek(fd, 0, os.SEEK_CUR)
        n = CALLS["write"](fd, data)
        self._log("write", self._node_of_fd(fd), offset, bytes(data[:n]), meta=self._in_meta(fd))
        return n

    def pwrite(self, fd, data, offset):  # noqa: ANN001, ANN201
        n = CALLS["pwrite"](fd, data, offset)
        self._log("write", self._node_of_fd(fd), offset, bytes(data[:n]), meta=self._in_meta(fd))
        return n

    def ftruncate(self, fd, length):  # noqa: ANN001, ANN201
        CALLS["ftruncate"](fd, length)
        self._log("trunc", self._node_of_fd(fd), length, meta=self._in_meta(fd))

    def fallocate(self, fd, mode, offset, length):  # noqa: ANN001, ANN201
        raise NotImplementedError("the power-loss model has no fallocate")

    def _sync(self, name: str, fd: int, full: bool) -> None:
        # not passed on: what a sync makes durable is the model's business, and the
        # real one would only cost time
        st = os.fstat(fd)
        node = self._node_of_ino[st.st_ino]
        try:
            is_log = os.stat(self._dict_path).st_ino == st.st_ino
        except FileNotFoundError:
            is_log = False
        self._log("sync", node, stat.S_ISDIR(st.st_mode), full, is_log)

    def syncfs(self, fd):  # noqa: ANN001, ANN201
        self._log("syncall")  # what it makes durable is the model's business

    def fsync(self, fd):  # noqa: ANN001, ANN201
        self._sync("fsync", fd, True)

    def fdatasync(self, fd):  # noqa: ANN001, ANN201
        self._sync("fdatasync", fd, False)

    def _rename(self, flags: int, src, dst, src_dir_fd, dst_dir_fd) -> None:  # noqa: ANN001
        sp, sn = self._parent(src, src_dir_fd)
        dp, dn = self._parent(dst, dst_dir_fd)
        if flags:
            CALLS["renameat2"](_path(src), _path(dst), flags, src_dir_fd=src_dir_fd,
                               dst_dir_fd=dst_dir_fd)
        else:
            CALLS["rename"](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        self._log("rename", sp, sn, dp, dn, flags & ~RENAME_NOREPLACE)

    def rename(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None):  # noqa: ANN001, ANN201
        self._rename(0, src, dst, src_dir_fd, dst_dir_fd)

    def renameat2(self, src, dst, flags, *, src_dir_fd=None, dst_dir_fd=None):  # noqa: ANN001, ANN201
        self._rename(flags, src, dst, src_dir_fd, dst_dir_fd)

    def link(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None, follow_symlinks=True):  # noqa: ANN001, ANN201
        node = self._node_at(_path(src), src_dir_fd)
        dp, dn = self._parent(dst, dst_dir_fd)
        CALLS["link"](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd,
                      follow_symlinks=follow_symlinks)
        self._log("link", dp, dn, node)

    def unlink(self, path, *, dir_fd=None):  # noqa: ANN001, ANN201
        parent, name = self._parent(path, dir_fd)
        CALLS["unlink"](path, dir_fd=dir_fd)
        self._log("unlink", parent, name)

    def rmdir(self, path, *, dir_fd=None):  # noqa: ANN001, ANN201
        parent, name = self._parent(path, dir_fd)
        CALLS["rmdir"](path, dir_fd=dir_fd)
        self._log("unlink", parent, name)

    def mkdir(self, path, mode=0o777, *, dir_fd=None):  # noqa: ANN001, ANN201
        CALLS["mkdir"](path, mode, dir_fd=dir_fd)
        parent, name = self._parent(path, dir_fd)
        node = self._new_node(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_ino)
        self._log("mkdir", parent, name, node)

    def setxattr(self, target, name, value, flags=0, *, follow_symlinks=True):  # noqa: ANN001, ANN201
        if not isinstance(target, int):
            raise NotImplementedError("the recorder takes extended attributes on descriptors")
        CALLS["setxattr"](target, name, value, flags)
        self._log("xattr", self._node_of_fd(target), os.fsencode(name), bytes(value))

    def removexattr(self, target, name, *, follow_symlinks=True):  # noqa: ANN001, ANN201
        if not isinstance(target, int):
            raise NotImplementedError("the recorder takes extended attributes on descriptors")
        CALLS["removexattr"](target, name)
        self._log("xattr", self._node_of_fd(target), os.fsencode(name), None)

    # -- what the application was told (the oracle)

    def begin(self, name: str, versions: dict[bytes, list[bytes | None]]) -> None:
        """An operation named ``name`` (unique in the recording) starts; until
        acknowledged, each path may read as any of ``versions`` (besides what it was
        acknowledged as before)."""
        if any(op.kind == "mark" and op.args[:2] == ("begin", name) for op in self.ops):
            raise ValueError(f"operation {name!r} began already")
        self._log("mark", "begin", name, {p: list(v) for p, v in versions.items()})

    def end(self, name: str) -> None:
        """The vault's call for operation ``name`` returned."""
        self._log("mark", "end", name)

    def ack(self, states: dict[bytes, bytes | None]) -> None:
        """The application was told these paths are durable with these contents."""
        self._log("mark", "ack", dict(states))

    def is_log_sync(self, op: Op) -> bool:
        return op.kind == "syncall" or (op.kind == "sync" and op.args[3])


# -- the oracle -------------------------------------------------------------------------


@dataclass(frozen=True)
class Expectation:
    """What each known path may read as after a crash at one point."""

    exact: tuple[tuple[bytes, bytes | None], ...]  # acknowledged: exactly this
    acked: tuple[bytes, ...]  # acknowledged by the recorded operation (not at rest before)
    loose: tuple[tuple[bytes, tuple[bytes | None, ...]], ...]  # any of these (sector-wise)
    exempt: tuple[bytes, ...]  # no promise (ordered mode, after the last sync)


def expectation(rec: Recorder, k: int, initial: dict[bytes, bytes], strict: bool) -> Expectation:
    exact: dict[bytes, bytes | None] = dict(initial)
    acked: set[bytes] = set()
    loose: dict[bytes, list[bytes | None]] = {}
    ended: dict[str, int] = {}
    touches: dict[str, list[bytes]] = {}
    last_sync = -1
    for i, op in enumerate(rec.ops[:k]):
        if rec.is_log_sync(op):
            last_sync = i
        if op.kind != "mark":
            continue
        what = op.args[0]
        if what == "begin":
            _, name, versions = op.args
            touches[name] = list(versions)
            for p, vs in versions.items():
                before = [exact.pop(p)] if p in exact else loose.pop(p, [])
                loose[p] = [*before, *vs]
        elif what == "end":
            ended[op.args[1]] = i
        elif what == "ack":
            for p, v in op.args[1].items():
                loose.pop(p, None)
                exact[p] = v
                acked.add(p)
    exempt: set[bytes] = set()
    if not strict:
        # docs/vault-format.md, "ordered": the invariants hold for the operations made
        # before the last sync of the log, not for later ones
        for name, paths in touches.items():
            if ended.get(name, k) > last_sync:
                exempt.update(p for p in paths if p not in exact)
    return Expectation(tuple(sorted(exact.items())), tuple(sorted(acked)),
                       tuple(sorted((p, tuple(v)) for p, v in loose.items() if p not in exempt)),
                       tuple(sorted(exempt)))


# -- enumerating crash states -------------------------------------------------------------


def _tears(op: Op) -> list[tuple]:
    """How the first write of a file left out may have landed in part."""
    if op.kind != "write":
        return []
    _, offset, data = op.args
    end = offset + len(data)
    cuts = list(range((offset // SECTOR + 1) * SECTOR, end, SECTOR))
    picks = sorted({cuts[0], cuts[len(cuts) // 2], cuts[-1]}) if cuts else []
    variants: list[tuple] = [("torn", c - offset) for c in picks]
    if op.meta:
        variants.append(("zeros",))
    return variants


@dataclass
class CrashState:
    tree: Tree
    signature: bytes
    expectations: set[Expectation]
    points: set[int]


def crash_states(rec: Recorder, initial: dict[bytes, bytes], strict: bool,
                 cap: int = STATE_CAP, seed: int = 1) -> tuple[list[CrashState], int, bool]:
    """Every distinct on-disk state a power cut at any point of the recording could
    leave, each with what must read right in it. Returns them, the number of (point,
    combination) cases they came from, and whether any were left out: combinations
    sampled at a point with more than _PER_POINT_CAP, states beyond ``cap``."""
    ops = rec.ops
    rng = random.Random(seed)
    base = rec.tree
    states: dict[bytes, CrashState] = {}
    combos = 0
    sampled = False
    for k in range(len(ops) + 1):
        if k and ops[k - 1].kind == "mark" and k < len(ops):
            continue  # a crash between two marks is the crash after the op before them
        exp = expectation(rec, k, initial, strict)
        seq: dict[tuple[str, int], list[int]] = {}
        durable: dict[tuple[str, int], int] = {}
        for i in range(k):
            op = ops[i]
            for u in _units(op):
                seq.setdefault(u, []).append(i)
            if op.kind == "sync":
                for u in _covered_units(op):
                    if u in seq:
                        durable[u] = len(seq[u])
            elif op.kind == "syncall":
                durable.update((u, len(s)) for u, s in seq.items())
        # an op made durable through one of its directories is so in the other too
        changed = True
        while changed:
            changed = False
            for u, idx in seq.items():
                if u[0] != "dir":
                    continue
                for pos in range(durable.get(u, 0)):
                    for v in _units(ops[idx[pos]]):
                        need = seq[v].index(idx[pos]) + 1
                        if durable.get(v, 0) < need:
                            durable[v] = need
                            changed = True
        choices: list[list[tuple]] = []
        keys = [u for u in seq if durable.get(u, 0) < len(seq[u])]
        for u in keys:
            lo, n = durable.get(u, 0), len(seq[u])
            opts: list[tuple] = [(c, None) for c in range(lo, n + 1)]
            if u[0] == "data":
                opts += [(c, v) for c in range(lo, n) for v in _tears(ops[seq[u][c]])]
            choices.append(opts)
        total = 1
        for c in choices:
            total *= len(c)
        if total <= _PER_POINT_CAP:
            picked: Iterator[tuple] = itertools.product(*choices)
        else:
            picked = _sample(choices, rng)
            sampled = True
        for pick in picked:
            cut = dict(zip(keys, pick, strict=True))
            keep: set[int] = set()
            partial: dict[int, tuple] = {}
            for u in seq:
                c, variant = cut.get(u, (len(seq[u]), None))
                keep.update(seq[u][:c])
                if variant is not None:
                    partial[seq[u][c]] = variant
            if not _consistent(ops, seq, cut):
                continue
            combos += 1
            tree = base.copy()
            for i in range(k):
                op = ops[i]
                if op.kind in ("sync", "syncall", "mark"):
                    continue
                if i in keep:
                    apply(tree, op)
                elif i in partial:
                    apply(tree, op, partial[i])
            sig = tree.signature(rec.root_node)
            st = states.get(sig)
            if st is None:
                if len(states) >= cap:
                    sampled = True
                    continue
                st = states[sig] = CrashState(tree, sig, set(), set())
            st.expectations.add(exp)
            st.points.add(k)
    return list(states.values()), combos, sampled


def _consistent(ops: list[Op], seq: dict, cut: dict) -> bool:
    """A rename between two directories lands in both or in neither."""
    for u, idx in seq.items():
        if u[0] != "dir":
            continue
        c = cut.get(u, (len(idx), None))[0]
        for pos, i in enumerate(idx):
            units = _units(ops[i])
            if len(units) < 2:
                continue
            other = units[1] if units[0] == u else units[0]
            oc = cut.get(other, (len(seq[other]), None))[0]
            if (pos < c) != (seq[other].index(i) < oc):
                return False
    return True


def _sample(choices: list[list[tuple]], rng: random.Random) -> Iterator[tuple]:
    """The extremes, every single deviation from them, then random combinations."""
    lo = tuple(c[0] for c in choices)
    hi = tuple(c[-1] for c in choices)
    yield lo
    yield hi
    for base in (lo, hi):
        for j, opts in enumerate(choices):
            for o in opts:
                yield base[:j] + (o,) + base[j + 1 :]
    for _ in range(_PER_POINT_CAP):
        yield tuple(rng.choice(c) for c in choices)


# -- checking one state -------------------------------------------------------------------


def materialise(tree: Tree, root_node: int, into: str, ino_map: dict[int, int],
                recorded_ino: dict[int, int]) -> None:
    """Write ``tree`` out below ``into``; ``ino_map`` gets new inode -> recorded one."""
    made: dict[int, bytes] = {}

    def write(node: int, path: bytes) -> None:
        for name in sorted(tree.dirs[node]):
            child = tree.dirs[node][name]
            sub = os.path.join(path, name)
            if tree.kind[child] == "d":
                os.mkdir(sub)
                write(child, sub)
            elif child in made:
                os.link(made[child], sub)
            else:
                with open(sub, "wb") as f:
                    f.write(tree.data[child])
                made[child] = sub
            if child not in made or made[child] == sub:
                for k, v in tree.xattrs.get(child, {}).items():
                    os.setxattr(sub, k, v)
            ino_map[os.lstat(sub).st_ino] = recorded_ino[child]

    write(root_node, os.fsencode(into))


class _Translated:
    """An lstat result whose inode number is the one the file had when recorded: a
    power cut keeps inode numbers, a materialised copy cannot."""

    def __init__(self, st: os.stat_result, ino: int) -> None:
        self._st = st
        self.st_ino = ino

    def __getattr__(self, name: str) -> object:
        return getattr(self._st, name)


@functools.cache
def _scratch() -> str | None:
    """Where to materialise states: a tmpfs when it keeps user extended attributes
    (thousands of small trees made and removed; nothing there needs to be durable),
    else the default temporary directory."""
    shm = "/dev/shm"
    try:
        probe = tempfile.mkdtemp(prefix="tdefs-powerloss-", dir=shm)
    except OSError:
        return None
    try:
        os.setxattr(probe, "user.tdefs.probe", b"1")
        return shm
    except OSError:
        return None
    finally:
        shutil.rmtree(probe, ignore_errors=True)


class Volatile:
    """``encfs.disk`` without its syncs, for checking states in throwaway copies."""

    def __init__(self) -> None:
        self.__dict__.update(CALLS)
        for name in ("fsync", "fdatasync", "syncfs"):
            setattr(self, name, _no_sync)


def _no_sync(fd: int) -> None:
    return None


@contextmanager
def _inode_numbers(ino_map: dict[int, int]) -> Iterator[None]:
    real = BackingTree.lstat

    def lstat(self: BackingTree, rel: bytes) -> object:
        st = real(self, rel)
        ino = ino_map.get(st.st_ino)
        return st if ino is None else _Translated(st, ino)

    BackingTree.lstat = lstat  # type: ignore[method-assign]
    try:
        yield
    finally:
        BackingTree.lstat = real  # type: ignore[method-assign]


def _explained(got: bytes, versions: tuple[bytes | None, ...]) -> bool:
    """Is every sector of ``got`` the same sector of one of ``versions`` (or zeros)?"""
    candidates = [v for v in versions if v is not None]
    if not candidates or len(got) > max(len(v) for v in candidates):
        return False
    for at in range(0, len(got), SECTOR):
        piece = got[at : at + SECTOR]
        if piece.count(0) == len(piece):
            continue
        if not any(v[at : at + len(piece)] == piece for v in candidates):
            return False
    return True


def _read(vault: Vault, rel: bytes) -> bytes | None:
    try:
        st = vault.tree.lstat(rel)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return b"<not a file>"
    fd = vault.tree.open(rel, os.O_RDONLY)
    try:
        return content.read_at(fd, vault.cipher_for(rel), st.st_size, 0)
    finally:
        os.close(fd)


def check_state(state: CrashState, rec: Recorder, source: MasterKeySource,
                opener: Callable[[Vault], None] | None = None) -> list[str]:
    """Materialise ``state``, open the vault there, check every expectation, then
    run ``tdefs fsck``'s check on what recovery left; returns the problems found
    (empty: the state is fine)."""
    problems: list[str] = []
    exempt = {p for exp in state.expectations for p in exp.exempt}
    where = tempfile.mkdtemp(prefix="tdefs-powerloss-", dir=_scratch())
    try:
        ino_map: dict[int, int] = {}
        materialise(state.tree, rec.root_node, where, ino_map, rec.ino)
        with _inode_numbers(ino_map), disk.replaced_by(Volatile()):
            try:
                vault = Vault.open(where, source)
            except (Corruption, VaultError, OSError) as exc:
                return [f"the vault does not open: {exc}"]
            try:
                if opener is not None:
                    opener(vault)
                if vault.files.pending_intents():
                    problems.append("intents still pending after recovery")
                known: set[bytes] = set()
                for exp in state.expectations:
                    problems += _check_expectation(vault, exp)
                    known.update(p for p, _ in exp.exact)
                    known.update(p for p, _ in exp.loose)
                    known.update(exp.exempt)
                for rel in vault.tree.walk_files(skip=vault.metadata_names()):
                    if rel not in known:
                        problems.append(f"{rel!r}: a file nobody made")
            finally:
                vault.close()
            report = fsck.check(where, source)
        if report.corruption or report.missing_keys or report.salvage:
            problems.append(f"fsck: {report.corruption or report.missing_keys or 'salvaged'}")
        problems += [f"{rel!r}: fsck finds ciphertext without an entry"
                     for rel in report.suspect if rel not in exempt]
    finally:
        shutil.rmtree(where, ignore_errors=True)
    return sorted(set(problems))


def _check_expectation(vault: Vault, exp: Expectation) -> list[str]:
    problems = []
    for rel, want in exp.exact:
        got = _read(vault, rel)
        if got != want:
            problems.append(f"{rel!r}: acknowledged as {_short(want)}, reads {_short(got)}")
        elif got and rel in exp.acked and vault.copies.enabled and vault.files.get(rel) is not None:
            fd = vault.tree.open(rel, os.O_RDONLY)
            try:
                copy = vault.copies.read(fd)
            finally:
                os.close(fd)
            if copy != vault.files.get(rel):
                problems.append(f"{rel!r}: acknowledged, but its per-file copy says {copy!r}")
    for rel, versions in exp.loose:
        got = _read(vault, rel)
        if got is None:
            if ABSENT not in versions:
                problems.append(f"{rel!r}: missing (may read as {[_short(v) for v in versions]})")
        elif not _explained(got, versions):
            problems.append(f"{rel!r}: reads {_short(got)}, none of {[_short(v) for v in versions]}")
    return problems


def _short(v: bytes | None) -> str:
    if v is None:
        return "absent"
    return repr(v[:12]) + (f"..({len(v)} bytes)" if len(v) > 12 else "")


def check_states(states: list[CrashState], rec: Recorder, source: MasterKeySource,
                 opener: Callable[[Vault], None] | None = None) -> list[str]:
    """Every state checked; the problems of each bad one, with the crash points."""
    failures = []
    for st in states:
        found = check_state(st, rec, source, opener)
        if found:
            failures.append(f"crash after op {sorted(st.points)[:4]}: " + "; ".join(found))
    return failures


def describe(rec: Recorder, upto: int | None = None) -> str:
    """The recorded ops, one a line (for failure messages)."""
    lines = []
    for i, op in enumerate(rec.ops[:upto]):
        if op.kind == "mark":
            paths = op.args[-1] if isinstance(op.args[-1], dict) else {}
            label = " ".join(a for a in op.args[:2] if isinstance(a, str))
            lines.append(f"{i:3} -- {label} {sorted(paths)}")
            continue
        args = tuple(a if not isinstance(a, bytes) or len(a) < 24 else f"<{len(a)} bytes>"
                     for a in op.args)
        lines.append(f"{i:3} {op.kind} {args}")
    return "\n".join(lines)




# case -> (crash states checked, combinations they came from, calls recorded, whether
# sampled); tests/unit/conftest.py prints it at the end of the run
STATE_COUNTS: dict[str, tuple[int, int, int, bool]] = {}
