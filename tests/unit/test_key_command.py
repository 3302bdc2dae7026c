"""The master key from a program (`--key-command CMD`, `--new-key-command CMD`): how it
runs (the shell, stdin, stderr, the time limit), how its output is read (a key or a
passphrase, as the vault's header says), and its errors, one line each."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

from encfs import content
from encfs.errors import TdefsError, WrongMasterKey
from encfs.masterkey import (
    KEY_COMMAND_TIMEOUT_ENV,
    KEY_COMMAND_TIMEOUT_S,
    KeyCommandError,
    MasterKeySource,
    generate_key_file,
    read_key_file,
    run_key_command,
)
from encfs.vault import Vault
from mount.cli import main

PRINT_PW = "printf '%s\\n' \"$TDEFS_TEST_PW\""


def run(capfd, *argv: str) -> tuple[int, str, str]:
    """`tdefs ARGV` in-process; stderr at the descriptor, where a command's own goes."""
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one `tdefs: error:` line of ``err``, which has no other line of tdefs'."""
    ours = [line for line in err.splitlines() if line.startswith("tdefs:")]
    assert len(ours) == 1 and ours[0].startswith("tdefs: error: "), err
    return ours[0]


def put(backing: Path, source: MasterKeySource, name: str, data: bytes) -> None:
    with Vault.open(backing, source) as v:
        fd, cipher = v.create(name.encode(), os.O_WRONLY, 0o644)
        content.write_at(fd, cipher, data, 0)
        os.close(fd)


def get(backing: Path, source: MasterKeySource, name: str) -> bytes:
    with Vault.open(backing, source) as v:
        fd = os.open(backing / name, os.O_RDONLY)
        try:
            return content.read_at(fd, v.cipher_for(name.encode()), 1 << 20, 0)
        finally:
            os.close(fd)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    generate_key_file(path)
    return path


