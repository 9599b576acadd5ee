"""AWS KMS as a key provider (``HMD_KMS_PROVIDER=aws``, the aws extra).

spec: KMS Provider Evaluation, AWS Key Management Service. Data keys come from GenerateDataKey
(AES_256) and are unwrapped by Decrypt and rewrapped by ReEncrypt, so no master key ever leaves
KMS and a rewrap never shows heimdall the data key. Each heimdall key version is a KMS key of its
own, found through aliases (:mod:`heimdall.kms.aws_versions`); rotation and the floors are made
in KMS (:mod:`heimdall.kms.aws_rotation`).

Security properties:

* **Binding.** heimdall's associated data becomes the call's EncryptionContext, which KMS binds
  to the ciphertext itself: decrypting or re-encrypting under another context fails inside KMS
  (InvalidCiphertextException, :class:`~heimdall.errors.DecryptionFailed`). A rewrap keeps the
  context. The context is logged by CloudTrail, which is how a decryption recorded there is
  traced to the data key it opened (associated data over 3 KiB is sent as its SHA-256 instead).
* **The expected key.** Decrypt and ReEncrypt always name the KMS key of the version the
  envelope records, never "whatever key the ciphertext names"; a wrapped key relabelled to
  another version is refused by KMS.
* **heimdall's keys only.** Every version's KMS key is checked on every read of the versions
  to be one heimdall made or adopted (:mod:`heimdall.kms.aws_trust`: customer managed,
  symmetric, key material made by KMS, in the expected account, tagged as the version), and a
  version's key never changes within a process (a version alias pointed elsewhere since is
  refused): nothing is wrapped under a key an alias was pointed at by someone else. KMS's
  answers must name the key asked for, in that account.
* **Floors.** A version below the decryption floor, or disabled, is refused here before any
  call, and its KMS key is disabled in KMS too, so a stolen host cannot use it either.
  heimdall's own view of the floors may lag another process's change by up to a minute
  (``_STATE_SECONDS``); KMS refuses a disabled key at once.
* **Identifiers** in envelopes are ``aws:alias/<name>-v<N>``: with ``:`` and ``/``, so never a
  local keyring's (``<name>-v<N>``), and not a Vault mount path; without a region or account,
  so a multi-Region replica of the keys (with the same aliases) reads the same envelopes.
* **Regions.** With ``HMD_AWS_REGIONS``, every call here goes to the first region that answers
  (:mod:`heimdall.kms.aws_regions`): fields stay readable, and new ones writable, while a region
  is down. A new version and the floors are made in every region.

AWS has no batch API: the items of a batch are sent side by side, ``HMD_AWS_CONCURRENCY`` at a
time (``KeyProvider.concurrency``). Credentials, retries and error translation are
:mod:`heimdall.kms.aws_client`'s. boto3 returns each plaintext data key as an immutable
``bytes`` object, which heimdall copies into a wipeable buffer and drops but cannot wipe.
"""

from __future__ import annotations

import binascii
import hashlib
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from heimdall.aead import KEY_SIZE
from heimdall.errors import KeyNotFound, KeyVersionDisabled, KmsError
from heimdall.kms.aws_audit import AwsAuditKey
from heimdall.kms.aws_client import PROVIDER, AwsClients, RegionClients, aws_call, connect
from heimdall.kms.aws_config import AwsSettings
from heimdall.kms.aws_preflight import aws_checks
from heimdall.kms.aws_regions import Regions
from heimdall.kms.aws_rotation import (
    rotate,
    schedule_deletion,
    set_min_decryption_version,
    set_min_encryption_version,
)
from heimdall.kms.aws_trust import Ownership, UntrustedKey, arn_account, ownership_of
from heimdall.kms.aws_versions import (
    KeyChain,
    VersionKey,
    key_id_of,
    list_versions,
    load_chain,
    version_alias,
    version_fix,
)
from heimdall.kms.base import (
    DataKey,
    KeyDescription,
    KeyState,
    KmsCallObserver,
    WrappedKey,
)
from heimdall.kms.provider import KeyProvider
from heimdall.preflight import Check
from heimdall.rbac import Role
from heimdall.secret import SecretBytes

__all__ = ["AwsKms", "encryption_context"]

_T = TypeVar("_T")

_STATE_SECONDS: Final = 60.0  # the versions' states (floors) are read again at least this often
_LATEST_SECONDS: Final = 1.0  # the version aliases, on a version this process does not know
# ... and before encrypting: a version made by another process is wrapped under within this
# long (until then the one before it, still active, serves; one ListAliases per period).
_NEW_VERSION_SECONDS: Final = 10.0
_CONTEXT_KEY: Final = "heimdall:associated-data"
_CONTEXT_DIGEST_KEY: Final = "heimdall:associated-data-sha256"
_CONTEXT_MAX: Final = 3 * 1024


