"""The work of one claimed batch: rewrap or re-encrypt its fields, and hand the results on.

spec: Key Rotation Strategy (Re-encryption) and Migration Strategy, Phase 4. Two paths:

* **rewrap** (master key rotation; a move between key providers): a kms_v1 field below the
  target version, or under another provider's key, keeps its data ciphertext, context binding
  and original timestamp; only its data key is rewrapped, inside the KMS (or, from another
  provider, unwrapped there and wrapped here: :class:`heimdall.kms.multi.MultiProvider`), once
  per distinct data key (a memo shared by the threads of one run remembers the keys rewrapped
  already, so a data key whose fields span many batches costs one call). A field in the layout
  heimdall writes, under a data key the memo knows, is rewrapped as text: its header (every
  member before the ciphertext) is swapped for the rewrapped one, once its body is checked to
  be canonical, which gives the very text that parsing and serialising it again would.
* **re-encrypt** (legacy migration; every field after a key compromise): decrypt with the
  source cipher, encrypt under a new KMS data key.

A :class:`BatchWorker` computes; its *sink* — the store's claim of the batch
(:class:`heimdall.store.jobs.Claim`) — writes each new envelope compare-and-swap, or records
the field's failure, all in the claim's transaction. Every field gets its audit event.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from heimdall.audit import AuditEvent, EventType, utc_now_ms
from heimdall.blind_index import META_KEY, StoredIndexKey
from heimdall.cipher import FieldCipher
from heimdall.envelope import (
    KMS_DIRECT,
    EncryptionContext,
    EncryptionVersion,
    Envelope,
    canonical_body,
    canonical_header,
    parse,
)
from heimdall.errors import HeimdallError
from heimdall.kms.base import WrappedKey
from heimdall.rbac import Caller
from heimdall.service import Heimdall, field_context
from heimdall.store.base import FieldUpdate, FieldValue
from heimdall.types import EncryptionMode

__all__ = ["BatchWorker", "ReencryptReport", "Sink", "rewrap_index_key"]

KMS_V1: Final = EncryptionVersion.KMS_V1.value
LEGACY: Final = EncryptionVersion.LEGACY.value
# Rewrapped data keys remembered per run, so a data key whose fields fall in several batches is
# rewrapped once; bounded because with max_uses=1 every field has its own data key.
REWRAP_MEMO_MAX: Final = 65_536

_Wrapping = tuple[str, int, str, bytes]


def _wrapping(envelope: Envelope) -> _Wrapping:
    return (envelope.key_identifier, envelope.key_version, envelope.dek_id, envelope.encrypted_dek)


@dataclass(frozen=True, slots=True)
class _Rewrapped:
    """A data key's new wrapping, as the fields under it get it: the header text
    (:meth:`Envelope.header_json`) their envelopes now begin with, its key version, and the
    data key's id (which a rewrap keeps)."""

    header: str
    key_version: int
    dek_id: str


@dataclass(slots=True)
class ReencryptReport:
    """What one run did, field by field (also the tally its metrics count failures from)."""

    target_version: int = 0
    rewrapped: int = 0
    reencrypted: int = 0
    failed: int = 0
    conflicts: int = 0
    legacy_skipped: int = 0
    index_key_rewrapped: bool = False


class Sink(Protocol):
    """Where a batch's results go: the claim of the batch (heimdall.store.jobs.Claim)."""

    def update(self, field: FieldValue, update: FieldUpdate) -> None: ...

    def fail(self, field: FieldValue, error: str) -> None: ...


