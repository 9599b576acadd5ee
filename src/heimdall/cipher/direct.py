"""Pattern B: the key provider encrypts each value itself (envelope algorithm ``KMS-DIRECT``).

spec: KMS Provider Evaluation, HashiCorp Vault (pattern B: Transit ``encrypt``). A
:class:`DirectCipher` sends field values to a provider that implements
:class:`~heimdall.kms.base.DirectEncryption` (Vault Transit), in batch calls, and stores the
provider's ciphertext in the envelope's ``ciphertext`` member; ``encrypted_dek`` is empty, since
there is no data key. The value is bound to the same associated data as a pattern A ciphertext
(:func:`heimdall.envelope.data_associated_data`: version, algorithm, dek_id, timestamp and the
encryption context), so a value moved to another field fails to decrypt. A rotation re-encrypts
each value inside the provider: the plaintext never leaves it.

Nothing is cached: every decryption is a call to the provider, which is why
:meth:`DirectCipher.decrypt_many` sends a batch in as few calls as the provider allows.
Plaintexts sent to the provider sit in wipeable buffers, wiped once the call returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from heimdall.cipher.base import SealedField, Timestamps, new_dek_id, parse_own
from heimdall.envelope import (
    KMS_DIRECT,
    EncryptionContext,
    EncryptionVersion,
    Envelope,
    data_associated_data,
)
from heimdall.errors import HeimdallError, UnsupportedEnvelope
from heimdall.kms.base import DirectCiphertext, DirectEncryption, KeyManagementService
from heimdall.secret import SecretBytes

__all__ = ["DirectCipher", "DirectProvider"]


class DirectProvider(KeyManagementService, DirectEncryption, Protocol):
    """A key provider that also encrypts values itself: what a DirectCipher needs."""


def _bound_to(envelope: Envelope, context: EncryptionContext) -> bytes:
    return data_associated_data(
        envelope.encryption_version.value,
        KMS_DIRECT,
        envelope.dek_id,
        envelope.encryption_timestamp,
        context,
    )


def _value(envelope: Envelope) -> DirectCiphertext:
    return DirectCiphertext(envelope.key_identifier, envelope.key_version, envelope.ciphertext)


def _not_direct() -> UnsupportedEnvelope:
    return UnsupportedEnvelope("the envelope holds a data key, not a value the provider encrypted")


def _requests(
    items: Sequence[tuple[Envelope, EncryptionContext]],
) -> tuple[list[tuple[DirectCiphertext, bytes]], list[int]]:
    """One provider request per KMS-DIRECT item, and the position of each among *items* (the
    others are refused: they are not this cipher's)."""
    requests: list[tuple[DirectCiphertext, bytes]] = []
    positions: list[int] = []
    for position, (envelope, context) in enumerate(items):
        if envelope.algorithm == KMS_DIRECT:
            positions.append(position)
            requests.append((_value(envelope), _bound_to(envelope, context)))
    return requests, positions


class DirectCipher:
    """Encrypts and decrypts fields of one encryption_version through a provider that encrypts
    the values itself (pattern B). See the module docstring."""

    def __init__(
        self,
        kms: DirectProvider,
        encryption_version: EncryptionVersion,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kms = kms
        self.encryption_version = encryption_version
        self._timestamps = Timestamps(clock)
        self.kms_calls = 0

    # -- encryption ---------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, context: EncryptionContext) -> SealedField:
        return self.encrypt_many([(plaintext, context)])[0]

    def encrypt_many(self, items: Sequence[tuple[bytes, EncryptionContext]]) -> list[SealedField]:
        """Seal many values, the provider encrypting them in batch calls. Raises the first
        item's error if the provider refuses any."""
        version = self.encryption_version.value
        timestamp = self._timestamps.now()
        dek_ids = [new_dek_id() for _ in items]
        plaintexts = [SecretBytes(plaintext) for plaintext, _ in items]
        try:
            results = self.kms.encrypt_values(
                [
                    (secret, data_associated_data(version, KMS_DIRECT, dek_id, timestamp, context))
                    for secret, dek_id, (_, context) in zip(plaintexts, dek_ids, items, strict=True)
                ]
            )
        finally:
            for secret in plaintexts:
                secret.wipe()
        self.kms_calls += 1
        sealed = []
        for dek_id, result in zip(dek_ids, results, strict=True):
            if isinstance(result, HeimdallError):
                raise result
            envelope = Envelope(
                encryption_version=self.encryption_version,
                algorithm=KMS_DIRECT,
                key_identifier=result.key_identifier,
                key_version=result.key_version,
                dek_id=dek_id,
                encrypted_dek=b"",
                ciphertext=result.ciphertext,
                encryption_timestamp=timestamp,
            )
            sealed.append(
                SealedField(
                    envelope.to_json(), version, result.key_identifier, result.key_version, dek_id
                )
            )
        return sealed

    def forget_keys(self) -> None:
        """Nothing to forget: this cipher holds no data key."""

    # -- decryption ---------------------------------------------------------------------

    def decrypt(self, envelope: str, context: EncryptionContext) -> bytes:
        """The plaintext, or InvalidEnvelope / DecryptionFailed / a KmsError. Never wrong data."""
        return self.decrypt_parsed(parse_own(envelope, self.encryption_version), context)

    def decrypt_parsed(self, envelope: Envelope, context: EncryptionContext) -> bytes:
        [result] = self.decrypt_parsed_many([(envelope, context)])
        if isinstance(result, HeimdallError):
            raise result
        return result

    def decrypt_many(
        self, items: Sequence[tuple[str, EncryptionContext]]
    ) -> list[bytes | HeimdallError]:
        """Per-item results; the values go to the provider in batch calls."""
        out: list[bytes | HeimdallError] = []
        parsed: list[tuple[int, Envelope, EncryptionContext]] = []
        for index, (envelope, context) in enumerate(items):
            try:
                parsed.append((index, parse_own(envelope, self.encryption_version), context))
            except HeimdallError as exc:
                out.append(exc)
                continue
            out.append(b"")  # replaced below
        results = self.decrypt_parsed_many([(e, context) for _, e, context in parsed])
        for (index, _, _), result in zip(parsed, results, strict=True):
            out[index] = result
        return out

    def decrypt_parsed_many(
        self, items: Sequence[tuple[Envelope, EncryptionContext]]
    ) -> list[bytes | HeimdallError]:
        """Per-item plaintexts of parsed KMS-DIRECT envelopes, in one provider call."""
        out: list[bytes | HeimdallError] = [_not_direct() for _ in items]
        requests, positions = _requests(items)
        if not requests:
            return out
        self.kms_calls += 1
        for position, result in zip(positions, self.kms.decrypt_values(requests), strict=True):
            if isinstance(result, HeimdallError):
                out[position] = result
            else:
                with result as plaintext:
                    out[position] = bytes(plaintext.view())
        return out

    # -- rotation -----------------------------------------------------------------------

    def rewrap_many(
        self, items: Sequence[tuple[Envelope, EncryptionContext]]
    ) -> list[Envelope | HeimdallError]:
        """The values re-encrypted under the provider's latest version, in one batch call,
        without leaving it. dek_id, context binding and encryption_timestamp are unchanged.
        Per-item results, in order."""
        out: list[Envelope | HeimdallError] = [_not_direct() for _ in items]
        requests, positions = _requests(items)
        if not requests:
            return out
        results = self.kms.reencrypt_values(requests)
        self.kms_calls += 1
        for position, result in zip(positions, results, strict=True):
            if isinstance(result, HeimdallError):
                out[position] = result
            else:
                out[position] = items[position][0].reencrypted_by_provider(
                    result.key_identifier, result.key_version, result.ciphertext
                )
        return out

    def __repr__(self) -> str:
        version = self.encryption_version.value
        return f"DirectCipher(provider={self.kms.provider!r}, version={version!r})"
