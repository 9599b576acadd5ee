"""The interfaces key providers implement.

spec: Migration Strategy, Phase 2 (the ``KeyManagementService`` trait). A provider holds the
master key (the key-encryption key) and wraps, unwraps and rewraps data keys under it; data itself
is encrypted locally by :mod:`heimdall.cipher` (pattern A). A :class:`WrappedKey` only ever holds
a wrapped data key.

A provider that can also encrypt field values itself (pattern B, the envelope algorithm
``KMS-DIRECT``) implements :class:`DirectEncryption` as well; its results are
:class:`DirectCiphertext`, never a WrappedKey. Vault Transit does, and it is the only provider
the settings offer pattern B with; the local keyring does too, so pattern B envelopes can be
made and read without a server.

Every provider is a :class:`heimdall.kms.provider.KeyProvider`: the one wrapper that checks
each call's arguments, refuses another provider's wrapped keys, and reports each call once to
a :class:`KmsCallObserver` (which the composition root binds to :mod:`heimdall.metrics`).
Providers translate their SDK's errors into :mod:`heimdall.errors` at their own boundary, and
never put key material in a message.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

from heimdall.errors import HeimdallError
from heimdall.secret import SecretBytes

__all__ = [
    "KEY_NAME_RULE",
    "DataKey",
    "DirectCiphertext",
    "DirectEncryption",
    "KeyDescription",
    "KeyManagementService",
    "KeyState",
    "KeyVersionInfo",
    "KmsCallObserver",
    "WrappedKey",
    "key_name_of",
    "valid_key_name",
]


# Key names end up in key identifiers, envelopes, Vault paths and file names.
_KEY_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z", re.ASCII)
KEY_NAME_RULE: Final = (
    "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
)


def key_name_of(key_identifier: str) -> str | None:
    """The key a key identifier names a version of (``transit/heimdall-pii`` for
    ``transit/heimdall-pii-v3``), or None if it names no version. The stores derive the same
    from each envelope (their ``key_name``)."""
    name, separator, number = key_identifier.rpartition("-v")
    if not separator or not number.isascii() or not number.isdigit():
        return None
    return name


def valid_key_name(name: object) -> bool:
    """Whether *name* may name a master key (the local keyring's or a Transit key)."""
    return isinstance(name, str) and _KEY_NAME.match(name) is not None


class KeyState(enum.StrEnum):
    """Lifecycle state of one master key version. spec: Key Rotation Strategy, Retire Old Key."""

    ACTIVE = "active"  # encrypts (if latest) and decrypts
    RETIRED = "retired"  # decrypt-only
    DISABLED = "disabled"  # neither


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data key encrypted under one version of a master key. Not secret, but opaque."""

    key_identifier: str
    key_version: int
    ciphertext: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class DataKey:
    """A fresh data key: the plaintext (wipe it after use) and its wrapped form."""

    plaintext: SecretBytes = field(repr=False)
    wrapped: WrappedKey


@dataclass(frozen=True, slots=True)
class KeyVersionInfo:
    version: int
    state: KeyState
    created_at: str


@dataclass(frozen=True, slots=True)
class KeyDescription:
    """What a provider knows of its master key."""

    provider: str
    key_name: str
    latest_version: int
    min_decryption_version: int
    min_encryption_version: int
    versions: tuple[KeyVersionInfo, ...]

    def key_identifier(self, version: int) -> str:
        return f"{self.key_name}-v{version}"


@runtime_checkable
class KeyManagementService(Protocol):
    """A master key held by a key management service.

    ``associated_data`` binds a wrapped data key to the envelope that carries it (heimdall passes
    the data key's id); unwrapping with different associated data fails. Batch methods return one
    result per item, in order: an item that fails carries its error and does not fail the rest.
    """

    @property
    def provider(self) -> str:
        """Short provider name: ``local``, ``legacy``, ``vault``, ``aws``, ``gcp``, ``azure``."""
        ...

    def owns(self, key_identifier: str) -> bool:
        """Whether *key_identifier* names a version of this provider's key."""
        ...

    def generate_data_key(self, associated_data: bytes) -> DataKey:
        """A new random 256-bit data key, wrapped under the latest encryption version."""
        ...

    def wrap(self, plaintext: SecretBytes, associated_data: bytes) -> WrappedKey:
        """Wrap an existing data key under the latest encryption version."""
        ...

    def wrap_many(
        self, items: Sequence[tuple[SecretBytes, bytes]]
    ) -> list[WrappedKey | HeimdallError]: ...

    def unwrap(self, wrapped: WrappedKey, associated_data: bytes) -> SecretBytes:
        """The plaintext data key. Raises KeyVersionDisabled below min_decryption_version."""
        ...

    def unwrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[SecretBytes | HeimdallError]: ...

    def rewrap(self, wrapped: WrappedKey, associated_data: bytes) -> WrappedKey:
        """The same data key, wrapped under the latest version; the plaintext stays inside."""
        ...

    def rewrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[WrappedKey | HeimdallError]: ...

    def rotate(self) -> KeyDescription:
        """Create a new key version and make it the one new data keys are wrapped under."""
        ...

    def set_min_decryption_version(self, version: int) -> KeyDescription:
        """Refuse to unwrap data keys wrapped below *version* (emergency runbook, step 2)."""
        ...

    def set_min_encryption_version(self, version: int) -> KeyDescription:
        """Retire versions below *version*: decrypt-only from now on."""
        ...

    def describe(self) -> KeyDescription: ...


@dataclass(frozen=True, slots=True)
class DirectCiphertext:
    """A field value that the provider encrypted itself under one version of its master key
    (pattern B). Not secret, but opaque: only that provider can decrypt it."""

    key_identifier: str
    key_version: int
    ciphertext: bytes = field(repr=False)


@runtime_checkable
class DirectEncryption(Protocol):
    """A provider that encrypts field values itself, so they never meet a data key (pattern B).

    ``associated_data`` binds each value to its field, as it binds a wrapped data key to its
    envelope: decrypting or re-encrypting with other associated data fails. Every method takes
    a batch and returns one result per item, in order; an item that fails carries its error and
    does not fail the rest. A call that fails as a whole raises.
    """

    def encrypt_values(
        self, items: Sequence[tuple[SecretBytes, bytes]]
    ) -> list[DirectCiphertext | HeimdallError]:
        """Each plaintext encrypted under the latest encryption version."""
        ...

    def decrypt_values(
        self, items: Sequence[tuple[DirectCiphertext, bytes]]
    ) -> list[SecretBytes | HeimdallError]:
        """Each plaintext (wipe it after use). KeyVersionDisabled below min_decryption_version."""
        ...

    def reencrypt_values(
        self, items: Sequence[tuple[DirectCiphertext, bytes]]
    ) -> list[DirectCiphertext | HeimdallError]:
        """Each value encrypted anew under the latest version, without leaving the provider
        (Transit ``rewrap``): the rotation of a pattern B field."""
        ...


class KmsCallObserver(Protocol):
    """Told of each call made to a key provider, once, by :class:`heimdall.kms.provider.
    KeyProvider`: e.g. ``("vault", "unwrap", "success", 0.004)``.

    *operation* and *result* are words from a closed set (``generate_data_key``, ``wrap``,
    ``unwrap``, ``rewrap``, ``rotate``, ``configure``, ``describe``, ...; ``success``,
    ``unavailable``, ``denied``, ``not_found``, ``disabled``, ``invalid``, ``failure``): never a
    key name or anything a caller supplied. A batch is one call.
    """

    def __call__(self, provider: str, operation: str, result: str, seconds: float) -> None: ...


@runtime_checkable
class AuditKey(Protocol):
    """A MAC key held by a key provider, which authenticates the audit trail's checkpoints.

    spec: Audit and Compliance, Audit Log Requirements. :mod:`heimdall.audit` calls :meth:`sign`
    once per checkpoint (never per event) and :meth:`verify` when the trail is checked. Where the
    service can, the key never leaves it: Vault/OpenBao Transit ``hmac`` and ``verify``, AWS KMS
    GenerateMac/VerifyMac, GCP MacSign/MacVerify. The local keyring keeps it in the keyring file,
    beside the master key versions. A MAC is text that names the key version it was made with
    (``vault:v1:...``), so the key can be rotated without invalidating older checkpoints.
    """

    @property
    def key_identifier(self) -> str:
        """Names the key, e.g. ``transit/heimdall-pii-audit``; recorded in each checkpoint."""
        ...

    def sign(self, message: bytes) -> str:
        """The MAC of *message*. Raises a KmsError (or ConfigurationError) when it cannot."""
        ...

    def verify(self, message: bytes, mac: str) -> bool:
        """Whether *mac* is this key's MAC of *message*: False for a forged or malformed MAC or
        one made with another key; a KmsError when the provider cannot answer."""
        ...

    def exists(self) -> bool:
        """Whether the provider holds this key (so a trail it wrote must carry checkpoints)."""
        ...
