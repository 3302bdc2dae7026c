"""encfs.content: offset reads/writes, encrypted-zero gaps, truncate; encfs.fsops."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encfs import content
from encfs.cipher import PLAINTEXT, FileCipher
from encfs.fsops import RENAME_EXCHANGE, RENAME_NOREPLACE, atomic_replace, fsync_dir, renameat2

CIPHER = FileCipher("aes-256-ctr", bytes(range(32)), bytes(range(16, 32)))


@pytest.fixture
def fd(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


def _raw(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size + 1, 0)


def test_write_then_read_round_trip_and_ciphertext_on_disk(fd):
    assert content.write_at(fd, CIPHER, b"hello world", 5) == 11
    raw = _raw(fd)
    assert len(raw) == 16
    assert b"hello" not in raw
    assert raw == CIPHER.apply(bytes(5) + b"hello world", 0)
    assert content.read_at(fd, CIPHER, 100, 0) == bytes(5) + b"hello world"
    assert content.read_at(fd, CIPHER, 4, 7) == b"llo "
    assert content.read_at(fd, CIPHER, 10, 16) == b""


def test_gap_past_eof_reads_as_zeros_even_across_chunks(fd, monkeypatch):
    monkeypatch.setattr(content, "GAP_CHUNK", 1000)
    monkeypatch.setattr(content, "_ZEROS", bytes(1000))
    content.write_at(fd, CIPHER, b"a", 0)
    content.write_at(fd, CIPHER, b"z", 5001)
    assert content.read_at(fd, CIPHER, 6000, 0) == b"a" + bytes(5000) + b"z"
    assert _raw(fd) == CIPHER.apply(b"a" + bytes(5000) + b"z", 0)


def test_truncate_grow_and_shrink(fd):
    content.write_at(fd, CIPHER, b"abcdef", 0)
    content.truncate(fd, CIPHER, 3)
    assert content.read_at(fd, CIPHER, 100, 0) == b"abc"
    content.truncate(fd, CIPHER, 40)
    assert content.read_at(fd, CIPHER, 100, 0) == b"abc" + bytes(37)
    assert _raw(fd)[3:] != bytes(37)  # encrypted zeros, not holes
    content.truncate(fd, CIPHER, 0)
    assert os.fstat(fd).st_size == 0


def test_plaintext_passes_through(fd):
    content.write_at(fd, PLAINTEXT, b"xyz", 4)
    assert _raw(fd) == bytes(4) + b"xyz"
    content.truncate(fd, PLAINTEXT, 10)
    assert content.read_at(fd, PLAINTEXT, 100, 0) == bytes(4) + b"xyz" + bytes(3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.integers(0, 3000), st.binary(max_size=300)), max_size=15),
       cut=st.integers(0, 4000))
def test_random_writes_match_a_model(tmp_path, ops, cut):
    path = tmp_path / "model"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        model = bytearray()
        for off, data in ops:
            content.write_at(fd, CIPHER, data, off)
            if data:
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + len(data)] = data
        content.truncate(fd, CIPHER, cut)
        model = model[:cut] + bytes(max(0, cut - len(model)))
        assert content.read_at(fd, CIPHER, 10000, 0) == bytes(model)
        assert _raw(fd) == CIPHER.apply(bytes(model), 0)
    finally:
        os.close(fd)


def test_renameat2_flags(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    with pytest.raises(FileExistsError):
        renameat2(a, b, RENAME_NOREPLACE)
    renameat2(str(a), str(b), RENAME_EXCHANGE)
    assert (a.read_bytes(), b.read_bytes()) == (b"B", b"A")
    renameat2(os.fsencode(a), os.fsencode(b), 0)
    assert not a.exists() and b.read_bytes() == b"B"
    with pytest.raises(FileNotFoundError):
        renameat2(a, tmp_path / "c", RENAME_NOREPLACE)


def test_atomic_replace_and_fsync_dir(tmp_path):
    target = tmp_path / "meta"
    atomic_replace(target, b"one", "keys.replace")
    atomic_replace(target, b"two", "keys.replace")
    assert target.read_bytes() == b"two"
    assert oct(target.stat().st_mode & 0o777) == oct(0o600)
    assert not (tmp_path / "meta.tmp").exists()
    fsync_dir(tmp_path)
