"""AgeStore: the GraphStore contract on Apache AGE, and what only a real AGE graph can show."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from heimdall.errors import StorageError
from heimdall.store.age import AgeStore
from heimdall.store.age_sql import AgeStatements
from heimdall.store.base import FieldUpdate, FieldValue, GraphStore, RecordRow, Sighting
from heimdall.store.postgres import PostgresStore
from heimdall.store.postgres_schema import KEY_NAME_PATTERN, key_name_of
from postgres_server import connect, temporary_database
from store_contract import (
    FILTERS,
    KEY_NAMES,
    LONG_AGO,
    Filter,
    StoreContract,
    envelope,
    field_value,
    in_order,
    key,
    rewrap,
    sighting,
)

GRAPH = "heimdall"
# Seconds a thread waits for the other at a barrier before the test fails instead of hanging.
BARRIER_TIMEOUT = 30
# What write_batch takes: field values, sightings, records.
Batch = tuple[Sequence[FieldValue], Sequence[Sighting], Sequence[RecordRow]]
# Fields for the plan tests: enough that the planner prices a table scan as what it is.
PLAN_ROWS = 5000


def age_connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A plain connection with AGE loaded, as an application (or an operator) has one."""
    conn = connect(dsn)
    conn.execute("LOAD 'age'")
    conn.execute('SET search_path = public, ag_catalog, "$user"')
    return conn


def cypher(
    conn: psycopg.Connection[tuple[Any, ...]],
    query: str,
    params: dict[str, Any] | None = None,
    *,
    columns: int = 1,
    graph: str = GRAPH,
) -> list[tuple[Any, ...]]:
    """Rows of a Cypher query, each value decoded from its agtype text."""
    names = ", ".join(f"c{i} agtype" for i in range(columns))
    if params is None:
        text = f"SELECT * FROM cypher('{graph}', $$ {query} $$) AS ({names})"  # noqa: S608
        rows = conn.execute(text.encode()).fetchall()
    else:
        text = f"SELECT * FROM cypher('{graph}', $$ {query} $$, %s) AS ({names})"  # noqa: S608
        rows = conn.execute(text.encode(), (json.dumps(params),)).fetchall()
    return [tuple(None if v is None else json.loads(v) for v in row) for row in rows]


def graph_sightings(dsn: str) -> list[Sighting]:
    """Every Sighting vertex, read through its edge to its FieldValue: the edge must lead to
    the FieldValue the sighting names."""
    with age_connect(dsn) as conn:
        rows = cypher(
            conn,
            "MATCH (s:Sighting)-[:SIGHTING_OF]->(fv:FieldValue)"
            " RETURN s.canonical_key, s.record_id, s.source, s.seen_at, fv.canonical_key",
            columns=5,
        )
        vertices = cypher(conn, "MATCH (s:Sighting) RETURN count(s)")[0][0]
    assert all(row[0] == row[4] for row in rows)
    assert vertices == len(rows), "a Sighting without its edge"
    return [Sighting(*row[:4]) for row in rows]


class TestAgeStoreContract(StoreContract):
    dsn = ""

    @pytest.fixture
    def store(self, age_store_dsn: str) -> Iterator[GraphStore]:
        self.dsn = age_store_dsn
        store = AgeStore(age_store_dsn, pool_size=2)
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
        return graph_sightings(self.dsn)

    def reopen(self, store: GraphStore) -> GraphStore:
        store.close()
        return AgeStore(self.dsn, pool_size=2)


@pytest.fixture
def dsn(age_store_dsn: str) -> str:
    return age_store_dsn


@pytest.fixture
def store(dsn: str) -> Iterator[AgeStore]:
    store = AgeStore(dsn, pool_size=2)
    yield store
    store.close()


# -- the nodes, as an application sees them -----------------------------------------------------


def test_a_field_is_a_field_value_vertex_with_the_specs_properties(
    store: AgeStore, dsn: str
) -> None:
    written = field_value(1, key_version=3)
    store.write_batch([written], [sighting(1)], [])

    with age_connect(dsn) as conn:
        rows = cypher(
            conn,
            "MATCH (fv:FieldValue) WHERE fv.canonical_key = $k RETURN properties(fv)",
            {"k": written.canonical_key},
        )
    assert rows == [
        (
            {
                "canonical_key": written.canonical_key,
                "field_name": "email",
                "encrypted_data": written.encrypted_data,  # the envelope JSON, as a string
                "is_encrypted": True,
                "key_version": 3,
                "encryption_version": "kms_v1",
                "dek_id": written.dek_id,
                "created_at": written.updated_at,
                "updated_at": written.updated_at,
            },
        )
    ]


