"""files.dict's snapshot rewrite does not stop writers and loses nothing they append
meanwhile: the race is made deterministic with sync points."""

from __future__ import annotations

import errno
import os
import threading

import pytest

import encfs.filedict as filedict
from encfs import content
from encfs.filedict import RULE_SRC_GONE, Commit, Del, FileDictionary, FileInfo, Put
from encfs.masterkey import MasterKeySource, generate_key_file
from encfs.reencrypt import Reencryptor
from encfs.sync_points import hooked
from encfs.vault import Vault

MAC_KEY = bytes(range(32))


def info(n: int) -> FileInfo:
    return FileInfo("aes-256-ctr", 1, n.to_bytes(16, "big"))


def paused_rewrite(d: FileDictionary):
    """Start d.rewrite() in a thread that stops right after it read the log; returns
    (let it go, join it)."""
    reached, go = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hook() -> None:
        reached.set()
        assert go.wait(30)

    def run() -> None:
        try:
            with hooked("dict.rewrite.after-read", hook):
                d.rewrite()
        except BaseException as exc:  # noqa: BLE001 - reported by join
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    assert reached.wait(30)

    def join() -> None:
        go.set()
        t.join(30)
        assert not t.is_alive() and not errors, errors

    return join


def test_appends_made_while_the_snapshot_is_built_are_kept(tmp_path):
    FileDictionary.create(tmp_path / "files.dict", MAC_KEY)
    d = FileDictionary.open(tmp_path / "files.dict", MAC_KEY)
    for i in range(200):
        d.append([Put(f"old{i}".encode(), info(i))], sync=False)
    for i in range(0, 200, 2):
        d.append([Del(f"old{i}".encode())], sync=False)
    open_txid = d.begin(RULE_SRC_GONE, b"old1", 7, [Del(b"old1"), Put(b"moved", info(1))])
    join = paused_rewrite(d)
    # meanwhile, from this thread: puts, deletes, an intent committed and one applied
    for i in range(50):
        d.append([Put(f"new{i}".encode(), info(1000 + i))], sync=i % 10 == 0)
    d.append([Del(b"old3")])
    t = d.begin(RULE_SRC_GONE, b"old5", 9, [Del(b"old5"), Put(b"five", info(5))])
    d.append([Commit(t)])
    applied = d.begin(RULE_SRC_GONE, b"old7", 11, [Del(b"old7"), Put(b"seven", info(7))])
    d.apply_intent(applied)
    before = dict(d.entries)
    join()
    assert d.rewrites == 1 and d.generation == 2
    d.append([Put(b"after", info(9999))])  # chains onto the new log
    expected = {**before, b"after": info(9999)}
    assert d.entries == expected
    again = FileDictionary.open(tmp_path / "files.dict", MAC_KEY)
    # the applied intent is still open on disk (its COMMIT is not written), as before
    pending = {p.txid for p in again.pending_intents()}
    assert pending == {open_txid, applied}
    assert {k: v for k, v in again.entries.items() if k not in (b"old7", b"seven")} == \
        {k: v for k, v in expected.items() if k not in (b"old7", b"seven")}
    # one record of entries and the open intent's, then the 54 spliced and "after":
    # not the 300-odd records it replaced
    assert again.records == 2 + 54 + 1
    d.close()


def test_a_vault_keeps_working_and_loses_nothing_during_a_rewrite(tmp_path):
    key = tmp_path / "k"
    generate_key_file(key)
    source = MasterKeySource.key_file(key)
    v = Vault.create(tmp_path / "v", source)
    try:
        data = {}
        for i in range(30):
            rel = f"f{i}".encode()
            fd, cipher = v.create(rel, os.O_RDWR, 0o644)
            content.write_at(fd, cipher, rel * 100, 0)
            os.close(fd)
            data[rel] = rel * 100
        v.keys.rotate()
        join = paused_rewrite(v.files)
        # the mount's operations and re-encryption append while it is paused
        fd, cipher = v.create(b"during", os.O_RDWR, 0o644)
        content.write_at(fd, cipher, b"made during the rewrite", 0)
        os.close(fd)
        data[b"during"] = b"made during the rewrite"
        v.rename(b"f1", b"renamed")
        data[b"renamed"] = data.pop(b"f1")
        v.unlink(b"f2")
        del data[b"f2"]
        v.truncate_to_zero(b"f3")
        data[b"f3"] = b""
        reencryptor = Reencryptor(v)
        for job in reencryptor.pending()[:5]:
            reencryptor.switch(reencryptor.copy(job))
        join()
        assert v.files.rewrites == 1
    finally:
        v.close()
    with Vault.open(tmp_path / "v", source) as v:
        assert not (v.recovery.stale or v.recovery.aborted)
        for rel, plain in data.items():
            fd = v.tree.open(rel, os.O_RDONLY)
            try:
                assert content.read_at(fd, v.cipher_for(rel), 10_000, 0) == plain, rel
            finally:
                os.close(fd)
        assert sorted(p for p, _ in v.files.items()) == sorted(data)


def test_a_failure_after_the_swap_refuses_appends_that_would_go_to_the_old_log(
        tmp_path, monkeypatch):
    """If the directory fsync after the rename fails, the open descriptor still names the
    replaced log: an append there would vanish at the next open. It is refused instead,
    and a reopen finds every record written before."""
    path = tmp_path / "files.dict"
    FileDictionary.create(path, MAC_KEY)
    d = FileDictionary.open(path, MAC_KEY)
    for n in range(50):
        d.append([Put(b"f%d" % n, info(n))], sync=True)

    def failing_fsync_dir(where):
        raise OSError(errno.EIO, "injected", str(where))

    monkeypatch.setattr(filedict, "fsync_dir", failing_fsync_dir)
    with pytest.raises(OSError, match="injected"):
        d.rewrite()
    monkeypatch.undo()
    with pytest.raises(OSError, match="reopen the vault"):
        d.append([Put(b"late", info(99))], sync=True)
    d.close()
    again = FileDictionary.open(path, MAC_KEY)
    assert sorted(p for p, _ in again.items()) == sorted(b"f%d" % n for n in range(50))
    again.close()
