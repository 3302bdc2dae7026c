"""Random operation sequences on a vault and on a plain directory must agree.

Every step runs the same operation through the vault and with plain os calls on a
reference directory; both must fail alike or succeed alike, and after every step the
vault's tree, decrypted, equals the reference tree. The vault is sometimes closed and
reopened (recovery must find nothing to do)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from encfs import content
from encfs.fsops import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from encfs.masterkey import MasterKeySource, generate_key_file
from encfs.vault import META_DIR, Vault

# few names, so operations often meet each other's names
NAMES = ["f", "g", "d", "d/f", "e/f", "d/s/f"]
DIRS = ["d", "e", "d/s"]

_rename = st.tuples(st.just("rename"), st.sampled_from(NAMES), st.sampled_from(NAMES),
                    st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
ops = st.one_of(
    _rename,
    _rename,
    _rename,
    st.tuples(st.just("write"), st.sampled_from(NAMES), st.integers(0, 300), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("rewrite"), st.sampled_from(NAMES), st.binary(max_size=64)),
    st.tuples(st.just("link"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("unlink"), st.sampled_from(NAMES)),
    st.tuples(st.just("unlink"), st.sampled_from(NAMES)),
    st.tuples(st.just("mkdir"), st.sampled_from(DIRS)),
    st.tuples(st.just("rmdir"), st.sampled_from(DIRS)),
    st.tuples(st.just("truncate"), st.sampled_from(NAMES)),
    st.tuples(st.just("reopen")),
)


def tree(root: Path, read) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and META_DIR in dirnames:
            dirnames.remove(META_DIR)
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for n in filenames:
            rel = os.path.relpath(os.path.join(dirpath, n), root)
            out[rel] = read(rel)
    return out


def outcome(fn) -> str:
    try:
        fn()
        return "ok"
    except OSError as exc:
        return f"errno {exc.errno}"


class Pair:
    def __init__(self, base: Path, source: MasterKeySource) -> None:
        self.ref = base / "ref"
        self.ref.mkdir()
        self.source = source
        self.backing = base / "vault"
        self.vault = Vault.create(self.backing, source)

    def vault_read(self, rel: str) -> bytes:
        fd = os.open(self.backing / rel, os.O_RDONLY)
        try:
            return content.read_at(fd, self.vault.cipher_for(rel.encode()), 1 << 16, 0)
        finally:
            os.close(fd)

    def step(self, op: tuple) -> None:
        kind, *args = op
        if kind == "reopen":
            self.vault.close()
            self.vault = Vault.open(self.backing, self.source)
            rec = self.vault.recovery
            assert not (rec.stale or rec.committed or rec.aborted or rec.dropped_tail)
            return
        ref = getattr(self, f"ref_{kind}")
        enc = getattr(self, f"enc_{kind}")
        got_ref = outcome(lambda: ref(*args))
        got_enc = outcome(lambda: enc(*args))
        assert got_enc == got_ref, (op, got_enc, got_ref)

    # writes: open (creating if needed) and write at an offset / from scratch
    def ref_write(self, rel, off, data):
        with open(os.open(self.ref / rel, os.O_RDWR | os.O_CREAT, 0o644), "r+b") as f:
            f.seek(off)
            f.write(data)

    def enc_write(self, rel, off, data):
        fd, cipher = self.vault.create(rel.encode(), os.O_RDWR, 0o644)
        try:
            content.write_at(fd, cipher, data, off)
        finally:
            os.close(fd)

    def ref_rewrite(self, rel, data):
        fd = os.open(self.ref / rel, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)

    def enc_rewrite(self, rel, data):
        fd, cipher = self.vault.create(rel.encode(), os.O_RDWR | os.O_TRUNC, 0o644)
        try:
            content.write_at(fd, cipher, data, 0)
        finally:
            os.close(fd)

    def ref_rename(self, a, b, flags):
        renameat2(self.ref / a, self.ref / b, flags)

    def enc_rename(self, a, b, flags):
        self.vault.rename(a.encode(), b.encode(), flags)

    def ref_link(self, a, b):
        os.link(self.ref / a, self.ref / b, follow_symlinks=False)

    def enc_link(self, a, b):
        self.vault.link(a.encode(), b.encode())

    def ref_unlink(self, a):
        os.unlink(self.ref / a)

    def enc_unlink(self, a):
        self.vault.unlink(a.encode())

    def ref_mkdir(self, d):
        os.mkdir(self.ref / d)

    def enc_mkdir(self, d):
        os.mkdir(self.backing / d)  # directories have no entries: plain os calls

    def ref_rmdir(self, d):
        os.rmdir(self.ref / d)

    def enc_rmdir(self, d):
        os.rmdir(self.backing / d)

    def ref_truncate(self, a):
        if not stat.S_ISREG(os.lstat(self.ref / a).st_mode):
            raise IsADirectoryError(21, "dir")
        os.truncate(self.ref / a, 0)

    def enc_truncate(self, a):
        if not stat.S_ISREG(os.lstat(self.backing / a).st_mode):
            raise IsADirectoryError(21, "dir")
        self.vault.truncate_to_zero(a.encode())


@settings(max_examples=int(os.environ.get("TDEFS_MODEL_EXAMPLES", "100")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(ops, min_size=1, max_size=25))
# sequences that once went wrong, or nearly: a name deleted then renamed onto, linked
# onto, or emptied inside a directory that then moves
@example(steps=[("unlink", "f"), ("rename", "d/f", "f", 0), ("reopen",)])
@example(steps=[("unlink", "f"), ("link", "e/f", "f"), ("reopen",)])
@example(steps=[("unlink", "d/f"), ("rename", "d", "e", 0), ("write", "d/f", 0, b"x"), ("reopen",)])
@example(steps=[("unlink", "d/s/f"), ("rename", "d", "e", RENAME_EXCHANGE), ("reopen",)])
@example(steps=[("rewrite", "e/f", b"new"), ("unlink", "f"), ("rename", "e/f", "f", RENAME_NOREPLACE)])
def test_vault_agrees_with_a_plain_directory(tmp_path_factory, steps):
    base = tmp_path_factory.mktemp("model")
    key = base / "k"
    generate_key_file(key)
    pair = Pair(base, MasterKeySource.key_file(key))
    start = [("mkdir", "d"), ("mkdir", "e"), ("mkdir", "d/s"), ("write", "f", 0, b"F" * 40),
             ("write", "d/f", 0, b"DF" * 20), ("write", "d/s/f", 5, b"DSF" * 10), ("link", "f", "e/f")]
    try:
        for op in start + steps:
            pair.step(op)
            expected = tree(pair.ref, lambda rel: (pair.ref / rel).read_bytes())
            assert tree(pair.backing, pair.vault_read) == expected, op
            for rel in pair.vault.files.entries:  # no stale entries appear in normal use
                assert (pair.backing / os.fsdecode(rel)).is_file()
        pair.vault.close()
        pair.vault = Vault.open(pair.backing, pair.source)
        assert tree(pair.backing, pair.vault_read) == tree(pair.ref, lambda r: (pair.ref / r).read_bytes())
    finally:
        pair.vault.close()
        shutil.rmtree(base, ignore_errors=True)
