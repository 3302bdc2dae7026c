"""The control socket of a running mount, and the client that talks to it.

Each daemon listens on a unix socket whose path is derived from its mountpoint
alone, so `tdefs status|umount|keys ... MOUNTPOINT` find it without knowing the
vault. The protocol is one JSON object per line: a request `{"cmd": ..., ...}`
answered by `{"ok": true, ...}` or `{"ok": false, "error": "..."}`, then the server
closes the connection.

Requests carry secrets (master keys), so three walls stand between the socket and
anyone but its user: the socket directory must be a real directory owned by the
process's euid with mode exactly 0700 (checked by the daemon before it binds and by
every client before it connects, so neither uses a directory another user planted);
the socket is mode 0600; and the daemon reads each peer's credentials (SO_PEERCRED)
and answers only its own uid and root. A client about to send a secret checks the
daemon's credentials the same way before it writes a byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import trio

from encfs.errors import TdefsError

log = logging.getLogger("tdefs.control")

MAX_REQUEST = 64 * 1024
CLIENT_TIMEOUT = 30.0
SOCKET_DIR_MODE = 0o700
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NoDaemon(TdefsError):
    """No live daemon answers on the mountpoint's control socket."""


class UnsafeSocketDir(TdefsError):
    """The control socket directory is not a 0700 directory of this user's own."""


class UntrustedPeer(TdefsError):
    """The other end of a control connection is run by a user who may not see secrets."""


