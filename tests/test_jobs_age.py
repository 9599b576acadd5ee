"""AgeStore as a JobStore: the job contract, SKIP LOCKED on the vertex label table, the claim's
plan, and a re-encryption worker SIGKILLed on AGE that another finishes."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from heimdall.errors import StorageError
from heimdall.store.age import AgeStore
from heimdall.store.age_sql import PENDING, AgeStatements
from heimdall.store.base import FieldCount, FieldUpdate, FieldValue
from heimdall.store.jobs import Job
from job_contract import (
    BARRIER_TIMEOUT,
    TARGET,
    TARGET_KEY,
    JobGraphStore,
    JobStoreContract,
    keyed_fields,
    kms_fields,
    legacy_fields,
    moved,
    new_job,
)
from postgres_server import connect, temporary_database
from store_contract import field_value, key, rewrap
from test_store_age import age_connect, cypher

# Fields for the plan test: enough that the planner prices a table scan as what it is.
PLAN_ROWS = 5000
# The claim that takes the fields left under each key a job may find them under.
SOURCES = [
    pytest.param(TARGET_KEY, "same key", id="rotation"),
    pytest.param("a-key", "key before", id="from-a-key-sorting-before"),
    pytest.param("z-key", "key after", id="from-a-key-sorting-after"),
]


class TestAgeJobContract(JobStoreContract):
    dsn = ""

    @pytest.fixture
    def store(self, age_store_dsn: str) -> Iterator[JobGraphStore]:
        self.dsn = age_store_dsn
        store = AgeStore(age_store_dsn, pool_size=2)
        yield store
        store.close()

    def open_again(self, store: JobGraphStore) -> JobGraphStore:
        return AgeStore(self.dsn, pool_size=2)


@pytest.fixture
def store(age_store_dsn: str) -> Iterator[AgeStore]:
    store = AgeStore(age_store_dsn, pool_size=2)
    yield store
    store.close()


def _job_with(store: AgeStore, count: int) -> Job:
    store.write_batch(kms_fields(range(count)), [], [])
    job = new_job(total=count)
    store.create_job(job)
    return job


def test_a_locked_batch_is_skipped_not_waited_for(age_store_dsn: str) -> None:
    # Were the locked vertices waited for, the second claim would fail after 5 s, not hang.
    dbname = str(conninfo_to_dict(age_store_dsn)["dbname"])
    with connect(age_store_dsn) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET lock_timeout = '5s'").format(sql.Identifier(dbname))
        )
    first = AgeStore(age_store_dsn, pool_size=2)
    second = AgeStore(age_store_dsn, pool_size=2)
    try:
        job = _job_with(first, 30)
        holding, release = threading.Event(), threading.Event()
        held: list[str] = []

        def hold() -> None:
            with first.claim(job, 10) as claim:
                held.extend(f.canonical_key for f in claim.fields)
                holding.set()
                release.wait(BARRIER_TIMEOUT)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert holding.wait(BARRIER_TIMEOUT)
            with second.claim(job, 100) as claim:
                got = {f.canonical_key for f in claim.fields}
        finally:
            release.set()
            holder.join()
        assert len(held) == 10 and len(got) == 20
        assert got.isdisjoint(held)
        assert got | set(held) == {key(n) for n in range(30)}
    finally:
        first.close()
        second.close()


def test_a_claim_locks_the_vertices_an_application_would_write(
    store: AgeStore, age_store_dsn: str
) -> None:
    # The lock is on the label table's rows: an application's Cypher SET of a claimed
    # vertex waits for the claim (here: gives up after 1 s) instead of slipping in between.
    job = _job_with(store, 1)
    with store.claim(job, 1) as claim:
        assert len(claim.fields) == 1
        with age_connect(age_store_dsn) as conn:
            conn.execute("SET lock_timeout = '1s'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                cypher(
                    conn,
                    "MATCH (fv:FieldValue) WHERE fv.canonical_key = $k SET fv.tenant = 'acme'",
                    {"k": key(0)},
                )
        claim.update(claim.fields[0], rewrap(claim.fields[0], key_version=TARGET))
    assert store.count_pending(job) == 0


def test_claim_updates_keep_the_applications_own_properties(
    store: AgeStore, age_store_dsn: str
) -> None:
    job = _job_with(store, 3)
    with age_connect(age_store_dsn) as conn:
        cypher(conn, "MATCH (fv:FieldValue) SET fv.tenant = 'acme'")

    with store.claim(job, 10) as claim:
        for f in claim.fields:
            claim.update(f, moved(f))

    with age_connect(age_store_dsn) as conn:
        rows = cypher(
            conn,
            "MATCH (fv:FieldValue) RETURN fv.tenant, fv.key_version, fv.is_encrypted",
            columns=3,
        )
    assert rows == [("acme", TARGET, True)] * 3
    assert store.field_counts() == [FieldCount("kms_v1", TARGET, 3, TARGET_KEY)]


# -- the claim's plan ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_dsn(age_dsn: str) -> Iterator[str]:
    """PLAN_ROWS fields as a rotation or a move between keys finds them (kms_v1 under three
    keys and four key versions, one in ten under no key, one in ten legacy), a job with a few
    failures, vacuumed and analysed. Tests only read it."""
    keys = ("a-key", TARGET_KEY, "z-key")

    def field(n: int) -> FieldValue:
        if n % 10 == 0:
            return legacy_fields([n])[0]
        if n % 10 == 5:
            return field_value(n)
        return keyed_fields([n], keys[n % 3], key_version=1 + n % 4)[0]

    with temporary_database(age_dsn) as dsn:
        store = AgeStore(dsn, pool_size=1)
        try:
            store.write_batch([field(n) for n in range(PLAN_ROWS)], [], [])
            job = replace(new_job(include_legacy=True), target_key=TARGET_KEY)
            store.create_job(job)
            with store.claim(job, 20) as claim:
                for f in claim.fields:
                    claim.fail(f, "InvalidEnvelope")
        finally:
            store.close()
        with connect(dsn) as conn:
            conn.execute("VACUUM ANALYZE")
        yield dsn


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


def _plans(conn: psycopg.Connection[tuple[Any, ...]], query: str, args: dict[str, Any]) -> Any:
    """The plan for these values, then the generic plan PostgreSQL may reuse for any values
    once the statement is prepared (psycopg prepares a query run five times on one connection)."""
    custom = conn.execute(("EXPLAIN (FORMAT JSON) " + query).encode(), args).fetchone()
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", query)))
    prepared = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m.group(1)) + 1}", query)
    conn.execute("SET plan_cache_mode = force_generic_plan")
    conn.execute(f"PREPARE claim AS {prepared}".encode())
    try:
        literals = ", ".join(sql.Literal(args[n]).as_string(conn) for n in names)
        generic = conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE claim ({literals})".encode())
        row = generic.fetchone()
    finally:
        conn.execute("DEALLOCATE claim")
        conn.execute("RESET plan_cache_mode")
    assert custom is not None and row is not None
    return [custom[0][0]["Plan"], row[0][0]["Plan"]]


@pytest.mark.parametrize("name", sorted(PENDING))
def test_a_claim_is_a_locked_range_of_the_key_index_and_sorts_nothing(
    plan_dsn: str, name: str
) -> None:
    claim = AgeStatements("heimdall").claims[name]
    args = {"job_id": "job-1", "target": "3", "key": TARGET_KEY, "limit": 100}
    with age_connect(plan_dsn) as conn:
        for plan in _plans(conn, claim, args):
            nodes = list(_plan_nodes(plan))
            types = [node["Node Type"] for node in nodes]
            assert types[:2] == ["Limit", "LockRows"]
            assert "Sort" not in types and "Seq Scan" not in types
            scans = [n for n in nodes if n.get("Relation Name") == "FieldValue"]
            assert [n["Node Type"] for n in scans] == ["Index Scan"]
            assert scans[0]["Index Name"] == "heimdall_fieldvalue_by_key_name"
            assert "Filter" not in scans[0]


@pytest.mark.parametrize(("source", "claim_name"), SOURCES)
def test_a_claim_late_in_a_job_reads_no_field_already_done(
    store: AgeStore, age_store_dsn: str, source: str, claim_name: str
) -> None:
    # Claims take fields lowest-first; a scan that passes the done ones would make each
    # claim slower than the last, and the whole job quadratic.
    store.write_batch(keyed_fields(range(2000), source), [], [])
    job = replace(new_job(total=2000), target_key=TARGET_KEY)
    store.create_job(job)
    with connect(age_store_dsn) as conn:
        conn.execute('ANALYZE heimdall."FieldValue"')  # as autovacuum would after the ingest
    for _ in range(18):
        with store.claim(job, 100) as claim:
            for f in claim.fields:
                claim.update(f, moved(f))
    assert store.count_pending(job) == 200
    args = {"job_id": job.job_id, "target": str(TARGET), "key": TARGET_KEY, "limit": 100}
    query = AgeStatements("heimdall").claims[claim_name]

    # ANALYZE runs the claim, locks included: in a transaction that is rolled back.
    with age_connect(age_store_dsn) as conn, conn.transaction(force_rollback=True):
        row = conn.execute(("EXPLAIN (ANALYZE, FORMAT JSON) " + query).encode(), args).fetchone()
    assert row is not None
    nodes = list(_plan_nodes(row[0][0]["Plan"]))
    scans = [n for n in nodes if n.get("Relation Name") == "FieldValue"]
    fetched = sum(
        n["Actual Rows"]
        + n.get("Rows Removed by Filter", 0)
        + n.get("Rows Removed by Index Recheck", 0)
        for n in scans
    )
    assert 100 <= fetched <= 200


def test_a_write_failing_at_commit_rolls_back_the_batch_and_names_no_envelope(
    store: AgeStore,
) -> None:
    job = _job_with(store, 2)
    poisoned = FieldUpdate('{"secret-envelope-x\x00"}', TARGET, "kms_v1", "d" * 32)

    with pytest.raises(StorageError) as raised, store.claim(job, 10) as claim:
        claim.update(claim.fields[0], rewrap(claim.fields[0], key_version=TARGET))
        claim.update(claim.fields[1], poisoned)

    message = str(raised.value)
    assert message.startswith("postgres claim failed:")
    assert "secret-envelope" not in message and "\n" not in message
    assert store.count_pending(job) == 2
    current = store.get_job(job.job_id)
    assert current is not None and current.completed == 0