def dead(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (an orphan waits for init to reap it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def counting(tmp_path: Path, command: str) -> tuple[str, Path]:
    """``command`` that also appends a line to a file per run: how often it ran."""
    runs = tmp_path / "runs"
    return f"echo ran >> {runs}; {command}", runs


def test_a_command_printing_the_key_and_the_key_file_holding_it_are_one_key(tmp_path, key):
    backing = tmp_path / "v"
    Vault.create(backing, MasterKeySource.key_file(key)).close()
    put(backing, MasterKeySource.key_file(key), "f", b"sealed from a key file")
    command, runs = counting(tmp_path, f"cat {key}")
    source = MasterKeySource.key_command(command)
    assert get(backing, source, "f") == b"sealed from a key file"
    assert source.kind == "key-file" and source.describe() == f"key command `{command}`"
    # and the other way round: a vault made from a command opens with the key file
    other = tmp_path / "w"
    Vault.create(other, MasterKeySource.key_command(f"cat {key}")).close()
    put(other, MasterKeySource.key_command(f"cat {key}"), "g", b"sealed from a command")
    assert get(other, MasterKeySource.key_file(key), "g") == b"sealed from a command"
    raw = (other / ".tdefs" / "keys.dict").read_bytes()
    header = json.loads(raw[14:14 + int.from_bytes(raw[10:14], "big")])  # docs/vault-format.md
    assert header["backend"] == "key-file"  # the command is only where the key came from
    assert runs.read_text() == "ran\n"  # once per source, however often it is used


def test_a_command_printing_a_passphrase_and_the_passphrase_are_one_key(tmp_path, capfd,
                                                                         monkeypatch):
    monkeypatch.setenv("TDEFS_TEST_PW", "from the KMS")
    backing = tmp_path / "v"
    code, out, err = run(capfd, "init", str(backing), "--key-command", PRINT_PW)
    assert code == 0 and err == ""
    assert "(cipher aes-256-ctr, master key: passphrase)" in out
    code, out, err = run(capfd, "keys", "list", str(backing), "--passphrase-env", "TDEFS_TEST_PW")
    assert code == 0 and "aes-256-ctr" in out, err
    code, out, err = run(capfd, "keys", "list", str(backing), "--key-command", PRINT_PW)
    assert code == 0 and "aes-256-ctr" in out, err
    monkeypatch.setenv("TDEFS_TEST_PW", "from the KMS, but wrong")
    code, _, err = run(capfd, "keys", "list", str(backing), "--key-command", PRINT_PW)
    assert err == (f"tdefs: error: wrong passphrase from key command `{PRINT_PW}` for vault"
                   f" {backing}\n")


def test_a_passphrase_vault_reads_64_hex_digits_as_its_passphrase(tmp_path):
    """At init 64 hex digits are a key, but a vault sealed with a passphrase says what
    the output is: here a passphrase that looks like a key."""
    hex_pw = "ab" * 32
    backing = tmp_path / "v"
    Vault.create(backing, MasterKeySource.passphrase(hex_pw.encode(), scrypt_n=1 << 10)).close()
    source = MasterKeySource.key_command(f"echo {hex_pw}")
    assert source.kind == "key-file"  # by its output alone, before it met the vault
    with Vault.open(backing, source) as v:
        assert v.keys.backend == "passphrase" and v.keys.opens_with(source)
    assert source.kind == "passphrase"


def test_a_failing_command_is_one_line_with_its_exit_status(tmp_path, key, capfd):
    backing = tmp_path / "v"
    Vault.create(backing, MasterKeySource.key_file(key)).close()
    command = "echo starting >&2; echo no token >&2; exit 3"
    code, out, err = run(capfd, "keys", "list", str(backing), "--key-command", command)
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "starting", "no token",  # the command's own stderr, passed through
        f"tdefs: error: key command `{command}` failed with exit status 3: no token"]
    code, _, err = run(capfd, "keys", "list", str(backing), "--key-command", "exit 4")
    assert err == "tdefs: error: key command `exit 4` failed with exit status 4\n"
    code, _, err = run(capfd, "keys", "list", str(backing), "--key-command", "kill -TERM $$")
    assert err == "tdefs: error: key command `kill -TERM $$` was killed by SIGTERM\n"
    code, _, err = run(capfd, "keys", "list", str(backing), "--key-command", "no-such-program-x")
    assert "no-such-program-x" in err
    assert error_line(err) == ("tdefs: error: key command `no-such-program-x` failed with exit"
                               " status 127: " + err.splitlines()[0].strip())


def test_garbage_for_a_key_file_vault_is_one_line_that_does_not_repeat_it(tmp_path, key, capfd):
    backing = tmp_path / "v"
    Vault.create(backing, MasterKeySource.key_file(key)).close()
    before = (backing / ".tdefs" / "keys.dict").read_bytes()
    code, out, err = run(capfd, "keys", "list", str(backing), "--key-command",
                         "echo my-secret-passphrase")
    assert code == 1 and out == ""
    assert err == ("tdefs: error: key command `echo my-secret-passphrase` printed no key: vault"
                   f" {backing} is sealed with a key file, so the command must print the key as"
                   " 64 hex digits\n")
    other = "cd" * 32
    code, _, err = run(capfd, "keys", "list", str(backing), "--key-command", f"echo {other}")
    assert err == (f"tdefs: error: wrong key from key command `echo {other}` for vault {backing}"
                   " (it must print the key the vault was made or last rekeyed with)\n")
    assert (backing / ".tdefs" / "keys.dict").read_bytes() == before


def test_a_hanging_command_is_killed_at_the_time_limit(tmp_path, key, capfd, monkeypatch):
    assert KEY_COMMAND_TIMEOUT_S == 30
    monkeypatch.setenv(KEY_COMMAND_TIMEOUT_ENV, "1")
    backing = tmp_path / "v"
    Vault.create(backing, MasterKeySource.key_file(key)).close()
    pid_file = tmp_path / "pid"
    # the shell, and a child it started, holding stdout open: both are killed
    command = f"sleep 60 & echo $! > {pid_file}; echo waiting >&2; wait"
    started = time.monotonic()
    code, out, err = run(capfd, "keys", "list", str(backing), "--key-command", command)
    elapsed = time.monotonic() - started
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "waiting",
        f"tdefs: error: key command `{command}` was still running after 1 s and was killed"
        " ($TDEFS_KEY_COMMAND_TIMEOUT sets the limit in seconds)"]
    assert 1 <= elapsed < 10
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not dead(child):  # SIGKILL is sent; its delivery is not synchronous
        assert time.monotonic() < deadline, f"the command's child {child} survived"
        time.sleep(0.01)
    # a command that closes its output and goes on is still one that hangs
    with pytest.raises(KeyCommandError, match="was still running after 0.5 s"):
        run_key_command("echo " + "ab" * 32 + "; exec >&-; sleep 60", timeout=0.5)
    monkeypatch.setenv(KEY_COMMAND_TIMEOUT_ENV, "soon")
    code, _, err = run(capfd, "keys", "list", str(backing), "--key-command", "true")
    assert err == ("tdefs: error: TDEFS_KEY_COMMAND_TIMEOUT='soon' is not a number of seconds"
                   " above 0\n")


