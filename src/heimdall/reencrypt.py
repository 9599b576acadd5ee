"""Bring every stored field to the latest key version (and legacy fields to the KMS).

spec: Key Rotation Strategy (Re-encryption) and Migration Strategy, Phase 4. Two paths:

* **rewrap** (master key rotation): a kms_v1 field below the latest version keeps its data
  ciphertext; only its data key is rewrapped, once per distinct data key, in batch calls.
* **re-encrypt** (legacy migration, hybrid mode only): decrypt with the legacy key, encrypt under
  a new KMS data key.

Every update is compare-and-swap against the envelope that was read, so a concurrent write is
never overwritten with stale data: a field whose CAS fails is read again and retried once.
This is the foreground version; the checkpointed multi-worker job builds on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from heimdall.audit import AuditEvent, EventType, Result
from heimdall.blind_index import META_KEY, StoredIndexKey
from heimdall.cipher import FieldCipher
from heimdall.envelope import KMS_DIRECT, EncryptionContext, EncryptionVersion, Envelope, parse
from heimdall.errors import HeimdallError, ModeViolation
from heimdall.kms.base import WrappedKey
from heimdall.modes import EncryptionMode
from heimdall.rbac import Caller, Permission
from heimdall.service import Heimdall, field_context
from heimdall.store.base import FieldUpdate, FieldValue

__all__ = ["ReencryptReport", "Run", "pending", "reencrypt", "rewrap_index_key"]

KMS_V1 = EncryptionVersion.KMS_V1.value
LEGACY = EncryptionVersion.LEGACY.value
# Rewrapped data keys remembered per run, so a data key whose fields fall in several batches is
# rewrapped once; bounded because with max_uses=1 every field has its own data key.
_REWRAP_MEMO_MAX = 65_536

_Wrapping = tuple[str, int, str, bytes]
_ANY_CONTEXT = EncryptionContext("FieldValue", "prefetch", "prefetch")


def _wrapping(envelope: Envelope) -> _Wrapping:
    return (envelope.key_identifier, envelope.key_version, envelope.dek_id, envelope.encrypted_dek)


@dataclass(slots=True)
class ReencryptReport:
    target_version: int = 0
    rewrapped: int = 0
    reencrypted: int = 0
    failed: int = 0
    conflicts: int = 0
    legacy_skipped: int = 0
    index_key_rewrapped: bool = False


class Run:
    def __init__(
        self,
        heimdall: Heimdall,
        caller: Caller,
        cipher: FieldCipher,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.heimdall = heimdall
        self.caller = caller
        self.cipher = cipher
        self.progress = progress
        self.report = ReencryptReport()
        self.retry: list[str] = []
        self.rewrapped: dict[_Wrapping, WrappedKey] = {}
        # Where updates and failures go: the store directly (compare-and-swap), or a job's claim.
        self.apply: Callable[[FieldValue, FieldUpdate], bool] = self._compare_and_swap
        self.failed: Callable[[FieldValue, HeimdallError], None] = lambda field, error: None

    def sibling(self) -> Run:
        """Another Run for a second thread of the same job, sharing this one's rewrap memo."""
        other = Run(self.heimdall, self.caller, self.cipher, self.progress)
        other.rewrapped = self.rewrapped
        return other

    def event(
        self, kind: EventType, field: FieldValue, version: int | None, error: HeimdallError | None
    ) -> AuditEvent:
        return AuditEvent(
            kind,
            self.caller.actor,
            Result.SUCCESS if error is None else Result.FAILURE,
            self.caller.request_id,
            field_identifier=field.canonical_key,
            key_version=version,
            source_ip=self.caller.source_ip,
            operation="reencrypt",
            error=type(error).__name__ if error else None,
        )

    def _compare_and_swap(self, field: FieldValue, update: FieldUpdate) -> bool:
        store = self.heimdall.store
        return store.compare_and_swap(field.canonical_key, field.encrypted_data, update)

    def swap(self, field: FieldValue, update: FieldUpdate, retrying: bool) -> bool:
        if self.apply(field, update):
            return True
        self.report.conflicts += 1
        if not retrying:
            self.retry.append(field.canonical_key)
        return False

    def rewrap(self, fields: list[FieldValue], retrying: bool = False) -> None:
        envelopes: list[Envelope | HeimdallError] = []
        for field in fields:
            try:
                envelopes.append(parse(field.encrypted_data))
            except HeimdallError as exc:
                envelopes.append(exc)
        valid = [
            (parsed, field_context(field))
            for field, parsed in zip(fields, envelopes, strict=True)
            if isinstance(parsed, Envelope)
        ]
        results = iter(self.rewrap_many(valid))
        events = []
        for field, parsed in zip(fields, envelopes, strict=True):
            result = next(results) if isinstance(parsed, Envelope) else parsed
            if isinstance(result, HeimdallError):
                self.report.failed += 1
                self.failed(field, result)
                events.append(self.event(EventType.REWRAP, field, None, result))
                continue
            update = FieldUpdate(result.to_json(), result.key_version, KMS_V1, result.dek_id)
            if self.swap(field, update, retrying):
                self.report.rewrapped += 1
                events.append(self.event(EventType.REWRAP, field, result.key_version, None))
        self.heimdall.record(*events)

    def rewrap_many(
        self, items: list[tuple[Envelope, EncryptionContext]]
    ) -> list[Envelope | HeimdallError]:
        """cipher.rewrap_many, reusing this run's earlier rewrap of the same data key
        (a KMS-DIRECT value has no data key: each is rewrapped on its own)."""
        known = [e.algorithm != KMS_DIRECT and _wrapping(e) in self.rewrapped for e, _ in items]
        fresh = [item for item, hit in zip(items, known, strict=True) if not hit]
        results = iter(self.cipher.rewrap_many(fresh) if fresh else [])
        out: list[Envelope | HeimdallError] = []
        for (envelope, _), hit in zip(items, known, strict=True):
            if hit:
                done = self.rewrapped[_wrapping(envelope)]
                out.append(
                    envelope.rewrapped(done.key_identifier, done.key_version, done.ciphertext)
                )
                continue
            result = next(results)
            if isinstance(result, Envelope) and result.algorithm != KMS_DIRECT:
                if len(self.rewrapped) >= _REWRAP_MEMO_MAX:
                    self.rewrapped.clear()
                self.rewrapped[_wrapping(envelope)] = WrappedKey(
                    result.key_identifier, result.key_version, result.encrypted_dek
                )
            out.append(result)
        return out

    def prefetch(self, envelopes: list[str]) -> None:
        """Rewrap these data keys now, in batch calls, so later batches need no KMS call."""
        parsed = []
        for text in envelopes:
            try:
                envelope = parse(text)
            except HeimdallError:
                continue  # the field itself will fail, and be reported, when it is claimed
            if envelope.algorithm != KMS_DIRECT:
                # The data key's wrapping does not depend on the field, so any context will do;
                # the results only fill the memo (the envelope itself is not written).
                parsed.append((envelope, _ANY_CONTEXT))
        self.rewrap_many(parsed)

    def migrate(
        self, fields: list[FieldValue], legacy: FieldCipher, retrying: bool = False
    ) -> None:
        events = []
        for field in fields:
            context = field_context(field)
            try:
                plaintext = legacy.decrypt(field.encrypted_data, context)
                sealed = self.cipher.encrypt(plaintext, context)
            except HeimdallError as exc:
                self.report.failed += 1
                self.failed(field, exc)
                events.append(self.event(EventType.REENCRYPT, field, None, exc))
                continue
            update = FieldUpdate(sealed.envelope, sealed.key_version, KMS_V1, sealed.dek_id)
            if self.swap(field, update, retrying):
                self.report.reencrypted += 1
                events.append(self.event(EventType.REENCRYPT, field, sealed.key_version, None))
        self.heimdall.record(*events)

    def tick(self, count: int) -> None:
        if self.progress is not None:
            self.progress(count)


