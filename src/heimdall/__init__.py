"""heimdall: envelope encryption of PII fields under keys held in a key management service.

The public API: settings and composition (:func:`build`), the service and its operations, the
envelope format, the key provider interface, and the exception tree.
"""

# ruff: noqa: E402 - every other import comes after the environment's secrets are taken

# First, before any library is imported: see heimdall.secret.take_environment_secrets.
from heimdall.secret import take_environment_secrets

take_environment_secrets()

from heimdall.app import build
from heimdall.cipher import CachePolicy, FieldCipher, SealedField
from heimdall.envelope import EncryptionContext, EncryptionVersion, Envelope, parse
from heimdall.errors import (
    AccessDenied,
    AuditError,
    AuditUnreadable,
    ConfigurationError,
    DecryptionFailed,
    EnvelopeTooLarge,
    FieldNotFound,
    HeimdallError,
    InvalidEnvelope,
    InvalidInput,
    KeyNotFound,
    KeyVersionDisabled,
    KmsError,
    KmsUnavailable,
    LifecycleError,
    ModeViolation,
    PermissionDenied,
    StorageError,
    UnsupportedEnvelope,
)
from heimdall.ingest import IngestReport, ingest_lines
from heimdall.kms.base import KeyDescription, KeyManagementService, KeyState, WrappedKey
from heimdall.policy import FieldAction, Policy
from heimdall.rbac import Caller, Role
from heimdall.reencrypt import ReencryptReport, reencrypt
from heimdall.service import Heimdall
from heimdall.settings import Settings
from heimdall.types import EncryptionMode

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AuditError",
    "AuditUnreadable",
    "CachePolicy",
    "Caller",
    "ConfigurationError",
    "DecryptionFailed",
    "EncryptionContext",
    "EncryptionMode",
    "EncryptionVersion",
    "Envelope",
    "EnvelopeTooLarge",
    "FieldAction",
    "FieldCipher",
    "FieldNotFound",
    "Heimdall",
    "HeimdallError",
    "IngestReport",
    "InvalidEnvelope",
    "InvalidInput",
    "KeyDescription",
    "KeyManagementService",
    "KeyNotFound",
    "KeyState",
    "KeyVersionDisabled",
    "KmsError",
    "KmsUnavailable",
    "LifecycleError",
    "ModeViolation",
    "PermissionDenied",
    "Policy",
    "ReencryptReport",
    "Role",
    "SealedField",
    "Settings",
    "StorageError",
    "UnsupportedEnvelope",
    "WrappedKey",
    "__version__",
    "build",
    "ingest_lines",
    "parse",
    "reencrypt",
]
