"""Opening a database: where one is created, and read-only opens that write nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from engine_helpers import small_options

from engine import DB, InvalidArgument, LockError, Options, WriteBatch


def files(path: Path) -> dict[str, bytes] | None:
    """Every file of a directory with its bytes (None if it is missing)."""
    if not path.exists():
        return None
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def crash_copy(src: Path, dst: Path) -> None:
    """Copy a live database directory the way a crash would leave it."""
    os.makedirs(dst)
    for name in os.listdir(src):
        try:
            shutil.copy2(src / name, dst / name)
        except FileNotFoundError:
            pass  # an obsolete log deleted by background work meanwhile, as a crash could see


def test_no_open_writes_into_a_directory_holding_other_files(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("buy milk\n")
    for options, read_only in ((Options(), False), (Options(create_if_missing=False), False),
                               (Options(), True)):
        with pytest.raises(InvalidArgument, match="not a database"):
            DB.open(notes, options, read_only=read_only)
        # Not even a LOCK: the directory is checked before anything is made.
        assert files(notes) == {"todo.txt": b"buy milk\n"}


def test_only_a_creating_open_makes_a_database_in_a_missing_or_empty_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    # What a creation killed between locking and writing CURRENT leaves behind.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "LOCK").write_bytes(b"")
    for path in (tmp_path / "missing", empty, interrupted):
        before = files(path)
        with pytest.raises(InvalidArgument, match="database does not exist"):
            DB.open(path, small_options(create_if_missing=False))
        with pytest.raises(InvalidArgument, match="database does not exist"):
            DB.open(path, small_options(), read_only=True)
        assert files(path) == before
        with DB.open(path, small_options()) as db:
            db.put(b"k", b"v")
        with DB.open(path, small_options(create_if_missing=False)) as db:
            assert db.get(b"k") == b"v"


def test_read_only_open_of_a_crashed_database_reads_its_logs_and_writes_nothing(tmp_path):
    # A big write buffer keeps the second round of writes in the WAL only.
    opts = small_options(write_buffer_size=1 << 20)
    path = tmp_path / "db"
    db = DB.open(path, opts)
    for i in range(200):
        db.put(b"key%03d" % i, b"table%d" % i)
    db.flush()
    db.wait_for_compactions()
    for i in range(0, 200, 2):
        db.put(b"key%03d" % i, b"log%d" % i)
    db.delete(b"key001")
    db._wal.flush()
    crash = tmp_path / "crash"
    crash_copy(path, crash)  # CURRENT, a table and the log holding the last writes
    db.close()
    before = files(crash)
    batch = WriteBatch()
    batch.put(b"a", b"1")
    with DB.open(crash, opts, read_only=True) as ro:
        assert ro.get(b"key000") == b"log0" and ro.get(b"key003") == b"table3"
        assert ro.get(b"key001") is None
        assert list(ro.iterator(b"key000", b"key004")) == [
            (b"key000", b"log0"), (b"key002", b"log2"), (b"key003", b"table3")]
        ro.check()
        writes = (lambda: ro.put(b"a", b"1"), lambda: ro.delete(b"key000"),
                  lambda: ro.write(batch), lambda: ro.write(WriteBatch(), sync=True),
                  lambda: ro.delete_range(b"x", b"y", sync=True), ro.flush, ro.compact_range)
        for write in writes:
            with pytest.raises(InvalidArgument, match="open read-only"):
                write()
        ro.wait_for_compactions()  # nothing runs in the background: returns at once
        assert ro.get(b"a") is None
    assert files(crash) == before
    # The ordinary open still recovers the same state from the crash image.
    with DB.open(crash, opts) as db2:
        assert db2.get(b"key000") == b"log0" and db2.get(b"key001") is None
        assert db2.get(b"key199") == b"table199"


def test_read_only_opens_share_the_lock_and_exclude_writers(tmp_path):
    path = tmp_path / "db"
    opts = small_options()
    DB.open(path, opts).close()
    with DB.open(path, opts, read_only=True), DB.open(path, opts, read_only=True):
        with pytest.raises(LockError, match="locked by another process"):
            DB.open(path, opts)
    with DB.open(path, opts):
        with pytest.raises(LockError, match="locked by another process"):
            DB.open(path, opts, read_only=True)


def test_a_closed_database_holds_no_file_open(tmp_path):
    from engine import DB

    db = DB.open(str(tmp_path / "db"))
    for i in range(2000):
        db.put(f"k{i:05d}".encode(), b"v" * 100)
    db.flush()
    assert db.get(b"k00001") == b"v" * 100  # a table is mapped for the read
    db.close()
    mine = f"/proc/{os.getpid()}/fd"
    held = [os.readlink(f"{mine}/{fd}") for fd in os.listdir(mine)
            if os.path.exists(f"{mine}/{fd}") and str(tmp_path) in os.readlink(f"{mine}/{fd}")]
    assert held == []  # db is still referenced: nothing waits for the collector
    assert db is not None
