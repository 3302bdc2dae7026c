"""Scenarios for the encfs crash tests.

Each scenario has a ``setup`` (run in the test process, failpoints unarmed) that builds
a vault and returns the tree's plaintext before the operation and what it must be
after it, and an ``op`` that performs the one operation. The test runs
``python encfs_crash_driver.py SCENARIO BACKING KEYFILE`` in a child with a failpoint
armed; the child opens the vault, runs ``op`` and dies at the failpoint.
"""

from __future__ import annotations

import os
import random
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from encfs import content  # noqa: E402
from encfs.fsops import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2  # noqa: E402
from encfs.masterkey import MasterKeySource  # noqa: E402
from encfs.reencrypt import Reencryptor  # noqa: E402
from encfs.sync_points import hooked  # noqa: E402
from encfs.vault import INIT_DIR, META_DIR, Vault  # noqa: E402

State = dict[str, bytes]


def body(name: str) -> bytes:
    """Distinct, non-trivial contents, so a file read with the wrong cipher shows."""
    return (f"contents of {name} ".encode() * 40)[:700]


def write_file(vault: Vault, rel: str, data: bytes) -> None:
    fd, cipher = vault.create(rel.encode(), os.O_RDWR | os.O_CLOEXEC, 0o644)
    try:
        content.write_at(fd, cipher, data, 0)
    finally:
        os.close(fd)


def read_tree(vault: Vault) -> State:
    """Every regular file of the vault, decrypted with the cipher the vault gives it."""
    root = os.fsencode(vault.root)
    state: State = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root:
            dirnames[:] = [d for d in dirnames if d not in (META_DIR.encode(), INIT_DIR.encode())]
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not stat.S_ISREG(os.lstat(full).st_mode):
                continue
            rel = os.path.relpath(full, root)
            fd = os.open(full, os.O_RDONLY)
            try:
                state[os.fsdecode(rel)] = content.read_at(fd, vault.cipher_for(rel), 1 << 20, 0)
            finally:
                os.close(fd)
    return state


@dataclass
class Scenario:
    setup: Callable[[Vault], tuple[State, State]]
    op: Callable[[Vault], None]


def _files(vault: Vault, state: State) -> State:
    for rel, data in state.items():
        parent = os.path.dirname(rel)
        if parent:
            os.makedirs(vault.root / parent, exist_ok=True)
        write_file(vault, rel, data)
    return dict(state)


def _setup_with(before: State, after: State, dirs: tuple[str, ...] = ()) -> Callable[[Vault], tuple[State, State]]:
    def setup(vault: Vault) -> tuple[State, State]:
        for d in dirs:
            os.makedirs(vault.root / d, exist_ok=True)
        _files(vault, before)
        return dict(before), dict(after)

    return setup


K = body("keep")
A, B, X, Y = body("a"), body("b"), body("d/x"), body("d/sub/y")
M1, M2 = b"MANIFEST-000001\n" * 30, b"MANIFEST-000002\n" * 30


def _setup_rewrite(vault: Vault) -> tuple[State, State]:
    # many records for few live entries: the log a rewrite compacts
    for i in range(30):
        write_file(vault, f"tmp{i}", body(f"tmp{i}"))
        vault.unlink(f"tmp{i}".encode())
    state = _files(vault, {"keep": K, "a": A})
    return state, dict(state)


def _setup_reencrypt(vault: Vault) -> tuple[State, State]:
    """Files under key 1 (one of them with two names, one sparse), a file from before
    the vault (no entry), then a new active key: all of them are to be rewritten."""
    state = _files(vault, {"a": A, "keep": K, "h1": B})
    vault.link(b"h1", b"h2")
    state["h2"] = B
    fd, cipher = vault.create(b"sparse", os.O_RDWR | os.O_CLOEXEC, 0o644)
    try:
        content.write_at(fd, cipher, b"end", 300_000)
    finally:
        os.close(fd)
    state["sparse"] = bytes(300_000) + b"end"
    (vault.root / "legacy").write_bytes(b"from before the vault " * 20)
    state["legacy"] = b"from before the vault " * 20
    vault.keys.rotate()
    return state, dict(state)


