"""The SQL that the SQLite and PostgreSQL stores share, written once.

Both stores run the same statements on ``meta``, on ``sightings``, to read ``field_values`` and
on the job tables. Three things differ, and the templates here name each with a token that
:class:`SqlStatements` fills in once per store, when its schema module is imported:

* ``{p}``, a bound parameter's placeholder: ``?`` for sqlite3, ``%s`` for psycopg;
* ``{fields}``, the select list a FieldValue is read from, the schema's ``FIELD_COLUMNS``:
  plain columns on SQLite, ``jsonb`` properties on PostgreSQL;
* ``{job_order}``, the column that orders jobs created within the same second: SQLite's
  ``rowid``, PostgreSQL's ``seq``.

What is not the same text on both stays with its store: how a batch is written (COPY on
PostgreSQL), how a field's envelope is swapped (columns against ``jsonb``), how pending fields
are claimed and locked, and SQLite's index hints. Every statement is constant SQL; values are
always bound parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from heimdall.store.base import FieldValue, field_from_row, keyset_pages

__all__ = ["JOB_COLUMNS", "FetchAll", "SqlStatements"]

# The reencrypt_jobs columns both stores select and insert, in job_from_row's order.
JOB_COLUMNS: Final = (
    "job_id, kind, target_version, include_legacy, state, total, completed, failed,"
    " created_at, updated_at, target_key"
)


# Runs one query with its parameters and returns all its rows.
FetchAll = Callable[[str, list[object]], Sequence[Sequence[Any]]]


def _where(clauses: list[str]) -> str:
    return " WHERE " + " AND ".join(clauses) if clauses else ""


class SqlStatements:
    """The shared statements in one store's dialect."""

    def __init__(self, *, placeholder: str, field_columns: str, job_order: str) -> None:
        self._placeholder = placeholder
        self._field_columns = field_columns

        job_values = ", ".join([placeholder] * len(JOB_COLUMNS.split(",")))

        def sql(template: str) -> str:
            return template.format(
                p=placeholder,
                fields=field_columns,
                jobs=JOB_COLUMNS,
                job_values=job_values,
                job_order=job_order,
            )

        # FieldValues and sightings.
        self.get_field: Final = sql("SELECT {fields} FROM field_values WHERE canonical_key = {p}")
        self.count_sightings: Final = sql(
            "SELECT count(*) FROM sightings WHERE canonical_key = {p}"
        )
        self.field_counts: Final = (
            "SELECT encryption_version, key_name, key_version, count(*) FROM field_values"
            " GROUP BY encryption_version, key_name, key_version"
            " ORDER BY encryption_version, key_name NULLS FIRST, key_version"
        )
        # The distinct key names of kms_v1 fields, one index probe each (a loose index scan of
        # field_values_by_key): cheap however many fields there are.
        self.key_names: Final = """
            WITH RECURSIVE names (name) AS (
                SELECT min(key_name) FROM field_values WHERE encryption_version = 'kms_v1'
                UNION ALL
                SELECT (
                    SELECT min(key_name) FROM field_values
                    WHERE encryption_version = 'kms_v1' AND key_name > names.name
                ) FROM names WHERE names.name IS NOT NULL
            )
            SELECT name FROM names WHERE name IS NOT NULL
        """
        # The metadata map; the last one is its compare-and-swap.
        self.get_meta: Final = sql("SELECT value FROM meta WHERE key = {p}")
        self.set_meta: Final = sql(
            "INSERT INTO meta (key, value) VALUES ({p}, {p})"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        )
        self.insert_meta_if_absent: Final = sql(
            "INSERT INTO meta (key, value) VALUES ({p}, {p}) ON CONFLICT (key) DO NOTHING"
        )
        self.compare_and_swap_meta: Final = sql(
            "UPDATE meta SET value = {p} WHERE key = {p} AND value = {p}"
        )
        # The job tables. A job's values come from job_row, in JOB_COLUMNS' order.
        self.insert_job: Final = sql("INSERT INTO reencrypt_jobs ({jobs}) VALUES ({job_values})")
        self.select_job: Final = sql("SELECT {jobs} FROM reencrypt_jobs WHERE job_id = {p}")
        self.active_job: Final = sql(
            "SELECT {jobs} FROM reencrypt_jobs WHERE state IN ('running', 'paused')"
            " ORDER BY created_at DESC, {job_order} DESC LIMIT 1"
        )
        self.latest_job: Final = sql(
            "SELECT {jobs} FROM reencrypt_jobs ORDER BY created_at DESC, {job_order} DESC LIMIT 1"
        )
        self.set_job_state: Final = sql(
            "UPDATE reencrypt_jobs SET state = {p}, updated_at = {p} WHERE job_id = {p}"
        )
        self.add_job_counts: Final = sql(
            "UPDATE reencrypt_jobs SET completed = completed + {p}, failed = failed + {p},"
            " updated_at = {p} WHERE job_id = {p}"
        )
        # A field that fails twice in one job is recorded once, with its first error.
        self.insert_failure: Final = sql(
            "INSERT INTO reencrypt_failures (job_id, canonical_key, error) VALUES ({p}, {p}, {p})"
            " ON CONFLICT (job_id, canonical_key) DO NOTHING"
        )
        self.failures: Final = sql(
            "SELECT canonical_key, error FROM reencrypt_failures WHERE job_id = {p}"
            " ORDER BY canonical_key"
        )

    def field_filter(
        self,
        encryption_version: str | None,
        key_version_below: int | None,
        key_name: str | None = None,
    ) -> tuple[list[str], list[object]]:
        """WHERE clauses (constant SQL) and their bound parameters for the optional filters of
        ``count_fields`` and ``iter_fields``."""
        clauses: list[str] = []
        params: list[object] = []
        if encryption_version is not None:
            clauses.append(f"encryption_version = {self._placeholder}")
            params.append(encryption_version)
        if key_name is not None:
            clauses.append(f"key_name = {self._placeholder}")
            params.append(key_name)
        if key_version_below is not None:
            clauses.append(f"key_version < {self._placeholder}")
            params.append(key_version_below)
        return clauses, params

    def count_fields(self, clauses: list[str]) -> str:
        """``count_fields`` under *clauses* from :meth:`field_filter`."""
        # The clauses are constant SQL; values are bound.
        return "SELECT count(*) FROM field_values" + _where(clauses)  # noqa: S608

    def page(self, clauses: list[str], *, resume: bool) -> str:
        """One keyset page of ``iter_fields`` under *clauses* from :meth:`field_filter`.
        Parameters: the filter values, then (if *resume*) the last key already yielded, then
        the page size."""
        p = self._placeholder
        if resume:
            clauses = [*clauses, f"canonical_key > {p}"]
        # The clauses are constant SQL; values are bound.
        return (
            f"SELECT {self._field_columns} FROM field_values"  # noqa: S608
            + _where(clauses)
            + f" ORDER BY canonical_key LIMIT {p}"
        )

    def pages(
        self,
        clauses: list[str],
        params: list[object],
        batch_size: int,
        fetch_all: FetchAll,
    ) -> Iterator[list[FieldValue]]:
        """``iter_fields``: non-empty batches of the FieldValues matching *clauses* (with their
        *params*), in canonical_key order. Each batch is one call of *fetch_all*, resuming after
        the last key yielded (keyset pagination), so no lock or transaction need be held between
        batches. Raises ValueError at once for a batch_size below 1."""
        first_sql = self.page(clauses, resume=False)
        next_sql = self.page(clauses, resume=True)

        def page(after: str | None) -> list[FieldValue]:
            sql, values = (first_sql, params) if after is None else (next_sql, [*params, after])
            return [field_from_row(row) for row in fetch_all(sql, [*values, batch_size])]

        return keyset_pages(page, batch_size)
