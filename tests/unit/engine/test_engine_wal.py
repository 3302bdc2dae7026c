"""Log framing and write-batch encoding: round trips, torn tails, corruption."""

from __future__ import annotations

import pytest

from engine.errors import Corruption
from engine.wal import LogWriter, frame, read_records
from engine.write_batch import decode_batch, encode_batch


def write_log(path, payloads):
    w = LogWriter(str(path))
    for p in payloads:
        w.add(p)
    w.close(sync=True)


def test_round_trip_and_offsets(tmp_path):
    path = tmp_path / "000001.log"
    payloads = [b"a", b"", b"x" * 70000, b"tail"]
    write_log(path, payloads)
    records = list(read_records(str(path)))
    assert [p for _, p in records] == payloads
    offsets = [o for o, _ in records]
    assert offsets[0] == 0
    assert offsets[1] == 12 + 1


@pytest.mark.parametrize("cut", [1, 5, 11, 12, 15])
def test_torn_tail_is_dropped(tmp_path, cut):
    path = tmp_path / "000001.log"
    write_log(path, [b"first", b"second-record"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - cut])
    assert [p for _, p in read_records(str(path))] == [b"first"]


def test_zero_filled_tail_is_dropped(tmp_path):
    path = tmp_path / "000001.log"
    write_log(path, [b"first"])
    with open(path, "ab") as f:
        f.write(bytes(40))
    assert [p for _, p in read_records(str(path))] == [b"first"]


def test_flipped_byte_mid_file_is_corruption(tmp_path):
    path = tmp_path / "000001.log"
    write_log(path, [b"one" * 10, b"two" * 10, b"three" * 10])
    data = bytearray(path.read_bytes())
    second = 12 + 30
    data[second + 12 + 3] ^= 0x40  # payload of the second record
    path.write_bytes(bytes(data))
    with pytest.raises(Corruption) as info:
        list(read_records(str(path)))
    assert info.value.path == str(path)
    assert info.value.offset == second
    assert "000001.log" in str(info.value)


def test_flipped_length_mid_file_is_corruption(tmp_path):
    path = tmp_path / "000001.log"
    write_log(path, [b"one" * 10, b"two" * 10, b"three" * 10])
    data = bytearray(path.read_bytes())
    data[12 + 30] ^= 0x7F  # length field of the second record
    path.write_bytes(bytes(data))
    with pytest.raises(Corruption, match="header"):
        list(read_records(str(path)))


def test_last_record_with_bad_crc_is_corruption(tmp_path):
    path = tmp_path / "000001.log"
    path.write_bytes(frame(b"ok") + bytearray(frame(b"whole-but-bad"))[:-1] + b"X")
    with pytest.raises(Corruption):
        list(read_records(str(path)))


def test_batch_round_trip():
    ops = [(b"k1", b"v1"), (b"k2", None), (b"", b""), (b"k3", b"\x00" * 300)]
    payload = encode_batch(77, ops)
    assert decode_batch("x.log", 0, payload) == (77, ops)


@pytest.mark.parametrize("damage", ["truncate", "kind", "trailing"])
def test_malformed_batch_is_corruption(damage):
    payload = bytearray(encode_batch(1, [(b"key", b"value")]))
    if damage == "truncate":
        payload = payload[:-2]
    elif damage == "kind":
        payload[12] = 9
    else:
        payload += b"!"
    with pytest.raises(Corruption, match="malformed write batch"):
        decode_batch("x.log", 40, bytes(payload))


def test_preallocated_log_reads_back_and_is_trimmed_on_close(tmp_path):
    path = tmp_path / "000001.log"
    w = LogWriter(str(path), preallocate=1 << 16)
    w.add(b"first")
    w.sync()
    assert path.stat().st_size >= 1 << 16  # zeros reserved past the record
    assert [p for _, p in read_records(str(path))] == [b"first"]
    for i in range(3000):
        w.add(b"r%d" % i)
        if i % 500 == 0:
            w.sync()
    w.close(sync=True)
    assert [p for _, p in read_records(str(path))][-1] == b"r2999"
    assert path.stat().st_size == sum(12 + len(p) for _, p in read_records(str(path)))


@pytest.mark.parametrize("written", [3, 12, 15])
def test_partly_written_record_before_zeros_is_a_torn_tail(tmp_path, written):
    path = tmp_path / "000001.log"
    record = frame(b"second-record\x00")
    path.write_bytes(frame(b"first") + record[:written] + bytes(200))
    assert [p for _, p in read_records(str(path))] == [b"first"]


def test_bad_last_record_before_zeros_is_still_corruption(tmp_path):
    path = tmp_path / "000001.log"
    bad = bytearray(frame(b"whole-record"))
    bad[14] ^= 0x01
    path.write_bytes(frame(b"first") + bytes(bad) + bytes(200))
    with pytest.raises(Corruption, match="payload"):
        list(read_records(str(path)))
