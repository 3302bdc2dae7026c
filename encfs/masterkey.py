"""Master key backends: where the 32-byte master key that seals keys.dict comes from.

Backends: a key file (64 hex digits; refused when group or others can read it, as ssh
refuses loose private keys), a passphrase stretched with scrypt (salt and cost stored
in keys.dict's header, from a file, an environment variable or the terminal), and
``plaintext`` (a fixed all-zero key: tests only, it protects nothing). A source knows
how to make the backend header of a new vault and how to derive the master key from
an existing vault's header; it never writes anything except a generated key file.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import re
import secrets
import stat
import sys
from pathlib import Path
from typing import Any

from encfs.errors import TdefsError, VaultError, WrongMasterKey

MASTER_KEY_SIZE = 32
BACKENDS = ("key-file", "passphrase", "plaintext")

# scrypt cost of new vaults: 32 MiB and about 0.1 s per derivation on a laptop core
SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT_SIZE = 16
SCRYPT_MAX_N = 1 << 22


def _describe_backend(kind: str) -> str:
    return {
        "key-file": "a key file (--key-file)",
        "passphrase": "a passphrase (--passphrase-file, --passphrase-env or --passphrase)",
        "plaintext": "the plaintext test key (--plaintext-key)",
    }[kind]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def header_problem(header: dict[str, Any]) -> str | None:
    """Why the backend part of a keys.dict header is malformed, or None if it is sound.

    The header is authenticated only once the master key it describes has been
    derived, so damage to it must be recognised here, before it can pass for a
    wrong key; this also bounds the scrypt work a header may ask for."""
    backend = header.get("backend")
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}"
    if backend != "passphrase":
        return None
    kdf = header.get("kdf")
    if not isinstance(kdf, dict):
        return "no key derivation parameters"
    if kdf.get("name") != "scrypt":
        return f"unknown key derivation {kdf.get('name')!r}"
    salt, n, r, p = kdf.get("salt"), kdf.get("n"), kdf.get("r"), kdf.get("p")
    if not (isinstance(salt, str) and re.fullmatch(r"(?:[0-9a-f]{2})+", salt)):
        return "malformed scrypt salt"
    if not (_is_int(n) and _is_int(r) and _is_int(p)):
        return "malformed scrypt cost"
    if not (2 <= n <= SCRYPT_MAX_N and n & (n - 1) == 0 and 1 <= r <= 64 and 1 <= p <= 64):
        return f"scrypt n={n} r={r} p={p} is outside the accepted range"
    return None


def read_key_file(path: str | Path) -> bytes:
    """Read a hex key file, refusing one that group or others can read or write."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VaultError(f"key file {path} does not exist (tdefs init --generate-key makes one)") from None
    if not stat.S_ISREG(st.st_mode):
        raise VaultError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise VaultError(
            f"key file {path} is accessible by group or others (mode {st.st_mode & 0o777:04o});"
            f" run: chmod 600 {path}"
        )
    text = path.read_bytes().strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != MASTER_KEY_SIZE:
        raise VaultError(f"key file {path} must hold {MASTER_KEY_SIZE * 2} hex digits")
    return key


