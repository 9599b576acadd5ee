"""The re-encryption job's state on PostgreSQL (see :mod:`heimdall.store.jobs`).

A claim is one transaction on one pooled connection. Its ``SELECT ... FOR UPDATE SKIP LOCKED``
locks the batch row by row as it reads it, and passes over rows another worker's claim has
locked, so concurrent workers take disjoint batches without waiting for each other. On a clean
exit the field updates, the failures and the job's counters are written and committed together;
on an exception the transaction, and with it every lock, is rolled back.

Each kind of pending field is claimed by its own query, a range of the index
``field_values_by_key (encryption_version, key_name, key_version)`` read in that index's order:
it hands out exactly the pending rows, so a claim reads its batch (plus rows other workers hold
and fields that failed in the job) and nothing else, however far the job has got. Ordered by
canonical_key instead, a claim must pass every field already done: claims
take the lowest keys first, so done fields pile up just where each claim starts reading, and
PostgreSQL plans the query as a walk of the primary key testing each row in the heap. Measured
on 100,000 fields in batches of 500, that SELECT took 2.4 ms for the first claim and 50 ms for
the last (5.4 s over the job, against 0.6 s and a flat 2.7 ms in key_version order): quadratic
in the number of fields. No claim needs its batch in key order, only batches that never overlap;
within one key_version the order is the index's own (physical) one. A single query over all the
kinds (``kms_v1 OR legacy``, or "any key but the job's") would have no index in any useful order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Final

import psycopg

from heimdall.errors import StorageError
from heimdall.store.base import field_from_row, utc_now
from heimdall.store.jobs import (
    ClaimedBatch,
    Job,
    JobState,
    check_state_change,
    job_from_row,
    job_row,
    stored_job,
)
from heimdall.store.postgres_schema import FIELD_COLUMNS, SQL
from heimdall.store.sql import JOB_COLUMNS

__all__ = ["PostgresJobs"]

Cursor = psycopg.Cursor[tuple[Any, ...]]

# The advisory lock that makes "create a job unless one is active" one step across processes.
_CREATE_JOB_LOCK: Final = int.from_bytes(b"hmd-jobs", "big")

_NOT_FAILED: Final = (
    "NOT EXISTS (SELECT FROM reencrypt_failures AS failure WHERE failure.job_id = %(job_id)s"
    " AND failure.canonical_key = field_values.canonical_key)"
)
# The kinds of pending field (spec: Migration Strategy, Phase 4), each a range of
# field_values_by_key (encryption_version, key_name, key_version) in that index's order: a
# kms_v1 field under the job's key below its version, or under a key that sorts before or after
# it, or under none; a legacy field. A job without a key (see Job.target_key) takes any key
# below its version: a walk of the kms_v1 range. Constant SQL; values bound.
_KMS: Final = "encryption_version = 'kms_v1'"
_PENDING_CLAIMS: Final = {
    "same key": f"{_KMS} AND key_name = %(key)s AND key_version < %(target)s",
    "key before": f"{_KMS} AND key_name < %(key)s",
    "key after": f"{_KMS} AND key_name > %(key)s",
    "no key": f"{_KMS} AND key_name IS NULL",
    "any key": f"{_KMS} AND key_version < %(target)s",
    "legacy": "encryption_version = 'legacy'",
}
_KEYED: Final = ("same key", "key before", "key after", "no key")
_PENDING_KMS_KEYED: Final = (
    f"{_KMS} AND (key_name IS DISTINCT FROM %(key)s OR key_version < %(target)s)"
)
_PENDING_KMS_ANY: Final = _PENDING_CLAIMS["any key"]

# FOR UPDATE: see set_job_state. RETURNING: the job as changed, in the same round trip.
_SELECT_JOB_FOR_UPDATE: Final = SQL.select_job + " FOR UPDATE"
_SET_STATE: Final = SQL.set_job_state + f" RETURNING {JOB_COLUMNS}"


def _data_keys(pending: str) -> str:
    return (
        "SELECT DISTINCT ON (dek_id) properties ->> 'encrypted_data' FROM field_values"  # noqa: S608
        f" WHERE {pending} ORDER BY dek_id LIMIT %(limit)s"
    )


def _count(pending: str) -> str:
    return f"SELECT count(*) FROM field_values WHERE {pending} AND {_NOT_FAILED}"  # noqa: S608


# ORDER BY key_name, key_version: the index's own order within each range (see the module
# docstring). SKIP LOCKED: rows another claim holds are passed over, not waited for.
_CLAIMS: Final = {
    name: f"SELECT {FIELD_COLUMNS} FROM field_values WHERE {pending} AND {_NOT_FAILED}"  # noqa: S608
    " ORDER BY key_name, key_version LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
    for name, pending in _PENDING_CLAIMS.items()
}
_DATA_KEYS_KEYED: Final = _data_keys(_PENDING_KMS_KEYED)
_DATA_KEYS_ANY: Final = _data_keys(_PENDING_KMS_ANY)
_COUNT_KMS_KEYED: Final = _count(_PENDING_KMS_KEYED)
_COUNT_KMS_ANY: Final = _count(_PENDING_KMS_ANY)
_COUNT_LEGACY: Final = _count(_PENDING_CLAIMS["legacy"])


def _claims(job: Job) -> list[str]:
    """The claim queries for *job*'s pending fields, in the order they are tried."""
    kms = [_CLAIMS[name] for name in _KEYED] if job.target_key else [_CLAIMS["any key"]]
    return [*kms, _CLAIMS["legacy"]] if job.include_legacy else kms


