"""The sealed data-key store, ``.tdefs/keys.dict``.

Holds every data key (id, method, key bytes, creation time), which one is active, and
the vault secret from which the files.dict MAC key is derived, sealed with AES-256-GCM
under a key derived from the master key. The header (backend kind, KDF parameters and
a short key-check value) is authenticated as the GCM associated data, so a wrong
master key is told apart from a damaged file. Nothing can rebuild the store, so any
damage to it is a Corruption that says to restore it from a backup. The file is only
ever replaced whole, through ``fsops.atomic_replace``: a crash leaves the old or the
new store.

Invariant: a data key is removed only by ``retire``, which refuses the active key and
any key still referenced.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs.cipher import DEFAULT_METHOD, KEY_SIZES, check_method
from encfs.errors import Corruption, VaultError
from encfs.fsops import atomic_replace
from encfs.masterkey import MasterKeySource, header_problem

MAGIC = b"TDEFSKEY"
VERSION = 1
_PREFIX = struct.Struct(">8sHI")  # magic, version, header length
NONCE_SIZE = 12
VAULT_SECRET_SIZE = 32


def hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 without salt: the one key-derivation helper of tdefs."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def key_check(master: bytes) -> str:
    return hkdf(master, b"tdefs key check v1", 16).hex()


@dataclass(frozen=True)
class DataKey:
    id: int
    method: str
    key: bytes
    created: int  # unix seconds

    def __repr__(self) -> str:
        return f"DataKey(id={self.id}, method={self.method!r}, created={self.created})"


@dataclass(frozen=True)
class KeyInfo:
    """One row of ``tdefs keys list``."""

    id: int
    method: str
    created: int
    active: bool
    files: int


class KeyStore:
    """The data keys of one vault. Thread-safe; every change is one atomic replace."""

    def __init__(self, path: Path, vault: str, header: dict[str, Any], master: bytes,
                 body: dict[str, Any]) -> None:
        self.path = path
        self.vault = vault
        self._header = header
        self._master = master
        self._lock = threading.Lock()
        self.keys: dict[int, DataKey] = {}
        for k in body["keys"]:
            dk = DataKey(int(k["id"]), check_method(k["method"]), bytes.fromhex(k["key"]),
                         int(k["created"]))
            if len(dk.key) != KEY_SIZES[dk.method]:
                raise ValueError(f"key {dk.id} has the wrong length")
            self.keys[dk.id] = dk
        # the key new files use; None: new files are plaintext (encryption is off)
        self.active_id: int | None = None if body["active"] is None else int(body["active"])
        self._next_id = int(body["next_id"])
        self._vault_secret = bytes.fromhex(body["vault_secret"])
        if (self.active_id is not None and self.active_id not in self.keys) \
                or len(self._vault_secret) != VAULT_SECRET_SIZE:
            raise ValueError("active key missing or bad vault secret")
        # set by the vault: key id -> number of dictionary entries using it
        self.usage: Callable[[], dict[int, int]] | None = None

    # -- construction -------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, source: MasterKeySource, method: str = DEFAULT_METHOD,
               vault: str | None = None) -> KeyStore:
        """Make a new store with one active data key of ``method`` (none for
        "plaintext": new files are then not encrypted); writes ``path`` atomically."""
        path = Path(path)
        vault = vault or str(path.parent.parent)
        header = source.new_header()
        master = source.derive(header, vault)
        header["key_check"] = key_check(master)
        first = None if check_method(method) == "plaintext" else _new_key(1, method)
        body = {
            "vault_secret": secrets.token_bytes(VAULT_SECRET_SIZE).hex(),
            "active": None if first is None else 1,
            "next_id": 2,
            "keys": [] if first is None else [_key_json(first)],
        }
        store = cls(path, vault, header, master, body)
        store._write()
        return store

    @classmethod
    def open(cls, path: str | Path, source: MasterKeySource, vault: str | None = None) -> KeyStore:
        """Open and unseal ``path``; WrongMasterKey if the key does not fit. Writes nothing."""
        path = Path(path)
        vault = vault or str(path.parent.parent)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise VaultError(f"vault {vault}: {path} is missing") from None
        header, aad, sealed = _split(raw, path)
        master = source.derive(header, vault)
        if header["key_check"] != key_check(master):
            # Only the right key authenticates the body: if it does once the header
            # carries this key's check value, the key is right and the field is damaged.
            repaired = {**header, "key_check": key_check(master)}
            if source.kind == "plaintext" or _unseal(master, _aad(repaired), sealed) is not None:
                raise _damaged(path, _PREFIX.size, "the key check value in the header is damaged")
            raise source.wrong_key(vault)
        plain = _unseal(master, aad, sealed)
        if plain is None:
            raise _damaged(path, len(aad), "sealed key store fails authentication")
        try:
            return cls(path, vault, header, master, json.loads(plain))
        except (ValueError, KeyError, TypeError) as exc:
            raise _damaged(path, len(aad), f"malformed key store ({exc})") from None

    # -- reading ------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return str(self._header.get("backend"))

    def opens_with(self, source: MasterKeySource) -> bool:
        """Whether ``source`` gives the master key the store is sealed with now."""
        if source.kind != self.backend:
            return False
        return hmac.compare_digest(source.derive(self._header, self.vault), self._master)

    @property
    def active(self) -> DataKey | None:
        """The key new files use, None when they are plaintext. Its method is the one
        source of truth for the cipher of new files."""
        return None if self.active_id is None else self.keys[self.active_id]

    @property
    def method(self) -> str:
        """The cipher of new files: the active key's method, or "plaintext"."""
        active = self.active
        return "plaintext" if active is None else active.method

    def get(self, key_id: int) -> DataKey:
        try:
            return self.keys[key_id]
        except KeyError:
            raise VaultError(f"vault {self.vault}: data key {key_id} is not in keys.dict") from None

    def derive(self, label: bytes, length: int = 32) -> bytes:
        """A subkey of the vault secret (e.g. the files.dict MAC key)."""
        return hkdf(self._vault_secret, label, length)

    def list(self) -> list[KeyInfo]:
        usage = self.usage() if self.usage else {}
        with self._lock:
            return [
                KeyInfo(k.id, k.method, k.created, k.id == self.active_id, usage.get(k.id, 0))
                for k in sorted(self.keys.values(), key=lambda k: k.id)
            ]

    # -- changes (each one atomic replace of keys.dict) ----------------------------

    def rotate(self, method: str | None = None) -> int:
        """Add a new data key and make it active; returns its id. ``method`` defaults
        to the active key's, or to the default when encryption is off (a rotation then
        switches it on)."""
        with self._lock:
            active = self.active
            method = check_method(method or (active.method if active else DEFAULT_METHOD))
            if method == "plaintext":
                raise VaultError("a data key cannot use the plaintext method")
            key = _new_key(self._next_id, method)
            old = (dict(self.keys), self.active_id, self._next_id)
            self.keys[key.id] = key
            self.active_id = key.id
            self._next_id += 1
            try:
                self._write()
            except BaseException:
                self.keys, self.active_id, self._next_id = old
                raise
            return key.id

    def switch_off(self) -> None:
        """No active key: new files are plaintext (the keys stay for existing files)."""
        with self._lock:
            old = self.active_id
            self.active_id = None
            try:
                self._write()
            except BaseException:
                self.active_id = old
                raise

    def retire(self, key_ids: Iterable[int], referenced: set[int]) -> list[int]:
        """Drop keys that are neither active nor in ``referenced``; returns those dropped."""
        with self._lock:
            drop = [k for k in key_ids if k in self.keys and k != self.active_id and k not in referenced]
            if not drop:
                return []
            old = dict(self.keys)
            for k in drop:
                del self.keys[k]
            try:
                self._write()
            except BaseException:
                self.keys = old
                raise
            return drop

    def reseal(self, source: MasterKeySource) -> None:
        """Seal the same data keys under a new master key (master key rotation).
        Refuses, changing nothing, a key equal to the current one: a passphrase gets a
        new salt, so only a key file (or the plaintext key) can be the same."""
        with self._lock:
            header = source.new_header()
            master = source.derive(header, self.vault)
            if hmac.compare_digest(master, self._master):
                raise VaultError(f"vault {self.vault} is already sealed with {source.describe()}:"
                                 " nothing changed (rekey needs a different new key)")
            header["key_check"] = key_check(master)
            old = (self._header, self._master)
            self._header, self._master = header, master
            try:
                self._write()
            except BaseException:
                self._header, self._master = old
                raise

    def _write(self) -> None:
        body = {
            "vault_secret": self._vault_secret.hex(),
            "active": self.active_id,
            "next_id": self._next_id,
            "keys": [_key_json(k) for k in sorted(self.keys.values(), key=lambda k: k.id)],
        }
        aad = _aad(self._header)
        nonce = secrets.token_bytes(NONCE_SIZE)
        sealed = AESGCM(_seal_key(self._master)).encrypt(
            nonce, json.dumps(body, sort_keys=True).encode(), aad)
        atomic_replace(self.path, aad + nonce + sealed, "keys.replace")


