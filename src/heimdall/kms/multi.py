"""One store, several key providers: write with one, read with each.

spec: KMS Provider Evaluation (deployments switch between key services) and Key Identifiers and
Versioning. Every envelope names the key that wrapped its data key (``key_identifier``), and
each provider knows its own identifiers (:meth:`KeyProvider.owns
<heimdall.kms.provider.KeyProvider.owns>`). A :class:`MultiProvider` is the provider heimdall
uses while a deployment moves from one key service to another (``HMD_KMS_READ_PROVIDERS``):

* new data keys, rotation, floors and ``describe`` are the *primary*'s, the provider that
  ``HMD_KMS_PROVIDER`` names: everything written goes under its key;
* an unwrap goes to the provider that owns the wrapped key's identifier, so fields under the
  old provider, the new one, or a third one stay readable at every moment of the move;
* a rewrap of a key another provider owns is the move itself: the data key is unwrapped there
  and wrapped by the primary, bound to the same associated data, so the envelope keeps its
  data ciphertext (:func:`heimdall.envelope.Envelope.rewrapped`). The plaintext data key exists
  in this process for that moment only, and is wiped (a rewrap within one provider never
  takes it out of the service).

A wrapped key no member owns goes to the primary, which refuses it with KeyNotFound naming the
likely cause. Each member counts and times its own calls, as on its own.

Values a provider encrypted itself (pattern B, ``KMS-DIRECT``) are routed the same way; one
under another provider can move only to a primary that encrypts values itself, and otherwise
is sealed anew under a data key by :class:`heimdall.cipher.FieldCipher`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from heimdall.errors import HeimdallError, UnsupportedEnvelope
from heimdall.kms.base import (
    DataKey,
    DirectCiphertext,
    DirectEncryption,
    KeyDescription,
    KeyManagementService,
    WrappedKey,
)
from heimdall.secret import SecretBytes

__all__ = ["MultiProvider"]

_Key = TypeVar("_Key", WrappedKey, DirectCiphertext)
_Result = TypeVar("_Result")

_Batch = Callable[[Sequence[tuple[_Key, bytes]]], list[_Result | HeimdallError]]


class MultiProvider:
    """Writes with *primary*, reads with it and *readers*. See the module docstring.

    It implements :class:`~heimdall.kms.base.KeyManagementService` and
    :class:`~heimdall.kms.base.DirectEncryption`; :meth:`encrypt_values` needs a primary that
    encrypts values itself.
    """

    def __init__(
        self, primary: KeyManagementService, readers: Sequence[KeyManagementService]
    ) -> None:
        names = [primary.provider, *(reader.provider for reader in readers)]
        if len(set(names)) != len(names):
            raise ValueError(f"each key provider may be named once, not {', '.join(names)}")
        self.primary = primary
        self.readers = tuple(readers)

    @property
    def provider(self) -> str:
        return self.primary.provider

    @property
    def members(self) -> tuple[KeyManagementService, ...]:
        """The primary, then the readers."""
        return (self.primary, *self.readers)

    def owns(self, key_identifier: str) -> bool:
        """Whether *key_identifier* names a version of the primary's key: the key that new
        fields go under (the readers' keys are only read)."""
        return self.primary.owns(key_identifier)

    def owner(self, key_identifier: str) -> KeyManagementService | None:
        """The member that owns *key_identifier*, the primary first; None if none does."""
        for member in self.members:
            if member.owns(key_identifier):
                return member
        return None

    # -- the primary's ------------------------------------------------------------------

    def generate_data_key(self, associated_data: bytes) -> DataKey:
        return self.primary.generate_data_key(associated_data)

    def wrap(self, plaintext: SecretBytes, associated_data: bytes) -> WrappedKey:
        return self.primary.wrap(plaintext, associated_data)

    def wrap_many(
        self, items: Sequence[tuple[SecretBytes, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        return self.primary.wrap_many(items)

    def rotate(self) -> KeyDescription:
        return self.primary.rotate()

    def set_min_decryption_version(self, version: int) -> KeyDescription:
        return self.primary.set_min_decryption_version(version)

    def set_min_encryption_version(self, version: int) -> KeyDescription:
        return self.primary.set_min_encryption_version(version)

    def describe(self) -> KeyDescription:
        return self.primary.describe()

    # -- routed by the wrapped key's owner ----------------------------------------------

    def unwrap(self, wrapped: WrappedKey, associated_data: bytes) -> SecretBytes:
        return _one(self.unwrap_many([(wrapped, associated_data)]))

    def unwrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[SecretBytes | HeimdallError]:
        return self._routed(items, lambda member: member.unwrap_many)

    def rewrap(self, wrapped: WrappedKey, associated_data: bytes) -> WrappedKey:
        return _one(self.rewrap_many([(wrapped, associated_data)]))

    def rewrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        """Under the primary's latest version: a key it owns (or that nobody does) rewrapped
        inside it; a reader's moved to it."""
        return self._routed(
            items,
            lambda member: (
                self.primary.rewrap_many if member is self.primary else self._mover(member)
            ),
        )

    def _mover(
        self, reader: KeyManagementService
    ) -> Callable[[Sequence[tuple[WrappedKey, bytes]]], list[WrappedKey | HeimdallError]]:
        def move(items: Sequence[tuple[WrappedKey, bytes]]) -> list[WrappedKey | HeimdallError]:
            return _moved(items, reader.unwrap_many, self.primary.wrap_many)

        return move

    # -- values the provider encrypts itself (pattern B) -------------------------------------

    def encrypt_values(
        self, items: Sequence[tuple[SecretBytes, bytes]]
    ) -> list[DirectCiphertext | HeimdallError]:
        if not isinstance(self.primary, DirectEncryption):
            raise UnsupportedEnvelope(
                f"the {self.primary.provider} key provider does not encrypt values itself"
            )
        return self.primary.encrypt_values(items)

    def decrypt_values(
        self, items: Sequence[tuple[DirectCiphertext, bytes]]
    ) -> list[SecretBytes | HeimdallError]:
        return self._routed(items, lambda member: _direct(member).decrypt_values)

    def reencrypt_values(
        self, items: Sequence[tuple[DirectCiphertext, bytes]]
    ) -> list[DirectCiphertext | HeimdallError]:
        """Under the primary's latest version, inside it; a reader's value decrypted there and
        encrypted by the primary, which must encrypt values itself."""

        def batch(
            member: KeyManagementService,
        ) -> Callable[
            [Sequence[tuple[DirectCiphertext, bytes]]], list[DirectCiphertext | HeimdallError]
        ]:
            if member is self.primary:
                return _direct(member).reencrypt_values
            return lambda some: _moved(
                some, _direct(member).decrypt_values, _direct(self.primary).encrypt_values
            )

        return self._routed(items, batch)

    # -- plumbing -------------------------------------------------------------------------

    def _routed(
        self,
        items: Sequence[tuple[_Key, bytes]],
        batch_of: Callable[[KeyManagementService], _Batch[_Key, _Result]],
    ) -> list[_Result | HeimdallError]:
        """Each item sent to its owner's batch (the primary's for an item nobody owns), one
        call per member; the results in the items' order."""
        groups: dict[int, list[int]] = {}
        members = self.members
        for position, (key, _) in enumerate(items):
            owner = self.owner(key.key_identifier) or self.primary
            groups.setdefault(members.index(owner), []).append(position)
        # A call that fails as a whole raises, as the member's own call would.
        results: dict[int, _Result | HeimdallError] = {}
        for index, positions in groups.items():
            answers = batch_of(members[index])([items[p] for p in positions])
            results.update(zip(positions, answers, strict=True))
        return [results[position] for position in range(len(items))]

    def __repr__(self) -> str:
        readers = ", ".join(repr(reader.provider) for reader in self.readers)
        return f"MultiProvider(primary={self.primary.provider!r}, readers=[{readers}])"


class _NotDirect:
    """The DirectEncryption of a member that has none: every item refused on its own."""

    def __init__(self, member: KeyManagementService) -> None:
        self._error = UnsupportedEnvelope(
            "a KMS-DIRECT value needs a key provider that encrypts values itself, and "
            f"{member.provider} does not"
        )

    def _refuse(self, items: Sequence[object]) -> list[HeimdallError]:
        return [self._error for _ in items]

    def encrypt_values(
        self, items: Sequence[tuple[SecretBytes, bytes]]
    ) -> list[DirectCiphertext | HeimdallError]:
        return list(self._refuse(items))

    def decrypt_values(
        self, items: Sequence[tuple[DirectCiphertext, bytes]]
    ) -> list[SecretBytes | HeimdallError]:
        return list(self._refuse(items))

    def reencrypt_values(
        self, items: Sequence[tuple[DirectCiphertext, bytes]]
    ) -> list[DirectCiphertext | HeimdallError]:
        return list(self._refuse(items))


def _direct(member: KeyManagementService) -> DirectEncryption:
    return member if isinstance(member, DirectEncryption) else _NotDirect(member)


def _moved(
    items: Sequence[tuple[_Key, bytes]],
    take_out: Callable[[Sequence[tuple[_Key, bytes]]], list[SecretBytes | HeimdallError]],
    put_in: Callable[[Sequence[tuple[SecretBytes, bytes]]], list[_Result | HeimdallError]],
) -> list[_Result | HeimdallError]:
    """Each item decrypted by *take_out* and encrypted by *put_in* under the same associated
    data; the plaintexts wiped whatever happens."""
    plaintexts = take_out(items)
    try:
        ready = [
            (position, (plaintext, items[position][1]))
            for position, plaintext in enumerate(plaintexts)
            if isinstance(plaintext, SecretBytes)
        ]
        put = iter(put_in([item for _, item in ready]) if ready else [])
        return [
            next(put) if isinstance(plaintext, SecretBytes) else plaintext
            for plaintext in plaintexts
        ]
    finally:
        for plaintext in plaintexts:
            if isinstance(plaintext, SecretBytes):
                plaintext.wipe()


def _one(results: list[_Result | HeimdallError]) -> _Result:
    (result,) = results
    if isinstance(result, HeimdallError):
        raise result
    return result