def generate_key_file(path: str | Path) -> None:
    """Write a new random key file with mode 0600; refuses to overwrite one."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (secrets.token_bytes(MASTER_KEY_SIZE).hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class MasterKeySource:
    """How to obtain the master key. Build with key_file(), passphrase() or plaintext()."""

    def __init__(self, kind: str, *, path: Path | None = None, secret: bytes = b"",
                 scrypt_n: int = SCRYPT_N) -> None:
        if kind not in BACKENDS:
            raise ValueError(f"unknown master key backend {kind!r}")
        self.kind = kind
        self.path = path
        self._secret = secret
        self._scrypt_n = scrypt_n

    @classmethod
    def key_file(cls, path: str | Path) -> MasterKeySource:
        return cls("key-file", path=Path(path).absolute())  # the daemon changes directory

    @classmethod
    def passphrase(cls, secret: bytes, *, scrypt_n: int = SCRYPT_N) -> MasterKeySource:
        """``scrypt_n`` is the cost used when this source makes a new vault."""
        if not secret:
            raise TdefsError("the passphrase is empty")
        if scrypt_n < 2 or scrypt_n & (scrypt_n - 1):
            raise ValueError("scrypt_n must be a power of two")
        return cls("passphrase", secret=bytes(secret), scrypt_n=scrypt_n)

    @classmethod
    def plaintext(cls) -> MasterKeySource:
        print("tdefs: warning: plaintext master key: the vault is not protected (tests only)",
              file=sys.stderr)
        return cls("plaintext")

    def __repr__(self) -> str:
        return f"MasterKeySource({self.kind!r})"

    def describe(self) -> str:
        """What the user gave, for messages: "key file K", "the passphrase"."""
        if self.kind == "key-file":
            return f"key file {self.path}"
        return "the passphrase" if self.kind == "passphrase" else "the plaintext test key"

    def wrong_key(self, vault: str) -> WrongMasterKey:
        """The error for a key of the vault's own backend that does not open it."""
        if self.kind == "key-file":
            return WrongMasterKey(f"wrong key file {self.path} for vault {vault}"
                                  " (give the key file the vault was made or last rekeyed with)")
        if self.kind == "passphrase":
            return WrongMasterKey(f"wrong passphrase for vault {vault}")
        return WrongMasterKey(f"the plaintext test key does not open vault {vault}")

    def check(self) -> None:
        """Fail now, before anything is written, if the key cannot be had (key file)."""
        if self.kind == "key-file":
            assert self.path is not None
            read_key_file(self.path)

    def to_message(self) -> dict[str, str]:
        """This key as the fields of a control message, for a running daemon that re-seals
        its vault with it: a key file's absolute path and its hex content (the daemon
        reads the file itself and refuses it if that differs), or the passphrase
        (bytes that are not UTF-8 travel as surrogate escapes)."""
        if self.kind == "key-file":
            assert self.path is not None
            return {"kind": "key-file", "path": os.path.abspath(self.path),
                    "key": read_key_file(self.path).hex()}
        if self.kind == "passphrase":
            return {"kind": "passphrase", "passphrase": os.fsdecode(self._secret)}
        raise TdefsError("the plaintext test key cannot be sent to a daemon")

    @classmethod
    def from_message(cls, fields: dict[str, Any]) -> MasterKeySource:
        """The source that to_message() described. VaultError when the key file no longer
        holds the key that was sent (it changed in between)."""
        kind = fields.get("kind")
        if kind == "key-file":
            path, key = fields.get("path"), fields.get("key")
            if not (isinstance(path, str) and os.path.isabs(path) and isinstance(key, str)):
                raise TdefsError("a new key file is sent as its absolute path and its hex key")
            if not secrets.compare_digest(read_key_file(path).hex(), key.lower()):
                raise VaultError(f"key file {path} changed after it was read: nothing changed"
                                 " (run the command again)")
            return cls.key_file(path)
        if kind == "passphrase":
            secret = fields.get("passphrase")
            if not isinstance(secret, str):
                raise TdefsError("a new passphrase is sent as a string")
            return cls.passphrase(os.fsencode(secret))
        raise TdefsError(f"unknown kind of master key {kind!r} (key-file or passphrase)")

    def new_header(self) -> dict[str, Any]:
        """The backend part of a new keys.dict header (no secrets)."""
        header: dict[str, Any] = {"backend": self.kind}
        if self.kind == "passphrase":
            header["kdf"] = {
                "name": "scrypt",
                "salt": secrets.token_bytes(SCRYPT_SALT_SIZE).hex(),
                "n": self._scrypt_n,
                "r": SCRYPT_R,
                "p": SCRYPT_P,
            }
        return header

    def derive(self, header: dict[str, Any], vault: str) -> bytes:
        """The master key for a keys.dict whose header is ``header``."""
        problem = header_problem(header)
        if problem is not None:
            raise VaultError(f"vault {vault}: keys.dict has a malformed header ({problem})")
        if header["backend"] != self.kind:
            raise WrongMasterKey(
                f"vault {vault} is sealed with {_describe_backend(header['backend'])},"
                f" not {_describe_backend(self.kind)}"
            )
        if self.kind == "key-file":
            assert self.path is not None
            return read_key_file(self.path)
        if self.kind == "plaintext":
            return bytes(MASTER_KEY_SIZE)
        kdf = header["kdf"]
        n, r, p = kdf["n"], kdf["r"], kdf["p"]
        return hashlib.scrypt(self._secret, salt=bytes.fromhex(kdf["salt"]), n=n, r=r, p=p,
                              maxmem=256 * n * r + (1 << 20), dklen=MASTER_KEY_SIZE)


