"""The per-file copy of a file's dictionary entry, kept with the backing file itself.

Each encrypted backing file carries its own entry (method, key id, IV) in the
extended attribute ``user.tdefs.entry``, authenticated with a MAC under a key derived
from the vault secret, as fscrypt keeps a per-inode nonce. Nothing in it is secret.
The copy travels with the inode through rename and link without a write of its own,
so ``tdefs fsck --repair`` can rebuild any entry a damaged or lost files.dict no
longer has. The dictionary stays the source of truth: the copy is written after the
entry (create, truncation to zero), and made to agree with the entry again when a
file is first opened for writing (a crash between the two steps leaves an empty
file whose copy is missing or stale).

Where the backing filesystem has no user extended attributes the copies are off,
and the vault says so (init, status, fsck).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from encfs.disk import disk
from encfs.filedict import METHOD_CODES, METHOD_NAMES, FileInfo

XATTR = b"user.tdefs.entry"
VERSION = 1
_BODY = struct.Struct(">BBI16s")  # version, method code, key id, iv
MAC_SIZE = 16
SIZE = _BODY.size + MAC_SIZE
MAC_LABEL = b"tdefs entry copy mac v1"
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


@dataclass(frozen=True)
class Damaged:
    """A copy is there but does not verify (damaged, or from another vault)."""

    reason: str


def supported(path: str | bytes | os.PathLike[str]) -> bool:
    """Does the filesystem holding ``path`` keep user extended attributes? Reads only."""
    try:
        os.getxattr(path, XATTR)
    except OSError as exc:
        return exc.errno not in _NO_XATTRS
    return True


class EntryCopies:
    """Reads and writes the copies of one vault (a no-op when ``enabled`` is False)."""

    def __init__(self, mac_key: bytes, enabled: bool) -> None:
        self._mac_key = mac_key
        self.enabled = enabled
        self.write_failures = 0  # copies that could not be written (the entry stands)

    def encode(self, info: FileInfo) -> bytes:
        body = _BODY.pack(VERSION, METHOD_CODES[info.method], info.key_id, info.iv)
        return body + self._mac(body)

    def decode(self, value: bytes) -> FileInfo | Damaged:
        if len(value) != SIZE:
            return Damaged(f"{len(value)} bytes, not {SIZE}")
        body, mac = value[: _BODY.size], value[_BODY.size :]
        if not hmac.compare_digest(mac, self._mac(body)):
            return Damaged("MAC mismatch (damaged, or copied from another vault)")
        version, code, key_id, iv = _BODY.unpack(body)
        if version != VERSION or code not in METHOD_NAMES:
            return Damaged(f"unknown version {version} or method code {code}")
        return FileInfo(METHOD_NAMES[code], key_id, iv)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._mac_key, body, hashlib.sha256).digest()[:MAC_SIZE]

    def read(self, target: int | bytes) -> FileInfo | Damaged | None:
        """The copy on an open fd or at an absolute path; None when there is none."""
        try:
            if isinstance(target, int):
                value = os.getxattr(target, XATTR)
            else:
                value = os.getxattr(target, XATTR, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, *_NO_XATTRS):
                return None
            raise
        return self.decode(value)

    def write(self, fd: int, info: FileInfo | None) -> None:
        """Make the copy on ``fd`` say ``info`` (None: no entry, so no copy).

        Best effort: a copy that cannot be written (a daemon that is not root, on a
        file it may not write) leaves the entry alone, which is the truth."""
        if not self.enabled:
            return
        try:
            if info is None:
                try:
                    disk.removexattr(fd, XATTR)
                except OSError as exc:
                    if exc.errno != errno.ENODATA:
                        raise
            else:
                disk.setxattr(fd, XATTR, self.encode(info))
        except OSError:
            self.write_failures += 1

    def agree(self, fd: int, info: FileInfo | None) -> None:
        """Rewrite the copy on ``fd`` only when it does not say ``info`` already."""
        if not self.enabled:
            return
        try:
            current = self.read(fd)
        except OSError:
            current = Damaged("unreadable")
        if current != info:
            self.write(fd, info)
