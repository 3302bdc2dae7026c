"""The cipher of new files has one source of truth: keys.dict's active key."""

from __future__ import annotations

import json
import os

import pytest

from encfs import content
from encfs.masterkey import MasterKeySource, generate_key_file
from encfs.reencrypt import Reencryptor
from encfs.vault import Vault


@pytest.fixture
def source(tmp_path) -> MasterKeySource:
    key = tmp_path / "k"
    generate_key_file(key)
    return MasterKeySource.key_file(key)


def write(vault: Vault, rel: bytes, data: bytes) -> None:
    fd, cipher = vault.create(rel, os.O_RDWR, 0o644)
    content.write_at(fd, cipher, data, 0)
    os.close(fd)


def test_a_rotation_to_another_method_changes_the_cipher_of_new_files(tmp_path, source):
    with Vault.create(tmp_path / "v", source) as v:
        assert v.method == "aes-256-ctr"
        v.keys.rotate("sm4-ctr")
        assert v.method == "sm4-ctr"
        write(v, b"new", b"x")
        assert v.files.get(b"new").method == "sm4-ctr"
    with Vault.open(tmp_path / "v", source) as v:
        assert v.method == "sm4-ctr"
    assert "method" not in json.loads((tmp_path / "v/.tdefs/vault.json").read_text())


def test_a_plaintext_vault_has_no_key_until_a_rotation_switches_encryption_on(tmp_path, source):
    with Vault.create(tmp_path / "v", source, method="plaintext") as v:
        assert v.method == "plaintext" and v.keys.active is None and not v.keys.keys
        assert not v.rotation_due(now=1e12)  # nothing to rotate: it would switch encryption on
        write(v, b"plain", b"stays as written")
        assert v.files.get(b"plain") is None
        assert (tmp_path / "v/plain").read_bytes() == b"stays as written"
        key_id = v.keys.rotate()
        assert v.method == "aes-256-ctr" and v.keys.active_id == key_id
        write(v, b"secret", b"now encrypted")
        assert (tmp_path / "v/secret").read_bytes() != b"now encrypted"
        # and re-encryption converts what was written before
        reencryptor = Reencryptor(v)
        (job,) = reencryptor.pending()
        assert job.names == [b"plain"] and job.info is None
        reencryptor.switch(reencryptor.copy(job))
        assert v.files.get(b"plain").key_id == key_id
        assert (tmp_path / "v/plain").read_bytes() != b"stays as written"
        assert Reencryptor(v).pending() == []


def test_an_older_plaintext_vault_json_is_taken_over_by_keys_dict(tmp_path, source):
    Vault.create(tmp_path / "v", source).close()  # an active AES key, as older inits made
    path = tmp_path / "v/.tdefs/vault.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "method": "plaintext"}))
    with Vault.open(tmp_path / "v", source, mode="check") as v:
        assert v.method == "plaintext"  # read-only: said, not written
    with Vault.open(tmp_path / "v", source) as v:
        assert v.method == "plaintext"
        write(v, b"f", b"plain")
        assert v.files.get(b"f") is None
    with Vault.open(tmp_path / "v", source) as v:
        assert v.keys.active is None  # keys.dict says it now, whatever vault.json says
