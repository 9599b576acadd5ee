"""Blind index: canonical keys that find a value without decrypting anything.

A field's canonical key is ``<field>:hash:<hex HMAC-SHA256(field key, normalised value)>``, the
spec's ``email:hash:abc123``. Each field gets its own HMAC key, derived from one blind-index key,
so equal values in different fields do not link. The blind-index key is a data key generated and
wrapped by the KMS and stored, wrapped, in the store's metadata; it never comes from an
environment variable and never sits on disk in the clear. It must stay the same for the life of
the store (canonical keys depend on it): rotation rewraps it, never replaces it.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Protocol

import orjson

from heimdall.envelope import EncryptionVersion, wrap_associated_data
from heimdall.errors import ConfigurationError, StorageError
from heimdall.kms.base import KeyManagementService, WrappedKey, key_name_of
from heimdall.secret import SecretBytes

__all__ = ["META_KEY", "BlindIndex", "StoredIndexKey", "is_canonical_key"]

META_KEY = "blind_index_key"
# A field name as the policy allows it, ":hash:", and 64 hex digits of HMAC-SHA256.
_CANONICAL_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}:hash:[0-9a-f]{64}\Z", re.ASCII)
_ALGORITHM = "HMAC-SHA256"
_DERIVE = b"heimdall.blind-index.v1\x00"


class MetaStore(Protocol):
    """The part of a store the blind-index key lives in."""

    def get_meta(self, key: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class StoredIndexKey:
    """The wrapped blind-index key as kept in store metadata."""

    encryption_version: str
    key_id: str
    wrapped: WrappedKey
    created_at: str

    @property
    def associated_data(self) -> bytes:
        return wrap_associated_data(self.encryption_version, _ALGORITHM, self.key_id)

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "encryption_version": self.encryption_version,
                "key_id": self.key_id,
                "key_identifier": self.wrapped.key_identifier,
                "key_version": self.wrapped.key_version,
                "wrapped_key": binascii.b2a_base64(self.wrapped.ciphertext, newline=False).decode(),
                "created_at": self.created_at,
            }
        ).decode()

    @classmethod
    def from_json(cls, text: str) -> StoredIndexKey:
        try:
            doc = orjson.loads(text)
            return cls(
                encryption_version=EncryptionVersion(doc["encryption_version"]).value,
                key_id=str(doc["key_id"]),
                wrapped=WrappedKey(
                    str(doc["key_identifier"]),
                    int(doc["key_version"]),
                    binascii.a2b_base64(doc["wrapped_key"], strict_mode=True),
                ),
                created_at=str(doc["created_at"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error):
            raise StorageError("the stored blind-index key is damaged") from None

    @classmethod
    def stored_in(cls, store: MetaStore) -> StoredIndexKey | None:
        """The key *store* keeps, if it has one yet."""
        text = store.get_meta(META_KEY)
        return None if text is None else cls.from_json(text)

    @property
    def is_legacy(self) -> bool:
        """Wrapped by the static env key (migrated to the KMS with the legacy fields)."""
        return self.encryption_version == EncryptionVersion.LEGACY.value

    def wrapped_below(self, version: int, key_name: str) -> bool:
        """Wrapped by the KMS under a version of *key_name* below *version*."""
        return (
            self.encryption_version == EncryptionVersion.KMS_V1.value
            and key_name_of(self.wrapped.key_identifier) == key_name
            and self.wrapped.key_version < version
        )

    def outdated(self, version: int, key_name: str) -> bool:
        """Wrapped by the KMS, but not under *key_name* at *version* or above: under a lower
        version of it, or under another key (another provider's)."""
        return self.encryption_version == EncryptionVersion.KMS_V1.value and (
            key_name_of(self.wrapped.key_identifier) != key_name
            or self.wrapped.key_version < version
        )

    def with_wrapped(self, encryption_version: str, wrapped: WrappedKey) -> StoredIndexKey:
        return StoredIndexKey(encryption_version, self.key_id, wrapped, self.created_at)

    @classmethod
    def generate(
        cls, kms: KeyManagementService, encryption_version: str, created_at: str
    ) -> tuple[StoredIndexKey, SecretBytes]:
        key_id = secrets.token_hex(16)
        ad = wrap_associated_data(encryption_version, _ALGORITHM, key_id)
        data_key = kms.generate_data_key(ad)
        return cls(encryption_version, key_id, data_key.wrapped, created_at), data_key.plaintext


def is_canonical_key(text: object) -> bool:
    """Whether *text* has the form of a canonical key (not whether it is stored)."""
    return isinstance(text, str) and _CANONICAL_KEY.match(text) is not None


class BlindIndex:
    """Computes canonical keys. Holds the blind-index key; call :meth:`wipe` when done."""

    __slots__ = ("_field_keys", "_key")

    def __init__(self, key: SecretBytes) -> None:
        if len(key) != 32:
            raise ConfigurationError("the blind-index key must be 32 bytes")
        self._key = key
        self._field_keys: dict[str, bytes] = {}

    def _field_key(self, field_name: str) -> bytes:
        key = self._field_keys.get(field_name)
        if key is None:
            key = hmac.digest(self._key.view(), _DERIVE + field_name.encode(), hashlib.sha256)
            self._field_keys[field_name] = key
        return key

    def canonical_key(self, field_name: str, normalised_value: str) -> str:
        digest = hmac.digest(
            self._field_key(field_name), normalised_value.encode("utf-8"), hashlib.sha256
        )
        return f"{field_name}:hash:{digest.hex()}"

    def wipe(self) -> None:
        self._field_keys.clear()
        self._key.wipe()

    def __repr__(self) -> str:
        return "BlindIndex(<key redacted>)"
