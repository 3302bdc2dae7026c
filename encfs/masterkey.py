"""Master key backends: where the 32-byte master key that seals keys.dict comes from.

Backends: a key file (64 hex digits; refused when group or others can read it, as ssh
refuses loose private keys), a passphrase stretched with scrypt (salt and cost stored
in keys.dict's header), and ``plaintext`` (a fixed all-zero key: tests only, it
protects nothing). A source knows how to make the backend header of a new vault and
how to derive the master key from an existing vault's header; it never writes
anything except a generated key file.

A key command (a program whose output is the key or the passphrase: HashiCorp Vault,
a cloud KMS, a hardware token) is a source too, but not a backend: it is only where
the secret comes from, so a vault sealed from a key file opens with a command that
prints the same key, and the other way round. It runs at most once per source (and
so once per process); its output is kept in memory only.

Invariant: nothing here reads the terminal or prints (the options, the prompts and
the warnings are mount/key_options.py's); a key command's own stderr is passed
through, as the program wrote it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import selectors
import signal
import stat
import subprocess
import time
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

# a key command that has not finished after this long is killed;
# TDEFS_KEY_COMMAND_TIMEOUT (seconds) overrides it
KEY_COMMAND_TIMEOUT_S = 30.0
KEY_COMMAND_TIMEOUT_ENV = "TDEFS_KEY_COMMAND_TIMEOUT"
# no key or passphrase is this long; more output is a misconfigured command
KEY_COMMAND_MAX_OUTPUT = 4096
_HEX_KEY = re.compile(rb"[0-9a-fA-F]{%d}" % (MASTER_KEY_SIZE * 2))


class KeyCommandError(TdefsError):
    """The key command failed, hung, or printed nothing usable; the message names it."""


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


def strip_newline(secret: bytes) -> bytes:
    """``secret`` without one trailing newline (LF or CRLF): how a passphrase file, a
    piped passphrase and a key command's output are read."""
    if secret.endswith(b"\r\n"):
        return secret[:-2]
    if secret.endswith(b"\n"):
        return secret[:-1]
    return secret


def key_command_timeout() -> float:
    """The key command's time limit in seconds: $TDEFS_KEY_COMMAND_TIMEOUT, or 30."""
    raw = os.environ.get(KEY_COMMAND_TIMEOUT_ENV)
    if raw is None:
        return KEY_COMMAND_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise TdefsError(f"{KEY_COMMAND_TIMEOUT_ENV}={raw!r} is not a number of seconds above 0")
    return value


def _shown(command: str) -> str:
    """A key command as messages quote it, on one line."""
    return "`" + command.replace("\r", "\\r").replace("\n", "\\n") + "`"


