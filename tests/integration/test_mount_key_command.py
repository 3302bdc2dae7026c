"""The master key from a program on real mounts: `tdefs mount --key-command CMD` runs
CMD in the foreground process, once, before the daemon detaches; its failures are one
line and leave nothing mounted; `tdefs master-key rotate MOUNTPOINT --new-key-command
CMD` sends its output to the daemon. The secret is in no file of the vault and not
in the log."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fuse_harness import (
    VaultPaths,
    daemons_for,
    force_cleanup,
    is_mounted,
    make_vault,
    mounted_at,
    require_fuse,
    run_tdefs,
)

PRINT_KEY = "printf '%s\\n' \"$TDEFS_TEST_KEY\""
PRINT_PW = "printf '%s\\n' \"$TDEFS_TEST_PW\""


@dataclass
class _Keyed(VaultPaths):
    """A vault mounted with the master key options ``options``."""

    options: tuple[str, ...] = ()

    def key_args(self) -> list[str]:
        return list(self.options)


def keyed(v: VaultPaths, *options: str) -> _Keyed:
    return _Keyed(v.backing, v.mountpoint, v.key_file, v.log, options)


@pytest.fixture
def v(tmp_path: Path) -> VaultPaths:
    require_fuse()
    vault = make_vault(tmp_path)
    yield vault
    force_cleanup(vault.mountpoint)


def key_file(path: Path, key_hex: str) -> Path:
    path.write_text(key_hex + "\n")
    path.chmod(0o600)
    return path


def key_secrets(key_hex: str) -> list[bytes]:
    return [key_hex.lower().encode(), key_hex.upper().encode(), bytes.fromhex(key_hex)]


def assert_nowhere(v: VaultPaths, hidden: list[bytes]) -> None:
    """No file of the vault (nor any extended attribute there) and not the log holds
    any of ``hidden``."""
    blobs: list[tuple[str, bytes]] = [(str(v.log), v.log.read_bytes())]
    for path in [v.backing, *v.backing.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            blobs.append((str(path), path.read_bytes()))
        for name in os.listxattr(path, follow_symlinks=False):
            blobs.append((f"{path} xattr {name}", os.getxattr(path, name, follow_symlinks=False)))
    assert len(blobs) > 3
    for where, data in blobs:
        for secret in hidden:
            assert secret not in data, f"{where} holds a secret"


def one_line_error(proc) -> str:
    """The one line tdefs printed itself (a key command's own stderr passes through)."""
    ours = [line for line in proc.stderr.decode().splitlines() if line.startswith("tdefs:")]
    assert proc.returncode == 1 and len(ours) == 1 and ours[0].startswith("tdefs: error: "), \
        proc.stderr
    return ours[0]


def test_mount_with_a_command_printing_the_key(v: VaultPaths, tmp_path: Path) -> None:
    m, key_hex = v.mountpoint, v.key_file.read_text().strip()
    env = {"TDEFS_TEST_KEY": key_hex}
    ran = tmp_path / "ran"
    kv = keyed(v, "--key-command", f"echo $$ $PPID >> {ran}; {PRINT_KEY}")
    with mounted_at(kv, env=env):
        (m / "f").write_bytes(b"written with the key a command printed")
        assert (m / "f").read_bytes() == b"written with the key a command printed"
        daemon_pid = daemons_for(m)[0].pid
    # it ran once, in the foreground process: neither the daemon nor a child of it
    runs = ran.read_text().splitlines()
    assert len(runs) == 1 and str(daemon_pid) not in runs[0].split()
    with mounted_at(v):  # the key file holding the same key
        assert (m / "f").read_bytes() == b"written with the key a command printed"
        (m / "g").write_bytes(b"written with the key file")
    with mounted_at(kv, env=env):
        assert (m / "g").read_bytes() == b"written with the key file"
    assert len(ran.read_text().splitlines()) == 2
    assert_nowhere(v, key_secrets(key_hex))


def test_mount_with_a_command_printing_a_passphrase(tmp_path: Path) -> None:
    require_fuse()
    pw = "correct horse from the KMS"
    env = {"TDEFS_TEST_PW": pw}
    v = VaultPaths(tmp_path / "backing", tmp_path / "mnt", tmp_path / "no.key",
                   tmp_path / "daemon.log")
    v.backing.mkdir()
    v.mountpoint.mkdir()
    try:
        out = run_tdefs("init", v.backing, "--key-command", PRINT_PW, env=env).stdout.decode()
        assert "master key: passphrase" in out
        with mounted_at(keyed(v, "--key-command", PRINT_PW), env=env):
            (v.mountpoint / "f").write_bytes(b"sealed by a passphrase a command printed")
        with mounted_at(keyed(v, "--passphrase-env", "TDEFS_TEST_PW"), env=env):
            assert (v.mountpoint / "f").read_bytes() == b"sealed by a passphrase a command printed"
    finally:
        force_cleanup(v.mountpoint)
    assert_nowhere(v, [pw.encode()])


@pytest.mark.parametrize("command, timeout, own_lines, error", [
    ("echo no token >&2; exit 3", None, ["no token"],
     "key command `echo no token >&2; exit 3` failed with exit status 3: no token"),
    ("echo not-a-key", None, [],
     "key command `echo not-a-key` printed no key: vault {backing} is sealed with a key file,"
     " so the command must print the key as 64 hex digits"),
    ("echo asking for a PIN >&2; sleep 60", "1", ["asking for a PIN"],
     "key command `echo asking for a PIN >&2; sleep 60` was still running after 1 s and was"
     " killed ($TDEFS_KEY_COMMAND_TIMEOUT sets the limit in seconds)"),
], ids=["fails", "garbage", "hangs"])
def test_a_bad_command_is_one_line_and_nothing_is_mounted(v: VaultPaths, command, timeout,
                                                         own_lines, error) -> None:
    m = v.mountpoint
    env = {"TDEFS_KEY_COMMAND_TIMEOUT": timeout} if timeout else {}
    started = time.monotonic()
    try:
        # stdin not a terminal: the command gets /dev/null and a session of its own
        proc = run_tdefs("mount", v.backing, m, "--key-command", command, "--log", v.log,
                         env=env, check=False, input=b"")
        assert time.monotonic() - started < 20
        assert proc.stdout == b""
        assert proc.stderr.decode().splitlines() == [
            *own_lines, "tdefs: error: " + error.format(backing=v.backing)]
        assert one_line_error(proc)
        assert not is_mounted(m) and daemons_for(m) == []
    finally:
        force_cleanup(m)


def test_master_key_rotate_on_a_mount_between_commands_and_key_files(v: VaultPaths,
                                                                     tmp_path: Path) -> None:
    m = v.mountpoint
    old_hex, new_hex, pw = v.key_file.read_text().strip(), secrets.token_hex(32), "pin 1234 \u00e9"
    sealed = f"vault {v.backing} is now sealed with the new master key"
    # a key file -> a command printing a key
    with mounted_at(v):
        (m / "a").write_bytes(b"sealed under the first key file")
        out = run_tdefs("master-key", "rotate", m, "--new-key-command", PRINT_KEY,
                        env={"TDEFS_TEST_KEY": new_hex}).stdout.decode()
        assert out == f"{sealed} (key-file); the old one no longer opens it\n"
    assert (f"re-sealed keys.dict under a new master key (key command `{PRINT_KEY}`)"
            in v.log.read_text())
    proc = run_tdefs("mount", v.backing, m, "--key-file", v.key_file, check=False)
    assert f"wrong key file {v.key_file}" in one_line_error(proc)
    # ... which a key file holding the same key opens; then -> a command printing a passphrase
    with mounted_at(keyed(v, "--key-file", str(key_file(tmp_path / "same.key", new_hex)))):
        assert (m / "a").read_bytes() == b"sealed under the first key file"
        out = run_tdefs("master-key", "rotate", m, "--new-key-command", PRINT_PW,
                        env={"TDEFS_TEST_PW": pw}).stdout.decode()
        assert out == f"{sealed} (passphrase); the old one no longer opens it\n"
        (m / "b").write_bytes(b"sealed under a passphrase")
    # a passphrase (the same one, from the environment) -> a key file
    new_file = tmp_path / "last.key"
    with mounted_at(keyed(v, "--passphrase-env", "TDEFS_TEST_PW"), env={"TDEFS_TEST_PW": pw}):
        out = run_tdefs("master-key", "rotate", m, "--new-key-file", new_file,
                        "--generate-key").stdout.decode()
        assert out.splitlines()[-1] == f"{sealed} (key-file); the old one no longer opens it"
    last_hex = new_file.read_text().strip()
    with mounted_at(keyed(v, "--key-command", PRINT_KEY), env={"TDEFS_TEST_KEY": last_hex}):
        assert (m / "a").read_bytes() == b"sealed under the first key file"
        assert (m / "b").read_bytes() == b"sealed under a passphrase"
    assert_nowhere(v, [*key_secrets(old_hex), *key_secrets(new_hex), *key_secrets(last_hex),
                       pw.encode()])