def test_an_applications_traversal_finds_the_sightings_of_a_value(
    store: AgeStore, dsn: str
) -> None:
    store.write_batch(
        [field_value(1), field_value(2)],
        [sighting(1, "r1"), sighting(1, "r2", source="billing"), sighting(2, "r1")],
        [],
    )

    with age_connect(dsn) as conn:
        rows = cypher(
            conn,
            "MATCH (s:Sighting)-[:SIGHTING_OF]->(fv:FieldValue {canonical_key: $k})"
            " RETURN s.record_id, s.source ORDER BY s.record_id",
            {"k": key(1)},
            columns=2,
        )
    assert rows == [("r1", "crm"), ("r2", "billing")]


def test_envelope_text_round_trips_exactly_and_swaps_on_that_exact_text(store: AgeStore) -> None:
    # Key order, spacing, escapes and non-ASCII that a parsed JSON object would not keep.
    odd = '{ "z":1,  "a" : "\\u00e9\\n\\"q\\"",\t"é":[ ] }\n'
    written = field_value(1, data=odd)
    store.write_batch([written], [], [])

    assert store.get_field(key(1)) == written
    assert not store.compare_and_swap(
        key(1), odd.replace("  ", " "), rewrap(written, key_version=2)
    )
    assert store.compare_and_swap(key(1), odd, rewrap(written, key_version=2))


def _set_own_property(dsn: str, canonical_key: str) -> None:
    """An application's own property on a FieldValue, set in Cypher as it would."""
    with age_connect(dsn) as conn:
        cypher(
            conn,
            "MATCH (fv:FieldValue) WHERE fv.canonical_key = $k SET fv.tenant = 'acme'",
            {"k": canonical_key},
        )


def _properties(dsn: str, canonical_key: str) -> dict[str, Any]:
    with age_connect(dsn) as conn:
        rows = cypher(
            conn,
            "MATCH (fv:FieldValue) WHERE fv.canonical_key = $k RETURN properties(fv)",
            {"k": canonical_key},
        )
    assert len(rows) == 1
    found: dict[str, Any] = rows[0][0]
    return found


def test_a_compare_and_swap_keeps_the_applications_own_properties(
    store: AgeStore, dsn: str
) -> None:
    original = field_value(1, updated_at=LONG_AGO)
    store.write_batch([original], [], [])
    _set_own_property(dsn, key(1))
    update = FieldUpdate(envelope("new"), key_version=5, encryption_version="kms_v1", dek_id="d")

    assert store.compare_and_swap(key(1), original.encrypted_data, update)

    properties = _properties(dsn, key(1))
    assert properties["tenant"] == "acme"
    assert (properties["encrypted_data"], properties["key_version"]) == (envelope("new"), 5)
    assert (properties["created_at"], properties["is_encrypted"]) == (LONG_AGO, True)
    assert properties["updated_at"] != LONG_AGO


def test_a_second_field_value_with_a_stored_key_is_refused_whoever_writes_it(
    store: AgeStore, dsn: str
) -> None:
    store.write_batch([field_value(1)], [], [])

    with age_connect(dsn) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        cypher(conn, "CREATE (:FieldValue {canonical_key: $k})", {"k": key(1)})

    assert store.count_fields() == 1


def test_a_vertex_without_heimdalls_properties_is_reported_by_its_id_never_read(
    store: AgeStore, dsn: str
) -> None:
    with age_connect(dsn) as conn:
        cypher(conn, "CREATE (:FieldValue {canonical_key: $k, value: 'x'})", {"k": key(1)})
        node_id = cypher(conn, "MATCH (fv:FieldValue) RETURN id(fv)")[0][0]

    with pytest.raises(StorageError) as caught:
        store.get_field(key(1))

    message = str(caught.value)
    assert str(node_id) in message and "age adopt" in message
    assert "\n" not in message
    assert store.existing_keys([key(1)]) == {key(1)}  # and ingest leaves it alone
    assert store.write_batch([field_value(1)], [], []) == 0


# -- two writers ------------------------------------------------------------------------------


