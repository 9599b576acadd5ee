"""AES-256-GCM: the only module that touches the cipher.

Every ciphertext this module makes is ``nonce (12 bytes) || ciphertext || tag (16 bytes)`` with a
fresh random 96-bit nonce. Random nonces are safe for up to 2**32 messages under one key
(NIST SP 800-38D, 8.3); data keys are retired far below that by the data key cache's use limit.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from heimdall.errors import DecryptionFailed
from heimdall.secret import SecretBytes, wipe_buffer

__all__ = ["KEY_SIZE", "NONCE_SIZE", "OVERHEAD", "TAG_SIZE", "Aead"]

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE


class Aead:
    """AES-256-GCM under one key, with random nonces. Holds the key inside OpenSSL only."""

    __slots__ = ("_cipher",)

    def __init__(self, key: bytes | bytearray) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._cipher = AESGCM(key)

    def encrypt(self, plaintext: bytes | bytearray, associated_data: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._cipher.encrypt(nonce, plaintext, associated_data)

    def decrypt(self, sealed: bytes, associated_data: bytes) -> bytes:
        """Open ``nonce || ciphertext || tag``; any failure is one opaque DecryptionFailed."""
        if len(sealed) < OVERHEAD:
            raise DecryptionFailed()
        try:
            return self._cipher.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], associated_data)
        except InvalidTag:
            raise DecryptionFailed() from None

    def decrypt_secret(self, sealed: bytes, associated_data: bytes) -> SecretBytes:
        """Open a sealed key straight into a wipeable buffer (no immutable copy is made)."""
        if len(sealed) < OVERHEAD:
            raise DecryptionFailed()
        buffer = bytearray(len(sealed) - OVERHEAD)
        try:
            self._cipher.decrypt_into(
                sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], associated_data, buffer
            )
        except InvalidTag:
            wipe_buffer(buffer)
            raise DecryptionFailed() from None
        return SecretBytes.adopt(buffer)

    def __repr__(self) -> str:
        return "Aead(<AES-256-GCM, key redacted>)"
