"""Typed errors of tdefs. Every message is one line a user can act on."""

from __future__ import annotations


class TdefsError(Exception):
    """Base of every error tdefs reports to a user; str() is the one-line message."""


class VaultError(TdefsError):
    """A vault is missing, malformed, busy or refused for a reason the message says."""


class WrongMasterKey(VaultError):
    """The master key does not open the vault's sealed key store."""


class Corruption(VaultError):
    """Bytes on disk fail their checksum or MAC; carries the file and offset."""

    def __init__(self, path: str, offset: int | None, what: str) -> None:
        self.path = str(path)
        self.offset = offset
        self.what = what
        where = self.path if offset is None else f"{self.path} at offset {offset}"
        super().__init__(f"corruption in {where}: {what}")
