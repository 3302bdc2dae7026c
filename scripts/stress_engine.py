"""Stress the engine: several threads of random writes and reads against an expected
state kept outside the database, verified as they go; with --crash, the writer killed
with SIGKILL at random moments, again and again, and everything it acknowledged
checked after each reopen.

The key space has two regions. "s" keys take puts, deletes, range deletes, batches
and ingestions of external tables (puts, deletes and a range deletion over a run of
keys, written with SstFileWriter and given to DB.ingest, copied or moved);
"t" keys follow SingleDelete's contract (a put only while the key is absent, then a
single delete), so the stress never breaks a contract the engine documents.

Each key has a lock. A thread takes the locks of every key an operation touches (in
key order, so threads never deadlock), writes, updates the expected state, and lets
go: while a thread holds a key's lock, the database and the expected state agree on
that key, so its reads are checked exactly: point reads, reads through a snapshot
taken earlier, and iterators over a locked window.

With --crash every write is synced. The child announces each operation before it
writes ("B ...") and acknowledges it after ("A ..."), one write(2) per record; at most
one operation per thread is in flight at the kill, and it must show entirely or not
at all. `python stress_engine.py --child ...` is the child's entry, not for people.
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
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

S_KEYS = 4000           # keys for puts, deletes, range deletes and batches
T_KEYS = 1000           # keys for put-once-then-single-delete
MAX_RANGE = 40          # keys a range delete spans at most
MAX_BATCH = 8
MAX_INGEST = 24         # keys an ingested table spans at most
WINDOW = 16             # keys an iterator check spans
KILL_WINDOW_S = (0.2, 2.0)
READY_DEADLINE_S = 60
EXIT_DEADLINE_S = 20

# how often each operation of Worker runs, relative to the others
MIX = {"put": 35, "delete": 8, "delete_range": 5, "batch": 10, "single_delete_key": 8,
       "ingest": 2, "get": 16, "snapshot_read": 9, "iterate": 9}
OPERATIONS, WEIGHTS = list(MIX), list(MIX.values())

# (index, gen): index < S_KEYS is an "s" key, above it a "t" key; gen None deletes
Change = tuple[int, int | None]


def key_bytes(index: int) -> bytes:
    return b"s%07d" % index if index < S_KEYS else b"t%07d" % (index - S_KEYS)


def key_index(key: bytes) -> int | None:
    if len(key) != 8 or not key[1:].isdigit():
        return None
    number = int(key[1:])
    if key[:1] == b"s" and number < S_KEYS:
        return number
    if key[:1] == b"t" and number < T_KEYS:
        return S_KEYS + number
    return None


def value_for(index: int, gen: int) -> bytes:
    """What write `gen` puts under key `index`: its name, then derived bytes, so any
    wrong, stale or torn value shows."""
    head = b"%d:%d:" % (index, gen)
    digest = hashlib.blake2b(head, digest_size=32).digest()
    length = 24 + digest[0]
    return (head + digest * (length // 32 + 1))[:length]


def gen_of(index: int, value: bytes) -> int | None:
    parts = value.split(b":", 2)
    if len(parts) == 3 and parts[1].isdigit() and value == value_for(index, int(parts[1])):
        return int(parts[1])
    return None


def encode(changes: list[Change]) -> str:
    return ",".join(f"{i}={'-' if g is None else g}" for i, g in changes)


def decode(text: str) -> list[Change]:
    out = []
    for item in text.split(","):
        i, g = item.split("=")
        out.append((int(i), None if g == "-" else int(g)))
    return out


class Failure(Exception):
    """The database disagreed with the expected state."""


# ---------------------------------------------------------------------------
# the expected state and the threads


class Expected:
    """Per key: the generation of the value it holds, or None when absent."""

    def __init__(self, state: list[int | None] | None = None, next_gen: int = 1) -> None:
        self.state: list[int | None] = state or [None] * (S_KEYS + T_KEYS)
        self.locks = [threading.Lock() for _ in self.state]
        self.next_gen = next_gen
        self._gen_lock = threading.Lock()

    def new_gen(self) -> int:
        with self._gen_lock:
            gen = self.next_gen
            self.next_gen += 1
            return gen

    @contextlib.contextmanager
    def holding(self, indexes: list[int]):
        ordered = sorted(set(indexes))
        for i in ordered:
            self.locks[i].acquire()
        try:
            yield
        finally:
            for i in reversed(ordered):
                self.locks[i].release()

    def to_json(self) -> dict:
        return {"next_gen": self.next_gen, "state": self.state}

    @classmethod
    def from_json(cls, data: dict) -> Expected:
        return cls(list(data["state"]), data["next_gen"])


def open_db(path: Path, compactions: int):
    from engine import DB, Options

    options = Options(write_buffer_size=256 << 10, target_file_size_base=128 << 10,
                      max_bytes_for_level_base=1 << 20, level0_file_num_compaction_trigger=2,
                      block_cache_size=1 << 20, max_background_compactions=compactions)
    return DB.open(path, options)


class Worker:
    """One thread's random operations; `emit` reports them in crash mode."""

    def __init__(self, db, expected: Expected, rng: random.Random, sync: bool,
                 emit=None, tid: int = 0) -> None:
        self.db = db
        self.exp = expected
        self.rng = rng
        self.sync = sync
        self.emit = emit
        self.tid = tid
        self.counts: Counter[str] = Counter()
        self._op = 0

    def step(self) -> None:
        name = self.rng.choices(OPERATIONS, WEIGHTS)[0]
        getattr(self, name)()

    # -- writes

    def _write(self, kind: str, changes: list[Change], action) -> None:
        self._op += 1
        if self.emit:
            self.emit(f"B {self.tid} {self._op} {encode(changes)}")
        action()
        if self.emit:
            self.emit(f"A {self.tid} {self._op}")
        for i, g in changes:
            self.exp.state[i] = g
        self.counts[kind] += 1

    def put(self) -> None:
        i = self.rng.randrange(S_KEYS)
        with self.exp.holding([i]):
            gen = self.exp.new_gen()
            self._write("put", [(i, gen)],
                        lambda: self.db.put(key_bytes(i), value_for(i, gen), sync=self.sync))

    def delete(self) -> None:
        i = self.rng.randrange(S_KEYS)
        with self.exp.holding([i]):
            self._write("delete", [(i, None)],
                        lambda: self.db.delete(key_bytes(i), sync=self.sync))

    def delete_range(self) -> None:
        a = self.rng.randrange(S_KEYS)
        b = min(S_KEYS, a + self.rng.randint(1, MAX_RANGE))
        span = list(range(a, b))
        with self.exp.holding(span):
            self._write("delete_range", [(i, None) for i in span],
                        lambda: self.db.delete_range(key_bytes(a), key_bytes(b),
                                                     sync=self.sync))

    def batch(self) -> None:
        from engine import WriteBatch

        picked = self.rng.sample(range(S_KEYS), self.rng.randint(2, MAX_BATCH))
        with self.exp.holding(picked):
            changes: list[Change] = [(i, self.exp.new_gen() if self.rng.random() < 0.8
                                      else None) for i in picked]
            batch = WriteBatch()
            for i, g in changes:
                if g is None:
                    batch.delete(key_bytes(i))
                else:
                    batch.put(key_bytes(i), value_for(i, g))
            self._write("batch", changes, lambda: self.db.write(batch, sync=self.sync))

    def ingest(self) -> None:
        """An external table over a run of keys, ingested like a batch: each key of the
        run is put, deleted, or left out; with a range deletion over the whole run a
        key left out is deleted too (the table's own puts share its sequence number,
        so its range deletion does not hide them)."""
        from engine import SstFileWriter

        a = self.rng.randrange(S_KEYS)
        b = min(S_KEYS, a + self.rng.randint(1, MAX_INGEST))
        span = list(range(a, b))
        ranged = self.rng.random() < 0.5
        move = self.rng.random() < 0.5
        with self.exp.holding(span):
            changes: list[Change] = []
            entries: list[tuple[int, int | None]] = []
            for i in span:
                roll = self.rng.random()
                if roll < 0.6:
                    entries.append((i, self.exp.new_gen()))
                elif roll < 0.75:
                    entries.append((i, None))
                elif ranged:
                    changes.append((i, None))
            if not entries and not ranged:
                entries.append((a, self.exp.new_gen()))
            changes = sorted(changes + entries)
            # Named after the operation number _write is about to give it.
            path = Path(self.db.path).parent / f"ingest-{self.tid}-{self._op + 1}.sst"
            with SstFileWriter(path) as writer:
                if ranged:
                    writer.delete_range(key_bytes(a), key_bytes(b))
                for i, g in entries:
                    if g is None:
                        writer.delete(key_bytes(i))
                    else:
                        writer.put(key_bytes(i), value_for(i, g))
            try:
                self._write("ingest", changes, lambda: self.db.ingest([path], move=move))
            finally:
                path.unlink(missing_ok=True)

    def single_delete_key(self) -> None:
        """A "t" key: put it when absent, single-delete it when present."""
        i = S_KEYS + self.rng.randrange(T_KEYS)
        with self.exp.holding([i]):
            if self.exp.state[i] is None:
                gen = self.exp.new_gen()
                self._write("put_once", [(i, gen)],
                            lambda: self.db.put(key_bytes(i), value_for(i, gen), sync=self.sync))
            else:
                self._write("single_delete", [(i, None)],
                            lambda: self.db.single_delete(key_bytes(i), sync=self.sync))

    # -- reads

    def _check(self, i: int, value: bytes | None, how: str, want: int | None) -> None:
        got = None if value is None else gen_of(i, value)
        if value is not None and got is None:
            raise Failure(f"{how} {key_bytes(i).decode()}: {len(value)} bytes no write put"
                          f" there ({value[:20]!r})")
        if got != want:
            raise Failure(f"{how} {key_bytes(i).decode()}: expected "
                          f"{'absent' if want is None else f'gen {want}'}, got "
                          f"{'absent' if got is None else f'gen {got}'}")

    def get(self) -> None:
        i = self.rng.randrange(S_KEYS + T_KEYS)
        with self.exp.holding([i]):
            self._check(i, self.db.get(key_bytes(i)), "get", self.exp.state[i])
        self.counts["get"] += 1

    def snapshot_read(self) -> None:
        """Pin a snapshot, let other writes happen, read through it."""
        i = self.rng.randrange(S_KEYS)
        with self.exp.holding([i]):
            snap = self.db.snapshot()
            want = self.exp.state[i]
        try:
            for _ in range(self.rng.randint(1, 6)):
                self.put() if self.rng.random() < 0.6 else self.delete_range()
            self._check(i, self.db.get(key_bytes(i), snapshot=snap), "snapshot get", want)
        finally:
            snap.release()
        self.counts["snapshot_read"] += 1

    def iterate(self) -> None:
        a = self.rng.randrange(S_KEYS - WINDOW)
        span = list(range(a, a + WINDOW))
        reverse = self.rng.random() < 0.3
        with self.exp.holding(span):
            seen = {key_index(k): v for k, v in
                    self.db.iterator(key_bytes(a), key_bytes(a + WINDOW), reverse=reverse)}
            for i in span:
                self._check(i, seen.get(i), "iterator at", self.exp.state[i])
            if None in seen:
                raise Failure(f"iterator over {key_bytes(a).decode()}..: a foreign key")
        self.counts["iterate"] += 1


