"""The heimdall service: audited, permission-checked operations on encrypted fields.

Every public method checks the caller's permission first, audits what it did (successes and
failures, with identifiers only), and raises only :mod:`heimdall.errors` types. This is the
data plane: encrypt (through :mod:`heimdall.ingest`), decrypt, lookup, status and the blind
index. The key lifecycle is :mod:`heimdall.rotation` (this class offers its everyday steps as
methods: rotate, set a floor, count dependents), and so is re-encryption.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from heimdall import metrics
from heimdall.audit import AuditEvent, AuditSink, EventType, utc_now_ms
from heimdall.blind_index import META_KEY, BlindIndex, StoredIndexKey, is_canonical_key
from heimdall.cipher import FieldCipher
from heimdall.envelope import EncryptionContext, load
from heimdall.errors import (
    FieldNotFound,
    HeimdallError,
    InvalidInput,
    PermissionDenied,
    StorageError,
)
from heimdall.kms.base import KeyDescription, KeyManagementService
from heimdall.modes import CipherRouter
from heimdall.normalize import normalize
from heimdall.policy import FieldAction, Policy
from heimdall.rbac import Caller, Permission
from heimdall.rotation import lifecycle
from heimdall.store.base import FieldCount, FieldValue, GraphStore

__all__ = ["FIELD_LABEL", "Heimdall", "LookupResult", "Status"]

FIELD_LABEL: Final = "FieldValue"
_REASON_RE: Final = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,199}\Z")


@dataclass(frozen=True, slots=True)
class LookupResult:
    canonical_key: str
    found: bool
    sightings: int


@dataclass(frozen=True, slots=True)
class Status:
    mode: str
    provider: str
    latest_version: int
    counts: tuple[FieldCount, ...]

    @property
    def total(self) -> int:
        return sum(c.count for c in self.counts)


def field_context(field: FieldValue) -> EncryptionContext:
    return EncryptionContext(FIELD_LABEL, field.canonical_key, field.field_name)


class Heimdall:
    """Composes a cipher router, a store, an audit sink and a policy."""

    def __init__(
        self,
        *,
        router: CipherRouter,
        store: GraphStore,
        audit: AuditSink,
        policy: Policy,
    ) -> None:
        self.router = router
        self.store = store
        self.audit = audit
        self.policy = policy
        self._index: BlindIndex | None = None
        self._index_lock = threading.Lock()  # one blind-index key per process, however many threads

    # -- plumbing -------------------------------------------------------------------------

    def record(self, *events: AuditEvent) -> None:
        self.audit.write(events)

    def require(self, caller: Caller, permission: Permission, *, field: str | None = None) -> None:
        """Raise PermissionDenied (audited as access.denied) unless *caller* holds *permission*."""
        if caller.may(permission):
            return
        role = caller.role.value if caller.role else "none"
        self.record(
            AuditEvent.denial(
                caller, permission.value, f"role {role} lacks {permission.value}", field=field
            )
        )
        raise PermissionDenied(f"role {role} may not {permission.value.replace('_', ' ')}")

    @property
    def kms(self) -> KeyManagementService:
        """The provider new fields are wrapped under."""
        return self.router.writer.kms

    # -- blind index ------------------------------------------------------------------------

    def blind_index(self, caller: Caller) -> BlindIndex:
        """The blind index, creating and storing its wrapped key on first use."""
        index = self._index
        if index is not None:
            return index
        with self._index_lock:
            if self._index is None:
                self._index = self._load_blind_index(caller)
            return self._index

    def _load_blind_index(self, caller: Caller) -> BlindIndex:
        stored_text = self.store.get_meta(META_KEY)
        if stored_text is None:
            cipher = self.router.writer
            stored, plaintext = StoredIndexKey.generate(
                cipher.kms, cipher.encryption_version.value, utc_now_ms()
            )
            self.record(
                AuditEvent.of(
                    EventType.KEY_CREATE,
                    caller,
                    key_identifier=stored.wrapped.key_identifier,
                    key_version=stored.wrapped.key_version,
                    operation="blind_index_key",
                )
            )
            if self.store.insert_meta_if_absent(META_KEY, stored.to_json()):
                return BlindIndex(plaintext)
            plaintext.wipe()  # another process created it first; use theirs
            stored_text = self.store.get_meta(META_KEY)
            if stored_text is None:
                raise StorageError("the blind-index key vanished while it was being created")
        stored = StoredIndexKey.from_json(stored_text)
        kms = self.router.reader(stored.encryption_version).kms
        return BlindIndex(kms.unwrap(stored.wrapped, stored.associated_data))

    # -- reads ------------------------------------------------------------------------------

    def decrypt(self, canonical_key: str, *, reason: str, caller: Caller) -> str:
        """The plaintext of one field. Requires a reason; audited whatever the outcome."""
        return self.decrypt_many([canonical_key], reason=reason, caller=caller)[canonical_key]

    def decrypt_many(
        self, canonical_keys: Sequence[str], *, reason: str, caller: Caller
    ) -> dict[str, str]:
        """Plaintexts by canonical key. One audit event per field; all-or-nothing."""
        self.require(caller, Permission.DECRYPT)
        if not isinstance(reason, str) or not _REASON_RE.match(reason):
            self.record(AuditEvent.denial(caller, "decrypt", "no valid reason given"))
            raise PermissionDenied(
                "decrypt requires a reason: 1-200 printable ASCII characters, "
                "e.g. 'support:ticket-1234'"
            )
        malformed = sum(1 for key in canonical_keys if not is_canonical_key(key))
        if malformed:
            # Most likely a value typed where its key belongs: it must reach neither the
            # trail nor the message, so the event names no field.
            self.record(self._decrypt_event(caller, None, None, reason, InvalidInput("")))
            raise InvalidInput(
                f"{malformed} of the {len(canonical_keys)} keys given is not a canonical key "
                "(<field>:hash:<64 hex digits>); decrypt takes the key `heimdall lookup` "
                "prints, never a value"
            )
        router = self.router
        batch = metrics.CryptoBatch("decrypt", len(canonical_keys), router.writer, router.kms)
        results = self._decrypt_fields(canonical_keys)
        plaintexts: dict[str, str] = {}
        events: list[AuditEvent] = []
        for key, field, result in results:
            try:
                if isinstance(result, BaseException):
                    raise result
                plaintexts[key] = result.decode()
            except (HeimdallError, UnicodeDecodeError) as exc:
                batch.finish(failed=len(canonical_keys))
                events.append(self._decrypt_event(caller, key, field, reason, exc))
                self.record(*events)
                if isinstance(exc, UnicodeDecodeError):
                    raise InvalidInput("the decrypted value is not UTF-8 text") from None
                raise
            events.append(self._decrypt_event(caller, key, field, reason, None))
        batch.finish()
        self.record(*events)
        return plaintexts

    def _decrypt_fields(
        self, canonical_keys: Sequence[str]
    ) -> list[tuple[str, FieldValue | None, bytes | HeimdallError]]:
        """Each key's field and plaintext (or error), in order, up to the first key that cannot
        even be looked up. Fields are decrypted in one batch per cipher, so values the KMS
        encrypted itself (pattern B) go to it in batch calls."""
        looked_up: list[tuple[str, FieldValue | None, FieldCipher | HeimdallError]] = []
        for key in canonical_keys:
            field: FieldValue | None = None
            try:
                field = self.store.get_field(key)
                if field is None:
                    raise FieldNotFound("no field has this canonical key")
                looked_up.append((key, field, self.router.reader(field.encryption_version)))
            except HeimdallError as exc:
                looked_up.append((key, field, exc))
                break
        by_cipher: dict[int, list[int]] = {}
        for index, (_, _, cipher) in enumerate(looked_up):
            if isinstance(cipher, FieldCipher):
                by_cipher.setdefault(id(cipher), []).append(index)
        plaintexts: dict[int, bytes | HeimdallError] = {}
        for indexes in by_cipher.values():
            cipher = looked_up[indexes[0]][2]
            assert isinstance(cipher, FieldCipher)
            items = []
            for index in indexes:
                field = looked_up[index][1]
                assert field is not None
                items.append((field.encrypted_data, field_context(field)))
            plaintexts.update(zip(indexes, cipher.decrypt_many(items), strict=True))
        return [
            (key, field, plaintexts[i] if isinstance(cipher, FieldCipher) else cipher)
            for i, (key, field, cipher) in enumerate(looked_up)
        ]

    def _decrypt_event(
        self,
        caller: Caller,
        key: str | None,
        field: FieldValue | None,
        reason: str,
        error: BaseException | None,
    ) -> AuditEvent:
        return AuditEvent.of(
            EventType.DECRYPT,
            caller,
            error=error,
            field_identifier=key,
            key_identifier=_key_identifier(field),
            key_version=field.key_version if field else None,
            reason=reason,
        )

    def lookup(self, field_name: str, value: str, *, caller: Caller) -> LookupResult:
        """Find a value by its blind index, decrypting nothing."""
        self.require(caller, Permission.LOOKUP)
        rule = self.policy.rule_for(field_name)
        if rule.action is not FieldAction.ENCRYPT:
            raise InvalidInput(f"field {field_name!r} is not encrypted by the policy")
        try:
            normalised = normalize(rule.normalizer, value)
        except ValueError as exc:
            raise InvalidInput(f"field {field_name!r}: {exc}") from None
        key = self.blind_index(caller).canonical_key(field_name, normalised)
        found = self.store.get_field(key) is not None
        sightings = self.store.count_sightings(key) if found else 0
        self.record(AuditEvent.of(EventType.LOOKUP, caller, field_identifier=key, count=sightings))
        return LookupResult(key, found, sightings)

    def status(self, *, caller: Caller) -> Status:
        self.require(caller, Permission.READ_STATUS)
        description = self.kms.describe()
        return Status(
            mode=self.router.mode.value,
            provider=self.kms.provider,
            latest_version=description.latest_version,
            counts=tuple(self.store.field_counts()),
        )

    # -- keys: the lifecycle lives in heimdall.rotation.lifecycle ---------------------------

    def describe_keys(self, *, caller: Caller) -> KeyDescription:
        return lifecycle.describe(self, caller=caller)

    def rotate_keys(self, *, caller: Caller) -> KeyDescription:
        """New master key version; new fields use it, old fields still decrypt."""
        return lifecycle.rotate(self, caller=caller)

    def dependents_below(self, version: int) -> tuple[int, bool]:
        """Stored fields whose data key is wrapped below *version*, and whether the
        blind-index key is too."""
        return lifecycle.dependents_below(self, version)

    def set_min_decryption_version(
        self, version: int, *, caller: Caller, force: bool = False
    ) -> KeyDescription:
        """Raise the decryption floor; refused while fields still depend on lower versions."""
        return lifecycle.set_min_decryption_version(self, version, caller=caller, force=force)

    def close(self) -> None:
        """Wipe the blind-index key, close the store, and close the audit sink (which writes
        a checkpoint of what this process recorded)."""
        with self._index_lock:
            if self._index is not None:
                self._index.wipe()
                self._index = None
        try:
            self.store.close()
        finally:
            self.audit.close()


def _key_identifier(field: FieldValue | None) -> str | None:
    if field is None:
        return None
    try:
        return str(load(field.encrypted_data)["key_identifier"])
    except HeimdallError:
        return None
