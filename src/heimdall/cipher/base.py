"""The field cipher interface, and what its two implementations share.

A :class:`Cipher` encrypts the fields of one encryption_version through one key provider and
decrypts and rewraps their envelopes. Two implement it, one per integration pattern (spec: KMS
Provider Evaluation, HashiCorp Vault):

* :class:`~heimdall.cipher.envelope.EnvelopeCipher` (pattern A): data keys from the provider,
  values encrypted here with AES-256-GCM;
* :class:`~heimdall.cipher.direct.DirectCipher` (pattern B, algorithm ``KMS-DIRECT``): the
  provider encrypts each value itself.

:class:`~heimdall.cipher.field.FieldCipher`, what heimdall builds, writes with one of them and
reads each envelope with the one that wrote it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from heimdall.envelope import EncryptionContext, EncryptionVersion, Envelope, from_mapping, load
from heimdall.errors import HeimdallError, InvalidEnvelope
from heimdall.kms.base import KeyManagementService

__all__ = ["Cipher", "SealedField", "Timestamps", "new_dek_id", "parse_own"]


@dataclass(frozen=True, slots=True)
class SealedField:
    """The result of one encryption: the envelope JSON and the properties a store indexes."""

    envelope: str = field(repr=False)
    encryption_version: str
    key_identifier: str
    key_version: int
    dek_id: str


class Cipher(Protocol):
    """What heimdall asks of a field cipher.

    ``decrypt`` returns the plaintext or raises InvalidEnvelope, DecryptionFailed or a KmsError:
    never wrong data. Batch methods return one result per item, in order. ``rewrap_many`` moves
    envelopes to the provider's latest key version and keeps their data ciphertext binding and
    encryption_timestamp. ``kms_calls`` counts the calls made to the provider.
    """

    @property
    def kms(self) -> KeyManagementService: ...

    @property
    def encryption_version(self) -> EncryptionVersion: ...

    @property
    def kms_calls(self) -> int: ...

    def encrypt(self, plaintext: bytes, context: EncryptionContext) -> SealedField: ...

    def encrypt_many(
        self, items: Sequence[tuple[bytes, EncryptionContext]]
    ) -> list[SealedField]: ...

    def decrypt(self, envelope: str, context: EncryptionContext) -> bytes: ...

    def decrypt_many(
        self, items: Sequence[tuple[str, EncryptionContext]]
    ) -> list[bytes | HeimdallError]: ...

    def rewrap_many(
        self, items: Sequence[tuple[Envelope, EncryptionContext]]
    ) -> list[Envelope | HeimdallError]: ...

    def forget_keys(self) -> None:
        """Drop every cached data key (after a rotation or a version floor change)."""
        ...


def new_dek_id() -> str:
    return secrets.token_hex(16)


def parse_own(envelope: str, encryption_version: EncryptionVersion) -> Envelope:
    """Parse *envelope*, refusing one of another encryption version before reading its values."""
    obj = load(envelope)
    if obj["encryption_version"] != encryption_version.value:
        raise InvalidEnvelope("envelope belongs to another encryption version")
    return from_mapping(obj)


class Timestamps:
    """encryption_timestamp text for the current second, formatted once per second.

    The second and its text are kept as one tuple, so threads may share an instance.
    """

    __slots__ = ("_clock", "_stamp")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._stamp: tuple[int, str] = (-1, "")

    def now(self) -> str:
        now = self._clock()
        second = int(now)
        stamp = self._stamp
        if second != stamp[0]:
            stamp = self._stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)))
        return stamp[1]