class BatchWorker:
    """Rewraps or re-encrypts the fields of claimed batches under *cipher* (the KMS cipher),
    counting what it did in :attr:`report`.

    One per thread of a run; :meth:`sibling` makes another that shares the rewrap memo.
    """

    def __init__(
        self,
        heimdall: Heimdall,
        caller: Caller,
        cipher: FieldCipher,
        report: ReencryptReport | None = None,
    ) -> None:
        self.heimdall = heimdall
        self.caller = caller
        self.cipher = cipher
        self.report = report or ReencryptReport()
        self._memo: dict[_Wrapping, WrappedKey] = {}
        # The same rewraps by the header text of the envelopes they apply to (that of an
        # envelope that passed parse): the text fast path of :meth:`rewrap`.
        self._headers: dict[str, _Rewrapped] = {}

    def sibling(self) -> BatchWorker:
        """Another worker for a second thread of the same run: its own report, this one's
        memo."""
        other = BatchWorker(self.heimdall, self.caller, self.cipher)
        other._memo = self._memo
        other._headers = self._headers
        return other

    def _event(
        self,
        kind: EventType,
        field: FieldValue,
        version: int | None,
        error: HeimdallError | None,
        timestamp: str,
    ) -> AuditEvent:
        return AuditEvent.of(
            kind,
            self.caller,
            error=error,
            field_identifier=field.canonical_key,
            key_version=version,
            operation="reencrypt",
            timestamp=timestamp,
        )

    def rewrap(self, fields: list[FieldValue], sink: Sink) -> None:
        """Rewrap the data keys of *fields* (kms_v1) under the latest version. The events of
        one batch share the time it was done."""
        now = utc_now_ms()
        events = []
        rest: list[FieldValue] = []
        for field in fields:
            update = self._rewrap_text(field.encrypted_data)
            if update is None:
                rest.append(field)
                continue
            sink.update(field, update)
            events.append(self._event(EventType.REWRAP, field, update.key_version, None, now))
        self.report.rewrapped += len(events)
        if rest:
            events += self._rewrap_parsed(rest, sink, now)
        self.heimdall.record(*events)

    def _rewrap_text(self, text: str) -> FieldUpdate | None:
        """*text* rewrapped without parsing it: its header swapped for the rewrapped one the
        memo holds, when the rest of it is canonical (so it is the text ``parse`` and
        ``to_json`` would give); None for any other envelope, which is parsed."""
        header = canonical_header(text)
        if header is None:
            return None
        done = self._headers.get(header)
        if done is None or canonical_body(text, header) is None:
            return None
        return FieldUpdate(done.header + text[len(header) :], done.key_version, KMS_V1, done.dek_id)

    def _rewrap_parsed(self, fields: list[FieldValue], sink: Sink, now: str) -> list[AuditEvent]:
        """Rewrap *fields* by parsing them: the events of what was done."""
        parsed: list[Envelope | HeimdallError] = []
        for field in fields:
            try:
                parsed.append(parse(field.encrypted_data))
            except HeimdallError as exc:
                parsed.append(exc)
        valid = [
            (envelope, field_context(field))
            for field, envelope in zip(fields, parsed, strict=True)
            if isinstance(envelope, Envelope)
        ]
        results = iter(self._rewrap_many(valid))
        events = []
        for field, envelope in zip(fields, parsed, strict=True):
            result = next(results) if isinstance(envelope, Envelope) else envelope
            if isinstance(result, HeimdallError):
                self.report.failed += 1
                sink.fail(field, type(result).__name__)
                events.append(self._event(EventType.REWRAP, field, None, result, now))
                continue
            sink.update(
                field, FieldUpdate(result.to_json(), result.key_version, KMS_V1, result.dek_id)
            )
            self.report.rewrapped += 1
            events.append(self._event(EventType.REWRAP, field, result.key_version, None, now))
        return events

    def reencrypt(self, fields: list[FieldValue], source: FieldCipher, sink: Sink) -> None:
        """Decrypt *fields* with *source* and encrypt them under new KMS data keys."""
        now = utc_now_ms()
        events = []
        for field in fields:
            context = field_context(field)
            try:
                plaintext = source.decrypt(field.encrypted_data, context)
                sealed = self.cipher.encrypt(plaintext, context)
            except HeimdallError as exc:
                self.report.failed += 1
                sink.fail(field, type(exc).__name__)
                events.append(self._event(EventType.REENCRYPT, field, None, exc, now))
                continue
            sink.update(
                field, FieldUpdate(sealed.envelope, sealed.key_version, KMS_V1, sealed.dek_id)
            )
            self.report.reencrypted += 1
            events.append(self._event(EventType.REENCRYPT, field, sealed.key_version, None, now))
        self.heimdall.record(*events)

    def prefetch(self, envelopes: Iterable[str]) -> None:
        """Rewrap these envelopes' data keys now, in batch calls, so later batches need no KMS
        call (a KMS-DIRECT value has no data key, and is rewrapped with its field)."""
        keys: list[Envelope] = []
        for text in envelopes:
            try:
                envelope = parse(text)
            except HeimdallError:
                continue  # the field itself will fail, and be reported, when it is claimed
            if envelope.algorithm != KMS_DIRECT and _wrapping(envelope) not in self._memo:
                keys.append(envelope)
        if keys:
            for envelope, result in zip(keys, self.cipher.rewrap_keys(keys), strict=True):
                self._remember(envelope, result)

    def _rewrap_many(
        self, items: list[tuple[Envelope, EncryptionContext]]
    ) -> list[Envelope | HeimdallError]:
        """cipher.rewrap_many, reusing this run's earlier rewrap of the same data key."""
        known = [e.algorithm != KMS_DIRECT and _wrapping(e) in self._memo for e, _ in items]
        fresh = [item for item, hit in zip(items, known, strict=True) if not hit]
        results = iter(self.cipher.rewrap_many(fresh) if fresh else [])
        out: list[Envelope | HeimdallError] = []
        for (envelope, _), hit in zip(items, known, strict=True):
            if hit:
                done = self._memo[_wrapping(envelope)]
                out.append(
                    envelope.rewrapped(done.key_identifier, done.key_version, done.ciphertext)
                )
                continue
            result = next(results)
            self._remember(envelope, result)
            out.append(result)
        return out

    def _remember(self, envelope: Envelope, result: Envelope | HeimdallError) -> None:
        """Keep a data key's new wrapping for the other fields under it (bounded). Only a pure
        rewrap is kept: the same data key under the same algorithm, newly wrapped. A value the
        KMS encrypted itself, or resealed under a new data key (a move from such a provider),
        is not: its ciphertext is not the one the new header speaks of."""
        if (
            isinstance(result, HeimdallError)
            or KMS_DIRECT in (envelope.algorithm, result.algorithm)
            or (result.algorithm, result.dek_id) != (envelope.algorithm, envelope.dek_id)
        ):
            return
        if len(self._memo) >= REWRAP_MEMO_MAX:
            self._memo.clear()
            self._headers.clear()
        self._memo[_wrapping(envelope)] = WrappedKey(
            result.key_identifier, result.key_version, result.encrypted_dek
        )
        self._headers[envelope.header_json()] = _Rewrapped(
            result.header_json(), result.key_version, result.dek_id
        )


