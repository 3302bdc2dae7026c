"""Per-file copies of entries (encfs/entry_copy.py) and what fsck does with them."""

from __future__ import annotations

import os
import random

import pytest

from encfs import content, entry_copy, fsck
from encfs.filedict import Del, FileInfo
from encfs.masterkey import MasterKeySource, generate_key_file
from encfs.vault import META_DIR, Vault


@pytest.fixture
def source(tmp_path) -> MasterKeySource:
    key = tmp_path / "master.key"
    generate_key_file(key)
    return MasterKeySource.key_file(key)


@pytest.fixture
def backing(tmp_path, source):
    v = Vault.create(tmp_path / "vault", source)
    v.close()
    return tmp_path / "vault"


def fill(backing, source, names: list[str], size: int = 300) -> dict[str, bytes]:
    """One file (and one files.dict record) per name, with random contents."""
    rng = random.Random(7)
    data = {}
    with Vault.open(backing, source) as v:
        for name in names:
            data[name] = rng.randbytes(size)
            fd, cipher = v.create(name.encode(), os.O_RDWR, 0o644)
            content.write_at(fd, cipher, data[name], 0)
            os.close(fd)
    return data


def read_all(backing, source, names) -> dict[str, bytes]:
    with Vault.open(backing, source) as v:
        out = {}
        for name in names:
            fd = os.open(backing / name, os.O_RDONLY)
            out[name] = content.read_at(fd, v.cipher_for(name.encode()), 1 << 16, 0)
            os.close(fd)
        return out


def copy_of(backing, name: str) -> bytes:
    return os.getxattr(backing / name, entry_copy.XATTR)


def test_copies_follow_create_truncate_rename_and_link(backing, source):
    with Vault.open(backing, source) as v:
        assert v.copies.enabled
        fd, _ = v.create(b"a", os.O_RDWR, 0o644)
        os.close(fd)
        first = v.copies.decode(copy_of(backing, "a"))
        assert first == v.files.entries[b"a"]
        v.truncate_to_zero(b"a")  # a fresh IV: the copy follows
        second = v.copies.decode(copy_of(backing, "a"))
        assert second == v.files.entries[b"a"] and second.iv != first.iv
        v.rename(b"a", b"b")
        v.link(b"b", b"c")
        assert v.copies.decode(copy_of(backing, "c")) == v.files.entries[b"c"] == second
    value = bytearray(copy_of(backing, "b"))
    value[10] ^= 1
    os.setxattr(backing / "b", entry_copy.XATTR, bytes(value))
    with Vault.open(backing, source) as v:
        assert isinstance(v.copies.decode(bytes(value)), entry_copy.Damaged)


def test_a_missing_or_stale_copy_is_made_right_before_the_first_write(backing, source):
    with Vault.open(backing, source) as v:
        os.close(v.create(b"a", os.O_RDWR, 0o644)[0])
        os.removexattr(backing / "a", entry_copy.XATTR)  # a crash before the copy
        fd, _ = v.create(b"a", os.O_RDWR, 0o644)  # opened for writing again
        os.close(fd)
        assert v.copies.decode(copy_of(backing, "a")) == v.files.entries[b"a"]
        stale = v.copies.encode(FileInfo("aes-256-ctr", 1, bytes(16)))
        os.setxattr(backing / "a", entry_copy.XATTR, stale)
        fd, _ = v.create(b"a", os.O_RDWR, 0o644)
        os.close(fd)
        assert v.copies.decode(copy_of(backing, "a")) == v.files.entries[b"a"]