def scan_all(db) -> dict[int, bytes]:
    """Every key and value a full scan finds, by key index; a foreign key fails."""
    found = {}
    for key, value in db.iterator():
        i = key_index(key)
        if i is None:
            raise Failure(f"scan: a key no write put there: {key[:20]!r}")
        found[i] = value
    return found


def verify_all(db, expected: Expected) -> None:
    """Every key by point read and by a full scan; then the engine's own check."""
    found = scan_all(db)
    checker = Worker(db, expected, random.Random(0), False)
    for i, want in enumerate(expected.state):
        checker._check(i, found.get(i), "scan at", want)
        checker._check(i, db.get(key_bytes(i)), "get", want)
    db.check()


# ---------------------------------------------------------------------------
# without crashes


def run_threads(db, expected: Expected, threads: int, seed: int, until: float, sync: bool,
                emit=None) -> Counter[str]:
    errors: list[BaseException] = []
    workers = [Worker(db, expected, random.Random(f"{seed}-{t}"), sync, emit, t)
               for t in range(threads)]

    def loop(worker: Worker) -> None:
        try:
            while time.monotonic() < until and not errors:
                worker.step()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    pool = [threading.Thread(target=loop, args=(w,), daemon=True) for w in workers]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return sum((w.counts for w in workers), Counter())