def _params(job: Job, **more: object) -> dict[str, object]:
    return {"job_id": job.job_id, "target": job.target_version, "key": job.target_key, **more}


# The whole batch in one statement: a row per field, each still a compare-and-swap on the
# envelope that was read. 5,000 single-row UPDATEs were most of a rewrap job's time.
_UPDATE_FIELDS: Final = """
    UPDATE field_values AS f
    SET properties = f.properties || jsonb_build_object(
        'encrypted_data', u.data, 'key_version', u.key_version,
        'encryption_version', u.encryption_version, 'dek_id', u.dek_id, 'updated_at', %b::text)
    FROM unnest(%b::text[], %b::text[], %b::text[], %b::bigint[], %b::text[], %b::text[])
        AS u(canonical_key, expected, data, key_version, encryption_version, dek_id)
    WHERE f.canonical_key = u.canonical_key AND f.properties ->> 'encrypted_data' = u.expected
"""


def _missing_job(job_id: str) -> StorageError:
    return StorageError(f"postgres claim failed: no re-encryption job {job_id}")


class _PostgresClaim(ClaimedBatch):
    """A claimed batch, written with one statement for all its updates."""

    def write(self, cursor: Cursor, job_id: str, update_fields: str = _UPDATE_FIELDS) -> None:
        """The batch's updates (each a compare-and-swap), failures and counters.
        *update_fields* takes the parameters of _UPDATE_FIELDS (the AGE store's has its own)."""
        if not self.updates and not self.failed:
            return
        now = utc_now()
        done = failed = 0
        if self.updates:
            cursor.execute(
                update_fields,
                (
                    now,
                    [f.canonical_key for f, _ in self.updates],
                    [f.encrypted_data for f, _ in self.updates],  # the compare-and-swap's match
                    [u.encrypted_data for _, u in self.updates],
                    [u.key_version for _, u in self.updates],
                    [u.encryption_version for _, u in self.updates],
                    [u.dek_id for _, u in self.updates],
                ),
            )
            done = cursor.rowcount  # the swaps that matched
        if self.failed:
            try:
                cursor.executemany(
                    SQL.insert_failure, [(job_id, f.canonical_key, e) for f, e in self.failed]
                )
            except psycopg.errors.ForeignKeyViolation as exc:
                raise _missing_job(job_id) from exc
            failed = cursor.rowcount  # a field failed twice counts once
        if cursor.execute(SQL.add_job_counts, (done, failed, now, job_id)).rowcount != 1:
            raise _missing_job(job_id)


