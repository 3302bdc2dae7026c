"""A reader written only from docs/vault-format.md, checked against the real vault.

If the page and the code drift apart, this fails: the page must stay precise enough
for a stranger to read a vault."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import zlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs import content
from encfs.fsops import RENAME_EXCHANGE
from encfs.masterkey import MasterKeySource, generate_key_file, read_key_file
from encfs.vault import Vault

METHODS = {0: "plaintext", 1: "aes-128-ctr", 2: "aes-192-ctr", 3: "aes-256-ctr", 4: "sm4-ctr"}


def hkdf(secret: bytes, info: bytes, n: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=None, info=info).derive(secret)


def read_keys_dict(path, master: bytes) -> dict:
    raw = path.read_bytes()
    assert raw[:8] == b"TDEFSKEY"
    version, hlen = struct.unpack(">HI", raw[8:14])
    assert version == 1
    header = json.loads(raw[14 : 14 + hlen])
    assert header["key_check"] == hkdf(master, b"tdefs key check v1", 16).hex()
    nonce, sealed = raw[14 + hlen : 26 + hlen], raw[26 + hlen :]
    body = AESGCM(hkdf(master, b"tdefs keys.dict seal v1")).decrypt(nonce, sealed, raw[: 14 + hlen])
    return json.loads(body)


def read_files_dict(path, mac_key: bytes) -> dict[bytes, tuple[str, int, bytes]]:
    data = path.read_bytes()
    assert data[:8] == b"TDEFSFDL"
    assert hmac.new(mac_key, data[:36], hashlib.sha256).digest() == data[36:68]
    chain, pos = data[36:68], 68
    entries: dict[bytes, tuple[str, int, bytes]] = {}
    pending: dict[int, list] = {}

    def apply(ops):
        for op in ops:
            if op[0] == "put":
                entries[op[1]] = op[2]
            elif op[0] == "del":
                entries.pop(op[1], None)
            elif op[0] == "commit":
                apply(pending.pop(op[1], []))
            elif op[0] == "abort":
                pending.pop(op[1], None)

    while pos < len(data):
        length, crc = struct.unpack(">II", data[pos : pos + 8])
        assert crc == zlib.crc32(data[pos : pos + 4])
        payload = data[pos + 8 : pos + 8 + length]
        mac = data[pos + 8 + length : pos + 40 + length]
        assert mac == hmac.new(mac_key, chain + data[pos : pos + 4] + payload, hashlib.sha256).digest()
        chain, pos = mac, pos + 40 + length
        ops, p = [], 0

        while p < len(payload):
            code, p = payload[p], p + 1
            if code == 1:
                name, p = path_at(payload, p)
                m, key_id, iv = struct.unpack(">BI16s", payload[p : p + 21])
                ops.append(("put", name, (METHODS[m], key_id, iv)))
                p += 21
            elif code == 2:
                name, p = path_at(payload, p)
                ops.append(("del", name))
            elif code == 3:
                txid = struct.unpack(">Q", payload[p : p + 8])[0]
                _src, p = path_at(payload, p + 17)
                ops.append(("begin", txid))
            else:
                ops.append(("commit" if code == 4 else "abort", struct.unpack(">Q", payload[p : p + 8])[0]))
                p += 8
        if ops[0][0] == "begin":
            pending[ops[0][1]] = ops[1:]
        else:
            apply(ops)
    assert not pending
    return entries


def path_at(payload: bytes, p: int) -> tuple[bytes, int]:
    (n,) = struct.unpack(">H", payload[p : p + 2])
    return payload[p + 2 : p + 2 + n], p + 2 + n


def decrypt(method: str, key: bytes, iv: bytes, data: bytes) -> bytes:
    alg = algorithms.SM4(key) if method == "sm4-ctr" else algorithms.AES(key)
    return Cipher(alg, modes.CTR(iv)).decryptor().update(data)  # offset 0: counter = IV


def test_a_reader_written_from_the_page_reads_the_vault(tmp_path):
    key = tmp_path / "k"
    generate_key_file(key)
    backing = tmp_path / "v"
    files = {b"a": b"alpha" * 30, b"d/b": b"beta" * 30, b"c": b"gamma" * 30}
    with Vault.create(backing, MasterKeySource.key_file(key), method="sm4-ctr") as v:
        os.mkdir(backing / "d")
        for rel, data in files.items():
            fd, cipher = v.create(rel, os.O_WRONLY, 0o644)
            content.write_at(fd, cipher, data, 0)
            os.close(fd)
        v.keys.rotate("aes-128-ctr")
        fd, cipher = v.create(b"e", os.O_WRONLY, 0o644)
        content.write_at(fd, cipher, b"epsilon" * 30, 0)
        os.close(fd)
        v.rename(b"d", b"dd")
        v.rename(b"a", b"c", RENAME_EXCHANGE)
        v.link(b"e", b"e2")
        v.unlink(b"e")
        v.flush_deletes()  # a snapshot holds no rename waiting for its COMMIT
        v.files.rewrite()
        v.rename(b"dd/b", b"b")
    expect = {b"a": files[b"c"], b"c": files[b"a"], b"b": files[b"d/b"], b"e2": b"epsilon" * 30}
    body = read_keys_dict(backing / ".tdefs" / "keys.dict", read_key_file(key))
    keys = {k["id"]: (k["method"], bytes.fromhex(k["key"])) for k in body["keys"]}
    assert body["active"] == 2 and keys[2][0] == "aes-128-ctr"
    mac_key = hkdf(bytes.fromhex(body["vault_secret"]), b"tdefs files.dict mac v1")
    entries = read_files_dict(backing / ".tdefs" / "files.dict", mac_key)
    assert set(entries) == set(expect)
    for rel, plain in expect.items():
        method, key_id, iv = entries[rel]
        assert keys[key_id][0] == method
        assert decrypt(method, keys[key_id][1], iv, (backing / os.fsdecode(rel)).read_bytes()) == plain
    # the cipher of new files is the active key's method, said nowhere else
    assert "method" not in json.loads((backing / ".tdefs" / "vault.json").read_text())
    copy_key = hkdf(bytes.fromhex(body["vault_secret"]), b"tdefs entry copy mac v1")
    for rel, (method, key_id, iv) in entries.items():
        copy = os.getxattr(backing / os.fsdecode(rel), "user.tdefs.entry")
        assert len(copy) == 38 and copy[0] == 1
        assert hmac.new(copy_key, copy[:22], hashlib.sha256).digest()[:16] == copy[22:]
        code, copy_key_id, copy_iv = struct.unpack(">BI16s", copy[1:22])
        assert (METHODS[code], copy_key_id, copy_iv) == (method, key_id, iv)