def encryption_context(associated_data: bytes) -> dict[str, str]:
    """The EncryptionContext that binds *associated_data*: its base64 (its SHA-256 when over
    3 KiB, as KMS caps the context's size)."""
    if len(associated_data) > _CONTEXT_MAX:
        digest = hashlib.sha256(associated_data).digest()
        return {_CONTEXT_DIGEST_KEY: binascii.b2a_base64(digest, newline=False).decode()}
    return {_CONTEXT_KEY: binascii.b2a_base64(associated_data, newline=False).decode()}


class AwsKms(KeyProvider):
    """A key provider over heimdall's KMS keys named *settings.key_name*. See the module
    docstring. *clients* default to the SDK's (:func:`heimdall.kms.aws_client.connect`)."""

    provider = PROVIDER

    def __init__(
        self,
        settings: AwsSettings,
        clients: AwsClients | None = None,
        *,
        observer: KmsCallObserver | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(observer=observer)
        self.concurrency = settings.concurrency
        self.settings = settings
        self.clients = clients or connect(settings)
        self.regions = Regions(self.clients, monotonic=monotonic)
        self._name = settings.key_name
        self.key_name = f"{PROVIDER}:alias/{self._name}"
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._ownership_lock = threading.Lock()
        self._ownership: Ownership | None = None
        self._pinned: dict[int, str] = {}  # version: the key ID this process has used for it
        self._chain: KeyChain | None = None
        self._loaded = -math.inf
        self._latest_checked = -math.inf

    def key_identifier(self, version: int) -> str:
        return f"{self.key_name}-v{version}"

    # -- the versions, as last read from AWS ----------------------------------------------

    def _current(self, *, encrypting: bool = False, version: int | None = None) -> KeyChain:
        """The versions, read again when older than ``_STATE_SECONDS``, when *version* is not
        among them, or (*encrypting*) when a version alias was added since."""
        with self._lock:
            now = self._monotonic()
            chain = self._chain
            if chain is None or now - self._loaded >= _STATE_SECONDS:
                return self._reload(now)
            checked = now - self._latest_checked
            if version is not None and version not in chain.versions:
                if checked >= _LATEST_SECONDS:
                    return self._reload(now)
            elif encrypting and checked >= _NEW_VERSION_SECONDS:
                versions, _ = self.regions.call(lambda at: list_versions(at.kms, self._name))
                self._latest_checked = now
                if versions != chain.aliases():
                    return self._reload(now)
            return chain

    def ownership(self) -> Ownership:
        """Where heimdall's keys must be and what they may be (:mod:`heimdall.kms.aws_trust`);
        the account asked of STS once, when no setting names it."""
        with self._ownership_lock:
            if self._ownership is None:
                self._ownership = ownership_of(self.settings, self.clients)
            return self._ownership

    def _reload(self, now: float) -> KeyChain:
        ownership = self.ownership()
        chain = self.regions.call(lambda at: load_chain(at.kms, self._name, ownership))
        self._pin(chain)
        self._chain, self._loaded, self._latest_checked = chain, now, now
        return chain

    def _pin(self, chain: KeyChain) -> None:
        """Refuse a version whose key changed since this process read it: a version's key is
        one KMS key for good (its replicas share its key ID), so another one is not heimdall's
        doing, whichever region answered."""
        for version, key in chain.versions.items():
            pinned = self._pinned.setdefault(version, key.key_id)
            if pinned != key.key_id:
                raise UntrustedKey(
                    f"{version_alias(self._name, version)} points at KMS key {key.key_id}, "
                    f"which is not the key {pinned} it named before: "
                    f"{version_fix(self._name, version)}"
                )

    def _forget(self) -> None:
        with self._lock:
            self._chain = None

    def _encrypting(self) -> tuple[VersionKey, str]:
        """The latest version's key, which new data keys are wrapped under, and its identifier."""
        chain = self._current(encrypting=True)
        if not chain.versions:
            raise self._no_versions()
        key = chain.versions[chain.latest_version]
        identifier = self.key_identifier(key.version)
        if key.state is not KeyState.ACTIVE or key.version < chain.min_encryption_version:
            raise KeyVersionDisabled(
                "the latest key version may not encrypt",
                provider=PROVIDER,
                key_identifier=identifier,
                key_version=key.version,
            )
        return key, identifier

    def _decrypting(self, wrapped: WrappedKey) -> VersionKey:
        """The key of the version *wrapped* names, refused below the floor before any call."""
        version = wrapped.key_version
        if wrapped.key_identifier != self.key_identifier(version):
            raise KeyNotFound(
                "the wrapped key's identifier does not name its version",
                provider=PROVIDER,
                key_identifier=wrapped.key_identifier,
            )
        chain = self._current(version=version)
        key = chain.versions.get(version)
        if version < chain.min_decryption_version or (
            key is not None and key.state is KeyState.DISABLED
        ):
            raise KeyVersionDisabled(
                f"key version {version} is disabled for decryption",
                provider=PROVIDER,
                key_identifier=wrapped.key_identifier,
                key_version=version,
            )
        if key is None:
            raise KeyNotFound(
                f"{self.key_name} has no version {version} (its KMS key was never made, or "
                "was deleted)",
                provider=PROVIDER,
                key_identifier=wrapped.key_identifier,
            )
        return key

    # -- data keys --------------------------------------------------------------------------

    def owns(self, key_identifier: str) -> bool:
        """``aws:alias/<name>-v<N>``, the identifiers this key's wrapped keys carry."""
        name, _, version = key_identifier.rpartition("-v")
        return name == self.key_name and version.isdigit() and version == str(int(version))

    def _foreign(self, key_identifier: str) -> str:
        if key_identifier.startswith(f"{PROVIDER}:alias/"):
            return (
                f"the data key was wrapped under {key_identifier.removeprefix(PROVIDER + ':')}, "
                f"and this provider uses alias/{self._name}: set HMD_KMS_KEY_NAME (or "
                "HMD_AWS_KEY) to the key the fields were written with"
            )
        return (
            f"the data key was wrapped by another key provider (key {key_identifier}), not by "
            "AWS KMS: set HMD_KMS_PROVIDER to the provider the fields were written with"
        )

    def _send(
        self, action: str, identifier: str, request: Callable[[Any], dict[str, Any]]
    ) -> dict[str, Any]:
        """*request*'s answer from the first region that answers; *action* completes "could
        not ..." in an error's message."""

        def attempt(region: RegionClients) -> dict[str, Any]:
            answer: dict[str, Any] = aws_call(
                action, lambda: request(region.kms), key_identifier=identifier
            )
            return answer

        return self.regions.call(attempt)

    def _under_latest(self, call: Callable[[VersionKey, str], _T]) -> _T:
        """*call* under the latest version's key. KMS refusing that key as disabled means
        another process rotated away from it since this one last looked (emergency
        rotation): the versions are read again and *call* (which stores nothing) is made
        once more under the version that is latest now. heimdall's own refusal of the latest
        version (disabled or below the floor in its view) is final: nothing was asked of KMS."""
        key, identifier = self._encrypting()
        try:
            return call(key, identifier)
        except KeyVersionDisabled:
            self._forget()
            return call(*self._encrypting())

    def _generate_data_key(self, associated_data: bytes) -> DataKey:
        def generate(key: VersionKey, identifier: str) -> DataKey:
            answer = self._send(
                f"generate a data key under {identifier}",
                identifier,
                lambda kms: kms.generate_data_key(
                    KeyId=key.key_id,
                    KeySpec="AES_256",
                    EncryptionContext=encryption_context(associated_data),
                ),
            )
            plaintext = SecretBytes(answer.pop("Plaintext", b""))
            try:
                self._check_key(answer, key, identifier)
            except KmsError:
                plaintext.wipe()
                raise
            wrapped = WrappedKey(identifier, key.version, answer["CiphertextBlob"])
            return DataKey(plaintext, wrapped)

        return self._under_latest(generate)

    def _wrap_one(self, plaintext: SecretBytes, associated_data: bytes) -> WrappedKey:
        def wrap(key: VersionKey, identifier: str) -> WrappedKey:
            answer = self._send(
                f"wrap a data key under {identifier}",
                identifier,
                lambda kms: kms.encrypt(
                    KeyId=key.key_id,
                    Plaintext=plaintext.view(),
                    EncryptionContext=encryption_context(associated_data),
                ),
            )
            self._check_key(answer, key, identifier)
            return WrappedKey(identifier, key.version, answer["CiphertextBlob"])

        return self._under_latest(wrap)

    def _unwrap_one(self, wrapped: WrappedKey, associated_data: bytes) -> SecretBytes:
        key = self._decrypting(wrapped)
        identifier = wrapped.key_identifier
        answer = self._send(
            f"unwrap a data key under {identifier}",
            identifier,
            lambda kms: kms.decrypt(
                CiphertextBlob=wrapped.ciphertext,
                KeyId=key.key_id,
                EncryptionContext=encryption_context(associated_data),
                EncryptionAlgorithm="SYMMETRIC_DEFAULT",
            ),
        )
        plaintext = SecretBytes(answer.pop("Plaintext", b""))
        try:
            self._check_key(answer, key, identifier)
            if len(plaintext) != KEY_SIZE:
                raise KmsError("AWS KMS unwrapped a data key of the wrong size", provider=PROVIDER)
        except KmsError:
            plaintext.wipe()
            raise
        return plaintext

    def _rewrap_one(self, wrapped: WrappedKey, associated_data: bytes) -> WrappedKey:
        source = self._decrypting(wrapped)
        key, identifier = self._encrypting()
        context = encryption_context(associated_data)
        answer = self._send(
            f"rewrap a data key from {wrapped.key_identifier} to {identifier}",
            wrapped.key_identifier,
            lambda kms: kms.re_encrypt(
                CiphertextBlob=wrapped.ciphertext,
                SourceKeyId=source.key_id,
                SourceEncryptionContext=context,
                DestinationKeyId=key.key_id,
                DestinationEncryptionContext=context,
            ),
        )
        self._check_key(answer, key, identifier)
        return WrappedKey(identifier, key.version, answer["CiphertextBlob"])

    def _check_key(self, answer: dict[str, Any], key: VersionKey, identifier: str) -> None:
        """KMS says which key it used: it must be the one asked for, in the expected account."""
        named = str(answer.get("KeyId") or "")
        account = arn_account(named)
        blob = answer.get("CiphertextBlob", b"")
        if (
            key_id_of(named) != key.key_id
            or (account is not None and account != self.ownership().account)
            or not isinstance(blob, bytes)
        ):
            raise KmsError(
                f"AWS KMS answered for another key than {identifier}",
                provider=PROVIDER,
                key_identifier=identifier,
            )

    # -- the key ----------------------------------------------------------------------------

    def _describe(self) -> KeyDescription:
        return self._fresh().describe(self.key_name)

    def _fresh(self) -> KeyChain:
        """The versions read now; KeyNotFound when there are none (no bootstrap yet)."""
        with self._lock:
            chain = self._reload(self._monotonic())
        if not chain.versions:
            raise self._no_versions()
        return chain

    def _no_versions(self) -> KeyNotFound:
        return KeyNotFound(
            f"AWS KMS has no alias/{self._name}-v1: run `heimdall aws bootstrap`",
            provider=PROVIDER,
            key_identifier=self.key_identifier(1),
        )

    def versions(self) -> KeyChain:
        """Every version as AWS describes it now (for ``heimdall kms check``)."""
        with self._call("describe"):
            return self._fresh()

    def _changed(self, change: Callable[[KeyChain], object]) -> KeyDescription:
        try:
            change(self._fresh())
        finally:
            self._forget()
        return self._describe()

    def _rotate(self) -> KeyDescription:
        return self._changed(lambda chain: rotate(self.clients, chain))

    def _set_min_decryption_version(self, version: int) -> KeyDescription:
        return self._changed(lambda chain: set_min_decryption_version(self.clients, chain, version))

    def _set_min_encryption_version(self, version: int) -> KeyDescription:
        return self._changed(lambda chain: set_min_encryption_version(self.clients, chain, version))

    def schedule_deletion(self, below: int, days: int) -> list[tuple[int, str]]:
        """Schedule the deletion of the KMS keys of the versions below *below*, which must be
        disabled (spec: Runbook: Emergency Key Compromise Response, Retire Old Key);
        (version, deletion date) of each scheduled now."""
        with self._call("configure"):
            try:
                return schedule_deletion(self.clients, self._fresh(), below, days)
            finally:
                self._forget()

    # -- the audit key and pre-flight -------------------------------------------------------

    def audit_key(self) -> AwsAuditKey:
        """The KMS HMAC key that authenticates the audit trail's checkpoints."""
        return AwsAuditKey(self.clients, self._name, self.regions, ownership=self.ownership)

    def preflight(self, role: Role | None = None) -> list[Check]:
        """Credentials, the key and what *role* may do with it (:mod:`heimdall.kms.
        aws_preflight`); :func:`heimdall.preflight.run_checks` adds the round trip."""
        return aws_checks(self, role)

    def __repr__(self) -> str:
        regions = ", ".join(region or "the SDK's region" for region in self.settings.regions)
        return f"AwsKms(key={self.key_name!r}, regions={regions!r})"
