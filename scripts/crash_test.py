"""Crash safety at scale: a database on a tdefs mount, its writer, the daemon or both
killed with SIGKILL at a random moment, again and again, every acknowledged write
checked after each remount.

One iteration: mount the vault; start a writer process on the mount (lsmdb, SQLite in
WAL mode with synchronous=FULL, or RocksDB through rocksdict), which makes durable
(synced) commits and reports each one over a pipe only after the commit returned;
kill the writer, the daemon or both at a random moment; unmount (`tdefs umount` also
removes a dead daemon's mount); remount and verify; unmount; `tdefs fsck`. The next
iteration goes on with the same vault and databases.

The expected state is kept outside the mount, in this process and in a JSON file per
writer. The writer announces each commit before it starts it ("B op changes") and
acknowledges it after ("A op"), so at most one commit per iteration is in flight when
the kill comes: it may or may not have landed, but all or nothing of it. Every key's
value is derived from (key, op), so a lost, stale, torn or foreign value is told from
the right one. After a verification passes, the in-flight commit is settled as seen,
and the expected state is exact again.

Whatever this script starts (mounts, daemons, writers) is stopped on any exit: an
error, Ctrl-C or SIGTERM. `python crash_test.py --write|--create|--verify ...` are
the child processes' entries, not for people.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from benchlib.guard import BenchError, run_guarded
from benchlib.processes import REPO, clean_env, gone, wait_gone
from benchlib.table import print_table
from benchlib.targets import TDEFS, TdefsTarget

_LSMDB_BIN = Path(sys.executable).with_name("lsmdb")
LSMDB = [str(_LSMDB_BIN)] if _LSMDB_BIN.exists() else [sys.executable, "-m", "engine.cli"]
WRITERS = ("lsmdb", "sqlite", "rocksdb")
KILL_KINDS = ("writer", "daemon", "both")
KEY_SPACE = 2000                 # keys per database, reused: the databases stay small
KILL_WINDOW_S = (0.05, 1.5)      # after the writer opened its database
EARLY_KILL_SHARE = 0.1           # kills counted from the writer's start instead, so some
EARLY_KILL_WINDOW_S = (0.05, 0.6)  # land while it opens (and recovers) the database
WRITER_LIFETIME_S = 60           # a writer nobody kills stops by itself
READY_DEADLINE_S = 60
EXIT_DEADLINE_S = 20             # for a process to go after a kill or after the daemon died
CHECK_TIMEOUT_S = 300
DEFAULT_ITERATIONS = 20
MAX_BATCH = 8


class CrashTestError(BenchError):
    """A problem that ends the run with a one-line message."""


# ---------------------------------------------------------------------------
# keys, values and changes


def key_bytes(index: int) -> bytes:
    return b"k%05d" % index


def key_index(key: bytes) -> int | None:
    if len(key) == 6 and key[:1] == b"k" and key[1:].isdigit():
        index = int(key[1:])
        return index if index < KEY_SPACE else None
    return None


def value_for(index: int, op: int) -> bytes:
    """The value op `op` puts under key `index`: its own name, then bytes derived from
    it, 40 to 550 long, so that any byte wrong or missing shows."""
    head = b"%05d:%d:" % (index, op)
    digest = hashlib.blake2b(head, digest_size=32).digest()
    length = 40 + 2 * digest[0]
    body = digest * (length // len(digest) + 1)
    return head + body[:length - len(head)]


def op_of(index: int, value: bytes) -> int | None:
    """The op that wrote `value` under key `index`, or None when no op wrote it."""
    parts = value.split(b":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    op = int(parts[1])
    return op if value == value_for(index, op) else None


Change = tuple[int, bool]   # (key index, True: put value_for(key, op); False: delete)


def encode_changes(changes: list[Change]) -> str:
    return ",".join(f"{'p' if put else 'd'}{index}" for index, put in changes)


def decode_changes(text: str) -> list[Change]:
    return [(int(item[1:]), item[0] == "p") for item in text.split(",")]


def next_changes(rng: random.Random) -> list[Change]:
    """One commit: mostly a put, sometimes a delete, a batch of both, or the deletion
    of a run of consecutive keys (a range deletion where the engine has one)."""
    roll = rng.random()
    if roll < 0.62:
        return [(rng.randrange(KEY_SPACE), True)]
    if roll < 0.77:
        return [(rng.randrange(KEY_SPACE), False)]
    if roll < 0.82:
        first = rng.randrange(KEY_SPACE - 1)
        return [(index, False) for index in range(first, min(KEY_SPACE, first + rng.randint(2, 40)))]
    keys = rng.sample(range(KEY_SPACE), rng.randint(2, MAX_BATCH))
    return [(index, rng.random() < 0.8) for index in keys]


def deleted_run(changes: list[Change]) -> tuple[bytes, bytes] | None:
    """[begin, end) when `changes` delete consecutive keys and nothing else."""
    indexes = [index for index, put in changes if not put]
    if len(changes) < 2 or len(indexes) != len(changes) or \
            indexes != list(range(indexes[0], indexes[0] + len(indexes))):
        return None
    return key_bytes(indexes[0]), key_bytes(indexes[-1] + 1)


# ---------------------------------------------------------------------------
# the databases


class Store:
    """One engine, as the writer and the verifier use it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def apply(self, changes: list[Change], op: int) -> None:
        """Commit `changes` atomically and durably; return once the engine says so."""
        raise NotImplementedError

    def read_all(self) -> dict[bytes, bytes]:
        """Every key and value, after the engine's own checks; raises on any error."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class LsmdbStore(Store):
    """Our engine, through `from engine import DB, WriteBatch` only."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        from engine import DB

        self.db = DB.open(path)

    def apply(self, changes: list[Change], op: int) -> None:
        from engine import WriteBatch

        run = deleted_run(changes)
        if run is not None:
            self.db.delete_range(*run, sync=True)
            return
        if len(changes) == 1 and changes[0][1]:
            index = changes[0][0]
            self.db.put(key_bytes(index), value_for(index, op), sync=True)
            return
        batch = WriteBatch()
        for index, put in changes:
            if put:
                batch.put(key_bytes(index), value_for(index, op))
            else:
                batch.delete(key_bytes(index))
        self.db.write(batch, sync=True)

    def read_all(self) -> dict[bytes, bytes]:
        # `lsmdb PATH check` ran before, in its own process; here each key is read back
        found = {}
        for index in range(KEY_SPACE):
            value = self.db.get(key_bytes(index))
            if value is not None:
                found[key_bytes(index)] = value
        return found

    def close(self) -> None:
        self.db.close()


