"""encfs.content: offset reads/writes, encrypted-zero gaps, truncate; encfs.fsops."""

from __future__ import annotations

import errno
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


def check_rule(fd: int, plain: bytes) -> None:
    """The backing bytes keep the holes rule for a file whose contents are ``plain``:
    each whole block is all zero (and ``plain`` is zero there) or ciphertext in full;
    the partial last block is ciphertext in full."""
    raw = _raw(fd)
    assert len(raw) == len(plain)
    cipher = CIPHER.apply(plain, 0)
    for start in range(0, len(raw), content.BLOCK):
        block = raw[start:start + content.BLOCK]
        whole = len(block) == content.BLOCK
        if whole and block == content.ZERO_BLOCK:
            assert plain[start:start + content.BLOCK] == content.ZERO_BLOCK
        else:
            assert block == cipher[start:start + content.BLOCK], f"block at {start}"


def test_a_write_far_past_the_end_leaves_a_hole(fd):
    content.write_at(fd, CIPHER, b"a", 0)
    content.write_at(fd, CIPHER, b"z", (1 << 30) + 5)
    st = os.fstat(fd)
    assert st.st_size == (1 << 30) + 6
    assert st.st_blocks * 512 <= 4 * content.BLOCK  # two blocks written, not a GiB
    assert content.read_at(fd, CIPHER, 10, 0) == b"a" + bytes(9)
    assert content.read_at(fd, CIPHER, 10, (1 << 30) - 4) == bytes(9) + b"z"
    assert content.read_at(fd, CIPHER, 3 * content.BLOCK, 1 << 29) == bytes(3 * content.BLOCK)
    # the old last block was completed with encrypted zeros, the new one holds them too
    head = os.pread(fd, content.BLOCK, 0)
    assert head == CIPHER.apply(b"a" + bytes(content.BLOCK - 1), 0)


def test_truncate_grow_and_shrink(fd):
    content.write_at(fd, CIPHER, b"abcdef", 0)
    content.truncate(fd, CIPHER, 3)
    assert content.read_at(fd, CIPHER, 100, 0) == b"abc"
    content.truncate(fd, CIPHER, 40)
    assert content.read_at(fd, CIPHER, 100, 0) == b"abc" + bytes(37)
    assert _raw(fd)[3:] != bytes(37)  # the partial last block: encrypted zeros
    content.truncate(fd, CIPHER, 1 << 40)  # a terabyte, at once
    assert os.fstat(fd).st_blocks * 512 <= 2 * content.BLOCK
    assert content.read_at(fd, CIPHER, 8, (1 << 40) - 8) == bytes(8)
    content.truncate(fd, CIPHER, 3 * content.BLOCK + 5)  # down, into a hole
    check_rule(fd, b"abc" + bytes(3 * content.BLOCK + 2))
    content.truncate(fd, CIPHER, 0)
    assert os.fstat(fd).st_size == 0


def test_sizes_the_backing_filesystem_refuses_fail_and_change_nothing(fd):
    content.write_at(fd, CIPHER, b"abc", 0)
    for length in (999999999999999999, (1 << 63) - 1):
        with pytest.raises(OSError) as exc:
            content.truncate(fd, CIPHER, length)
        assert exc.value.errno in (errno.EFBIG, errno.EINVAL)
        with pytest.raises(OSError) as exc:
            content.write_at(fd, CIPHER, b"x", length)
        assert exc.value.errno in (errno.EFBIG, errno.EINVAL)
    assert content.read_at(fd, CIPHER, 100, 0) == b"abc" and os.fstat(fd).st_size == 3


def test_writes_into_holes_fill_their_block(fd):
    B = content.BLOCK
    content.truncate(fd, CIPHER, 4 * B)  # all holes
    content.write_at(fd, CIPHER, b"mid", B + 100)  # inside a hole block
    content.write_at(fd, CIPHER, b"x" * (B + 10), 2 * B + 50)  # across two hole blocks
    plain = bytearray(4 * B)
    plain[B + 100:B + 103] = b"mid"
    plain[2 * B + 50:3 * B + 60] = b"x" * (B + 10)
    check_rule(fd, bytes(plain))
    assert content.read_at(fd, CIPHER, 4 * B, 0) == bytes(plain)
    assert os.pread(fd, B, 0) == bytes(B)  # block 0 stays a hole


def test_fallocate_modes_keep_the_rule(fd):
    B = content.BLOCK
    plain = bytearray(os.urandom(5 * B + 123))
    content.write_at(fd, CIPHER, bytes(plain), 0)
    content.fallocate(fd, CIPHER, content.FALLOC_FL_PUNCH_HOLE | content.FALLOC_FL_KEEP_SIZE,
                      B - 10, 2 * B + 20)
    plain[B - 10:3 * B + 10] = bytes(2 * B + 20)
    check_rule(fd, bytes(plain))
    assert os.pread(fd, B, B) == bytes(B)  # the whole block in between is punched
    content.fallocate(fd, CIPHER, content.FALLOC_FL_ZERO_RANGE, 4 * B + 7, 2 * B)
    plain[4 * B + 7:] = bytes(len(plain) - 4 * B - 7)
    plain.extend(bytes(6 * B + 7 - len(plain)))  # ZERO_RANGE without KEEP_SIZE grows
    check_rule(fd, bytes(plain))
    content.fallocate(fd, CIPHER, 0, 8 * B, 3 * B + 1)  # allocate past the end
    plain.extend(bytes(11 * B + 1 - len(plain)))
    check_rule(fd, bytes(plain))
    content.fallocate(fd, CIPHER, content.FALLOC_FL_KEEP_SIZE, 20 * B, B)
    assert os.fstat(fd).st_size == len(plain)
    assert content.read_at(fd, CIPHER, len(plain) + 10, 0) == bytes(plain)
    with pytest.raises(OSError) as exc:
        content.fallocate(fd, CIPHER, 0x08, 0, B)  # FALLOC_FL_COLLAPSE_RANGE
    assert exc.value.errno == errno.EOPNOTSUPP