@pytest.mark.parametrize("damage", ["payload", "length", "two records"])
def test_repair_of_a_damaged_dictionary_loses_no_file(backing, source, damage):
    names = [f"d{i // 20}/f{i}" for i in range(120)]
    for d in {n.split("/")[0] for n in names}:
        os.mkdir(backing / d)
    data = fill(backing, source, names)
    log = backing / META_DIR / "files.dict"
    raw = bytearray(log.read_bytes())
    record = (len(raw) - 68) // len(names)
    middle = 68 + 60 * record
    if damage == "payload":
        raw[middle + 20] ^= 0x10
    elif damage == "length":
        raw[middle + 1] ^= 0x01
    else:
        raw[middle + 20] ^= 0x10
        raw[middle + 30 * record + 8] ^= 0x40
    log.write_bytes(bytes(raw))
    checked = fsck.check(backing, source)
    assert checked.corruption is not None and not checked.clean_after
    repaired = fsck.check(backing, source, repair=True)
    lost = 2 if damage == "two records" else 1
    assert repaired.salvage.lost_records == lost and len(repaired.restored) == lost
    assert repaired.clean_after and not repaired.suspect
    assert read_all(backing, source, names) == data
    after = fsck.check(backing, source)
    assert after.clean_after and not after.problems and after.encrypted == len(names)


def test_a_deleted_dictionary_is_rebuilt_from_the_copies(backing, source):
    names = [f"f{i}" for i in range(30)]
    data = fill(backing, source, names)
    (backing / "plain.txt").write_bytes(b"a file from before the vault\n")
    os.unlink(backing / META_DIR / "files.dict")
    with pytest.raises(Exception, match="files.dict is missing.*fsck --repair"):
        Vault.open(backing, source)
    report = fsck.check(backing, source, repair=True)
    assert report.recovery.new_dictionary and report.clean_after
    assert sorted(report.restored) == sorted(n.encode() for n in names)
    assert report.plaintext == [b"plain.txt"]
    assert read_all(backing, source, names) == data


def test_files_that_still_read_as_garbage_are_named_and_fail_fsck(backing, source):
    data = fill(backing, source, ["lost", "kept"], size=5000)
    (backing / "notes.txt").write_bytes(b"plain text\n" * 100)
    # the entry and the copy of "lost" are both gone: nothing says how it is encrypted
    os.removexattr(backing / "lost", entry_copy.XATTR)
    with Vault.open(backing, source) as v:
        v.files.append([Del(b"lost")])
    for repair in (False, True):
        report = fsck.check(backing, source, repair=repair)
        assert report.suspect == [b"lost"] and report.plaintext == [b"notes.txt"]
        assert not report.clean_after
    assert read_all(backing, source, ["kept"]) == {"kept": data["kept"]}


def test_a_copy_that_disagrees_with_an_intact_dictionary_loses_to_it(backing, source):
    data = fill(backing, source, ["a"])
    with Vault.open(backing, source) as v:
        truth = v.files.entries[b"a"]
        other = FileInfo(truth.method, truth.key_id, bytes(16))
        os.setxattr(backing / "a", entry_copy.XATTR, v.copies.encode(other))
    report = fsck.check(backing, source)
    assert report.conflicts == [b"a"] and not report.clean_after
    report = fsck.check(backing, source, repair=True)
    assert report.clean_after
    assert fsck.check(backing, source).clean_after
    assert read_all(backing, source, ["a"]) == data


def test_without_user_xattrs_copies_are_off_and_fsck_says_so(tmp_path, source, monkeypatch):
    monkeypatch.setattr(entry_copy, "supported", lambda path: False)
    v = Vault.create(tmp_path / "v", source)
    try:
        assert not v.copies.enabled
        os.close(v.create(b"a", os.O_RDWR, 0o644)[0])
    finally:
        v.close()
    with pytest.raises(OSError):
        copy_of(tmp_path / "v", "a")
    report = fsck.check(tmp_path / "v", source)
    assert not report.copies_enabled and report.clean_after


def test_looks_encrypted():
    rng = random.Random(1)
    assert fsck.looks_encrypted(rng.randbytes(20000))
    assert fsck.looks_encrypted(rng.randbytes(100))
    assert not fsck.looks_encrypted(b"")
    assert not fsck.looks_encrypted(b"some text\n" * 500)
    assert not fsck.looks_encrypted(bytes(4096))
    assert not fsck.looks_encrypted(b"\x1f\x8b" + rng.randbytes(5000))  # gzip
    structured = b"".join(i.to_bytes(8, "little") + b"\x00" * 8 for i in range(1000))
    assert not fsck.looks_encrypted(structured)
