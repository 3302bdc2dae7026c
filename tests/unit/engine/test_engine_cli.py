"""The lsmdb command: every subcommand, and one-line errors with a non-zero exit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import run_lsmdb as run

from engine.cli import main


def test_put_get_delete_scan(tmp_path, capsys):
    db = tmp_path / "db"
    assert run(capsys, db, "put", "k1", "v1")[0] == 0
    assert run(capsys, db, "put", "k2", "v\u00e92", "--sync")[0] == 0
    assert run(capsys, db, "put", "k3", "v3")[0] == 0
    assert run(capsys, db, "get", "k1")[1] == "v1\n"
    assert run(capsys, db, "get", "k2")[1] == "v\\xc3\\xa92\n"
    assert run(capsys, db, "delete", "k1")[0] == 0
    code, out, err = run(capsys, db, "get", "k1")
    assert code == 1 and out == "" and err == "lsmdb: error: not found: k1\n"
    assert run(capsys, db, "scan")[1] == "k2\tv\\xc3\\xa92\nk3\tv3\n"
    assert run(capsys, db, "scan", "--from", "k3")[1] == "k3\tv3\n"
    assert run(capsys, db, "scan", "--to", "k3")[1] == "k2\tv\\xc3\\xa92\n"
    assert run(capsys, db, "scan", "--limit", "1", "--reverse")[1] == "k3\tv3\n"
    assert run(capsys, db, "--hex", "get", "6b33")[1] == "7633\n"


def test_compact_stats_check(tmp_path, capsys):
    db = tmp_path / "db"
    for i in range(20):
        run(capsys, db, "put", f"key{i:02d}", "x" * 100)
    code, out, _ = run(capsys, db, "compact")
    assert code == 0 and out == "compacted\n"
    code, out, _ = run(capsys, db, "stats")
    assert code == 0 and "level 0" not in out and "level 1: " in out and "sequence: 20" in out
    code, out, _ = run(capsys, db, "check")
    assert code == 0 and re.fullmatch(r"ok: \d+ tables checked\n", out)


def test_dump_commands(tmp_path, capsys):
    db = tmp_path / "db"
    run(capsys, db, "put", "alpha", "one")
    run(capsys, db, "compact")
    names = os.listdir(db)
    sst = db / next(n for n in names if n.endswith(".sst"))
    manifest = db / next(n for n in names if n.startswith("MANIFEST-"))
    code, out, _ = run(capsys, "dump-sst", sst)
    assert code == 0 and "alpha @ 1 put = one" in out and '"num_entries": 1' in out
    code, out, _ = run(capsys, "dump-manifest", manifest)
    assert code == 0 and "edit at 0:" in out and "keys alpha .. alpha" in out
    from engine.wal import LogWriter
    from engine.write_batch import encode_batch

    log = tmp_path / "000007.log"
    w = LogWriter(str(log))
    w.add(encode_batch(5, [(b"a", b"1"), (b"b", None)]))
    w.close()
    code, out, _ = run(capsys, "dump-wal", log)
    assert code == 0 and out == "record at 0: seq 5, 2 ops\n  5 put a = 1\n  6 delete b\n"


@pytest.mark.parametrize("args", [
    [],
    ["{db}"],
    ["{db}", "frobnicate"],
    ["{db}", "get"],
    ["{db}", "scan", "--limit", "many"],
    ["{db}", "scan", "--limit", "-1"],
    ["--hex", "{db}", "get", "zz"],
    ["dump-sst"],
    ["dump-wal", "{missing}"],
    ["dump-sst", "{junk}"],
    ["dump-manifest", "{junk}"],
    ["{missing}", "get", "k"],
])
def test_bad_input_is_one_line_error(tmp_path, capsys, args):
    (tmp_path / "junk").write_bytes(b"this is not a table" * 10)
    db = tmp_path / "db"
    main([str(db), "put", "k", "v"])
    capsys.readouterr()
    argv = [a.format(db=db, missing=tmp_path / "missing", junk=tmp_path / "junk") for a in args]
    code, out, err = run(capsys, *argv)
    assert code != 0
    assert err.startswith("lsmdb: error: ") and err.count("\n") == 1, err


def test_locked_database_and_entry_point(tmp_path):
    from engine import DB

    db_path = tmp_path / "db"
    exe = Path(sys.executable).with_name("lsmdb")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "engine.cli"]
    with DB.open(db_path):
        r = subprocess.run([*cmd, str(db_path), "get", "k"], capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "locked by another process" in r.stderr
    r = subprocess.run([*cmd, str(db_path), "put", "k", "v"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def files(path: Path) -> dict[str, bytes]:
    """Every file of a database directory with its bytes, to show nothing changed."""
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


READ_ONLY = [["get", "k"], ["scan"], ["stats"], ["check"]]
WRITING = [["put", "k", "v"], ["delete", "k"]]


@pytest.mark.parametrize("args", READ_ONLY, ids=lambda a: a[0])
def test_read_only_commands_leave_a_directory_that_is_not_a_database_alone(tmp_path, capsys,
                                                                            args):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    before = files(etc)
    code, out, err = run(capsys, etc, *args)
    assert files(etc) == before
    assert (code, out) == (1, "")
    assert err == f"lsmdb: error: {etc}: not a database (no CURRENT file)\n"


@pytest.mark.parametrize("args", READ_ONLY, ids=lambda a: a[0])
def test_read_only_commands_on_a_missing_or_empty_directory_create_nothing(tmp_path, capsys,
                                                                            args):
    missing = tmp_path / "missing"
    code, out, err = run(capsys, missing, *args)
    assert not missing.exists() and os.listdir(tmp_path) == []
    assert (code, out) == (1, "")
    assert err == f"lsmdb: error: {missing}: database does not exist (no such directory)\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run(capsys, empty, *args)
    assert os.listdir(empty) == []
    assert (code, out) == (1, "")
    assert err == f"lsmdb: error: {empty}: database does not exist (the directory is empty)\n"


@pytest.mark.parametrize("args", WRITING, ids=lambda a: a[0])
def test_writing_commands_refuse_a_non_empty_directory_that_is_not_a_database(tmp_path, capsys,
                                                                               args):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep me\n")
    before = files(home)
    code, out, err = run(capsys, home, *args)
    assert files(home) == before
    assert (code, out) == (1, "")
    assert err == (f"lsmdb: error: {home}: not a database (no CURRENT file) and not empty; "
                   "a database is only created in a missing or empty directory\n")


def test_put_creates_a_database_in_an_empty_directory_that_reads_leave_unchanged(tmp_path,
                                                                                  capsys):
    db = tmp_path / "db"
    db.mkdir()
    assert run(capsys, db, "put", "k", "v") == (0, "", "")
    assert "CURRENT" in os.listdir(db)
    before = files(db)
    assert run(capsys, db, "get", "k") == (0, "v\n", "")
    assert run(capsys, db, "scan") == (0, "k\tv\n", "")
    assert run(capsys, db, "stats")[0] == 0
    assert run(capsys, db, "check") == (0, "ok: 1 tables checked\n", "")
    # Reading starts no new MANIFEST or log and rewrites no OPTIONS.
    assert files(db) == before
