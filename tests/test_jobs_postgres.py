"""PostgresStore as a JobStore: the job contract, SKIP LOCKED, the claim's plan, and two
re-encryption workers sharing one database end to end."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from heimdall import metrics
from heimdall.audit import JsonlAuditLog
from heimdall.cipher import FieldCipher
from heimdall.envelope import EncryptionVersion
from heimdall.errors import StorageError
from heimdall.ingest import ingest_lines
from heimdall.kms.local import LocalKeyring
from heimdall.modes import CipherRouter
from heimdall.policy import default_policy
from heimdall.rbac import Caller
from heimdall.rotation.job import job_store, run_job, start_job
from heimdall.service import Heimdall
from heimdall.store.base import FieldCount, FieldUpdate, FieldValue
from heimdall.store.jobs import Job, JobState
from heimdall.store.postgres import PostgresStore
from heimdall.store.postgres_jobs import _CLAIMS
from heimdall.store.postgres_schema import MIGRATIONS
from heimdall.types import EncryptionMode
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
from store_contract import envelope, field_value, key, rewrap

# Rows for the plan test: a few thousand, enough that the planner prices a table scan as what
# it is, few enough to write in a fraction of a second.
PLAN_TABLE_ROWS = 5000
RECORDS = 3000  # two encrypted fields each


class TestPostgresJobContract(JobStoreContract):
    dsn = ""

    @pytest.fixture
    def store(self, postgres_store_dsn: str) -> Iterator[JobGraphStore]:
        self.dsn = postgres_store_dsn
        store = PostgresStore(postgres_store_dsn, pool_size=2)
        yield store
        store.close()

    def open_again(self, store: JobGraphStore) -> JobGraphStore:
        return PostgresStore(self.dsn, pool_size=2)


@pytest.fixture
def store(postgres_store_dsn: str) -> Iterator[PostgresStore]:
    store = PostgresStore(postgres_store_dsn, pool_size=2)
    yield store
    store.close()


def _job_with(store: PostgresStore, count: int) -> Job:
    store.write_batch(kms_fields(range(count)), [], [])
    job = new_job(total=count)
    store.create_job(job)
    return job


def test_a_locked_batch_is_skipped_not_waited_for(postgres_store_dsn: str) -> None:
    # Were the locked rows waited for, the second claim would fail after 5 s instead of hanging.
    dbname = str(conninfo_to_dict(postgres_store_dsn)["dbname"])
    with connect(postgres_store_dsn) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET lock_timeout = '5s'").format(sql.Identifier(dbname))
        )
    first = PostgresStore(postgres_store_dsn, pool_size=2)
    second = PostgresStore(postgres_store_dsn, pool_size=2)
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


def test_claim_update_moves_the_generated_version_columns_with_the_properties(
    store: PostgresStore, postgres_store_dsn: str
) -> None:
    job = _job_with(store, 1)
    update = FieldUpdate(envelope("new"), TARGET, "kms_v1", "d" * 32)
    with store.claim(job, 1) as claim:
        claim.update(claim.fields[0], update)

    with connect(postgres_store_dsn) as conn:
        row = conn.execute(
            "SELECT properties, encryption_version, key_version, dek_id FROM field_values"
        ).fetchone()
    assert row is not None
    properties, encryption_version, key_version, dek_id = row
    assert (properties["key_version"], key_version) == (TARGET, TARGET)
    assert (properties["encryption_version"], encryption_version) == ("kms_v1", "kms_v1")
    assert (properties["dek_id"], dek_id) == ("d" * 32, "d" * 32)
    assert properties["encrypted_data"] == envelope("new")
    assert properties["is_encrypted"] is True
    assert store.field_counts() == [FieldCount("kms_v1", TARGET, 1)]


def test_a_claim_for_an_unknown_job_raises_storage_error_and_writes_nothing(
    store: PostgresStore,
) -> None:
    store.write_batch(kms_fields(range(2)), [], [])
    ghost = new_job("job-ghost")

    with (
        pytest.raises(StorageError, match="no re-encryption job job-ghost"),
        store.claim(ghost, 10) as claim,
    ):
        claim.fail(claim.fields[0], "InvalidEnvelope")
        claim.update(claim.fields[1], rewrap(claim.fields[1], key_version=TARGET))

    assert [store.get_field(key(n)) for n in range(2)] == kms_fields(range(2))
    assert list(store.failures(ghost.job_id)) == []


def test_a_field_failed_twice_in_one_claim_counts_once(store: PostgresStore) -> None:
    job = _job_with(store, 2)

    with store.claim(job, 10) as claim:
        claim.fail(claim.fields[0], "KmsUnavailable")
        claim.fail(claim.fields[0], "KmsUnavailable")

    current = store.get_job(job.job_id)
    assert current is not None and (current.completed, current.failed) == (0, 1)
    assert len(list(store.failures(job.job_id))) == 1


def test_a_write_failing_at_commit_rolls_back_the_batch_and_names_no_envelope(
    store: PostgresStore,
) -> None:
    job = _job_with(store, 2)
    # PostgreSQL text cannot hold NUL: psycopg refuses the value before sending it.
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


def test_a_version_1_database_gains_the_job_tables_and_keeps_its_fields(
    postgres_store_dsn: str,
) -> None:
    PostgresStore(postgres_store_dsn).close()
    with connect(postgres_store_dsn) as conn:  # back to schema version 1, as released
        conn.execute("DROP TABLE reencrypt_failures, reencrypt_jobs, service_tokens")
        conn.execute("ALTER TABLE field_values DROP COLUMN key_name")  # and its index
        conn.execute(
            "CREATE INDEX field_values_by_version ON field_values (encryption_version, key_version)"
        )
        conn.execute("DROP INDEX sightings_by_key_record_source")
        conn.execute("CREATE INDEX sightings_by_key ON sightings (canonical_key)")
        conn.execute("DELETE FROM schema_migrations WHERE version > 1")
        conn.execute(
            "INSERT INTO field_values (canonical_key, field_name, properties) VALUES"
            " (%s, 'email', jsonb_build_object('encrypted_data', %s::text, 'is_encrypted', true,"
            " 'key_version', 1, 'encryption_version', 'kms_v1', 'dek_id', %s::text,"
            " 'created_at', 'x', 'updated_at', 'x'))",
            (key(1), envelope("1"), "0" * 32),
        )

    store = PostgresStore(postgres_store_dsn)
    try:
        assert store.count_pending(new_job()) == 1
        store.create_job(new_job(total=1))
        assert store.active_job() is not None
    finally:
        store.close()
    with connect(postgres_store_dsn) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))


# -- the claim's plan ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_dsn(postgres_dsn: str) -> Iterator[str]:
    """PLAN_TABLE_ROWS fields as a rotation or a move between keys finds them (kms_v1 under
    three keys and four key versions, one in ten under no key, one in ten legacy), a job with a
    few failures, vacuumed and analysed. Tests only read it."""
    keys = ("a-key", TARGET_KEY, "z-key")

    def field(n: int) -> FieldValue:
        if n % 10 == 0:
            return legacy_fields([n])[0]
        if n % 10 == 5:
            return field_value(n)
        return keyed_fields([n], keys[n % 3], key_version=1 + n % 4)[0]

    with temporary_database(postgres_dsn) as dsn:
        store = PostgresStore(dsn, pool_size=1)
        try:
            store.write_batch([field(n) for n in range(PLAN_TABLE_ROWS)], [], [])
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
    custom = conn.execute("EXPLAIN (FORMAT JSON) " + query, args).fetchone()
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", query)))
    prepared = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m.group(1)) + 1}", query)
    conn.execute("SET plan_cache_mode = force_generic_plan")
    conn.execute(f"PREPARE claim AS {prepared}")
    try:
        literals = ", ".join(sql.Literal(args[n]).as_string(conn) for n in names)
        generic = conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE claim ({literals})").fetchone()
    finally:
        conn.execute("DEALLOCATE claim")
        conn.execute("RESET plan_cache_mode")
    assert custom is not None and generic is not None
    return [custom[0][0]["Plan"], generic[0][0]["Plan"]]


@pytest.mark.parametrize("name", sorted(_CLAIMS))
def test_a_claim_is_a_range_of_the_key_index_and_sorts_nothing(plan_dsn: str, name: str) -> None:
    args = {"job_id": "job-1", "target": 3, "key": TARGET_KEY, "limit": 100}
    with connect(plan_dsn) as conn:
        for plan in _plans(conn, _CLAIMS[name], args):
            nodes = list(_plan_nodes(plan))
            types = [node["Node Type"] for node in nodes]
            assert types[:2] == ["Limit", "LockRows"]
            assert "Sort" not in types and "Seq Scan" not in types
            scans = [n for n in nodes if n.get("Relation Name") == "field_values"]
            assert [n["Node Type"] for n in scans] == ["Index Scan"]
            assert scans[0]["Index Name"] == "field_values_by_key"
            assert "Filter" not in scans[0]


# The claim that takes the fields left under each key a job may find them under.
SOURCES = [
    pytest.param(TARGET_KEY, "same key", id="rotation"),
    pytest.param("a-key", "key before", id="from-a-key-sorting-before"),
    pytest.param("z-key", "key after", id="from-a-key-sorting-after"),
]


@pytest.mark.parametrize(("source", "claim_name"), SOURCES)
def test_a_claim_late_in_a_job_reads_no_field_already_done(
    store: PostgresStore, postgres_store_dsn: str, source: str, claim_name: str
) -> None:
    # Claims take fields lowest-first; a scan in any order that passes the done ones would
    # make each claim slower than the last, and the whole job quadratic.
    store.write_batch(keyed_fields(range(2000), source), [], [])
    job = replace(new_job(total=2000), target_key=TARGET_KEY)
    store.create_job(job)
    with connect(postgres_store_dsn) as conn:
        conn.execute("ANALYZE field_values")  # as autovacuum would after the ingest
    for _ in range(18):
        with store.claim(job, 100) as claim:
            for f in claim.fields:
                claim.update(f, moved(f))
    assert store.count_pending(job) == 200
    args = {"job_id": job.job_id, "target": TARGET, "key": TARGET_KEY, "limit": 100}

    # ANALYZE runs the claim, locks included: in a transaction that is rolled back.
    with connect(postgres_store_dsn) as conn, conn.transaction(force_rollback=True):
        row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + _CLAIMS[claim_name], args).fetchone()
    assert row is not None
    nodes = list(_plan_nodes(row[0][0]["Plan"]))
    scans = [n for n in nodes if n.get("Relation Name") == "field_values"]
    # Whatever the plan (an index range, or a bitmap of it and a sort of the 200 pending),
    # the rows fetched from the table are pending ones; a walk in key order would fetch 2000.
    fetched = sum(
        n["Actual Rows"]
        + n.get("Rows Removed by Filter", 0)
        + n.get("Rows Removed by Index Recheck", 0)
        for n in scans
    )
    assert 100 <= fetched <= 200


# -- end to end ------------------------------------------------------------------------------


def _service(dsn: str, data_dir: Path) -> Heimdall:
    keyring = LocalKeyring(data_dir / "keyring.json", create=True)
    cipher = FieldCipher(keyring, EncryptionVersion.KMS_V1)
    return Heimdall(
        router=CipherRouter(EncryptionMode.KMS, kms=cipher, legacy=None),
        store=PostgresStore(dsn),
        audit=JsonlAuditLog(data_dir / "audit.log", fsync=False),
        policy=default_policy(),
    )


def _values(service: Heimdall, caller: Caller) -> dict[str, str]:
    keys = [f.canonical_key for batch in service.store.iter_fields() for f in batch]
    return service.decrypt_many(keys, reason="test:verify", caller=caller)


def test_two_workers_on_one_database_finish_a_rotation_exactly_once_per_field(
    postgres_store_dsn: str, tmp_path: Path
) -> None:
    caller = Caller(actor="test:operator")
    lines = [
        json.dumps({"id": f"r{i}", "email": f"user{i}@example.com", "name": f"User Number{i}"})
        for i in range(RECORDS)
    ]
    services = [_service(postgres_store_dsn, tmp_path)]
    try:
        ingest_lines(services[0], lines, caller=caller, source_name="t")
        values = _values(services[0], caller)
        assert len(values) == 2 * RECORDS
        services[0].rotate_keys(caller=caller)
        job = start_job(services[0], caller=caller)
        assert job is not None and job.total == 2 * RECORDS
        services.append(_service(postgres_store_dsn, tmp_path))
        registry = metrics.REGISTRY
        assert registry is not None, "prometheus-client is installed in the dev environment"
        counted = registry.get_sample_value("heimdall_reencrypted_fields_total") or 0.0
        finals: list[Job] = []
        errors: list[BaseException] = []
        start = threading.Barrier(2, timeout=BARRIER_TIMEOUT)

        def work(service: Heimdall, worker: int) -> None:
            try:
                start.wait()
                worker_caller = Caller(actor=f"test:worker-{worker}")
                finals.append(run_job(service, job.job_id, caller=worker_caller, batch_size=100))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s, i)) for i, s in enumerate(services)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert errors == []
        # The worker that found nothing pending closed the job; the other may have stopped
        # while a batch was still held.
        assert len(finals) == 2 and JobState.DONE in {f.state for f in finals}
        done = job_store(services[0]).get_job(job.job_id)
        assert done is not None
        assert (done.state, done.completed, done.total, done.failed) == (
            JobState.DONE,
            2 * RECORDS,
            2 * RECORDS,
            0,
        )
        assert services[0].store.field_counts() == [
            FieldCount("kms_v1", 2, 2 * RECORDS, "heimdall-pii")
        ]
        # Both workers count into this process's metrics: every field counted once in all.
        after = registry.get_sample_value("heimdall_reencrypted_fields_total") or 0.0
        assert after - counted == 2 * RECORDS
        assert _values(services[1], caller) == values
        events = list(JsonlAuditLog(tmp_path / "audit.log"))
        rewraps = [
            e
            for e in events
            if e["event_type"] == "crypto.rewrap"
            and e.get("field_identifier")
            and e["result"] == "success"
        ]
        per_field = Counter(e["field_identifier"] for e in rewraps)
        assert set(per_field) == set(values)
        assert [k for k, times in per_field.items() if times > 1] == []
        assert {e["actor"] for e in rewraps} == {"test:worker-0", "test:worker-1"}
    finally:
        for service in services:
            service.close()