def _rewrite_racing_writers(vault: Vault) -> None:
    """A rewrite while writers append: they create, unlink and rename (here, from the
    rewrite's own thread, right after it read the log: deterministic)."""

    def writers() -> None:
        write_file(vault, "new", body("new"))
        vault.unlink(b"a")
        vault.rename(b"keep", b"kept")

    with hooked("dict.rewrite.after-read", writers):
        vault.files.rewrite()


def reencrypt_all(vault: Vault) -> None:
    """What the daemon's re-encryption does, without a mount: every file, in turn."""
    reencryptor = Reencryptor(vault)
    reencryptor.recover()
    for job in reencryptor.pending():
        reencryptor.switch(reencryptor.copy(job))


SCENARIOS: dict[str, Scenario] = {
    "create": Scenario(
        _setup_with({"keep": K}, {"keep": K, "new": b""}),
        lambda v: os.close(v.create(b"new", os.O_WRONLY | os.O_CLOEXEC, 0o644)[0]),
    ),
    "unlink": Scenario(
        _setup_with({"a": A, "keep": K}, {"keep": K}),
        lambda v: v.unlink(b"a"),
    ),
    # the engine's "write CURRENT.tmp, rename over CURRENT"
    "rename_over": Scenario(
        _setup_with({"CURRENT": M1, "CURRENT.tmp": M2, "keep": K}, {"CURRENT": M2, "keep": K}),
        lambda v: v.rename(b"CURRENT.tmp", b"CURRENT"),
    ),
    "rename_new": Scenario(
        _setup_with({"a": A, "keep": K}, {"sub/b": A, "keep": K}, dirs=("sub",)),
        lambda v: v.rename(b"a", b"sub/b"),
    ),
    "rename_dir": Scenario(
        _setup_with({"d/x": X, "d/sub/y": Y, "keep": K}, {"e/x": X, "e/sub/y": Y, "keep": K},
                    dirs=("e",)),
        lambda v: v.rename(b"d", b"e"),
    ),
    "exchange": Scenario(
        _setup_with({"a": A, "b": B}, {"a": B, "b": A}),
        lambda v: v.rename(b"a", b"b", RENAME_EXCHANGE),
    ),
    "exchange_dir": Scenario(
        _setup_with({"d/x": X, "e/y": Y}, {"d/y": Y, "e/x": X}),
        lambda v: v.rename(b"d", b"e", RENAME_EXCHANGE),
    ),
    "noreplace": Scenario(
        _setup_with({"a": A, "keep": K}, {"b": A, "keep": K}),
        lambda v: v.rename(b"a", b"b", RENAME_NOREPLACE),
    ),
    "link": Scenario(
        _setup_with({"a": A}, {"a": A, "b": A}),
        lambda v: v.link(b"a", b"b"),
    ),
    "truncate": Scenario(
        _setup_with({"a": A, "keep": K}, {"a": b"", "keep": K}),
        lambda v: v.truncate_to_zero(b"a"),
    ),
    "rewrite": Scenario(_setup_rewrite, lambda v: v.files.rewrite()),
    "rewrite_racing": Scenario(
        _setup_with({"a": A, "keep": K}, {"kept": K, "new": body("new")}),
        _rewrite_racing_writers),
    "rotate": Scenario(
        _setup_with({"a": A, "keep": K}, {"a": A, "keep": K}),
        lambda v: v.keys.rotate(),
    ),
    "reencrypt": Scenario(_setup_reencrypt, reencrypt_all),
    # master key rotation; the new key file is the old one's name + ".new"
    "reseal": Scenario(
        _setup_with({"a": A, "keep": K}, {"a": A, "keep": K}),
        lambda v: v.keys.reseal(MasterKeySource.key_file(NEW_KEY)),
    ),
}
NEW_KEY = ""


# -- random sequences: the same operations on a vault and on a plain directory -------

RANDOM_NAMES = ["f", "g", "h", "d/f", "d/g", "e/f", "e/g"]
RANDOM_START: list[tuple] = [("mkdir", "d"), ("mkdir", "e"), ("write", "f", body("f")),
                             ("write", "d/f", body("d/f")), ("write", "e/g", body("e/g"))]