def test_output_that_is_no_secret_is_refused(tmp_path):
    with pytest.raises(KeyCommandError, match=r"^key command `true` printed nothing \("):
        run_key_command("true")
    with pytest.raises(KeyCommandError, match="printed nothing"):
        run_key_command("echo")  # only the newline, which is not part of the secret
    with pytest.raises(KeyCommandError, match="printed more than 4096 bytes"):
        run_key_command("yes")
    # one trailing newline goes, any other byte stays
    assert run_key_command("printf ' pass phrase \\n\\n'") == b" pass phrase \n"
    assert run_key_command("printf 'x\\r\\n'") == b"x"
    with pytest.raises(TdefsError, match="the key command is empty"):
        MasterKeySource.key_command("  ")
    # without a terminal, stdin is /dev/null: `cat` ends at once, having read nothing
    with pytest.raises(KeyCommandError, match="printed nothing"):
        run_key_command("cat")
    # and it has no controlling terminal to ask for a PIN on
    with pytest.raises(KeyCommandError, match="exit status 1: no tty"):
        run_key_command("(: < /dev/tty) 2>/dev/null || { echo no tty >&2; exit 1; }")


def test_a_command_runs_through_the_shell_once_per_process(tmp_path, key, capfd):
    backing = tmp_path / "v"
    Vault.create(backing, MasterKeySource.key_file(key)).close()
    new = tmp_path / "new.key"
    generate_key_file(new)
    old_cmd, old_runs = counting(tmp_path / "old", f"cat {key} | tr a-f A-F")  # hex either case
    new_cmd, new_runs = counting(tmp_path / "new", f"cat {new}")
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    code, out, err = run(capfd, "master-key", "rotate", str(backing), "--key-command", old_cmd,
                         "--new-key-command", new_cmd)
    assert code == 0, err
    assert out == (f"vault {backing} is now sealed with the new master key (key-file); the old"
                   " one no longer opens it\n")
    assert old_runs.read_text() == "ran\n" and new_runs.read_text() == "ran\n"


def test_master_key_rotate_from_a_key_file_to_a_command(tmp_path, key, capfd, monkeypatch):
    backing = tmp_path / "v"
    Vault.create(backing, MasterKeySource.key_file(key)).close()
    put(backing, MasterKeySource.key_file(key), "f", b"data")
    monkeypatch.setenv("TDEFS_TEST_PW", "a passphrase from the KMS")
    code, out, err = run(capfd, "master-key", "rotate", str(backing), "--key-file", str(key),
                         "--new-key-command", PRINT_PW)
    assert code == 0, err
    assert out == (f"vault {backing} is now sealed with the new master key (passphrase); the old"
                   " one no longer opens it\n")
    code, _, err = run(capfd, "keys", "list", str(backing), "--key-file", str(key))
    assert code == 1 and "sealed with a passphrase" in err
    assert get(backing, MasterKeySource.passphrase(b"a passphrase from the KMS"), "f") == b"data"
    # to the same passphrase through a command: a new salt, and the old command still opens it
    code, out, _ = run(capfd, "master-key", "rotate", str(backing), "--key-command", PRINT_PW,
                       "--new-key-command", PRINT_PW)
    assert code == 0 and "the same passphrase still opens it" in out


