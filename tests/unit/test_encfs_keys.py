"""Master key backends and the sealed keys.dict."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import pytest

from encfs.errors import Corruption, TdefsError, VaultError, WrongMasterKey
from encfs.keystore import KeyStore
from encfs.masterkey import MasterKeySource, generate_key_file, read_key_file
from encfs.vault import Vault
from mount.key_options import _ask_passphrase, add_key_options, source_from_args

FAST_N = 1 << 10  # scrypt cost for tests; real vaults use SCRYPT_N


def tree_snapshot(root: Path) -> dict[str, tuple[bytes | None, int, int]]:
    """Every path under root with its bytes, mtime and mode: proof nothing was touched."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            data = p.read_bytes() if p.is_file() else None
            snap[str(p.relative_to(root))] = (data, st.st_mtime_ns, st.st_mode)
    st = root.stat()
    snap["."] = (None, st.st_mtime_ns, st.st_mode)
    return snap


def make_vault(tmp_path: Path, source: MasterKeySource) -> Path:
    backing = tmp_path / "vault"
    with Vault.create(backing, source) as v:
        fd, c = v.create(b"f", os.O_WRONLY, 0o644)
        os.pwrite(fd, c.apply(b"secret data", 0), 0)
        os.close(fd)
    return backing


def test_key_file_round_trip_and_permissions(tmp_path):
    key = tmp_path / "k"
    generate_key_file(key)
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(read_key_file(key)) == 32
    with pytest.raises(FileExistsError):
        generate_key_file(key)
    key.chmod(0o640)
    with pytest.raises(VaultError, match="chmod 600"):
        read_key_file(key)
    key.chmod(0o600)
    key.write_text("abcd\n")
    with pytest.raises(VaultError, match="64 hex digits"):
        read_key_file(key)
    with pytest.raises(VaultError, match="does not exist"):
        read_key_file(tmp_path / "missing")


@pytest.mark.parametrize("kind", ["key-file", "passphrase"])
def test_wrong_master_key_is_refused_without_touching_any_file(tmp_path, kind):
    if kind == "key-file":
        good, bad = tmp_path / "good", tmp_path / "bad"
        generate_key_file(good)
        generate_key_file(bad)
        right, wrong = MasterKeySource.key_file(good), MasterKeySource.key_file(bad)
    else:
        right = MasterKeySource.passphrase(b"correct horse", scrypt_n=FAST_N)
        wrong = MasterKeySource.passphrase(b"correct horsf", scrypt_n=FAST_N)
    backing = make_vault(tmp_path, right)
    # leave work for recovery, so a wrong key that got as far as recovery would show
    (backing / "f").unlink()
    before = tree_snapshot(backing)
    with pytest.raises(WrongMasterKey) as err:
        Vault.open(backing, wrong)
    if kind == "key-file":
        assert str(err.value) == f"wrong key file {tmp_path / 'bad'} for vault {backing}" \
            " (give the key file the vault was made or last rekeyed with)"
    else:
        assert str(err.value) == f"wrong passphrase for vault {backing}"
    assert tree_snapshot(backing) == before
    with Vault.open(backing, right) as v:
        assert v.recovery.stale == [b"f"]


def test_backend_mismatch_names_the_right_backend(tmp_path):
    backing = make_vault(tmp_path, MasterKeySource.passphrase(b"pw", scrypt_n=FAST_N))
    key = tmp_path / "k"
    generate_key_file(key)
    with pytest.raises(WrongMasterKey, match="passphrase"):
        Vault.open(backing, MasterKeySource.key_file(key))


def test_passphrase_kdf_params_are_in_the_header(tmp_path):
    source = MasterKeySource.passphrase(b"pw", scrypt_n=FAST_N)
    store = KeyStore.create(tmp_path / "keys.dict", source)
    raw = (tmp_path / "keys.dict").read_bytes()
    assert b'"name": "scrypt"' in raw and b'"n": 1024' in raw
    assert store.active.key.hex().encode() not in raw
    # the opener's own cost setting does not matter: the header's is used
    again = KeyStore.open(tmp_path / "keys.dict", MasterKeySource.passphrase(b"pw"))
    assert again.active.key == store.active.key