class SqliteStore(Store):
    """SQLite in WAL mode, synchronous=FULL: every commit fsyncs the WAL."""

    def __init__(self, path: Path, create: bool = True) -> None:
        super().__init__(path)
        import sqlite3

        uri = f"file:{path}?mode={'rwc' if create else 'rw'}"
        self.conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
        mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise RuntimeError(f"SQLite refused WAL mode (journal_mode={mode})")
        self.conn.execute("PRAGMA synchronous=FULL")
        if create:
            self.conn.execute("CREATE TABLE IF NOT EXISTS kv"
                              " (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")

    def apply(self, changes: list[Change], op: int) -> None:
        conn = self.conn
        run = deleted_run(changes)
        if run is not None:
            conn.execute("DELETE FROM kv WHERE k >= ? AND k < ?", run)
            return
        conn.execute("BEGIN IMMEDIATE")
        for index, put in changes:
            if put:
                conn.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)",
                             (key_bytes(index), value_for(index, op)))
            else:
                conn.execute("DELETE FROM kv WHERE k = ?", (key_bytes(index),))
        conn.execute("COMMIT")

    def read_all(self) -> dict[bytes, bytes]:
        result = [row[0] for row in self.conn.execute("PRAGMA integrity_check")]
        if result != ["ok"]:
            raise RuntimeError(f"PRAGMA integrity_check: {'; '.join(map(str, result[:5]))}")
        return {bytes(k): bytes(v) for k, v in self.conn.execute("SELECT k, v FROM kv")}

    def close(self) -> None:
        self.conn.close()


class RocksdbStore(Store):
    """RocksDB through rocksdict, unmodified: raw keys, WriteOptions.sync = True."""

    def __init__(self, path: Path, create: bool = True) -> None:
        super().__init__(path)
        from rocksdict import Options, Rdict, WriteOptions

        options = Options(raw_mode=True)
        options.create_if_missing(create)
        self.db = Rdict(str(path), options)
        self.sync = WriteOptions()
        self.sync.sync = True

    def apply(self, changes: list[Change], op: int) -> None:
        from rocksdict import WriteBatch

        run = deleted_run(changes)
        if run is not None:
            self.db.delete_range(*run, self.sync)
            return
        if len(changes) == 1:
            index, put = changes[0]
            if put:
                self.db.put(key_bytes(index), value_for(index, op), self.sync)
            else:
                self.db.delete(key_bytes(index), self.sync)
            return
        batch = WriteBatch(raw_mode=True)
        for index, put in changes:
            if put:
                batch.put(key_bytes(index), value_for(index, op))
            else:
                batch.delete(key_bytes(index))
        self.db.write(batch, self.sync)

    def read_all(self) -> dict[bytes, bytes]:
        return {bytes(k): bytes(v) for k, v in self.db.items()}

    def close(self) -> None:
        self.db.close()


