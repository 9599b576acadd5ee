"""Ingest: JSON Lines in, FieldValue / Sighting / Record rows out.

spec: Envelope Encryption Architecture, Encryption Flow.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from heimdall.blind_index import BlindIndex
from heimdall.ingest import IngestReport, LineError
from heimdall.rbac import Caller
from heimdall.service import Heimdall
from heimdall.store.sqlite import SqliteStore

ServiceFactory = Callable[..., Heimdall]
Ingest = Callable[..., IngestReport]
AuditReader = Callable[[], list[dict[str, Any]]]

REASON = "test:ingest"


def _line(record: dict[str, Any]) -> str:
    return orjson.dumps(record).decode() + "\n"


def _query(service: Heimdall, sql: str) -> list[tuple[Any, ...]]:
    """Rows straight from the SQLite file, through a second connection."""
    store = service.store
    assert isinstance(store, SqliteStore)
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        return conn.execute(sql).fetchall()


def _records(service: Heimdall) -> dict[str, tuple[str, dict[str, Any]]]:
    rows = _query(service, "SELECT record_id, source, attributes FROM records")
    return {record_id: (source, orjson.loads(attrs)) for record_id, source, attrs in rows}


def _raw_store_bytes(service: Heimdall) -> bytes:
    store = service.store
    assert isinstance(store, SqliteStore)
    parts = [store.path, Path(f"{store.path}-wal")]
    return b"".join(p.read_bytes() for p in parts if p.exists())


def _field_count(service: Heimdall) -> int:
    return sum(c.count for c in service.store.field_counts())


def test_malformed_lines_are_reported_by_number_and_the_rest_ingest(
    make_service: ServiceFactory, ingest: Ingest, caller: Caller
) -> None:
    service = make_service()
    lines = [
        _line({"id": "r-1", "email": "one@example.com"}),
        "{not json\n",
        "\n",
        "[1, 2]\n",
        _line({"id": "r-2", "email": "two@example.com"}),
        _line({"id": "bad-list", "email": ["listed@example.com"]}),
        "   \n",
        _line({"id": "bad-email", "name": "Zed Unique-Bad", "email": "no-at-sign.example.com"}),
        _line({"id": "r-3", "email": "three@example.com"}),
    ]

    report = ingest(service, lines)

    assert [error.line for error in report.errors] == [2, 4, 6, 8]
    assert report.errors[0] == LineError(2, "not valid JSON")
    assert report.errors[1] == LineError(4, "not a JSON object")
    assert "'email'" in report.errors[2].message and "list" in report.errors[2].message
    assert "'email'" in report.errors[3].message and "email" in report.errors[3].message
    for error in report.errors:
        for value in ("listed@example.com", "no-at-sign", "Zed", "not json"):
            assert value not in error.message
    assert report.records == 3
    assert set(_records(service)) == {"r-1", "r-2", "r-3"}
    for email in ("one@example.com", "two@example.com", "three@example.com"):
        assert service.lookup("email", email, caller=caller).sightings == 1


def test_record_with_invalid_field_is_written_nowhere(
    make_service: ServiceFactory, ingest: Ingest, caller: Caller
) -> None:
    service = make_service()
    good = {"id": "good", "email": "kept@example.com"}
    # name is valid and comes first: it must not be stored either.
    bad = {"id": "bad", "name": "Zed Unique-Bad", "phone": "+1 555", "email": "ok@example.com"}

    report = ingest(service, [good, bad])

    assert [error.line for error in report.errors] == [2]
    assert "'phone'" in report.errors[0].message
    assert set(_records(service)) == {"good"}
    assert _field_count(service) == 1
    for field, value in (("name", "Zed Unique-Bad"), ("email", "ok@example.com")):
        result = service.lookup(field, value, caller=caller)
        assert not result.found
        assert service.store.count_sightings(result.canonical_key) == 0
    assert _query(service, "SELECT COUNT(*) FROM sightings") == [(1,)]
    assert _query(service, "SELECT record_id FROM sightings") == [("good",)]


@pytest.mark.parametrize("batch_size", [1, 1000])
def test_equal_values_in_different_formatting_share_one_field(
    make_service: ServiceFactory, ingest: Ingest, caller: Caller, batch_size: int
) -> None:
    service = make_service()
    records = [
        {"id": "a", "email": " Alice@Example.COM "},
        {"id": "b", "email": "alice@example.com"},
    ]

    report = ingest(service, records, batch_size=batch_size)

    assert (report.fields_encrypted, report.fields_deduplicated) == (1, 1)
    assert _field_count(service) == 1
    result = service.lookup("email", "ALICE@example.com", caller=caller)
    assert result.found
    assert result.sightings == 2
    # The first spelling is what was encrypted (stripped); normalising only feeds the index.
    assert service.decrypt(result.canonical_key, reason=REASON, caller=caller) == (
        "Alice@Example.COM"
    )


def test_dropped_fields_are_stored_nowhere(
    make_service: ServiceFactory, ingest: Ingest, data_dir: Path
) -> None:
    service = make_service()
    record = {
        "id": "d-1",
        "email": "dropper@example.com",
        "notes": "dropped-marker-7f3a9c",
        "password": "hunter2-unique-8d1e",
    }

    report = ingest(service, [record])

    assert report.dropped_fields == 2
    assert _records(service)["d-1"] == ("test", {})
    stored = _raw_store_bytes(service) + (data_dir / "audit.log").read_bytes()
    for value in (b"dropped-marker-7f3a9c", b"hunter2-unique-8d1e", b"notes", b"password"):
        assert value not in stored


def test_plain_fields_are_stored_on_the_record(
    make_service: ServiceFactory, ingest: Ingest
) -> None:
    service = make_service()
    record = {
        "id": "p-1",
        "source": "crm",
        "email": "plain@example.com",
        "country": " DE ",
        "plan": "pro",
        "signup_channel": "event",
        "created_at": "2024-01-02",
    }

    ingest(service, [record])

    source, attributes = _records(service)["p-1"]
    assert source == "crm"
    assert attributes == {
        "country": "DE",
        "plan": "pro",
        "signup_channel": "event",
        "created_at": "2024-01-02",
    }
    assert b"plain@example.com" not in _raw_store_bytes(service)


def test_record_without_id_is_named_by_source_and_line(
    make_service: ServiceFactory, ingest: Ingest
) -> None:
    service = make_service()

    ingest(service, ["\n", _line({"email": "anon@example.com"})], source_name="upload.jsonl")

    assert _records(service) == {"upload.jsonl:2": ("upload.jsonl", {})}


def test_blank_lines_are_skipped(make_service: ServiceFactory, ingest: Ingest) -> None:
    service = make_service()
    lines = [
        "\n",
        _line({"id": "b-1", "email": "b1@example.com"}),
        "   \n",
        "\t\r\n",
        _line({"id": "b-2", "email": "b2@example.com"}),
        "\n",
    ]

    report = ingest(service, lines)

    assert report.errors == []
    assert report.records == 2
    assert set(_records(service)) == {"b-1", "b-2"}


def _snapshot(service: Heimdall) -> dict[str, Any]:
    fields = _query(service, "SELECT canonical_key, field_name FROM field_values")
    sightings = _query(service, "SELECT canonical_key, record_id, source FROM sightings")
    return {
        "fields": sorted(fields),
        "sightings": Counter(sightings),
        "records": _records(service),
        "counts": service.store.field_counts(),
    }


def _shared_blind_index_dirs(make_service: ServiceFactory, caller: Caller, *dirs: Path) -> None:
    """Data dirs whose stores share one blind-index key, so equal values get equal keys."""
    seed = make_service(data_dir=dirs[0])
    seed.blind_index(caller)
    seed.close()
    for copy in dirs[1:]:
        shutil.copytree(dirs[0], copy)


def test_batch_size_does_not_change_what_is_stored(
    *,
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    tmp_path: Path,
) -> None:
    first_dir, second_dir = tmp_path / "one", tmp_path / "thousand"
    _shared_blind_index_dirs(make_service, caller, first_dir, second_dir)
    lines: list[dict[str, Any] | str] = [*people[:20], "{broken\n", "\n", *people[:5], *people[20:]]

    one = make_service(data_dir=first_dir)
    one_report = ingest(one, lines, batch_size=1)
    thousand = make_service(data_dir=second_dir)
    thousand_report = ingest(thousand, lines, batch_size=1000)

    assert one_report == thousand_report
    assert one_report.fields_deduplicated > 0
    one_snapshot = _snapshot(one)
    assert one_snapshot == _snapshot(thousand)
    assert len(one_snapshot["fields"]) == one_report.fields_encrypted


def test_ingest_run_again_after_a_partial_run_stores_each_sighting_once(
    *,
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    tmp_path: Path,
) -> None:
    once_dir, again_dir = tmp_path / "once", tmp_path / "again"
    _shared_blind_index_dirs(make_service, caller, once_dir, again_dir)
    once = make_service(data_dir=once_dir)
    once_report = ingest(once, people)
    again = make_service(data_dir=again_dir)

    # A run that failed after two batches, the whole file run again, then a file that
    # overlaps it in part.
    ingest(again, people[:25], batch_size=10)
    rerun_report = ingest(again, people, batch_size=10)
    ingest(again, people[30:], batch_size=10)

    # Every record id is distinct, so the first run's sightings are the distinct occurrences.
    occurrences = once_report.sightings
    assert occurrences == rerun_report.sightings > 0
    assert _query(again, "SELECT COUNT(*) FROM sightings") == [(occurrences,)]
    assert _snapshot(again) == _snapshot(once)
    for person in people[:3]:
        assert (
            again.lookup("email", person["email"], caller=caller).sightings
            == once.lookup("email", person["email"], caller=caller).sightings
        )


def test_record_ingested_again_with_a_changed_value_keeps_the_old_sighting(
    make_service: ServiceFactory, ingest: Ingest, caller: Caller
) -> None:
    service = make_service()
    ingest(service, [{"id": "c-1", "email": "old@example.com"}])

    ingest(service, [{"id": "c-1", "email": "new@example.com"}])
    ingest(service, [{"id": "c-1", "email": "new@example.com"}])

    for email in ("old@example.com", "new@example.com"):
        assert service.lookup("email", email, caller=caller).sightings == 1
    assert _query(service, "SELECT COUNT(*) FROM sightings") == [(2,)]


def test_oversized_value_is_reported_and_the_rest_ingest(
    make_service: ServiceFactory, ingest: Ingest
) -> None:
    service = make_service()
    huge = "Quillfeather Road " * 4000  # 72 000 bytes, over the 64 KiB envelope limit
    lines = [
        {"id": "before", "email": "before@example.com"},
        {"id": "huge", "email": "huge@example.com", "address": huge},
        {"id": "after", "email": "after@example.com"},
    ]

    report = ingest(service, lines)

    assert [error.line for error in report.errors] == [2]
    assert "'address'" in report.errors[0].message
    assert "Quillfeather" not in report.errors[0].message
    assert set(_records(service)) == {"before", "after"}
    assert _field_count(service) == 2


def test_threads_asking_a_new_store_for_its_blind_index_share_one_key(
    make_service: ServiceFactory, caller: Caller, audit_events: AuditReader
) -> None:
    service = make_service()
    start = threading.Barrier(16)
    seen: list[BlindIndex] = []

    def ask() -> None:
        start.wait()
        seen.append(service.blind_index(caller))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 16 and len({id(index) for index in seen}) == 1
    created = [e for e in audit_events() if e.get("operation") == "blind_index_key"]
    assert len(created) == 1  # one key made (and unwrapped) for the process, none left unwiped
