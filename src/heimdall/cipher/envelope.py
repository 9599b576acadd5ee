"""Pattern A: data keys from the key provider, values encrypted here with AES-256-GCM.

spec: Envelope Encryption Architecture, Encryption Flow and Decryption Flow. An
:class:`EnvelopeCipher` encrypts values under data keys that its key provider generates and
wraps, and decrypts envelopes by unwrapping their data key through the provider.

Data key caching follows the AWS Encryption SDK's caching materials manager: an encryption data
key is reused for at most ``max_uses`` fields and ``max_age_seconds``, then replaced; unwrapped
data keys are kept (as cipher contexts, the plaintext buffer wiped) for the same age, at most
``max_unwrapped_keys`` of them (the oldest unwrapped goes first). ``max_uses=1`` gives one data
key per field. Fields that share a data key share its ``dek_id``, so a master key rotation
rewraps that key once for all of them.

Thread safety: one EnvelopeCipher serves many threads (re-encryption job threads, API workers).
Every change to the caches is made under one lock; a read of the unwrapped-key cache is a single
dict lookup, which is atomic, so the decrypt hot path takes no lock. The key provider is never
called under the lock on the decrypt side (an unwrap may be a network call): two threads may
unwrap the same data key at once, and the second simply replaces the first's cache entry.
:meth:`EnvelopeCipher.forget_keys` also discards the keys that were being unwrapped while it ran.

A ``KMS-DIRECT`` envelope (pattern B) holds no data key: this cipher refuses it with
UnsupportedEnvelope, and :class:`~heimdall.cipher.field.FieldCipher` hands it to a
:class:`~heimdall.cipher.direct.DirectCipher` instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from heimdall.aead import Aead
from heimdall.cipher.base import SealedField, Timestamps, new_dek_id, parse_own
from heimdall.envelope import (
    ALGORITHM,
    EncryptionContext,
    EncryptionVersion,
    Envelope,
    Header,
    canonical_body,
    canonical_header,
    data_ad,
    data_ad_prefix,
    wrap_associated_data,
)
from heimdall.errors import HeimdallError, InvalidEnvelope, UnsupportedEnvelope
from heimdall.kms.base import KeyManagementService, WrappedKey

__all__ = ["CachePolicy", "EnvelopeCipher"]


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


def _not_a_data_key_envelope() -> UnsupportedEnvelope:
    return UnsupportedEnvelope("a KMS-DIRECT envelope holds no data key to unwrap")


class EnvelopeCipher:
    """Encrypts and decrypts fields of one encryption_version under data keys from one key
    provider (pattern A). See the module docstring."""

    def __init__(
        self,
        kms: KeyManagementService,
        encryption_version: EncryptionVersion,
        cache: CachePolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kms = kms
        self.encryption_version = encryption_version
        self.cache = cache or CachePolicy()
        self._monotonic = monotonic
        self._timestamps = Timestamps(clock)
        self._lock = threading.Lock()
        self._current: _EncryptionKey | None = None
        # Unwrapped data keys by Envelope.header_json(), oldest first (dicts keep insertion
        # order). Read without the lock, changed only under it.
        self._unwrapped: dict[str, _DecryptionKey] = {}
        self._generation = 0  # counts forget_keys calls; see _remember
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

    def encrypt(self, plaintext: bytes, context: EncryptionContext) -> SealedField:
        """Seal *plaintext* bound to *context*; the data key comes from the cache or the KMS."""
        with self._lock:
            key = self._encryption_key()
            timestamp = self._timestamps.now()
        envelope = key.header.seal(key.aead, plaintext, context, timestamp)
        return SealedField(
            envelope,
            self.encryption_version.value,
            key.key_identifier,
            key.header.key_version,
            key.header.dek_id,
        )

    def encrypt_many(self, items: Sequence[tuple[bytes, EncryptionContext]]) -> list[SealedField]:
        """:meth:`encrypt` per value: the data key cache already spares the provider."""
        return [self.encrypt(plaintext, context) for plaintext, context in items]

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
        plaintext = self.decrypt_cached(envelope, context)
        if plaintext is None:
            return self.decrypt_parsed(parse_own(envelope, self.encryption_version), context)
        return plaintext

    def decrypt_cached(self, envelope: str, context: EncryptionContext) -> bytes | None:
        """The plaintext if *envelope* is in the canonical layout under a data key in the cache,
        else None ("parse it": every error about the envelope comes from parsing).

        The cache is keyed by the canonical header text (Envelope.header_json) of envelopes that
        passed parse. An envelope in the canonical layout whose header text is a key therefore
        has that validated header, and only its per-field values need checking, which
        canonical_body does. Raises DecryptionFailed when the data key does not open it.
        """
        result = self.decrypt_cached_many(((envelope, context),))[0]
        if isinstance(result, HeimdallError):
            raise result
        return result

    def decrypt_cached_many(
        self, items: Sequence[tuple[str, EncryptionContext]]
    ) -> list[bytes | HeimdallError | None]:
        """:meth:`decrypt_cached` of each item, in one loop: its plaintext, the DecryptionFailed
        it raised, or None ("parse it")."""
        unwrapped = self._unwrapped
        monotonic = self._monotonic
        out: list[bytes | HeimdallError | None] = []
        for envelope, context in items:
            header = canonical_header(envelope)
            entry = None if header is None else unwrapped.get(header)
            if header is None or entry is None or entry.expires <= monotonic():
                out.append(None)
                continue
            body = canonical_body(envelope, header)
            if body is None:
                out.append(None)
                continue
            ciphertext, timestamp = body
            try:
                out.append(
                    entry.aead.decrypt(ciphertext, data_ad(entry.ad_prefix, timestamp, context))
                )
            except HeimdallError as exc:
                # Without its frames, which hold this batch's other plaintexts.
                out.append(exc.with_traceback(None))
        return out

    def decrypt_parsed(self, envelope: Envelope, context: EncryptionContext) -> bytes:
        """The plaintext of a parsed envelope, its data key unwrapped unless cached."""
        if envelope.encryption_version is not self.encryption_version:
            raise InvalidEnvelope("envelope belongs to another encryption version")
        if envelope.algorithm != ALGORITHM:
            raise _not_a_data_key_envelope()
        cache_key = envelope.header_json()
        entry = self._unwrapped.get(cache_key)
        if entry is None or entry.expires <= self._monotonic():
            generation = self._generation
            entry = self._unwrap(envelope)  # not under the lock: it may be a network call
            self._remember(cache_key, entry, generation)
        return entry.aead.decrypt(
            envelope.ciphertext, data_ad(entry.ad_prefix, envelope.encryption_timestamp, context)
        )

    def decrypt_many(
        self, items: Sequence[tuple[str, EncryptionContext]]
    ) -> list[bytes | HeimdallError]:
        """Per-item results of :meth:`decrypt`."""
        out: list[bytes | HeimdallError] = []
        for envelope, context in items:
            try:
                out.append(self.decrypt(envelope, context))
            except HeimdallError as exc:
                out.append(exc)
        return out

    # -- rotation -----------------------------------------------------------------------

    def rewrap_many(
        self, items: Sequence[tuple[Envelope, EncryptionContext]]
    ) -> list[Envelope | HeimdallError]:
        """:meth:`rewrap_keys` of the envelopes (the context plays no part: a data key's
        wrapping is bound to the envelope's header alone)."""
        return self.rewrap_keys([envelope for envelope, _ in items])

    def rewrap_keys(self, envelopes: Sequence[Envelope]) -> list[Envelope | HeimdallError]:
        """The envelopes with their data keys wrapped under the provider's latest version, in
        one batch call.

        Each distinct data key is rewrapped once; the data ciphertext, context binding and
        encryption_timestamp are unchanged. Per-item results, in order.
        """
        slots: dict[tuple[str, int, str, bytes], int] = {}
        requests: list[tuple[WrappedKey, bytes]] = []
        item_slots: list[int | None] = []  # per item: its request, None if it has no data key
        for envelope in envelopes:
            if envelope.algorithm != ALGORITHM:
                item_slots.append(None)
                continue
            key = (
                envelope.key_identifier,
                envelope.key_version,
                envelope.dek_id,
                envelope.encrypted_dek,
            )
            slot = slots.get(key)
            if slot is None:
                slot = slots[key] = len(requests)
                wrapped = WrappedKey(
                    envelope.key_identifier, envelope.key_version, envelope.encrypted_dek
                )
                ad = wrap_associated_data(
                    envelope.encryption_version.value, envelope.algorithm, envelope.dek_id
                )
                requests.append((wrapped, ad))
            item_slots.append(slot)
        results = self.kms.rewrap_many(requests) if requests else []
        self.kms_calls += 1 if requests else 0
        out: list[Envelope | HeimdallError] = []
        for envelope, slot in zip(envelopes, item_slots, strict=True):
            if slot is None:
                out.append(_not_a_data_key_envelope())
                continue
            result = results[slot]
            if isinstance(result, HeimdallError):
                out.append(result)
            else:
                out.append(
                    envelope.rewrapped(result.key_identifier, result.key_version, result.ciphertext)
                )
        return out

    def __repr__(self) -> str:
        version = self.encryption_version.value
        return f"EnvelopeCipher(provider={self.kms.provider!r}, version={version!r})"
