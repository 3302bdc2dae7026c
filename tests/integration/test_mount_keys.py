"""Keys from the command line: `tdefs keys list|rotate` and `tdefs master-key rotate` on
a running mount (through its daemon) and on the unmounted backing directory, `tdefs
status` with its keys and rotation fields, and the daemon's automatic rotation."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import types
from pathlib import Path

import pytest
import trio
from fuse_harness import (
    VaultPaths,
    daemons_for,
    force_cleanup,
    make_vault,
    mounted_at,
    require_fuse,
    run_tdefs,
)

from encfs.masterkey import MasterKeySource
from encfs.reencrypt import Reencryptor
from encfs.vault import Vault
from mount import daemon
from mount.mount_request import MountRequest

HEADER = ["ID", "METHOD", "CREATED", "(UTC)", "ACTIVE", "FILES", "BYTES"]
NOT_USED = "is a running mount, whose daemon holds the master key: the master key options were not used"


@pytest.fixture
def v(tmp_path: Path) -> VaultPaths:
    require_fuse()
    vault = make_vault(tmp_path)
    yield vault
    force_cleanup(vault.mountpoint)


class _PassphraseVault(VaultPaths):
    """A vault mounted with the passphrase in $TDEFS_TEST_PW."""

    def key_args(self) -> list[str]:
        return ["--passphrase-env", "TDEFS_TEST_PW"]


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the backing file has its size now, for `keys list`


def one_line_error(proc) -> str:
    err = [line for line in proc.stderr.decode().splitlines()
           if not line.startswith("tdefs: warning:")]
    assert proc.returncode == 1 and len(err) == 1 and err[0].startswith("tdefs: error: "), err
    return err[0]


def table(out: bytes) -> list[list[str]]:
    lines = out.decode().splitlines()
    assert lines[0].split() == HEADER
    return [line.split() for line in lines[1:]]


def wait_for_log(log: Path, text: str, timeout: float = 30) -> str:
    """The first line of the daemon's log that contains `text`, waiting for it."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log.read_text().splitlines() if log.exists() else []
        for line in lines:
            if text in line:
                return line
        assert time.monotonic() < deadline, f"no {text!r} in {log} after {timeout}s:\n" + \
            "\n".join(lines)
        time.sleep(0.05)


def test_keys_list_and_rotate_on_a_mount_and_on_its_backing_directory(v: VaultPaths) -> None:
    m = v.mountpoint
    with mounted_at(v):
        # the files stay under the keys they were written with (re-encryption would
        # move them; it is tested in test_mount_reencrypt.py)
        run_tdefs("reencrypt", "suspend", m)
        write_synced(m / "before", b"old key" * 100)
        os.link(m / "before", m / "before-link")
        assert [(r[0], r[-2], r[-1]) for r in table(run_tdefs("keys", "list", m).stdout)] == [
            ("1", "2", "700")]  # two entries, one file of 700 bytes
        out = run_tdefs("keys", "rotate", m, "--method", "aes-128-ctr").stdout.decode()
        assert out == ("new active data key 2 (aes-128-ctr); files under older keys:"
                       f" re-encryption rewrites them now (tdefs reencrypt status {m})\n")
        write_synced(m / "after", b"new key")
        online = run_tdefs("keys", "list", m).stdout
        online_json = json.loads(run_tdefs("keys", "list", m, "--json").stdout)
        # the vault is locked by its daemon: offline it is refused
        proc = run_tdefs("keys", "list", v.backing, *v.key_args(), check=False)
        assert "in use" in one_line_error(proc)
        # a mountpoint needs no key options; given anyway, they are said to be unused
        proc = run_tdefs("keys", "list", m, "--key-file", "/no/such/key")
        assert proc.stdout == online
        assert proc.stderr.decode() == f"tdefs: warning: {m} {NOT_USED}\n"
    offline = run_tdefs("keys", "list", v.backing, *v.key_args()).stdout
    offline_json = json.loads(run_tdefs("keys", "list", v.backing, *v.key_args(), "--json").stdout)
    assert offline == online and offline_json == online_json
    assert [(k["id"], k["method"], k["active"], k["files"], k["bytes"]) for k in offline_json] == [
        (1, "aes-256-ctr", False, 2, 700), (2, "aes-128-ctr", True, 1, 7)]
    proc = run_tdefs("keys", "list", v.backing, check=False)
    assert "needs its master key: --key-file" in one_line_error(proc)
    out = run_tdefs("keys", "rotate", v.backing, *v.key_args()).stdout.decode()
    assert out == ("new active data key 3 (aes-128-ctr); files under older keys: the next"
                   " mount's re-encryption rewrites them\n")
    with mounted_at(v):
        assert (m / "before").read_bytes() == b"old key" * 100
        assert (m / "after").read_bytes() == b"new key"
        assert [r[0] for r in table(run_tdefs("keys", "list", m).stdout)] == ["1", "2", "3"]