def test_rotate_list_retire_and_reseal(tmp_path):
    key = tmp_path / "k"
    generate_key_file(key)
    path = tmp_path / "keys.dict"
    store = KeyStore.create(path, MasterKeySource.key_file(key), "aes-128-ctr")
    assert [(k.id, k.method, k.active) for k in store.list()] == [(1, "aes-128-ctr", True)]
    assert store.rotate() == 2
    assert store.rotate("sm4-ctr") == 3
    store.usage = lambda: {1: 5}
    rows = store.list()
    assert [(k.id, k.active, k.files) for k in rows] == [(1, False, 5), (2, False, 0), (3, True, 0)]
    reopened = KeyStore.open(path, MasterKeySource.key_file(key))
    assert reopened.active_id == 3 and reopened.keys == store.keys
    # invariant 4: never the active key, never a referenced one
    assert store.retire([1, 2, 3], referenced={1}) == [2]
    assert sorted(KeyStore.open(path, MasterKeySource.key_file(key)).keys) == [1, 3]
    new_key = tmp_path / "k2"
    generate_key_file(new_key)
    store.reseal(MasterKeySource.key_file(new_key))
    with pytest.raises(WrongMasterKey):
        KeyStore.open(path, MasterKeySource.key_file(key))
    assert KeyStore.open(path, MasterKeySource.key_file(new_key)).keys == store.keys


def test_tampered_keys_dict_is_corruption_not_wrong_key(tmp_path):
    key = tmp_path / "k"
    generate_key_file(key)
    path = tmp_path / "keys.dict"
    KeyStore.create(path, MasterKeySource.key_file(key))
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(Corruption) as err:
        KeyStore.open(path, MasterKeySource.key_file(key))
    assert str(path) in str(err.value) and "restore it from a backup" in str(err.value)
    path.write_bytes(b"TDEFSKEY\x00\x01")
    with pytest.raises(Corruption):
        KeyStore.open(path, MasterKeySource.key_file(key))


def _header_span(raw: bytes) -> tuple[int, int]:
    """Where keys.dict's JSON header is: after magic (8), version (2) and length (4)."""
    return 14, 14 + int.from_bytes(raw[10:14], "big")


def _damage_header(path: Path, edit) -> None:
    """Rewrite keys.dict's JSON header through ``edit`` (same length), keeping the rest."""
    raw = path.read_bytes()
    start, end = _header_span(raw)
    header = edit(raw[start:end].decode())
    assert len(header) == end - start
    path.write_bytes(raw[:start] + header.encode() + raw[end:])


def _salt(path: Path) -> str:
    raw = path.read_bytes()
    start, end = _header_span(raw)
    return json.loads(raw[start:end])["kdf"]["salt"]


def _overwrite(text: str, field: str, new: str) -> str:
    """``text`` with the start of string field ``field``'s value overwritten by ``new``."""
    i = text.index(f'"{field}": "') + len(field) + 5
    return text[:i] + new + text[i + len(new):]


def _flip_hex_digit(text: str, field: str) -> str:
    i = text.index(f'"{field}": "') + len(field) + 5
    return _overwrite(text, field, "1" if text[i] != "1" else "2")


@pytest.mark.parametrize("damage", [
    lambda h: h.replace('"key-file"', '"key,file"'),  # a flipped bit in the backend name
    lambda h: h.replace('"key-file"', '"passphra"'),  # not a backend: no kdf to go with it
    lambda h: _overwrite(h, "key_check", "g"),  # not hex
    lambda h: _flip_hex_digit(h, "key_check"),  # still hex: only the key check is wrong
])
def test_damaged_header_is_corruption_not_wrong_key(tmp_path, damage):
    key = tmp_path / "k"
    generate_key_file(key)
    path = tmp_path / "keys.dict"
    KeyStore.create(path, MasterKeySource.key_file(key))
    _damage_header(path, damage)
    with pytest.raises(Corruption) as err:
        KeyStore.open(path, MasterKeySource.key_file(key))
    assert not isinstance(err.value, WrongMasterKey)
    assert str(path) in str(err.value) and "restore it from a backup" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", [
    lambda h: h.replace('"scrypt"', '"scrypu"'),
    lambda h: h.replace('"n": 1024', '"n": 1025'),  # not a power of two
    lambda h: h.replace('"n": 1024', '"n": 10.4'),  # not an integer
    lambda h: _overwrite(h, "salt", "  "),  # bytes.fromhex would skip the blanks
])
def test_damaged_scrypt_header_is_corruption_not_wrong_passphrase(tmp_path, damage):
    path = tmp_path / "keys.dict"
    KeyStore.create(path, MasterKeySource.passphrase(b"pw", scrypt_n=FAST_N))
    _damage_header(path, damage)
    with pytest.raises(Corruption) as err:
        KeyStore.open(path, MasterKeySource.passphrase(b"pw"))
    assert not isinstance(err.value, WrongMasterKey) and "malformed header" in str(err.value)