def stress(args: argparse.Namespace, path: Path) -> int:
    expected = Expected()
    db = open_db(path, args.compactions)
    try:
        counts = run_threads(db, expected, args.threads, args.seed,
                             time.monotonic() + args.duration, sync=False)
        db.wait_for_compactions()
        verify_all(db, expected)
    finally:
        db.close()
    db = open_db(path, args.compactions)
    try:
        verify_all(db, expected)
        levels = db.level_file_counts()
    finally:
        db.close()
    print_counts(counts)
    print(f"stress_engine: ok after {args.duration:g} s with {args.threads} threads;"
          f" files per level at the end {levels}")
    return 0


def print_counts(counts: Counter[str]) -> None:
    print("operation        count")
    for name in ("put", "delete", "delete_range", "batch", "ingest", "put_once",
                 "single_delete", "get", "snapshot_read", "iterate"):
        print(f"{name:<15} {counts[name]:>6}")


# ---------------------------------------------------------------------------
# with crashes


def child(args: argparse.Namespace) -> int:
    """Load the expected state, write and check until killed, syncing every write."""
    expected = Expected.from_json(json.loads(args.state.read_text()))
    db = open_db(args.db, args.compactions)

    def emit(line: str) -> None:
        os.write(1, (line + "\n").encode())

    emit("ready")
    run_threads(db, expected, args.threads, args.seed, time.monotonic() + 120, sync=True,
                emit=emit)
    db.close()
    return 0


