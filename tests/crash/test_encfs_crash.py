"""Kill the encfs core at every failpoint and check DESIGN.md's invariants 1-3.

For each (scenario, failpoint) pair the test builds the scenario's vault here, then a
child process (encfs_crash_driver.py) opens it and runs the one operation with
``TDEFS_FAILPOINTS=<name>=crash``; the child must die with the crash exit code at that
point. The test then reopens the vault (running recovery) and checks:

1. no encrypted file lacks its entry, and every file decrypts to its content from
   before the operation or from after it: the whole tree equals one of the two states
   (a file read with a missing or wrong entry would show ciphertext instead);
2. no stale entry and no unresolved intent is left, and a second open finds nothing
   more to recover (recovery was made durable);
3. the vault keeps working: a new file can be written and read back after a reopen.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from encfs.errors import WrongMasterKey
from encfs.failpoints import CRASH_EXIT_CODE, FAILPOINTS
from encfs.masterkey import MasterKeySource, generate_key_file
from encfs.reencrypt import Reencryptor
from encfs.vault import Vault

DRIVER = Path(__file__).with_name("encfs_crash_driver.py")
REPO = Path(__file__).resolve().parents[2]

_spec = importlib.util.spec_from_file_location("encfs_crash_driver", DRIVER)
assert _spec is not None and _spec.loader is not None
driver = importlib.util.module_from_spec(_spec)
sys.modules["encfs_crash_driver"] = driver  # dataclasses look their module up here
_spec.loader.exec_module(driver)

_RENAME = ("rename.after-intent", "rename.after-rename", "rename.after-commit")
_APPEND = ("dict.append.mid-write", "dict.append.after-write")
_REWRITE = ("dict.rewrite.mid-tmp", "dict.rewrite.after-snapshot", "dict.rewrite.after-tmp",
            "dict.rewrite.after-rename")
_KEYS = ("keys.replace.mid-tmp", "keys.replace.after-tmp", "keys.replace.after-rename")
_REENCRYPT = ("reencrypt.after-start", "reencrypt.mid-copy", "reencrypt.after-copy",
              "reencrypt.after-first-name", "reencrypt.mid-links", "reencrypt.after-switch",
              "reencrypt.state.mid-tmp", "reencrypt.state.after-tmp",
              "reencrypt.state.after-rename")

# (scenario, failpoint spec); "@2" tears or stops at the second hit (e.g. the COMMIT
# record of a rename, whose first record is the intent)
CASES: list[tuple[str, str]] = [
    ("create", "create.after-new"),
    *[("create", f) for f in _APPEND],
    ("unlink", "unlink.after-unlink"),
    ("unlink", "deletes.after-fsync"),  # the flush at close
    *[("unlink", f) for f in _APPEND],
    *[("rename_over", f) for f in (*_RENAME, *_APPEND)],
    ("rename_over", "dict.append.mid-write=crash@2"),
    ("rename_over", "dict.append.after-write=crash@2"),
    *[("rename_new", f) for f in _RENAME],
    *[("rename_dir", f) for f in _RENAME],
    ("rename_dir", "dict.append.mid-write"),
    *[("exchange", f) for f in _RENAME],
    ("exchange", "dict.append.mid-write=crash@2"),
    *[("exchange_dir", f) for f in _RENAME],
    *[("noreplace", f) for f in _RENAME],
    ("link", "link.after-new"),
    *[("link", f) for f in _APPEND],
    ("truncate", "truncate.after-truncate"),
    *[("truncate", f) for f in _APPEND],
    *[("rewrite", f) for f in _REWRITE],
    *[("rewrite_racing", f) for f in _REWRITE],
    *[("rotate", f) for f in _KEYS],
    *[("reseal", f) for f in _KEYS],
    *[("reencrypt", f) for f in _REENCRYPT],
    ("reencrypt", "reencrypt.mid-copy=crash@2"),
    ("reencrypt", "rename.after-intent=crash@2"),
    ("reencrypt", "rename.after-rename=crash@3"),
    ("init", "init.before-publish"),
    *[("init", f) for f in _KEYS],
]


def _name(spec: str) -> str:
    return spec.partition("=")[0]


def test_every_failpoint_has_a_crash_case():
    assert {_name(f) for _, f in CASES} == set(FAILPOINTS)


def _run_child(scenario: str, spec: str, backing: Path, key: Path) -> None:
    if "=" not in spec:
        spec += "=crash"
    env = dict(os.environ, TDEFS_FAILPOINTS=spec)
    proc = subprocess.run([sys.executable, str(DRIVER), scenario, str(backing), str(key)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == CRASH_EXIT_CODE, (
        f"child did not die at {spec}: exit {proc.returncode}\n{proc.stderr[-2000:]}")


def _check_recovered(backing: Path, source: MasterKeySource, before: dict, after: dict) -> None:
    with Vault.open(backing, source) as vault:
        state = driver.read_tree(vault)
        assert state in (before, after), (
            f"tree is neither the before nor the after state:\n{sorted(state)}\n"
            f"before={sorted(before)}\nafter={sorted(after)}")
        assert not vault.files.pending_intents()
        for rel in vault.files.entries:
            assert (backing / os.fsdecode(rel)).is_file(), f"stale entry {rel!r} survived recovery"
        for rel, data in state.items():
            if data and rel.encode() in vault.files.entries:
                assert (backing / rel).read_bytes() != data, f"{rel} is stored in the clear"
    with Vault.open(backing, source) as vault:
        rec = vault.recovery
        assert not (rec.stale or rec.committed or rec.aborted or rec.dropped_tail), rec
        assert driver.read_tree(vault) == state
        driver.write_file(vault, "afterwards", b"still works" * 10)
    with Vault.open(backing, source) as vault:
        assert driver.read_tree(vault)["afterwards"] == b"still works" * 10


def _set_durability(backing: Path, durability: str) -> None:
    path = backing / ".tdefs" / "vault.json"
    config = json.loads(path.read_text())
    config["options"]["durability"] = durability
    path.write_text(json.dumps(config))


# keys.dict and init do not depend on the durability mode: they run in strict mode only
MODE_CASES = [(scenario, spec, durability) for scenario, spec in CASES
              for durability in ("strict", "ordered")
              if durability == "strict" or scenario not in ("init", "rotate", "reseal")]


@pytest.mark.parametrize("scenario,spec,durability", MODE_CASES,
                         ids=[f"{d}-{s}-{f}" for s, f, d in MODE_CASES])
def test_crash_at_failpoint(tmp_path, scenario, spec, durability):
    backing = tmp_path / "vault"
    key = tmp_path / "master.key"
    generate_key_file(key)
    source = MasterKeySource.key_file(key)
    if scenario == "init":
        backing.mkdir()
        (backing / "old.txt").write_bytes(b"plaintext from before the vault")
        _run_child(scenario, spec, backing, key)
        # the half-made vault is invisible: not a vault, the old file untouched ...
        assert not (backing / ".tdefs").exists()
        assert (backing / "old.txt").read_bytes() == b"plaintext from before the vault"
        # ... and init can simply be run again
        Vault.create(backing, source).close()
        _check_recovered(backing, source, {"old.txt": b"plaintext from before the vault"}, {})
        return
    sc = driver.SCENARIOS[scenario]
    Vault.create(backing, source).close()
    _set_durability(backing, durability)
    with Vault.open(backing, source) as vault:
        before, after = sc.setup(vault)
        assert driver.read_tree(vault) == before
    if scenario == "reseal":
        generate_key_file(f"{key}.new")
    _run_child(scenario, spec, backing, key)
    if scenario == "reseal":
        # sealed under the old master key or the new one, never neither
        try:
            Vault.open(backing, source).close()
        except WrongMasterKey:
            source = MasterKeySource.key_file(f"{key}.new")
    _check_recovered(backing, source, before, after)
    if scenario == "reencrypt":
        _check_reencryption_resumes(backing, source, before)


def _check_reencryption_resumes(backing: Path, source: MasterKeySource, state: dict) -> None:
    """After a crash inside re-encryption: its own recovery leaves no copy behind and
    the hard-linked pair linked again; then it finishes, every file under the active
    key (its per-file copy too), the old key retired, the tree unchanged."""
    with Vault.open(backing, source) as vault:
        reencryptor = Reencryptor(vault)
        reencryptor.recover()
        assert not list((backing / ".tdefs" / "tmp").glob("*")), "a copy was left behind"
        assert os.stat(backing / "h1").st_ino == os.stat(backing / "h2").st_ino
        for rel in state:  # each per-file copy in step with the dictionary, mid-way too
            fd = os.open(backing / rel, os.O_RDONLY)
            try:
                assert vault.copies.read(fd) == vault.files.get(rel.encode()), rel
            finally:
                os.close(fd)
        driver.reencrypt_all(vault)
        assert reencryptor.pending() == [] and Reencryptor(vault).pending() == []
        active = vault.keys.active_id
        for rel in state:
            info = vault.files.get(rel.encode())
            assert info is not None and info.key_id == active, f"{rel} is not under the active key"
            fd = os.open(backing / rel, os.O_RDONLY)
            try:
                assert vault.copies.read(fd) == info, f"{rel}: its per-file copy lags"
            finally:
                os.close(fd)
        assert list(vault.keys.keys) == [active], "the old key was not retired"
        assert os.stat(backing / "h1").st_ino == os.stat(backing / "h2").st_ino
        assert driver.read_tree(vault) == {**state, "afterwards": b"still works" * 10}


# failpoints of the vault operations and of the log, hit at a random count
_RANDOM_POINTS = ("create.after-new", "unlink.after-unlink", "link.after-new",
                  "truncate.after-truncate", *_RENAME, *_RENAME, *_APPEND)
RANDOM_SEEDS = 50


def test_random_sequences_killed_at_random_points(tmp_path):
    """db_stress style: a random sequence of operations, killed at the N-th hit of a
    random failpoint; the recovered tree must equal the plain directory's tree after
    the last completed operation or after the one that was interrupted."""
    crashed = 0
    for seed in range(RANDOM_SEEDS):
        rng = random.Random(1000 + seed)
        base = tmp_path / f"s{seed}"
        base.mkdir()
        key = base / "k"
        generate_key_file(key)
        source = MasterKeySource.key_file(key)
        backing, plain, progress = base / "vault", base / "plain", base / "progress"
        Vault.create(backing, source).close()
        if seed % 2:
            _set_durability(backing, "ordered")
        ops = driver.random_ops(seed, 20)
        plain.mkdir()
        states = [driver.plain_tree(plain)]
        same_file: list[set[str]] = []  # names sharing the inode an op writes to
        for op in ops:
            same_file.append(driver.hard_links(plain, op[1]) if op[0] == "write" else set())
            try:
                driver.apply_plain(plain, op)
            except OSError:
                pass
            states.append(driver.plain_tree(plain))
        spec = f"{rng.choice(_RANDOM_POINTS)}=crash@{rng.randint(1, 5)}"
        proc = subprocess.run(
            [sys.executable, str(DRIVER), "random", str(seed), "20", str(backing), str(key),
             str(progress)],
            env=dict(os.environ, TDEFS_FAILPOINTS=spec), cwd=REPO, capture_output=True,
            text=True, timeout=120)
        assert proc.returncode in (0, CRASH_EXIT_CODE), proc.stderr[-2000:]
        done = len(progress.read_text().split()) if progress.exists() else 0
        if proc.returncode == CRASH_EXIT_CODE:
            crashed += 1
            allowed = [states[done], states[done + 1]]
            if ops[done][0] == "write":
                # "write" is open(O_CREAT | O_TRUNC) then write: it may die in between,
                # with the file (and every hard link of it) empty
                names = same_file[done] or {ops[done][1]}
                allowed.append({**states[done], **dict.fromkeys(names, b"")})
        else:
            assert done == len(ops)
            allowed = [states[-1]]
        with Vault.open(backing, source) as vault:
            got = driver.read_tree(vault)
            assert got in allowed, f"seed {seed}, {spec}, after {done} ops: {sorted(got)}"
            for rel in vault.files.entries:
                assert (backing / os.fsdecode(rel)).is_file()
        shutil.rmtree(base)
    assert crashed >= RANDOM_SEEDS // 2, f"only {crashed} of {RANDOM_SEEDS} runs reached their failpoint"