def database_path(mountpoint: Path, writer: str) -> Path:
    """Where `writer` keeps its database on the mount; SQLite's sits in a directory of
    its own with its -wal and -shm files."""
    return mountpoint / writer / "kv.db" if writer == "sqlite" else mountpoint / writer


def open_store(writer: str, path: Path, create: bool) -> Store:
    if writer == "lsmdb":
        return LsmdbStore(path)   # DB.open creates in a missing directory, opens otherwise
    if writer == "sqlite":
        if create:
            path.parent.mkdir(exist_ok=True)
        return SqliteStore(path, create)
    return RocksdbStore(path, create)


# ---------------------------------------------------------------------------
# the expected state


@dataclass
class InFlight:
    op: int
    changes: list[Change]


@dataclass
class ExpectedState:
    """What a writer's database must hold: per key, the op of its last acknowledged
    change and whether that put it (True) or deleted it (False); a key never
    acknowledged must be absent. Plus the commit in flight when the writer died."""

    writer: str
    next_op: int = 1
    keys: dict[int, tuple[int, bool]] = field(default_factory=dict)
    in_flight: InFlight | None = None

    def acknowledge(self, op: int, changes: list[Change]) -> None:
        for index, put in changes:
            self.keys[index] = (op, put)

    def to_json(self) -> dict:
        return {"writer": self.writer, "next_op": self.next_op,
                "keys": {str(i): list(v) for i, v in sorted(self.keys.items())},
                "in_flight": None if self.in_flight is None else
                {"op": self.in_flight.op, "changes": encode_changes(self.in_flight.changes)}}

    @classmethod
    def from_json(cls, data: dict) -> ExpectedState:
        flight = data.get("in_flight")
        return cls(writer=data["writer"], next_op=data["next_op"],
                   keys={int(i): (int(v[0]), bool(v[1])) for i, v in data["keys"].items()},
                   in_flight=None if flight is None else
                   InFlight(int(flight["op"]), decode_changes(flight["changes"])))

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)


@dataclass
class Verdict:
    problems: list[str]
    present: int
    in_flight_applied: bool | None   # None: nothing in flight, or it changed nothing seen


def check_state(expected: ExpectedState, found: dict[bytes, bytes]) -> Verdict:
    """Compare what a database holds with what was acknowledged.

    Every key must read as its last acknowledged change left it, or as the commit in
    flight would have left it; and that commit must show entirely or not at all."""
    problems: list[str] = []
    observed: dict[int, int | None] = {}   # key -> op whose value it holds, None if absent
    for key, value in found.items():
        index = key_index(key)
        if index is None:
            problems.append(f"key {key[:40]!r}: no writer wrote such a key")
            continue
        op = op_of(index, value)
        if op is None:
            problems.append(f"key {index}: holds {len(value)} bytes that no write put there"
                            f" ({value[:24]!r}...)")
            continue
        observed[index] = op

    flight = {index: (expected.in_flight.op if put else None)
              for index, put in expected.in_flight.changes} if expected.in_flight else {}
    applied: list[int] = []
    not_applied: list[int] = []
    for index in sorted(set(expected.keys) | set(flight) | set(observed)):
        if index not in observed and key_bytes(index) in found:
            continue   # its garbage was reported above
        op, put = expected.keys.get(index, (None, False))
        before = op if put else None
        now = observed.get(index)
        if index in flight and flight[index] != before:
            if now == flight[index]:
                applied.append(index)
                continue
            if now == before:
                not_applied.append(index)
                continue
        elif now == before:
            continue
        said = ("never written" if op is None else
                f"put by op {op}" if put else f"deleted by op {op}")
        seen = "absent" if now is None else f"the value of op {now}"
        also = (f"; op {expected.in_flight.op}, in flight, would "
                f"{'put' if flight[index] is not None else 'delete'} it"
                if expected.in_flight and index in flight else "")
        problems.append(f"key {index}: acknowledged as {said}, found {seen}{also}")
    if applied and not_applied:
        problems.append(f"op {expected.in_flight.op} (in flight) is torn: applied to keys"
                        f" {applied[:10]}, not to keys {not_applied[:10]}")
    return Verdict(problems, len(found),
                   None if not (applied or not_applied) else bool(applied) and not not_applied)