def add_key_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The mutually exclusive master key options every vault command takes (optional
    for commands that may instead reach a running mount, whose daemon holds the key)."""
    group = parser.add_argument_group("master key (exactly one)" if required else
                                      "master key (one; not needed on a running mount)")
    ex = group.add_mutually_exclusive_group(required=required)
    ex.add_argument("--key-file", metavar="F", help="file holding the 32-byte key as hex (mode 0600)")
    ex.add_argument("--passphrase-file", metavar="F", help="read the passphrase from file F")
    ex.add_argument("--passphrase-env", metavar="VAR", help="read the passphrase from variable VAR")
    ex.add_argument("--passphrase", action="store_true", help="ask for the passphrase on the terminal")
    ex.add_argument("--plaintext-key", action="store_true",
                    help="a fixed, public master key: for tests only")


def add_new_key_options(parser: argparse.ArgumentParser) -> None:
    """Options naming a new master key (master key rotation); exactly one is required."""
    group = parser.add_argument_group("new master key (exactly one)")
    ex = group.add_mutually_exclusive_group(required=True)
    ex.add_argument("--new-key-file", metavar="F", help="the new key file (see --generate-key)")
    ex.add_argument("--new-passphrase-file", metavar="F", help="read the new passphrase from F")
    ex.add_argument("--new-passphrase-env", metavar="VAR", help="read the new passphrase from VAR")
    ex.add_argument("--new-passphrase", action="store_true", help="ask for the new passphrase")


def new_source_from_args(args: argparse.Namespace) -> MasterKeySource:
    """The source named by the --new-* options (a terminal passphrase is asked twice)."""
    renamed = argparse.Namespace(
        key_file=getattr(args, "new_key_file", None),
        passphrase_file=getattr(args, "new_passphrase_file", None),
        passphrase_env=getattr(args, "new_passphrase_env", None),
        passphrase=getattr(args, "new_passphrase", False),
    )
    if not (renamed.key_file or renamed.passphrase_file or renamed.passphrase_env or renamed.passphrase):
        raise TdefsError("master-key rotate needs the new master key: --new-key-file,"
                         " --new-passphrase-file, --new-passphrase-env or --new-passphrase")
    return source_from_args(renamed, confirm=True)


def _strip_newline(secret: bytes) -> bytes:
    if secret.endswith(b"\r\n"):
        return secret[:-2]
    if secret.endswith(b"\n"):
        return secret[:-1]
    return secret


def _ask_passphrase(confirm: bool) -> bytes:
    """The passphrase typed on the terminal (twice with ``confirm``); when stdin is not
    a terminal, its first line, read once and silently (getpass would fall back to
    echoing stdin with a warning, or ask a terminal the caller did not mean)."""
    if sys.stdin is None or not sys.stdin.isatty():
        line = sys.stdin.buffer.readline() if sys.stdin is not None else b""
        if not line:
            raise TdefsError("no passphrase given: stdin is not a terminal and is empty"
                             " (pipe the passphrase in, or use --passphrase-file)")
        secret = _strip_newline(line)
    else:
        try:
            first = getpass.getpass("Passphrase: ")
            if confirm and getpass.getpass("Repeat passphrase: ") != first:
                raise TdefsError("the passphrases do not match")
        except EOFError:
            raise TdefsError("no passphrase given") from None
        secret = first.encode()
    if not secret:
        raise TdefsError("the passphrase is empty")
    return secret


def source_from_args(args: argparse.Namespace, confirm: bool = False) -> MasterKeySource:
    """Build the source the options name; ``confirm`` asks a terminal passphrase twice."""
    if getattr(args, "key_file", None):
        return MasterKeySource.key_file(args.key_file)
    if getattr(args, "passphrase_file", None):
        try:
            secret = _strip_newline(Path(args.passphrase_file).read_bytes())
        except OSError as exc:
            raise TdefsError(f"cannot read passphrase file {args.passphrase_file}: {exc.strerror}") from None
        if not secret:
            raise TdefsError(f"passphrase file {args.passphrase_file} is empty")
        return MasterKeySource.passphrase(secret)
    if getattr(args, "passphrase_env", None):
        value = os.environb.get(os.fsencode(args.passphrase_env))
        if not value:
            raise TdefsError(f"environment variable {args.passphrase_env} is unset or empty")
        return MasterKeySource.passphrase(value)
    if getattr(args, "passphrase", False):
        return MasterKeySource.passphrase(_ask_passphrase(confirm))
    if getattr(args, "plaintext_key", False):
        return MasterKeySource.plaintext()
    raise TdefsError("no master key given (use --key-file, --passphrase-file, --passphrase-env,"
                     " --passphrase or --plaintext-key)")
