"""The rewrap of one claimed batch (heimdall.rotation.batch.BatchWorker.rewrap): a field in the
canonical layout under a data key already rewrapped is rewritten as text, and must come out as
the very envelope that parsing and serialising it again gives; anything else is parsed."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from heimdall.app import build
from heimdall.envelope import ALGORITHM, KMS_DIRECT, EncryptionVersion, Envelope, parse
from heimdall.ingest import ingest_lines
from heimdall.rbac import Caller
from heimdall.rotation.batch import BatchWorker
from heimdall.service import Heimdall
from heimdall.settings import Settings
from heimdall.store.base import FieldUpdate, FieldValue

CALLER = Caller(actor="test:rewrap")


class RecordingSink:
    def __init__(self) -> None:
        self.updates: dict[str, FieldUpdate] = {}
        self.failed: dict[str, str] = {}

    def update(self, field: FieldValue, update: FieldUpdate) -> None:
        self.updates[field.canonical_key] = update

    def fail(self, field: FieldValue, error: str) -> None:
        self.failed[field.canonical_key] = error


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", audit_fsync=False, dek_max_uses=20)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Heimdall]:
    """60 fields under 3 data keys (20 fields each) on version 1; the key rotated to 2."""
    heimdall = build(_settings(tmp_path))
    lines = [json.dumps({"id": f"r{i}", "email": f"user{i}@example.com"}) for i in range(60)]
    ingest_lines(heimdall, lines, caller=CALLER, source_name="t")
    heimdall.rotate_keys(caller=CALLER)
    yield heimdall
    heimdall.close()


def _fields(service: Heimdall) -> list[FieldValue]:
    return [field for batch in service.store.iter_fields() for field in batch]


def _worker(service: Heimdall, fields: list[FieldValue]) -> BatchWorker:
    worker = BatchWorker(service, CALLER, service.router.require_kms("re-encryption"))
    worker.prefetch(field.encrypted_data for field in fields)
    return worker


def _expected(before: str, rewrapped: Envelope) -> str:
    """*before* with the data key wrapping of *rewrapped* (same data key), serialised."""
    return (
        parse(before)
        .rewrapped(rewrapped.key_identifier, rewrapped.key_version, rewrapped.encrypted_dek)
        .to_json()
    )


def test_rewrap_as_text_gives_the_envelope_that_parsing_and_serialising_gives(
    service: Heimdall,
) -> None:
    fields = _fields(service)
    assert len({f.dek_id for f in fields}) == 3
    worker = _worker(service, fields)
    kms_calls = worker.cipher.kms_calls
    sink = RecordingSink()

    worker.rewrap(fields, sink)

    assert worker.cipher.kms_calls == kms_calls  # every data key came from the prefetch
    assert (sink.failed, len(sink.updates), worker.report.rewrapped) == ({}, 60, 60)
    by_dek: dict[str, Envelope] = {}
    for field in fields:
        update = sink.updates[field.canonical_key]
        after = parse(update.encrypted_data)
        first = by_dek.setdefault(field.dek_id, after)
        before = parse(field.encrypted_data)
        assert update.encrypted_data == _expected(field.encrypted_data, first)
        assert (update.key_version, update.dek_id, update.encryption_version) == (
            2,
            field.dek_id,
            "kms_v1",
        )
        assert (after.ciphertext, after.encryption_timestamp) == (
            before.ciphertext,
            before.encryption_timestamp,
        )
        assert after.key_version == 2 and after.encrypted_dek != before.encrypted_dek


def test_text_rewrapped_fields_decrypt_to_their_values(service: Heimdall, tmp_path: Path) -> None:
    fields = _fields(service)
    keys = [f.canonical_key for f in fields]
    values = service.decrypt_many(keys, reason="test", caller=CALLER)
    sink = RecordingSink()
    _worker(service, fields).rewrap(fields, sink)
    for field in fields:
        assert service.store.compare_and_swap(
            field.canonical_key, field.encrypted_data, sink.updates[field.canonical_key]
        )

    assert {f.key_version for f in _fields(service)} == {2}
    fresh = build(_settings(tmp_path))  # no data key cached
    try:
        assert fresh.decrypt_many(keys, reason="test", caller=CALLER) == values
    finally:
        fresh.close()


def test_an_envelope_in_another_layout_is_parsed_and_comes_out_canonical(
    service: Heimdall,
) -> None:
    fields = _fields(service)
    worker = _worker(service, fields)
    field = fields[0]
    spaced = json.dumps(json.loads(field.encrypted_data), indent=1)  # parse accepts it
    moved = FieldValue(
        field.canonical_key,
        field.field_name,
        spaced,
        field.key_version,
        field.encryption_version,
        field.dek_id,
    )
    reference = RecordingSink()
    worker.rewrap([field], reference)
    sink = RecordingSink()

    worker.rewrap([moved], sink)

    assert sink.failed == {}
    assert sink.updates[field.canonical_key] == reference.updates[field.canonical_key]


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text.replace('","encryption_timestamp":"', '=","encryption_timestamp":"'),
        lambda text: text[: text.index(',"ciphertext":"') + 20] + '"}',
        lambda text: text.replace('"encryption_timestamp":"', '"encryption_timestamp":"x'),
    ],
    ids=["non-canonical-base64", "truncated-ciphertext", "bad-timestamp"],
)
def test_a_damaged_body_under_a_known_data_key_fails_and_is_not_rewritten(
    service: Heimdall, damage: Callable[[str], str]
) -> None:
    fields = _fields(service)
    worker = _worker(service, fields)
    field = fields[0]
    broken = FieldValue(
        field.canonical_key,
        field.field_name,
        damage(field.encrypted_data),
        field.key_version,
        field.encryption_version,
        field.dek_id,
    )
    sink = RecordingSink()

    worker.rewrap([broken, fields[1]], sink)

    assert sink.failed == {field.canonical_key: "InvalidEnvelope"}
    assert list(sink.updates) == [fields[1].canonical_key]
    assert (worker.report.failed, worker.report.rewrapped) == (1, 1)


class _ResealingCipher:
    """Answers as FieldCipher.rewrap_many does for a value the KMS encrypted itself when the
    move goes to a provider that does not: a new data key, a new ciphertext."""

    kms_calls = 0

    def __init__(self, resealed: Envelope) -> None:
        self.resealed = resealed

    def rewrap_many(self, items: list[tuple[Envelope, object]]) -> list[Envelope]:
        return [self.resealed for _ in items]


class _Recorder:
    def __init__(self) -> None:
        self.events: list[object] = []

    def record(self, *events: object) -> None:
        self.events.extend(events)


def test_a_resealed_value_never_lends_its_new_header_to_another_field() -> None:
    """A value the KMS encrypted itself comes back resealed under a new data key: the same
    header met again (a copy of the field) is resealed again, never given that data key's
    header over the KMS's ciphertext, which nothing could decrypt."""
    direct = Envelope(
        EncryptionVersion.KMS_V1,
        KMS_DIRECT,
        "vault:transit/keys/pii",
        1,
        "a" * 32,
        b"",
        b"vault:v1:" + bytes(range(40)),
        "2026-01-01T00:00:00Z",
    )
    resealed = Envelope(
        EncryptionVersion.KMS_V1,
        ALGORITHM,
        "heimdall-pii-v1",
        1,
        "b" * 32,
        bytes(60),
        bytes(range(48)),
        "2026-01-01T00:00:00Z",
    )
    worker = BatchWorker(_Recorder(), CALLER, _ResealingCipher(resealed))  # type: ignore[arg-type]
    for n in (1, 2):
        sink = RecordingSink()
        key = f"email:hash:{str(n) * 64}"
        worker.rewrap([FieldValue(key, "email", direct.to_json(), 1, "kms_v1", "a" * 32)], sink)
        assert parse(sink.updates[key].encrypted_data) == resealed