@dataclass
class Pending:
    changes: list[Change]


def settle(db, expected: Expected, pending: list[Pending]) -> tuple[int, int]:
    """After a kill: keys outside the operations in flight must read as acknowledged;
    each operation in flight shows entirely or not at all, and is taken as found.
    Returns (landed, not landed)."""
    in_flight = {i for p in pending for i, _ in p.changes}
    found = scan_all(db)
    checker = Worker(db, expected, random.Random(0), False)
    for i, want in enumerate(expected.state):
        if i not in in_flight:
            checker._check(i, found.get(i), "after reopen,", want)
    landed = lost = 0
    for p in pending:
        after = {i: g for i, g in p.changes}
        now = {i: None if found.get(i) is None else gen_of(i, found[i]) for i in after}
        changed = [i for i in after if after[i] != expected.state[i]]
        applied = [i for i in changed if now[i] == after[i]]
        kept = [i for i in changed if now[i] == expected.state[i]]
        wrong = [i for i in after if now[i] not in (after[i], expected.state[i])]
        if wrong or (applied and kept):
            raise Failure(f"an operation in flight ({encode(p.changes)[:80]}) is torn or"
                          f" wrong: applied to {applied[:5]}, not to {kept[:5]},"
                          f" neither at {wrong[:5]}")
        if applied:
            landed += 1
            for i in after:
                expected.state[i] = after[i]
        elif changed:
            lost += 1
    db.check()
    return landed, lost


def crash_loop(args: argparse.Namespace, path: Path, work: Path) -> int:
    rng = random.Random(args.seed)
    expected = Expected()
    state_file = work / "expected.json"
    began = time.monotonic()
    totals = Counter()
    print(f"{'iter':>5} {'kill at':>8} {'acked':>7} {'in flight':>9} {'landed':>7}", flush=True)
    for number in range(1, args.iterations + 1):
        if time.monotonic() - began >= args.duration:
            print(f"stress_engine: --duration {args.duration:g} s reached after"
                  f" {number - 1} iterations")
            break
        state_file.write_text(json.dumps(expected.to_json()))
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", "--db", str(path),
             "--state", str(state_file), "--seed", f"{args.seed}{number}",
             "--threads", str(args.threads), "--compactions", str(args.compactions)],
            stdout=subprocess.PIPE, start_new_session=True)
        try:
            delay, acked, pending = watch_and_kill(proc, rng, expected)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(EXIT_DEADLINE_S)
            assert proc.stdout is not None
            proc.stdout.close()
        wait_group_gone(proc.pid)
        db = open_db(path, args.compactions)
        try:
            landed, lost = settle(db, expected, list(pending.values()))
        finally:
            db.close()
        expected.next_gen += 1
        totals.update(iterations=1, acked=acked, in_flight=len(pending), landed=landed)
        print(f"{number:>5} {delay:>7.2f}s {acked:>7} {len(pending):>9} {landed:>7}",
              flush=True)
    print(f"stress_engine --crash: ok, {totals['iterations']} kills, {totals['acked']} synced"
          f" writes acknowledged and found, {totals['in_flight']} in flight at a kill"
          f" ({totals['landed']} of them landed)")
    return 0


