"""The durability order of every vault operation, traced call by call.

Process crashes are covered by tests/crash; a power cut also loses whatever was not
synced, so the order of syncs matters too. These tests record the calls each
operation makes (log writes and fdatasyncs, file and directory fsyncs, the tree
change) and check the order DESIGN.md and docs/vault-format.md promise."""

from __future__ import annotations

import os
import stat

import pytest

import encfs.backing as backing_module
import encfs.filedict as filedict_module
from encfs.disk import disk
from encfs.filedict import Del
from encfs.fsops import RENAME_EXCHANGE
from encfs.masterkey import MasterKeySource, generate_key_file
from encfs.vault import Vault


@pytest.fixture
def traced(tmp_path, monkeypatch, request):
    key = tmp_path / "k"
    generate_key_file(key)
    durability = getattr(request, "param", "strict")
    vault = Vault.create(tmp_path / "v", MasterKeySource.key_file(key), durability=durability)
    os.mkdir(vault.root / "d")
    for rel in (b"a", b"b", b"d/x"):
        fd, _ = vault.create(rel, os.O_WRONLY, 0o644)
        os.close(fd)
    log: list[str] = []
    log_fd = lambda: vault.files._fd  # noqa: E731

    def wrap(module, name, label):
        real = getattr(module, name)

        def traced_call(*args, **kwargs):
            tag = label(*args) if callable(label) else label
            if tag:
                log.append(tag)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, traced_call)

    wrap(filedict_module, "write_all", lambda fd, data: "log.write" if fd == log_fd() else None)
    wrap(disk, "fdatasync", lambda fd: "log.sync" if fd == log_fd() else "fdatasync")
    # fsync_dir's own fsync of the directory is traced as dir.fsync already
    wrap(disk, "fsync", lambda fd: "file.fsync" if stat.S_ISREG(os.fstat(fd).st_mode) else None)
    wrap(backing_module, "fsync_dir", "dir.fsync")
    wrap(backing_module, "renameat2", "rename")
    wrap(disk, "unlink", "unlink")
    wrap(disk, "link", "link")
    wrap(disk, "ftruncate", lambda fd, n: "truncate" if fd != log_fd() else None)
    wrap(disk, "open", lambda path, flags, *a, **k: "create" if flags & os.O_CREAT else None)
    yield vault, log
    monkeypatch.undo()
    vault.close()


def test_create_entry_durable_before_the_file(traced):
    vault, log = traced
    os.close(vault.create(b"new", os.O_WRONLY, 0o644)[0])
    assert log == ["log.write", "log.sync", "create"]


def test_unlink_defers_its_delete_record_until_the_unlink_is_durable(traced):
    vault, log = traced
    vault.unlink(b"a")
    vault.unlink(b"b")
    vault.unlink(b"d/x")
    assert log == ["unlink", "unlink", "unlink"]
    assert set(vault.files.deferred_paths()) == {b"a", b"b", b"d/x"} and not vault.files.has_entry(b"a")
    del log[:]
    vault.flush_deletes()  # one fsync per directory, then one record
    assert log == ["dir.fsync", "dir.fsync", "log.write"]
    assert not vault.files.deferred_count()


def test_a_name_deleted_then_made_again(traced):
    vault, log = traced
    vault.unlink(b"a")
    os.close(vault.create(b"a", os.O_WRONLY, 0o644)[0])
    # the old file's removal is durable before the new entry can be
    assert log == ["unlink", "dir.fsync", "log.write", "log.sync", "create"]
    del log[:]
    vault.unlink(b"b")
    (vault.root / "plain").write_bytes(b"p")
    del log[:]
    vault.link(b"plain", b"b")  # a plaintext file under a name whose entry is deferred
    assert log == ["dir.fsync", "log.write", "log.sync", "link"]
    assert not vault.files.has_entry(b"b") and not vault.files.deferred_count()


def test_a_directory_rename_carries_the_deletes_its_fsync_made_durable(traced):
    vault, log = traced
    vault.unlink(b"a")
    vault.unlink(b"d/x")
    del log[:]
    vault.rename(b"d", b"g")
    # d/x's unlink made durable before the intent; a's by the fsync after the rename
    assert log == ["dir.fsync", "log.write", "log.sync", "rename", "dir.fsync", "log.write"]
    assert not vault.files.deferred_count()


def test_file_renames_commit_in_batches(traced):
    vault, log = traced
    vault.unlink(b"d/x")
    del log[:]
    vault.rename(b"a", b"a2")
    vault.rename(b"b", b"d/b2")
    # each intent durable before its rename; no directory fsync yet, no COMMIT
    assert log == ["log.write", "log.sync", "rename"] * 2
    assert vault.files.applied_count() == 2 and not vault.files.pending_intents()
    assert vault.files.entries.keys() >= {b"a2", b"d/b2"}
    del log[:]
    vault.flush_deletes()  # one fsync per directory, then the DELs and COMMITs together
    assert log == ["dir.fsync", "dir.fsync", "log.write"]
    assert not vault.files.applied_count() and not vault.files.deferred_count()


