"""The lsmdb delete-range and single-delete subcommands, and how the dumps show them."""

from __future__ import annotations

import pytest
from engine_helpers import run_lsmdb as run

from engine.cli import main
from engine.filename import table_name


def test_delete_range_and_single_delete(tmp_path, capsys):
    db = tmp_path / "db"
    for k in ("a", "b", "c", "d", "e"):
        assert run(capsys, db, "put", k, k.upper())[0] == 0
    assert run(capsys, db, "delete-range", "b", "d")[0] == 0
    assert run(capsys, db, "single-delete", "e", "--sync")[0] == 0
    assert run(capsys, db, "scan")[1] == "a\tA\nd\tD\n"
    assert run(capsys, db, "--hex", "delete-range", "61", "62")[0] == 0  # [a, b)
    assert run(capsys, db, "scan")[1] == "d\tD\n"
    code, out, err = run(capsys, db, "get", "c")
    assert code == 1 and err == "lsmdb: error: not found: c\n"
    assert run(capsys, db, "compact")[0] == 0
    assert run(capsys, db, "check")[0] == 0
    assert run(capsys, db, "scan")[1] == "d\tD\n"


def test_dump_wal_shows_range_and_single_deletes(tmp_path, capsys):
    from engine.wal import LogWriter
    from engine.write_batch import SINGLE_DELETE, RangeEnd, encode_batch

    log = tmp_path / "000007.log"
    w = LogWriter(str(log))
    w.add(encode_batch(5, [(b"b", RangeEnd(b"d")), (b"e", SINGLE_DELETE)]))
    w.close()
    code, out, _ = run(capsys, "dump-wal", log)
    assert code == 0
    assert out == "record at 0: seq 5, 2 ops\n  5 delete-range b .. d\n  6 single-delete e\n"


def test_dump_sst_shows_range_tombstones_and_single_deletes(tmp_path, capsys):
    from engine import DB, Options

    with DB.open(tmp_path / "db", Options(background_processes=False)) as db:
        db.put(b"m", b"1")
        db.single_delete(b"s")
        db.delete_range(b"a", b"c")
        db.flush()
        number = db._sv[2].levels[0][0].number
    code, out, _ = run(capsys, "dump-sst", tmp_path / "db" / table_name(number))
    assert code == 0 and "range tombstone a .. c @ 3" in out and "s @ 2 single-delete" in out


@pytest.mark.parametrize("args", [
    ["{db}", "delete-range", "z", "a"],
    ["{db}", "delete-range", "a"],
    ["--hex", "{db}", "delete-range", "zz", "00"],
    ["{db}", "single-delete"],
    ["{db}", "single-delete", "a", "b"],
])
def test_bad_input_is_one_line_error(tmp_path, capsys, args):
    db = tmp_path / "db"
    main([str(db), "put", "k", "v"])
    capsys.readouterr()
    code, out, err = run(capsys, *[a.format(db=db) for a in args])
    assert code == 2 and out == ""
    assert err.startswith("lsmdb: error: ") and err.count("\n") == 1, err


def test_an_inverted_range_creates_no_database(tmp_path, capsys):
    code, _, err = run(capsys, tmp_path / "new", "delete-range", "z", "a")
    assert code == 2 and "sorts after" in err
    assert not (tmp_path / "new").exists()
