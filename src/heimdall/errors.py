"""The one exception tree of heimdall.

::

    HeimdallError
    ├── ConfigurationError          bad setting, policy file, keyring file or master key
    ├── InvalidEnvelope             malformed envelope: bad JSON, base64, field, size
    │   ├── EnvelopeTooLarge        over a hard size cap, rejected before parsing
    │   └── UnsupportedEnvelope     unknown encryption_version or algorithm
    ├── DecryptionFailed            opaque: authentication failed (tampered, wrong key or context)
    ├── KmsError                    raised by a key provider, translated at its boundary
    │   ├── KmsUnavailable          retryable: the service could not be reached or answered 5xx
    │   ├── AccessDenied            the credentials may not perform this operation
    │   ├── KeyNotFound             no such key, or no such version of it
    │   └── KeyVersionDisabled      the version exists but may not decrypt (or encrypt)
    ├── ModeViolation               the encryption mode forbids this read or write
    ├── LifecycleError              a key lifecycle change that would strand stored fields
    ├── StorageError                the store failed
    │   └── FieldNotFound           no field with that canonical key
    ├── AuditError                  the audit trail could not be written; the operation is refused
    ├── InvalidInput                a value given by the caller is not valid (never echoed back)
    └── PermissionDenied            the caller's role or request does not allow the operation

Messages are one plain sentence. No error ever carries plaintext, key material or a whole
envelope: attributes are identifiers, versions and counts only.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "AuditError",
    "AuditUnreadable",
    "ConfigurationError",
    "DecryptionFailed",
    "EnvelopeTooLarge",
    "FieldNotFound",
    "HeimdallError",
    "InvalidEnvelope",
    "InvalidInput",
    "KeyNotFound",
    "KeyVersionDisabled",
    "KmsError",
    "KmsUnavailable",
    "LifecycleError",
    "ModeViolation",
    "PermissionDenied",
    "StorageError",
    "UnsupportedEnvelope",
]


class HeimdallError(Exception):
    """Root of every error heimdall raises on purpose."""

    retryable: bool = False


class ConfigurationError(HeimdallError):
    """A setting, policy file, keyring file or master key is missing or invalid."""


class InvalidEnvelope(HeimdallError):
    """The stored envelope is not a well-formed envelope of a known version."""


class EnvelopeTooLarge(InvalidEnvelope):
    """The envelope (or one of its parts) is over a hard size cap."""


class UnsupportedEnvelope(InvalidEnvelope):
    """The envelope names an encryption_version or algorithm this build does not know."""


class DecryptionFailed(HeimdallError):
    """Authentication failed. Deliberately says nothing about why (no oracle)."""

    def __init__(self, message: str = "decryption failed") -> None:
        super().__init__(message)


class KmsError(HeimdallError):
    """A key management service refused or failed an operation."""

    def __init__(self, message: str, *, provider: str = "", key_identifier: str = "") -> None:
        super().__init__(message)
        self.provider = provider
        self.key_identifier = key_identifier


class KmsUnavailable(KmsError):
    """The service could not be reached or failed; the same call may succeed later."""

    retryable = True


class AccessDenied(KmsError):
    """The credentials in use may not perform this operation on this key."""


class KeyNotFound(KmsError):
    """The key, or the requested version of it, does not exist."""


class KeyVersionDisabled(KmsError):
    """The key version exists but is below the decryption (or encryption) floor."""

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        key_identifier: str = "",
        key_version: int = 0,
    ) -> None:
        super().__init__(message, provider=provider, key_identifier=key_identifier)
        self.key_version = key_version


class ModeViolation(HeimdallError):
    """The configured encryption mode forbids this operation (e.g. a legacy read in kms mode)."""


class LifecycleError(HeimdallError):
    """A key lifecycle change was refused because stored fields still depend on the key."""

    def __init__(self, message: str, *, dependent_fields: int = 0) -> None:
        super().__init__(message)
        self.dependent_fields = dependent_fields


class StorageError(HeimdallError):
    """The graph store failed or holds something it cannot read."""


class FieldNotFound(StorageError):
    """No stored field has this canonical key."""


class AuditError(HeimdallError):
    """The audit event could not be written, so the audited operation was refused."""


class AuditUnreadable(AuditError):
    """The audit trail could not be read (a query over it): it cannot be opened, or a line in
    it is not a record. Nothing is refused but the read; ``heimdall audit verify`` says more."""


class InvalidInput(HeimdallError):
    """A value the caller gave is not valid. The message names the rule, never the value."""


class PermissionDenied(HeimdallError):
    """The caller's role, or the request itself (e.g. a decrypt without a reason), is refused."""
