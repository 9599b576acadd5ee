"""Vault / OpenBao Transit as a key provider.

spec: KMS Provider Evaluation, HashiCorp Vault (both integration patterns). The Transit key
(``HMD_VAULT_MOUNT``/``HMD_KMS_KEY_NAME``, default ``transit``/``heimdall-pii``) never leaves
Vault. Data keys come from ``datakey/plaintext`` and are wrapped, unwrapped and rewrapped by
Transit (pattern A, :class:`~heimdall.kms.base.KeyManagementService`); with pattern B Transit
encrypts the field values themselves (:class:`~heimdall.kms.base.DirectEncryption`), through
the same ``encrypt``, ``decrypt`` and ``rewrap`` endpoints.

Binding: heimdall's associated data is sent as Transit's key-derivation ``context``, so Vault
derives a distinct key per context and decrypting or rewrapping under another context fails.
(Transit's ``associated_data`` parameter would bind it as well, but ``rewrap`` does not accept
it, and rewrap is what keeps data keys inside Vault during a rotation.) The key must therefore
be created with ``derived=true``, as ``heimdall vault bootstrap`` does.

Key identifiers are ``<mount>/<key>-v<version>``; the version must agree with the ``vault:vN:``
prefix Transit puts on its ciphertext.
"""

from __future__ import annotations

import binascii
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from heimdall.errors import (
    ConfigurationError,
    HeimdallError,
    KeyNotFound,
    KmsError,
    KmsUnavailable,
)
from heimdall.kms.base import (
    DataKey,
    DirectCiphertext,
    KeyDescription,
    KeyState,
    KeyVersionInfo,
    KmsCallObserver,
    WrappedKey,
)
from heimdall.kms.provider import KeyProvider
from heimdall.kms.vault_config import VaultSettings
from heimdall.kms.vault_preflight import AUDIT_DEVICES, KEY_METADATA, access_checks, needs
from heimdall.kms.vault_transport import PROVIDER, VaultTransport, error_for_message
from heimdall.preflight import Check, key_readable
from heimdall.rbac import Role
from heimdall.secret import SecretBytes

_SERVING = frozenset({"active", "standby", "performance standby"})

__all__ = ["VaultTransit"]


_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def _b64(data: bytes | bytearray) -> str:
    return binascii.b2a_base64(data, newline=False).decode()


def _plaintext_answer(answer: dict[str, Any]) -> SecretBytes:
    """The plaintext of a Transit answer, decoded straight into a wipeable buffer (the
    response's own text is the one copy heimdall cannot wipe)."""
    text = answer.get("plaintext") or ""
    try:
        return SecretBytes.from_base64(text if isinstance(text, str) else "")
    except ValueError:
        raise KmsError("vault returned a plaintext that is not base64", provider=PROVIDER) from None


def _version_of(ciphertext: str) -> int:
    prefix, _, rest = ciphertext.partition(":")
    version, _, _ = rest.partition(":")
    if prefix != "vault" or not version.startswith("v") or not version[1:].isdigit():
        raise KmsError("vault returned a ciphertext without a version prefix", provider=PROVIDER)
    return int(version[1:])


