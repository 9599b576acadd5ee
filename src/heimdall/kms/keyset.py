"""Versioned master keys held in this process: the shared core of the local and legacy providers.

A wrapped data key is ``nonce || AES-256-GCM(master key version N, data key) || tag`` whose
associated data binds the provider's domain, the key identifier (which names the version) and the
caller's associated data. A value encrypted directly (:meth:`Keyset.encrypt_values`, pattern B) is
sealed the same way, the value in place of the data key. Key bytes sit inside OpenSSL cipher
contexts only; the decoded buffers they came from are wiped once the contexts exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from heimdall.aead import KEY_SIZE, Aead
from heimdall.errors import KeyNotFound, KeyVersionDisabled
from heimdall.kms.base import (
    DataKey,
    DirectCiphertext,
    KeyDescription,
    KeyState,
    KeyVersionInfo,
    WrappedKey,
)
from heimdall.secret import SecretBytes

__all__ = ["Keyset", "KeysetVersion"]


@dataclass(frozen=True, slots=True)
class KeysetVersion:
    version: int
    state: KeyState
    created_at: str
    aead: Aead


class Keyset:
    """An immutable snapshot of one master key's versions."""

    __slots__ = ("_domain", "_min_decryption", "_min_encryption", "_provider", "_versions", "name")

    def __init__(
        self,
        *,
        provider: str,
        domain: bytes,
        name: str,
        versions: Mapping[int, KeysetVersion],
        min_decryption_version: int = 1,
        min_encryption_version: int = 1,
    ) -> None:
        if not versions:
            raise ValueError("a keyset needs at least one version")
        self._provider = provider
        self._domain = domain
        self.name = name
        self._versions = dict(versions)
        self._min_decryption = min_decryption_version
        self._min_encryption = min_encryption_version

    @property
    def latest_version(self) -> int:
        return max(self._versions)

    def key_identifier(self, version: int) -> str:
        return f"{self.name}-v{version}"

    def state(self, version: int) -> KeyState:
        stored = self._versions[version].state
        if version < self._min_decryption:
            return KeyState.DISABLED
        if version < self._min_encryption:
            return KeyState.RETIRED
        return stored

    def describe(self) -> KeyDescription:
        return KeyDescription(
            provider=self._provider,
            key_name=self.name,
            latest_version=self.latest_version,
            min_decryption_version=self._min_decryption,
            min_encryption_version=self._min_encryption,
            versions=tuple(
                KeyVersionInfo(v, self.state(v), self._versions[v].created_at)
                for v in sorted(self._versions)
            ),
        )

    def _bound(self, key_identifier: str, associated_data: bytes) -> bytes:
        raw = key_identifier.encode()
        return self._domain + len(raw).to_bytes(4, "big") + raw + associated_data

    def generate_data_key(self, associated_data: bytes) -> DataKey:
        plaintext = SecretBytes.random(KEY_SIZE)
        return DataKey(plaintext=plaintext, wrapped=self.wrap(plaintext, associated_data))

    def _seal(self, plaintext: SecretBytes, associated_data: bytes) -> tuple[str, int, bytes]:
        """Key identifier, version and ciphertext of *plaintext* under the latest version."""
        version = self.latest_version
        if self.state(version) is not KeyState.ACTIVE or version < self._min_encryption:
            raise KeyVersionDisabled(
                "the latest key version may not encrypt",
                provider=self._provider,
                key_identifier=self.key_identifier(version),
                key_version=version,
            )
        key_identifier = self.key_identifier(version)
        sealed = self._versions[version].aead.encrypt(
            plaintext.view(), self._bound(key_identifier, associated_data)
        )
        return key_identifier, version, sealed

    def _open(
        self, key_identifier: str, key_version: int, ciphertext: bytes, associated_data: bytes
    ) -> SecretBytes:
        entry = self._versions.get(key_version)
        if entry is None or key_identifier != self.key_identifier(key_version):
            raise KeyNotFound(
                self.foreign(key_identifier),
                provider=self._provider,
                key_identifier=key_identifier,
            )
        if self.state(key_version) is KeyState.DISABLED:
            raise KeyVersionDisabled(
                f"key version {key_version} is disabled for decryption",
                provider=self._provider,
                key_identifier=key_identifier,
                key_version=key_version,
            )
        return entry.aead.decrypt_secret(ciphertext, self._bound(key_identifier, associated_data))

    def wrap(self, plaintext: SecretBytes, associated_data: bytes) -> WrappedKey:
        return WrappedKey(*self._seal(plaintext, associated_data))

    def unwrap(self, wrapped: WrappedKey, associated_data: bytes) -> SecretBytes:
        return self._open(
            wrapped.key_identifier, wrapped.key_version, wrapped.ciphertext, associated_data
        )

    def owns(self, identifier: str) -> bool:
        """Whether *identifier* names a version of this keyset's key (``<name>-v<N>``)."""
        name, _, version = identifier.rpartition("-v")
        return name == self.name and version.isdigit()

    def foreign(self, identifier: str) -> str:
        """Why *identifier* names no key of this keyset, naming the likely cause."""
        name, _, version = identifier.rpartition("-v")
        if identifier.startswith("aws:"):
            return (
                f"the data key was wrapped by another key provider (key {identifier}, an AWS "
                f"KMS key), not by the {self._provider} provider: set HMD_KMS_PROVIDER to the "
                "provider the fields were written with"
            )
        if "/" in identifier:
            return (
                f"the data key was wrapped by another key provider (key {identifier}, a Vault "
                f"Transit key), not by the {self._provider} provider: set HMD_KMS_PROVIDER "
                "to the provider the fields were written with"
            )
        if name != self.name and self._provider == "legacy":
            return (
                f"the data key was wrapped under another HMD_MASTER_KEY ({name}); this one is "
                f"{self.name}: set the key the fields were written with"
            )
        if name != self.name:
            return (
                f"the data key was wrapped under the key {name!r}, and this {self._provider} "
                f"keyring holds {self.name!r}"
            )
        return (
            f"key version {version} is not in this {self._provider} keyring (it holds "
            f"versions {min(self._versions)}-{self.latest_version}): was it replaced?"
        )

    def rewrap(self, wrapped: WrappedKey, associated_data: bytes) -> WrappedKey:
        with self.unwrap(wrapped, associated_data) as plaintext:
            return self.wrap(plaintext, associated_data)

    def encrypt_value(self, plaintext: SecretBytes, associated_data: bytes) -> DirectCiphertext:
        return DirectCiphertext(*self._seal(plaintext, associated_data))

    def decrypt_value(self, value: DirectCiphertext, associated_data: bytes) -> SecretBytes:
        return self._open(
            value.key_identifier, value.key_version, value.ciphertext, associated_data
        )

    def reencrypt_value(self, value: DirectCiphertext, associated_data: bytes) -> DirectCiphertext:
        with self.decrypt_value(value, associated_data) as plaintext:
            return self.encrypt_value(plaintext, associated_data)