def test_removed_commands_are_usage_errors(v: VaultPaths) -> None:
    for argv in (["mount-keys", "list", v.mountpoint],
                 ["keys", "rekey", v.backing, *v.key_args(), "--new-key-file", "x"]):
        proc = run_tdefs(*argv, check=False)
        assert proc.returncode == 2 and b"invalid choice" in proc.stderr


def test_status_json_and_text_show_keys_and_rotation(v: VaultPaths) -> None:
    m = v.mountpoint
    with mounted_at(v):
        write_synced(m / "f", b"x" * 4096)
        reply = json.loads(run_tdefs("status", m, "--json").stdout)
        assert reply["pid"] == daemons_for(m)[0].pid and reply["uptime_s"] >= 0
        assert reply["backing"] == str(v.backing) and reply["mountpoint"] == str(m)
        active = reply["active_key"]
        assert (active["id"], active["method"]) == (1, "aes-256-ctr")
        assert reply["keys"] == json.loads(run_tdefs("keys", "list", m, "--json").stdout)
        assert [(k["id"], k["files"], k["bytes"]) for k in reply["keys"]] == [(1, 1, 4096)]
        assert reply["rotation"] == {"period_days": 7, "next_due": active["created"] + 7 * 86400,
                                     "last_automatic": None}
        text = run_tdefs("status", m).stdout.decode()
        assert "\nactive key:     1 (aes-256-ctr, created " in text
        assert "\nkey rotation:   every 7 days\n" in text and "\nnext rotation:  " in text
        assert "\nlast automatic: none since the mount\n" in text
        assert f"pid:            {reply['pid']}\n" in text
        assert [r[0] for r in table(text.split("\n\n", 1)[1].encode())] == ["1"]
    with mounted_at(v, extra=("--rotation-period", "0")):
        reply = json.loads(run_tdefs("status", m, "--json").stdout)
        assert reply["rotation"] == {"period_days": 0, "next_due": None, "last_automatic": None}
        assert "\nkey rotation:   off " in run_tdefs("status", m).stdout.decode()
    proc = run_tdefs("mount", v.backing, m, *v.key_args(), "--rotation-period", "-1",
                     check=False)
    assert proc.returncode == 2 and b"0 (off) or more days" in proc.stderr


def test_the_daemon_rotates_the_data_key_when_it_is_due(v: VaultPaths) -> None:
    m = v.mountpoint
    period = 0.00002  # days: 1.7 s
    with mounted_at(v, extra=("--rotation-period", str(period))):
        write_synced(m / "early", b"written under key 1")
        line = wait_for_log(v.log, "rotated the data key:")
        assert re.search(r"rotated the data key: new active key 2 \(aes-256-ctr\), key 1 was"
                         r" [0-9.e-]+ days old$", line), line
        reply = json.loads(run_tdefs("status", m, "--json").stdout)
        rotation = reply["rotation"]
        assert rotation["period_days"] == period
        last = rotation["last_automatic"]
        assert last["new_key"] >= 2 and last["old_key"] == last["new_key"] - 1
        assert last["old_age_days"] >= period
        assert rotation["next_due"] >= last["time"] + period * 86400 - 1e-6
        assert reply["active_key"]["id"] >= 2
        write_synced(m / "late", b"written under a newer key")
        text = run_tdefs("status", m).stdout.decode()
        assert f"\nkey rotation:   every {period:g} days\n" in text
        assert re.search(r"\nlast automatic: \S+ \S+ UTC: key \d+ was \d+ s old, new active key"
                         r" \d+\n", text), text
    keys = json.loads(run_tdefs("keys", "list", v.backing, *v.key_args(), "--json").stdout)
    # re-encryption follows the rotations and retires the keys it empties
    assert keys[-1]["active"] and keys[-1]["id"] >= 2 and sum(k["files"] for k in keys) == 2
    with mounted_at(v):  # the vault's own period (7 days): no rotation at this mount
        assert (m / "early").read_bytes() == b"written under key 1"
        assert (m / "late").read_bytes() == b"written under a newer key"