def settle(expected: ExpectedState, verdict: Verdict) -> None:
    """After a verification passed: the in-flight commit landed or it did not."""
    if expected.in_flight is not None and verdict.in_flight_applied:
        expected.acknowledge(expected.in_flight.op, expected.in_flight.changes)
    expected.in_flight = None


# ---------------------------------------------------------------------------
# the child processes


def emit(line: str) -> None:
    # one write(2) per line, shorter than PIPE_BUF: the parent never sees half a record
    os.write(1, (line + "\n").encode())


def run_writer(writer: str, path: Path, seed: str, first_op: int) -> int:
    """Commit changes until killed, reporting "B op changes" before each commit and
    "A op" after it returned."""
    rng = random.Random(seed)
    parent = os.getppid()
    store = open_store(writer, path, create=False)
    emit("ready")
    op = first_op
    stop_at = time.monotonic() + WRITER_LIFETIME_S
    while time.monotonic() < stop_at and os.getppid() == parent:
        changes = next_changes(rng)
        emit(f"B {op} {encode_changes(changes)}")
        store.apply(changes, op)
        emit(f"A {op}")
        op += 1
    store.close()
    return 0


def run_create(writer: str, path: Path) -> int:
    open_store(writer, path, create=True).close()
    return 0


def run_verify(writer: str, path: Path, expected_file: Path) -> int:
    """Read the whole database, compare it with the expected state, print the verdict
    as JSON; exit 1 when there is a problem."""
    expected = ExpectedState.from_json(json.loads(expected_file.read_text()))
    try:
        store = open_store(writer, path, create=False)
        try:
            found = store.read_all()
        finally:
            store.close()
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        verdict = Verdict([f"{writer}: cannot read the database: {type(exc).__name__}: {exc}"],
                          0, None)
    else:
        verdict = check_state(expected, found)
    print(json.dumps({"problems": verdict.problems, "present": verdict.present,
                      "in_flight_applied": verdict.in_flight_applied}))
    return 1 if verdict.problems else 0


