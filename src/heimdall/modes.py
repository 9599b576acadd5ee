"""Encryption modes: which cipher writes new fields and which stored fields may be read.

spec: Migration Strategy, Phase 3 (``HMD_ENCRYPTION_MODE=legacy|kms|hybrid``) and Phase 5.

=========  ===================  ==========================================================
mode       writes               reads
=========  ===================  ==========================================================
legacy     legacy (env key)     legacy, and kms_v1 where a KMS is configured (rollback)
hybrid     kms_v1               legacy and kms_v1 (the migration period)
kms        kms_v1               kms_v1 only; a legacy field is refused with the way to migrate it
=========  ===================  ==========================================================
"""

from __future__ import annotations

from heimdall.cipher import FieldCipher
from heimdall.envelope import EncryptionVersion
from heimdall.errors import ConfigurationError, ModeViolation
from heimdall.types import EncryptionMode

__all__ = ["MIGRATE_HINT", "CipherRouter"]

MIGRATE_HINT = (
    "keep HMD_MASTER_KEY set and run `heimdall migrate start` to move legacy fields to the KMS"
)


class CipherRouter:
    """Picks the cipher for a write and checks that the mode allows a read."""

    def __init__(
        self,
        mode: EncryptionMode,
        *,
        kms: FieldCipher | None,
        legacy: FieldCipher | None,
    ) -> None:
        if mode is EncryptionMode.LEGACY and legacy is None:
            raise ConfigurationError("HMD_ENCRYPTION_MODE=legacy needs HMD_MASTER_KEY")
        if mode is EncryptionMode.HYBRID and legacy is None:
            raise ConfigurationError(
                "HMD_ENCRYPTION_MODE=hybrid reads legacy fields and needs HMD_MASTER_KEY"
            )
        if mode is not EncryptionMode.LEGACY and kms is None:
            raise ConfigurationError(f"HMD_ENCRYPTION_MODE={mode.value} needs a KMS provider")
        self.mode = mode
        self._kms = kms
        self._legacy = legacy if mode is not EncryptionMode.KMS else None

    @property
    def writer(self) -> FieldCipher:
        cipher = self._legacy if self.mode is EncryptionMode.LEGACY else self._kms
        assert cipher is not None  # guaranteed by __init__
        return cipher

    @property
    def kms(self) -> FieldCipher | None:
        return self._kms

    @property
    def legacy(self) -> FieldCipher | None:
        return self._legacy

    def require_kms(self, operation: str) -> FieldCipher:
        """The KMS cipher, or ModeViolation naming *operation* (legacy mode without a key
        provider has none)."""
        if self._kms is None:
            raise ModeViolation(
                f"{operation} needs a KMS provider; legacy mode without one has none"
            )
        return self._kms

    def reader(self, encryption_version: str) -> FieldCipher:
        """The cipher that may decrypt a field of *encryption_version*, or ModeViolation."""
        if encryption_version == EncryptionVersion.KMS_V1.value:
            if self._kms is None:
                raise ConfigurationError("this field is KMS-encrypted and no KMS is configured")
            return self._kms
        if encryption_version == EncryptionVersion.LEGACY.value:
            if self.mode is EncryptionMode.KMS:
                raise ModeViolation(f"legacy fields are refused in kms mode; {MIGRATE_HINT}")
            assert self._legacy is not None
            return self._legacy
        raise ModeViolation(f"unknown encryption_version {encryption_version!r}")

    def forget_keys(self) -> None:
        for cipher in (self._kms, self._legacy):
            if cipher is not None:
                cipher.forget_keys()
