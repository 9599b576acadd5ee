"""Envelope encrypt/decrypt through FieldCipher on the local keyring, and the raw AES-GCM floor.

Every field has its own EncryptionContext ("FieldValue", "email:hash:<64 hex>", "email"), built
inside the timed loop because the application builds one per field. Values are 40-byte e-mail
addresses. Envelopes for the decrypt rows, and the nonces/ciphertexts for the floor decrypt row,
are made before the timed loop.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.timing import Run, Stopwatch
from heimdall.cipher import CachePolicy, FieldCipher, SealedField
from heimdall.envelope import ALGORITHM, EncryptionContext, EncryptionVersion, data_associated_data
from heimdall.kms.local import LocalKeyring
from heimdall.service import FIELD_LABEL

__all__ = [
    "VALUE_BYTES",
    "Corpus",
    "decrypt_run",
    "encrypt_run",
    "floor_decrypt_run",
    "floor_encrypt_run",
    "floor_seal_all",
    "make_corpus",
    "new_keyring",
    "seal_all",
]

FIELD_NAME = "email"
VALUE_BYTES = 40
VERSION = EncryptionVersion.KMS_V1


@dataclass(frozen=True, slots=True)
class Corpus:
    """The fields of one run: plaintexts, their canonical keys, and floor associated data."""

    values: tuple[bytes, ...]
    canonical_keys: tuple[str, ...]
    # Same bytes heimdall binds for each field (header prefix, timestamp, context), so the floor
    # authenticates associated data of the real size (about 200 bytes).
    floor_ads: tuple[bytes, ...]

    def __len__(self) -> int:
        return len(self.values)


def make_corpus(count: int) -> Corpus:
    values: list[bytes] = []
    keys: list[str] = []
    ads: list[bytes] = []
    dek_id = "0" * 32
    for i in range(count):
        value = f"bench.person.{i:015d}@example.com".encode()
        assert len(value) == VALUE_BYTES
        key = f"{FIELD_NAME}:hash:{hashlib.sha256(value).hexdigest()}"
        context = EncryptionContext(FIELD_LABEL, key, FIELD_NAME)
        values.append(value)
        keys.append(key)
        ads.append(
            data_associated_data(VERSION.value, ALGORITHM, dek_id, "2026-01-01T00:00:00Z", context)
        )
    return Corpus(tuple(values), tuple(keys), tuple(ads))


def new_keyring(directory: Path) -> LocalKeyring:
    return LocalKeyring(directory / "keyring.json")


# -- envelope encryption ----------------------------------------------------------------------


def encrypt_run(keyring: LocalKeyring, corpus: Corpus, cache: CachePolicy) -> Run:
    """One run over the corpus with a fresh cipher (so the first field generates a data key)."""
    cipher = FieldCipher(keyring, VERSION, cache)
    encrypt = cipher.encrypt
    sealed: list[SealedField] = []
    append = sealed.append
    with Stopwatch() as clock:
        for value, key in zip(corpus.values, corpus.canonical_keys, strict=True):
            append(encrypt(value, EncryptionContext(FIELD_LABEL, key, FIELD_NAME)))
    return clock.run(cipher.kms_calls)


def seal_all(keyring: LocalKeyring, corpus: Corpus, cache: CachePolicy) -> tuple[str, ...]:
    """Envelopes for the decrypt rows (untimed)."""
    cipher = FieldCipher(keyring, VERSION, cache)
    return tuple(
        cipher.encrypt(value, EncryptionContext(FIELD_LABEL, key, FIELD_NAME)).envelope
        for value, key in zip(corpus.values, corpus.canonical_keys, strict=True)
    )


# -- envelope decryption ----------------------------------------------------------------------


def decrypt_run(keyring: LocalKeyring, corpus: Corpus, envelopes: tuple[str, ...]) -> Run:
    """One run with a fresh cipher and the default CachePolicy (cold unwrapped-key cache)."""
    cipher = FieldCipher(keyring, VERSION, CachePolicy())
    decrypt = cipher.decrypt
    plaintexts: list[bytes] = []
    append = plaintexts.append
    with Stopwatch() as clock:
        for envelope, key in zip(envelopes, corpus.canonical_keys, strict=True):
            append(decrypt(envelope, EncryptionContext(FIELD_LABEL, key, FIELD_NAME)))
    if tuple(plaintexts) != corpus.values:
        raise AssertionError("envelope decrypt returned wrong plaintexts")
    return clock.run(cipher.kms_calls)


# -- the floor: raw AES-256-GCM, one fixed key ------------------------------------------------


def floor_encrypt_run(aead: AESGCM, corpus: Corpus) -> Run:
    urandom = os.urandom
    encrypt = aead.encrypt
    sealed: list[tuple[bytes, bytes]] = []
    append = sealed.append
    with Stopwatch() as clock:
        for value, ad in zip(corpus.values, corpus.floor_ads, strict=True):
            nonce = urandom(12)
            append((nonce, encrypt(nonce, value, ad)))
    return clock.run()


def floor_seal_all(aead: AESGCM, corpus: Corpus) -> tuple[tuple[bytes, bytes], ...]:
    out = []
    for value, ad in zip(corpus.values, corpus.floor_ads, strict=True):
        nonce = os.urandom(12)
        out.append((nonce, aead.encrypt(nonce, value, ad)))
    return tuple(out)


def floor_decrypt_run(aead: AESGCM, corpus: Corpus, sealed: tuple[tuple[bytes, bytes], ...]) -> Run:
    decrypt = aead.decrypt
    plaintexts: list[bytes] = []
    append = plaintexts.append
    with Stopwatch() as clock:
        for (nonce, ciphertext), ad in zip(sealed, corpus.floor_ads, strict=True):
            append(decrypt(nonce, ciphertext, ad))
    if tuple(plaintexts) != corpus.values:
        raise AssertionError("AES-GCM decrypt returned wrong plaintexts")
    return clock.run()