def test_a_name_held_by_an_uncommitted_rename_is_committed_before_it_is_touched(traced):
    vault, log = traced
    steps = [
        ((b"a", b"x"), lambda: vault.truncate_to_zero(b"x")),  # the new name
        ((b"x", b"y"), lambda: os.close(vault.create(b"x", os.O_WRONLY, 0o644)[0])),  # the old
        ((b"y", b"z"), lambda: vault.link(b"z", b"w")),
        ((b"z", b"q"), lambda: vault.unlink(b"q")),
        ((b"w", b"v"), lambda: vault.rename(b"v", b"d/v")),
    ]
    for (src, dst), touch in steps:
        vault.rename(src, dst)
        assert vault.files.applied_count()
        del log[:]
        touch()
        assert log[:2] == ["dir.fsync", "log.write"], (src, dst, log)  # the COMMIT first
    vault.rename(b"b", b"u")
    with pytest.raises(RuntimeError):  # and the log itself refuses a record out of order
        vault.files.append([Del(b"u")])


def test_a_directory_rename_commits_waiting_file_renames_first(traced):
    vault, log = traced
    vault.rename(b"d/x", b"d/y")
    del log[:]
    vault.rename(b"d", b"e")
    assert log[:2] == ["dir.fsync", "log.write"]  # the file rename's COMMIT
    assert log[-2:] == ["dir.fsync", "log.write"]  # the directory's own, at once


def test_sync_commits_waiting_renames(traced):
    vault, log = traced
    vault.rename(b"a", b"z")
    del log[:]
    vault.sync()
    assert log == ["dir.fsync", "log.write", "log.sync"]
    assert not vault.files.applied_count()


def test_a_directory_rename_settles_deletes_inside_it_first(traced):
    vault, log = traced
    vault.unlink(b"d/x")
    del log[:]
    vault.rename(b"d", b"e")
    assert log == ["dir.fsync", "log.write", "log.sync", "rename", "dir.fsync", "log.write"]
    assert not vault.files.deferred_count()


def test_link_entry_durable_before_the_link(traced):
    vault, log = traced
    vault.link(b"a", b"c")
    assert log == ["log.write", "log.sync", "link"]


def test_truncate_durable_before_the_fresh_iv(traced):
    vault, log = traced
    (vault.root / "a").write_bytes(b"old bytes")
    vault.truncate_to_zero(b"a")
    assert log == ["truncate", "file.fsync", "log.write", "log.sync"]
    del log[:]
    vault.truncate_to_zero(b"a")  # empty already: nothing to make durable first
    assert log == ["truncate", "log.write", "log.sync"]


@pytest.mark.parametrize("src,dst,flags,dirs,before", [
    (b"a", b"b", 0, 1, 1),  # over an existing file
    (b"a", b"d/y", 0, 2, 0),  # across directories
    (b"d", b"e", 0, 1, 0),  # a directory
    (b"a", b"b", RENAME_EXCHANGE, 1, 1),
])
def test_rename_intent_then_rename_then_durable_rename_then_commit(traced, src, dst, flags, dirs,
                                                                     before):
    vault, log = traced
    vault.rename(src, dst, flags)
    vault.flush_deletes()  # a file rename's COMMIT waits for this; a directory's does not
    # over an existing name, src's own creation is made durable before the intent
    # (recovery reads a missing src as a rename that happened); the COMMIT is not
    # synced: an intent without it resolves by the tree alike
    assert log == [*["dir.fsync"] * before, "log.write", "log.sync", "rename",
                   *["dir.fsync"] * dirs, "log.write"]


@pytest.mark.parametrize("traced", ["ordered"], indirect=True)
def test_ordered_mode_writes_in_order_without_syncing(traced):
    vault, log = traced
    os.close(vault.create(b"new", os.O_WRONLY, 0o644)[0])
    vault.rename(b"a", b"b")
    vault.link(b"b", b"c")
    vault.truncate_to_zero(b"new")
    vault.unlink(b"c")
    vault.flush_deletes()
    assert log == ["log.write", "create", "log.write", "rename", "log.write", "log.write", "link",
                   "truncate", "log.write", "unlink", "log.write"]
    del log[:]
    vault.sync()
    # the directory of the rename and the unlink first: the log must not say they
    # happened while a power cut could still undo them
    assert log == ["dir.fsync", "log.sync"]
