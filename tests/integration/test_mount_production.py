"""Running in production: fstab and mount(8), systemd's notify protocol, a unit file,
and metrics a monitoring system can scrape."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fuse_harness import (
    REPO,
    TDEFS,
    daemons_for,
    force_cleanup,
    is_mounted,
    make_vault,
    mounted_at,
    require_fuse,
    run_tdefs,
)

from mount.service import escape_path, unit_name

pytestmark = pytest.mark.fuse

HELPER = Path(sys.executable).with_name("mount.fuse.tdefs")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("TDEFS_FAILPOINTS", "NOTIFY_SOCKET")}


def test_mount_and_umount_from_an_fstab_line(tmp_path: Path) -> None:
    require_fuse()
    v = make_vault(tmp_path)
    fstab = tmp_path / "fstab"
    # the options an operator writes, including those only mount(8) and systemd read
    fstab.write_text(f"{v.backing} {v.mountpoint} fuse.tdefs keyfile={v.key_file},log={v.log},"
                     "nofail,noauto,x-systemd.requires=local-fs.target,_netdev 0 0\n")
    installed = Path("/sbin/mount.fuse.tdefs")
    try:
        if installed.exists():  # what scripts/setup installs, as root
            proc = subprocess.run(["mount", "-T", str(fstab), str(v.mountpoint)],
                                  capture_output=True, text=True, timeout=60, env=clean_env())
        else:  # the helper, called as mount(8) would call it
            proc = subprocess.run([str(HELPER), str(v.backing), str(v.mountpoint), "-o",
                                   f"rw,keyfile={v.key_file},log={v.log},nofail,"
                                   "x-systemd.requires=local-fs.target"],
                                  capture_output=True, text=True, timeout=60, env=clean_env())
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(v.mountpoint)
        (v.mountpoint / "f").write_bytes(b"from fstab")
        assert (v.mountpoint / "f").read_bytes() == b"from fstab"
        proc = subprocess.run(["umount", str(v.mountpoint)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + 10
        while daemons_for(v.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_mounted(v.mountpoint) and not daemons_for(v.mountpoint)
    finally:
        force_cleanup(v.mountpoint)
    with mounted_at(v):
        assert (v.mountpoint / "f").read_bytes() == b"from fstab"


def test_the_helper_refuses_unknown_options_in_one_line(tmp_path: Path) -> None:
    require_fuse()
    v = make_vault(tmp_path)
    for options, message in (("keyfile=/k,colour=blue", "unknown mount option 'colour=blue'"),
                             ("ro,keyfile=/k", "read-write only"),
                             ("keyfile", "needs a value")):
        proc = subprocess.run([str(HELPER), str(v.backing), str(v.mountpoint), "-o", options],
                              capture_output=True, text=True, timeout=60, env=clean_env())
        assert proc.returncode == 32, proc.stderr
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not is_mounted(v.mountpoint)


def test_tdefs_mount_takes_the_same_options(tmp_path: Path) -> None:
    require_fuse()
    v = make_vault(tmp_path)
    try:
        run_tdefs("mount", v.backing, v.mountpoint, "-o",
                  f"keyfile={v.key_file},log={v.log},rotation_period=0,nofail")
        status = run_tdefs("status", v.mountpoint, "--json").stdout
        assert b'"period_days": 0.0' in status
        run_tdefs("umount", v.mountpoint)
    finally:
        force_cleanup(v.mountpoint)


def test_systemd_hears_ready_once_the_mount_is_live_and_stopping_on_sigterm(tmp_path: Path) -> None:
    require_fuse()
    v = make_vault(tmp_path)
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(60)
    env = {**clean_env(), "NOTIFY_SOCKET": str(notify_path)}
    daemon = subprocess.Popen([*TDEFS, "mount", "--foreground", str(v.backing), str(v.mountpoint),
                               "--key-file", str(v.key_file), "--log", str(v.log)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        message = listener.recv(4096).decode()
        # at READY=1 the mount is live: in the table, and a file can be made in it
        assert "READY=1" in message.split("\n"), message
        assert f"MAINPID={daemon.pid}" in message
        assert is_mounted(v.mountpoint)
        (v.mountpoint / "ready").write_bytes(b"live")
        daemon.send_signal(signal.SIGTERM)
        message = listener.recv(4096).decode()
        assert "STOPPING=1" in message.split("\n"), message
        assert daemon.wait(60) == 0
        assert not is_mounted(v.mountpoint)
    finally:
        listener.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        force_cleanup(v.mountpoint)


def test_install_unit_writes_a_notify_service(tmp_path: Path) -> None:
    require_fuse()
    v = make_vault(tmp_path)
    unit = tmp_path / "units" / unit_name(v.mountpoint)
    run_tdefs("install-unit", v.backing, v.mountpoint, "--key-file", v.key_file,
              "--log", v.log, "--dir", unit.parent)
    text = unit.read_text()
    assert "Type=notify" in text and "Restart=on-failure" in text
    start = re.search(r"^ExecStart=(.*)$", text, re.MULTILINE).group(1)
    assert f"mount --foreground {v.backing} {v.mountpoint} --key-file {v.key_file}" in start
    assert re.search(rf"^ExecStop=.* umount {re.escape(str(v.mountpoint))}$", text, re.MULTILINE)
    assert re.search(r"^ExecStartPre=-.* umount ", text, re.MULTILINE)
    # the line systemd would run starts the mount, and is what stop undoes
    argv = start.split()
    proc = subprocess.Popen(argv, cwd="/", env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(v.mountpoint):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        run_tdefs("umount", v.mountpoint)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        force_cleanup(v.mountpoint)
    proc = run_tdefs("install-unit", v.backing, v.mountpoint, "--passphrase", check=False)
    assert proc.returncode != 0 and b"needs a master key it can read unattended" in proc.stderr
    assert escape_path(Path("/srv/my db/x.y")) == "srv-my\\x20db-x.y"


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    figures = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            figures[name] = float(value)
    return figures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_follow_a_workload(tmp_path: Path) -> None:
    require_fuse()
    v = make_vault(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    metrics_file = tmp_path / "tdefs.prom"
    with mounted_at(v, extra=("--metrics-listen", f"127.0.0.1:{port}",
                              "--metrics-file", str(metrics_file))):
        m = v.mountpoint
        before = scrape(url)
        for i in range(10):
            with open(m / f"f{i}", "wb") as f:
                f.write(os.urandom(100 * 1024))
                f.flush()
                os.fsync(f.fileno())
        (m / "d").mkdir()
        (m / "d" / "x").write_bytes(b"x")
        for _ in range(3):
            with pytest.raises(OSError):
                os.rmdir(m / "d")  # not empty: the daemon answers ENOTEMPTY
        for i in range(10):
            os.unlink(m / f"f{i}")
        after = scrape(url)
        moved = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        assert moved['tdefs_requests_total{op="create"}'] == 11
        assert moved['tdefs_requests_total{op="unlink"}'] == 10
        assert moved['tdefs_request_errors_total{errno="ENOTEMPTY",op="rmdir"}'] == 3
        assert moved["tdefs_encrypted_bytes_total"] == 10 * 100 * 1024 + 1
        assert moved["tdefs_dictionary_records_total"] >= 11
        assert after["tdefs_active_key"] == 1
        text = run_tdefs("metrics", m).stdout.decode()
        assert 'tdefs_requests_total{op="create"}' in text
    # the file holds the last figures, written at unmount
    assert 'tdefs_requests_total{op="unlink"} 10.0' in metrics_file.read_text()
