"""The control socket admits only its user and root.

The daemon and every client refuse a socket directory that another user owns, that
is wider than 0700 or that is a symlink; the daemon answers a peer of another uid
with an error and goes on serving; a client sends a secret only to a daemon of its
own user or root. Another user is played by uid 65534: a subprocess starts as root
(so it can import and bind) and drops to it. Needs root: skips without it, fails in
CI. Every server is cancelled or killed, and every directory removed, in `finally`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from encfs.errors import TdefsError
from mount import control

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534

# A stand-in daemon of another user: binds `path` (anyone may connect), becomes `uid`
# (before or after it binds), says "listening", then answers every request line with ok and prints it.
FAKE_DAEMON = r"""
import json, os, socket, sys
path, uid, order = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def become():
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
if order == "bind-then-become":
    sock.bind(path); os.chmod(path, 0o666); become()
else:
    become(); sock.bind(path); os.chmod(path, 0o666)
sock.listen(4)  # SO_PEERCRED shows clients the credentials of this call
print("listening", flush=True)
while True:
    conn, _ = sock.accept()
    with conn:
        line = conn.makefile("rb").readline()
        if line:
            print("request", line.decode().strip(), flush=True)
            conn.sendall(json.dumps({"ok": True, "pid": os.getpid()}).encode() + b"\n")
"""

# A client of another user that speaks the protocol by hand: control.request would
# refuse the root-owned directory before it got as far as the daemon's check.
RAW_CLIENT_AS_NOBODY = rf"""
import os, socket, sys
os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
try:
    sock.sendall(b'{{"cmd": "status"}}\n')
except OSError:
    pass  # refused and closed before it read us: the reply is still there
reply = b""
try:
    while chunk := sock.recv(4096):
        reply += chunk
except ConnectionResetError:
    pass