def _seal_key(master: bytes) -> bytes:
    return hkdf(master, b"tdefs keys.dict seal v1")


def _aad(header: dict[str, Any]) -> bytes:
    """The bytes before the nonce: prefix and header, authenticated as associated data."""
    header_bytes = json.dumps(header, sort_keys=True).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header_bytes)) + header_bytes


def _unseal(master: bytes, aad: bytes, sealed: bytes) -> bytes | None:
    """The body, or None when it fails authentication under ``master`` and ``aad``."""
    try:
        return AESGCM(_seal_key(master)).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
    except InvalidTag:
        return None


def _damaged(path: Path, offset: int, what: str) -> Corruption:
    return Corruption(str(path), offset, f"{what}; it holds the vault's data keys and nothing"
                      " can rebuild it: restore it from a backup")


def _new_key(key_id: int, method: str) -> DataKey:
    return DataKey(key_id, method, secrets.token_bytes(KEY_SIZES[method]), int(time.time()))


def _key_json(k: DataKey) -> dict[str, Any]:
    return {"id": k.id, "method": k.method, "key": k.key.hex(), "created": k.created}


def _split(raw: bytes, path: Path) -> tuple[dict[str, Any], bytes, bytes]:
    if len(raw) < _PREFIX.size:
        raise _damaged(path, 0, "file too short for a keys.dict header")
    magic, version, hlen = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise _damaged(path, 0, "not a tdefs keys.dict (bad magic)")
    if version != VERSION:
        raise VaultError(f"{path}: keys.dict format version {version} is not supported")
    end = _PREFIX.size + hlen
    if len(raw) < end + NONCE_SIZE + 16:
        raise _damaged(path, len(raw), "file truncated")
    try:
        header = json.loads(raw[_PREFIX.size:end])
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        problem = header_problem(header)
        if problem is not None:
            raise ValueError(problem)
        if not (isinstance(header.get("key_check"), str)
                and re.fullmatch(r"[0-9a-f]{32}", header["key_check"])):
            raise ValueError("malformed key check value")
    except ValueError as exc:
        raise _damaged(path, _PREFIX.size, f"malformed header ({exc})") from None
    return header, raw[:end], raw[end:]