def _race(dsn: str, batch: Callable[[list[int]], Batch]) -> list[int]:
    """Two stores writing ``batch(numbers)`` for the same ten runs of 200 numbers at the same
    moments, one listing each run ascending, the other descending, as two ingest processes
    meeting the same values would. What each batch inserted; fails if any batch raised."""
    stores = [AgeStore(dsn, pool_size=1) for _ in range(2)]
    barrier = threading.Barrier(len(stores), timeout=BARRIER_TIMEOUT)
    inserted: list[int] = []
    failures: list[BaseException] = []

    def ingest(store: AgeStore, descending: bool) -> None:
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


def _vertex_counts(dsn: str) -> tuple[int, int, int]:
    """FieldValue vertices, their distinct canonical keys, and Sighting vertices."""
    with age_connect(dsn) as conn:
        fields = cypher(conn, "MATCH (fv:FieldValue) RETURN count(fv)")[0][0]
        distinct = cypher(conn, "MATCH (fv:FieldValue) RETURN count(DISTINCT fv.canonical_key)")
        sightings = cypher(conn, "MATCH (s:Sighting) RETURN count(s)")[0][0]
    return int(fields), int(distinct[0][0]), int(sightings)


def test_two_writers_of_the_same_values_at_once_leave_one_field_value_per_key(
    store: AgeStore, dsn: str
) -> None:
    inserted = _race(
        dsn, lambda numbers: ([field_value(n) for n in numbers], [sighting(numbers[0])], [])
    )

    assert sum(inserted) == 2000
    # Each run sighted its first number: the lowest by one writer, the highest by the other.
    assert _vertex_counts(dsn) == (2000, 2000, 20)
    assert store.count_fields() == 2000


def test_two_writers_of_the_same_sightings_at_once_store_each_once(
    store: AgeStore, dsn: str
) -> None:
    store.write_batch([field_value(n) for n in range(2000)], [], [])

    _race(dsn, lambda numbers: ([], [sighting(n, f"r{n // 2}") for n in numbers], []))

    assert in_order(graph_sightings(dsn)) == [sighting(n, f"r{n // 2}") for n in range(2000)]


