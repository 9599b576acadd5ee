"""Heimdall.decrypt_each: a batch decrypt whose bad keys fail only themselves.

spec: Envelope Encryption Architecture (Decryption Flow); Audit Log Requirements (Encryption and
Decryption Operations). Every distinct key is audited exactly once, whatever its outcome; an
error of the store, the key provider, the audit trail or the caller fails the whole call and
returns no plaintext.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest

from heimdall.audit import AuditEvent, EventType
from heimdall.envelope import EncryptionContext
from heimdall.errors import (
    AuditError,
    DecryptionFailed,
    FieldNotFound,
    HeimdallError,
    InvalidInput,
    KmsUnavailable,
    PermissionDenied,
    StorageError,
)
from heimdall.ingest import IngestReport
from heimdall.rbac import Caller, Role
from heimdall.service import DECRYPT_ITEM_ERRORS, Heimdall, field_context
from heimdall.store.base import FieldUpdate
from heimdall.store.sqlite import SqliteStore

ServiceFactory = Callable[..., Heimdall]
Ingest = Callable[..., IngestReport]
AuditReader = Callable[[], list[dict[str, Any]]]
REASON = "support:ticket-77"
MISSING = "email:hash:" + "0" * 64


def _stored(service: Heimdall) -> list[str]:
    return sorted(f.canonical_key for batch in service.store.iter_fields() for f in batch)


def _replace_envelope(service: Heimdall, key: str, envelope: str) -> None:
    field = service.store.get_field(key)
    assert field is not None
    update = FieldUpdate(envelope, field.key_version, field.encryption_version, field.dek_id)
    assert service.store.compare_and_swap(key, field.encrypted_data, update)


def _tamper(service: Heimdall, key: str) -> None:
    """Flip one character of the field's ciphertext."""
    field = service.store.get_field(key)
    assert field is not None
    marker = '"ciphertext":"'
    at = field.encrypted_data.index(marker) + len(marker)
    flipped = "B" if field.encrypted_data[at] == "A" else "A"
    _replace_envelope(
        service, key, field.encrypted_data[:at] + flipped + field.encrypted_data[at + 1 :]
    )


def _decrypts_since(audit_events: AuditReader, mark: int) -> list[dict[str, Any]]:
    return [e for e in audit_events()[mark:] if e["event_type"] == "crypto.decrypt"]


@pytest.fixture
def stored(
    make_service: ServiceFactory, ingest: Ingest, people: list[dict[str, Any]], caller: Caller
) -> tuple[Heimdall, dict[str, str]]:
    """A service holding the first ten people, and each stored field's plaintext by key."""
    service = make_service()
    assert ingest(service, people[:10]).fields_encrypted > 10
    keys = _stored(service)
    return service, service.decrypt_many(keys, reason="test:expected", caller=caller)


def test_one_bad_item_among_good_ones_fails_alone_and_every_key_is_audited_once(
    stored: tuple[Heimdall, dict[str, str]],
    caller: Caller,
    audit_events: AuditReader,
    people: list[dict[str, Any]],
) -> None:
    service, expected = stored
    keys = sorted(expected)
    tampered = keys[3]
    _tamper(service, tampered)
    typed_value = people[0]["email"]  # a value given where its key belongs
    asked = [*keys, MISSING, typed_value, keys[0], keys[5]]  # two keys twice
    mark = len(audit_events())

    outcomes = service.decrypt_each(asked, reason=REASON, caller=caller)

    assert set(outcomes) == {*keys, MISSING, typed_value}
    good = {k: v for k, v in outcomes.items() if not isinstance(v, HeimdallError)}
    assert good == {k: v for k, v in expected.items() if k != tampered}
    assert isinstance(outcomes[tampered], DecryptionFailed)
    assert isinstance(outcomes[MISSING], FieldNotFound)
    assert isinstance(outcomes[typed_value], InvalidInput)
    assert typed_value not in str(outcomes[typed_value])
    assert all(isinstance(v, DECRYPT_ITEM_ERRORS) for k, v in outcomes.items() if k not in good)

    events = _decrypts_since(audit_events, mark)
    by_key = [e.get("field_identifier") for e in events]
    assert sorted(by_key, key=str) == sorted([*keys, MISSING, None], key=str)  # each once
    results = {e.get("field_identifier"): (e["result"], e.get("error")) for e in events}
    assert results[tampered] == ("failure", "DecryptionFailed")
    assert results[MISSING] == ("failure", "FieldNotFound")
    assert results[None] == ("failure", "InvalidInput")
    assert all(results[k] == ("success", None) for k in good)
    assert all(e["reason"] == REASON and e["actor"] == caller.actor for e in events)
    assert len({e["timestamp"] for e in events}) == 1  # one batch, one time
    trail = "\n".join(orjson.dumps(e).decode() for e in audit_events())
    assert typed_value not in trail
    assert all(plaintext not in trail for plaintext in expected.values())