def test_damaged_key_check_with_a_wrong_key_is_still_a_wrong_key(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    generate_key_file(good)
    generate_key_file(bad)
    path = tmp_path / "keys.dict"
    KeyStore.create(path, MasterKeySource.key_file(good))
    _damage_header(path, lambda h: _flip_hex_digit(h, "key_check"))
    with pytest.raises(WrongMasterKey, match="wrong key file"):
        KeyStore.open(path, MasterKeySource.key_file(bad))


def test_reseal_refuses_the_same_master_key_and_changes_nothing(tmp_path):
    key = tmp_path / "k"
    generate_key_file(key)
    path = tmp_path / "keys.dict"
    store = KeyStore.create(path, MasterKeySource.key_file(key))
    before = path.read_bytes()
    with pytest.raises(VaultError, match="already sealed with key file") as err:
        store.reseal(MasterKeySource.key_file(key))
    assert not isinstance(err.value, WrongMasterKey)
    assert path.read_bytes() == before
    assert KeyStore.open(path, MasterKeySource.key_file(key)).keys == store.keys
    # the same passphrase under a new salt is a new master key: re-sealed, and still opens
    pw = MasterKeySource.passphrase(b"pw", scrypt_n=FAST_N)
    store.reseal(pw)
    salt = _salt(path)
    store.reseal(pw)
    assert _salt(path) != salt
    assert store.opens_with(pw) and not store.opens_with(MasterKeySource.key_file(key))


def test_keys_dict_torn_mid_replace_still_opens(tmp_path):
    key = tmp_path / "k"
    generate_key_file(key)
    path = tmp_path / "keys.dict"
    store = KeyStore.create(path, MasterKeySource.key_file(key))
    good = path.read_bytes()
    store.rotate()
    new = path.read_bytes()
    for cut in (0, 1, len(new) // 2, len(new) - 1):
        # a replace that died while writing its tmp file: the old store is intact
        path.write_bytes(good)
        (tmp_path / "keys.dict.tmp").write_bytes(new[:cut])
        assert KeyStore.open(path, MasterKeySource.key_file(key)).active_id == 1


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_key_options(p)
    return p.parse_args(argv)


def test_source_from_args(tmp_path, monkeypatch):
    pw = tmp_path / "pw"
    pw.write_bytes(b"sesame\n")
    src = source_from_args(_parse(["--passphrase-file", str(pw)]))
    assert src.kind == "passphrase" and src._secret == b"sesame"
    monkeypatch.setenv("TDEFS_TEST_PW", "open")
    assert source_from_args(_parse(["--passphrase-env", "TDEFS_TEST_PW"]))._secret == b"open"
    monkeypatch.delenv("TDEFS_TEST_PW")
    with pytest.raises(TdefsError, match="TDEFS_TEST_PW"):
        source_from_args(_parse(["--passphrase-env", "TDEFS_TEST_PW"]))
    monkeypatch.setattr("sys.stdin", _Terminal())
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    with pytest.raises(TdefsError, match="do not match"):
        source_from_args(_parse(["--passphrase"]), confirm=True)
    monkeypatch.setattr("getpass.getpass", lambda prompt="": "typed")
    assert source_from_args(_parse(["--passphrase"]), confirm=True)._secret == b"typed"
    assert source_from_args(_parse(["--key-file", "x"])).kind == "key-file"
    with pytest.raises(SystemExit):
        _parse(["--key-file", "x", "--plaintext-key"])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_passphrase_from_stdin_that_is_not_a_terminal(monkeypatch):
    def never(prompt=""):
        raise AssertionError("getpass must not be used when stdin is not a terminal")

    monkeypatch.setattr("getpass.getpass", never)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"one line\r\nnext\n")))
    assert _ask_passphrase(confirm=True) == b"one line"  # read once, even with confirm
    assert sys.stdin.buffer.readline() == b"next\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\n")))
    with pytest.raises(TdefsError, match="the passphrase is empty"):
        _ask_passphrase(confirm=False)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(TdefsError, match="no passphrase given"):
        _ask_passphrase(confirm=False)


def test_plaintext_backend_warns_on_the_command_side_only(tmp_path, capsys):
    source = MasterKeySource.plaintext()
    assert capsys.readouterr().err == ""  # the core prints nothing
    assert source_from_args(_parse(["--plaintext-key"])).kind == "plaintext"
    assert capsys.readouterr().err == ("tdefs: warning: plaintext master key: the vault is not"
                                       " protected (tests only)\n")
    backing = make_vault(tmp_path, source)
    with Vault.open(backing, source) as v:
        assert v.keys.backend == "plaintext"


def test_scrypt_cost_in_the_header_is_bounded(tmp_path):
    source = MasterKeySource.passphrase(b"pw", scrypt_n=FAST_N)
    header = source.new_header()
    header["kdf"]["n"] = 1 << 30
    with pytest.raises(VaultError, match="outside the accepted range"):
        source.derive(header, "v")