def rewrap_index_key(
    heimdall: Heimdall, cipher: FieldCipher, latest: int, key_name: str, *, caller: Caller
) -> bool:
    """Move the blind-index key's wrapping to *latest* of the KMS key *key_name* (from a lower
    version, from another provider's key, or from the env key in hybrid mode); audited. Its
    value never changes: canonical keys depend on it."""
    text = heimdall.store.get_meta(META_KEY)
    if text is None:
        return False
    stored = StoredIndexKey.from_json(text)
    if stored.outdated(latest, key_name):
        updated = stored.with_wrapped(
            KMS_V1, cipher.kms.rewrap(stored.wrapped, stored.associated_data)
        )
    elif stored.is_legacy and heimdall.router.mode is EncryptionMode.HYBRID:
        legacy = heimdall.router.reader(LEGACY).kms
        with legacy.unwrap(stored.wrapped, stored.associated_data) as plaintext:
            moved = stored.with_wrapped(KMS_V1, stored.wrapped)
            updated = moved.with_wrapped(KMS_V1, cipher.kms.wrap(plaintext, moved.associated_data))
    else:
        return False
    if not heimdall.store.compare_and_swap_meta(META_KEY, text, updated.to_json()):
        return False
    heimdall.record(
        AuditEvent.of(EventType.REWRAP, caller, key_version=latest, operation="blind_index_key")
    )
    return True