def pending(heimdall: Heimdall, latest_version: int) -> int:
    """Fields reencrypt would touch: kms_v1 below the latest version, plus legacy in hybrid."""
    store = heimdall.store
    count = store.count_fields(encryption_version=KMS_V1, key_version_below=latest_version)
    if heimdall.router.mode is EncryptionMode.HYBRID:
        count += store.count_fields(encryption_version=LEGACY)
    return count


def reencrypt(
    heimdall: Heimdall,
    *,
    caller: Caller,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
) -> ReencryptReport:
    heimdall.require(caller, Permission.REENCRYPT)
    cipher = heimdall.router.kms
    if cipher is None:
        raise ModeViolation("reencrypt needs a KMS provider; legacy mode without one has none")
    run = Run(heimdall, caller, cipher, progress)
    latest = cipher.kms.describe().latest_version
    run.report.target_version = latest
    store = heimdall.store
    for batch in store.iter_fields(
        encryption_version=KMS_V1, key_version_below=latest, batch_size=batch_size
    ):
        run.rewrap(batch)
        run.tick(len(batch))
    legacy = heimdall.router.legacy
    if heimdall.router.mode is EncryptionMode.HYBRID and legacy is not None:
        for batch in store.iter_fields(encryption_version=LEGACY, batch_size=batch_size):
            run.migrate(batch, legacy)
            run.tick(len(batch))
    else:
        run.report.legacy_skipped = store.count_fields(encryption_version=LEGACY)
    for key in run.retry:
        field = store.get_field(key)
        if field is None:
            continue
        if field.encryption_version == KMS_V1 and field.key_version < latest:
            run.rewrap([field], retrying=True)
        elif (
            field.encryption_version == LEGACY
            and legacy is not None
            and heimdall.router.mode is EncryptionMode.HYBRID
        ):
            run.migrate([field], legacy, retrying=True)
    run.report.index_key_rewrapped = rewrap_index_key(heimdall, cipher, latest, caller=caller)
    return run.report


