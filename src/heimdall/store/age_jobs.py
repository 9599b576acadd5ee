"""The re-encryption job's state on the AGE store (see :mod:`heimdall.store.jobs`).

As on PostgreSQL (:mod:`heimdall.store.postgres_jobs`, whose reasons hold here too): the job
tables are the PostgreSQL store's, and a claim is one transaction whose ``SELECT ... FOR UPDATE
SKIP LOCKED`` reads each kind of pending field as a range of one index, here the expression index
``heimdall_fieldvalue_by_key_name`` (encryption_version, key name, key_version) on the FieldValue
label table itself. Locking the vertex rows is what keeps two workers apart, and also what keeps
an application's concurrent write of the same vertex from slipping between the read and the
update. The updates, failures and counters commit together with the claim, the updates as one
statement, each a compare-and-swap on the envelope that was read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from heimdall.store.age_sql import KEYED, AgeStatements, field_from_node
from heimdall.store.jobs import Job
from heimdall.store.postgres import PostgresStore
from heimdall.store.postgres_jobs import _PostgresClaim

__all__ = ["AgeJobs"]


def _params(job: Job, **more: object) -> dict[str, object]:
    return {"job_id": job.job_id, "target": str(job.target_version), "key": job.target_key, **more}


class AgeJobs(PostgresStore):
    """The JobStore methods that read fields, over the graph; the rest are PostgresStore's."""

    _sql: AgeStatements

    def _claims(self, job: Job) -> list[str]:
        """The claim queries for *job*'s pending fields, in the order they are tried."""
        claims = self._sql.claims
        kms = [claims[name] for name in KEYED] if job.target_key else [claims["any key"]]
        return [*kms, claims["legacy"]] if job.include_legacy else kms

    def count_pending(self, job: Job) -> int:
        queries = [self._sql.count_kms_keyed if job.target_key else self._sql.count_kms_any]
        if job.include_legacy:
            queries.append(self._sql.count_legacy)
        pending = 0
        with self._connection("count_pending") as conn:
            for query in queries:
                row = conn.execute(query, _params(job)).fetchone()
                pending += 0 if row is None else int(row[0])
        return pending

    def data_key_envelopes(self, job: Job, limit: int) -> list[str]:
        query = self._sql.data_keys_keyed if job.target_key else self._sql.data_keys_any
        with self._connection("data_key_envelopes") as conn:
            rows = conn.execute(query, _params(job, limit=limit)).fetchall()
        return [str(row[0]) for row in rows]

    @contextmanager
    def claim(self, job: Job, limit: int) -> Iterator[_PostgresClaim]:
        with self._transaction("claim") as cursor:
            rows: list[tuple[Any, ...]] = []
            for query in self._claims(job):
                rows += cursor.execute(query, _params(job, limit=limit - len(rows))).fetchall()
                if len(rows) >= limit:
                    break
            claim = _PostgresClaim([field_from_node(row) for row in rows])
            yield claim
            claim.write(cursor, job.job_id, self._sql.update_fields)
