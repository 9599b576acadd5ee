"""Field encryption: envelope format + data key cache + one key provider.

spec: Envelope Encryption Architecture, Encryption Flow and Decryption Flow. A :class:`FieldCipher`
encrypts values under data keys that its key provider generates and wraps, and decrypts envelopes
by unwrapping their data key through the provider.

Data key caching follows the AWS Encryption SDK's caching materials manager: an encryption data
key is reused for at most ``max_uses`` fields and ``max_age_seconds``, then replaced; unwrapped
data keys are kept (as cipher contexts, the plaintext buffer wiped) for the same age, at most
``max_unwrapped_keys`` of them (the oldest unwrapped goes first). ``max_uses=1`` gives one data
key per field. Fields that share a data key share its ``dek_id``, so a master key rotation
rewraps that key once for all of them.

Thread safety: one FieldCipher serves many threads (re-encryption job threads, API workers).
Every change to the caches is made under one lock; a read of the unwrapped-key cache is a single
dict lookup, which is atomic, so the decrypt hot path takes no lock. The key provider is never
called under the lock on the decrypt side (an unwrap may be a network call): two threads may
unwrap the same data key at once, and the second simply replaces the first's cache entry.
:meth:`FieldCipher.forget_keys` also discards the keys that were being unwrapped while it ran.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from heimdall.aead import Aead
from heimdall.envelope import (
    ALGORITHM,
    KMS_DIRECT,
    EncryptionContext,
    EncryptionVersion,
    Envelope,
    Header,
    canonical_body,
    canonical_header,
    data_ad,
    data_ad_prefix,
    data_associated_data,
    from_mapping,
    load,
    wrap_associated_data,
)
from heimdall.errors import HeimdallError, InvalidEnvelope
from heimdall.kms.base import KeyManagementService, WrappedKey
from heimdall.secret import SecretBytes

__all__ = ["CachePolicy", "FieldCipher", "SealedField"]


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How long data keys are reused. ``max_uses`` bounds fields per data key (and nonces per
    key, far below GCM's 2**32 random-nonce limit); ``max_age_seconds`` bounds how long a
    rotation or version floor set by another process can go unnoticed here."""

    max_uses: int = 10_000
    max_age_seconds: float = 300.0
    max_unwrapped_keys: int = 1024

    def __post_init__(self) -> None:
        if not 1 <= self.max_uses <= 2**24:
            raise ValueError("data key max_uses must be between 1 and 16777216")
        if not 0 < self.max_age_seconds <= 86_400:
            raise ValueError("data key max_age_seconds must be between 0 and 86400")
        if self.max_unwrapped_keys < 1:
            raise ValueError("max_unwrapped_keys must be at least 1")


@dataclass(frozen=True, slots=True)
class SealedField:
    """The result of one encryption: the envelope JSON and the properties a store indexes."""

    envelope: str = field(repr=False)
    encryption_version: str
    key_identifier: str
    key_version: int
    dek_id: str


class _DecryptionKey:
    __slots__ = ("ad_prefix", "aead", "expires")

    def __init__(self, aead: Aead, ad_prefix: bytes, expires: float) -> None:
        self.aead = aead
        self.ad_prefix = ad_prefix
        self.expires = expires


class _EncryptionKey:
    __slots__ = ("aead", "expires", "header", "key_identifier", "uses_left")

    def __init__(self, aead: Aead, header: Header, key_identifier: str, expires: float, uses: int):
        self.aead = aead
        self.header = header
        self.key_identifier = key_identifier
        self.expires = expires
        self.uses_left = uses


def new_dek_id() -> str:
    return secrets.token_hex(16)


