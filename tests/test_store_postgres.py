"""PostgresStore: the GraphStore contract, plus what only a real PostgreSQL server can show."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from heimdall.errors import StorageError
from heimdall.store.base import FieldCount, FieldUpdate, FieldValue, GraphStore, RecordRow, Sighting
from heimdall.store.postgres import _GET_FIELDS, PostgresStore, _field_filter, _page_sql
from heimdall.store.postgres_schema import MIGRATIONS, SQL
from postgres_server import connect, free_port, temporary_database
from store_contract import (
    FILTERS,
    FIXED_TIME,
    LATER,
    LONG_AGO,
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

# What write_batch takes: field values, sightings, records.
Batch = tuple[Sequence[FieldValue], Sequence[Sighting], Sequence[RecordRow]]

# Seconds a thread waits for the others at a barrier before the test fails instead of hanging.
BARRIER_TIMEOUT = 30

# Rows for the plan tests: a few thousand, enough that the planner prices a table scan as what
# it is, few enough to write in a fraction of a second.
PLAN_TABLE_ROWS = 5000

# The schema versions before sightings became one per (canonical_key, record_id, source).
VERSIONS_WITH_REPEATED_SIGHTINGS = 2


class TestPostgresStoreContract(StoreContract):
    dsn = ""

    @pytest.fixture
    def store(self, postgres_store_dsn: str) -> Iterator[GraphStore]:
        # pytest binds class fixtures to the test's own instance, so the hooks below see it.
        self.dsn = postgres_store_dsn
        store = PostgresStore(postgres_store_dsn, pool_size=2)
        yield store
        store.close()

    def stored_record(self, store: GraphStore, record_id: str) -> RecordRow | None:
        with connect(self.dsn) as conn:
            row = conn.execute(
                "SELECT record_id, source, ingested_at, attributes FROM records"
                " WHERE record_id = %s",
                (record_id,),
            ).fetchone()
        if row is None:
            return None
        return RecordRow(row[0], row[1], row[2], row[3])

    def stored_sightings(self, store: GraphStore) -> list[Sighting]:
        return stored_sightings(self.dsn)

    def reopen(self, store: GraphStore) -> GraphStore:
        store.close()
        return PostgresStore(self.dsn, pool_size=2)


def stored_sightings(dsn: str) -> list[Sighting]:
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT canonical_key, record_id, source, seen_at FROM sightings"
        ).fetchall()
    return [Sighting(*row) for row in rows]


@pytest.fixture
def dsn(postgres_store_dsn: str) -> str:
    return postgres_store_dsn


@pytest.fixture
def store(dsn: str) -> Iterator[PostgresStore]:
    store = PostgresStore(dsn, pool_size=2)
    yield store
    store.close()


# -- schema ------------------------------------------------------------------------------------


def test_field_properties_are_a_jsonb_object_holding_the_envelope_as_a_string(
    store: PostgresStore, dsn: str
) -> None:
    written = field_value(1, key_version=3)
    store.write_batch([written], [], [RecordRow("r1", "crm", "t", {"country": "SE"})])

    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT pg_typeof(properties)::text, jsonb_typeof(properties),"
            " jsonb_typeof(properties -> 'encrypted_data'), properties"
            " FROM field_values WHERE canonical_key = %s",
            (written.canonical_key,),
        ).fetchone()
        attributes = conn.execute(
            "SELECT pg_typeof(attributes)::text, jsonb_typeof(attributes) FROM records"
        ).fetchone()

    assert row is not None
    assert row[:3] == ("jsonb", "object", "string")
    assert row[3] == {
        "encrypted_data": written.encrypted_data,
        "is_encrypted": True,
        "key_version": 3,
        "encryption_version": "kms_v1",
        "dek_id": written.dek_id,
        "created_at": written.updated_at,
        "updated_at": written.updated_at,
    }
    assert attributes == ("jsonb", "object")


def test_envelope_text_round_trips_byte_for_byte_and_swaps_on_that_exact_text(
    store: PostgresStore,
) -> None:
    # Key order, spacing, escapes and non-ASCII that a parsed JSON object would not keep.
    odd = '{ "z":1,  "a" : "\\u00e9\\n\\"q\\"",\t"é":[ ] }\n'
    written = field_value(1, data=odd)
    store.write_batch([written], [], [])

    assert store.get_field(key(1)) == written
    assert not store.compare_and_swap(
        key(1), odd.replace("  ", " "), rewrap(written, key_version=2)
    )
    assert store.compare_and_swap(key(1), odd, rewrap(written, key_version=2))


def test_generated_version_columns_follow_a_compare_and_swap(
    store: PostgresStore, dsn: str
) -> None:
    original = field_value(1, key_version=1)
    store.write_batch([original], [], [])
    update = FieldUpdate(envelope("new"), key_version=5, encryption_version="kms_v2", dek_id="d")

    assert store.compare_and_swap(key(1), original.encrypted_data, update)

    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT encryption_version, key_version, dek_id, properties ->> 'created_at'"
            " FROM field_values"
        ).fetchone()
    assert row == ("kms_v2", 5, "d", original.updated_at)


def test_migrations_are_recorded_and_not_reapplied_on_reopen(dsn: str) -> None:
    PostgresStore(dsn).close()
    with connect(dsn) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert [version for (version,) in rows] == list(range(1, len(MIGRATIONS) + 1))
        # A re-applied migration would rewrite its row (or fail on CREATE TABLE).
        conn.execute("UPDATE schema_migrations SET applied_at = '2001-02-03T04:05:06Z'")

    PostgresStore(dsn).close()

    with connect(dsn) as conn:
        stamps = conn.execute("SELECT DISTINCT applied_at::text FROM schema_migrations").fetchall()
    assert stamps == [("2001-02-03 04:05:06+00",)]


def test_database_from_a_newer_schema_is_refused(dsn: str) -> None:
    PostgresStore(dsn).close()
    with connect(dsn) as conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (len(MIGRATIONS) + 1,))

    with pytest.raises(StorageError, match="newer"):
        PostgresStore(dsn)


def _old_database_with_repeated_sightings(dsn: str, sightings: list[Sighting]) -> None:
    """The database of *dsn* as written before sightings were made unique, holding
    *sightings* in that order, with a FieldValue for each of their keys."""
    with connect(dsn) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version in range(1, VERSIONS_WITH_REPEATED_SIGHTINGS + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        for canonical_key in sorted({s.canonical_key for s in sightings}):
            conn.execute(
                "INSERT INTO field_values (canonical_key, field_name, properties)"
                " VALUES (%s, 'email', jsonb_build_object('encrypted_data', %s::text,"
                " 'is_encrypted', true, 'key_version', 1, 'encryption_version', 'kms_v1',"
                " 'dek_id', 'd', 'created_at', %s::text, 'updated_at', %s::text))",
                (canonical_key, envelope(canonical_key), LONG_AGO, LONG_AGO),
            )
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO sightings (canonical_key, record_id, source, seen_at)"
                " VALUES (%s, %s, %s, %s)",
                [(s.canonical_key, s.record_id, s.source, s.seen_at) for s in sightings],
            )


VERSIONS_WITHOUT_KEY_NAMES = 3


def test_opening_a_database_without_key_names_names_the_key_of_every_field(dsn: str) -> None:
    # Fields and a running job as a heimdall before key names wrote them.
    with connect(dsn) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version in range(1, VERSIONS_WITHOUT_KEY_NAMES + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        for n, identifier, version in ((1, "pii-v1", 1), (2, "pii-v2", 2), (3, "other-v1", 1)):
            conn.execute(
                "INSERT INTO field_values (canonical_key, field_name, properties)"
                " VALUES (%s, 'email', jsonb_build_object('encrypted_data', %s::text,"
                " 'is_encrypted', true, 'key_version', %s::bigint, 'encryption_version',"
                " 'kms_v1', 'dek_id', 'd', 'created_at', %s::text, 'updated_at', %s::text))",
                (key(n), keyed_envelope(str(n), identifier), version, LONG_AGO, LONG_AGO),
            )
        conn.execute(
            "INSERT INTO reencrypt_jobs (job_id, kind, target_version, include_legacy, state,"
            " total, completed, failed, created_at, updated_at) VALUES"
            " ('job-old', 'rotation', 2, false, 'running', 2, 0, 0, %s, %s)",
            (LONG_AGO, LONG_AGO),
        )

    store = PostgresStore(dsn, pool_size=1)
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
    dsn: str,
) -> None:
    written, kept = repeated_sightings()
    _old_database_with_repeated_sightings(dsn, written)

    store = PostgresStore(dsn, pool_size=1)
    try:
        assert (store.count_sightings(key(1)), store.count_sightings(key(2))) == (3, 1)
        # And from now on one each: the unique index is in place.
        store.write_batch([], [sighting(1, "r2", seen_at=LATER), sighting(2, "r1")], [])
        assert (store.count_sightings(key(1)), store.count_sightings(key(2))) == (3, 1)
    finally:
        store.close()

    assert in_order(stored_sightings(dsn)) == kept
    with connect(dsn) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [version for (version,) in rows] == list(range(1, len(MIGRATIONS) + 1))


def test_stores_opening_a_fresh_database_at_once_all_migrate_it_once(dsn: str) -> None:
    starters = 4
    barrier = threading.Barrier(starters, timeout=BARRIER_TIMEOUT)
    opened: list[PostgresStore] = []
    failures: list[BaseException] = []

    def open_store() -> None:
        barrier.wait()
        try:
            opened.append(PostgresStore(dsn, pool_size=1))
        except BaseException as exc:  # reported below, with the others
            failures.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(starters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert failures == []
        assert len(opened) == starters
        opened[0].write_batch([field_value(1)], [], [])
        assert all(s.count_fields() == 1 for s in opened)
    finally:
        for s in opened:
            s.close()
    with connect(dsn) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [version for (version,) in rows] == list(range(1, len(MIGRATIONS) + 1))


# -- query plans -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_dsn(postgres_dsn: str) -> Iterator[str]:
    """A database of PLAN_TABLE_ROWS fields as a rotation finds them (mostly kms_v1 over four
    key versions, one in ten legacy), vacuumed and analysed. Tests only read it."""
    with temporary_database(postgres_dsn) as dsn:
        store = PostgresStore(dsn, pool_size=1)
        try:
            store.write_batch(
                [
                    field_value(
                        n,
                        encryption_version="legacy" if n % 10 == 0 else "kms_v1",
                        key_version=1 + n % 4,
                    )
                    for n in range(PLAN_TABLE_ROWS)
                ],
                [sighting(n) for n in range(0, PLAN_TABLE_ROWS, 3)],
                [],
            )
        finally:
            store.close()
        with connect(dsn) as conn:
            conn.execute("VACUUM ANALYZE")
        yield dsn


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


def _explain(conn: psycopg.Connection[tuple[Any, ...]], query: str, args: list[object]) -> Any:
    row = conn.execute("EXPLAIN (FORMAT JSON) " + query, args).fetchone()
    assert row is not None
    return row[0][0]["Plan"]


def _generic_plan(conn: psycopg.Connection[tuple[Any, ...]], query: str, args: list[object]) -> Any:
    """The plan PostgreSQL would reuse for every page once the statement is prepared (psycopg
    prepares a query run five times on one connection)."""
    numbered = iter(range(1, len(args) + 1))
    prepared = re.sub("%s", lambda _: f"${next(numbered)}", query)
    conn.execute("SET plan_cache_mode = force_generic_plan")
    conn.execute(f"PREPARE page AS {prepared}")
    try:
        literals = ", ".join(sql.Literal(a).as_string(conn) for a in args)
        row = conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE page ({literals})").fetchone()
    finally:
        conn.execute("DEALLOCATE page")
        conn.execute("RESET plan_cache_mode")
    assert row is not None
    return row[0][0]["Plan"]


def _page_queries(filters: Filter) -> list[tuple[str, list[object]]]:
    """The first page and a page resumed halfway, as iter_fields runs them."""
    clauses, params = _field_filter(*filters)
    return [
        (_page_sql(clauses, resume=False), [*params, 500]),
        (_page_sql(clauses, resume=True), [*params, key(PLAN_TABLE_ROWS // 2), 500]),
    ]


@pytest.mark.parametrize("filters", FILTERS)
def test_iter_fields_pages_are_index_scans_not_seq_scans(plan_dsn: str, filters: Filter) -> None:
    # The re-encryption job's keyset page, as the planner really plans it, then prepared.
    with connect(plan_dsn) as conn:
        for query, args in _page_queries(filters):
            for plan in (_explain(conn, query, args), _generic_plan(conn, query, args)):
                types = [node["Node Type"] for node in _plan_nodes(plan)]
                assert "Seq Scan" not in types
                assert {"Index Scan", "Index Only Scan", "Bitmap Index Scan"} & set(types)


def _forbid_sorts_and_table_scans(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    for setting in ("enable_sort", "enable_seqscan", "enable_bitmapscan"):
        conn.execute(f"SET {setting} = off")


@pytest.mark.parametrize("filters", FILTERS)
def test_an_index_hands_out_each_page_in_key_order_without_a_sort(
    plan_dsn: str, filters: Filter
) -> None:
    # With sorting forbidden, the plan shows whether some index yields canonical_key order
    # under the filter. Without one, a page of a large table would read and sort every
    # remaining match, and a whole rotation would be quadratic. (On this small table the
    # planner may still prefer a short sort, which the test above allows.)
    with connect(plan_dsn) as conn:
        _forbid_sorts_and_table_scans(conn)
        for query, args in _page_queries(filters):
            nodes = list(_plan_nodes(_explain(conn, query, args)))
            assert [node["Node Type"] for node in nodes] == ["Limit", "Index Scan"]
            assert nodes[1]["Index Name"] in (
                "field_values_pkey",
                "field_values_by_version_and_key",
            )


def test_a_page_of_a_minority_version_tests_both_filters_inside_the_index(plan_dsn: str) -> None:
    # One field in ten is legacy: walking the primary key would fetch ten rows per match.
    with connect(plan_dsn) as conn:
        _forbid_sorts_and_table_scans(conn)
        for query, args in _page_queries(("legacy", 3)):
            nodes = list(_plan_nodes(_explain(conn, query, args)))
            assert [node["Node Type"] for node in nodes] == ["Limit", "Index Scan"]
            assert nodes[1]["Index Name"] == "field_values_by_version_and_key"
            assert "key_version" in nodes[1]["Index Cond"]
            assert "Filter" not in nodes[1]


def test_counting_a_minority_version_uses_the_key_index(plan_dsn: str) -> None:
    with connect(plan_dsn) as conn:
        plan = _explain(
            conn,
            "SELECT count(*) FROM field_values WHERE encryption_version = %s AND key_version < %s",
            ["legacy", 3],
        )

    types = {node["Node Type"] for node in _plan_nodes(plan)}
    assert "Seq Scan" not in types
    indexes = {node.get("Index Name") for node in _plan_nodes(plan)}
    assert "field_values_by_key" in indexes


def test_a_batch_of_fields_is_read_through_the_primary_key(plan_dsn: str) -> None:
    # A decrypt batch reads up to HMD_API_MAX_BATCH fields in one query: a probe each. (On this
    # small table the planner may rather scan it all, so scans are forbidden, as above: the
    # plan shows that the index can serve the query.)
    keys = [key(n) for n in range(0, PLAN_TABLE_ROWS, 5)]
    with connect(plan_dsn) as conn:
        _forbid_sorts_and_table_scans(conn)
        plan = _explain(conn, _GET_FIELDS, [keys])

    assert (plan["Node Type"], plan["Index Name"]) == ("Index Scan", "field_values_pkey")


def test_counting_sightings_uses_the_unique_sightings_index(plan_dsn: str) -> None:
    # The index on canonical_key alone is gone; the unique one must still serve the count.
    with connect(plan_dsn) as conn:
        plan = _explain(conn, "SELECT count(*) FROM sightings WHERE canonical_key = %s", [key(3)])

    nodes = list(_plan_nodes(plan))
    assert "Seq Scan" not in {node["Node Type"] for node in nodes}
    assert "sightings_by_key_record_source" in {node.get("Index Name") for node in nodes}


# -- several stores, errors, lifecycle ---------------------------------------------------------


def test_two_stores_on_one_database_see_each_others_writes_and_cas_conflicts(dsn: str) -> None:
    first, second = PostgresStore(dsn), PostgresStore(dsn)
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
        assert second.write_batch([field_value(1, data=envelope("late"))], [], []) == 0
    finally:
        first.close()
        second.close()


def _race_two_stores(dsn: str, batch: Callable[[list[int]], Batch]) -> list[int]:
    """Two stores writing ``batch(numbers)`` for the same ten runs of 200 numbers at the same
    moments, one listing each run ascending, the other descending, as two ingest processes
    meeting the same values or records would. Returns what each batch inserted; fails the test
    if any batch raised.

    Each insert (or upsert) waits for the other transaction's uncommitted row with the same
    key; taken in list order, those waits would cross and PostgreSQL would abort a batch as a
    deadlock.
    """
    stores = [PostgresStore(dsn, pool_size=1) for _ in range(2)]
    barrier = threading.Barrier(len(stores), timeout=BARRIER_TIMEOUT)
    inserted: list[int] = []
    failures: list[BaseException] = []

    def ingest(store: PostgresStore, descending: bool) -> None:
        for start in range(0, 2000, 200):
            numbers = sorted(range(start, start + 200), reverse=descending)
            barrier.wait()
            try:
                inserted.append(store.write_batch(*batch(numbers)))
            except BaseException as exc:  # reported below
                failures.append(exc)

    try:
        threads = [threading.Thread(target=ingest, args=(s, i == 1)) for i, s in enumerate(stores)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for s in stores:
            s.close()
    assert failures == []
    return inserted


def test_concurrent_batches_of_the_same_values_insert_each_once_without_deadlock(
    store: PostgresStore, dsn: str
) -> None:
    inserted = _race_two_stores(
        dsn, lambda numbers: ([field_value(n) for n in numbers], [sighting(numbers[0])], [])
    )

    assert sum(inserted) == 2000
    assert store.count_fields() == 2000


def test_concurrent_batches_of_the_same_sightings_store_each_once_without_deadlock(
    store: PostgresStore, dsn: str
) -> None:
    # Two ingests of one file at once, after its values were stored.
    store.write_batch([field_value(n) for n in range(2000)], [], [])

    _race_two_stores(dsn, lambda numbers: ([], [sighting(n, f"r{n // 2}") for n in numbers], []))

    assert in_order(stored_sightings(dsn)) == [sighting(n, f"r{n // 2}") for n in range(2000)]


def test_concurrent_batches_of_the_same_records_replace_them_without_deadlock(dsn: str) -> None:
    _race_two_stores(
        dsn, lambda numbers: ([], [], [RecordRow(f"r{n}", "crm", FIXED_TIME, {}) for n in numbers])
    )

    assert record_count(dsn) == 2000


def record_count(dsn: str) -> int:
    with connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM records").fetchone()
    assert row is not None
    return int(row[0])


def test_orphan_sighting_error_names_the_cause_and_keeps_psycopg_as_cause(
    store: PostgresStore,
) -> None:
    with pytest.raises(StorageError, match="no FieldValue") as caught:
        store.write_batch([field_value(1, data=envelope("in-error?"))], [sighting(2)], [])

    assert isinstance(caught.value.__cause__, psycopg.errors.ForeignKeyViolation)
    assert "in-error?" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_non_finite_record_attribute_raises_storage_error_and_writes_nothing(
    store: PostgresStore,
) -> None:
    with pytest.raises(StorageError, match="finite JSON"):
        store.write_batch([field_value(1)], [], [RecordRow("r1", "crm", "t", {"x": float("nan")})])

    assert store.count_fields() == 0


def test_lost_connection_raises_storage_error_and_the_store_recovers(
    dsn: str,
) -> None:
    # One pooled connection, so the call after the failure cannot find a second stale one.
    store = PostgresStore(dsn, pool_size=1)
    try:
        store.write_batch([field_value(1)], [], [])
        with connect(dsn) as conn:
            ended = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'heimdall'"
            ).fetchone()
        assert ended == (1,)

        with pytest.raises(StorageError) as caught:
            store.get_field(key(1))

        assert str(caught.value).startswith("postgres get_field failed: ")
        assert "\n" not in str(caught.value)
        assert store.get_field(key(1)) == field_value(1)
    finally:
        store.close()


def test_unreachable_server_raises_one_line_storage_error_without_the_password(
    postgres_dsn: str,
) -> None:
    closed = make_conninfo(
        postgres_dsn, host="127.0.0.1", port=str(free_port()), password="s3cret-pw"
    )
    missing = make_conninfo(postgres_dsn, dbname="no_such_database", password="s3cret-pw")

    for target, reason in ((closed, "refused|failed"), (missing, "does not exist")):
        with pytest.raises(StorageError, match=reason) as caught:
            PostgresStore(target)
        message = str(caught.value)
        assert message.startswith("postgres open failed: ")
        assert "\n" not in message
        assert "s3cret-pw" not in message


def test_malformed_dsn_raises_storage_error_that_repeats_nothing_of_it() -> None:
    with pytest.raises(StorageError, match="not a valid connection string") as caught:
        PostgresStore("host=x password='s3cret-pw")

    assert "s3cret-pw" not in str(caught.value)
    assert caught.value.__cause__ is None


def test_pool_size_below_one_is_rejected(dsn: str) -> None:
    with pytest.raises(ValueError, match="pool_size"):
        PostgresStore(dsn, pool_size=0)


def test_store_is_usable_from_many_threads_at_once(store: PostgresStore) -> None:
    store.write_batch([field_value(n) for n in range(50)], [], [])
    found: list[FieldValue | None] = []

    def read(n: int) -> None:
        for _ in range(5):
            found.append(store.get_field(key(n)))

    threads = [threading.Thread(target=read, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(f.canonical_key for f in found if f is not None) == sorted(
        key(n) for n in range(8) for _ in range(5)
    )


def test_repr_names_the_database_but_never_the_password(dsn: str) -> None:
    with_password = make_conninfo(dsn, password="s3cret-pw")
    store = PostgresStore(with_password)
    try:
        store.write_batch([field_value(1, data=envelope("in-repr?"))], [], [])
        text = repr(store)
    finally:
        store.close()

    assert text.startswith("PostgresStore(")
    assert str(conninfo_to_dict(dsn)["dbname"]) in text
    assert "s3cret-pw" not in text
    assert "in-repr?" not in text


def test_key_names_probe_the_key_index_and_read_no_table(plan_dsn: str) -> None:
    # Run as every process opens the store (it checks each key has a provider): it must stay
    # cheap however many fields there are.
    with connect(plan_dsn) as conn:
        plan = _explain(conn, SQL.key_names, [])

    types = [node["Node Type"] for node in _plan_nodes(plan)]
    assert "Seq Scan" not in types
    scans = [n for n in _plan_nodes(plan) if n.get("Relation Name") == "field_values"]
    assert scans and all(n["Node Type"] == "Index Only Scan" for n in scans)
    assert {n["Index Name"] for n in scans} == {"field_values_by_key"}