class VaultTransit(KeyProvider):
    """A key provider (and DirectEncryption) over one Transit key. See the module docstring.

    *observer* is told of every call, once (see :class:`heimdall.kms.provider.KeyProvider`).
    """

    provider = PROVIDER

    def __init__(
        self,
        settings: VaultSettings,
        transport: VaultTransport | None = None,
        *,
        observer: KmsCallObserver | None = None,
    ) -> None:
        super().__init__(observer=observer)
        self.settings = settings
        self.transport = transport or VaultTransport(settings)
        self._base = f"{settings.mount}"
        self._key = settings.key_name
        # Per version, built once: batches are hot paths.
        self._identifiers: dict[int, str] = {}
        self._prefixes: dict[int, str] = {}
        self._by_prefix: dict[str, tuple[int, str]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = 0
        self._senders_lock = threading.Lock()

    def key_identifier(self, version: int) -> str:
        identifier = self._identifiers.get(version)
        if identifier is None:
            identifier = self._identifiers[version] = (
                f"{self.settings.mount}/{self._key}-v{version}"
            )
        return identifier

    def _path(self, operation: str) -> str:
        return f"{self._base}/{operation}/{self._key}"

    def _version(self, ciphertext: str) -> tuple[int, str]:
        """Key version and identifier of a Transit ciphertext."""
        # Batches answer with a handful of versions: look each ``vault:vN:`` prefix up once.
        prefix = ciphertext[: ciphertext.find(":", 6) + 1]
        known = self._by_prefix.get(prefix)
        if known is None:
            version = _version_of(ciphertext)
            known = self._by_prefix[prefix] = (version, self.key_identifier(version))
        return known

    def _wrapped(self, ciphertext: str) -> WrappedKey:
        version, identifier = self._version(ciphertext)
        return WrappedKey(identifier, version, ciphertext.encode())

    def _direct(self, ciphertext: str) -> DirectCiphertext:
        version, identifier = self._version(ciphertext)
        return DirectCiphertext(identifier, version, ciphertext.encode())

    def _prefix(self, version: int) -> str:
        prefix = self._prefixes.get(version)
        if prefix is None:
            prefix = self._prefixes[version] = f"vault:v{version}:"
        return prefix

    def _check(self, sealed: WrappedKey | DirectCiphertext) -> str:
        """The Transit ciphertext of *sealed*, after checking it names a version of this key."""
        try:
            text = sealed.ciphertext.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if not text.startswith("vault:v"):
            raise KeyNotFound(
                "the wrapped key is not a Transit ciphertext",
                provider=PROVIDER,
                key_identifier=sealed.key_identifier,
            )
        version = sealed.key_version
        if not text.startswith(self._prefix(version)) or (
            sealed.key_identifier != self.key_identifier(version)
        ):
            raise KeyNotFound(
                "the wrapped key does not belong to this Transit key version",
                provider=PROVIDER,
                key_identifier=sealed.key_identifier,
            )
        return text

    # -- data keys ------------------------------------------------------------------------

    def owns(self, key_identifier: str) -> bool:
        """``<mount>/<key>-v<N>``, the identifiers this key's wrapped keys carry."""
        name, _, version = key_identifier.rpartition("-v")
        return name == f"{self.settings.mount}/{self._key}" and version.isdigit()

    def _generate_data_key(self, associated_data: bytes) -> DataKey:
        data = self.transport.call(
            "POST",
            f"{self._base}/datakey/plaintext/{self._key}",
            {"context": _b64(associated_data), "bits": 256},
        )["data"]
        plaintext = _plaintext_answer(data)
        return DataKey(plaintext=plaintext, wrapped=self._wrapped(data["ciphertext"]))

    def _wrap_many(
        self, items: Sequence[tuple[SecretBytes, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        return self._batch("encrypt", items, self._plaintext_item, self._wrapped_answer)

    def _unwrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[SecretBytes | HeimdallError]:
        return self._batch("decrypt", items, self._ciphertext_item, _plaintext_answer)

    def _rewrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        return self._batch("rewrap", items, self._ciphertext_item, self._wrapped_answer)

    # -- values (pattern B) ---------------------------------------------------------------

    def encrypt_values(
        self, items: Sequence[tuple[SecretBytes, bytes]]
    ) -> list[DirectCiphertext | HeimdallError]:
        with self._call("encrypt_values"):
            return self._batch("encrypt", items, self._plaintext_item, self._direct_answer)

    def decrypt_values(
        self, items: Sequence[tuple[DirectCiphertext, bytes]]
    ) -> list[SecretBytes | HeimdallError]:
        with self._call("decrypt_values"):
            return self._batch("decrypt", items, self._ciphertext_item, _plaintext_answer)

    def reencrypt_values(
        self, items: Sequence[tuple[DirectCiphertext, bytes]]
    ) -> list[DirectCiphertext | HeimdallError]:
        with self._call("reencrypt_values"):
            return self._batch("rewrap", items, self._ciphertext_item, self._direct_answer)

    # -- batches --------------------------------------------------------------------------

    @staticmethod
    def _plaintext_item(item: tuple[SecretBytes, bytes]) -> dict[str, str]:
        secret, ad = item
        return {"plaintext": _b64(secret.view()), "context": _b64(ad)}

    def _ciphertext_item(self, item: tuple[WrappedKey | DirectCiphertext, bytes]) -> dict[str, str]:
        """Raises for a ciphertext that does not name a version of this key: it fails on its
        own."""
        sealed, ad = item
        return {"ciphertext": self._check(sealed), "context": _b64(ad)}

    def _wrapped_answer(self, answer: dict[str, Any]) -> WrappedKey:
        return self._wrapped(answer["ciphertext"])

    def _direct_answer(self, answer: dict[str, Any]) -> DirectCiphertext:
        return self._direct(answer["ciphertext"])

    def _batch(
        self,
        operation: str,
        items: Sequence[_Item],
        request: Callable[[_Item], dict[str, str]],
        result: Callable[[dict[str, Any]], _Result],
    ) -> list[_Result | HeimdallError]:
        """Transit batch_input in chunks the server accepts; one result per item, in order.

        Each chunk is built, sent and read by one thread, so the client prepares and reads
        some chunks while Vault works on others. A chunk that fails as a whole (unreachable,
        denied) raises: nothing of it was done. An item Vault refuses, or that *request*
        refuses, carries its own error.
        """
        size = self.settings.batch_size
        path = self._path(operation)

        def run(start: int) -> list[_Result | HeimdallError]:
            out: list[_Result | HeimdallError | None] = []
            bodies: list[dict[str, str]] = []
            sent: list[int] = []  # positions in *out* whose answer comes from Vault
            for item in items[start : start + size]:
                try:
                    bodies.append(request(item))
                except HeimdallError as exc:
                    out.append(exc)
                    continue
                sent.append(len(out))
                out.append(None)
            if not bodies:
                return cast("list[_Result | HeimdallError]", out)
            payload = self.transport.call("POST", path, {"batch_input": bodies}, partial_ok=True)
            answers = payload.get("data", {}).get("batch_results")
            if not isinstance(answers, list) or len(answers) != len(bodies):
                raise KmsError("vault returned a malformed batch answer", provider=PROVIDER)
            for position, answer in zip(sent, answers, strict=True):
                error = answer.get("error")
                out[position] = error_for_message(str(error)) if error else result(answer)
            return cast("list[_Result | HeimdallError]", out)

        starts = range(0, len(items), size)
        if len(starts) <= 1 or self.settings.concurrency <= 1:
            chunks = [run(start) for start in starts]
        else:
            # Vault spreads concurrent requests over its cores; the client waits in I/O.
            futures = [self._senders().submit(run, start) for start in starts]
            wait(futures)  # every chunk has finished before any error is raised
            chunks = [future.result() for future in futures]
        return [outcome for chunk in chunks for outcome in chunk]

    def _senders(self) -> ThreadPoolExecutor:
        """The threads that send batch requests: HMD_VAULT_CONCURRENCY of them, started once
        per process and shared by every caller of this provider."""
        with self._senders_lock:
            if self._executor is None or self._executor_pid != os.getpid():
                # A forked child has the parent's executor but none of its threads.
                self._executor = ThreadPoolExecutor(
                    self.settings.concurrency, thread_name_prefix="heimdall-vault"
                )
                self._executor_pid = os.getpid()
            return self._executor

    # -- the key --------------------------------------------------------------------------

    def _describe(self) -> KeyDescription:
        data = self.transport.call("GET", f"{self._base}/keys/{self._key}")["data"]
        return self._description(data)

    def _description(self, data: dict[str, Any]) -> KeyDescription:
        if not data.get("derived"):
            raise ConfigurationError(
                f"transit key {self._key} is not derived; heimdall binds each field's context "
                "through key derivation (create it with `heimdall vault bootstrap`)"
            )
        latest = int(data["latest_version"])
        min_decryption = int(data.get("min_decryption_version") or 1)
        min_encryption = int(data.get("min_encryption_version") or 0)
        # Transit lists only versions at or above min_decryption_version; the ones below it
        # still exist (archived) and are reported as disabled.
        versions = [
            KeyVersionInfo(version, KeyState.DISABLED, "") for version in range(1, min_decryption)
        ]
        for raw_version, created in sorted(data["keys"].items(), key=lambda kv: int(kv[0])):
            version = int(raw_version)
            if version < min_decryption:
                state = KeyState.DISABLED
            elif min_encryption and version < min_encryption:
                state = KeyState.RETIRED
            else:
                state = KeyState.ACTIVE
            stamp = datetime.fromtimestamp(int(created), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            versions.append(KeyVersionInfo(version, state, stamp))
        return KeyDescription(
            provider=PROVIDER,
            key_name=f"{self.settings.mount}/{self._key}",
            latest_version=latest,
            min_decryption_version=min_decryption,
            min_encryption_version=min_encryption,
            versions=tuple(versions),
        )

    def _rotate(self) -> KeyDescription:
        """Rotate once. Never retried blindly: after a failure the key is read again, and the
        rotation is only reported failed if the latest version did not move."""
        before = self._describe().latest_version
        try:
            self.transport.call(
                "POST", f"{self._base}/keys/{self._key}/rotate", {}, idempotent=False
            )
        except KmsUnavailable:
            after = self._describe()
            if after.latest_version > before:
                return after
            raise
        return self._describe()

    def _set_min_decryption_version(self, version: int) -> KeyDescription:
        return self._configure({"min_decryption_version": version})

    def _set_min_encryption_version(self, version: int) -> KeyDescription:
        return self._configure({"min_encryption_version": version})

    def _configure(self, body: dict[str, int]) -> KeyDescription:
        self.transport.call("POST", f"{self._base}/keys/{self._key}/config", body)
        return self._describe()

    def preflight(self, role: Role | None = None) -> list[Check]:
        """Connectivity of every address and authentication; then what *role* needs
        (:mod:`heimdall.kms.vault_preflight`): its capabilities, export refused, an enabled
        audit device and the key readable, the last two only where the role may list or read
        them. ``None``, the local operator, is checked by listing and reading."""
        checks = [
            Check(f"connectivity {address}", state in _SERVING, state)
            for address, state in self.transport.node_states()
        ]
        checks.append(self._authentication())
        checks.extend(access_checks(self.transport, role, self.settings.mount, self._key))
        if needs(role, AUDIT_DEVICES, "sudo"):
            checks.append(self._audit_device())
        else:
            checks.append(Check.skip("audit device", f"{role} may not list audit devices"))
        if needs(role, KEY_METADATA, "read"):
            checks.append(key_readable(self))
        else:
            checks.append(Check.skip("key readable", f"{role} may not read the key"))
        return checks

    def _authentication(self) -> Check:
        try:
            self.transport.call("GET", "auth/token/lookup-self")
        except HeimdallError as exc:
            return Check("authentication", False, str(exc))
        return Check("authentication", True, f"{self.settings.auth.value} auth, token valid")

    def _audit_device(self) -> Check:
        try:
            devices = self.transport.call("GET", AUDIT_DEVICES).get("data") or {}
        except HeimdallError as exc:
            return Check("audit device", False, f"cannot list audit devices: {exc}")
        enabled = sorted(str(d.get("type")) for d in devices.values() if isinstance(d, dict))
        if not enabled:
            return Check("audit device", False, "no audit device is enabled")
        return Check("audit device", True, f"enabled: {', '.join(enabled)}")

    def __repr__(self) -> str:
        key = f"{self.settings.mount}/{self._key}"
        return f"VaultTransit(addresses={self.settings.addresses!r}, key={key!r})"