def test_master_key_rotate_on_a_mount_with_a_key_file(v: VaultPaths, tmp_path: Path) -> None:
    m, old, new = v.mountpoint, v.key_file, tmp_path / "new.key"
    keys_dict = v.backing / ".tdefs" / "keys.dict"
    with mounted_at(v):
        write_synced(m / "a", b"sealed before" * 100)
        proc = run_tdefs("master-key", "rotate", m, "--new-key-file", new, "--generate-key")
        assert proc.stdout.decode().splitlines() == [
            f"wrote a new master key to {new} (mode 0600); keep a copy somewhere safe",
            f"vault {v.backing} is now sealed with the new master key (key-file); the old one no"
            " longer opens it"]
        assert proc.stderr == b""
        sealed = keys_dict.read_bytes()
        proc = run_tdefs("master-key", "rotate", m, "--new-key-file", new, check=False)
        assert one_line_error(proc) == (
            f"tdefs: error: {m}: vault {v.backing} is already sealed with key file {new}:"
            " nothing changed (rekey needs a different new key)")
        assert keys_dict.read_bytes() == sealed
        write_synced(m / "b", b"written after")  # the mount goes on as before
        assert (m / "a").read_bytes() == b"sealed before" * 100
    assert f"re-sealed keys.dict under a new master key (key file {new})" in v.log.read_text()
    proc = run_tdefs("keys", "list", v.backing, "--key-file", old, check=False)
    assert f"wrong key file {old} for vault {v.backing}" in one_line_error(proc)
    proc = run_tdefs("mount", v.backing, m, "--key-file", old, check=False)
    assert f"wrong key file {old}" in one_line_error(proc)
    v.key_file = new
    with mounted_at(v):
        assert (m / "a").read_bytes() == b"sealed before" * 100
        assert (m / "b").read_bytes() == b"written after"


def test_master_key_rotate_on_a_mount_to_a_passphrase_and_offline_back(
        v: VaultPaths, tmp_path: Path) -> None:
    m, pw = v.mountpoint, {"TDEFS_TEST_PW": "a new passphrase \u00e9"}
    with mounted_at(v):
        write_synced(m / "a", b"contents")
        out = run_tdefs("master-key", "rotate", m, "--new-passphrase-env", "TDEFS_TEST_PW",
                        env=pw).stdout.decode()
        assert out == (f"vault {v.backing} is now sealed with the new master key (passphrase);"
                       " the old one no longer opens it\n")
        out = run_tdefs("master-key", "rotate", m, "--new-passphrase-env", "TDEFS_TEST_PW",
                        env=pw).stdout.decode()
        assert "the same passphrase still opens it (re-sealed with a new salt)" in out
    proc = run_tdefs("keys", "list", v.backing, *v.key_args(), check=False)
    assert "sealed with a passphrase" in one_line_error(proc)
    pv = _PassphraseVault(v.backing, v.mountpoint, v.key_file, v.log)
    with mounted_at(pv, env=pw):
        assert (m / "a").read_bytes() == b"contents"
    # offline, the passphrase read from stdin comes first, then the new one
    new = tmp_path / "back.key"
    out = run_tdefs("master-key", "rotate", v.backing, "--passphrase", "--new-key-file", new,
                    "--generate-key", input="a new passphrase \u00e9\n".encode()).stdout.decode()
    assert out.splitlines()[-1].endswith("(key-file); the old one no longer opens it")
    proc = run_tdefs("keys", "list", v.backing, "--passphrase-env", "TDEFS_TEST_PW", env=pw,
                     check=False)
    assert "sealed with a key file" in one_line_error(proc)
    v.key_file = new
    with mounted_at(v):
        assert (m / "a").read_bytes() == b"contents"


def test_rotation_task_sleeps_until_due_and_at_most_an_hour(tmp_path: Path, monkeypatch,
                                                            caplog) -> None:
    """No mount: the daemon's rotation task alone, under a fake wall clock."""
    vault = Vault.create(tmp_path / "b", MasterKeySource.plaintext())
    try:
        req = MountRequest(backing=tmp_path / "b", mountpoint=tmp_path / "m",
                                  source=MasterKeySource.plaintext())
        d = daemon._Daemon(req, vault, Reencryptor(vault), None)
        created = vault.keys.active.created
        now = [float(created)]
        monkeypatch.setattr(daemon, "time", types.SimpleNamespace(time=lambda: now[0]))
        sleeps: list[float] = []

        class Slept(Exception):
            pass

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            raise Slept

        monkeypatch.setattr(daemon.trio, "sleep", sleep)

        def next_sleep() -> float:
            with pytest.raises(Slept):
                trio.run(d._rotate_when_due)
            return sleeps[-1]

        assert vault.options["rotation_period_days"] == 7
        assert next_sleep() == daemon.ROTATION_SLEEP_MAX_S  # due in 7 days: an hour at most
        now[0] = created + 7 * 86400 - 30
        assert next_sleep() == 30  # due in 30 s: exactly until then
        now[0] = created + 8 * 86400
        with caplog.at_level(logging.INFO, logger="tdefs.daemon"):
            assert next_sleep() == daemon.ROTATION_SLEEP_MAX_S  # rotated; the next in 7 days
        assert vault.keys.active_id == 2
        assert ("rotated the data key: new active key 2 (aes-256-ctr), key 1 was 8 days old"
                in caplog.text)
        assert d.last_rotation == {"time": now[0], "new_key": 2, "method": "aes-256-ctr",
                                   "old_key": 1, "old_age_days": 8.0}
        assert d._next_rotation() == now[0] + 7 * 86400
        vault.options["rotation_period_days"] = 0
        count = len(sleeps)
        trio.run(d._rotate_when_due)  # off: returns at once
        assert len(sleeps) == count
    finally:
        vault.close()
