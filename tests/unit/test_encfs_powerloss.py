"""Power cuts at every point of every vault operation, in both durability modes.

Each case starts from a vault at rest, records one operation done the way the mount
does it (tests/unit/powerloss.py swaps encfs.disk for a recorder), then checks every
on-disk state a power cut could have left (the persistence model is in powerloss.py):
the vault opens and recovers, each acknowledged file reads back exactly, per-file
copies of acknowledged files agree with their entries, and no other file reads as
anything but one of its versions (in ``ordered`` mode, only for the operations made
before the last sync of the log, as docs/vault-format.md says). The number of crash
states checked per case is printed and summed up at the end of the run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import pytest
from powerloss import (
    ABSENT,
    STATE_COUNTS,
    Recorder,
    Volatile,
    check_states,
    crash_states,
    describe,
)

from encfs import content
from encfs.disk import disk
from encfs.filedict import Del, Put
from encfs.fsops import RENAME_EXCHANGE
from encfs.masterkey import MasterKeySource, generate_key_file
from encfs.reencrypt import Reencryptor
from encfs.sync_points import hooked
from encfs.vault import Vault

MODES = ["strict", "ordered"]
A = secrets.token_bytes(1300)
B = secrets.token_bytes(700)
NEW = secrets.token_bytes(1500)


# -- doing things the way the mount does them -----------------------------------------


def put(vault: Vault, rel: bytes, data: bytes) -> None:
    fd, cipher = vault.create(rel, os.O_RDWR, 0o644)
    try:
        content.write_at(fd, cipher, data, 0)
    finally:
        os.close(fd)


def app_fsync(vault: Vault, fd: int) -> None:
    """fsync(2) through the mount: the log first (mount/fs.py), then the file."""
    vault.sync()
    disk.fsync(fd)


def app_fsyncdir(vault: Vault, rel_dir: bytes) -> None:
    vault.sync()
    vault.tree.fsync_dir(rel_dir)


def run_case(tmp_path, name, durability, setup, workload, opener=None, key=None, **tuning):
    key = key or tmp_path / "key"
    generate_key_file(key)
    source = MasterKeySource.key_file(key)
    root = tmp_path / "vault"
    # the starting state is taken as durable whatever was synced: skip the real syncs
    with disk.replaced_by(Volatile()):
        vault = Vault.create(root, source, durability=durability)
        try:
            initial = setup(vault)
        finally:
            vault.close()
        vault = Vault.open(root, source, **tuning)
    rec = Recorder(root)
    try:
        with disk.replaced_by(rec):
            workload(vault, rec)
            vault.close()
    finally:
        vault.close()
    states, combos, sampled = crash_states(rec, initial, durability == "strict")
    failures = check_states(states, rec, source, opener)
    case = f"{name} [{durability}]"
    STATE_COUNTS[case] = (len(states), combos, len(rec.ops), sampled)
    print(f"\npower loss: {case}: {len(states)} crash states checked"
          f" ({combos} combinations{', sampled' if sampled else ''},"
          f" {len(rec.ops)} recorded calls)")
    assert not failures, (f"{len(failures)} bad crash states of {len(states)}:\n"
                          + "\n".join(failures[:8]) + "\n" + describe(rec))
    return states


def two_files(vault: Vault) -> dict[bytes, bytes]:
    vault.tree.mkdir(b"d", 0o755)
    put(vault, b"d/a", A)
    put(vault, b"d/b", B)
    return {b"d/a": A, b"d/b": B}


# -- the plain file operations ----------------------------------------------------------


@contextlib.contextmanager
def recorded(rec, name: str, expect: dict) -> Iterator[None]:
    """The block is one operation, `name`, whose paths may end as `expect` says."""
    rec.begin(name, expect)
    yield
    rec.end(name)


def create_synced(vault, rec, path: bytes) -> None:
    """Create `path` (one recorded operation), write NEW into it and fsync it, as an
    application would."""
    with recorded(rec, "create", {path: [ABSENT, NEW]}):
        fd, cipher = vault.create(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        content.write_at(fd, cipher, NEW, 0)
        app_fsync(vault, fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("durability", MODES)
def test_create(tmp_path, durability):
    def work(vault, rec):
        create_synced(vault, rec, b"d/new")
        app_fsyncdir(vault, b"d")
        rec.ack({b"d/new": NEW})

    run_case(tmp_path, "create", durability, two_files, work)


@pytest.mark.parametrize("durability", MODES)
def test_unlink(tmp_path, durability):
    def work(vault, rec):
        with recorded(rec, "unlink", {b"d/a": [ABSENT]}):
            vault.unlink(b"d/a")
        app_fsyncdir(vault, b"d")
        rec.ack({b"d/a": ABSENT})

    run_case(tmp_path, "unlink", durability, two_files, work)


@pytest.mark.parametrize("durability", MODES)
@pytest.mark.parametrize("case,src,dst,dirs", [
    ("rename", b"d/a", b"d/c", [b"d"]),
    ("rename over a file", b"d/a", b"d/b", [b"d"]),
    ("rename across directories", b"d/a", b"e/a", [b"d", b"e"]),
])
def test_rename_file(tmp_path, durability, case, src, dst, dirs):
    def setup(vault):
        vault.tree.mkdir(b"e", 0o755)
        return two_files(vault)

    def work(vault, rec):
        with recorded(rec, "rename", {src: [ABSENT], dst: [ABSENT, A]}):
            vault.rename(src, dst)
        for d in dirs:
            app_fsyncdir(vault, d)
        rec.ack({src: ABSENT, dst: A})

    run_case(tmp_path, case, durability, setup, work)


@pytest.mark.parametrize("durability", MODES)
def test_write_tmp_then_rename_over_current(tmp_path, durability):
    """The engines' pattern: a new file, written and fsynced (its directory not),
    renamed over an existing one. Recovery reads a missing source as a rename that
    happened, so the source's own creation must be durable before the intent is: a
    power cut that undid both used to give CURRENT the new file's entry over its old
    bytes."""
    def work(vault, rec):
        create_synced(vault, rec, b"d/CURRENT.tmp")
        with recorded(rec, "rename", {b"d/CURRENT.tmp": [ABSENT], b"d/a": [NEW]}):
            vault.rename(b"d/CURRENT.tmp", b"d/a")
        app_fsyncdir(vault, b"d")
        rec.ack({b"d/CURRENT.tmp": ABSENT, b"d/a": NEW})

    run_case(tmp_path, "write tmp, rename over CURRENT", durability, two_files, work)


@pytest.mark.parametrize("durability", MODES)
def test_rename_directory(tmp_path, durability):
    def setup(vault):
        files = two_files(vault)
        vault.tree.mkdir(b"d/sub", 0o755)
        put(vault, b"d/sub/s", NEW)
        return {**files, b"d/sub/s": NEW}

    moved = {b"d/a": A, b"d/b": B, b"d/sub/s": NEW}

    def work(vault, rec):
        versions = {p: [ABSENT] for p in moved}
        versions.update({b"g" + p[1:]: [ABSENT, v] for p, v in moved.items()})
        rec.begin("rename", versions)
        vault.rename(b"d", b"g")
        rec.end("rename")
        app_fsyncdir(vault, b"")
        rec.ack({**{p: ABSENT for p in moved}, **{b"g" + p[1:]: v for p, v in moved.items()}})

    run_case(tmp_path, "rename of a directory", durability, setup, work)


@pytest.mark.parametrize("durability", MODES)
def test_rename_exchange(tmp_path, durability):
    def work(vault, rec):
        with recorded(rec, "exchange", {b"d/a": [A, B], b"d/b": [A, B]}):
            vault.rename(b"d/a", b"d/b", RENAME_EXCHANGE)
        app_fsyncdir(vault, b"d")
        rec.ack({b"d/a": B, b"d/b": A})

    run_case(tmp_path, "rename exchange", durability, two_files, work)


@pytest.mark.parametrize("durability", MODES)
def test_rename_directory_holding_an_unlinked_file(tmp_path, durability):
    """An unlink whose DEL is deferred, inside a directory then renamed: the intent
    carries the DEL, so the unlink must be durable before the intent is."""
    def work(vault, rec):
        with recorded(rec, "unlink", {b"d/a": [ABSENT]}):
            vault.unlink(b"d/a")
        rec.begin("rename", {b"d/a": [ABSENT], b"d/b": [ABSENT], b"g/a": [ABSENT, A],
                             b"g/b": [ABSENT, B]})
        vault.rename(b"d", b"g")
        rec.end("rename")
        app_fsyncdir(vault, b"")
        # the unlink's own directory (g now) was not fsynced: g/a may come back, as A
        rec.ack({b"d/a": ABSENT, b"d/b": ABSENT, b"g/b": B})

    run_case(tmp_path, "rename of a directory after an unlink in it", durability, two_files,
             work)


@pytest.mark.parametrize("durability", MODES)
def test_unlink_then_create_the_same_name(tmp_path, durability):
    def work(vault, rec):
        with recorded(rec, "unlink", {b"d/a": [ABSENT]}):
            vault.unlink(b"d/a")
        create_synced(vault, rec, b"d/a")
        app_fsyncdir(vault, b"d")
        rec.ack({b"d/a": NEW})

    run_case(tmp_path, "unlink, then create the same name", durability, two_files, work)


@pytest.mark.parametrize("durability", MODES)
def test_link(tmp_path, durability):
    def work(vault, rec):
        with recorded(rec, "link", {b"d/c": [ABSENT, A]}):
            vault.link(b"d/a", b"d/c")
        app_fsyncdir(vault, b"d")
        rec.ack({b"d/c": A})

    run_case(tmp_path, "link", durability, two_files, work)


@pytest.mark.parametrize("durability", MODES)
def test_truncate_to_zero_and_rewrite(tmp_path, durability):
    def work(vault, rec):
        rec.begin("truncate", {b"d/a": [b"", NEW]})
        fd = vault.tree.open(b"d/a", os.O_RDWR)
        cipher = vault.truncate_to_zero(b"d/a", fd)
        rec.end("truncate")
        content.write_at(fd, cipher, NEW, 0)
        app_fsync(vault, fd)
        rec.ack({b"d/a": NEW})
        os.close(fd)

    run_case(tmp_path, "truncate to zero", durability, two_files, work)


@pytest.mark.parametrize("durability", MODES)
def test_truncate_to_zero_after_unlinking_another_name(tmp_path, durability):
    """A file with two names loses one (its DEL deferred), then is rewritten from
    scratch under the other: the fresh IV may not be durable while a power cut can
    still bring the unlinked name back on the old one."""
    def setup(vault):
        files = two_files(vault)
        vault.link(b"d/a", b"d/a2")
        return {**files, b"d/a2": A}

    def work(vault, rec):
        with recorded(rec, "unlink", {b"d/a2": [ABSENT, b"", NEW]}):
            vault.unlink(b"d/a2")
        rec.begin("truncate", {b"d/a": [b"", NEW]})
        fd = vault.tree.open(b"d/a", os.O_RDWR)
        cipher = vault.truncate_to_zero(b"d/a", fd)
        rec.end("truncate")
        content.write_at(fd, cipher, NEW, 0)
        app_fsync(vault, fd)
        rec.ack({b"d/a": NEW})
        app_fsyncdir(vault, b"d")
        rec.ack({b"d/a2": ABSENT})
        os.close(fd)

    run_case(tmp_path, "truncate to zero after unlinking another name", durability,
             setup, work)


@pytest.mark.parametrize("durability", MODES)
def test_entry_copy_made_to_agree_before_a_write(tmp_path, durability):
    """A crash leftover (a file whose per-file copy is missing) opened for writing:
    the copy is rewritten before the data, and is durable with it."""
    def setup(vault):
        files = two_files(vault)
        os.removexattr(vault.root / "d" / "a", "user.tdefs.entry")
        return files

    def work(vault, rec):
        rec.begin("write", {b"d/a": [NEW]})
        fd = vault.tree.open(b"d/a", os.O_RDWR)
        vault.align_copy(b"d/a", fd)
        rec.end("write")
        content.write_at(fd, vault.cipher_for(b"d/a"), NEW, 0)
        app_fsync(vault, fd)
        rec.ack({b"d/a": NEW})
        os.close(fd)

    run_case(tmp_path, "per-file entry copy", durability, setup, work)


@pytest.mark.parametrize("durability", MODES)
def test_a_sequence_of_operations(tmp_path, durability):
    """Several operations back to back, synced only at the end, so that a power cut
    may keep any mix of them that the filesystem allows."""
    NEW2 = NEW[::-1]

    def setup(vault):
        vault.tree.mkdir(b"e", 0o755)
        return two_files(vault)

    def work(vault, rec):
        create_synced(vault, rec, b"d/n")
        with recorded(rec, "rename over", {b"d/n": [ABSENT], b"d/a": [NEW]}):
            vault.rename(b"d/n", b"d/a")
        with recorded(rec, "link", {b"e/b": [ABSENT, B]}):
            vault.link(b"d/b", b"e/b")
        with recorded(rec, "unlink", {b"d/b": [ABSENT]}):
            vault.unlink(b"d/b")
        rec.begin("truncate", {b"e/b": [b"", NEW2]})
        fd = vault.tree.open(b"e/b", os.O_RDWR)
        cipher = vault.truncate_to_zero(b"e/b", fd)
        rec.end("truncate")
        content.write_at(fd, cipher, NEW2, 0)
        app_fsync(vault, fd)
        os.close(fd)
        with recorded(rec, "rename dir", {b"e/b": [ABSENT], b"g/b": [ABSENT, B, NEW2]}):
            vault.rename(b"e", b"g")
        for d in (b"", b"d", b"g"):
            app_fsyncdir(vault, d)
        rec.ack({b"d/n": ABSENT, b"d/a": NEW, b"d/b": ABSENT, b"e/b": ABSENT, b"g/b": NEW2})

    run_case(tmp_path, "a sequence of operations", durability, setup, work)


# -- the vault's own files ------------------------------------------------------------


@pytest.mark.parametrize("durability", MODES)
def test_dictionary_rewrite(tmp_path, durability):
    """The snapshot rewrite of files.dict, with a create appended while it runs
    (spliced into the new log) and one after it (appended to the new log)."""
    def setup(vault):
        files = two_files(vault)
        vault.tree.mkdir(b"f", 0o755)
        for i in range(16):  # a snapshot of several sectors
            files[b"f/%d" % i] = b"file %d" % i
            put(vault, b"f/%d" % i, files[b"f/%d" % i])
        info = vault.files.get(b"d/a")
        for i in range(40):  # records that the snapshot leaves out
            vault.files.append([Put(b"gone%d" % i, info)], sync=False)
            vault.files.append([Del(b"gone%d" % i)], sync=False)
        return files

    def work(vault, rec):
        def meanwhile():
            with recorded(rec, "create meanwhile", {b"d/mid": [ABSENT, B]}):
                fd, cipher = vault.create(b"d/mid", os.O_RDWR | os.O_CREAT, 0o644)
            content.write_at(fd, cipher, B, 0)
            app_fsync(vault, fd)
            os.close(fd)

        with hooked("dict.rewrite.before-splice", meanwhile):
            vault.files.rewrite()
        assert vault.files.get(b"d/mid") is not None
        create_synced(vault, rec, b"d/new")
        app_fsyncdir(vault, b"d")
        rec.ack({b"d/new": NEW, b"d/mid": B})

    states = run_case(tmp_path, "dictionary rewrite", durability, setup, work,
                      rewrite_min_records=1 << 30)
    assert len(states) > 10


@pytest.mark.parametrize("durability", MODES)
def test_keys_dict_replace(tmp_path, durability):
    def work(vault, rec):
        vault.keys.rotate()  # atomic replace of keys.dict; durable when it returns
        create_synced(vault, rec, b"d/new")
        app_fsyncdir(vault, b"d")
        rec.ack({b"d/new": NEW})

    run_case(tmp_path, "keys.dict replace", durability, two_files, work)


# -- re-encryption ----------------------------------------------------------------------


@pytest.mark.parametrize("durability", MODES)
def test_reencryption(tmp_path, durability):
    """Every step of converting a file, and a file with two names, to a new key and
    retiring the old one: every name reads the same plaintext throughout."""
    def setup(vault):
        files = two_files(vault)
        vault.link(b"d/b", b"d/b2")
        Reencryptor(vault).set_rate(0)
        vault.keys.rotate()
        return {**files, b"d/b2": B}

    def work(vault, rec):
        r = Reencryptor(vault)
        r.recover()
        for job in r.pending():
            done = r.copy(job)
            assert r.still_current(job)
            r.switch(done)
        assert not r.pending()

    run_case(tmp_path, "re-encryption", durability, setup, work,
             opener=lambda vault: Reencryptor(vault).recover())


# -- recovery after a process crash -------------------------------------------------------


def abandon(vault: Vault) -> None:
    """What kill -9 leaves: descriptors closed, nothing flushed or synced."""
    os.close(vault.files._fd)
    vault.files._fd = -1
    vault.tree.close()
    os.close(vault._lock_fd)
    vault._lock_fd = -1


@pytest.mark.parametrize("durability", MODES)
def test_recovery_after_a_process_crash(tmp_path, durability):
    """A process crash keeps the page cache, so recovery finds tree changes that are
    not durable yet: a rename whose COMMIT never came, an unlink whose DEL never did.
    The COMMIT and DEL that recovery writes must not be durable before them."""
    def work(vault, rec):
        with recorded(rec, "rename", {b"d/a": [ABSENT], b"d/b": [A]}):
            vault.rename(b"d/a", b"d/b")
        with recorded(rec, "unlink", {b"d/c": [ABSENT]}):
            vault.unlink(b"d/c")
        abandon(vault)
        Vault.open(vault.root, vault_source[0]).close()

    def setup(vault):
        files = two_files(vault)
        put(vault, b"d/c", NEW)
        return {**files, b"d/c": NEW}

    key = tmp_path / "key"
    vault_source = [MasterKeySource.key_file(key)]
    run_case(tmp_path, "recovery after a process crash", durability, setup, work, key=key)


# -- the layer itself -------------------------------------------------------------------


def test_production_calls_the_os_functions_themselves(tmp_path):
    """No wrapper in production: ``disk.fsync`` is ``os.fsync``; a replacement lasts
    for its block only, and the recorder stands in for every call."""
    import encfs.disk as disk_module

    assert disk.fsync is os.fsync and disk.write is os.write and disk.rename is os.rename
    assert all(getattr(disk, name) is fn for name, fn in disk_module.CALLS.items())
    (tmp_path / ".tdefs").mkdir()
    (tmp_path / ".tdefs" / "files.dict").write_bytes(b"")
    rec = Recorder(tmp_path)
    with disk.replaced_by(rec):
        assert disk.fsync == rec.fsync
    assert all(getattr(disk, name) is fn for name, fn in disk_module.CALLS.items())