def rewrap_index_key(
    heimdall: Heimdall, cipher: FieldCipher, latest: int, *, caller: Caller
) -> bool:
    """Move the blind-index key's wrapping to the latest KMS version (audited). Its value never
    changes: canonical keys depend on it."""
    moved = _rewrap_index_key(heimdall, cipher, latest)
    if moved:
        heimdall.record(
            AuditEvent(
                EventType.REWRAP,
                caller.actor,
                Result.SUCCESS,
                caller.request_id,
                key_version=latest,
                source_ip=caller.source_ip,
                operation="blind_index_key",
            )
        )
    return moved


def _rewrap_index_key(heimdall: Heimdall, cipher: FieldCipher, latest: int) -> bool:
    text = heimdall.store.get_meta(META_KEY)
    if text is None:
        return False
    stored = StoredIndexKey.from_json(text)
    if stored.encryption_version == KMS_V1:
        if stored.wrapped.key_version >= latest:
            return False
        wrapped = cipher.kms.rewrap(stored.wrapped, stored.associated_data)
        updated = stored.with_wrapped(KMS_V1, wrapped)
    elif heimdall.router.mode is EncryptionMode.HYBRID:
        legacy = heimdall.router.reader(LEGACY).kms
        with legacy.unwrap(stored.wrapped, stored.associated_data) as plaintext:
            moved = stored.with_wrapped(KMS_V1, stored.wrapped)
            updated = moved.with_wrapped(KMS_V1, cipher.kms.wrap(plaintext, moved.associated_data))
    else:
        return False
    return heimdall.store.compare_and_swap_meta(META_KEY, text, updated.to_json())
