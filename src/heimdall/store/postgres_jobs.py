"""The re-encryption job's state on PostgreSQL (see :mod:`heimdall.store.jobs`).

A claim is one transaction on one pooled connection. Its ``SELECT ... FOR UPDATE SKIP LOCKED``
locks the batch row by row as it reads it, and passes over rows another worker's claim has
locked, so concurrent workers take disjoint batches without waiting for each other. On a clean
exit the field updates, the failures and the job's counters are written and committed together;
on an exception the transaction, and with it every lock, is rolled back.

Each kind of pending field is claimed by its own query, with ``encryption_version`` a constant,
in ``key_version`` order: the index ``field_values_by_version (encryption_version, key_version)``
then hands out exactly the pending rows, lowest version first, so a claim reads its batch (plus
rows other workers hold and fields that failed in the job) and nothing else, however far the job
has got. Ordered by canonical_key instead, a claim must pass every field already done: claims
take the lowest keys first, so done fields pile up just where each claim starts reading, and
PostgreSQL plans the query as a walk of the primary key testing each row in the heap. Measured
on 100,000 fields in batches of 500, that SELECT took 2.4 ms for the first claim and 50 ms for
the last (5.4 s over the job, against 0.6 s and a flat 2.7 ms in key_version order): quadratic
in the number of fields. No claim needs its batch in key order, only batches that never overlap;
within one key_version the order is the index's own (physical) one. A single query over
``kms_v1 OR legacy`` would have no index in any useful order at all.
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
# The two kinds of pending field (spec: Migration Strategy, Phase 4). Constant SQL; values bound.
_PENDING_KMS: Final = (
    f"encryption_version = 'kms_v1' AND key_version < %(target)s AND {_NOT_FAILED}"
)
_PENDING_LEGACY: Final = f"encryption_version = 'legacy' AND {_NOT_FAILED}"

# FOR UPDATE: see set_job_state. RETURNING: the job as changed, in the same round trip.
_SELECT_JOB_FOR_UPDATE: Final = SQL.select_job + " FOR UPDATE"
_SET_STATE: Final = SQL.set_job_state + f" RETURNING {JOB_COLUMNS}"
_DATA_KEYS: Final = (
    "SELECT DISTINCT ON (dek_id) properties ->> 'encrypted_data' FROM field_values"
    " WHERE encryption_version = 'kms_v1' AND key_version < %(target)s"
    " ORDER BY dek_id LIMIT %(limit)s"
)
_COUNT_KMS: Final = f"SELECT count(*) FROM field_values WHERE {_PENDING_KMS}"  # noqa: S608
_COUNT_LEGACY: Final = f"SELECT count(*) FROM field_values WHERE {_PENDING_LEGACY}"  # noqa: S608
# ORDER BY key_version: see the module docstring. SKIP LOCKED: rows another claim holds are
# passed over, not waited for.
_CLAIM_KMS: Final = (
    f"SELECT {FIELD_COLUMNS} FROM field_values WHERE {_PENDING_KMS}"  # noqa: S608
    " ORDER BY key_version LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
)
_CLAIM_LEGACY: Final = (
    f"SELECT {FIELD_COLUMNS} FROM field_values WHERE {_PENDING_LEGACY}"  # noqa: S608
    " ORDER BY key_version LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
)
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

    def write(self, cursor: Cursor, job_id: str) -> None:
        """The batch's updates (each a compare-and-swap), failures and counters."""
        if not self.updates and not self.failed:
            return
        now = utc_now()
        done = failed = 0
        if self.updates:
            cursor.execute(
                _UPDATE_FIELDS,
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
        params = {"job_id": job.job_id, "target": job.target_version}
        with self._connection("count_pending") as conn:
            row = conn.execute(_COUNT_KMS, params).fetchone()
            pending = 0 if row is None else int(row[0])
            if job.include_legacy:
                row = conn.execute(_COUNT_LEGACY, params).fetchone()
                pending += 0 if row is None else int(row[0])
        return pending

    def data_key_envelopes(self, job: Job, limit: int) -> list[str]:
        params = {"target": job.target_version, "limit": limit}
        with self._connection("data_key_envelopes") as conn:
            rows = conn.execute(_DATA_KEYS, params).fetchall()
        return [str(row[0]) for row in rows]

    @contextmanager
    def claim(self, job: Job, limit: int) -> Iterator[_PostgresClaim]:
        params = {"job_id": job.job_id, "target": job.target_version, "limit": limit}
        with self._transaction("claim") as cursor:
            rows = cursor.execute(_CLAIM_KMS, params).fetchall()
            if job.include_legacy and len(rows) < limit:
                params["limit"] = limit - len(rows)
                rows += cursor.execute(_CLAIM_LEGACY, params).fetchall()
            claim = _PostgresClaim([field_from_row(row) for row in rows])
            yield claim
            claim.write(cursor, job.job_id)

    def failures(self, job_id: str) -> Iterator[tuple[str, str]]:
        with self._connection("failures") as conn:
            rows = conn.execute(SQL.failures, (job_id,)).fetchall()
        yield from ((str(key), str(error)) for key, error in rows)