def socket_dir() -> Path:
    """$TDEFS_RUN_DIR if set; else /run/tdefs for root, $XDG_RUNTIME_DIR/tdefs or
    /tmp/tdefs-<uid> for anyone else."""
    override = os.environ.get("TDEFS_RUN_DIR")
    if override:
        return Path(os.path.abspath(override))
    if os.geteuid() == 0:
        return Path("/run/tdefs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "tdefs" if runtime else Path(f"/tmp/tdefs-{os.geteuid()}")


def check_socket_dir(directory: Path, create: bool = False) -> None:
    """UnsafeSocketDir unless `directory` is a directory (not a symlink) owned by this
    process's euid with mode exactly 0700; with `create`, a missing one is made so.

    FileNotFoundError when it is missing and not to be made. Both ends call this, so
    neither uses a directory (or a socket in it) that another user could have made:
    under /tmp anyone can create /tmp/tdefs-<uid> first."""
    if create:
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(directory, SOCKET_DIR_MODE)
        except FileExistsError:
            pass  # checked below, like one that was there all along
    st = os.lstat(directory)
    euid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        problem = "it is a symlink; remove it (tdefs makes the directory itself)"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "it is not a directory; remove it (tdefs makes the directory itself)"
    elif st.st_uid != euid:
        problem = (f"it belongs to uid {st.st_uid}, not to uid {euid}; have it removed, or"
                   " set TDEFS_RUN_DIR to a directory of your own")
    elif stat.S_IMODE(st.st_mode) != SOCKET_DIR_MODE:
        problem = (f"its mode is {stat.S_IMODE(st.st_mode):04o}, not 0700; run:"
                   f" chmod 700 {directory}")
    else:
        return
    raise UnsafeSocketDir(f"unsafe control socket directory {directory}: {problem}")


def peer_credentials(sock: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected unix socket, as
    they were when it connected (or listened)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


def may_share_secrets(uid: int) -> bool:
    """Whether a process of `uid` may be on the other end: this process's user, or root."""
    return uid in (os.geteuid(), 0)


def socket_path(mountpoint: str | os.PathLike) -> Path:
    """Where the daemon serving `mountpoint` listens (short enough for sun_path)."""
    target = os.fsencode(os.path.realpath(mountpoint))
    return socket_dir() / (hashlib.sha256(target).hexdigest()[:24] + ".sock")


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _plain(value: Any) -> Any:
    """JSON-friendly form of what the vault returns (dataclasses, bytes, paths)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Path):
        return str(value)
    return value


class ControlServer:
    """Serves the control commands of one mount; runs inside the daemon's trio loop.

    Making one checks (and makes) the socket directory, so a daemon refuses an unsafe
    one with UnsafeSocketDir before it mounts anything; `serve` checks it again just
    before it binds."""

    def __init__(self, mountpoint: str, commands: dict[str, Handler]) -> None:
        self.path = socket_path(mountpoint)
        self.commands = commands
        check_socket_dir(self.path.parent, create=True)

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        check_socket_dir(self.path.parent, create=True)
        try:
            self.path.unlink()  # left by a daemon that died
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            task_status.started()
            await trio.serve_listeners(self._serve_one, [listener])
        finally:
            self.remove()

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        async with stream:
            pid, uid, _ = peer_credentials(stream.socket)
            if may_share_secrets(uid):
                reply = await self._answer(stream)
            else:
                # the socket's mode should have kept it out: someone widened it
                log.warning("refused a control connection from pid %d, uid %d: only uid %d"
                            " and root may use %s", pid, uid, os.geteuid(), self.path)
                reply = {"ok": False, "error": f"uid {uid} may not use this control socket"}
            try:
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _answer(self, stream: trio.SocketStream) -> dict[str, Any]:
        try:
            with trio.fail_after(CLIENT_TIMEOUT):
                request = await _read_line(stream)
            return await self._dispatch(request)
        except Exception as exc:  # a bad client never takes the daemon down
            log.exception("control request failed")
            return {"ok": False, "error": f"internal error: {exc}"}

    async def _dispatch(self, raw: bytes) -> dict[str, Any]:
        try:
            request = json.loads(raw)
            cmd = request["cmd"]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "malformed request"}
        handler = self.commands.get(cmd)
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        try:
            result = await handler(request)
        except TdefsError as exc:
            return {"ok": False, "error": str(exc)}
        except OSError as exc:
            return {"ok": False, "error": f"{exc.strerror or exc}"}
        return {"ok": True, **_plain(result)}


async def _read_line(stream: trio.SocketStream) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    return bytes(buf).split(b"\n", 1)[0]


def ask(mountpoint: str | os.PathLike, cmd: str, **fields: Any) -> dict[str, Any]:
    """`request` for a command line tool: the daemon of a mountpoint known to be
    mounted must answer, and when it is gone the error says what to do."""
    try:
        return request(mountpoint, cmd, **fields)
    except NoDaemon:
        raise NoDaemon(f"{mountpoint} is mounted but its daemon is gone"
                       f" (run: tdefs umount {mountpoint})") from None


def request(mountpoint: str | os.PathLike, cmd: str, timeout: float = CLIENT_TIMEOUT, *,
            carries_secret: bool = False, **args: Any) -> dict[str, Any]:
    """Send one command to the daemon serving `mountpoint`; NoDaemon when none answers.

    UnsafeSocketDir if the socket's directory is not this user's own 0700 directory.
    With `carries_secret`, UntrustedPeer (before anything is sent) unless the daemon
    runs as this user or as root."""
    path = socket_path(mountpoint)
    try:
        check_socket_dir(path.parent)
    except FileNotFoundError:
        raise NoDaemon(f"no tdefs daemon serves {mountpoint}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoDaemon(f"no tdefs daemon serves {mountpoint}") from None
        if carries_secret:
            _, uid, _ = peer_credentials(sock)
            if not may_share_secrets(uid):
                raise UntrustedPeer(
                    f"control socket {path} is served by uid {uid}, neither you (uid"
                    f" {os.geteuid()}) nor root: not sending it a secret")
        try:
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered and closed before reading (a refusal): read what it said
        buf = _read_reply(sock)
    except TimeoutError:
        raise TdefsError(f"the tdefs daemon of {mountpoint} did not answer in {timeout:.0f}s") from None
    finally:
        sock.close()
    try:
        reply = json.loads(bytes(buf))
    except ValueError:
        raise NoDaemon(f"the tdefs daemon of {mountpoint} closed the connection") from None
    if not reply.get("ok"):
        raise TdefsError(f"{mountpoint}: {reply.get('error', 'request failed')}")
    return reply


def _read_reply(sock: socket.socket) -> bytes:
    """The reply line, or what came before the server closed the connection."""
    buf = bytearray()
    try:
        while chunk := sock.recv(65536):
            buf += chunk
            if b"\n" in chunk:
                break
    except ConnectionResetError:
        pass  # a server that closes with our request unread resets after its reply
    return bytes(buf)


def process_status(started: float) -> dict[str, Any]:
    proc = psutil.Process()
    return {"pid": os.getpid(), "uptime_s": round(time.time() - started, 1),
            "rss_bytes": proc.memory_info().rss, "threads": proc.num_threads()}