def _last_line(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    return lines[-1] if len(lines[-1]) <= 200 else lines[-1][:200] + "..."


def _pass_through(data: bytes) -> None:
    """A key command's stderr, to ours as it comes (a PIN prompt ends in no newline)."""
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:
        pass  # no stderr to write to: the error still carries its last line


def _kill(proc: subprocess.Popen[bytes], own_session: bool) -> None:
    try:
        if own_session:
            os.killpg(proc.pid, signal.SIGKILL)  # the shell and everything it started
        else:
            proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def run_key_command(command: str, *, terminal: bool = False, timeout: float | None = None) -> bytes:
    """Run ``command`` with ``/bin/sh -c`` and return its stdout without one trailing
    newline: the key or the passphrase.

    Its stderr is passed through as it comes, and its last line kept for the error.
    With ``terminal`` its stdin is this process's (a token may ask for a PIN) and it
    shares our process group, so a time limit kills the shell only; without, its stdin
    is /dev/null and it runs in a session of its own, without a controlling terminal,
    so a prompt fails at once rather than waiting, and the time limit kills everything
    it started. ``timeout`` defaults to key_command_timeout(). KeyCommandError (one line,
    naming the command, never its output) when it cannot be started, exits non-zero or
    by a signal, is still running at the time limit, prints more than
    KEY_COMMAND_MAX_OUTPUT bytes, or prints nothing."""
    limit = key_command_timeout() if timeout is None else timeout
    shown = _shown(command)
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command],
                                stdin=None if terminal else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=not terminal)
    except OSError as exc:
        raise KeyCommandError(f"key command {shown} cannot be started: {exc.strerror}") from None
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    problem = None
    timed_out = (f"key command {shown} was still running after {limit:g} s and was killed"
                 f" (${KEY_COMMAND_TIMEOUT_ENV} sets the limit in seconds)")
    deadline = time.monotonic() + limit
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            sel.register(proc.stderr, selectors.EVENT_READ)
            while sel.get_map() and problem is None:
                left = deadline - time.monotonic()
                ready = sel.select(left) if left > 0 else []
                if not ready:
                    problem = timed_out
                for key, _ in ready:
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.fileobj is proc.stdout:
                        out += chunk
                        if len(out) > KEY_COMMAND_MAX_OUTPUT:
                            problem = (f"key command {shown} printed more than"
                                       f" {KEY_COMMAND_MAX_OUTPUT} bytes: that is no key or"
                                       " passphrase")
                    else:
                        _pass_through(chunk)
                        err = err[-4096:] + chunk
        if problem is None:
            try:
                proc.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                problem = timed_out  # it closed its output but goes on running
    finally:
        if proc.returncode is None:
            _kill(proc, own_session=not terminal)
        proc.stdout.close()
        proc.stderr.close()
    if problem is not None:
        raise KeyCommandError(problem)
    status = proc.returncode
    if status != 0:
        if status < 0:
            try:
                what = f"was killed by {signal.Signals(-status).name}"
            except ValueError:
                what = f"was killed by signal {-status}"
        else:
            what = f"failed with exit status {status}"
        last = _last_line(bytes(err))
        raise KeyCommandError(f"key command {shown} {what}" + (f": {last}" if last else ""))
    secret = strip_newline(bytes(out))
    if not secret:
        raise KeyCommandError(f"key command {shown} printed nothing (it must print the master"
                              " key as 64 hex digits, or the passphrase)")
    return secret


def _scrypt(secret: bytes, kdf: dict[str, Any]) -> bytes:
    n, r, p = kdf["n"], kdf["r"], kdf["p"]
    return hashlib.scrypt(secret, salt=bytes.fromhex(kdf["salt"]), n=n, r=r, p=p,
                          maxmem=256 * n * r + (1 << 20), dklen=MASTER_KEY_SIZE)


