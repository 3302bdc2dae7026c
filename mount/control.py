"""The control socket of a running mount, and the client that talks to it.

Each daemon listens on a unix socket whose path is derived from its mountpoint
alone, so `tdefs status|umount|keys ... MOUNTPOINT` find it without knowing the
vault. The protocol is one JSON object per line: a request `{"cmd": ..., ...}`
answered by `{"ok": true, ...}` or `{"ok": false, "error": "..."}`, then the server
closes the connection. The socket is only reachable by its owner (mode 0600 in a
0700 directory).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
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


class NoDaemon(TdefsError):
    """No live daemon answers on the mountpoint's control socket."""


def socket_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/tdefs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "tdefs" if runtime else Path(f"/tmp/tdefs-{os.geteuid()}")


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
    """Serves the control commands of one mount; runs inside the daemon's trio loop."""

    def __init__(self, mountpoint: str, commands: dict[str, Handler]) -> None:
        self.path = socket_path(mountpoint)
        self.commands = commands

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
            try:
                with trio.fail_after(CLIENT_TIMEOUT):
                    request = await _read_line(stream)
                reply = await self._dispatch(request)
            except Exception as exc:  # a bad client never takes the daemon down
                log.exception("control request failed")
                reply = {"ok": False, "error": f"internal error: {exc}"}
            try:
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

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


def request(mountpoint: str | os.PathLike, cmd: str, timeout: float = CLIENT_TIMEOUT,
            **args: Any) -> dict[str, Any]:
    """Send one command to the daemon serving `mountpoint`; NoDaemon when none answers."""
    path = socket_path(mountpoint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoDaemon(f"no tdefs daemon serves {mountpoint}") from None
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = bytearray()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
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


def process_status(started: float) -> dict[str, Any]:
    proc = psutil.Process()
    return {"pid": os.getpid(), "uptime_s": round(time.time() - started, 1),
            "rss_bytes": proc.memory_info().rss, "threads": proc.num_threads()}
