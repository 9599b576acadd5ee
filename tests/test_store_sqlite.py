"""SqliteStore: the GraphStore contract, plus what only the SQLite file can show."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from heimdall.errors import StorageError
from heimdall.store.base import (
    FieldCount,
    FieldValue,
    GraphStore,
    RecordRow,
    Sighting,
    field_from_row,
)
from heimdall.store.sqlite import SqliteStore, _field_filter, _page_sql
from heimdall.store.sqlite_schema import MIGRATIONS
from store_contract import (
    FILTERS,
    LATER,
    LONG_AGO,
    TIMESTAMP,
    Filter,
    StoreContract,
    envelope,
    field_value,
    in_order,
    key,
    keyed_envelope,
    repeated_sightings,
    rewrap,
    sighting,
)

# The schema versions before sightings became one per (canonical_key, record_id, source).
VERSIONS_WITH_REPEATED_SIGHTINGS = 2


def raw_connection(path: Path) -> closing[sqlite3.Connection]:
    """A second, plain connection to the file, standing in for another process."""
    return closing(sqlite3.connect(path, isolation_level=None, check_same_thread=False))


def stored_sightings(path: Path) -> list[Sighting]:
    with raw_connection(path) as conn:
        rows = conn.execute(
            "SELECT canonical_key, record_id, source, seen_at FROM sightings"
        ).fetchall()
    return [Sighting(*row) for row in rows]


def sqlite_path(store: GraphStore) -> Path:
    assert isinstance(store, SqliteStore)
    return store.path


class TestSqliteStoreContract(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[GraphStore]:
        store = SqliteStore(tmp_path / "graph.db")
        yield store
        store.close()

    def stored_record(self, store: GraphStore, record_id: str) -> RecordRow | None:
        with raw_connection(sqlite_path(store)) as conn:
            row = conn.execute(
                "SELECT record_id, source, ingested_at, attributes FROM records"
                " WHERE record_id = ?",
                (record_id,),
            ).fetchone()
        if row is None:
            return None
        return RecordRow(row[0], row[1], row[2], json.loads(row[3]))

    def stored_sightings(self, store: GraphStore) -> list[Sighting]:
        return stored_sightings(sqlite_path(store))

    def reopen(self, store: GraphStore) -> GraphStore:
        path = sqlite_path(store)
        store.close()
        return SqliteStore(path)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "graph.db"


def test_database_and_wal_files_are_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "graph.db"
    store = SqliteStore(path)
    try:
        store.write_batch([field_value(1)], [], [])

        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(f"{path}-wal").stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    finally:
        store.close()


def test_journal_mode_is_wal(path: Path) -> None:
    SqliteStore(path).close()

    with raw_connection(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_migrations_are_recorded_and_not_reapplied_on_reopen(path: Path) -> None:
    SqliteStore(path).close()
    with raw_connection(path) as conn:
        rows = conn.execute("SELECT version, applied_at FROM schema_migrations").fetchall()
        assert sorted(version for version, _ in rows) == list(range(1, len(MIGRATIONS) + 1))
        assert all(TIMESTAMP.fullmatch(applied_at) for _, applied_at in rows)
        # A re-applied migration would rewrite its row (or fail on CREATE TABLE).
        conn.execute("UPDATE schema_migrations SET applied_at = 'first open'")

    SqliteStore(path).close()

    with raw_connection(path) as conn:
        after = conn.execute("SELECT version, applied_at FROM schema_migrations").fetchall()
    assert sorted(after) == [(version, "first open") for version, _ in sorted(rows)]


def test_database_from_a_newer_schema_is_refused(path: Path) -> None:
    SqliteStore(path).close()
    with raw_connection(path) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?, 'later')",
            (len(MIGRATIONS) + 1,),
        )

    with pytest.raises(StorageError, match="newer"):
        SqliteStore(path)


def _old_database_with_repeated_sightings(path: Path, sightings: list[Sighting]) -> None:
    """A database as written before sightings were made unique, holding *sightings* in that
    order, with a FieldValue for each of their keys."""
    with raw_connection(path) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        for version in range(1, VERSIONS_WITH_REPEATED_SIGHTINGS + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, LONG_AGO))
        for canonical_key in sorted({s.canonical_key for s in sightings}):
            conn.execute(
                "INSERT INTO field_values VALUES (?, 'email', ?, 1, 1, 'kms_v1', 'd', ?, ?)",
                (canonical_key, envelope(canonical_key), LONG_AGO, LONG_AGO),
            )
        conn.executemany(
            "INSERT INTO sightings (canonical_key, record_id, source, seen_at) VALUES (?, ?, ?, ?)",
            [(s.canonical_key, s.record_id, s.source, s.seen_at) for s in sightings],
        )


VERSIONS_WITHOUT_KEY_NAMES = 3


def test_opening_a_database_without_key_names_names_the_key_of_every_field(path: Path) -> None:
    # Fields and a running job as a heimdall before key names wrote them.
    with raw_connection(path) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        for version in range(1, VERSIONS_WITHOUT_KEY_NAMES + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, LONG_AGO))
        for n, identifier, version in ((1, "pii-v1", 1), (2, "pii-v2", 2), (3, "other-v1", 1)):
            conn.execute(
                "INSERT INTO field_values VALUES (?, 'email', ?, 1, ?, 'kms_v1', 'd', ?, ?)",
                (key(n), keyed_envelope(str(n), identifier), version, LONG_AGO, LONG_AGO),
            )
        conn.execute(
            "INSERT INTO reencrypt_jobs VALUES"
            " ('job-old', 'rotation', 2, 0, 'running', 2, 0, 0, ?, ?)",
            (LONG_AGO, LONG_AGO),
        )

    store = SqliteStore(path)
    try:
        assert store.field_counts() == [
            FieldCount("kms_v1", 1, 1, "other"),
            FieldCount("kms_v1", 1, 1, "pii"),
            FieldCount("kms_v1", 2, 1, "pii"),
        ]
        job = store.get_job("job-old")
        assert job is not None and job.target_key == ""
        # A job recorded before key names still takes any key below its version.
        with store.claim(job, 10) as claim:
            assert {f.canonical_key for f in claim.fields} == {key(1), key(3)}
    finally:
        store.close()


def test_opening_a_database_with_repeated_sightings_keeps_the_earliest_of_each(
    path: Path,
) -> None:
    written, kept = repeated_sightings()
    _old_database_with_repeated_sightings(path, written)

    store = SqliteStore(path)
    try:
        assert (store.count_sightings(key(1)), store.count_sightings(key(2))) == (3, 1)
        # And from now on one each: the unique index is in place.
        store.write_batch([], [sighting(1, "r2", seen_at=LATER), sighting(2, "r1")], [])
        assert (store.count_sightings(key(1)), store.count_sightings(key(2))) == (3, 1)
    finally:
        store.close()

    assert in_order(stored_sightings(path)) == kept
    with raw_connection(path) as conn:
        versions = conn.execute("SELECT version FROM schema_migrations").fetchall()
    assert sorted(version for (version,) in versions) == list(range(1, len(MIGRATIONS) + 1))


def test_count_sightings_reads_the_unique_index(path: Path) -> None:
    # The index on canonical_key alone is gone; the unique one must still serve the count.
    SqliteStore(path).close()

    with raw_connection(path) as conn:
        plan = " | ".join(
            row[3]
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM sightings WHERE canonical_key = ?",
                (key(1),),
            )
        )
    assert "sightings_by_key_record_source" in plan


def test_file_that_is_not_a_database_raises_storage_error(path: Path) -> None:
    path.write_bytes(b"not a database, just some bytes " * 64)

    with pytest.raises(StorageError):
        SqliteStore(path)


def test_orphan_sighting_error_names_the_cause_and_keeps_sqlite_as_cause(path: Path) -> None:
    store = SqliteStore(path)
    try:
        with pytest.raises(StorageError, match="no FieldValue") as caught:
            store.write_batch([field_value(1)], [sighting(2)], [])
        assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
    finally:
        store.close()


def test_two_stores_on_one_file_see_each_others_writes_and_cas_conflicts(path: Path) -> None:
    first, second = SqliteStore(path), SqliteStore(path)
    try:
        original = field_value(1)
        first.write_batch([original], [sighting(1)], [])
        second.set_meta("a", "1")

        assert second.get_field(key(1)) == original
        assert second.count_sightings(key(1)) == 1
        assert first.get_meta("a") == "1"

        assert first.compare_and_swap(
            key(1), original.encrypted_data, rewrap(original, key_version=2)
        )
        assert not second.compare_and_swap(
            key(1), original.encrypted_data, rewrap(original, key_version=3)
        )
        seen = second.get_field(key(1))
        assert seen is not None
        assert seen.key_version == 2
        assert seen.encrypted_data == rewrap(original, key_version=2).encrypted_data
    finally:
        first.close()
        second.close()


def test_another_store_opened_in_the_process_leaves_the_first_ones_locks_alone(
    path: Path,
) -> None:
    # Closing any descriptor of a file drops every POSIX lock the process holds on it: had
    # opening a store checked the database's files by opening and closing them, the first
    # store would lose its locks, and another process closing the database would then take it
    # for the last user, checkpoint and delete the WAL under it, and the first would read stale.
    first = SqliteStore(path)
    try:
        first.set_meta("owner", "first")
        SqliteStore(path).close()
        writer = (
            "import sys; from pathlib import Path; from heimdall.store.sqlite import SqliteStore; "
            "s = SqliteStore(Path(sys.argv[1])); s.set_meta('owner', 'other'); s.close()"
        )
        subprocess.run([sys.executable, "-c", writer, str(path)], check=True, timeout=60)
        assert path.with_name(path.name + "-wal").exists()
        assert first.get_meta("owner") == "other"
    finally:
        first.close()


def test_write_waits_for_another_writer_instead_of_failing(path: Path) -> None:
    store = SqliteStore(path)
    try:
        with raw_connection(path) as other:
            other.execute("BEGIN IMMEDIATE")
            release = threading.Timer(0.2, other.execute, ("COMMIT",))
            started = time.monotonic()
            release.start()
            try:
                inserted = store.write_batch([field_value(1)], [], [])
            finally:
                release.join()
        assert inserted == 1
        assert time.monotonic() - started >= 0.15
    finally:
        store.close()


def test_store_can_be_used_from_another_thread(path: Path) -> None:
    store = SqliteStore(path)
    try:
        store.write_batch([field_value(1), field_value(2)], [], [])
        counts: list[int] = []
        worker = threading.Thread(target=lambda: counts.append(store.count_fields()))
        worker.start()
        worker.join()

        assert counts == [2]
    finally:
        store.close()


@pytest.mark.parametrize("filters", FILTERS)
def test_iter_fields_pages_walk_the_primary_key_without_sorting(
    path: Path, filters: Filter
) -> None:
    # A page that sorts all remaining matches makes a full rotation quadratic.
    SqliteStore(path).close()
    clauses, params = _field_filter(*filters, walk_keys=True)

    with raw_connection(path) as conn:
        for sql, args in (
            (_page_sql(clauses, resume=False), [*params, 500]),
            (_page_sql(clauses, resume=True), [*params, key(1), 500]),
        ):
            plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args))
            assert "TEMP B-TREE" not in plan
            assert "field_values_by_version" not in plan


def test_repr_shows_only_the_path(path: Path) -> None:
    store = SqliteStore(path)
    try:
        store.write_batch([field_value(1, data=envelope("in-repr?"))], [], [])

        assert repr(store) == f"SqliteStore({str(path)!r})"
    finally:
        store.close()


@pytest.mark.parametrize("is_encrypted", [1, 0])
def test_a_field_read_from_a_row_is_the_value_its_constructor_builds(is_encrypted: int) -> None:
    row = ("email:hash:" + "a" * 64, "email", "{}", is_encrypted, 3, "kms_v1", "d" * 32, "t")

    read = field_from_row(row)

    built = FieldValue(row[0], row[1], row[2], 3, "kms_v1", "d" * 32, bool(is_encrypted), "t")
    assert read == built
    assert [getattr(read, f.name) for f in dataclasses.fields(FieldValue)] == [
        getattr(built, f.name) for f in dataclasses.fields(FieldValue)
    ]
    assert type(read.is_encrypted) is bool
    assert repr(read) == repr(built) and hash(read) == hash(built)
    with pytest.raises(dataclasses.FrozenInstanceError):
        read.encrypted_data = "changed"  # type: ignore[misc]
