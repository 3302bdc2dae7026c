"""Crash safety through the mount: the daemon dies inside a FUSE operation, at every
failpoint a file operation can reach.

For each name in encfs.failpoints.FAILPOINTS that a file operation reaches, and each
operation that reaches it, a copy of a prepared vault is mounted with
TDEFS_FAILPOINTS=<name>=crash, the operation is performed through the mount, and the
daemon must die there. Then `tdefs umount` cleans up after the dead daemon, a plain
remount reads the tree, and DESIGN.md's invariants are checked:

1. every path reads as it was before the operation or as it is after it (the whole
   tree is one of the two states: a rename is atomic on the backing filesystem);
2. no encrypted backing file lacks its dictionary entry;
3. no entry outlives its backing file (stale entries are gone after recovery).

A new failpoint name fails `test_every_failpoint_is_exercised` until it is given
operations here or named as unreachable through the mount (with the reason).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from encfs.failpoints import FAILPOINTS
from encfs.filedict import Del, Put
from encfs.masterkey import MasterKeySource
from encfs.vault import Vault

# the FUSE test helpers, one module shared with tests/integration (and its sweep
# of mounts left behind at the end of the session)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
import fuse_harness as fx  # noqa: E402

pytestmark = pytest.mark.fuse

State = dict[str, bytes | None]   # path -> contents, None = absent


def blob(tag: str, size: int) -> bytes:
    unit = f"<{tag}>".encode()
    return (unit * (size // len(unit) + 1))[:size]


# the tree every case starts from
BEFORE: State = {
    "a": blob("a", 40_000),
    "b": blob("b", 33_333),
    "t": blob("t", 20_001),
    "d/x": blob("dx", 5_000),
    "d/y": blob("dy", 17),
    "c": None,
    "e/x": None,
    "e/y": None,
    "new": None,
}


@dataclass(frozen=True)
class Operation:
    name: str
    run: Callable[[Path], object]
    changes: State   # what the operation changes, as it reads afterwards

    @property
    def after(self) -> State:
        return {**BEFORE, **self.changes}


def _create(mnt: Path) -> None:
    os.close(os.open(mnt / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def _open_truncating(mnt: Path) -> None:
    os.close(os.open(mnt / "t", os.O_WRONLY | os.O_TRUNC))


def _unlink_then_umount(mnt: Path) -> None:
    # an unlink's delete record is deferred until the removal is durable: at the
    # latest when the vault closes, which unmounting does
    os.unlink(mnt / "a")
    fx.run_tdefs("umount", mnt, check=False, timeout=30)


def _rotate_data_key(mnt: Path) -> None:
    fx.run_tdefs("keys", "rotate", mnt, check=False, timeout=30)


OPERATIONS = {op.name: op for op in (
    Operation("create", _create, {"new": b""}),
    Operation("unlink", lambda m: os.unlink(m / "a"), {"a": None}),
    Operation("unlink-umount", _unlink_then_umount, {"a": None}),
    Operation("rename", lambda m: os.rename(m / "a", m / "c"), {"a": None, "c": BEFORE["a"]}),
    Operation("rename-over", lambda m: os.rename(m / "a", m / "b"), {"a": None, "b": BEFORE["a"]}),
    Operation("rename-dir", lambda m: os.rename(m / "d", m / "e"),
              {"d/x": None, "d/y": None, "e/x": BEFORE["d/x"], "e/y": BEFORE["d/y"]}),
    Operation("link", lambda m: os.link(m / "a", m / "c"), {"c": BEFORE["a"]}),
    Operation("open-truncate", _open_truncating, {"t": b""}),
    Operation("truncate", lambda m: os.truncate(m / "t", 0), {"t": b""}),
    Operation("rotate-key", _rotate_data_key, {}),
)}

# failpoint name prefix -> the operations that reach it
REACHED_BY = {
    "create.": ("create",),
    "unlink.": ("unlink",),
    "deletes.": ("unlink-umount",),
    "rename.": ("rename", "rename-over", "rename-dir"),
    "link.": ("link",),
    "truncate.": ("open-truncate", "truncate"),
    "dict.append.": ("create", "unlink-umount", "rename-over", "rename-dir", "link",
                     "open-truncate"),
    "dict.rewrite.": ("rename-over",),
    "keys.replace.": ("rotate-key",),
}
# failpoint name prefix -> why nothing done through a mount reaches it
UNREACHABLE = {
    "init.": "vault creation (`tdefs init`) runs before any mount",
    "reencrypt.": "the daemon's background re-encryption reaches these, not a request:"
                  " tests/crash/test_mount_reencrypt_crash.py kills it at each of them",
}
# these points fire on the dictionary's snapshot rewrite: start from a log on the brink
NEEDS_FULL_LOG = ("dict.rewrite.",)


def operations_for(failpoint: str) -> tuple[str, ...]:
    for prefix, ops in REACHED_BY.items():
        if failpoint.startswith(prefix):
            return ops
    return ()


CASES = [(fp, op) for fp in FAILPOINTS for op in operations_for(fp)]


def test_every_failpoint_is_exercised() -> None:
    for name in FAILPOINTS:
        unreachable = any(name.startswith(p) for p in UNREACHABLE)
        assert operations_for(name) or unreachable, (
            f"failpoint {name} is reached by no operation in this test; add one to REACHED_BY "
            f"or, if no FUSE operation can reach it, to UNREACHABLE with the reason")


# -- the prepared vaults ---------------------------------------------------------------


def write_tree(root: Path, state: State) -> None:
    for rel, data in state.items():
        if data is not None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)


def read_tree(root: Path) -> State:
    found: State = {}
    for rel in BEFORE:
        try:
            found[rel] = (root / rel).read_bytes()
        except FileNotFoundError:
            found[rel] = None
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = str(Path(dirpath, name).relative_to(root))
            if rel not in found:
                found[rel] = (root / rel).read_bytes()
    return found


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, fx.VaultPaths]:
    """A vault holding BEFORE; and its copy whose dictionary log is one record short of
    a snapshot rewrite."""
    fx.require_fuse()
    root = tmp_path_factory.mktemp("crash-templates")
    plain = fx.make_vault(root, "plain")
    with fx.mounted_at(plain) as v:
        write_tree(v.mountpoint, BEFORE)
    full = fx.VaultPaths(backing=root / "full-backing", mountpoint=root / "full-mnt",
                         key_file=plain.key_file, log=root / "full.log")
    subprocess.run(["cp", "-a", str(plain.backing), str(full.backing)], check=True)
    full.mountpoint.mkdir()
    fill_dictionary_log(full)
    return {"plain": plain, "full": full}


def open_vault(v: fx.VaultPaths, mode: str = "normal") -> Vault:
    return Vault.open(v.backing, MasterKeySource.key_file(v.key_file), mode=mode)


def fill_dictionary_log(v: fx.VaultPaths) -> None:
    """Append harmless put/delete pairs until one more record triggers the rewrite."""
    vault = open_vault(v)
    try:
        files = vault.files
        _, info = files.items()[0]
        while files.records + 2 <= files.rewrite_min_records:
            files.append([Put(b"churn", info)], sync=False)
            files.append([Del(b"churn")], sync=False)
        if files.records < files.rewrite_min_records:
            files.append([Del(b"churn")], sync=False)   # ends with no stale entry
        files.sync()
        assert files.rewrites == 0 and files.records == files.rewrite_min_records
    finally:
        vault.close()


# -- one case ---------------------------------------------------------------------------


@pytest.fixture
def case_vault(templates: dict[str, fx.VaultPaths], tmp_path: Path,
               request: pytest.FixtureRequest) -> Iterator[fx.VaultPaths]:
    failpoint = request.node.callspec.params["failpoint"]
    template = templates["full" if failpoint.startswith(NEEDS_FULL_LOG) else "plain"]
    v = fx.VaultPaths(backing=tmp_path / "backing", mountpoint=tmp_path / "mnt",
                      key_file=template.key_file, log=tmp_path / "daemon.log")
    subprocess.run(["cp", "-a", str(template.backing), str(v.backing)], check=True)
    v.mountpoint.mkdir()
    try:
        yield v
    finally:
        fx.force_cleanup(v.mountpoint)
        shutil.rmtree(v.backing, ignore_errors=True)


def crash_inside(v: fx.VaultPaths, failpoint: str, op: Operation) -> None:
    """Mount armed, run the operation, require the daemon to die, `tdefs umount`."""
    fx.mount(v, env={"TDEFS_FAILPOINTS": f"{failpoint}=crash"})
    try:
        outcome = "completed"
        try:
            op.run(v.mountpoint)
        except OSError as exc:
            outcome = errno.errorcode.get(exc.errno, str(exc.errno))
        deadline = time.monotonic() + 10
        while fx.daemons_for(v.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        log = v.log.read_text(errors="replace")[-2000:] if v.log.exists() else ""
        assert not fx.daemons_for(v.mountpoint), (
            f"{op.name} {outcome} but the daemon did not die at {failpoint}; its log:\n{log}")
        # it died at the failpoint, not by a clean exit (which an unmount also ends in)
        assert not re.search(r"vault .* closed", log), (
            f"the daemon exited cleanly instead of dying at {failpoint}; its log:\n{log}")
        # the dead daemon leaves a mount whose every request fails (or, when it died
        # while unmounting, no mount at all)
        with pytest.raises(OSError):
            os.stat(v.mountpoint / "never-looked-up")
    finally:
        proc = None
        if fx.is_mounted(v.mountpoint):
            proc = fx.run_tdefs("umount", v.mountpoint, check=False, timeout=30)
    assert proc is None or proc.returncode == 0, f"tdefs umount after the crash: {proc.stderr!r}"
    assert not fx.is_mounted(v.mountpoint)


def dictionary_problems(v: fx.VaultPaths) -> list[str]:
    """Invariants 2 and 3 on the unmounted vault, read as the log left them (a read-only
    open, so recovery changes nothing): every file of the user's tree has its entry, no
    entry lacks its file, no intent is left open, no torn tail is left."""
    vault = open_vault(v, mode="check")
    try:
        files = vault.files
        entries, pending, torn = set(files.paths()), files.pending_intents(), files.dropped_tail
    finally:
        vault.close()
    on_disk = set()
    for dirpath, dirnames, filenames in os.walk(v.backing):
        if Path(dirpath) == v.backing:
            dirnames[:] = [d for d in dirnames if not d.startswith(".tdefs")]
        on_disk.update(os.fsencode(Path(dirpath, n).relative_to(v.backing)) for n in filenames)
    problems = [f"{p!r} is on disk without an entry" for p in sorted(on_disk - entries)]
    problems += [f"{p!r} has a stale entry" for p in sorted(entries - on_disk)]
    problems += [f"an intent for {p.src!r} is still open" for p in pending]
    if torn:
        problems.append(f"files.dict still ends in a torn record ({torn} bytes)")
    return problems


@pytest.mark.parametrize(("failpoint", "operation"), CASES,
                         ids=[f"{fp}-{op}" for fp, op in CASES])
def test_crash_inside_operation(case_vault: fx.VaultPaths, failpoint: str,
                                operation: str) -> None:
    op = OPERATIONS[operation]
    crash_inside(case_vault, failpoint, op)

    with fx.mounted_at(case_vault) as v:
        state = read_tree(v.mountpoint)
        assert state in (BEFORE, op.after), describe_state(state, op)
        # the vault works after recovery: new files and the crashed names are usable
        (v.mountpoint / "post-crash").write_bytes(b"still writable")
        assert (v.mountpoint / "post-crash").read_bytes() == b"still writable"

    problems = dictionary_problems(case_vault)
    assert not problems, "; ".join(problems)


def describe_state(state: State, op: Operation) -> str:
    lines = [f"after a crash in {op.name} the tree is neither the state before nor after:"]
    for rel in sorted(set(state) | set(BEFORE)):
        got, before, after = state.get(rel), BEFORE.get(rel), op.after.get(rel)
        if got in (before, after) and got == before == after:
            continue
        show = "absent" if got is None else f"{len(got)} bytes" + (
            " (= before)" if got == before else " (= after)" if got == after else " (garbage)")
        lines.append(f"  {rel}: {show}")
    return "\n".join(lines)
