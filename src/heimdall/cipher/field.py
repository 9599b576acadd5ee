"""The cipher heimdall builds: writes with one pattern, reads each envelope with its own.

One store may hold both Vault integration patterns (a deployment that moved from one to the
other keeps its older fields), so a :class:`FieldCipher` is an
:class:`~heimdall.cipher.envelope.EnvelopeCipher` and, where its provider encrypts values itself
(:class:`~heimdall.kms.base.DirectEncryption`), a :class:`~heimdall.cipher.direct.DirectCipher`
over the same provider. New fields are written by the one picked at construction; an envelope is
decrypted and rewrapped by the one its ``algorithm`` names. Without a direct path, a
``KMS-DIRECT`` envelope is refused with UnsupportedEnvelope.

Routing costs nothing on the hot path: an envelope under a cached data key is opened before it
is parsed, as the envelope cipher alone would; only a parsed envelope is routed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from heimdall.cipher.base import Cipher, SealedField, parse_own
from heimdall.cipher.direct import DirectCipher
from heimdall.cipher.envelope import CachePolicy, EnvelopeCipher
from heimdall.envelope import KMS_DIRECT, EncryptionContext, EncryptionVersion, Envelope
from heimdall.errors import HeimdallError, KmsUnavailable, UnsupportedEnvelope
from heimdall.kms.base import DirectEncryption, KeyManagementService

__all__ = ["FieldCipher"]


class FieldCipher:
    """Encrypts and decrypts fields of one encryption_version through one key provider.

    New fields are sealed under data keys (pattern A), or with ``direct=True`` by the provider
    itself (pattern B, which needs a provider that implements DirectEncryption). Either way,
    envelopes of both patterns decrypt and rewrap. See the module docstring.
    """

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
        self.encryption_version = encryption_version
        self._envelopes = EnvelopeCipher(
            kms, encryption_version, cache, clock=clock, monotonic=monotonic
        )
        self._direct = (
            DirectCipher(kms, encryption_version, clock=clock)
            if isinstance(kms, DirectEncryption)
            else None
        )
        # The pattern is picked here, once: every later write goes to this cipher.
        self._writer: Cipher = self._envelopes
        if direct:
            if self._direct is None:
                raise ValueError(f"the {kms.provider} key provider does not encrypt values itself")
            self._writer = self._direct

    @property
    def kms(self) -> KeyManagementService:
        return self._envelopes.kms

    @property
    def cache(self) -> CachePolicy:
        return self._envelopes.cache

    @property
    def kms_calls(self) -> int:
        """Calls made to the provider, by either pattern."""
        direct = self._direct.kms_calls if self._direct else 0
        return self._envelopes.kms_calls + direct

    @property
    def _unwrapped(self) -> Mapping[str, object]:
        """The data keys the envelope path holds unwrapped (their number is bounded)."""
        return self._envelopes._unwrapped

    def _no_direct_path(self) -> UnsupportedEnvelope:
        return UnsupportedEnvelope(
            "a KMS-DIRECT envelope needs a key provider that encrypts values itself, and "
            f"{self.kms.provider} does not"
        )

    # -- encryption ---------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, context: EncryptionContext) -> SealedField:
        """Seal *plaintext* bound to *context*."""
        return self._writer.encrypt(plaintext, context)

    def encrypt_many(self, items: Sequence[tuple[bytes, EncryptionContext]]) -> list[SealedField]:
        """Seal many values; with pattern B the provider encrypts them in batch calls."""
        return self._writer.encrypt_many(items)

    def forget_keys(self) -> None:
        """Drop every cached data key (after a rotation or a version floor change)."""
        self._envelopes.forget_keys()

    # -- decryption ---------------------------------------------------------------------

    def decrypt(self, envelope: str, context: EncryptionContext) -> bytes:
        """The plaintext, or InvalidEnvelope / DecryptionFailed / a KmsError. Never wrong data."""
        plaintext = self._envelopes.decrypt_cached(envelope, context)
        if plaintext is not None:
            return plaintext
        parsed = parse_own(envelope, self.encryption_version)
        if parsed.algorithm != KMS_DIRECT:
            return self._envelopes.decrypt_parsed(parsed, context)
        if self._direct is None:
            raise self._no_direct_path()
        return self._direct.decrypt_parsed(parsed, context)

    def decrypt_many(
        self, items: Sequence[tuple[str, EncryptionContext]]
    ) -> list[bytes | HeimdallError]:
        """Per-item results. KMS-DIRECT values go to the provider in batch calls; the others
        are decrypted here under their (cached) data keys. Once the provider is unreachable
        (KmsUnavailable, after its own retries), the items after it that the cache did not
        open get that error without asking it again: a batch of thousands of data keys fails
        in one provider timeout, not in one per field."""
        envelopes = self._envelopes
        out: list[bytes | HeimdallError] = []
        direct: list[tuple[int, Envelope, EncryptionContext]] = []
        unreachable: KmsUnavailable | None = None
        cached = envelopes.decrypt_cached_many(items)
        for index, (envelope, context) in enumerate(items):
            result = cached[index]
            if result is not None:
                out.append(result)
                continue
            try:
                parsed = parse_own(envelope, self.encryption_version)
                if parsed.algorithm == KMS_DIRECT:
                    direct.append((index, parsed, context))
                    out.append(b"")  # replaced below
                    continue
                if unreachable is not None:
                    out.append(unreachable)
                    continue
                out.append(envelopes.decrypt_parsed(parsed, context))
            except KmsUnavailable as exc:
                unreachable = exc.with_traceback(None)
                out.append(unreachable)
            except HeimdallError as exc:
                out.append(exc.with_traceback(None))  # its frames hold the batch's plaintexts
        if direct:
            batch = [(parsed, context) for _, parsed, context in direct]
            results: list[bytes | HeimdallError] = (
                self._direct.decrypt_parsed_many(batch)
                if self._direct
                else [self._no_direct_path() for _ in batch]
            )
            for (index, _, _), result in zip(direct, results, strict=True):
                out[index] = result
        return out

    # -- rotation -----------------------------------------------------------------------

    def rewrap_many(
        self, items: Sequence[tuple[Envelope, EncryptionContext]]
    ) -> list[Envelope | HeimdallError]:
        """The envelopes under the provider's latest version: data keys rewrapped (each once,
        in one batch call), KMS-DIRECT values re-encrypted inside the provider (one more).
        Ciphertext binding and encryption_timestamp are unchanged. Per-item results, in order.

        A KMS-DIRECT value under another provider's key (see :class:`heimdall.kms.multi.
        MultiProvider`), when this cipher writes data keys, is sealed anew by it instead: its
        new provider cannot hold it as it was.
        """
        direct = [item for item in items if item[0].algorithm == KMS_DIRECT]
        if not direct:
            return self._envelopes.rewrap_many(items)
        resealed = [
            self._writer is self._envelopes and not self.kms.owns(envelope.key_identifier)
            for envelope, _ in direct
        ]
        in_place = [item for item, reseal in zip(direct, resealed, strict=True) if not reseal]
        others = [item for item in items if item[0].algorithm != KMS_DIRECT]
        wrapped = iter(self._envelopes.rewrap_many(others))
        moved: list[Envelope | HeimdallError] = (
            self._direct.rewrap_many(in_place)
            if self._direct
            else [self._no_direct_path() for _ in in_place]
        )
        values = iter(moved)
        sealed = iter(
            self._reseal(item) for item, reseal in zip(direct, resealed, strict=True) if reseal
        )
        flags = iter(resealed)
        return [
            (next(sealed) if next(flags) else next(values))
            if envelope.algorithm == KMS_DIRECT
            else next(wrapped)
            for envelope, _ in items
        ]

    def _reseal(self, item: tuple[Envelope, EncryptionContext]) -> Envelope | HeimdallError:
        """A KMS-DIRECT value decrypted and sealed anew by the writer; the error otherwise."""
        envelope, context = item
        if self._direct is None:
            return self._no_direct_path()
        try:
            plaintext = self._direct.decrypt_parsed(envelope, context)
            return parse_own(
                self._writer.encrypt(plaintext, context).envelope, envelope.encryption_version
            )
        except HeimdallError as exc:
            return exc

    def rewrap_keys(self, envelopes: Sequence[Envelope]) -> list[Envelope | HeimdallError]:
        """The data keys of *envelopes* (pattern A) rewrapped under the latest version, each
        distinct one once; needs no context, as a data key's wrapping is bound to the header."""
        return self._envelopes.rewrap_keys(envelopes)

    def __repr__(self) -> str:
        version = self.encryption_version.value
        return f"FieldCipher(provider={self.kms.provider!r}, version={version!r})"
