"""Master key rotation, the re-encryption job and the decryption floor.

spec: Envelope Encryption Architecture, Key Rotation Strategy; Migration Strategy, Phase 4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from heimdall.blind_index import META_KEY, StoredIndexKey
from heimdall.envelope import parse
from heimdall.errors import KeyVersionDisabled, LifecycleError
from heimdall.ingest import IngestReport
from heimdall.kms.base import WrappedKey
from heimdall.normalize import normalize
from heimdall.policy import FieldAction
from heimdall.rbac import Caller
from heimdall.reencrypt import reencrypt
from heimdall.service import Heimdall, field_context
from heimdall.store.base import FieldCount, FieldUpdate, FieldValue
from heimdall.store.sqlite import SqliteStore
from heimdall.types import EncryptionMode

ServiceFactory = Callable[..., Heimdall]
Ingest = Callable[..., IngestReport]

REASON = "test:rotation"


def _fields(service: Heimdall) -> dict[str, FieldValue]:
    return {f.canonical_key: f for batch in service.store.iter_fields() for f in batch}


def _expected_plaintexts(
    service: Heimdall, caller: Caller, records: Sequence[dict[str, Any]]
) -> dict[str, str]:
    """canonical key -> the value ingest stored for it (the first spelling seen, stripped)."""
    index = service.blind_index(caller)
    expected: dict[str, str] = {}
    for record in records:
        for name, value in record.items():
            rule = service.policy.rule_for(name)
            if rule.action is not FieldAction.ENCRYPT or not isinstance(value, str):
                continue
            if not value.strip():  # the policy skips blank values
                continue
            key = index.canonical_key(name, normalize(rule.normalizer, value))
            expected.setdefault(key, value.strip())
    return expected


def _email_key(service: Heimdall, caller: Caller, email: str) -> str:
    result = service.lookup("email", email, caller=caller)
    assert result.found
    return result.canonical_key


def test_old_fields_decrypt_after_rotation_and_new_fields_use_new_version(
    make_service: ServiceFactory, ingest: Ingest, people: list[dict[str, Any]], caller: Caller
) -> None:
    service = make_service()
    ingest(service, people[:5])
    old_key = _email_key(service, caller, people[0]["email"])

    description = service.rotate_keys(caller=caller)
    ingest(service, people[5:10])

    assert description.latest_version == 2
    assert service.decrypt(old_key, reason=REASON, caller=caller) == people[0]["email"]
    old_field = service.store.get_field(old_key)
    new_field = service.store.get_field(_email_key(service, caller, people[6]["email"]))
    assert old_field is not None and old_field.key_version == 1
    assert new_field is not None and new_field.key_version == 2
    assert parse(new_field.encrypted_data).key_identifier == "heimdall-pii-v2"


def test_reencrypt_moves_every_field_to_latest_and_keeps_every_value(
    make_service: ServiceFactory, ingest: Ingest, people: list[dict[str, Any]], caller: Caller
) -> None:
    service = make_service(dek_max_uses=7)
    ingest(service, people[:20])
    service.rotate_keys(caller=caller)
    ingest(service, people[20:30])
    service.rotate_keys(caller=caller)
    before = sum(c.count for c in service.store.field_counts())

    report = reencrypt(service, caller=caller)

    assert report.target_version == 3
    assert report.failed == report.conflicts == 0
    assert report.rewrapped == before
    assert service.store.field_counts() == [FieldCount("kms_v1", 3, before, "heimdall-pii")]
    expected = _expected_plaintexts(service, caller, people[:30])
    assert set(expected) == set(_fields(service))
    decrypted = service.decrypt_many(list(expected), reason=REASON, caller=caller)
    assert decrypted == expected


@pytest.mark.parametrize("batch_size", [500, 4])
def test_reencrypt_rewraps_each_data_key_once_without_reencrypting_data(
    *,
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    monkeypatch: pytest.MonkeyPatch,
    batch_size: int,
) -> None:
    service = make_service(dek_max_uses=5)
    ingest(service, people[:20])
    before = {key: parse(f.encrypted_data) for key, f in _fields(service).items()}
    distinct_deks = {e.dek_id for e in before.values()}
    assert len(distinct_deks) > 1
    assert len(distinct_deks) < len(before)  # some data keys are shared by several fields
    service.rotate_keys(caller=caller)
    rewrapped_deks: list[str] = []
    kms = service.kms
    original = kms.rewrap_many

    def counting_rewrap_many(items: Sequence[tuple[WrappedKey, bytes]]) -> list[Any]:
        # The wrapping's associated data ends with the data key id (32 hex digits).
        rewrapped_deks.extend(ad[-32:].decode() for _, ad in items)
        return original(items)

    monkeypatch.setattr(kms, "rewrap_many", counting_rewrap_many)

    report = reencrypt(service, caller=caller, batch_size=batch_size)

    assert report.rewrapped == len(before)
    # A data key shared by fields in different batches is still rewrapped only once (beside
    # them, the blind-index key's own rewrap).
    index_key = StoredIndexKey.stored_in(service.store)
    assert index_key is not None and index_key.key_id in rewrapped_deks
    rewrapped_deks.remove(index_key.key_id)
    assert sorted(rewrapped_deks) == sorted(distinct_deks)  # each data key exactly once
    for key, field in _fields(service).items():
        old, new = before[key], parse(field.encrypted_data)
        assert new.ciphertext == old.ciphertext
        assert new.encryption_timestamp == old.encryption_timestamp
        assert new.dek_id == old.dek_id == field.dek_id
        assert (new.key_version, field.key_version) == (2, 2)
        assert new.encrypted_dek != old.encrypted_dek


def test_legacy_migration_in_hybrid_reencrypts_under_kms_and_keeps_blind_index(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    master_key: str,
    caller: Caller,
) -> None:
    legacy = make_service(EncryptionMode.LEGACY, master_key)
    ingest(legacy, people[:15])
    before = _fields(legacy)
    index_before = legacy.store.get_meta(META_KEY)
    expected = _expected_plaintexts(legacy, caller, people[:15])
    legacy.close()
    hybrid = make_service(EncryptionMode.HYBRID, master_key)

    report = reencrypt(hybrid, caller=caller)

    assert report.reencrypted == len(before)
    assert report.index_key_rewrapped
    after = _fields(hybrid)
    assert set(after) == set(before)
    for key, field in after.items():
        envelope = parse(field.encrypted_data)
        assert field.encryption_version == envelope.encryption_version.value == "kms_v1"
        assert field.dek_id == envelope.dek_id != before[key].dek_id
    assert index_before is not None
    stored = StoredIndexKey.from_json(hybrid.store.get_meta(META_KEY) or "")
    assert stored.encryption_version == "kms_v1"
    assert stored.key_id == StoredIndexKey.from_json(index_before).key_id
    hybrid.close()
    # A fresh kms-only service (no master key) unwraps the moved index key and finds the values.
    kms = make_service(EncryptionMode.KMS)
    for record in people[:15]:
        result = kms.lookup("email", record["email"], caller=caller)
        assert result.found
        assert result.canonical_key in before
    assert kms.decrypt_many(list(expected), reason=REASON, caller=caller) == expected


def test_reencrypt_in_kms_mode_leaves_legacy_fields_and_reports_them(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    master_key: str,
    caller: Caller,
) -> None:
    legacy = make_service(EncryptionMode.LEGACY, master_key)
    ingest(legacy, people[:5])
    legacy_before = _fields(legacy)
    legacy.close()
    hybrid = make_service(EncryptionMode.HYBRID, master_key)
    ingest(hybrid, people[5:10])
    kms_count = len(_fields(hybrid)) - len(legacy_before)
    hybrid.close()
    kms = make_service(EncryptionMode.KMS)
    kms.rotate_keys(caller=caller)

    report = reencrypt(kms, caller=caller)

    assert report.legacy_skipped == len(legacy_before)
    assert (report.reencrypted, report.rewrapped) == (0, kms_count)
    assert not report.index_key_rewrapped  # it is legacy-wrapped and stays so
    assert kms.store.field_counts() == [
        FieldCount("kms_v1", 2, kms_count, "heimdall-pii"),
        FieldCount("legacy", 1, len(legacy_before)),
    ]
    after = _fields(kms)
    for key, field in legacy_before.items():
        assert after[key].encrypted_data == field.encrypted_data


def test_min_decryption_version_refused_while_fields_depend_on_older_versions(
    make_service: ServiceFactory, ingest: Ingest, people: list[dict[str, Any]], caller: Caller
) -> None:
    service = make_service()
    ingest(service, people[:10])
    fields = len(_fields(service))
    service.rotate_keys(caller=caller)

    with pytest.raises(LifecycleError) as info:
        service.set_min_decryption_version(2, caller=caller)

    assert info.value.dependent_fields == fields + 1  # every field and the blind-index key
    assert service.describe_keys(caller=caller).min_decryption_version == 1
    reencrypt(service, caller=caller)
    description = service.set_min_decryption_version(2, caller=caller)
    assert description.min_decryption_version == 2
    expected = _expected_plaintexts(service, caller, people[:10])
    assert service.decrypt_many(list(expected), reason=REASON, caller=caller) == expected


def test_field_left_below_forced_floor_fails_with_key_version_disabled(
    make_service: ServiceFactory, ingest: Ingest, people: list[dict[str, Any]], caller: Caller
) -> None:
    service = make_service()
    ingest(service, people[:10])
    stale_key = _email_key(service, caller, people[0]["email"])
    stale = service.store.get_field(stale_key)
    assert stale is not None
    # Warm the decryption cache with v1 data keys: raising the floor must drop them.
    other_key = _email_key(service, caller, people[1]["email"])
    service.decrypt_many([stale_key, other_key], reason=REASON, caller=caller)
    service.rotate_keys(caller=caller)
    reencrypt(service, caller=caller)
    current = service.store.get_field(stale_key)
    assert current is not None and current.key_version == 2
    # Put the v1 envelope back, as a writer that missed the re-encryption would.
    assert service.store.compare_and_swap(
        stale_key,
        current.encrypted_data,
        FieldUpdate(stale.encrypted_data, 1, "kms_v1", stale.dek_id),
    )
    with pytest.raises(LifecycleError) as info:
        service.set_min_decryption_version(2, caller=caller)
    assert info.value.dependent_fields == 1

    service.set_min_decryption_version(2, caller=caller, force=True)

    with pytest.raises(KeyVersionDisabled) as disabled:
        service.decrypt(stale_key, reason=REASON, caller=caller)
    assert disabled.value.key_version == 1
    assert service.decrypt(other_key, reason=REASON, caller=caller) == people[1]["email"]


def _write_while_the_job_runs(
    monkeypatch: pytest.MonkeyPatch,
    service: Heimdall,
    target: str,
    new_value: bytes,
) -> list[str]:
    """Make another writer replace *target* after the job has started and counted its fields,
    right before it claims its first batch.

    Returns the writer's envelope (in a one-element list once it has written).
    """
    store = service.store
    assert isinstance(store, SqliteStore)
    original = store.claim
    written: list[str] = []

    def racing_claim(job: Any, limit: int) -> Any:
        if not written:
            field = store.get_field(target)
            assert field is not None
            sealed = service.router.writer.encrypt(new_value, field_context(field))
            concurrent = FieldUpdate(
                sealed.envelope, sealed.key_version, sealed.encryption_version, sealed.dek_id
            )
            assert store.compare_and_swap(target, field.encrypted_data, concurrent)
            written.append(sealed.envelope)
        return original(job, limit)

    monkeypatch.setattr(store, "claim", racing_claim)
    return written


def test_concurrent_update_during_rewrap_is_not_lost(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = make_service()
    ingest(service, people[:10])
    target = _email_key(service, caller, people[3]["email"])
    service.rotate_keys(caller=caller)
    written = _write_while_the_job_runs(monkeypatch, service, target, b"writer@example.com")

    report = reencrypt(service, caller=caller)

    assert written, "the racing writer never ran"
    # A claim reads its batch inside its own transaction: the writer's envelope, already on
    # the latest version, is left alone, and nothing is ever written from a stale read.
    assert report.conflicts == 0 and report.failed == 0
    final = service.store.get_field(target)
    assert final is not None and final.encrypted_data == written[0]
    assert service.decrypt(target, reason=REASON, caller=caller) == "writer@example.com"
    assert service.store.count_fields(key_version_below=2) == 0


def test_concurrent_update_during_legacy_migration_is_not_lost(
    *,
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    master_key: str,
    caller: Caller,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    legacy = make_service(EncryptionMode.LEGACY, master_key)
    ingest(legacy, people[:10])
    target = _email_key(legacy, caller, people[3]["email"])
    legacy.close()
    hybrid = make_service(EncryptionMode.HYBRID, master_key)
    written = _write_while_the_job_runs(monkeypatch, hybrid, target, b"writer@example.com")

    report = reencrypt(hybrid, caller=caller)

    assert written, "the racing writer never ran"
    assert report.conflicts == 0 and report.failed == 0
    final = hybrid.store.get_field(target)
    assert final is not None and final.encrypted_data == written[0]
    assert hybrid.decrypt(target, reason=REASON, caller=caller) == "writer@example.com"
    assert hybrid.store.count_fields(encryption_version="legacy") == 0
