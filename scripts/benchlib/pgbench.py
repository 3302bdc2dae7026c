"""PostgreSQL on a target: a throwaway cluster whose data directory lives on the target,
loaded and driven by pgbench, always stopped on the way out.

The server runs as the `postgres` user (PostgreSQL refuses root), listening on
127.0.0.1 at a free port and on a socket directory of its own, with fsync and
synchronous_commit on: every commit waits for its WAL to be durable, which is what
the figure is about. FUSE targets must be mounted with allow_other for it to enter.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from benchlib.guard import BenchError

PG_USER = "postgres"
SERVER_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "128MB",
    "max_connections": "20",
    "listen_addresses": "'127.0.0.1'",
}


def postgres_bin() -> Path:
    """The directory of Debian's PostgreSQL server programs (initdb, pg_ctl)."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_ctl").exists() and (candidate / "initdb").exists():
            return candidate
    raise BenchError("PostgreSQL's server is not installed (apt-get install postgresql)")


def missing() -> str | None:
    """Why the pgbench group cannot run here, or None."""
    try:
        postgres_bin()
        pwd.getpwnam(PG_USER)
    except (BenchError, KeyError) as exc:
        return str(exc) if isinstance(exc, BenchError) else f"no {PG_USER} user"
    if shutil.which("pgbench") is None:
        return "pgbench is not installed (apt-get install postgresql-contrib)"
    if os.geteuid() != 0:
        return "needs root, to run the server as the postgres user"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str], timeout: float, check: bool = True) -> str:
    proc = subprocess.run(["runuser", "-u", PG_USER, "--", *cmd], capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        raise BenchError(f"{Path(cmd[0]).name} failed: {lines[-1] if lines else proc.returncode}")
    return proc.stdout


@contextlib.contextmanager
def cluster(where: Path) -> Iterator[tuple[int, Path]]:
    """A running server whose data directory is `where/pgdata`; (port, socket dir)."""
    bindir = postgres_bin()
    entry = pwd.getpwnam(PG_USER)
    data = where / "pgdata"
    data.mkdir()
    os.chown(data, entry.pw_uid, entry.pw_gid)
    sockets = Path(tempfile.mkdtemp(prefix="tdefs-pg-"))
    os.chown(sockets, entry.pw_uid, entry.pw_gid)
    port = _free_port()
    started = False
    try:
        if subprocess.run(["runuser", "-u", PG_USER, "--", "test", "-w", str(data)]).returncode:
            raise BenchError(f"the {PG_USER} user cannot reach {where}: put the work directory"
                             " (--dir) under one that every user may enter, such as /var/tmp")
        _as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER,
                      "--no-sync"], timeout=300)
        with open(data / "postgresql.conf", "a") as conf:
            for name, value in SERVER_SETTINGS.items():
                conf.write(f"{name} = {value}\n")
            conf.write(f"port = {port}\nunix_socket_directories = '{sockets}'\n")
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(sockets / "server.log"),
                      "-w", "-t", "120", "start"], timeout=180)
        started = True
        yield port, sockets
    finally:
        if started:
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                          "-t", "60", "stop"], timeout=120, check=False)
        shutil.rmtree(sockets, ignore_errors=True)


def run_pgbench(where: Path, scale: int = 10, clients: int = 4, seconds: int = 30) -> float:
    """Transactions per second of pgbench's default (TPC-B-like) script on a fresh
    cluster in `where`: initialised at `scale`, then `clients` clients for `seconds`."""
    with cluster(where) as (port, sockets):
        common = ["-h", str(sockets), "-p", str(port), "-U", PG_USER]
        _as_postgres(["pgbench", *common, "-i", "-q", "-s", str(scale), "postgres"],
                     timeout=600)
        out = _as_postgres(["pgbench", *common, "-c", str(clients), "-j", str(min(clients, 2)),
                            "-T", str(seconds), "-n", "postgres"], timeout=seconds + 300)
    match = re.search(r"^tps = ([\d.]+)", out, re.MULTILINE)
    if match is None:
        raise BenchError(f"pgbench printed no tps: {out.strip().splitlines()[-1:]}")
    return float(match[1])
