"""encfs.vault: the crash-ordered operations, stale entries, recovery, locking."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import pytest

from encfs import content
from encfs.cipher import PLAINTEXT
from encfs.errors import VaultError
from encfs.filedict import RULE_SRC_GONE, Del, FileInfo, Put
from encfs.fsops import RENAME_EXCHANGE, RENAME_NOREPLACE
from encfs.masterkey import MasterKeySource, generate_key_file
from encfs.vault import META_DIR, Vault


@pytest.fixture
def source(tmp_path) -> MasterKeySource:
    key = tmp_path / "master.key"
    generate_key_file(key)
    return MasterKeySource.key_file(key)


@pytest.fixture
def vault(tmp_path, source):
    v = Vault.create(tmp_path / "vault", source)
    yield v
    v.close()


def put(v: Vault, rel: bytes, data: bytes) -> None:
    fd, cipher = v.create(rel, os.O_RDWR, 0o644)
    try:
        content.write_at(fd, cipher, data, 0)
    finally:
        os.close(fd)


def get(v: Vault, rel: bytes) -> bytes:
    fd = os.open(v.root / os.fsdecode(rel), os.O_RDONLY)
    try:
        return content.read_at(fd, v.cipher_for(rel), 1 << 20, 0)
    finally:
        os.close(fd)


def raw(v: Vault, rel: bytes) -> bytes:
    return (v.root / os.fsdecode(rel)).read_bytes()


def test_create_encrypts_and_cipher_for_plaintext(vault):
    put(vault, b"a", b"hello vault")
    assert raw(vault, b"a") != b"hello vault"
    assert get(vault, b"a") == b"hello vault"
    (vault.root / "legacy").write_bytes(b"old plaintext")
    assert vault.cipher_for(b"legacy") is PLAINTEXT
    assert get(vault, b"legacy") == b"old plaintext"
    assert vault.cipher_for(b"a") is vault.cipher_for(b"a")  # cached, no rebuild per open


def test_create_existing(vault):
    put(vault, b"a", b"one")
    before = vault.files.entries[b"a"]
    with pytest.raises(FileExistsError):
        vault.create(b"a", os.O_WRONLY | os.O_EXCL, 0o644)
    fd, cipher = vault.create(b"a", os.O_RDONLY, 0o644)
    os.close(fd)
    assert vault.files.entries[b"a"] == before and cipher == vault.cipher_for(b"a")
    fd, cipher = vault.create(b"a", os.O_WRONLY | os.O_TRUNC, 0o644)
    content.write_at(fd, cipher, b"two", 0)
    os.close(fd)
    assert vault.files.entries[b"a"].iv != before.iv  # O_TRUNC: a fresh IV
    assert get(vault, b"a") == b"two"


def test_create_failure_leaves_no_entry(vault):
    with pytest.raises(FileNotFoundError):
        vault.create(b"nodir/a", os.O_WRONLY, 0o644)
    assert b"nodir/a" not in vault.files.entries


def test_metadata_is_untouchable(vault):
    for bad in (b".tdefs/keys.dict", b".tdefs"):
        with pytest.raises(PermissionError):
            vault.unlink(bad)
    for bad in (b"../etc/passwd", b"/abs", b"a//b", b"a/./b", b"dir/"):
        with pytest.raises(ValueError):
            vault.unlink(bad)


def test_rename_over_existing_file(vault):
    put(vault, b"CURRENT", b"MANIFEST-1")
    put(vault, b"CURRENT.tmp", b"MANIFEST-2")
    vault.rename(b"CURRENT.tmp", b"CURRENT")
    assert get(vault, b"CURRENT") == b"MANIFEST-2"
    assert set(vault.files.entries) == {b"CURRENT"}
    assert not vault.files.pending_intents()


def test_rename_directory_moves_every_entry_in_one_intent(vault):
    os.makedirs(vault.root / "d/sub")
    put(vault, b"d/x", b"X")
    put(vault, b"d/sub/y", b"Y")
    put(vault, b"dx", b"not under d")
    records = vault.files.records
    vault.rename(b"d", b"e")
    assert vault.files.records == records + 2  # the intent and its commit
    assert get(vault, b"e/x") == b"X" and get(vault, b"e/sub/y") == b"Y"
    assert get(vault, b"dx") == b"not under d"
    assert not any(p.startswith(b"d/") for p in vault.files.entries)


def test_directory_moving_to_a_free_name_drops_stale_entries_below_it(vault):
    os.makedirs(vault.root / "d")
    (vault.root / "d/old").write_bytes(b"plaintext, no entry")
    os.makedirs(vault.root / "e")
    put(vault, b"e/old", b"E")
    shutil.rmtree(vault.root / "e")  # behind the vault's back: e/old's entry is stale
    vault.rename(b"d", b"e")
    # the stale entry would have made the arriving plaintext file decrypt as garbage
    assert b"e/old" not in vault.files.entries
    assert get(vault, b"e/old") == b"plaintext, no entry"


def test_renaming_a_file_looks_at_no_other_entry(vault, monkeypatch):
    os.makedirs(vault.root / "d")
    put(vault, b"d/x", b"X")
    monkeypatch.setattr(vault.files, "paths_under", lambda top: pytest.fail("scanned"))
    vault.rename(b"d/x", b"d/y")
    assert get(vault, b"d/y") == b"X"


def test_rename_exchange_and_noreplace(vault):
    put(vault, b"a", b"A")
    put(vault, b"b", b"B")
    vault.rename(b"a", b"b", RENAME_EXCHANGE)
    assert (get(vault, b"a"), get(vault, b"b")) == (b"B", b"A")
    entries = dict(vault.files.entries)
    records = vault.files.records
    with pytest.raises(FileExistsError):
        vault.rename(b"a", b"b", RENAME_NOREPLACE)
    with pytest.raises(FileNotFoundError):
        vault.rename(b"a", b"nope", RENAME_EXCHANGE)
    assert vault.files.entries == entries and vault.files.records == records
    vault.rename(b"a", b"c", RENAME_NOREPLACE)
    assert get(vault, b"c") == b"B"
    os.makedirs(vault.root / "d1")
    os.makedirs(vault.root / "d2")
    put(vault, b"d1/f", b"F1")
    vault.rename(b"d1", b"d2", RENAME_EXCHANGE)
    assert get(vault, b"d2/f") == b"F1" and b"d1/f" not in vault.files.entries


def test_failed_rename_is_aborted(vault):
    os.makedirs(vault.root / "full")
    put(vault, b"full/f", b"F")
    put(vault, b"a", b"A")
    with pytest.raises(OSError) as err:
        vault.rename(b"a", b"full")  # a file over a directory
    assert err.value.errno == errno.EISDIR
    assert not vault.files.pending_intents()
    assert get(vault, b"a") == b"A" and get(vault, b"full/f") == b"F"


def test_rename_plaintext_file_over_encrypted_drops_its_entry(vault):
    put(vault, b"enc", b"E")
    (vault.root / "plain").write_bytes(b"P")
    vault.rename(b"plain", b"enc")
    assert b"enc" not in vault.files.entries
    assert get(vault, b"enc") == b"P"


def test_rename_onto_own_hard_link_is_a_no_op(vault):
    put(vault, b"a", b"A")
    vault.link(b"a", b"b")
    vault.rename(b"a", b"b")
    assert get(vault, b"a") == b"A" and get(vault, b"b") == b"A"


def test_link_unlink_and_shared_iv(vault):
    put(vault, b"a", b"A" * 100)
    vault.link(b"a", b"b")
    assert vault.files.entries[b"a"] == vault.files.entries[b"b"]
    with pytest.raises(FileExistsError):
        vault.link(b"a", b"b")
    vault.unlink(b"a")
    assert b"a" not in vault.files.entries
    assert get(vault, b"b") == b"A" * 100
    # nlink > 1 keeps the IV; nlink == 1 gets a fresh one
    vault.link(b"b", b"c")
    iv = vault.files.entries[b"b"].iv
    assert vault.truncate_to_zero(b"b").iv == iv
    vault.unlink(b"c")
    fd = os.open(vault.root / "b", os.O_RDWR)
    try:
        cipher = vault.truncate_to_zero(b"b", fd)
        assert cipher.iv != iv and cipher == vault.cipher_for(b"b")
        content.write_at(fd, cipher, b"new", 0)
    finally:
        os.close(fd)
    assert get(vault, b"b") == b"new"


def test_link_of_plaintext_file(vault):
    (vault.root / "p").write_bytes(b"P")
    vault.link(b"p", b"q")
    assert b"q" not in vault.files.entries and get(vault, b"q") == b"P"


def test_stale_entries_are_met_and_dropped(tmp_path, source, vault):
    put(vault, b"a", b"A")
    os.unlink(vault.root / "a")  # behind the vault's back: the entry is now stale
    vault.files.append([Put(b"ghost", FileInfo("aes-256-ctr", 1, bytes(16)))])
    with pytest.raises(FileNotFoundError):
        vault.link(b"a", b"b")
    assert b"a" not in vault.files.entries  # link met it and dropped it
    for rel, op in ((b"s1", vault.unlink), (b"s2", lambda r: vault.rename(r, b"x")),
                    (b"s3", vault.truncate_to_zero)):
        put(vault, rel, b"S")
        os.unlink(vault.root / os.fsdecode(rel))
        with pytest.raises(FileNotFoundError):
            op(rel)
        assert rel not in vault.files.entries, rel
    put(vault, b"ghost", b"G")  # create over a stale entry
    assert get(vault, b"ghost") == b"G"
    os.unlink(vault.root / "ghost")
    vault.close()
    with Vault.open(tmp_path / "vault", source) as v:
        assert v.recovery.stale == [b"ghost"]
        assert not v.files.entries


def test_recovery_resolves_intents_by_the_tree(tmp_path, source, vault):
    put(vault, b"src1", b"S1")
    put(vault, b"dst1", b"D1")
    put(vault, b"src2", b"S2")
    put(vault, b"dst2", b"D2")
    e = vault.files.entries
    # two intents as a crash would leave them: one rename happened, one did not
    ino = {n: os.lstat(vault.root / n).st_ino for n in ("src1", "src2", "dst2")}
    vault.files.begin(RULE_SRC_GONE, b"src1", ino["src1"],
                      [Del(b"src1"), Del(b"dst1"), Put(b"dst1", e[b"src1"])])
    vault.files.begin(RULE_SRC_GONE, b"src2", ino["src2"],
                      [Del(b"src2"), Del(b"dst2"), Put(b"dst2", e[b"src2"])])
    vault.files.begin(RULE_SRC_GONE, b"src3", 12345, [Del(b"nothing")])
    os.rename(vault.root / "src1", vault.root / "dst1")
    os.mkdir(vault.root / "src1")  # a name made anew after the rename: still happened
    vault.close()
    with Vault.open(tmp_path / "vault", source, mode="check") as v:
        assert v.recovery.committed == [b"src1", b"src3"] and v.recovery.aborted == [b"src2"]
        assert v.files.pending_intents()  # check mode writes nothing
    with Vault.open(tmp_path / "vault", source) as v:
        assert not v.files.pending_intents()
        assert get(v, b"dst1") == b"S1"
        assert get(v, b"src2") == b"S2" and get(v, b"dst2") == b"D2"


def test_vault_is_locked_while_open(tmp_path, source, vault):
    with pytest.raises(VaultError, match="in use"):
        Vault.open(tmp_path / "vault", source)


def test_init_refusals_and_leftovers(tmp_path, source):
    backing = tmp_path / "b"
    (backing / META_DIR).mkdir(parents=True)  # an empty .tdefs is fine
    (backing / ".tdefs.init").mkdir()  # left by a crashed init
    (backing / ".tdefs.init" / "junk").write_bytes(b"x")
    Vault.create(backing, source).close()
    assert not (backing / ".tdefs.init").exists()
    with pytest.raises(VaultError, match="already holds a vault"):
        Vault.create(backing, source)
    with pytest.raises(VaultError, match="not a tdefs vault"):
        Vault.open(tmp_path, source)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(VaultError):
        Vault.create(tmp_path / "file", source)


@pytest.mark.parametrize("method", ["aes-128-ctr", "aes-192-ctr", "sm4-ctr", "plaintext"])
def test_methods(tmp_path, source, method):
    with Vault.create(tmp_path / method, source, method=method) as v:
        put(v, b"f", b"data" * 10)
        assert get(v, b"f") == b"data" * 10
        if method == "plaintext":
            assert not v.files.entries and raw(v, b"f") == b"data" * 10
        else:
            assert v.files.entries[b"f"].method == method and raw(v, b"f") != b"data" * 10


def test_rotation_new_files_use_new_key_and_retire_keeps_used_keys(vault):
    put(vault, b"old", b"O")
    new_id = vault.keys.rotate()
    put(vault, b"new", b"N")
    assert vault.files.entries[b"new"].key_id == new_id
    assert vault.files.entries[b"old"].key_id != new_id
    assert vault.retire_unused_keys() == []  # key 1 is still used by "old"
    vault.unlink(b"old")
    assert vault.retire_unused_keys() == [1]
    assert [k.id for k in vault.keys.list()] == [new_id]


def test_concurrent_operations(tmp_path, source, vault):
    errors = []

    def worker(t: int) -> None:
        try:
            os.makedirs(vault.root / f"t{t}", exist_ok=True)
            for i in range(15):
                put(vault, f"t{t}/f{i}".encode(), f"{t}-{i}".encode())
                if i % 3 == 0:
                    vault.rename(f"t{t}/f{i}".encode(), f"t{t}/r{i}".encode())
                if i % 5 == 0:
                    j = max(i - 1, 0)
                    vault.unlink(f"t{t}/{'r' if j % 3 == 0 else 'f'}{j}".encode())
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    expected = {}
    for dirpath, _, names in os.walk(vault.root):
        if META_DIR in Path(dirpath).parts:
            continue
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), vault.root).encode()
            expected[rel] = get(vault, rel)
    vault.close()
    with Vault.open(tmp_path / "vault", source) as v:
        assert not v.recovery.stale
        assert {rel: get(v, rel) for rel in expected} == expected
        assert set(v.files.entries) == set(expected)


def test_lookups_wait_for_a_rename_in_flight(vault, monkeypatch):
    import encfs.backing as backing_module

    put(vault, b"CURRENT", b"old")
    put(vault, b"CURRENT.tmp", b"new")
    new_cipher = vault.cipher_for(b"CURRENT.tmp")
    seen, blocked = [], []
    real = backing_module.renameat2

    def renaming(src, dst, flags, **dir_fds):
        real(src, dst, flags, **dir_fds)
        # the tree is renamed, the entries not yet: a lookup now must wait
        t = threading.Thread(target=lambda: seen.append(vault.cipher_for(b"CURRENT")))
        t.start()
        t.join(0.05)
        blocked.append(t.is_alive())
        threads.append(t)

    threads: list[threading.Thread] = []
    monkeypatch.setattr(backing_module, "renameat2", renaming)
    vault.rename(b"CURRENT.tmp", b"CURRENT")
    threads[0].join(5)
    assert blocked == [True]
    assert seen == [new_cipher]


def test_missing_metadata_files_are_vault_errors(tmp_path, source):
    for name in ("files.dict", "keys.dict"):
        backing = tmp_path / name
        Vault.create(backing, source).close()
        (backing / META_DIR / name).unlink()
        with pytest.raises(VaultError, match="missing"):
            Vault.open(backing, source)


def _abandon(vault: Vault) -> None:
    """Drop the vault as a crash would: nothing flushed, nothing written."""
    os.close(vault.files._fd)
    vault.files._fd = -1
    os.close(vault._lock_fd)
    vault._lock_fd = -1


def test_a_power_cut_that_undoes_an_unlink_leaves_the_file_readable(tmp_path, source, vault):
    put(vault, b"a", b"A" * 100)
    saved = raw(vault, b"a")
    vault.unlink(b"a")
    put(vault, b"b", b"B")  # a later durable record: the log moves on
    _abandon(vault)
    # the unlink never reached the disk, the log's later records did
    (vault.root / "a").write_bytes(saved)
    with Vault.open(tmp_path / "vault", source) as v:
        assert get(v, b"a") == b"A" * 100 and get(v, b"b") == b"B"
    # and when the unlink did reach the disk, the entry is simply stale
    with Vault.open(tmp_path / "vault", source) as v:
        v.unlink(b"a")
        _abandon(v)
    with Vault.open(tmp_path / "vault", source) as v:
        assert v.recovery.stale == [b"a"]


def test_deferred_deletes_are_flushed_at_the_limit_and_on_close(tmp_path, source, vault, monkeypatch):
    import encfs.vault as vault_module

    monkeypatch.setattr(vault_module, "DEFERRED_DELETES_MAX", 5)
    for i in range(12):
        put(vault, b"f%d" % i, b"x")
    for i in range(12):
        vault.unlink(b"f%d" % i)
        assert vault.files.deferred_count() < 5
    assert vault.files.deferred_count()
    vault.close()
    with Vault.open(tmp_path / "vault", source) as v:
        assert not v.files.entries and not v.recovery.stale  # every DEL was written


def test_plaintext_file_renamed_or_linked_onto_a_deleted_name(tmp_path, source, vault):
    put(vault, b"a", b"A")
    put(vault, b"b", b"B")
    vault.unlink(b"a")
    vault.unlink(b"b")
    (vault.root / "p").write_bytes(b"plain p")
    (vault.root / "q").write_bytes(b"plain q")
    vault.rename(b"p", b"a")
    vault.link(b"q", b"b")
    _abandon(vault)  # whatever was only in memory is lost
    with Vault.open(tmp_path / "vault", source) as v:
        assert get(v, b"a") == b"plain p" and get(v, b"b") == b"plain q"


def test_rename_onto_a_name_whose_delete_is_deferred(tmp_path, source, vault):
    put(vault, b"a", b"old a")
    put(vault, b"b", b"new a")
    vault.unlink(b"a")
    vault.rename(b"b", b"a")  # the COMMIT record also carries a's deferred DEL
    assert get(vault, b"a") == b"new a"
    vault.close()
    with Vault.open(tmp_path / "vault", source) as v:
        assert get(v, b"a") == b"new a" and set(v.files.entries) == {b"a"}


def test_flush_after_the_directory_itself_is_gone(tmp_path, source, vault):
    os.makedirs(vault.root / "d/e")
    put(vault, b"d/e/f", b"x")
    vault.unlink(b"d/e/f")
    os.rmdir(vault.root / "d/e")
    os.rmdir(vault.root / "d")
    vault.close()  # fsyncs the nearest directory still there, then writes the DEL
    with Vault.open(tmp_path / "vault", source) as v:
        assert not v.files.entries and not v.recovery.stale


def test_rotation_period(vault):
    created = vault.keys.active.created
    assert vault.options["rotation_period_days"] == 7
    assert not vault.rotation_due(created + 6 * 86400)
    assert vault.rotate_if_due(created + 6 * 86400) is None
    new_id = vault.rotate_if_due(created + 7 * 86400)
    assert new_id == 2 and vault.keys.active_id == 2
    vault.options["rotation_period_days"] = 0  # off
    assert not vault.rotation_due(created + 1000 * 86400)
