"""The legacy provider: the static master key injected as HMD_MASTER_KEY.

spec: Background, Current State. This is what heimdall replaces; it exists so data written under
the env key stays readable during migration (hybrid mode) and can be re-encrypted under a KMS.
It has one version and cannot rotate. Its key identifier carries a fingerprint of the key (an
HMAC, not the key), so a field written under a different master key is reported as such instead
of failing as a generic decryption error.
"""

from __future__ import annotations

import hashlib
import hmac

from heimdall.aead import KEY_SIZE, Aead
from heimdall.errors import ConfigurationError, LifecycleError
from heimdall.kms.base import DataKey, KeyDescription, KeyState, WrappedKey
from heimdall.kms.keyset import Keyset, KeysetVersion
from heimdall.kms.provider import KeyProvider
from heimdall.secret import SecretBytes

__all__ = ["LegacyMasterKey", "parse_master_key"]

_DOMAIN = b"heimdall.legacy-master-key.v1\x00"
_NOT_ROTATABLE = (
    "the legacy HMD_MASTER_KEY cannot rotate; migrate its fields to the KMS with "
    "HMD_ENCRYPTION_MODE=hybrid and `heimdall reencrypt`"
)


def parse_master_key(value: str | SecretBytes) -> SecretBytes:
    """Decode HMD_MASTER_KEY (base64 of exactly 32 bytes, surrounding whitespace ignored)
    into a new wipeable buffer, leaving no other copy of the key behind. The message never
    echoes the value."""
    text: str | memoryview = memoryview(value.view()) if isinstance(value, SecretBytes) else value
    start, end = 0, len(text)
    while start < end and _is_space(text[start]):
        start += 1
    while end > start and _is_space(text[end - 1]):
        end -= 1
    try:
        raw = SecretBytes.from_base64(text[start:end])
    except ValueError:
        raise ConfigurationError("HMD_MASTER_KEY is not valid base64") from None
    finally:
        if isinstance(text, memoryview):
            text.release()
    if len(raw) != KEY_SIZE:
        size = len(raw)
        raw.wipe()
        raise ConfigurationError(f"HMD_MASTER_KEY must decode to 32 bytes, not {size}")
    return raw


def _is_space(item: str | int) -> bool:
    return (chr(item) if isinstance(item, int) else item) in " \t\r\n"


class LegacyMasterKey(KeyProvider):
    """The key provider over one static master key (encryption_version "legacy")."""

    provider = "legacy"

    def __init__(self, master_key: SecretBytes) -> None:
        # Never observed: the env key is not a key management service, and its "calls" are
        # local AES-GCM operations.
        super().__init__()
        fingerprint = hmac.digest(master_key.view(), b"heimdall.legacy-key-id", hashlib.sha256)
        self._keyset = Keyset(
            provider=self.provider,
            domain=_DOMAIN,
            name=f"hmd-master-key-{fingerprint[:4].hex()}",
            versions={1: KeysetVersion(1, KeyState.ACTIVE, "", Aead(master_key.view()))},
        )
        master_key.wipe()

    @property
    def key_name(self) -> str:
        return self._keyset.name

    def owns(self, key_identifier: str) -> bool:
        return self._keyset.owns(key_identifier)

    def _foreign(self, key_identifier: str) -> str:
        return self._keyset.foreign(key_identifier)

    def _generate_data_key(self, associated_data: bytes) -> DataKey:
        return self._keyset.generate_data_key(associated_data)

    def _wrap_one(self, plaintext: SecretBytes, associated_data: bytes) -> WrappedKey:
        return self._keyset.wrap(plaintext, associated_data)

    def _unwrap_one(self, wrapped: WrappedKey, associated_data: bytes) -> SecretBytes:
        return self._keyset.unwrap(wrapped, associated_data)

    def _rewrap_one(self, wrapped: WrappedKey, associated_data: bytes) -> WrappedKey:
        return self._keyset.rewrap(wrapped, associated_data)

    def _rotate(self) -> KeyDescription:
        raise LifecycleError(_NOT_ROTATABLE)

    def _set_min_decryption_version(self, version: int) -> KeyDescription:
        raise LifecycleError(_NOT_ROTATABLE)

    def _set_min_encryption_version(self, version: int) -> KeyDescription:
        raise LifecycleError(_NOT_ROTATABLE)

    def _describe(self) -> KeyDescription:
        return self._keyset.describe()

    def __repr__(self) -> str:
        return f"LegacyMasterKey(key_name={self._keyset.name!r})"
