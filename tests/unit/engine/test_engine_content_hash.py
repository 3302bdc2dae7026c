"""`lsmdb PATH hash`: the same contents hash alike however they are laid out; any
difference in keys or values changes the hash; --from/--to hash a key range."""

from __future__ import annotations

from engine import DB, Options
from engine.cli import main
from engine.content_hash import content_hash


def lsmdb_hash(capsys, *args) -> tuple[str, int]:
    assert main([str(a) for a in args]) == 0
    digest, count, _ = capsys.readouterr().out.split()
    return digest, int(count)


def fill(path, keys, compact: bool) -> None:
    small = Options(write_buffer_size=16 << 10, target_file_size_base=8 << 10,
                    background_processes=False)
    with DB.open(path, small) as db:
        for i in keys:
            db.put(b"key%06d" % i, b"old")          # overwritten below: layout differs
        for i in keys:
            db.put(b"key%06d" % i, b"value-%d" % i)
        db.put(b"gone", b"x")
        db.delete(b"gone")
        if compact:
            db.compact_range()
            db.wait_for_compactions()


def test_layout_does_not_change_the_hash_and_contents_do(tmp_path, capsys):
    keys = list(range(3000))
    fill(tmp_path / "a", keys, compact=True)
    fill(tmp_path / "b", keys[::-1], compact=False)     # other order, memtable + L0
    with DB.open(tmp_path / "a", read_only=True) as a, DB.open(tmp_path / "b", read_only=True) as b:
        assert a.level_file_counts() != b.level_file_counts()
    a_hash = lsmdb_hash(capsys, tmp_path / "a", "hash")
    assert a_hash == lsmdb_hash(capsys, tmp_path / "b", "hash")
    assert a_hash[1] == 3000

    with DB.open(tmp_path / "b") as b:
        b.put(b"key000007", b"value-8")                  # one value differs
    assert lsmdb_hash(capsys, tmp_path / "b", "hash")[0] != a_hash[0]
    with DB.open(tmp_path / "b") as b:
        b.put(b"key000007", b"value-7")
        b.put(b"key999999", b"")                         # one key more, empty value
    assert lsmdb_hash(capsys, tmp_path / "b", "hash") != a_hash


def test_a_key_range_hashes_only_its_keys(tmp_path, capsys):
    fill(tmp_path / "a", range(100), compact=False)
    digest, count = lsmdb_hash(capsys, tmp_path / "a", "hash", "--from", "key000010",
                               "--to", "key000020")
    assert count == 10
    assert (digest, count) == content_hash((b"key%06d" % i, b"value-%d" % i)
                                           for i in range(10, 20))


def test_moving_bytes_between_key_and_value_changes_the_hash():
    assert content_hash([(b"ab", b"c")])[0] != content_hash([(b"a", b"bc")])[0]
    assert content_hash([])[1] == 0