def test_each_event_says_what_decrypt_many_says_of_the_same_field(
    stored: tuple[Heimdall, dict[str, str]], caller: Caller, audit_events: AuditReader
) -> None:
    service, expected = stored
    keys = sorted(expected)
    _tamper(service, keys[0])

    def events_of(call: Any, asked: Sequence[str]) -> list[dict[str, Any]]:
        mark = len(audit_events())
        with contextlib.suppress(HeimdallError):
            call(asked, reason=REASON, caller=caller)
        return [
            {k: v for k, v in e.items() if k not in ("timestamp", "hash")}
            for e in _decrypts_since(audit_events, mark)
        ]

    for key in [*keys[:4], MISSING]:
        single = events_of(service.decrypt_many, [key])
        assert events_of(service.decrypt_each, [key]) == single
        assert len(single) == 1 and single[0]["field_identifier"] == key
    assert events_of(service.decrypt_each, keys[1:]) == events_of(service.decrypt_many, keys[1:])


@pytest.mark.parametrize(
    "spelling",
    [
        pytest.param(
            lambda text: json.dumps(json.loads(text), separators=(", ", ": ")), id="spaced"
        ),
        pytest.param(
            lambda text: text.replace('"key_identifier"', '"key_\\u0069dentifier"'),
            id="escaped-name",
        ),
        pytest.param(lambda text: text.replace('-v1"', '-v\\u0031"', 1), id="escaped-value"),
    ],
)
def test_an_envelope_spelled_otherwise_is_audited_with_the_key_it_names(
    stored: tuple[Heimdall, dict[str, str]],
    caller: Caller,
    audit_events: AuditReader,
    spelling: Any,
) -> None:
    service, expected = stored
    key = sorted(expected)[2]
    field = service.store.get_field(key)
    assert field is not None and '"key_identifier":"heimdall-pii-v1"' in field.encrypted_data
    respelled = spelling(field.encrypted_data)
    assert '"key_identifier":"heimdall-pii-v1"' not in respelled
    _replace_envelope(service, key, respelled)
    mark = len(audit_events())

    assert service.decrypt_each([key], reason=REASON, caller=caller) == {key: expected[key]}

    [event] = _decrypts_since(audit_events, mark)
    assert (event["key_identifier"], event["key_version"]) == ("heimdall-pii-v1", 1)
    assert event["result"] == "success"


def test_a_value_that_is_not_text_fails_its_item_and_its_bytes_reach_no_event(
    stored: tuple[Heimdall, dict[str, str]], caller: Caller, audit_events: AuditReader
) -> None:
    service, expected = stored
    keys = sorted(expected)
    field = service.store.get_field(keys[0])
    assert field is not None
    sealed = service.router.writer.encrypt(b"\xff\xfeQZ", field_context(field))
    _replace_envelope(service, keys[0], sealed.envelope)
    mark = len(audit_events())

    outcomes = service.decrypt_each(keys[:2], reason=REASON, caller=caller)

    assert isinstance(outcomes[keys[0]], InvalidInput)
    assert "0xff" not in str(outcomes[keys[0]])
    assert outcomes[keys[1]] == expected[keys[1]]
    events = {e["field_identifier"]: e for e in _decrypts_since(audit_events, mark)}
    assert (events[keys[0]]["result"], events[keys[0]]["error"]) == (
        "failure",
        "UnicodeDecodeError",
    )
    assert events[keys[1]]["result"] == "success"
    with pytest.raises(InvalidInput, match="not UTF-8 text"):
        service.decrypt_many(keys[:1], reason=REASON, caller=caller)


