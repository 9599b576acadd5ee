"""The re-encryption job's state on SQLite (see :mod:`heimdall.store.jobs`).

SQLite has one writer at a time, so a claim simply runs inside a ``BEGIN IMMEDIATE``
transaction: workers in other processes wait for it, and a claimed batch is committed (fields,
failures and counters together) or rolled back as a whole.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Final

from heimdall.errors import StorageError
from heimdall.store.base import field_from_row, swap_params, utc_now
from heimdall.store.jobs import (
    ClaimedBatch,
    Job,
    JobState,
    check_state_change,
    job_from_row,
    job_row,
    stored_job,
)
from heimdall.store.sqlite_schema import COMPARE_AND_SWAP_FIELD, FIELD_COLUMNS, SQL

__all__ = ["SqliteJobs"]

# A pending field (see heimdall.store.jobs): kms_v1 and not under the job's key at its version
# (any key for a job without one: Job.target_key), or legacy when the job migrates legacy
# fields; not failed in this job. Parameters: _pending_params. `IS NOT` is SQLite's
# IS DISTINCT FROM: a field under no key name is pending for a job with one.
_PENDING: Final = """
    ((encryption_version = 'kms_v1'
      AND (key_version < ? OR (? <> '' AND key_name IS NOT ?)))
     OR (? = 1 AND encryption_version = 'legacy'))
    AND canonical_key NOT IN (SELECT canonical_key FROM reencrypt_failures WHERE job_id = ?)
"""
# SQLite returns the bare column from one row of each group: one envelope per data key.
_DATA_KEYS: Final = (
    "SELECT encrypted_data FROM field_values WHERE encryption_version = 'kms_v1'"
    " AND (key_version < ? OR (? <> '' AND key_name IS NOT ?)) GROUP BY dek_id LIMIT ?"
)
# Built from the constants above only; every value is a bound parameter.
_COUNT_PENDING: Final = f"SELECT count(*) FROM field_values WHERE {_PENDING}"  # noqa: S608
_CLAIM: Final = f"SELECT {FIELD_COLUMNS} FROM field_values WHERE {_PENDING} LIMIT ?"  # noqa: S608


def _kms_params(job: Job) -> tuple[int, str, str]:
    return (job.target_version, job.target_key, job.target_key)


def _pending_params(job: Job) -> tuple[object, ...]:
    return (*_kms_params(job), int(job.include_legacy), job.job_id)


class SqliteJobs:
    """Mixed into SqliteStore, whose connection plumbing it uses."""

    def _session(self, operation: str) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _transaction(self, operation: str) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def create_job(self, job: Job) -> None:
        with self._transaction("create_job") as conn:
            self._insert_job(conn, job)

    def create_job_unless_active(self, job: Job) -> Job:
        # The transaction is IMMEDIATE: it holds the database's write lock from its start.
        with self._transaction("create_job") as conn:
            row = conn.execute(SQL.active_job).fetchone()
            if row is not None:
                return job_from_row(row)
            return self._insert_job(conn, job)

    def _insert_job(self, conn: sqlite3.Connection, job: Job) -> Job:
        """Insert *job*; the job as stored (its kind a JobKind, its timestamps set)."""
        stored = stored_job(job, utc_now())
        conn.execute(SQL.insert_job, job_row(stored))
        return stored

    def get_job(self, job_id: str) -> Job | None:
        with self._session("get_job") as conn:
            row = conn.execute(SQL.select_job, (job_id,)).fetchone()
        return None if row is None else job_from_row(row)

    def active_job(self) -> Job | None:
        with self._session("active_job") as conn:
            row = conn.execute(SQL.active_job).fetchone()
        return None if row is None else job_from_row(row)

    def latest_job(self) -> Job | None:
        with self._session("latest_job") as conn:
            row = conn.execute(SQL.latest_job).fetchone()
        return None if row is None else job_from_row(row)

    def set_job_state(self, job_id: str, state: JobState) -> Job:
        with self._transaction("set_job_state") as conn:
            row = conn.execute(SQL.select_job, (job_id,)).fetchone()
            if row is None:
                raise StorageError(f"no re-encryption job {job_id}")
            check_state_change(job_from_row(row), state)
            conn.execute(SQL.set_job_state, (state.value, utc_now(), job_id))
        updated = self.get_job(job_id)
        assert updated is not None
        return updated

    def count_pending(self, job: Job) -> int:
        with self._session("count_pending") as conn:
            row = conn.execute(_COUNT_PENDING, _pending_params(job)).fetchone()
        return int(row[0])

    def data_key_envelopes(self, job: Job, limit: int) -> list[str]:
        with self._session("data_key_envelopes") as conn:
            rows = conn.execute(_DATA_KEYS, (*_kms_params(job), limit)).fetchall()
        return [str(row[0]) for row in rows]

    @contextmanager
    def claim(self, job: Job, limit: int) -> Iterator[ClaimedBatch]:
        with self._transaction("claim") as conn:
            rows = conn.execute(_CLAIM, (*_pending_params(job), limit)).fetchall()
            claim = ClaimedBatch([field_from_row(row) for row in rows])
            yield claim
            now = utc_now()
            done = 0
            for current, update in claim.updates:
                params = swap_params(current.canonical_key, current.encrypted_data, update, now)
                done += conn.execute(COMPARE_AND_SWAP_FIELD, params).rowcount
            conn.executemany(
                SQL.insert_failure,
                [(job.job_id, f.canonical_key, error) for f, error in claim.failed],
            )
            conn.execute(SQL.add_job_counts, (done, len(claim.failed), now, job.job_id))

    def failures(self, job_id: str) -> Iterator[tuple[str, str]]:
        with self._session("failures") as conn:
            rows = conn.execute(SQL.failures, (job_id,)).fetchall()
        yield from ((str(a), str(b)) for a, b in rows)
