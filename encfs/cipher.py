"""Per-file content ciphers: a method, a data key and an IV, applied at any byte offset.

All methods are counter mode (or the identity), so encryption and decryption are the
same operation and sizes are unchanged. The counter block for byte offset ``o`` is
``(IV + o // 16) mod 2**128`` as a big-endian 128-bit integer, and ``o % 16`` bytes of
that block's keystream are skipped. Because of this, any byte range can be encrypted
on its own and the result equals the same range of the whole file encrypted at once.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

METHODS: tuple[str, ...] = ("aes-256-ctr", "aes-192-ctr", "aes-128-ctr", "sm4-ctr", "plaintext")
DEFAULT_METHOD = "aes-256-ctr"

# data key length in bytes of each method
KEY_SIZES: dict[str, int] = {
    "aes-256-ctr": 32,
    "aes-192-ctr": 24,
    "aes-128-ctr": 16,
    "sm4-ctr": 16,
    "plaintext": 0,
}
IV_SIZE = 16
BLOCK = 16
_MASK = (1 << 128) - 1
_SKIP = [bytes(n) for n in range(BLOCK)]


def check_method(method: str) -> str:
    """Return ``method`` if tdefs knows it, else raise ValueError naming the choices."""
    if method not in KEY_SIZES:
        raise ValueError(f"unknown cipher method {method!r} (choose from {', '.join(METHODS)})")
    return method


class FileCipher:
    """The content cipher of one file. Immutable; safe to share between threads."""

    __slots__ = ("method", "key", "iv", "is_plaintext", "_algorithm", "_iv_int")

    def __init__(self, method: str, key: bytes = b"", iv: bytes = b"") -> None:
        check_method(method)
        self.method = method
        self.is_plaintext = method == "plaintext"
        if self.is_plaintext:
            self.key = b""
            self.iv = b""
            self._algorithm = None
            self._iv_int = 0
            return
        if len(key) != KEY_SIZES[method]:
            raise ValueError(f"{method} needs a {KEY_SIZES[method]}-byte key, got {len(key)}")
        if len(iv) != IV_SIZE:
            raise ValueError(f"the IV must be {IV_SIZE} bytes, got {len(iv)}")
        self.key = bytes(key)
        self.iv = bytes(iv)
        # the algorithm object is built once; apply() only builds the mode and context
        self._algorithm = algorithms.SM4(self.key) if method == "sm4-ctr" else algorithms.AES(self.key)
        self._iv_int = int.from_bytes(self.iv, "big")

    def apply(self, data: bytes | bytearray | memoryview, offset: int) -> bytes:
        """Encrypt or decrypt ``data`` that sits at byte ``offset`` of the file."""
        if self._algorithm is None:
            return bytes(data)
        if offset < 0:
            raise ValueError("offset must be >= 0")
        block, skip = divmod(offset, BLOCK)
        counter = ((self._iv_int + block) & _MASK).to_bytes(BLOCK, "big")
        ctx = Cipher(self._algorithm, modes.CTR(counter)).encryptor()
        if skip:
            ctx.update(_SKIP[skip])
        return ctx.update(data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileCipher):
            return NotImplemented
        return (self.method, self.key, self.iv) == (other.method, other.key, other.iv)

    def __hash__(self) -> int:
        return hash((self.method, self.key, self.iv))

    def __repr__(self) -> str:
        # never print key material
        return f"FileCipher({self.method!r}, iv={self.iv.hex()!r})"


PLAINTEXT = FileCipher("plaintext")