def test_a_key_provider_failure_fails_the_call_and_withholds_every_plaintext(
    stored: tuple[Heimdall, dict[str, str]],
    caller: Caller,
    audit_events: AuditReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, expected = stored
    keys = sorted(expected)
    cipher = service.router.reader("kms_v1")
    decrypt_many = cipher.decrypt_many

    def unavailable_for_one(
        items: Sequence[tuple[str, EncryptionContext]],
    ) -> list[bytes | HeimdallError]:
        results = decrypt_many(items)
        results[1] = KmsUnavailable("the key provider did not answer", provider="local")
        return results

    monkeypatch.setattr(cipher, "decrypt_many", unavailable_for_one)
    returned: list[object] = []
    mark = len(audit_events())

    with pytest.raises(KmsUnavailable) as info:
        returned.append(service.decrypt_each([*keys, MISSING], reason=REASON, caller=caller))

    assert returned == []
    assert all(p not in repr(info.value) for p in expected.values())
    events = _decrypts_since(audit_events, mark)
    assert sorted(e["field_identifier"] for e in events) == sorted([*keys, MISSING])
    assert {e["field_identifier"]: e["error"] for e in events} == {
        **dict.fromkeys(keys, "KmsUnavailable"),
        MISSING: "FieldNotFound",
    }
    assert {e["result"] for e in events} == {"failure"}


def test_a_store_failure_fails_the_call_and_each_key_is_audited_as_failed(
    stored: tuple[Heimdall, dict[str, str]], caller: Caller, audit_events: AuditReader
) -> None:
    service, expected = stored
    keys = sorted(expected)[:3]
    service.store.close()
    mark = len(audit_events())

    with pytest.raises(StorageError):
        service.decrypt_each(keys, reason=REASON, caller=caller)

    events = _decrypts_since(audit_events, mark)
    assert sorted(e["field_identifier"] for e in events) == keys
    assert {(e["result"], e["error"]) for e in events} == {("failure", "StorageError")}


def test_an_unwritable_trail_fails_the_call_and_returns_no_plaintext(
    stored: tuple[Heimdall, dict[str, str]], caller: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, expected = stored

    def refuse(events: Sequence[AuditEvent]) -> None:
        raise AuditError("audit sink is down")

    monkeypatch.setattr(service.audit, "write", refuse)
    returned: list[object] = []

    with pytest.raises(AuditError) as info:
        returned.append(service.decrypt_each(sorted(expected), reason=REASON, caller=caller))

    assert returned == []
    assert all(p not in repr(info.value) for p in expected.values())


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        pytest.param(Caller(actor="oidc:auditor", role=Role.AUDIT), REASON, id="audit-role"),
        pytest.param(Caller(actor="svc:app", role=Role.APP), "", id="no-reason"),
    ],
)
def test_a_refused_caller_gets_nothing_and_no_field_is_read(
    stored: tuple[Heimdall, dict[str, str]],
    audit_events: AuditReader,
    monkeypatch: pytest.MonkeyPatch,
    who: Caller,
    reason: str,
) -> None:
    service, expected = stored
    mark = len(audit_events())

    def no_read(keys: Sequence[str]) -> None:
        raise AssertionError("a refused caller's keys were read")

    monkeypatch.setattr(service.store, "get_fields", no_read)

    with pytest.raises(PermissionDenied):
        service.decrypt_each(sorted(expected), reason=reason, caller=who)

    events = audit_events()[mark:]
    assert [(e["event_type"], e["result"]) for e in events] == [("access.denied", "denied")]


def test_an_empty_batch_decrypts_nothing_and_audits_nothing(
    stored: tuple[Heimdall, dict[str, str]], caller: Caller, audit_events: AuditReader
) -> None:
    service, _ = stored
    mark = len(audit_events())

    assert service.decrypt_each([], reason=REASON, caller=caller) == {}
    assert audit_events()[mark:] == []


@pytest.mark.parametrize("error", [None, DecryptionFailed()], ids=["success", "failure"])
def test_a_decryption_event_is_the_event_of_builds(error: HeimdallError | None) -> None:
    caller = Caller(actor="svc:app", role=Role.APP, source_ip="192.0.2.7")
    details: dict[str, Any] = {
        "field_identifier": "email:hash:" + "a" * 64,
        "key_identifier": "heimdall-pii-v3",
        "key_version": 3,
        "reason": REASON,
        "timestamp": "2026-01-02T03:04:05.678Z",
    }

    built = AuditEvent.decryption(caller, error=error, **details)

    assert built == AuditEvent.of(EventType.DECRYPT, caller, error=error, **details)
    assert built.to_dict()["result"] == ("success" if error is None else "failure")