def child_main(argv: list[str]) -> int:
    mode = argv[0]
    parser = argparse.ArgumentParser(prog=f"crash_test.py {mode}")
    parser.add_argument("writer", choices=WRITERS)
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", default="0")
    parser.add_argument("--first-op", type=int, default=1)
    parser.add_argument("--expected", type=Path, required=mode == "--verify")
    args = parser.parse_args(argv[1:])
    if mode == "--verify":
        return run_verify(args.writer, args.path, args.expected)
    try:
        if mode == "--create":
            return run_create(args.writer, args.path)
        return run_writer(args.writer, args.path, args.seed, args.first_op)
    except Exception as exc:  # noqa: BLE001 - after a daemon kill this is the expected end
        print(f"crash_test writer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3


# ---------------------------------------------------------------------------
# the parent: processes


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def group_members(pgid: int) -> list[psutil.Process]:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and not gone(proc):
                members.append(proc)
    return members


def wait_group_gone(pgid: int, timeout: float = EXIT_DEADLINE_S) -> bool:
    """Wait until no process of group `pgid` is left: a writer and the children it
    forked, which hold files on the mount until they exit."""
    return wait_gone(lambda: group_members(pgid), timeout)


class ChildProcesses:
    """Every writer and verifier this run started, each in its own session, so that a
    kill reaches the processes it forked too; `stop_all` on the way out."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args],
                                cwd=REPO, env=clean_env(), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        self.procs.remove(proc)

    def run(self, args: list[str], stdout: int) -> tuple[int, bytes, bytes]:
        """Start a child, wait for it (killed at CHECK_TIMEOUT_S); its exit status,
        standard output and standard error."""
        proc = self.start(args, stdout=stdout, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=CHECK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            out, err = proc.communicate()
        self.forget(proc)
        return proc.returncode, out or b"", err

    def stop_all(self) -> None:
        for proc in self.procs:
            kill_group(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(EXIT_DEADLINE_S)
            wait_group_gone(proc.pid)
        self.procs.clear()


def last_line(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


class Records:
    """The writer's pipe: "ready", "B op changes", "A op", read as they come and
    copied to a log file outside the mount."""

    def __init__(self, fd: int, log: Path, expected: ExpectedState) -> None:
        self.fd = fd
        self.log = open(log, "ab")
        self.expected = expected
        self.buffer = b""
        self.ready = False
        self.eof = False
        self.acked = 0
        self.pending: InFlight | None = None

    def poll(self, timeout: float) -> None:
        """Read what arrives within `timeout` seconds (less when the pipe closes)."""
        if self.eof:
            return
        readable, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not readable:
            return
        data = os.read(self.fd, 1 << 16)
        if not data:
            self.eof = True
            return
        self.log.write(data)
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self._record(line.decode())

    def _record(self, line: str) -> None:
        parts = line.split()
        if parts == ["ready"]:
            self.ready = True
        elif len(parts) == 3 and parts[0] == "B":
            self.pending = InFlight(int(parts[1]), decode_changes(parts[2]))
            self.expected.next_op = self.pending.op + 1
        elif len(parts) == 2 and parts[0] == "A" and self.pending \
                and int(parts[1]) == self.pending.op:
            self.expected.acknowledge(self.pending.op, self.pending.changes)
            self.pending = None
            self.acked += 1
        else:
            raise CrashTestError(f"the writer sent a record out of order: {line!r}")

    def read_waiting(self) -> None:
        """Read every record already in the pipe, without waiting for more."""
        while not self.eof and select.select([self.fd], [], [], 0)[0]:
            self.poll(0)

    def drain(self, deadline: float) -> None:
        while not self.eof and time.monotonic() < deadline:
            self.poll(deadline - time.monotonic())

    def close(self) -> None:
        os.close(self.fd)
        self.log.close()


# ---------------------------------------------------------------------------
# the parent: one iteration


@dataclass
class WriterTotals:
    iterations: int = 0
    kills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KILL_KINDS, 0))
    acked: int = 0
    failures: int = 0
    seconds: float = 0.0


@dataclass
class Outcome:
    kind: str
    moment: float = 0.0          # seconds from the writer's start to the kill
    phase: str = "writing"       # "opening": the kill came before the database was open
    acked: int = 0
    in_flight: str = "none"      # the commit in flight at the kill: applied, not applied...
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    broken: bool = False         # a mount, an unmount or a command failed: stop the run


class CrashTest:
    """The loop over one vault, one database per writer on it, and what was found."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.rng = random.Random(args.seed)
        self.vault = TdefsTarget(root / "vault")
        self.children = ChildProcesses()
        self.state_dir = root / "state"
        self.iter_dir = root / "iteration"
        self.expected = {w: ExpectedState(w) for w in args.writers}
        self.needs_reset: set[str] = set()
        self.totals = {w: WriterTotals() for w in args.writers}
        self.evidence_dirs: list[Path] = []

    # -- the vault

    def start(self) -> None:
        self.state_dir.mkdir(parents=True)
        self.iter_dir.mkdir()
        self.vault.start()   # init and mount
        for writer in self.args.writers:
            self.create_database(writer)
            self.expected[writer].save(self.state_dir / f"{writer}.json")
        self.vault.unmount()

    def stop(self) -> None:
        self.children.stop_all()
        self.vault.stop()

    def create_database(self, writer: str) -> None:
        code, _, err = self.children.run(
            ["--create", writer, str(database_path(self.vault.mountpoint, writer))],
            stdout=subprocess.DEVNULL)
        if code != 0:
            raise CrashTestError(f"cannot create the {writer} database: {last_line(err)}")

    def reset_database(self, writer: str) -> None:
        """After a failure its state is unknown: start it again from empty."""
        shutil.rmtree(self.vault.mountpoint / writer, ignore_errors=True)
        self.create_database(writer)
        expected = self.expected[writer]
        expected.keys.clear()
        expected.in_flight = None

    def daemon_pid(self, status: subprocess.Popen, outcome: Outcome) -> int | None:
        """The daemon's pid from `tdefs status MOUNTPOINT --json`, started at mount."""
        try:
            out, err = status.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            status.kill()
            out, err = status.communicate()
        try:
            return int(json.loads(out)["pid"])
        except (ValueError, KeyError, TypeError):
            outcome.problems.append(f"tdefs status --json gave no pid: {last_line(err)}")
            daemons = self.vault.daemons()
            return daemons[0].pid if daemons else None

    # -- one iteration

    def iteration(self, number: int, writer: str, kind: str) -> Outcome:
        """Mount, write and kill, unmount; remount, verify, unmount; fsck. The vault is
        unmounted before and after."""
        shutil.rmtree(self.iter_dir)
        self.iter_dir.mkdir()
        expected = self.expected[writer]
        state_file = self.state_dir / f"{writer}.json"
        outcome = Outcome(kind)
        verdict = None
        try:
            self.vault.mount()
            if writer in self.needs_reset:
                self.reset_database(writer)
                self.needs_reset.discard(writer)
            self.write_and_kill(number, writer, kind, expected, outcome)
            self.vault.unmount()   # after a daemon kill: removes the dead mount
            expected.save(state_file)

            self.vault.mount()
            verdict = self.verify(writer, state_file, outcome)
            self.vault.unmount()
            self.fsck(outcome)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            # the tools themselves failed: keep what there is, and stop after this one
            outcome.problems.append(str(exc))
            outcome.broken = True
            expected.save(state_file)
            self.children.stop_all()
            self.vault.stop()
        if verdict is not None and not outcome.problems:
            outcome.in_flight = ("none" if expected.in_flight is None else
                                 "invisible" if verdict.in_flight_applied is None else
                                 "applied" if verdict.in_flight_applied else "not applied")
            settle(expected, verdict)
            expected.save(state_file)
        return outcome

    def write_and_kill(self, number: int, writer: str, kind: str, expected: ExpectedState,
                       outcome: Outcome) -> None:
        status = None
        if kind != "writer":
            # the daemon's pid, asked for now and read at the kill: the writer starts meanwhile
            status = subprocess.Popen([*TDEFS, "status", str(self.vault.mountpoint), "--json"],
                                      cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        early = self.rng.random() < EARLY_KILL_SHARE
        delay = self.rng.uniform(*(EARLY_KILL_WINDOW_S if early else KILL_WINDOW_S))
        kill_writer_first = self.rng.random() < 0.5
        with open(self.iter_dir / "writer.err", "wb") as err:
            proc = self.children.start(
                ["--write", writer, str(database_path(self.vault.mountpoint, writer)),
                 "--seed", f"{self.args.seed}-{writer}-{number}",
                 "--first-op", str(expected.next_op)],
                stdout=subprocess.PIPE, stderr=err)
        started = time.monotonic()
        assert proc.stdout is not None
        records = Records(os.dup(proc.stdout.fileno()), self.iter_dir / "records.log", expected)
        proc.stdout.close()
        try:
            if not early:
                deadline = started + READY_DEADLINE_S
                while not records.ready and not records.eof and time.monotonic() < deadline:
                    records.poll(deadline - time.monotonic())
            kill_at = (started if early else time.monotonic()) + delay
            while not records.eof and time.monotonic() < kill_at:
                records.poll(kill_at - time.monotonic())
            if records.eof or not (early or records.ready):
                outcome.problems.append("the writer stopped before the kill: "
                                        if records.eof else
                                        f"the writer did not open its database in"
                                        f" {READY_DEADLINE_S} s: ")
                outcome.problems[-1] += self.writer_error(proc)
            daemon = self.daemon_pid(status, outcome) if status is not None else None
            records.read_waiting()
            outcome.moment = time.monotonic() - started
            outcome.phase = "writing" if records.ready else "opening"

            for victim in ["writer", "daemon"] if kill_writer_first else ["daemon", "writer"]:
                if victim == "writer" and kind in ("writer", "both"):
                    kill_group(proc.pid)
                elif victim == "daemon" and daemon is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(daemon, signal.SIGKILL)
            if daemon is not None:
                self.wait_daemon_gone(daemon, outcome)
            if kind == "daemon":
                # the mount is dead: the writer's next request fails (ENOTCONN) and it
                # exits; one that does not is killed
                try:
                    proc.wait(EXIT_DEADLINE_S)
                except subprocess.TimeoutExpired:
                    outcome.notes.append(f"the writer still ran {EXIT_DEADLINE_S} s after the"
                                         " daemon died; killed")
            kill_group(proc.pid)
            proc.wait(EXIT_DEADLINE_S)
            if not wait_group_gone(proc.pid):
                raise CrashTestError(f"processes of writer {proc.pid} outlived SIGKILL")
            records.drain(time.monotonic() + EXIT_DEADLINE_S)
        finally:
            kill_group(proc.pid)
            records.close()
        self.children.forget(proc)
        expected.in_flight = records.pending
        outcome.acked = records.acked

    def writer_error(self, proc: subprocess.Popen) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1)
        code = proc.poll()
        text = (self.iter_dir / "writer.err").read_text(errors="replace")
        return f"exit status {code}, {last_line(text)}" if code is not None else last_line(text)

    def wait_daemon_gone(self, pid: int, outcome: Outcome) -> None:
        try:
            daemon = [psutil.Process(pid)]
        except psutil.NoSuchProcess:
            return
        if not wait_gone(lambda: daemon, EXIT_DEADLINE_S):
            outcome.problems.append(f"daemon {pid} still runs {EXIT_DEADLINE_S} s after SIGKILL")

    def verify(self, writer: str, state_file: Path, outcome: Outcome) -> Verdict | None:
        path = database_path(self.vault.mountpoint, writer)
        if writer == "lsmdb":
            check = subprocess.run([*LSMDB, str(path), "check"], cwd=REPO, env=clean_env(),
                                   capture_output=True, timeout=CHECK_TIMEOUT_S)
            (self.iter_dir / "lsmdb-check.out").write_bytes(check.stdout + check.stderr)
            if check.returncode != 0:
                outcome.problems.append(f"lsmdb check exited {check.returncode}:"
                                        f" {last_line(check.stdout + check.stderr)}")
        code, out, err = self.children.run(
            ["--verify", writer, str(path), "--expected", str(state_file)],
            stdout=subprocess.PIPE)
        (self.iter_dir / "verify.out").write_bytes(out + err)
        try:
            reply = json.loads(out)
        except ValueError:
            outcome.problems.append(f"the verifier exited {code}: {last_line(err)}")
            return None
        outcome.problems += reply["problems"]
        return Verdict(reply["problems"], reply["present"], reply["in_flight_applied"])

    def fsck(self, outcome: Outcome) -> None:
        proc = subprocess.run([*TDEFS, "fsck", str(self.vault.backing),
                               "--key-file", str(self.vault.key_file)],
                              cwd=REPO, env=clean_env(), capture_output=True,
                              timeout=CHECK_TIMEOUT_S)
        (self.iter_dir / "fsck.out").write_bytes(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            outcome.problems.append(f"tdefs fsck exited {proc.returncode}:"
                                    f" {last_line(proc.stdout + proc.stderr)}")

    # -- failures

    def keep_evidence(self, number: int, writer: str, outcome: Outcome) -> Path:
        """Copy what a person needs to look at a failure: the backing tree (with its
        extended attributes) and the key that opens it, the daemon's log, this
        iteration's records, outputs and expected state."""
        where = self.args.evidence / f"{number:04d}-{writer}-{outcome.kind}"
        where.mkdir(parents=True)
        subprocess.run(["cp", "-a", str(self.vault.backing), str(where / "backing")],
                       check=False)
        shutil.copy2(self.vault.key_file, where / "master.key")
        if self.vault.log.exists():
            shutil.copy2(self.vault.log, where / "daemon.log")
        shutil.copytree(self.iter_dir, where / "iteration")
        shutil.copy2(self.state_dir / f"{writer}.json", where / "expected.json")
        (where / "problems.txt").write_text(
            f"crash_test iteration {number}: {writer}, kill {outcome.kind} at"
            f" {outcome.moment:.2f} s ({outcome.phase}), seed {self.args.seed}\n"
            + "".join(f"{p}\n" for p in outcome.problems))
        self.evidence_dirs.append(where)
        return where

    # -- the loop

    def plan(self) -> Iterator[tuple[int, str, str]]:
        """(iteration, writer, kill kind): the writers in turns; with --kill mixed each
        writer's kinds come in rounds of all three, each round in a random order."""
        rounds: dict[str, list[str]] = {writer: [] for writer in self.args.writers}
        number = 0
        for _ in range(self.args.iterations):
            for writer in self.args.writers:
                number += 1
                if self.args.kill != "mixed":
                    yield number, writer, self.args.kill
                    continue
                if not rounds[writer]:
                    rounds[writer] = self.rng.sample(KILL_KINDS, len(KILL_KINDS))
                yield number, writer, rounds[writer].pop()

    def run(self) -> None:
        began = time.monotonic()
        total = self.args.iterations * len(self.args.writers)
        print(f"{'iter':>6}  {'writer':<8} {'kill':<7} {'moment':<16} {'acked':>6}  "
              f"{'in flight':<12} {'result':<7} time", flush=True)
        for number, writer, kind in self.plan():
            if self.args.duration is not None and time.monotonic() - began >= self.args.duration:
                print(f"crash_test: --duration {self.args.duration:g} s reached after"
                      f" {number - 1} of {total} iterations", flush=True)
                break
            t0 = time.monotonic()
            outcome = self.iteration(number, writer, kind)
            seconds = time.monotonic() - t0
            totals = self.totals[writer]
            totals.iterations += 1
            totals.kills[kind] += 1
            totals.acked += outcome.acked
            totals.seconds += seconds
            result = "FAILED" if outcome.problems else "ok"
            print(f"{number:>6}  {writer:<8} {kind:<7} "
                  f"{f'{outcome.moment:.2f} s {outcome.phase}':<16} {outcome.acked:>6}  "
                  f"{outcome.in_flight:<12} {result:<7} {seconds:.1f} s", flush=True)
            for note in outcome.notes:
                print(f"        note: {note}", flush=True)
            if outcome.problems:
                totals.failures += 1
                for problem in outcome.problems[:10]:
                    print(f"        {problem}", flush=True)
                if len(outcome.problems) > 10:
                    print(f"        ... {len(outcome.problems) - 10} more", flush=True)
                where = self.keep_evidence(number, writer, outcome)
                print(f"        evidence: {where}", flush=True)
                self.needs_reset.add(writer)
                if outcome.broken:
                    raise CrashTestError(f"stopped after iteration {number}: {outcome.problems[-1]}")
                if self.args.stop_on_failure:
                    break

    def print_table(self) -> None:
        header = ("writer", "iterations", "writer kills", "daemon kills", "both kills",
                  "acked commits", "failures", "time")
        rows = []
        for writer, t in self.totals.items():
            rows.append((writer, t.iterations, t.kills["writer"], t.kills["daemon"],
                         t.kills["both"], t.acked, t.failures, format_time(t.seconds)))
        if len(rows) > 1:
            rows.append(("all", *(sum(r[i] for r in rows) for i in range(1, 7)),
                         format_time(sum(t.seconds for t in self.totals.values()))))
        print_table(header, rows, "l" + "r" * (len(header) - 1))

    @property
    def failures(self) -> int:
        return sum(t.failures for t in self.totals.values())


def format_time(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


# ---------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="crash_test",
        description="Kill database writers and the tdefs daemon at random moments; check "
                    "every acknowledged write after each remount.")
    parser.add_argument("--writer", default="all", choices=(*WRITERS, "all"),
                        help="the database engine that writes (default: all, in turns)")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, metavar="N",
                        help=f"iterations per writer (default {DEFAULT_ITERATIONS})")
    parser.add_argument("--duration", type=float, metavar="SECONDS",
                        help="stop starting iterations after this long (default: no limit)")
    parser.add_argument("--kill", default="mixed", choices=(*KILL_KINDS, "mixed"),
                        help="what to kill: the writer, the daemon, both, or mixed (default:"
                             " one of the three at random each iteration)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the work directory is made (default /var/tmp)")
    parser.add_argument("--evidence", type=Path,
                        help="where failures are copied (default: DIR/tdefs-crash-evidence-"
                             "TIME, made at the first failure)")
    parser.add_argument("--seed", type=int,
                        help="random seed for kill kinds, moments and writes (default: random,"
                             " printed)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--stop-on-failure", action="store_true",
                        help="stop at the first failed iteration")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be positive")
    args.writers = list(WRITERS) if args.writer == "all" else [args.writer]
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    if args.evidence is None:
        args.evidence = args.dir / time.strftime("tdefs-crash-evidence-%Y%m%d-%H%M%S")
    return args


def crash_test(args: argparse.Namespace) -> int:
    if "rocksdb" in args.writers:
        try:
            import rocksdict  # noqa: F401
        except ImportError:
            raise CrashTestError("rocksdict is missing: TDEFS_EXTRAS=test,bench scripts/setup") \
                from None
    args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tdefs-crash-", dir=args.dir))
    print(f"crash_test: work dir {root}, writers {', '.join(args.writers)},"
          f" {args.iterations} iterations each"
          + (f" (at most {args.duration:g} s)" if args.duration else "")
          + f", kill {args.kill}, seed {args.seed}", flush=True)
    test = CrashTest(args, root)
    began = time.monotonic()
    try:
        try:
            test.start()
            test.run()
        finally:
            test.stop()
            if args.keep:
                print(f"crash_test: kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        test.print_table()
    print(f"crash_test: {test.failures or 'no'} failures in {format_time(time.monotonic() - began)}"
          + (f"; evidence in {args.evidence}" if test.evidence_dirs else ""), flush=True)
    return 1 if test.failures else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--write", "--create", "--verify"):
        return child_main(argv)
    args = parse_args(argv)
    return run_guarded("crash_test", lambda: crash_test(args))


if __name__ == "__main__":
    sys.exit(main())