sys.stdout.buffer.write(reply)
"""

# control.request with a secret, run by `uid` (imports first, as root, then drops)
SECRET_CLIENT_AS = r"""
import json, os, sys
from mount import control
uid = int(sys.argv[1])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
print(json.dumps(control.request(sys.argv[2], "keys.add", carries_secret=True, key="00" * 32)))
"""


def require_root() -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("CI must run the control socket tests as root (they play another uid)")
    pytest.skip("needs root to play another uid (outside CI)")


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A scratch directory uid 65534 can pass through (pytest's tmp_path is root's 0700)."""
    require_root()
    base = Path(tempfile.mkdtemp(prefix="tdefs-ctl-"))
    try:
        base.chmod(0o711)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def run_dir(shared_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The socket directory of this test (TDEFS_RUN_DIR), not made yet."""
    directory = shared_tmp / "run"
    monkeypatch.setenv("TDEFS_RUN_DIR", str(directory))
    return directory


@pytest.fixture
def mountpoint(shared_tmp: Path) -> Path:
    return shared_tmp / "mnt"  # only its path matters: it names the socket


@dataclass
class Commands:
    """The daemon's commands in these tests; records who got as far as a handler."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    async def status(self, request: dict[str, Any]) -> dict[str, Any]:
        self.seen.append(request)
        return {"pid": os.getpid()}


@asynccontextmanager
async def serving(mountpoint: Path, commands: Commands) -> AsyncIterator[control.ControlServer]:
    """A real ControlServer on `mountpoint`'s socket, listening, for the block."""
    server = control.ControlServer(str(mountpoint), {"status": commands.status})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


class FakeDaemon:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.output: tuple[str, str] | None = None  # stdout, stderr once stopped

    def stop(self) -> list[str]:
        """Kill it (once); the request lines it received."""
        if self.output is None:
            self.proc.kill()
            out, err = self.proc.communicate()
            self.output = (out.decode(), err.decode())
        return [line for line in self.output[0].splitlines() if line.startswith("request ")]


@contextmanager
def fake_daemon(path: Path, uid: int, order: str = "become-then-bind") -> Iterator[FakeDaemon]:
    proc = subprocess.Popen([sys.executable, "-c", FAKE_DAEMON, str(path), str(uid), order],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    daemon = FakeDaemon(proc)
    try:
        if proc.stdout.readline() != b"listening\n":  # EOF: it died before it listened
            daemon.stop()
            raise AssertionError(f"the fake daemon did not start: {daemon.output[1]}")
        yield daemon
    finally:
        daemon.stop()


def make_private_dir(path: Path, uid: int = 0) -> Path:
    path.mkdir()
    path.chmod(0o700)
    os.chown(path, uid, uid)
    return path


UNSAFE = {
    # how the directory is made unsafe: (what the refusal says, who could plant a socket)
    "owned-by-another-user": (f"belongs to uid {NOBODY}", NOBODY),
    "mode-0755": ("its mode is 0755, not 0700; run: chmod 700", 0),
    "mode-0711": ("its mode is 0711, not 0700; run: chmod 700", 0),
    "symlink": ("it is a symlink", NOBODY),
}


def make_unsafe(how: str, run_dir: Path) -> Path:
    """Make `run_dir` unsafe in the way `how` names; the directory sockets land in."""
    if how == "owned-by-another-user":
        return make_private_dir(run_dir, NOBODY)
    if how.startswith("mode-"):
        make_private_dir(run_dir).chmod(int(how.removeprefix("mode-"), 8))
        return run_dir
    # another user's directory where ours should be, as a symlink in /tmp would be
    target = make_private_dir(run_dir.with_name("planted"), NOBODY)
    run_dir.symlink_to(target)
    return target


@pytest.mark.parametrize("how", UNSAFE)
def test_the_daemon_refuses_an_unsafe_socket_directory(how: str, run_dir: Path,
                                                       mountpoint: Path) -> None:
    where = make_unsafe(how, run_dir)
    before = os.lstat(run_dir)
    with pytest.raises(control.UnsafeSocketDir) as exc:
        control.ControlServer(str(mountpoint), {})
    message = str(exc.value)
    assert message.startswith(f"unsafe control socket directory {run_dir}: ")
    assert UNSAFE[how][0] in message and "\n" not in message
    after = os.lstat(run_dir)
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)  # left as found
    assert list(where.iterdir()) == []


def test_serve_checks_the_directory_again_before_it_binds(run_dir: Path,
                                                          mountpoint: Path) -> None:
    server = control.ControlServer(str(mountpoint), {})
    run_dir.chmod(0o755)
    with pytest.raises(control.UnsafeSocketDir, match="its mode is 0755"):
        trio.run(server.serve)
    assert not server.path.exists()


@pytest.mark.parametrize("how", UNSAFE)
def test_a_client_refuses_an_unsafe_socket_directory(how: str, run_dir: Path,
                                                     mountpoint: Path) -> None:
    where = make_unsafe(how, run_dir)
    planted = where / control.socket_path(mountpoint).name
    with fake_daemon(planted, UNSAFE[how][1]) as daemon:
        with pytest.raises(control.UnsafeSocketDir) as exc:
            control.request(mountpoint, "status")
        assert UNSAFE[how][0] in str(exc.value) and str(run_dir) in str(exc.value)
        assert daemon.stop() == []


def test_the_daemon_makes_its_directory_private_and_answers_its_user(
        run_dir: Path, mountpoint: Path) -> None:
    commands = Commands()

    async def main() -> None:
        async with serving(mountpoint, commands) as server:
            assert oct(run_dir.stat().st_mode & 0o7777) == oct(0o700)
            assert oct(server.path.stat().st_mode & 0o777) == oct(0o600)
            reply = await in_thread(control.request, mountpoint, "status")
            assert reply == {"ok": True, "pid": os.getpid()}
            reply = await in_thread(control.request, mountpoint, "status",
                                    carries_secret=True, key="00" * 32)
            assert reply["ok"] and commands.seen[-1]["key"] == "00" * 32

    old_umask = os.umask(0)  # the daemon's umask: modes must not depend on it
    try:
        trio.run(main)
    finally:
        os.umask(old_umask)
    assert not control.socket_path(mountpoint).exists()


def test_a_missing_directory_means_no_daemon_to_a_client(run_dir: Path,
                                                         mountpoint: Path) -> None:
    with pytest.raises(control.NoDaemon):
        control.request(mountpoint, "status")
    assert not run_dir.exists()  # a client never makes it


def test_the_daemon_refuses_a_peer_of_another_uid_and_goes_on_serving(
        run_dir: Path, mountpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    commands = Commands()

    async def main() -> None:
        async with serving(mountpoint, commands) as server:
            # the modes are the first wall; open them to reach the second
            run_dir.chmod(0o711)
            server.path.chmod(0o666)
            proc = await trio.run_process([sys.executable, "-c", RAW_CLIENT_AS_NOBODY,
                                           str(server.path)], capture_stdout=True)
            assert json.loads(proc.stdout) == {
                "ok": False, "error": f"uid {NOBODY} may not use this control socket"}
            assert commands.seen == []
            run_dir.chmod(0o700)
            reply = await in_thread(control.request, mountpoint, "status")
            assert reply["pid"] == os.getpid() and len(commands.seen) == 1

    with caplog.at_level(logging.WARNING, logger="tdefs.control"):
        trio.run(main)
    [refusal] = [r.getMessage() for r in caplog.records if r.name == "tdefs.control"]
    assert f"uid {NOBODY}: only uid 0 and root may use" in refusal


def test_a_secret_goes_to_no_daemon_of_another_user(run_dir: Path, mountpoint: Path) -> None:
    make_private_dir(run_dir)
    path = control.socket_path(mountpoint)
    # our own directory and socket file, but the listener is another user's
    with fake_daemon(path, NOBODY, order="bind-then-become") as daemon:
        with pytest.raises(control.UntrustedPeer) as exc:
            control.request(mountpoint, "keys.add", carries_secret=True, key="00" * 32)
        assert str(exc.value) == (f"control socket {path} is served by uid {NOBODY}, neither"
                                  " you (uid 0) nor root: not sending it a secret")
        assert isinstance(exc.value, TdefsError)
        # what carries no secret still goes: the check is for secrets
        assert control.request(mountpoint, "status")["ok"]
        assert daemon.stop() == ['request {"cmd": "status"}']


def test_a_user_may_send_a_secret_to_a_daemon_run_by_root(shared_tmp: Path,
                                                          mountpoint: Path) -> None:
    users_dir = make_private_dir(shared_tmp / "nobody-run", NOBODY)
    env = {**os.environ, "TDEFS_RUN_DIR": str(users_dir)}
    path = users_dir / control.socket_path(mountpoint).name
    with fake_daemon(path, 0) as daemon:
        proc = subprocess.run([sys.executable, "-c", SECRET_CLIENT_AS, str(NOBODY),
                               str(mountpoint)], cwd=REPO, env=env, capture_output=True)
        assert proc.returncode == 0, proc.stderr.decode()
        assert json.loads(proc.stdout)["ok"]
        [line] = daemon.stop()
        assert json.loads(line.removeprefix("request "))["key"] == "00" * 32
