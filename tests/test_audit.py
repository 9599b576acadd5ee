"""The audit trail: what each operation writes, denials, failures, integrity and fail-closed.

spec: Audit and Compliance, Audit Log Requirements.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from heimdall.audit import AuditEvent, Decryptions, EventType, JsonlAuditLog, Result
from heimdall.audit.chain import ChainState, advance, seal, seal_events
from heimdall.audit.events import _OPTIONAL_FIELDS, Joined, event_bodies
from heimdall.envelope import parse
from heimdall.errors import (
    AuditError,
    DecryptionFailed,
    FieldNotFound,
    PermissionDenied,
    StorageError,
)
from heimdall.ingest import IngestReport
from heimdall.rbac import Caller, Role
from heimdall.service import Heimdall
from heimdall.store.base import FieldUpdate

ServiceFactory = Callable[..., Heimdall]
Ingest = Callable[..., IngestReport]
AuditReader = Callable[[], list[dict[str, Any]]]

REASON = "support:ticket-1234"


def _of_type(events: Sequence[dict[str, Any]], event_type: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event_type"] == event_type]


def _email_key(service: Heimdall, caller: Caller, email: str) -> str:
    result = service.lookup("email", email, caller=caller)
    assert result.found
    return result.canonical_key


def _stored_keys(service: Heimdall) -> set[str]:
    return {f.canonical_key for batch in service.store.iter_fields() for f in batch}


def test_ingest_writes_one_encrypt_event_per_stored_field(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    audit_events: AuditReader,
) -> None:
    service = make_service()

    report = ingest(service, people[:10])

    encrypts = _of_type(audit_events(), "crypto.encrypt")
    assert len(encrypts) == report.fields_encrypted > 0
    identifiers = [e["field_identifier"] for e in encrypts]
    assert len(set(identifiers)) == len(identifiers)
    assert set(identifiers) == _stored_keys(service)
    for event in encrypts:
        stored = service.store.get_field(event["field_identifier"])
        assert stored is not None
        envelope = parse(stored.encrypted_data)
        assert event["key_identifier"] == envelope.key_identifier == "heimdall-pii-v1"
        assert event["key_version"] == envelope.key_version == 1
        assert event["actor"] == caller.actor
        assert event["request_id"] == caller.request_id
        assert event["result"] == "success"
        assert event["timestamp"].endswith("Z")


def test_decrypt_writes_decrypt_event_with_reason(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    audit_events: AuditReader,
) -> None:
    service = make_service()
    ingest(service, people[:3])
    key = _email_key(service, caller, people[1]["email"])

    service.decrypt(key, reason=REASON, caller=caller)

    event = audit_events()[-1]
    assert event["event_type"] == "crypto.decrypt"
    assert event["field_identifier"] == key
    assert event["reason"] == REASON
    assert event["actor"] == caller.actor
    assert event["request_id"] == caller.request_id
    assert event["key_identifier"] == "heimdall-pii-v1"
    assert event["key_version"] == 1
    assert event["result"] == "success"


@pytest.mark.parametrize(
    "reason",
    [
        "",
        "   ",
        "\t",
        "support\nticket",
        "ticket-1234\n",
        "\x00",
        "ticket\x1b[31m",
        " leading-space",
        "x" * 201,
    ],
)
def test_decrypt_without_valid_reason_is_denied_and_audited(
    *,
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    audit_events: AuditReader,
    reason: str,
) -> None:
    service = make_service()
    ingest(service, people[:3])
    key = _email_key(service, caller, people[0]["email"])

    with pytest.raises(PermissionDenied, match="reason"):
        service.decrypt(key, reason=reason, caller=caller)

    events = audit_events()
    assert events[-1]["event_type"] == "access.denied"
    assert events[-1]["operation"] == "decrypt"
    assert events[-1]["result"] == "denied"
    assert events[-1]["actor"] == caller.actor
    assert _of_type(events, "crypto.decrypt") == []


@pytest.mark.parametrize(
    ("operation", "permission"),
    [("rotate_keys", "rotate"), ("ingest", "encrypt")],
)
def test_worker_is_denied_key_rotation_and_ingest(
    *,
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    audit_events: AuditReader,
    operation: str,
    permission: str,
) -> None:
    service = make_service()
    worker = Caller(actor="svc:enricher", role=Role.WORKER)
    stored_before = _stored_keys(service)

    with pytest.raises(PermissionDenied):
        if operation == "rotate_keys":
            service.rotate_keys(caller=worker)
        else:
            ingest(service, people[:3], caller=worker)

    event = audit_events()[-1]
    assert event["event_type"] == "access.denied"
    assert event["operation"] == permission
    assert event["reason"] == f"role heimdall-worker lacks {permission}"
    assert event["timestamp"].endswith("Z")
    assert event["actor"] == worker.actor
    assert event["request_id"] == worker.request_id
    assert event["result"] == "denied"
    assert _stored_keys(service) == stored_before
    assert service.kms.describe().latest_version == 1


def test_worker_may_decrypt(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    audit_events: AuditReader,
) -> None:
    service = make_service()
    ingest(service, people[:3])
    key = _email_key(service, caller, people[2]["email"])
    worker = Caller(actor="svc:enricher", role=Role.WORKER)

    assert service.decrypt(key, reason="enrichment:geoip", caller=worker) == people[2]["email"]
    assert audit_events()[-1]["actor"] == "svc:enricher"
    assert audit_events()[-1]["event_type"] == "crypto.decrypt"


def test_audit_role_is_denied_decrypt(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    audit_events: AuditReader,
) -> None:
    service = make_service()
    ingest(service, people[:3])
    key = _email_key(service, caller, people[0]["email"])
    auditor = Caller(actor="oidc:auditor@example.com", role=Role.AUDIT)

    with pytest.raises(PermissionDenied) as info:
        service.decrypt(key, reason=REASON, caller=auditor)

    assert people[0]["email"] not in str(info.value)
    event = audit_events()[-1]
    assert (event["event_type"], event["operation"]) == ("access.denied", "decrypt")
    assert event["actor"] == auditor.actor
    assert _of_type(audit_events(), "crypto.decrypt") == []


def test_rotate_writes_key_rotate_event(
    make_service: ServiceFactory, caller: Caller, audit_events: AuditReader
) -> None:
    service = make_service()

    service.rotate_keys(caller=caller)

    rotations = _of_type(audit_events(), "key.rotate")
    assert len(rotations) == 1
    assert rotations[0]["key_version"] == 2
    assert rotations[0]["key_identifier"] == "heimdall-pii-v2"
    assert rotations[0]["actor"] == caller.actor
    assert rotations[0]["result"] == "success"


def test_first_ingest_writes_key_create_for_blind_index_key(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    audit_events: AuditReader,
) -> None:
    service = make_service()
    ingest(service, people[:3])
    ingest(service, people[3:6])
    service.close()
    ingest(make_service(), people[6:9])

    events = audit_events()
    creates = _of_type(events, "key.create")
    assert len(creates) == 1
    assert creates[0]["operation"] == "blind_index_key"
    assert creates[0]["key_identifier"] == "heimdall-pii-v1"
    assert creates[0]["key_version"] == 1
    assert events.index(creates[0]) < events.index(_of_type(events, "crypto.encrypt")[0])


def test_decrypt_of_unknown_key_is_audited_as_failure(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    audit_events: AuditReader,
) -> None:
    service = make_service()
    ingest(service, people[:3])
    missing = "email:hash:" + "0" * 64

    with pytest.raises(FieldNotFound):
        service.decrypt(missing, reason=REASON, caller=caller)

    event = audit_events()[-1]
    assert event["event_type"] == "crypto.decrypt"
    assert event["field_identifier"] == missing
    assert (event["result"], event["error"]) == ("failure", "FieldNotFound")


def test_decrypt_of_tampered_envelope_is_audited_as_failure(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    audit_events: AuditReader,
) -> None:
    service = make_service()
    ingest(service, people[:3])
    key = _email_key(service, caller, people[0]["email"])
    field = service.store.get_field(key)
    assert field is not None
    marker = '"ciphertext":"'
    at = field.encrypted_data.index(marker) + len(marker)
    flipped = "B" if field.encrypted_data[at] == "A" else "A"
    tampered = field.encrypted_data[:at] + flipped + field.encrypted_data[at + 1 :]
    update = FieldUpdate(tampered, field.key_version, field.encryption_version, field.dek_id)
    assert service.store.compare_and_swap(key, field.encrypted_data, update)

    with pytest.raises(DecryptionFailed):
        service.decrypt(key, reason=REASON, caller=caller)

    event = audit_events()[-1]
    assert event["event_type"] == "crypto.decrypt"
    assert event["field_identifier"] == key
    assert event["key_identifier"] == "heimdall-pii-v1"
    assert (event["result"], event["error"]) == ("failure", "DecryptionFailed")


def test_audit_log_file_is_private(
    make_service: ServiceFactory, ingest: Ingest, people: list[dict[str, Any]], data_dir: Path
) -> None:
    ingest(make_service(), people[:2])

    mode = stat.S_IMODE(os.stat(data_dir / "audit.log").st_mode)

    assert mode == 0o600


def _write_events(path: Path, count: int, *, padding: int = 0) -> JsonlAuditLog:
    log = JsonlAuditLog(path, fsync=False)
    log.write(
        [
            AuditEvent(
                EventType.DECRYPT,
                f"test:actor-{n}",
                Result.SUCCESS,
                f"req-{n}",
                field_identifier=f"email:hash:{n:064x}",
                reason="r" * padding or None,
                count=n,
            )
            for n in range(count)
        ]
    )
    return log


def test_verify_passes_on_fresh_log(
    make_service: ServiceFactory, ingest: Ingest, people: list[dict[str, Any]], data_dir: Path
) -> None:
    service = make_service()
    ingest(service, people[:3])
    service.rotate_keys(caller=Caller(actor="test:admin"))

    report = JsonlAuditLog(data_dir / "audit.log").verify()

    assert report.ok
    assert report.lines == len(list(JsonlAuditLog(data_dir / "audit.log"))) > 3
    assert report.first_bad_line is None


def _edit_line(lines: list[bytes]) -> list[bytes]:
    edited = lines[2].replace(b'"result":"success"', b'"result":"failure"')
    assert edited != lines[2]
    return [*lines[:2], edited, *lines[3:]]


def _delete_line(lines: list[bytes]) -> list[bytes]:
    return [*lines[:2], *lines[3:]]


def _swap_lines(lines: list[bytes]) -> list[bytes]:
    return [lines[0], lines[2], lines[1], *lines[3:]]


@pytest.mark.parametrize(
    ("tamper", "first_bad_line"),
    [(_edit_line, 3), (_delete_line, 3), (_swap_lines, 2)],
    ids=["edited", "deleted", "reordered"],
)
def test_verify_detects_tampering(
    tmp_path: Path, tamper: Callable[[list[bytes]], list[bytes]], first_bad_line: int
) -> None:
    path = tmp_path / "audit.log"
    log = _write_events(path, 6)
    assert log.verify().ok
    lines = path.read_bytes().splitlines(keepends=True)

    path.write_bytes(b"".join(tamper(lines)))

    report = log.verify()
    assert not report.ok
    assert report.first_bad_line == first_bad_line


def test_verify_detects_deleted_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = _write_events(path, 6)
    lines = path.read_bytes().splitlines(keepends=True)

    path.write_bytes(b"".join(lines[:-1]))

    assert not log.verify().ok


@pytest.mark.parametrize("breakage", ["directory", "write_raises"])
def test_decrypt_fails_closed_when_audit_cannot_be_written(
    *,
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    breakage: str,
) -> None:
    service = make_service()
    ingest(service, people[:3])
    key = _email_key(service, caller, people[0]["email"])
    if breakage == "directory":
        (data_dir / "audit.log").unlink()
        (data_dir / "audit.log").mkdir()
    else:

        def refuse(events: Sequence[AuditEvent]) -> None:
            raise AuditError("audit sink is down")

        monkeypatch.setattr(service.audit, "write", refuse)
    returned: list[str] = []

    with pytest.raises(AuditError) as info:
        returned.append(service.decrypt(key, reason=REASON, caller=caller))

    assert returned == []
    assert people[0]["email"] not in repr(info.value)


def test_ingest_fails_closed_when_audit_cannot_be_written(
    make_service: ServiceFactory, ingest: Ingest, people: list[dict[str, Any]], data_dir: Path
) -> None:
    service = make_service()
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "audit.log").mkdir()

    with pytest.raises(AuditError):
        ingest(service, people[:3])

    assert _stored_keys(service) == set()
    assert service.store.get_meta("blind_index_key") is None


def test_tail_returns_last_events_across_a_large_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = _write_events(path, 1500, padding=150)
    assert path.stat().st_size > 4 * 65536
    everything = list(log)

    assert log.tail(1) == everything[-1:]
    assert log.tail(7) == everything[-7:]
    # More lines than one 64 KiB block holds.
    assert log.tail(1000) == everything[-1000:]
    assert log.tail(5000) == everything
    assert log.tail(0) == []


def test_decrypt_failing_in_the_store_is_audited_as_failure(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    audit_events: AuditReader,
) -> None:
    service = make_service()
    ingest(service, people[:3])
    key = _email_key(service, caller, people[0]["email"])
    service.store.close()

    with pytest.raises(StorageError):
        service.decrypt(key, reason=REASON, caller=caller)

    event = audit_events()[-1]
    assert (event["event_type"], event["field_identifier"]) == ("crypto.decrypt", key)
    assert (event["result"], event["error"]) == ("failure", "StorageError")


def test_verify_detects_a_missing_chain_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = _write_events(path, 3)
    assert log.verify().ok
    log.head_path.unlink()

    report = log.verify()

    assert not report.ok
    assert report.problem == "chain head record is missing"


def test_an_event_writes_every_member_it_has_in_the_log_order() -> None:
    every: dict[str, Any] = {
        "field_identifier": "email:hash:" + "a" * 64,
        "key_identifier": "local/heimdall",
        "key_version": 3,
        "reason": "support:1",
        "source_ip": "10.0.0.1",
        "operation": "POST /v1/decrypt",
        "error": "DecryptionFailed",
        "count": 7,
        "token_name": "enrich-1",
        "role": "heimdall-worker",
    }
    event = AuditEvent(EventType.DECRYPT, "token:a", Result.FAILURE, "req-1", **every)

    doc = event.to_dict()

    fields = [f.name for f in dataclasses.fields(AuditEvent)]
    assert sorted(doc) == sorted(fields)  # a field added to the event reaches the trail
    assert list(doc) == ["timestamp", "event_type", "actor", *_OPTIONAL_FIELDS, "result"]
    assert (type(doc["event_type"]), type(doc["result"])) == (str, str)
    assert (doc["event_type"], doc["result"]) == ("crypto.decrypt", "failure")
    assert {name: doc[name] for name in every} == every
    bare = AuditEvent(EventType.KEY_ROTATE, "op", Result.SUCCESS, "req-2").to_dict()
    assert list(bare) == ["timestamp", "event_type", "actor", "request_id", "result"]


def test_events_sealed_together_chain_exactly_as_sealed_one_by_one() -> None:
    bodies = [orjson.dumps({"timestamp": "t", "event_type": "x", "n": n}) for n in range(5)]
    start = ChainState(size=100, lines=4, events=3, hash="ab" * 32, pending=3, every=10)

    lines, after = seal_events(start, bodies)

    state, previous, expected = start, start.hash, []
    for body in bodies:
        line, previous = seal(body, previous)
        expected.append(line)
        state, _ = advance(state, line)
    assert lines == expected
    assert after == state
    assert after == ChainState(100 + sum(map(len, lines)), 9, 8, previous, 8, 10, 0)
    assert seal_events(start, []) == ([], start)


_ODD = 'a"b\\c\u0007\u00e9\u2028\U0001f600'  # a quote, a backslash, a control character, non-ASCII


@pytest.mark.parametrize("source_ip", ["192.0.2.7", None], ids=["address", "no-address"])
@pytest.mark.parametrize(
    ("actor", "request_id", "reason"),
    [
        ("token:enrich-1", "req-1", REASON),
        ("oidc:" + _ODD, "req-" + _ODD, 'support:"quoted" \\ back'),  # a reason may hold both
    ],
    ids=["plain", "escaped"],
)
def test_a_batch_of_decryptions_is_the_events_decryption_builds_written_byte_for_byte(
    source_ip: str | None, actor: str, request_id: str, reason: str
) -> None:
    caller = Caller(actor, role=Role.APP, request_id=request_id, source_ip=source_ip)
    key = "email:hash:" + "a" * 64
    rows: list[tuple[str | None, str | None, int | None, BaseException | None]] = [
        (key, "heimdall-pii-v3", 3, None),
        (key, "heimdall-pii-v3", 3, DecryptionFailed()),
        (key, None, 2, FieldNotFound("")),  # an envelope that could not be read: no key
        (key, None, None, FieldNotFound("")),  # no field at all
        (None, None, None, PermissionDenied("")),  # text that was not a canonical key
        (_ODD, _ODD, 2**31 - 1, None),  # any text is escaped as orjson escapes it
        (key, "heimdall-pii-v1", True, None),  # a bool is written as JSON true, not 1
    ]
    expected = [
        AuditEvent.decryption(
            caller,
            field_identifier=field,
            key_identifier=key_identifier,
            key_version=version,
            reason=reason,
            error=error,
            timestamp="2026-01-02T03:04:05.678Z",
        )
        for field, key_identifier, version, error in rows
    ]

    batch = Decryptions.of(
        caller,
        reason,
        "2026-01-02T03:04:05.678Z",
        [(f, k, v, None if e is None else type(e).__name__) for f, k, v, e in rows],
    )

    assert list(batch) == expected
    assert [batch[i] for i in range(-len(rows), len(rows))] == expected * 2
    assert batch[1:3] == expected[1:3]
    assert len(batch) == len(rows)
    assert batch.bodies() == [orjson.dumps(event.to_dict()) for event in expected]
    joined = Joined((expected[:2], batch, expected[2:]))
    flat = [*expected[:2], *expected, *expected[2:]]
    assert list(joined) == flat and len(joined) == len(flat)
    assert [joined[i] for i in range(-len(flat), len(flat))] == flat * 2
    assert joined[2:4] == flat[2:4] and joined[::-3] == flat[::-3] and joined[5:1] == []
    for outside in (len(flat), -len(flat) - 1):
        with pytest.raises(IndexError):
            joined[outside]
    assert event_bodies(joined) == [orjson.dumps(e.to_dict()) for e in joined]
    assert key not in repr(batch) and key not in repr(joined)  # no rows in a repr (a log line)


def test_a_batch_of_decryptions_cannot_be_changed_once_made() -> None:
    caller = Caller("token:enrich-1", role=Role.APP)
    row = ["email:hash:" + "a" * 64, "heimdall-pii-v1", 1, None]
    rows = [row]
    batch = Decryptions(caller.actor, caller.request_id, None, REASON, "t", rows)  # type: ignore[arg-type]
    before = list(batch)

    row[2] = 99
    rows.append(row)

    assert list(batch) == before and len(batch) == 1


@pytest.mark.parametrize("version", [-(2**63), 2**64 - 1, 2**64, -(2**63) - 1])
def test_a_version_orjson_cannot_write_is_refused_as_writing_the_event_refuses_it(
    version: int,
) -> None:
    caller = Caller("token:enrich-1", role=Role.APP)
    batch = Decryptions.of(caller, REASON, "t", [("email:hash:" + "a" * 64, "k", version, None)])
    try:
        expected: list[bytes] | type[Exception] = [orjson.dumps(batch[0].to_dict())]
    except orjson.JSONEncodeError:
        expected = orjson.JSONEncodeError
    if isinstance(expected, list):
        assert batch.bodies() == expected
    else:
        with pytest.raises(expected):
            batch.bodies()


def test_a_batch_of_decryptions_writes_the_trail_writing_its_events_writes(
    tmp_path: Path,
) -> None:
    caller = Caller("token:enrich-1", role=Role.APP, request_id="req-1", source_ip="192.0.2.7")
    rows = [(f"email:hash:{n:064x}", "heimdall-pii-v1", 1, None) for n in range(5)]
    batch = Decryptions.of(caller, REASON, "2026-01-02T03:04:05.678Z", rows)
    by_batch = JsonlAuditLog(tmp_path / "batch.log", fsync=False)
    by_event = JsonlAuditLog(tmp_path / "events.log", fsync=False)

    by_batch.write(batch)
    by_event.write(list(batch))

    assert (tmp_path / "batch.log").read_bytes() == (tmp_path / "events.log").read_bytes()
    assert by_batch.verify().ok
