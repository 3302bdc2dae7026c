"""`tdefs init`, `tdefs fsck [--repair]`, `tdefs keys list|rotate` and `tdefs master-key
rotate` on a backing directory (run in-process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from encfs import content
from encfs.errors import TdefsError, VaultError
from encfs.masterkey import MasterKeySource
from encfs.vault import Vault
from mount.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def initialised(tmp_path, capsys) -> tuple[Path, Path]:
    backing, key = tmp_path / "vault", tmp_path / "master.key"
    code, out, err = run(capsys, "init", str(backing), "--key-file", str(key), "--generate-key")
    assert code == 0 and "initialised vault" in out and err == ""
    assert key.stat().st_mode & 0o777 == 0o600
    return backing, key


def write(backing: Path, key: Path, files: dict[str, bytes]) -> None:
    with Vault.open(backing, MasterKeySource.key_file(key)) as v:
        for name, data in files.items():
            fd, cipher = v.create(name.encode(), os.O_WRONLY, 0o644)
            content.write_at(fd, cipher, data, 0)
            os.close(fd)


def test_init_refuses_existing_vault_with_one_line_error(initialised, capsys):
    backing, key = initialised
    code, _, err = run(capsys, "init", str(backing), "--key-file", str(key))
    assert code == 1
    assert err.startswith("tdefs: error: ") and err.count("\n") == 1
    code, _, err = run(capsys, "init", str(backing.parent / "x"), "--passphrase-env", "NO_SUCH_VAR_X")
    assert code == 1 and "NO_SUCH_VAR_X" in err
    code, _, err = run(capsys, "init", str(backing.parent / "y"), "--generate-key",
                       "--passphrase-env", "X")
    assert code == 1 and "--generate-key needs --key-file" in err


def test_init_with_passphrase_file_and_method(tmp_path, capsys):
    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    code, out, _ = run(capsys, "init", str(tmp_path / "v"), "--passphrase-file", str(pw),
                       "--method", "sm4-ctr")
    assert code == 0 and "sm4-ctr" in out
    code, out, _ = run(capsys, "keys", "list", str(tmp_path / "v"), "--passphrase-file", str(pw))
    assert code == 0 and "sm4-ctr" in out
    pw.write_text("hunter3\n")
    code, _, err = run(capsys, "keys", "list", str(tmp_path / "v"), "--passphrase-file", str(pw))
    assert err == f"tdefs: error: wrong passphrase for vault {tmp_path / 'v'}\n"


def test_init_passphrase_piped_in_without_a_terminal(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TDEFS_FAILPOINTS"}
    # a new session has no controlling terminal, so getpass cannot fall back to /dev/tty
    proc = subprocess.run([sys.executable, "-m", "mount.cli", "init", str(tmp_path / "v"),
                           "--passphrase"], input=b"piped secret\n", capture_output=True,
                          cwd=repo, env=env, start_new_session=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert b"Warning" not in proc.stderr and proc.stderr == b""
    proc = subprocess.run([sys.executable, "-m", "mount.cli", "keys", "list", str(tmp_path / "v"),
                           "--passphrase-env", "TDEFS_TEST_PW"], capture_output=True, cwd=repo,
                          env={**env, "TDEFS_TEST_PW": "piped secret"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert b"aes-256-ctr" in proc.stdout


def test_init_over_existing_files_warns_they_stay_plaintext(tmp_path, capsys):
    backing = tmp_path / "data"
    (backing / "sub").mkdir(parents=True)
    (backing / "a.txt").write_bytes(b"old")
    (backing / "sub" / "b.txt").write_bytes(b"older")
    os.symlink("a.txt", backing / "link")  # not a file that could be encrypted
    code, out, err = run(capsys, "init", str(backing), "--key-file", str(tmp_path / "k"),
                         "--generate-key")
    assert code == 0 and "initialised vault" in out
    assert err == (f"tdefs: warning: the 2 files already in {backing} stay plaintext (readable"
                   " through the mount, not encrypted) until rewritten through the mount\n")


def test_keys_list_and_rotate(initialised, capsys):
    backing, key = initialised
    write(backing, key, {"a": b"A" * 1000, "b": b"B" * 24})
    code, out, _ = run(capsys, "keys", "rotate", str(backing), "--key-file", str(key))
    assert code == 0
    assert out == ("new active data key 2 (aes-256-ctr); files under older keys: the next"
                   " mount's re-encryption rewrites them\n")
    write(backing, key, {"c": b"C" * 5})
    with Vault.open(backing, MasterKeySource.key_file(key)) as v:
        v.link(b"c", b"c2")  # two entries, one file
    code, out, _ = run(capsys, "keys", "list", str(backing), "--key-file", str(key))
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "METHOD", "CREATED", "(UTC)", "ACTIVE", "FILES", "BYTES"]
    rows = [line.split() for line in lines[1:]]
    # id, files, bytes (a hard-linked file counts its bytes once)
    assert [(r[0], r[-2], r[-1]) for r in rows] == [("1", "2", "1024"), ("2", "2", "5")]
    assert "yes" in lines[2] and "yes" not in lines[1]
    code, out, _ = run(capsys, "keys", "list", str(backing), "--key-file", str(key), "--json")
    listed = json.loads(out)
    assert [{k: r[k] for k in ("id", "method", "active", "files", "bytes")} for r in listed] == [
        {"id": 1, "method": "aes-256-ctr", "active": False, "files": 2, "bytes": 1024},
        {"id": 2, "method": "aes-256-ctr", "active": True, "files": 2, "bytes": 5}]
    assert all(isinstance(r["created"], int) for r in listed)
    code, out, _ = run(capsys, "keys", "rotate", str(backing), "--key-file", str(key),
                       "--method", "sm4-ctr")
    assert code == 0 and "new active data key 3 (sm4-ctr)" in out


def test_keys_on_a_backing_directory_without_key_options_say_so(initialised, capsys):
    backing, _ = initialised
    for action in ("list", "rotate"):
        code, out, err = run(capsys, "keys", action, str(backing))
        assert code == 1 and out == ""
        assert err == (f"tdefs: error: {backing} is not a running tdefs mount, so `tdefs keys"
                       f" {action}` opens it as a backing directory and needs its master key:"
                       " --key-file, --passphrase-file, --passphrase-env, --passphrase or"
                       " --key-command\n")


@pytest.mark.parametrize("argv", [["mount-keys", "list", "."], ["keys", "rekey", "."],
                                  ["keys", "list"], ["master-key", "rotate", "."]])
def test_removed_and_incomplete_commands_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "usage: tdefs" in capsys.readouterr().err


def test_fsck_reports_stale_and_plaintext_then_repairs(initialised, capsys):
    backing, key = initialised
    write(backing, key, {"a": b"A", "gone": b"G"})
    (backing / "gone").unlink()
    (backing / "legacy.txt").write_bytes(b"plain")
    code, out, _ = run(capsys, "fsck", str(backing), "--key-file", str(key))
    # a stale entry is what a killed daemon leaves: information, not a failure
    assert code == 0
    assert "crash leftover: 1 stale entries (files that no longer exist) found" in out
    assert "    gone\n" in out
    assert "files without an entry (plaintext): 1\n    legacy.txt\n" in out
    assert "key 1: 1 files" in out and "problems found" not in out
    code, out, _ = run(capsys, "fsck", str(backing), "--key-file", str(key), "--repair")
    assert code == 0 and "1 stale entries (files that no longer exist) removed" in out
    code, out, _ = run(capsys, "fsck", str(backing), "--key-file", str(key))
    assert code == 0 and "crash leftover" not in out


def test_fsck_repair_salvages_a_corrupt_log(initialised, capsys):
    backing, key = initialised
    names = [f"f{i}" for i in range(10)]
    for name in names:  # one record per file
        write(backing, key, {name: name.encode() * 50})
    log = backing / ".tdefs" / "files.dict"
    data = bytearray(log.read_bytes())
    record = (len(data) - 68) // 10
    bad = 68 + 6 * record + 20  # inside the 7th record (f6)
    data[bad] ^= 0x01
    log.write_bytes(bytes(data))
    with pytest.raises(Exception) as err:
        Vault.open(backing, MasterKeySource.key_file(key))
    assert "files.dict" in str(err.value) and f"offset {68 + 6 * record}" in str(err.value)
    code, out, _ = run(capsys, "fsck", str(backing), "--key-file", str(key))
    assert code == 1 and "--repair" in out
    code, out, _ = run(capsys, "fsck", str(backing), "--key-file", str(key), "--repair")
    assert code == 0, out
    assert f"offset {68 + 6 * record}: {record} bytes, 1 record lost" in out
    assert "the lost records named" in out and "    f6\n" in out
    assert "files whose entry was lost: 1 rebuilt from their own copies\n    f6\n" in out
    with Vault.open(backing, MasterKeySource.key_file(key)) as v:
        for name in names:  # every file reads back, f6 through its per-file copy
            fd = os.open(backing / name, os.O_RDONLY)
            assert content.read_at(fd, v.cipher_for(name.encode()), 1000, 0) == name.encode() * 50
            os.close(fd)
        assert set(v.files.entries) == {n.encode() for n in names}
    code, out, _ = run(capsys, "fsck", str(backing), "--key-file", str(key))
    assert code == 0 and "damaged" not in out

@pytest.mark.parametrize("repair", [False, True])
def test_fsck_on_a_damaged_keys_dict_says_restore_it_not_repair(initialised, capsys, repair):
    backing, key = initialised
    keys = backing / ".tdefs" / "keys.dict"
    data = bytearray(keys.read_bytes())
    data[-1] ^= 0x01  # in the GCM tag
    keys.write_bytes(bytes(data))
    code, out, _ = run(capsys, "fsck", str(backing), "--key-file", str(key),
                       *(["--repair"] if repair else []))
    assert code == 1
    assert out.startswith(f"keys.dict: corruption in {keys} at offset ")
    assert out.count("\n") == 1 and out.rstrip().endswith(
        "it holds the vault's data keys and nothing can rebuild it: restore it from a backup")
    assert "files.dict" not in out and "--repair" not in out
    assert keys.read_bytes() == bytes(data)


def test_fsck_on_a_flipped_backend_name_is_damage_not_a_wrong_key(initialised, capsys):
    backing, key = initialised
    keys = backing / ".tdefs" / "keys.dict"
    keys.write_bytes(keys.read_bytes().replace(b'"key-file"', b'"key,file"', 1))
    code, out, _ = run(capsys, "fsck", str(backing), "--key-file", str(key))
    assert code == 1
    assert out.startswith(f"keys.dict: corruption in {keys} at offset 14: malformed header"
                          " (unknown backend 'key,file'); ")
    assert "restore it from a backup" in out
    code, _, err = run(capsys, "keys", "list", str(backing), "--key-file", str(key))
    assert code == 1 and err.count("\n") == 1 and "restore it from a backup" in err
    assert "wrong" not in err and "sealed with" not in err


def test_not_a_vault_and_bad_key_file_mode(tmp_path, capsys):
    code, _, err = run(capsys, "fsck", str(tmp_path), "--plaintext-key")
    assert code == 1 and "not a tdefs vault" in err
    key = tmp_path / "k"
    key.write_text("00" * 32)
    key.chmod(0o644)
    code, _, err = run(capsys, "init", str(tmp_path / "v"), "--key-file", str(key))
    assert code == 1 and "chmod 600" in err and not (tmp_path / "v").exists()


def test_master_key_rotate_changes_the_master_key(initialised, capsys):
    backing, key = initialised
    write(backing, key, {"a": b"A" * 20})
    new = backing.parent / "new.key"
    code, _, err = run(capsys, "master-key", "rotate", str(backing), "--new-key-file", str(new))
    assert code == 1 and "needs its master key" in err and not new.exists()
    code, _, err = run(capsys, "master-key", "rotate", str(backing), "--key-file", str(key),
                       "--new-passphrase-env", "X", "--generate-key")
    assert err == "tdefs: error: --generate-key needs --new-key-file\n"
    code, out, _ = run(capsys, "master-key", "rotate", str(backing), "--key-file", str(key),
                       "--new-key-file", str(new), "--generate-key")
    assert code == 0
    assert out.splitlines()[-1] == (f"vault {backing} is now sealed with the new master key"
                                    " (key-file); the old one no longer opens it")
    code, _, err = run(capsys, "keys", "list", str(backing), "--key-file", str(key))
    assert code == 1 and f"wrong key file {key} for vault {backing}" in err
    with Vault.open(backing, MasterKeySource.key_file(new)) as v:
        fd = os.open(backing / "a", os.O_RDONLY)
        assert content.read_at(fd, v.cipher_for(b"a"), 100, 0) == b"A" * 20
        os.close(fd)


def test_master_key_rotate_to_a_passphrase_and_back(initialised, capsys, monkeypatch):
    backing, key = initialised
    write(backing, key, {"a": b"A" * 20})
    monkeypatch.setenv("TDEFS_TEST_NEW_PW", "correct horse")
    code, out, _ = run(capsys, "master-key", "rotate", str(backing), "--key-file", str(key),
                       "--new-passphrase-env", "TDEFS_TEST_NEW_PW")
    assert code == 0 and "(passphrase); the old one no longer opens it" in out
    code, _, err = run(capsys, "keys", "list", str(backing), "--key-file", str(key))
    assert code == 1 and "sealed with a passphrase" in err
    code, out, _ = run(capsys, "keys", "list", str(backing), "--passphrase-env",
                       "TDEFS_TEST_NEW_PW")
    assert code == 0 and "aes-256-ctr" in out


def test_master_key_rotate_to_the_same_key_file_changes_nothing(initialised, capsys):
    backing, key = initialised
    keys = backing / ".tdefs" / "keys.dict"
    before = keys.read_bytes()
    code, out, err = run(capsys, "master-key", "rotate", str(backing), "--key-file", str(key),
                         "--new-key-file", str(key), "--generate-key")
    assert code == 1 and out == ""
    assert err == (f"tdefs: error: vault {backing} is already sealed with key file {key}:"
                   " nothing changed (rekey needs a different new key)\n")
    assert keys.read_bytes() == before
    code, _, _ = run(capsys, "keys", "list", str(backing), "--key-file", str(key))
    assert code == 0


def test_master_key_rotate_to_the_same_passphrase_says_it_still_opens(tmp_path, capsys):
    pw = tmp_path / "pw"
    pw.write_text("same\n")
    backing = tmp_path / "v"
    assert run(capsys, "init", str(backing), "--passphrase-file", str(pw))[0] == 0
    code, out, _ = run(capsys, "master-key", "rotate", str(backing), "--passphrase-file", str(pw),
                       "--new-passphrase-file", str(pw))
    assert code == 0 and "the same passphrase still opens it" in out
    assert "no longer opens" not in out


def test_a_new_master_key_as_a_control_message(tmp_path):
    """What `master-key rotate` sends to a daemon, and what the daemon makes of it."""
    key = tmp_path / "k"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    fields = MasterKeySource.key_file(key).to_message()
    assert fields == {"kind": "key-file", "path": str(key), "key": "ab" * 32}
    source = MasterKeySource.from_message(json.loads(json.dumps(fields)))
    assert source.kind == "key-file" and source.path == key
    key.write_text("cd" * 32 + "\n")  # the file changed after the client read it
    with pytest.raises(VaultError, match=f"key file {key} changed after it was read"):
        MasterKeySource.from_message(fields)
    with pytest.raises(TdefsError, match="absolute path"):
        MasterKeySource.from_message({**fields, "path": "k"})
    secret = b"caf\xc3\xa9 \xff\xfe not utf-8"
    fields = MasterKeySource.passphrase(secret).to_message()
    source = MasterKeySource.from_message(json.loads(json.dumps(fields)))
    header = {"backend": "passphrase", "kdf": {"name": "scrypt", "salt": "00" * 16,
                                                "n": 2, "r": 1, "p": 1}}
    assert source.derive(header, "v") == MasterKeySource.passphrase(secret).derive(header, "v")
    with pytest.raises(TdefsError, match="kind"):
        MasterKeySource.from_message({"kind": "plaintext"})


def test_init_durability_option(tmp_path, capsys):
    import json

    key = tmp_path / "k"
    code, _, _ = run(capsys, "init", str(tmp_path / "v"), "--key-file", str(key), "--generate-key",
                     "--durability", "ordered")
    assert code == 0
    config = json.loads((tmp_path / "v" / ".tdefs" / "vault.json").read_text())
    assert config["options"]["durability"] == "ordered"
    config["options"]["durability"] = "sloppy"
    (tmp_path / "v" / ".tdefs" / "vault.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "keys", "list", str(tmp_path / "v"), "--key-file", str(key))
    assert code == 1 and "unknown durability" in err