def _utc_seconds(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


class FieldCipher:
    """Encrypts and decrypts fields of one encryption_version through one key provider."""

    def __init__(
        self,
        kms: KeyManagementService,
        encryption_version: EncryptionVersion,
        cache: CachePolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        direct: bool = False,
    ) -> None:
        self.kms = kms
        self.direct = direct
        self.encryption_version = encryption_version
        self.cache = cache or CachePolicy()
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._current: _EncryptionKey | None = None
        # Unwrapped data keys by Envelope.header_json(), oldest first (dicts keep insertion
        # order). Read without the lock, changed only under it.
        self._unwrapped: dict[str, _DecryptionKey] = {}
        self._generation = 0  # counts forget_keys calls; see _remember
        self._stamp_second = -1
        self._stamp = ""
        self.kms_calls = 0

    # -- encryption ---------------------------------------------------------------------

    def _encryption_key(self) -> _EncryptionKey:
        current = self._current
        if current is not None and current.uses_left > 0 and current.expires > self._monotonic():
            current.uses_left -= 1
            return current
        dek_id = new_dek_id()
        data_key = self.kms.generate_data_key(
            wrap_associated_data(self.encryption_version.value, ALGORITHM, dek_id)
        )
        self.kms_calls += 1
        with data_key.plaintext as plaintext:
            aead = Aead(plaintext.view())
        wrapped = data_key.wrapped
        header = Header(
            encryption_version=self.encryption_version,
            key_identifier=wrapped.key_identifier,
            key_version=wrapped.key_version,
            dek_id=dek_id,
            encrypted_dek=wrapped.ciphertext,
        )
        self._current = _EncryptionKey(
            aead,
            header,
            wrapped.key_identifier,
            self._monotonic() + self.cache.max_age_seconds,
            self.cache.max_uses - 1,
        )
        return self._current

    def _timestamp(self) -> str:
        now = self._clock()
        second = int(now)
        if second != self._stamp_second:
            self._stamp = _utc_seconds(now)
            self._stamp_second = second
        return self._stamp

    def encrypt(self, plaintext: bytes, context: EncryptionContext) -> SealedField:
        """Seal *plaintext* bound to *context*; the data key comes from the cache or the KMS."""
        if self.direct:
            return self.encrypt_many([(plaintext, context)])[0]
        with self._lock:
            key = self._encryption_key()
            timestamp = self._timestamp()
        envelope = key.header.seal(key.aead, plaintext, context, timestamp)
        return SealedField(
            envelope,
            self.encryption_version.value,
            key.key_identifier,
            key.header.key_version,
            key.header.dek_id,
        )

    def encrypt_many(self, items: Sequence[tuple[bytes, EncryptionContext]]) -> list[SealedField]:
        """Seal many values. With ``direct`` (pattern B) the provider encrypts each value
        itself, in batch calls; otherwise this is :meth:`encrypt` per value."""
        if not self.direct:
            return [self.encrypt(plaintext, context) for plaintext, context in items]
        version = self.encryption_version.value
        with self._lock:
            timestamp = self._timestamp()
        dek_ids = [new_dek_id() for _ in items]
        secrets_ = [SecretBytes(plaintext) for plaintext, _ in items]
        try:
            wrapped = self.kms.wrap_many(
                [
                    (secret, data_associated_data(version, KMS_DIRECT, dek_id, timestamp, context))
                    for secret, dek_id, (_, context) in zip(secrets_, dek_ids, items, strict=True)
                ]
            )
        finally:
            for secret in secrets_:
                secret.wipe()
        self.kms_calls += 1
        sealed = []
        for dek_id, result in zip(dek_ids, wrapped, strict=True):
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
        """Drop every cached data key (after a rotation or a version floor change)."""
        with self._lock:
            self._current = None
            self._unwrapped.clear()
            self._generation += 1

    # -- decryption ---------------------------------------------------------------------

    def _unwrap(self, envelope: Envelope) -> _DecryptionKey:
        wrapped = WrappedKey(envelope.key_identifier, envelope.key_version, envelope.encrypted_dek)
        ad = wrap_associated_data(
            envelope.encryption_version.value, envelope.algorithm, envelope.dek_id
        )
        self.kms_calls += 1
        with self.kms.unwrap(wrapped, ad) as plaintext:
            aead = Aead(plaintext.view())
        return _DecryptionKey(
            aead,
            data_ad_prefix(envelope.encryption_version.value, envelope.algorithm, envelope.dek_id),
            self._monotonic() + self.cache.max_age_seconds,
        )

    def _remember(self, cache_key: str, entry: _DecryptionKey, generation: int) -> None:
        """Cache a data key unwrapped while forget_keys had run *generation* times.

        If forget_keys ran during the unwrap, the key is not cached: it was unwrapped under the
        rotation or version floor that forget_keys was called to leave behind.
        """
        with self._lock:
            if generation != self._generation:
                return
            unwrapped = self._unwrapped
            unwrapped[cache_key] = entry
            while len(unwrapped) > self.cache.max_unwrapped_keys:
                del unwrapped[next(iter(unwrapped))]

    def decrypt(self, envelope: str, context: EncryptionContext) -> bytes:
        """The plaintext, or InvalidEnvelope / DecryptionFailed / a KmsError. Never wrong data."""
        opened = self._open(envelope, context)
        if isinstance(opened, Envelope):
            return self._decrypt_direct(opened, context)
        return opened

    def _open(self, envelope: str, context: EncryptionContext) -> bytes | Envelope:
        """The plaintext, or the parsed envelope of a value the provider itself must decrypt.

        Fast path: the cache is keyed by the canonical header text (Envelope.header_json) of
        envelopes that passed parse. An envelope in the canonical layout whose header text is a
        key therefore has that validated header, and only its per-field values need checking,
        which canonical_body does. Anything else is parsed in full.
        """
        header = canonical_header(envelope)
        if header is not None:
            entry = self._unwrapped.get(header)
            if entry is not None and entry.expires > self._monotonic():
                body = canonical_body(envelope, header)
                if body is not None:
                    ciphertext, timestamp = body
                    return entry.aead.decrypt(
                        ciphertext, data_ad(entry.ad_prefix, timestamp, context)
                    )
        obj = load(envelope)
        if obj["encryption_version"] != self.encryption_version.value:
            raise InvalidEnvelope("envelope belongs to another encryption version")
        parsed = from_mapping(obj)
        if parsed.algorithm == KMS_DIRECT:
            return parsed
        cache_key = parsed.header_json()
        entry = self._unwrapped.get(cache_key)
        if entry is None or entry.expires <= self._monotonic():
            generation = self._generation
            entry = self._unwrap(parsed)  # not under the lock: it may be a network call
            self._remember(cache_key, entry, generation)
        return entry.aead.decrypt(
            parsed.ciphertext, data_ad(entry.ad_prefix, parsed.encryption_timestamp, context)
        )

    def decrypt_many(
        self, items: Sequence[tuple[str, EncryptionContext]]
    ) -> list[bytes | HeimdallError]:
        """Per-item results. KMS-DIRECT values go to the provider in batch calls; the others
        are decrypted locally under their (cached) data keys."""
        out: list[bytes | HeimdallError] = []
        direct: list[tuple[int, Envelope, EncryptionContext]] = []
        for index, (envelope, context) in enumerate(items):
            try:
                opened = self._open(envelope, context)
            except HeimdallError as exc:
                out.append(exc)
                continue
            if isinstance(opened, Envelope):
                direct.append((index, opened, context))
                out.append(b"")  # replaced below
            else:
                out.append(opened)
        if direct:
            requests = [
                (
                    WrappedKey(e.key_identifier, e.key_version, e.ciphertext),
                    data_associated_data(
                        e.encryption_version.value,
                        KMS_DIRECT,
                        e.dek_id,
                        e.encryption_timestamp,
                        context,
                    ),
                )
                for _, e, context in direct
            ]
            self.kms_calls += 1
            for (index, _, _), result in zip(direct, self.kms.unwrap_many(requests), strict=True):
                if isinstance(result, HeimdallError):
                    out[index] = result
                else:
                    with result as plaintext:
                        out[index] = bytes(plaintext.view())
        return out

    def _decrypt_direct(self, envelope: Envelope, context: EncryptionContext) -> bytes:
        """Pattern B: the provider decrypts the value itself, bound to the same context."""
        ad = data_associated_data(
            envelope.encryption_version.value,
            KMS_DIRECT,
            envelope.dek_id,
            envelope.encryption_timestamp,
            context,
        )
        wrapped = WrappedKey(envelope.key_identifier, envelope.key_version, envelope.ciphertext)
        self.kms_calls += 1
        with self.kms.unwrap(wrapped, ad) as plaintext:
            return bytes(plaintext.view())

    # -- rotation -----------------------------------------------------------------------

    def rewrap_many(
        self, items: Sequence[tuple[Envelope, EncryptionContext]]
    ) -> list[Envelope | HeimdallError]:
        """The envelopes wrapped under the provider's latest version, in one batch call.

        Each distinct data key is rewrapped once; the data ciphertext, context binding and
        encryption_timestamp are unchanged. A KMS-DIRECT value is rewrapped by the provider
        itself (for Vault, the value never leaves Transit). Per-item results, in order.
        """
        slots: dict[tuple[object, ...], int] = {}
        requests: list[tuple[WrappedKey, bytes]] = []
        keys: list[tuple[object, ...]] = []
        for index, (envelope, context) in enumerate(items):
            version = envelope.encryption_version.value
            if envelope.algorithm == KMS_DIRECT:
                key: tuple[object, ...] = ("direct", index)
                wrapped = WrappedKey(
                    envelope.key_identifier, envelope.key_version, envelope.ciphertext
                )
                ad = data_associated_data(
                    version, KMS_DIRECT, envelope.dek_id, envelope.encryption_timestamp, context
                )
            else:
                key = (
                    envelope.key_identifier,
                    envelope.key_version,
                    envelope.dek_id,
                    envelope.encrypted_dek,
                )
                wrapped = WrappedKey(
                    envelope.key_identifier, envelope.key_version, envelope.encrypted_dek
                )
                ad = wrap_associated_data(version, envelope.algorithm, envelope.dek_id)
            keys.append(key)
            if key not in slots:
                slots[key] = len(requests)
                requests.append((wrapped, ad))
        results = self.kms.rewrap_many(requests) if requests else []
        self.kms_calls += 1 if requests else 0
        out: list[Envelope | HeimdallError] = []
        for (envelope, _), key in zip(items, keys, strict=True):
            result = results[slots[key]]
            if isinstance(result, HeimdallError):
                out.append(result)
            else:
                direct = envelope.algorithm == KMS_DIRECT
                out.append(
                    Envelope(
                        envelope.encryption_version,
                        envelope.algorithm,
                        result.key_identifier,
                        result.key_version,
                        envelope.dek_id,
                        b"" if direct else result.ciphertext,
                        result.ciphertext if direct else envelope.ciphertext,
                        envelope.encryption_timestamp,
                    )
                )
        return out

    def __repr__(self) -> str:
        version = self.encryption_version.value
        return f"FieldCipher(provider={self.kms.provider!r}, version={version!r})"