def test_plaintext_passes_through(fd):
    content.write_at(fd, PLAINTEXT, b"xyz", 4)
    assert _raw(fd) == bytes(4) + b"xyz"
    content.truncate(fd, PLAINTEXT, 10)
    assert content.read_at(fd, PLAINTEXT, 100, 0) == bytes(4) + b"xyz" + bytes(3)


_B = content.BLOCK
_OP = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 6 * _B), st.binary(max_size=2 * _B)),
    st.tuples(st.just("truncate"), st.integers(0, 7 * _B)),
    st.tuples(st.sampled_from(["punch", "zero", "zero-keep", "alloc", "alloc-keep"]),
              st.integers(0, 6 * _B), st.integers(1, 3 * _B)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_OP, max_size=12))
def test_random_changes_match_a_model(tmp_path, ops):
    """Writes, truncations and fallocate modes in any order read back like a plain
    file, and the backing bytes keep the holes rule after every step."""
    path = tmp_path / "model"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    modes = {"punch": content.FALLOC_FL_PUNCH_HOLE | content.FALLOC_FL_KEEP_SIZE,
             "zero": content.FALLOC_FL_ZERO_RANGE,
             "zero-keep": content.FALLOC_FL_ZERO_RANGE | content.FALLOC_FL_KEEP_SIZE,
             "alloc": 0, "alloc-keep": content.FALLOC_FL_KEEP_SIZE}
    try:
        model = bytearray()
        for op in ops:
            if op[0] == "write":
                _, off, data = op
                content.write_at(fd, CIPHER, data, off)
                if data:
                    model.extend(bytes(max(0, off - len(model))))
                    model[off:off + len(data)] = data
            elif op[0] == "truncate":
                content.truncate(fd, CIPHER, op[1])
                model = model[:op[1]] + bytes(max(0, op[1] - len(model)))
            else:
                kind, off, length = op
                content.fallocate(fd, CIPHER, modes[kind], off, length)
                end = off + length
                if kind in ("punch", "zero", "zero-keep"):
                    stop = min(end, len(model))
                    if stop > off:
                        model[off:stop] = bytes(stop - off)
                if kind in ("zero", "alloc") and end > len(model):
                    model.extend(bytes(end - len(model)))
            check_rule(fd, bytes(model))
        assert content.read_at(fd, CIPHER, 10 * _B, 0) == bytes(model)
        for off in range(0, len(model), 1000):  # unaligned reads of every size
            assert content.read_at(fd, CIPHER, 1777, off) == bytes(model[off:off + 1777])
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


OTHER = FileCipher("sm4-ctr", bytes(range(100, 116)), bytes(range(50, 66)))


@pytest.mark.parametrize("size", [0, 5, 4096, 3 * 4096 + 17, 40 * 4096, 40 * 4096 + 1])
@pytest.mark.parametrize("source", ["encrypted", "plaintext"])
def test_copy_reencrypted_keeps_contents_and_holes(tmp_path, size, source):
    src_cipher = CIPHER if source == "encrypted" else PLAINTEXT
    src = os.open(tmp_path / "src", os.O_RDWR | os.O_CREAT, 0o600)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        plain = bytearray(size)
        for off in (0, 2 * 4096 + 5, 20 * 4096, size - 3):
            if 0 <= off < size:
                data = os.urandom(min(3000, size - off))
                plain[off:off + len(data)] = data
        if size:
            content.write_at(src, src_cipher, bytes(plain), 0)
        content.truncate(src, src_cipher, size)
        paced = []
        written = content.copy_reencrypted(src, src_cipher, dst, OTHER, size, paced.append)
        assert written == sum(paced) and written <= size
        assert os.fstat(dst).st_size == size
        assert content.read_at(dst, OTHER, size + 10, 0) == bytes(plain)
        raw = _raw(dst)
        cipher = OTHER.apply(bytes(plain), 0)
        for start in range(0, size, 4096):
            block = raw[start:start + 4096]
            if len(block) == 4096 and block == bytes(4096):
                assert plain[start:start + 4096] == bytes(4096)
            else:
                assert block == cipher[start:start + 4096]
        if size >= 40 * 4096:
            assert os.fstat(dst).st_blocks * 512 < size // 2  # the holes stayed holes
    finally:
        os.close(src)
        os.close(dst)


def _evict(fd: int) -> None:
    """Drop the file's clean pages from the page cache."""
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


@pytest.mark.parametrize("cipher", [CIPHER, PLAINTEXT])
def test_a_cached_only_read_never_waits_for_the_disk(fd, cipher):
    data = os.urandom(3 * content.BLOCK)
    content.write_at(fd, cipher, data, 0)
    _evict(fd)
    with pytest.raises(BlockingIOError):
        content.read_at(fd, cipher, 100, 5000, cached_only=True)
    # a read that may wait brings the block in; then the cached read serves it
    assert content.read_at(fd, cipher, 100, 5000) == data[5000:5100]
    assert content.read_at(fd, cipher, 100, 5000, cached_only=True) == data[5000:5100]
    # a read running into the end of the file is short: the caller must ask again
    with pytest.raises(BlockingIOError):
        content.read_at(fd, cipher, content.BLOCK, len(data) - 10, cached_only=True)
    assert content.read_at(fd, cipher, content.BLOCK, len(data) - 10) == data[-10:]