def test_master_key_rotate_from_a_passphrase_command_to_a_key_file(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("TDEFS_TEST_PW", "token pin")
    backing, new = tmp_path / "v", tmp_path / "new.key"
    assert run(capfd, "init", str(backing), "--key-command", PRINT_PW)[0] == 0
    put(backing, MasterKeySource.passphrase(b"token pin"), "f", b"data")
    code, out, err = run(capfd, "master-key", "rotate", str(backing), "--key-command", PRINT_PW,
                         "--new-key-file", str(new), "--generate-key")
    assert code == 0, err
    assert out.splitlines()[-1] == (f"vault {backing} is now sealed with the new master key"
                                    " (key-file); the old one no longer opens it")
    assert get(backing, MasterKeySource.key_file(new), "f") == b"data"
    assert get(backing, MasterKeySource.key_command(f"cat {new}"), "f") == b"data"
    code, _, err = run(capfd, "keys", "list", str(backing), "--key-command", PRINT_PW)
    assert code == 1 and "printed no key" in err
    # the new command must print something: nothing changed when it does not
    before = (backing / ".tdefs" / "keys.dict").read_bytes()
    code, _, err = run(capfd, "master-key", "rotate", str(backing), "--key-file", str(new),
                       "--new-key-command", "exit 9")
    assert err == "tdefs: error: key command `exit 9` failed with exit status 9\n"
    assert (backing / ".tdefs" / "keys.dict").read_bytes() == before


def test_a_command_as_a_control_message_is_not_run_by_the_daemon(tmp_path, key):
    """What `master-key rotate MOUNTPOINT --new-key-command CMD` sends: the command's
    output, which the daemon reads the way the client would (it never runs CMD)."""
    command = f"cat {key}"
    fields = MasterKeySource.key_command(command).to_message()
    assert fields == {"kind": "key-command", "command": command,
                      "output": read_key_file(key).hex()}
    source = MasterKeySource.from_message(json.loads(json.dumps(fields)))
    key.unlink()  # were the command run again, it would fail now
    assert source.kind == "key-file" and source.derive({"backend": "key-file"}, "v") == \
        bytes.fromhex(fields["output"])
    secret = b"caf\xc3\xa9 \xff not utf-8"
    fields = MasterKeySource.key_command("x", output=secret).to_message()
    source = MasterKeySource.from_message(json.loads(json.dumps(fields)))
    assert source.kind == "passphrase" and source._secret == secret
    with pytest.raises(TdefsError, match="command and its output"):
        MasterKeySource.from_message({"kind": "key-command", "command": "x"})
    with pytest.raises(TdefsError, match="printed nothing"):
        MasterKeySource.from_message({"kind": "key-command", "command": "x", "output": ""})


def test_a_plaintext_vault_is_not_opened_by_a_command(tmp_path):
    backing = tmp_path / "v"
    Vault.create(backing, MasterKeySource.plaintext()).close()
    with pytest.raises(WrongMasterKey, match="sealed with the plaintext test key"):
        Vault.open(backing, MasterKeySource.key_command("echo " + "00" * 32))


def test_the_core_has_no_terminal_or_option_code():
    import encfs.masterkey as core

    for name in ("add_key_options", "add_new_key_options", "source_from_args",
                 "new_source_from_args", "_ask_passphrase", "getpass", "argparse", "sys"):
        assert not hasattr(core, name), name
