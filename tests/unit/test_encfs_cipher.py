"""Known-answer and property tests of encfs.cipher."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from encfs.cipher import DEFAULT_METHOD, KEY_SIZES, METHODS, PLAINTEXT, FileCipher

# NIST SP 800-38A, appendix F.5 (CTR-AESxxx.Encrypt): one plaintext, one counter block
NIST_IV = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
NIST_PLAIN = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a"
    "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef"
    "f69f2445df4f9b17ad2b417be66c3710"
)
NIST_VECTORS = [
    (
        "aes-128-ctr",
        "2b7e151628aed2a6abf7158809cf4f3c",
        "874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff"
        "5ae4df3edbd5d35e5b4f09020db03eab1e031dda2fbe03d1792170a0f3009cee",
    ),
    (
        "aes-192-ctr",
        "8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b",
        "1abc932417521ca24f2b0459fe7e6e0b090339ec0aa6faefd5ccc2c6f4ce8e94"
        "1e36b26bd1ebc670d1bd1d665620abf74f78a7f6d29809585a97daec58c6b050",
    ),
    (
        "aes-256-ctr",
        "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
        "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
        "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6",
    ),
]

# GB/T 32907-2016 example 1 (also in RFC 8998): SM4 of the key under itself
SM4_KEY = bytes.fromhex("0123456789abcdeffedcba9876543210")
SM4_ECB_OUT = bytes.fromhex("681edf34d206965e86b3e94f536e4246")


@pytest.mark.parametrize("method,key,expected", NIST_VECTORS)
def test_nist_sp800_38a_ctr(method, key, expected):
    cipher = FileCipher(method, bytes.fromhex(key), NIST_IV)
    assert cipher.apply(NIST_PLAIN, 0).hex() == expected
    # CTR: the same operation decrypts
    assert cipher.apply(bytes.fromhex(expected), 0) == NIST_PLAIN


@pytest.mark.parametrize("method,key,expected", NIST_VECTORS)
def test_nist_vectors_from_any_offset(method, key, expected):
    cipher = FileCipher(method, bytes.fromhex(key), NIST_IV)
    ct = bytes.fromhex(expected)
    for start in (1, 15, 16, 17, 33, 63):
        assert cipher.apply(NIST_PLAIN[start:], start) == ct[start:]


def test_sm4_reference_vector_as_ctr_keystream():
    # With a zero plaintext, CTR output is E(counter); counter = IV at offset 0, so the
    # GB/T 32907 ECB vector (plaintext == key) is the first keystream block.
    cipher = FileCipher("sm4-ctr", SM4_KEY, SM4_KEY)
    assert cipher.apply(bytes(16), 0) == SM4_ECB_OUT
    assert cipher.apply(SM4_ECB_OUT, 0) == bytes(16)


def test_sm4_second_block_is_next_counter():
    cipher = FileCipher("sm4-ctr", SM4_KEY, SM4_KEY)
    nxt = (int.from_bytes(SM4_KEY, "big") + 1).to_bytes(16, "big")
    ecb = Cipher(algorithms.SM4(SM4_KEY), modes.ECB()).encryptor()
    assert ecb.update(SM4_KEY) == SM4_ECB_OUT  # the reference vector through ECB
    assert cipher.apply(bytes(32), 0)[16:] == ecb.update(nxt)


def _reference_ctr(method: str, key: bytes, iv: bytes, data: bytes, offset: int) -> bytes:
    """Counter mode written out block by block from ECB, independent of FileCipher."""
    alg = algorithms.SM4(key) if method == "sm4-ctr" else algorithms.AES(key)
    ecb = Cipher(alg, modes.ECB()).encryptor()
    out = bytearray()
    base = int.from_bytes(iv, "big")
    for i, b in enumerate(data):
        pos = offset + i
        block = ((base + pos // 16) % (1 << 128)).to_bytes(16, "big")
        out.append(b ^ ecb.update(block)[pos % 16])
    return bytes(out)


ENCRYPTED = [m for m in METHODS if m != "plaintext"]


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(ENCRYPTED),
    seed=st.binary(min_size=48, max_size=48),
    data=st.binary(min_size=0, max_size=300),
    offset=st.integers(min_value=0, max_value=1 << 40),
)
def test_matches_reference_ctr(method, seed, data, offset):
    key = seed[: KEY_SIZES[method]]
    iv = seed[32:48]
    assert FileCipher(method, key, iv).apply(data, offset) == _reference_ctr(
        method, key, iv, data, offset
    )


@settings(max_examples=100, deadline=None)
@given(
    method=st.sampled_from(ENCRYPTED),
    seed=st.binary(min_size=48, max_size=48),
    data=st.binary(min_size=1, max_size=2000),
    base=st.integers(min_value=0, max_value=1 << 50),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_pieces_equal_whole_and_decrypt_back(method, seed, data, base, cuts):
    cipher = FileCipher(method, seed[: KEY_SIZES[method]], seed[32:48])
    whole = cipher.apply(data, base)
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [
        cipher.apply(memoryview(data)[a:b], base + a) for a, b in zip(points, points[1:], strict=False)
    ]
    assert b"".join(pieces) == whole
    assert cipher.apply(whole, base) == data
    if len(data) >= 16:
        assert whole != data  # a keystream of all zeros would be a broken cipher


@settings(max_examples=30, deadline=None)
@given(method=st.sampled_from(ENCRYPTED), back=st.integers(min_value=1, max_value=40),
       data=st.binary(min_size=1, max_size=1000))
def test_counter_wraps_at_2_128(method, back, data):
    key = bytes(range(KEY_SIZES[method]))
    iv_int = (1 << 128) - back
    cipher = FileCipher(method, key, iv_int.to_bytes(16, "big"))
    zero_iv = FileCipher(method, key, bytes(16))
    # block `back` of the wrapping file uses counter 0, like block 0 of a zero-IV file
    start = back * 16
    assert cipher.apply(data, start) == zero_iv.apply(data, 0)
    assert cipher.apply(data, 0) == _reference_ctr(method, key, cipher.iv, data, 0)


def test_plaintext_is_identity_and_default_is_aes256():
    assert PLAINTEXT.is_plaintext
    assert PLAINTEXT.apply(memoryview(b"abc"), 99) == b"abc"
    assert DEFAULT_METHOD == "aes-256-ctr"
    assert set(METHODS) == {"aes-256-ctr", "aes-192-ctr", "aes-128-ctr", "sm4-ctr", "plaintext"}


def test_rejects_bad_key_iv_and_method_and_hides_key():
    with pytest.raises(ValueError):
        FileCipher("aes-256-ctr", bytes(16), bytes(16))
    with pytest.raises(ValueError):
        FileCipher("aes-128-ctr", bytes(16), bytes(8))
    with pytest.raises(ValueError):
        FileCipher("rot13", b"", b"")
    assert (b"k" * 16).hex() not in repr(FileCipher("aes-128-ctr", b"k" * 16, bytes(16)))