# -- query plans -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_dsn(age_dsn: str) -> Iterator[str]:
    """PLAN_ROWS fields (one in ten legacy, four key versions) with a sighting each third,
    vacuumed and analysed. Tests only read it."""
    with temporary_database(age_dsn) as dsn:
        store = AgeStore(dsn, pool_size=1)
        try:
            store.write_batch(
                [
                    field_value(
                        n,
                        encryption_version="legacy" if n % 10 == 0 else "kms_v1",
                        key_version=1 + n % 4,
                    )
                    for n in range(PLAN_ROWS)
                ],
                [sighting(n) for n in range(0, PLAN_ROWS, 3)],
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


def _explain(conn: psycopg.Connection[tuple[Any, ...]], query: str, args: Sequence[object]) -> Any:
    row = conn.execute(("EXPLAIN (FORMAT JSON) " + query).encode(), args).fetchone()
    assert row is not None
    return row[0][0]["Plan"]


def _index_scans(plan: dict[str, Any]) -> set[str]:
    nodes = list(_plan_nodes(plan))
    assert "Seq Scan" not in {node["Node Type"] for node in nodes}
    return {node["Index Name"] for node in nodes if "Index Name" in node}


def test_an_applications_lookup_by_canonical_key_uses_heimdalls_unique_index(
    plan_dsn: str,
) -> None:
    where = "MATCH (fv:FieldValue) WHERE fv.canonical_key = $k RETURN fv.encrypted_data"
    by_map = "MATCH (fv:FieldValue {canonical_key: $k}) RETURN fv.encrypted_data"
    params = (json.dumps({"k": key(7)}),)
    with age_connect(plan_dsn) as conn:
        scans = [_index_scans(_explain(conn, _cypher_sql(where), params))]
        # The map form compares properties only with containment off (a superuser setting).
        conn.execute("SET age.enable_containment = off")
        scans.append(_index_scans(_explain(conn, _cypher_sql(by_map), params)))

    assert scans == [{"heimdall_fieldvalue_key"}, {"heimdall_fieldvalue_key"}]


def _cypher_sql(query: str) -> str:
    return f"SELECT * FROM cypher('{GRAPH}', $$ {query} $$, %s) AS (v agtype)"  # noqa: S608


@pytest.mark.parametrize("filters", FILTERS)
def test_iter_fields_pages_are_index_scans_in_key_order(plan_dsn: str, filters: Filter) -> None:
    statements = AgeStatements(GRAPH)
    clauses, params = statements.field_filter(*filters)
    pages = [
        (statements.page(clauses, resume=False), [*params, 500]),
        (statements.page(clauses, resume=True), [*params, json.dumps(key(PLAN_ROWS // 2)), 500]),
    ]
    with age_connect(plan_dsn) as conn:
        for setting in ("enable_sort", "enable_seqscan", "enable_bitmapscan"):
            conn.execute(f"SET {setting} = off".encode())
        for query, args in pages:
            nodes = list(_plan_nodes(_explain(conn, query, args)))
            assert [node["Node Type"] for node in nodes] == ["Limit", "Index Scan"]
            assert nodes[1]["Index Name"] in (
                "heimdall_fieldvalue_key",
                "heimdall_fieldvalue_by_version_and_key",
            )


def test_counting_sightings_and_key_names_read_only_indexes(plan_dsn: str) -> None:
    statements = AgeStatements(GRAPH)
    with age_connect(plan_dsn) as conn:
        sightings = _index_scans(_explain(conn, statements.count_sightings, [json.dumps(key(3))]))
        names = _index_scans(_explain(conn, statements.key_names, []))
        keys = _index_scans(_explain(conn, statements.existing_keys, [[json.dumps(key(3))]]))
        fields = _index_scans(_explain(conn, statements.get_fields, [[json.dumps(key(3))]]))

    assert sightings == {"heimdall_sighting_key"}
    assert names == {"heimdall_fieldvalue_by_key_name"}
    assert keys == fields == {"heimdall_fieldvalue_key"}


# -- opening: the extension, the graph, the session --------------------------------------------


@pytest.fixture
def empty_dsn(age_dsn: str, postgres_store_dsn: str) -> str:
    """A database without the extension (on a server that has AGE)."""
    return postgres_store_dsn


def _catalog(dsn: str) -> tuple[list[str], list[str], set[str]]:
    """The graphs, the graph's labels and heimdall's indexes on them."""
    with age_connect(dsn) as conn:
        graphs = [row[0] for row in conn.execute("SELECT name::text FROM ag_graph ORDER BY 1")]
        labels = [
            row[0]
            for row in conn.execute(
                "SELECT l.name::text || ':' || l.kind::text FROM ag_label l JOIN ag_graph g"
                " ON g.graphid = l.graph WHERE l.name NOT LIKE '\\_ag%%' ORDER BY 1"
            )
        ]
        indexes = {
            row[0]
            for row in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (GRAPH,)
            )
        }
    return graphs, labels, indexes


def test_opening_an_empty_database_creates_the_extension_graph_labels_and_indexes(
    empty_dsn: str,
) -> None:
    AgeStore(empty_dsn, pool_size=1).close()

    graphs, labels, indexes = _catalog(empty_dsn)
    assert graphs == [GRAPH]
    assert labels == ["FieldValue:v", "SIGHTING_OF:e", "Sighting:v"]
    assert {
        "heimdall_fieldvalue_key",
        "heimdall_fieldvalue_by_key_name",
        "heimdall_fieldvalue_by_version_and_key",
        "heimdall_sighting_key",
    } <= indexes


def test_stores_opening_an_empty_database_at_once_all_set_it_up_once(empty_dsn: str) -> None:
    starters = 4
    barrier = threading.Barrier(starters, timeout=BARRIER_TIMEOUT)
    opened: list[AgeStore] = []
    failures: list[BaseException] = []

    def open_store() -> None:
        barrier.wait()
        try:
            opened.append(AgeStore(empty_dsn, pool_size=1))
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(starters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert failures == []
        opened[0].write_batch([field_value(1)], [], [])
        assert all(s.count_fields() == 1 for s in opened)
    finally:
        for s in opened:
            s.close()
    assert _catalog(empty_dsn)[0] == [GRAPH]


def test_the_ordinary_tables_stay_out_of_a_graph_named_like_the_user(dsn: str) -> None:
    # The test cluster's user is heimdall, and so is the graph: "$user" on the search path
    # names the graph's schema, which must never receive heimdall's own tables.
    with connect(dsn) as conn:
        user = conn.execute("SELECT current_user").fetchone()
        rows = conn.execute(
            "SELECT DISTINCT schemaname FROM pg_tables"
            " WHERE tablename IN ('meta', 'records', 'reencrypt_jobs', 'schema_migrations')"
        ).fetchall()
    assert user == (GRAPH,)
    assert rows == [("public",)]


def test_a_graph_dropped_and_made_again_gets_heimdalls_indexes_again(dsn: str) -> None:
    with age_connect(dsn) as conn:
        conn.execute("SELECT drop_graph('heimdall', true)")

    store = AgeStore(dsn, pool_size=1)
    try:
        store.write_batch([field_value(1)], [], [])
        assert store.write_batch([field_value(1)], [], []) == 0
    finally:
        store.close()
    assert {"heimdall_fieldvalue_key", "heimdall_sighting_key"} <= _catalog(dsn)[2]


def test_a_database_bound_to_one_graph_refuses_another(dsn: str) -> None:
    with pytest.raises(StorageError, match="HMD_AGE_GRAPH=heimdall") as caught:
        AgeStore(dsn, graph="other_graph")

    assert "\n" not in str(caught.value)
    assert _catalog(dsn)[0] == [GRAPH]


def test_a_database_holding_postgres_store_fields_is_refused(empty_dsn: str) -> None:
    with connect(empty_dsn) as conn:
        conn.execute("CREATE EXTENSION age")
    postgres = PostgresStore(empty_dsn, pool_size=1)
    postgres.write_batch([field_value(1)], [], [])
    postgres.close()

    with pytest.raises(StorageError, match="HMD_STORE=postgres"):
        AgeStore(empty_dsn, pool_size=1)


def test_a_graph_holding_one_canonical_key_twice_is_refused_in_one_line(empty_dsn: str) -> None:
    with connect(empty_dsn) as conn:
        conn.execute("CREATE EXTENSION age")
    with age_connect(empty_dsn) as conn:
        conn.execute("SELECT create_graph('heimdall')")
        for _ in range(2):
            cypher(conn, "CREATE (:FieldValue {canonical_key: $k})", {"k": key(1)})

    with pytest.raises(StorageError, match="two FieldValue") as caught:
        AgeStore(empty_dsn, pool_size=1)

    assert "\n" not in str(caught.value)


def test_a_label_of_the_wrong_kind_is_refused(empty_dsn: str) -> None:
    with connect(empty_dsn) as conn:
        conn.execute("CREATE EXTENSION age")
    with age_connect(empty_dsn) as conn:
        conn.execute("SELECT create_graph('heimdall')")
        conn.execute("SELECT create_elabel('heimdall', 'Sighting')")

    with pytest.raises(StorageError, match="Sighting is not a vertex label"):
        AgeStore(empty_dsn, pool_size=1)


@pytest.mark.parametrize("graph", ["ab", "Heimdall", "g-1", "pg_graph", "public", "a'b", "1abc"])
def test_a_graph_name_that_needs_quoting_is_refused_before_connecting(graph: str) -> None:
    # Nothing listens on port 9: the name is refused before any connection is tried.
    with pytest.raises(StorageError, match="not a valid AGE graph name"):
        AgeStore("host=127.0.0.1 port=9 dbname=x", graph=graph)


def test_each_new_pooled_connection_is_prepared_for_the_graph(dsn: str) -> None:
    # One pooled connection: ended by the server, the pool makes a new one, which must load
    # AGE and find the graph's tables again before the store's next call.
    store = AgeStore(dsn, pool_size=1)
    try:
        store.write_batch([field_value(1)], [sighting(1)], [])
        with connect(dsn) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'heimdall'"
            )
        with pytest.raises(StorageError):
            store.get_field(key(1))
        assert store.write_batch([field_value(2)], [sighting(2)], []) == 1
        assert store.get_field(key(1)) == field_value(1)
    finally:
        store.close()


def test_repr_names_the_database_and_graph_never_the_password(dsn: str) -> None:
    store = AgeStore(make_conninfo(dsn, password="s3cret-pw"), pool_size=1)
    try:
        store.write_batch([field_value(1, data=envelope("in-repr?"))], [], [])
        text = repr(store)
    finally:
        store.close()

    assert text.startswith("AgeStore(") and "graph='heimdall'" in text
    assert "s3cret-pw" not in text and "in-repr?" not in text


# -- a user who is not a superuser -------------------------------------------------------------


@pytest.fixture
def owned_database(age_dsn: str) -> Iterator[tuple[str, str]]:
    """A database owned by a new role that may log in but is no superuser: (admin DSN, the
    role's DSN). Both are dropped after the test."""
    role = f"r_{uuid.uuid4().hex[:8]}"
    name = f"t_{uuid.uuid4().hex[:8]}"
    with connect(age_dsn) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(role)
            )
        )
    try:
        yield make_conninfo(age_dsn, dbname=name), make_conninfo(age_dsn, dbname=name, user=role)
    finally:
        with connect(age_dsn) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _refusal(dsn: str) -> str:
    with pytest.raises(StorageError) as caught:
        AgeStore(dsn, pool_size=1)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_user_who_is_no_superuser_is_told_each_statement_an_administrator_must_run(
    owned_database: tuple[str, str],
) -> None:
    # The README's steps, one at a time, as an administrator would take them.
    admin, user_dsn = owned_database
    role = str(conninfo_to_dict(user_dsn)["user"])
    database = str(conninfo_to_dict(admin)["dbname"])
    steps = [
        (
            f"ALTER DATABASE {database} SET session_preload_libraries = 'age';",
            f"ALTER DATABASE {database} SET session_preload_libraries = 'age'",
        ),
        ("CREATE EXTENSION age;", "CREATE EXTENSION age"),
        (
            f"GRANT USAGE ON SCHEMA ag_catalog TO {role};",
            f"GRANT USAGE ON SCHEMA ag_catalog TO {role}",
        ),
    ]
    for named, statement in steps:
        assert named in _refusal(user_dsn)
        with connect(admin) as conn:
            conn.execute(statement.encode())

    store = AgeStore(user_dsn, pool_size=1)
    try:
        assert store.write_batch([field_value(1)], [sighting(1)], []) == 1
        assert store.get_field(key(1)) == field_value(1)
    finally:
        store.close()
    with age_connect(admin) as conn:
        owner = conn.execute(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = %s", (GRAPH,)
        ).fetchone()
    assert owner == (role,)  # the graph is the user's own: it made it


# -- the key name ------------------------------------------------------------------------------

# Pieces an envelope's text is made of, and pieces that break its layout in every way.
_PIECES = [
    '{"encryption_version":"kms_v1","algorithm":"',
    '{"encryption_version":"legacy","algorithm":"',
    "AES-256-GCM",
    '","key_identifier":"',
    '"',
    ",",
    ":",
    "key_identifier",
    "heimdall-pii",
    "-v",
    "-v-v",
    "7",
    "12",
    "/",
    "\\",
    "\n",
    ' "',
    '","key_version":2}',
    "é",
]
_TEXTS = st.lists(st.sampled_from(_PIECES), max_size=12).map("".join)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(texts=st.lists(_TEXTS, min_size=1, max_size=40))
def test_the_key_name_found_by_splitting_is_the_regular_expressions_for_every_text(
    postgres_dsn: str, texts: list[str]
) -> None:
    # Both stores find the key name by splitting at quotes (key_name_of); migration 4 did it
    # by a regular expression, which stored databases still hold until migration 6. Both must
    # name the same key (or none) for any text. Plain PostgreSQL: no AGE needed.
    candidates = [
        *texts,
        *(text for text, _ in (p.values for p in KEY_NAMES)),  # the contract's cases
    ]
    query = (
        f"SELECT t, {key_name_of('t')}, substring(t FROM '{KEY_NAME_PATTERN}')"  # noqa: S608
        " FROM unnest(%s::text[]) AS t"
    )
    with connect(postgres_dsn) as conn:
        rows = conn.execute(query.encode(), (candidates,)).fetchall()

    assert [(t, split) for t, split, _ in rows] == [(t, pattern) for t, _, pattern in rows]


def test_a_batch_the_server_refuses_names_no_envelope_and_writes_nothing(
    store: AgeStore,
) -> None:
    # PostgreSQL text (and agtype) cannot hold NUL.
    poisoned = field_value(2, data='{"secret-envelope-x\x00"}')

    with pytest.raises(StorageError) as caught:
        store.write_batch([field_value(1), poisoned], [sighting(1)], [])

    message = str(caught.value)
    assert message.startswith("postgres write_batch failed:")
    assert "secret-envelope" not in message and "\n" not in message
    assert store.existing_keys([key(1), key(2)]) == set()
    assert store.count_sightings(key(1)) == 0