def random_ops(seed: int, n: int) -> list[tuple]:
    rng = random.Random(seed)
    ops = list(RANDOM_START)
    for i in range(n):
        kind = rng.choice(["write", "write", "rename", "rename", "rename", "link", "unlink",
                           "truncate", "rename_dir"])
        a, b = rng.choice(RANDOM_NAMES), rng.choice(RANDOM_NAMES)
        if kind == "write":
            ops.append(("write", a, body(f"{a}#{seed}.{i}")[: rng.randint(1, 700)]))
        elif kind == "rename":
            ops.append(("rename", a, b, rng.choice([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])))
        elif kind == "rename_dir":
            ops.append(("rename", *rng.sample(["d", "e", "x"], 2), rng.choice([0, RENAME_EXCHANGE])))
        elif kind == "link":
            ops.append(("link", a, b))
        else:
            ops.append((kind, a))
    return ops


def apply_vault(vault: Vault, op: tuple) -> None:
    kind, *args = op
    if kind == "mkdir":
        os.mkdir(vault.root / args[0])
    elif kind == "write":
        fd, cipher = vault.create(args[0].encode(), os.O_RDWR | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            content.write_at(fd, cipher, args[1], 0)
        finally:
            os.close(fd)
    elif kind == "rename":
        vault.rename(args[0].encode(), args[1].encode(), args[2])
    elif kind == "link":
        vault.link(args[0].encode(), args[1].encode())
    elif kind == "unlink":
        vault.unlink(args[0].encode())
    elif kind == "truncate":
        if not stat.S_ISREG(os.lstat(vault.root / args[0]).st_mode):
            raise IsADirectoryError(21, "not a file")
        vault.truncate_to_zero(args[0].encode())


def apply_plain(root: Path, op: tuple) -> None:
    kind, *args = op
    if kind == "mkdir":
        os.mkdir(root / args[0])
    elif kind == "write":
        fd = os.open(root / args[0], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, args[1])
        finally:
            os.close(fd)
    elif kind == "rename":
        renameat2(root / args[0], root / args[1], args[2])
    elif kind == "link":
        os.link(root / args[0], root / args[1], follow_symlinks=False)
    elif kind == "unlink":
        os.unlink(root / args[0])
    elif kind == "truncate":
        if not stat.S_ISREG(os.lstat(root / args[0]).st_mode):
            raise IsADirectoryError(21, "not a file")
        os.truncate(root / args[0], 0)


def hard_links(root: Path, rel: str) -> set[str]:
    """Names under ``root`` of the regular file at ``rel`` (empty if there is none)."""
    try:
        st = os.lstat(root / rel)
    except OSError:
        return set()
    if not stat.S_ISREG(st.st_mode):
        return set()
    names = set()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath, name)
            if os.lstat(full).st_ino == st.st_ino:
                names.add(str(full.relative_to(root)))
    return names


def plain_tree(root: Path) -> State:
    state: State = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath, name)
            state[str(full.relative_to(root))] = full.read_bytes()
    return state


def run_random(seed: int, n: int, backing: str, source: MasterKeySource, progress: str) -> None:
    """Apply the sequence; after each operation append its index to ``progress``."""
    vault = Vault.open(backing, source)
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for i, op in enumerate(random_ops(seed, n)):
        try:
            apply_vault(vault, op)
        except OSError:
            pass  # the plain directory fails the same operation the same way
        os.write(fd, f"{i}\n".encode())
    vault.close()


def main(argv: list[str]) -> int:
    if argv[0] == "random":
        _, seed, n, backing, key_file, progress = argv
        run_random(int(seed), int(n), backing, MasterKeySource.key_file(key_file), progress)
        return 0
    name, backing, key_file = argv
    global NEW_KEY
    NEW_KEY = key_file + ".new"
    source = MasterKeySource.key_file(key_file)
    if name == "init":
        # the vault does not exist yet: the operation is making it
        Vault.create(backing, source).close()
        return 0
    vault = Vault.open(backing, source)
    SCENARIOS[name].op(vault)
    vault.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
