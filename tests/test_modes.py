"""Encryption modes on one data dir: legacy, hybrid and kms, as a migration moves through them.

spec: Migration Strategy, Phase 3 (Backward Compatibility) and Phase 5 (Enforcement).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from heimdall.envelope import parse
from heimdall.errors import (
    ConfigurationError,
    DecryptionFailed,
    KeyNotFound,
    LifecycleError,
    ModeViolation,
)
from heimdall.ingest import IngestReport
from heimdall.rbac import Caller
from heimdall.service import Heimdall
from heimdall.types import EncryptionMode

ServiceFactory = Callable[..., Heimdall]
Ingest = Callable[..., IngestReport]
AuditReader = Callable[[], list[dict[str, Any]]]

REASON = "test:modes"


def _keys_by_version(service: Heimdall) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for batch in service.store.iter_fields():
        for field in batch:
            keys.setdefault(field.encryption_version, []).append(field.canonical_key)
    return keys


def _email_key(service: Heimdall, caller: Caller, email: str) -> str:
    result = service.lookup("email", email, caller=caller)
    assert result.found
    return result.canonical_key


def test_legacy_mode_writes_legacy_encryption_version(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    master_key: str,
    caller: Caller,
) -> None:
    service = make_service(EncryptionMode.LEGACY, master_key)

    report = ingest(service, people[:10])

    assert report.errors == []
    counts = service.store.field_counts()
    assert [(c.encryption_version, c.key_version) for c in counts] == [("legacy", 1)]
    assert counts[0].count == report.fields_encrypted > 0
    key = _email_key(service, caller, people[0]["email"])
    stored = service.store.get_field(key)
    assert stored is not None
    assert parse(stored.encrypted_data).encryption_version.value == "legacy"
    assert service.decrypt(key, reason=REASON, caller=caller) == people[0]["email"]


def test_hybrid_writes_kms_and_reads_legacy_and_kms_fields(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    master_key: str,
    caller: Caller,
) -> None:
    legacy = make_service(EncryptionMode.LEGACY, master_key)
    ingest(legacy, people[:5])
    legacy.close()

    hybrid = make_service(EncryptionMode.HYBRID, master_key)
    ingest(hybrid, people[5:10])

    by_version = _keys_by_version(hybrid)
    assert set(by_version) == {"legacy", "kms_v1"}
    legacy_key = _email_key(hybrid, caller, people[0]["email"])
    kms_key = _email_key(hybrid, caller, people[6]["email"])
    assert legacy_key in by_version["legacy"]
    assert kms_key in by_version["kms_v1"]
    plaintexts = hybrid.decrypt_many([legacy_key, kms_key], reason=REASON, caller=caller)
    assert plaintexts == {legacy_key: people[0]["email"], kms_key: people[6]["email"]}


def test_legacy_mode_reads_kms_fields_for_rollback(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    master_key: str,
    caller: Caller,
) -> None:
    hybrid = make_service(EncryptionMode.HYBRID, master_key)
    ingest(hybrid, people[:3])
    hybrid.close()

    legacy = make_service(EncryptionMode.LEGACY, master_key)
    ingest(legacy, people[3:6])

    kms_key = _email_key(legacy, caller, people[0]["email"])
    legacy_key = _email_key(legacy, caller, people[4]["email"])
    kms_field = legacy.store.get_field(kms_key)
    legacy_field = legacy.store.get_field(legacy_key)
    assert kms_field is not None and kms_field.encryption_version == "kms_v1"
    assert legacy_field is not None and legacy_field.encryption_version == "legacy"
    assert legacy.decrypt(kms_key, reason=REASON, caller=caller) == people[0]["email"]


def test_kms_mode_refuses_legacy_field_naming_the_migration(
    *,
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    master_key: str,
    caller: Caller,
    audit_events: AuditReader,
) -> None:
    legacy = make_service(EncryptionMode.LEGACY, master_key)
    ingest(legacy, people[:3])
    key = _email_key(legacy, caller, people[0]["email"])
    legacy.close()
    kms = make_service(EncryptionMode.KMS)

    with pytest.raises(ModeViolation) as info:
        kms.decrypt(key, reason=REASON, caller=caller)

    assert "heimdall migrate start" in str(info.value)
    assert people[0]["email"] not in str(info.value)
    last = audit_events()[-1]
    assert last["event_type"] == "crypto.decrypt"
    assert last["result"] == "failure"
    assert last["error"] == "ModeViolation"
    assert last["field_identifier"] == key
    assert last["reason"] == REASON
    assert last["actor"] == caller.actor


@pytest.mark.parametrize("mode", [EncryptionMode.LEGACY, EncryptionMode.HYBRID])
def test_mode_reading_legacy_fields_without_master_key_is_a_configuration_error(
    make_service: ServiceFactory, mode: EncryptionMode
) -> None:
    with pytest.raises(ConfigurationError, match="HMD_MASTER_KEY"):
        make_service(mode, None)


def test_field_under_another_master_key_fails_with_key_not_found(
    *,
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    master_key: str,
    caller: Caller,
    audit_events: AuditReader,
) -> None:
    first = make_service(EncryptionMode.LEGACY, master_key)
    ingest(first, people[:3])
    key = _email_key(first, caller, people[0]["email"])
    first.close()
    other_key = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY="  # 32 other bytes
    assert other_key != master_key
    second = make_service(EncryptionMode.LEGACY, other_key)

    with pytest.raises(KeyNotFound) as info:
        second.decrypt(key, reason=REASON, caller=caller)

    assert not isinstance(info.value, DecryptionFailed)
    assert "hmd-master-key-" in info.value.key_identifier
    assert audit_events()[-1]["error"] == "KeyNotFound"
    assert audit_events()[-1]["result"] == "failure"


def test_each_stored_field_records_how_it_was_encrypted(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    master_key: str,
) -> None:
    legacy = make_service(EncryptionMode.LEGACY, master_key)
    ingest(legacy, people[:6])
    legacy.close()
    hybrid = make_service(EncryptionMode.HYBRID, master_key, dek_max_uses=4)
    hybrid.rotate_keys(caller=Caller(actor="test:admin"))
    ingest(hybrid, people[6:12])

    seen: set[tuple[str, int]] = set()
    for batch in hybrid.store.iter_fields():
        for field in batch:
            envelope = parse(field.encrypted_data)
            assert field.encryption_version == envelope.encryption_version.value
            assert field.key_version == envelope.key_version
            assert field.dek_id == envelope.dek_id
            seen.add((field.encryption_version, field.key_version))
    assert seen == {("legacy", 1), ("kms_v1", 2)}


def test_kms_mode_refuses_ingest_while_blind_index_key_is_legacy(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    master_key: str,
) -> None:
    legacy = make_service(EncryptionMode.LEGACY, master_key)
    ingest(legacy, people[:3])
    before = legacy.store.field_counts()
    legacy.close()
    kms = make_service(EncryptionMode.KMS)

    with pytest.raises(ModeViolation, match="heimdall migrate start"):
        ingest(kms, people[3:6])

    assert kms.store.field_counts() == before


def test_legacy_master_key_cannot_rotate_and_the_refusal_is_audited(
    make_service: ServiceFactory, master_key: str, caller: Caller, audit_events: AuditReader
) -> None:
    legacy = make_service(EncryptionMode.LEGACY, master_key)

    with pytest.raises(LifecycleError, match="reencrypt"):
        legacy.rotate_keys(caller=caller)

    event = audit_events()[-1]
    assert event["event_type"] == "key.rotate"
    assert (event["result"], event["error"]) == ("failure", "LifecycleError")
