"""Ingest: JSON Lines records in, FieldValue / Sighting / Record nodes out.

spec: Envelope Encryption Architecture, Encryption Flow. Per batch of records: classify each by
the policy, compute canonical keys, encrypt only values the store does not hold yet (equal
values share one FieldValue), audit every encryption, then write the batch in one transaction.
A record that cannot be read or classified is reported by line number and written nowhere; the
other records of its batch still are. Audit comes before the write, so a stored field always has
its crypto.encrypt event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import orjson

from heimdall import metrics
from heimdall.audit import AuditEvent, EventType, utc_now_ms
from heimdall.envelope import MAX_PLAINTEXT_BYTES, EncryptionContext
from heimdall.errors import InvalidInput
from heimdall.normalize import normalize
from heimdall.policy import RecordError
from heimdall.rbac import Caller, Permission
from heimdall.service import FIELD_LABEL, Heimdall
from heimdall.store.base import FieldValue, RecordRow, Sighting

__all__ = ["IngestReport", "LineError", "ingest_lines"]

MAX_LINE_CHARS = 1024 * 1024


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    message: str


@dataclass(slots=True)
class IngestReport:
    lines: int = 0
    records: int = 0
    fields_encrypted: int = 0
    fields_deduplicated: int = 0
    sightings: int = 0
    dropped_fields: int = 0
    errors: list[LineError] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Prepared:
    line: int
    record: RecordRow
    values: tuple[tuple[str, str, str], ...]  # (canonical_key, field_name, value)
    dropped: int


def _prepare(
    heimdall: Heimdall, caller: Caller, *, number: int, line: str, source_name: str, now: str
) -> _Prepared:
    if len(line) > MAX_LINE_CHARS:
        raise RecordError("line is over the limit of 1,048,576 characters")
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise RecordError("not valid JSON") from None
    if not isinstance(obj, dict):
        raise RecordError("not a JSON object")
    classified = heimdall.policy.classify(obj)
    index = heimdall.blind_index(caller)
    values = []
    for name, value, normalizer in classified.encrypt:
        if len(value.encode("utf-8")) > MAX_PLAINTEXT_BYTES:
            # Checked here, not left to the envelope, so the record is reported by line number.
            raise RecordError(f"field {name!r} is over the {MAX_PLAINTEXT_BYTES}-byte limit")
        try:
            normalised = normalize(normalizer, value)
        except ValueError as exc:
            raise RecordError(f"field {name!r}: {exc}") from None
        values.append((index.canonical_key(name, normalised), name, value))
    record = RecordRow(
        record_id=classified.record_id or f"{source_name}:{number}",
        source=classified.source or source_name,
        ingested_at=now,
        attributes=dict(classified.plain),
    )
    return _Prepared(number, record, tuple(values), len(classified.dropped))


def _batches(lines: Iterable[str], size: int) -> Iterator[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            batch.append((number, line))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def ingest_lines(
    heimdall: Heimdall,
    lines: Iterable[str],
    *,
    caller: Caller,
    source_name: str,
    batch_size: int = 1000,
    progress: Callable[[int], None] | None = None,
    on_written: Callable[[int, tuple[tuple[str, str], ...]], None] | None = None,
) -> IngestReport:
    """Ingest JSON Lines. Raises only for failures that stop the run (KMS, store, audit).

    *on_written* is told, once its batch is committed, each stored record's line number and
    its encrypted fields as (field name, canonical key) pairs."""
    heimdall.require(caller, Permission.ENCRYPT)
    report = IngestReport()
    cipher = heimdall.router.writer
    for batch in _batches(lines, batch_size):
        now = utc_now_ms()
        prepared: list[_Prepared] = []
        for number, line in batch:
            try:
                prepared.append(
                    _prepare(
                        heimdall, caller, number=number, line=line, source_name=source_name, now=now
                    )
                )
            except RecordError as exc:
                report.errors.append(LineError(number, str(exc)))
        wanted = [key for item in prepared for key, _, _ in item.values]
        existing = heimdall.store.existing_keys(wanted) if wanted else set()
        pending: dict[str, tuple[str, str]] = {}
        sightings: list[Sighting] = []
        for item in prepared:
            for key, name, value in item.values:
                sightings.append(Sighting(key, item.record.record_id, item.record.source, now))
                if key in existing or key in pending:
                    report.fields_deduplicated += 1
                    continue
                pending[key] = (name, value)
        # One call for the batch: with pattern B the provider encrypts them in batch requests.
        with metrics.CryptoBatch("encrypt", len(pending), cipher):
            sealed_fields = cipher.encrypt_many(
                [
                    (value.encode("utf-8"), EncryptionContext(FIELD_LABEL, key, name))
                    for key, (name, value) in pending.items()
                ]
            )
        new_fields: dict[str, FieldValue] = {}
        events: list[AuditEvent] = []
        for (key, (name, _)), sealed in zip(pending.items(), sealed_fields, strict=True):
            new_fields[key] = FieldValue(
                canonical_key=key,
                field_name=name,
                encrypted_data=sealed.envelope,
                key_version=sealed.key_version,
                encryption_version=sealed.encryption_version,
                dek_id=sealed.dek_id,
                updated_at=now,
            )
            events.append(
                AuditEvent.of(
                    EventType.ENCRYPT,
                    caller,
                    field_identifier=key,
                    key_identifier=sealed.key_identifier,
                    key_version=sealed.key_version,
                    timestamp=now,
                )
            )
        heimdall.record(*events)
        inserted = heimdall.store.write_batch(
            list(new_fields.values()), sightings, [item.record for item in prepared]
        )
        # Another process may have stored some of these values first (first writer wins).
        report.fields_encrypted += inserted
        report.fields_deduplicated += len(new_fields) - inserted
        report.records += len(prepared)
        report.dropped_fields += sum(item.dropped for item in prepared)
        report.sightings += len(sightings)
        report.lines = batch[-1][0]
        if on_written is not None:
            for item in prepared:
                on_written(item.line, tuple((name, key) for key, name, _ in item.values))
        if progress is not None:
            progress(len(batch))
    return report


def read_lines(path: str) -> Iterator[str]:
    """Lines of a UTF-8 file, undecodable bytes replaced so one bad line can't stop the run."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            yield from handle
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