class PostgresJobs:
    """Mixed into PostgresStore, whose connection plumbing (and error translation) it uses."""

    def _connection(self, operation: str) -> AbstractContextManager[psycopg.Connection[Any]]:
        raise NotImplementedError

    def _transaction(self, operation: str) -> AbstractContextManager[Cursor]:
        raise NotImplementedError

    def _job_row(self, operation: str, query: str, params: tuple[Any, ...] = ()) -> Job | None:
        with self._connection(operation) as conn:
            row = conn.execute(query, params).fetchone()
        return None if row is None else job_from_row(row)

    def create_job(self, job: Job) -> None:
        with self._transaction("create_job") as cursor:
            self._insert_job(cursor, job)

    def create_job_unless_active(self, job: Job) -> Job:
        with self._transaction("create_job") as cursor:
            # Held to the end of the transaction, so a second caller's check runs after the
            # first one's insert is committed, and sees it.
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_JOB_LOCK,))
            row = cursor.execute(SQL.active_job).fetchone()
            if row is not None:
                return job_from_row(row)
            return self._insert_job(cursor, job)

    def _insert_job(self, cursor: Cursor, job: Job) -> Job:
        """Insert *job*; the job as stored (its kind a JobKind, its timestamps set)."""
        stored = stored_job(job, utc_now())
        cursor.execute(SQL.insert_job, job_row(stored))
        return stored

    def get_job(self, job_id: str) -> Job | None:
        return self._job_row("get_job", SQL.select_job, (job_id,))

    def active_job(self) -> Job | None:
        return self._job_row("active_job", SQL.active_job)

    def latest_job(self) -> Job | None:
        return self._job_row("latest_job", SQL.latest_job)

    def set_job_state(self, job_id: str, state: JobState) -> Job:
        with self._transaction("set_job_state") as cursor:
            # FOR UPDATE: a concurrent change (a worker closing the job, an operator cancelling
            # it) waits, then sees this one's result, so a finished job is never reopened.
            row = cursor.execute(_SELECT_JOB_FOR_UPDATE, (job_id,)).fetchone()
            if row is None:
                raise StorageError(f"postgres set_job_state failed: no re-encryption job {job_id}")
            check_state_change(job_from_row(row), state)
            updated = cursor.execute(_SET_STATE, (state.value, utc_now(), job_id)).fetchone()
        assert updated is not None
        return job_from_row(updated)

    def count_pending(self, job: Job) -> int:
        queries = [_COUNT_KMS_KEYED if job.target_key else _COUNT_KMS_ANY]
        if job.include_legacy:
            queries.append(_COUNT_LEGACY)
        pending = 0
        with self._connection("count_pending") as conn:
            for query in queries:
                row = conn.execute(query, _params(job)).fetchone()
                pending += 0 if row is None else int(row[0])
        return pending

    def data_key_envelopes(self, job: Job, limit: int) -> list[str]:
        query = _DATA_KEYS_KEYED if job.target_key else _DATA_KEYS_ANY
        with self._connection("data_key_envelopes") as conn:
            rows = conn.execute(query, _params(job, limit=limit)).fetchall()
        return [str(row[0]) for row in rows]

    @contextmanager
    def claim(self, job: Job, limit: int) -> Iterator[_PostgresClaim]:
        with self._transaction("claim") as cursor:
            rows: list[tuple[Any, ...]] = []
            for query in _claims(job):
                rows += cursor.execute(query, _params(job, limit=limit - len(rows))).fetchall()
                if len(rows) >= limit:
                    break
            claim = _PostgresClaim([field_from_row(row) for row in rows])
            yield claim
            claim.write(cursor, job.job_id)

    def failures(self, job_id: str) -> Iterator[tuple[str, str]]:
        with self._connection("failures") as conn:
            rows = conn.execute(SQL.failures, (job_id,)).fetchall()
        yield from ((str(key), str(error)) for key, error in rows)