def watch_and_kill(proc: subprocess.Popen, rng: random.Random,
                   expected: Expected) -> tuple[float, int, dict[int, Pending]]:
    """Read the child's records until a random moment after it is ready, kill it,
    read what is left; apply acknowledged operations to `expected`."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = b""
    ready = False
    pending: dict[int, Pending] = {}
    acked = 0
    deadline = time.monotonic() + READY_DEADLINE_S
    kill_at: float | None = None
    delay = 0.0
    killed = False
    while True:
        now = time.monotonic()
        if ready and kill_at is None:
            delay = rng.uniform(*KILL_WINDOW_S)
            kill_at = now + delay
        if not killed and kill_at is not None and now >= kill_at:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        if not ready and now > deadline:
            raise Failure(f"the writer did not open the database in {READY_DEADLINE_S} s")
        wait = 0.5 if killed or kill_at is None else max(0.0, kill_at - now)
        if select.select([fd], [], [], wait)[0]:
            data = os.read(fd, 1 << 16)
            if not data:
                break
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                parts = raw.decode().split()
                if parts == ["ready"]:
                    ready = True
                elif parts[0] == "B":
                    pending[int(parts[1])] = Pending(decode(parts[3]))
                elif parts[0] == "A":
                    for i, g in pending.pop(int(parts[1])).changes:
                        expected.state[i] = g
                    acked += 1
        elif proc.poll() is not None and not killed:
            raise Failure(f"the writer exited with status {proc.returncode} before the kill")
    if not killed:
        raise Failure(f"the writer exited with status {proc.wait()} before the kill")
    return delay, acked, pending


def wait_group_gone(pgid: int) -> None:
    deadline = time.monotonic() + EXIT_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise Failure(f"processes of writer {pgid} outlived SIGKILL")


# ---------------------------------------------------------------------------
# main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="stress_engine",
        description="Random concurrent operations on the engine, checked against an expected"
                    " state; --crash kills the writer at random and checks after each reopen.")
    parser.add_argument("--dir", type=Path, help="where the database is made (default: a"
                        " temporary directory, removed at the end)")
    parser.add_argument("--duration", type=float, default=30, metavar="SECONDS",
                        help="how long to run (default 30)")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--compactions", type=int, default=2,
                        help="max_background_compactions (default 2)")
    parser.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    parser.add_argument("--crash", action="store_true",
                        help="kill the writer with SIGKILL at random moments and verify after"
                             " each reopen")
    parser.add_argument("--iterations", type=int, default=1000,
                        help="with --crash, kills at most (default 1000; --duration bounds it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.threads < 1 or args.iterations < 1 or args.compactions < 1:
        parser.error("--duration, --threads, --iterations and --compactions must be positive")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        return child(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="stress-engine-", dir=args.dir))
    print(f"stress_engine: {'crash loop, ' if args.crash else ''}{args.threads} threads,"
          f" seed {args.seed}, database {work / 'db'}", flush=True)
    try:
        if args.crash:
            return crash_loop(args, work / "db", work)
        return stress(args, work / "db")
    except Failure as exc:
        print(f"stress_engine: FAILED: {exc}", file=sys.stderr)
        print(f"stress_engine: the database is kept in {work}", file=sys.stderr)
        work = None  # keep the evidence
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, the database kept
        print(f"stress_engine: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"stress_engine: the database is kept in {work}", file=sys.stderr)
        work = None
        return 1
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