class MasterKeySource:
    """How to obtain the master key. Build with key_file(), passphrase(), key_command()
    or plaintext()."""

    def __init__(self, kind: str | None, *, path: Path | None = None, secret: bytes = b"",
                 scrypt_n: int = SCRYPT_N, command: str | None = None,
                 terminal: bool = False) -> None:
        if kind not in BACKENDS and not (kind is None and command is not None):
            raise ValueError(f"unknown master key backend {kind!r}")
        # None for a key command until it opens a vault: its output decides till then
        self._kind = kind
        self.path = path
        self.command = command
        # the passphrase; for a key command its output, once it has run
        self._secret = secret
        self._scrypt_n = scrypt_n
        self._terminal = terminal

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
    def key_command(cls, command: str, *, terminal: bool = False,
                    output: bytes | None = None) -> MasterKeySource:
        """The secret ``command`` prints (see run_key_command; ``terminal``: it may use
        this process's stdin, a terminal). It runs at the first check(), derive() or
        new_header(), once. ``output``: what it printed when it already ran elsewhere
        (a client sent it to the daemon); it is not run again."""
        if not command.strip():
            raise TdefsError("the key command is empty")
        if output is not None and not output:
            raise TdefsError(f"key command {_shown(command)} printed nothing")
        return cls(None, command=command, terminal=terminal, secret=output or b"")

    @classmethod
    def plaintext(cls) -> MasterKeySource:
        return cls("plaintext")

    def __repr__(self) -> str:
        if self.command is not None:
            return f"MasterKeySource(key command {_shown(self.command)})"
        return f"MasterKeySource({self._kind!r})"

    @property
    def kind(self) -> str:
        """The backend ("key-file", "passphrase", "plaintext") this source opens or makes.
        A key command's is that of the vault it opened; before it opened one, its output
        decides (this runs it): 64 hex digits are a key, anything else a passphrase."""
        if self._kind is None:
            return "key-file" if _HEX_KEY.fullmatch(self._command_output()) else "passphrase"
        return self._kind

    def describe(self) -> str:
        """What the user gave, for messages: "key file K", "the passphrase"."""
        if self.command is not None:
            return f"key command {_shown(self.command)}"
        if self._kind == "key-file":
            return f"key file {self.path}"
        return "the passphrase" if self._kind == "passphrase" else "the plaintext test key"

    def wrong_key(self, vault: str) -> WrongMasterKey:
        """The error for a key of the vault's own backend that does not open it."""
        if self.command is not None:
            if self.kind == "key-file":
                return WrongMasterKey(f"wrong key from {self.describe()} for vault {vault} (it must"
                                      " print the key the vault was made or last rekeyed with)")
            return WrongMasterKey(f"wrong passphrase from {self.describe()} for vault {vault}")
        if self._kind == "key-file":
            return WrongMasterKey(f"wrong key file {self.path} for vault {vault}"
                                  " (give the key file the vault was made or last rekeyed with)")
        if self._kind == "passphrase":
            return WrongMasterKey(f"wrong passphrase for vault {vault}")
        return WrongMasterKey(f"the plaintext test key does not open vault {vault}")

    def check(self) -> None:
        """Fail now, before anything is written, if the key cannot be had: read a key file,
        run a key command. A command runs here and never again, so a process that detaches
        (the mount's daemon) calls this before it does and takes the secret along."""
        if self.command is not None:
            self._command_output()
        elif self._kind == "key-file":
            assert self.path is not None
            read_key_file(self.path)

    def _command_output(self) -> bytes:
        assert self.command is not None
        if not self._secret:
            self._secret = run_key_command(self.command, terminal=self._terminal)
        return self._secret

    def to_message(self) -> dict[str, str]:
        """This key as the fields of a control message, for a running daemon that re-seals
        its vault with it: a key file's absolute path and its hex content (the daemon
        reads the file itself and refuses it if that differs), the passphrase, or a key
        command and its output (the daemon does not run it). Bytes that are not UTF-8
        travel as surrogate escapes."""
        if self.command is not None:
            return {"kind": "key-command", "command": self.command,
                    "output": os.fsdecode(self._command_output())}
        if self._kind == "key-file":
            assert self.path is not None
            return {"kind": "key-file", "path": os.path.abspath(self.path),
                    "key": read_key_file(self.path).hex()}
        if self._kind == "passphrase":
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
        if kind == "key-command":
            command, output = fields.get("command"), fields.get("output")
            if not (isinstance(command, str) and isinstance(output, str)):
                raise TdefsError("a key command's secret is sent as the command and its output")
            return cls.key_command(command, output=os.fsencode(output))
        raise TdefsError(f"unknown kind of master key {kind!r} (key-file, passphrase or"
                         " key-command)")

    def new_header(self) -> dict[str, Any]:
        """The backend part of a new keys.dict header (no secrets)."""
        header: dict[str, Any] = {"backend": self.kind}
        if header["backend"] == "passphrase":
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
        backend = header["backend"]
        if self.command is not None:
            return self._derive_from_command(backend, header, vault)
        if backend != self._kind:
            raise WrongMasterKey(
                f"vault {vault} is sealed with {_describe_backend(backend)},"
                f" not {_describe_backend(self.kind)}"
            )
        if self._kind == "key-file":
            assert self.path is not None
            return read_key_file(self.path)
        if self._kind == "plaintext":
            return bytes(MASTER_KEY_SIZE)
        return _scrypt(self._secret, header["kdf"])

    def _derive_from_command(self, backend: str, header: dict[str, Any], vault: str) -> bytes:
        """A key command's output read the way the vault's backend says: a key file's 64
        hex digits, or a passphrase."""
        output = self._command_output()
        if backend == "key-file":
            if not _HEX_KEY.fullmatch(output):
                raise WrongMasterKey(f"{self.describe()} printed no key: vault {vault} is sealed"
                                     " with a key file, so the command must print the key as"
                                     f" {MASTER_KEY_SIZE * 2} hex digits")
            key = bytes.fromhex(output.decode("ascii"))
        elif backend == "passphrase":
            key = _scrypt(output, header["kdf"])
        else:
            raise WrongMasterKey(f"vault {vault} is sealed with {_describe_backend(backend)},"
                                 " not a key or passphrase from a key command")
        self._kind = backend
        return key