def test_each_event_of_a_batch_names_the_key_of_its_own_envelope(
    stored: tuple[Heimdall, dict[str, str]],
    caller: Caller,
    audit_events: AuditReader,
    ingest: Ingest,
    people: list[dict[str, Any]],
) -> None:
    service, expected = stored
    before = _stored(service)
    admin = Caller(actor="op", role=Role.ADMIN)
    service.rotate_keys(caller=admin)
    ingest(service, people[10:12])  # under version 2, with new data keys
    after = sorted(set(_stored(service)) - set(before))
    expected |= service.decrypt_many(after, reason="test:expected", caller=caller)
    field = service.store.get_field(before[0])
    assert field is not None
    # One field of version 1 spelled otherwise: its header is a header of its own.
    _replace_envelope(service, before[0], field.encrypted_data.replace('-v1"', '-v\\u0031"', 1))
    batch = [*before[:4], *after[:4], *before[4:8]]
    mark = len(audit_events())

    assert service.decrypt_each(batch, reason=REASON, caller=caller) == {
        key: expected[key] for key in batch
    }

    events = _decrypts_since(audit_events, mark)
    named = {e["field_identifier"]: (e["key_identifier"], e["key_version"]) for e in events}
    for key in batch:
        stored_field = service.store.get_field(key)
        assert stored_field is not None
        version = stored_field.key_version
        assert named[key] == (f"heimdall-pii-v{version}", version)
    assert {named[key][1] for key in after[:4]} == {2}
    assert {named[key][1] for key in before[:8]} == {1}


@pytest.mark.parametrize("tampered", [False, True], ids=["stored-as-written", "envelope-tampered"])
def test_a_decryption_event_names_the_key_version_of_the_envelope_not_the_row(
    stored: tuple[Heimdall, dict[str, str]],
    caller: Caller,
    audit_events: AuditReader,
    tampered: bool,
) -> None:
    service, expected = stored
    key = sorted(expected)[3]
    field = service.store.get_field(key)
    assert field is not None and field.key_version == 1
    # Someone who can write the store sets the row's version column to 7, leaving the envelope:
    # the trail must still say which key version the value was decrypted under.
    update = FieldUpdate(field.encrypted_data, 7, field.encryption_version, field.dek_id)
    assert service.store.compare_and_swap(key, field.encrypted_data, update)
    if tampered:
        _tamper(service, key)
    mark = len(audit_events())

    outcome = service.decrypt_each([key], reason=REASON, caller=caller)[key]
    if not tampered:
        assert service.decrypt_many([key], reason=REASON, caller=caller) == {key: expected[key]}

    assert (outcome == expected[key]) is not tampered
    events = _decrypts_since(audit_events, mark)
    assert len(events) == (1 if tampered else 2)
    for event in events:
        assert (event["key_identifier"], event["key_version"]) == ("heimdall-pii-v1", 1)
        assert event["result"] == ("failure" if tampered else "success")


def test_an_envelope_stored_as_bytes_decrypts_and_is_audited_with_its_key(
    stored: tuple[Heimdall, dict[str, str]], caller: Caller, audit_events: AuditReader
) -> None:
    service, expected = stored
    key = sorted(expected)[4]
    assert isinstance(service.store, SqliteStore)
    # Someone who can write the store retypes the column's value (SQLite lets a BLOB in).
    with service.store._session("test") as conn:
        conn.execute(
            "UPDATE field_values SET encrypted_data = CAST(encrypted_data AS BLOB)"
            " WHERE canonical_key = ?",
            (key,),
        )
    field = service.store.get_field(key)
    assert field is not None and isinstance(field.encrypted_data, bytes)
    mark = len(audit_events())

    assert service.decrypt_each([key], reason=REASON, caller=caller) == {key: expected[key]}
    assert service.decrypt_many([key], reason=REASON, caller=caller) == {key: expected[key]}

    events = _decrypts_since(audit_events, mark)
    assert [(e["key_identifier"], e["key_version"], e["result"]) for e in events] == [
        ("heimdall-pii-v1", 1, "success")
    ] * 2


def test_a_failure_event_names_no_key_an_envelope_holds_out_of_range(
    stored: tuple[Heimdall, dict[str, str]], caller: Caller, audit_events: AuditReader
) -> None:
    service, expected = stored
    key = sorted(expected)[5]
    field = service.store.get_field(key)
    assert field is not None
    _replace_envelope(
        service, key, field.encrypted_data.replace('"key_version":1,', '"key_version":-1,', 1)
    )
    mark = len(audit_events())

    outcome = service.decrypt_each([key], reason=REASON, caller=caller)[key]

    assert isinstance(outcome, HeimdallError)
    [event] = _decrypts_since(audit_events, mark)
    assert (event.get("key_identifier"), event["key_version"], event["result"]) == (
        None,
        1,
        "failure",
    )
