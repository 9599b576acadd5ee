"""The re-encryption job's state on SQLite (see :mod:`heimdall.store.jobs`).

SQLite has one writer at a time, so a claim simply runs inside a ``BEGIN IMMEDIATE``
transaction: workers in other processes wait for it, and a claimed batch is committed (fields,
failures and counters together) or rolled back as a whole.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from typing import Final

from heimdall.errors import LifecycleError, StorageError
from heimdall.store.base import FieldUpdate, FieldValue, field_from_row, utc_now
from heimdall.store.jobs import JOB_COLUMNS, Job, JobState, job_from_row

__all__ = ["JOB_TABLES", "SqliteJobs"]

JOB_TABLES: Final = (
    """
    CREATE TABLE reencrypt_jobs (
        job_id         TEXT PRIMARY KEY,
        kind           TEXT NOT NULL,
        target_version INTEGER NOT NULL,
        include_legacy INTEGER NOT NULL CHECK (include_legacy IN (0, 1)),
        state          TEXT NOT NULL,
        total          INTEGER NOT NULL,
        completed      INTEGER NOT NULL DEFAULT 0,
        failed         INTEGER NOT NULL DEFAULT 0,
        created_at     TEXT NOT NULL,
        updated_at     TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE reencrypt_failures (
        job_id        TEXT NOT NULL REFERENCES reencrypt_jobs (job_id),
        canonical_key TEXT NOT NULL,
        error         TEXT NOT NULL,
        PRIMARY KEY (job_id, canonical_key)
    )
    """,
)

_PENDING: Final = """
    ((encryption_version = 'kms_v1' AND key_version < ?)
     OR (? = 1 AND encryption_version = 'legacy'))
    AND canonical_key NOT IN (SELECT canonical_key FROM reencrypt_failures WHERE job_id = ?)
"""
FIELD_COLUMNS: Final = (
    "canonical_key, field_name, encrypted_data, is_encrypted, key_version,"
    " encryption_version, dek_id, updated_at"
)
# Built from the constants above only; every value is a bound parameter.
_INSERT_JOB: Final = f"INSERT INTO reencrypt_jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * 10)})"  # noqa: S608
_SELECT_JOB: Final = f"SELECT {JOB_COLUMNS} FROM reencrypt_jobs WHERE job_id = ?"  # noqa: S608
_ACTIVE_JOB: Final = (
    f"SELECT {JOB_COLUMNS} FROM reencrypt_jobs WHERE state IN ('running', 'paused')"  # noqa: S608
    " ORDER BY created_at DESC, rowid DESC LIMIT 1"
)
_LATEST_JOB: Final = (
    f"SELECT {JOB_COLUMNS} FROM reencrypt_jobs"  # noqa: S608
    " ORDER BY created_at DESC, rowid DESC LIMIT 1"
)
# SQLite returns the bare column from one row of each group: one envelope per data key.
_DATA_KEYS: Final = (
    "SELECT encrypted_data FROM field_values WHERE encryption_version = 'kms_v1'"
    " AND key_version < ? GROUP BY dek_id LIMIT ?"
)
_COUNT_PENDING: Final = f"SELECT count(*) FROM field_values WHERE {_PENDING}"  # noqa: S608
_CLAIM: Final = f"SELECT {FIELD_COLUMNS} FROM field_values WHERE {_PENDING} LIMIT ?"  # noqa: S608


def _pending_params(job: Job) -> tuple[int, int, str]:
    return (job.target_version, int(job.include_legacy), job.job_id)


@dataclass
class _SqliteClaim:
    fields: list[FieldValue]
    updates: list[tuple[FieldValue, FieldUpdate]] = field(default_factory=list)
    failed: list[tuple[FieldValue, str]] = field(default_factory=list)

    def update(self, field: FieldValue, update: FieldUpdate) -> None:
        self.updates.append((field, update))

    def fail(self, field: FieldValue, error: str) -> None:
        self.failed.append((field, error))


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
            row = conn.execute(_ACTIVE_JOB).fetchone()
            if row is not None:
                return job_from_row(row)
            return self._insert_job(conn, job)

    def _insert_job(self, conn: sqlite3.Connection, job: Job) -> Job:
        """Insert *job*; the job as stored (its timestamps set)."""
        now = utc_now()
        stored = replace(job, created_at=job.created_at or now, updated_at=now)
        conn.execute(
            _INSERT_JOB,
            (
                stored.job_id,
                stored.kind,
                stored.target_version,
                int(stored.include_legacy),
                stored.state.value,
                stored.total,
                stored.completed,
                stored.failed,
                stored.created_at,
                stored.updated_at,
            ),
        )
        return stored

    def get_job(self, job_id: str) -> Job | None:
        with self._session("get_job") as conn:
            row = conn.execute(_SELECT_JOB, (job_id,)).fetchone()
        return None if row is None else job_from_row(row)

    def active_job(self) -> Job | None:
        with self._session("active_job") as conn:
            row = conn.execute(_ACTIVE_JOB).fetchone()
        return None if row is None else job_from_row(row)

    def latest_job(self) -> Job | None:
        with self._session("latest_job") as conn:
            row = conn.execute(_LATEST_JOB).fetchone()
        return None if row is None else job_from_row(row)

    def set_job_state(self, job_id: str, state: JobState) -> Job:
        with self._transaction("set_job_state") as conn:
            row = conn.execute(_SELECT_JOB, (job_id,)).fetchone()
            if row is None:
                raise StorageError(f"no re-encryption job {job_id}")
            job = job_from_row(row)
            if job.state in (JobState.DONE, JobState.CANCELLED) and state is not job.state:
                raise LifecycleError(f"job {job_id} is {job.state.value} and cannot change")
            conn.execute(
                "UPDATE reencrypt_jobs SET state = ?, updated_at = ? WHERE job_id = ?",
                (state.value, utc_now(), job_id),
            )
        updated = self.get_job(job_id)
        assert updated is not None
        return updated

    def count_pending(self, job: Job) -> int:
        with self._session("count_pending") as conn:
            row = conn.execute(_COUNT_PENDING, _pending_params(job)).fetchone()
        return int(row[0])

    def data_key_envelopes(self, job: Job, limit: int) -> list[str]:
        with self._session("data_key_envelopes") as conn:
            rows = conn.execute(_DATA_KEYS, (job.target_version, limit)).fetchall()
        return [str(row[0]) for row in rows]

    @contextmanager
    def claim(self, job: Job, limit: int) -> Iterator[_SqliteClaim]:
        with self._transaction("claim") as conn:
            rows = conn.execute(_CLAIM, (*_pending_params(job), limit)).fetchall()
            claim = _SqliteClaim([field_from_row(row) for row in rows])
            yield claim
            now = utc_now()
            done = 0
            for current, update in claim.updates:
                cursor = conn.execute(
                    "UPDATE field_values SET encrypted_data = ?, key_version = ?,"
                    " encryption_version = ?, dek_id = ?, updated_at = ?"
                    " WHERE canonical_key = ? AND encrypted_data = ?",
                    (
                        update.encrypted_data,
                        update.key_version,
                        update.encryption_version,
                        update.dek_id,
                        now,
                        current.canonical_key,
                        current.encrypted_data,
                    ),
                )
                done += cursor.rowcount
            conn.executemany(
                "INSERT OR IGNORE INTO reencrypt_failures (job_id, canonical_key, error)"
                " VALUES (?, ?, ?)",
                [(job.job_id, f.canonical_key, error) for f, error in claim.failed],
            )
            conn.execute(
                "UPDATE reencrypt_jobs SET completed = completed + ?, failed = failed + ?,"
                " updated_at = ? WHERE job_id = ?",
                (done, len(claim.failed), now, job.job_id),
            )

    def failures(self, job_id: str) -> Iterator[tuple[str, str]]:
        with self._session("failures") as conn:
            rows = conn.execute(
                "SELECT canonical_key, error FROM reencrypt_failures WHERE job_id = ?"
                " ORDER BY canonical_key",
                (job_id,),
            ).fetchall()
        yield from ((str(a), str(b)) for a, b in rows)
