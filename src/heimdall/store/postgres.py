"""The GraphStore on PostgreSQL, with psycopg 3 and a psycopg_pool connection pool.

spec: Envelope Encryption Architecture, Storage in Apache AGE. The node model as plain tables:
``field_values`` keeps each FieldValue's properties in one ``jsonb`` column, ``properties``;
``sightings`` (linked to their FieldValue by a foreign key), ``records`` and ``meta`` beside it.

Invariants:

* ``properties`` is the only copy of a FieldValue's properties. ``encryption_version``,
  ``key_version`` and ``dek_id`` are STORED generated columns derived from it, so the indexes on
  them can never disagree with it.
* ``encrypted_data`` is a JSON *string* inside ``properties``. jsonb keeps a string's characters
  exactly, so ``get_field`` returns, and ``compare_and_swap`` compares, the very text written
  (the envelope as a parsed object would lose its key order and spacing).
* ``records.attributes`` is jsonb too. jsonb keeps JSON types, but prints numbers in plain
  notation: a float with an integral value of 1e16 or more (``1e+16``) reads back as an int.
* Keys and versions sort bytewise (``COLLATE "C"``) whatever the database's locale: pages come in
  the same order as on SQLite, and comparisons are plain memcmp.
* Every write is one transaction. ``write_batch`` is all or nothing: a sighting whose
  canonical_key has no FieldValue fails the foreign key and rolls the whole batch back. It
  inserts field values, sightings and records in key order, so concurrent batches sharing keys
  wait for each other instead of deadlocking.
* Sightings are idempotent: one row per (canonical_key, record_id, source), held by a unique
  index. Writing a sighting again, as a re-run ingest does, changes nothing, so its seen_at
  stays the time first written (a graph MERGE's ON CREATE).
* The schema only moves forward (:mod:`heimdall.store.postgres_schema`): migrations are
  append-only and recorded in ``schema_migrations``, applied on open under an advisory lock;
  a newer schema than this module knows is refused.
* No psycopg exception leaves this module. Each becomes a one-line :class:`StorageError` naming
  the operation and the SQLSTATE; the server's own text is never copied into it (a constraint
  violation's DETAIL can quote a whole row). The psycopg exception is kept as ``__cause__``.
  Only a connection that fails at open is described by libpq's reason, which holds no data.
* Thread-safe: each call borrows a connection from the pool for its own duration only, so no
  lock or transaction is held between two calls, nor between two pages of ``iter_fields``.
  Pooled connections are not pinged before use (a round trip per call): after a server restart
  each stale connection fails the one call that meets it, and the pool replaces it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Final

try:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "heimdall.store.postgres needs the postgres extra: pip install 'heimdall[postgres]'"
    ) from exc

from heimdall.errors import StorageError
from heimdall.store.base import (
    FieldCount,
    FieldUpdate,
    FieldValue,
    RecordRow,
    Sighting,
    attributes_json,
    field_count,
    field_from_row,
    swap_params,
    utc_now,
)
from heimdall.store.postgres_jobs import PostgresJobs
from heimdall.store.postgres_schema import COMPARE_AND_SWAP_FIELD, FIELD_COLUMNS, SQL, migrate
from heimdall.store.postgres_tokens import PostgresTokens

__all__ = ["PostgresStore"]

_CONNECT_TIMEOUT_SECONDS: Final = 10
_POOL_TIMEOUT_SECONDS: Final = 30.0

# A batch's FieldValues are COPied here, then inserted with one INSERT ... SELECT: COPY is the
# fastest way in, and only INSERT has ON CONFLICT. Created on first use in each session (a
# transaction-pooling proxy may hand each batch another one); ON COMMIT DELETE ROWS empties it.
_CREATE_INCOMING: Final = """
    CREATE TEMPORARY TABLE IF NOT EXISTS heimdall_incoming_fields (
        canonical_key text, field_name text, encrypted_data text, is_encrypted boolean,
        key_version bigint, encryption_version text, dek_id text, written_at text
    ) ON COMMIT DELETE ROWS
"""
_COPY_INCOMING: Final = "COPY pg_temp.heimdall_incoming_fields FROM STDIN"
# ON CONFLICT (canonical_key) DO NOTHING: first writer wins, but a NOT NULL or CHECK violation
# still fails the batch instead of silently dropping the row. Duplicates within the batch are
# removed before the COPY, so the row count is the number of FieldValues this batch created.
# ORDER BY: an insert waits for another transaction's uncommitted row with the same key, so two
# batches sharing keys must take them in one order, or each waits for the other (deadlock).
_INSERT_INCOMING: Final = """
    INSERT INTO field_values (canonical_key, field_name, properties)
    SELECT canonical_key, field_name, jsonb_build_object(
        'encrypted_data', encrypted_data, 'is_encrypted', is_encrypted,
        'key_version', key_version, 'encryption_version', encryption_version, 'dek_id', dek_id,
        'created_at', written_at, 'updated_at', written_at)
    FROM pg_temp.heimdall_incoming_fields
    ORDER BY canonical_key COLLATE "C"
    ON CONFLICT (canonical_key) DO NOTHING
"""
# Sightings take the same way in, COPY to a temporary table then INSERT ... ON CONFLICT, which
# skips one already stored (it keeps its first seen_at). Repeats within the batch are removed
# before the COPY. ORDER BY, bytewise on the unique index's columns, for the same reason as
# _INSERT_INCOMING: an insert waits for another transaction's uncommitted equal sighting.
_CREATE_INCOMING_SIGHTINGS: Final = """
    CREATE TEMPORARY TABLE IF NOT EXISTS heimdall_incoming_sightings (
        canonical_key text, record_id text, source text, seen_at text
    ) ON COMMIT DELETE ROWS
"""
_COPY_INCOMING_SIGHTINGS: Final = "COPY pg_temp.heimdall_incoming_sightings FROM STDIN"
_INSERT_INCOMING_SIGHTINGS: Final = """
    INSERT INTO sightings (canonical_key, record_id, source, seen_at)
    SELECT canonical_key, record_id, source, seen_at
    FROM pg_temp.heimdall_incoming_sightings
    ORDER BY canonical_key COLLATE "C", record_id COLLATE "C", source COLLATE "C"
    ON CONFLICT (canonical_key, record_id, source) DO NOTHING
"""
# In record_id order, for the same reason as _INSERT_INCOMING: an upsert locks the row it replaces.
_UPSERT_RECORDS: Final = """
    INSERT INTO records (record_id, source, ingested_at, attributes)
    SELECT record_id, source, ingested_at, attributes::jsonb
    FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[])
        AS incoming (record_id, source, ingested_at, attributes)
    ORDER BY record_id COLLATE "C"
    ON CONFLICT (record_id) DO UPDATE SET
        source = excluded.source, ingested_at = excluded.ingested_at,
        attributes = excluded.attributes
"""

# The FieldValues of a batch of keys, through the primary key's index.
_GET_FIELDS: Final = (
    f"SELECT {FIELD_COLUMNS} FROM field_values WHERE canonical_key = ANY(%s::text[])"  # noqa: S608
)

# Readable causes for the SQLSTATEs a caller can provoke; the rest are reported by name and code.
_EXPLANATIONS: Final = {
    "23503": "a sighting names a canonical_key that has no FieldValue",
    "40P01": "deadlock with another transaction",
    "42501": "the database user lacks a privilege this store needs",
    "53300": "the server has no free connection slot",
    "57014": "the statement was cancelled or timed out",
}


def _storage_error(operation: str, exc: psycopg.Error) -> StorageError:
    if isinstance(exc, PoolClosed):
        reason = "the store is closed"
    elif isinstance(exc, PoolTimeout):
        reason = "no pooled connection became free in time"
    elif exc.sqlstate:
        reason = _EXPLANATIONS.get(exc.sqlstate, f"{type(exc).__name__} (SQLSTATE {exc.sqlstate})")
    elif isinstance(exc, psycopg.OperationalError):
        reason = "the connection to the server failed or was lost"
    elif isinstance(exc, psycopg.DataError):
        # Raised by psycopg before sending: its own text, not the value.
        reason = "a value cannot be sent to PostgreSQL (text holding a NUL character?)"
    else:
        reason = type(exc).__name__
    return StorageError(f"postgres {operation} failed: {reason}")


def _connect_error(exc: psycopg.OperationalError) -> StorageError:
    # A failed connection has sent no data, and libpq's reason (refused, no such database,
    # authentication failed) is what an operator needs; it never repeats the password.
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return StorageError(f"postgres open failed: {reason}")


# The filters and a keyset page of iter_fields, as SQL.pages builds it. No index hint is needed
# here: field_values_by_version_and_key hands out one encryption_version's rows in canonical_key
# order (see postgres_schema).
_field_filter: Final = SQL.field_filter
_page_sql: Final = SQL.page


def _connect_options(params: dict[str, Any]) -> dict[str, Any]:
    """Options every connection gets: autocommit (transactions here are explicit), and a
    connect timeout unless the DSN sets one."""
    options: dict[str, Any] = {"autocommit": True, "application_name": "heimdall"}
    if "connect_timeout" not in params:
        options["connect_timeout"] = _CONNECT_TIMEOUT_SECONDS
    if "application_name" in params:
        del options["application_name"]
    return options


class PostgresStore(PostgresJobs, PostgresTokens):
    """A :class:`~heimdall.store.base.GraphStore` in one PostgreSQL database.

    ``dsn`` is a libpq connection string or URI; ``pool_size`` caps the connections this store
    holds open (at least one is kept). Construction connects, applies any pending migration and
    fills the pool, raising :class:`StorageError` if any of it fails.
    """

    def __init__(self, dsn: str, *, pool_size: int = 8) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error:
            # libpq's parse error can quote the DSN, password included: neither it nor its
            # text goes on (so no __cause__ here).
            raise StorageError(
                "postgres open failed: the DSN is not a valid connection string"
            ) from None
        # For repr: where the data lives, never the password or other options.
        self._target = {
            k: str(params[k]) for k in ("host", "port", "dbname", "user") if k in params
        }
        self._lock = threading.Lock()
        self._closed = False
        options = _connect_options(params)
        try:
            with psycopg.connect(dsn, **options) as conn:
                self._configure(conn)
                migrate(conn)
                self._migrated(conn)
        except psycopg.OperationalError as exc:
            if exc.sqlstate is None:
                raise _connect_error(exc) from exc
            raise _storage_error("open", exc) from exc
        except psycopg.Error as exc:
            raise _storage_error("open", exc) from exc
        self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            kwargs=options,
            configure=self._configure,
            open=False,
            name="heimdall-store",
            timeout=_POOL_TIMEOUT_SECONDS,
        )
        try:
            self._pool.open(wait=True, timeout=_CONNECT_TIMEOUT_SECONDS)
        except psycopg.Error as exc:
            self._pool.close()
            raise StorageError(
                f"postgres open failed: the pool made no connection in {_CONNECT_TIMEOUT_SECONDS} s"
            ) from exc

    def __repr__(self) -> str:
        target = ", ".join(f"{k}={v!r}" for k, v in self._target.items())
        return f"{type(self).__name__}({target})"

    # -- for a store built on this one (heimdall.store.age) -------------------------------------

    def _configure(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        """Prepare a new connection, the pool's too, before its first use. Nothing here."""

    def _migrated(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        """Once at open, after the migrations, on their connection. Nothing here."""

    # -- connection plumbing -------------------------------------------------------------------

    @contextmanager
    def _connection(self, operation: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A pooled connection for one call, with psycopg errors translated."""
        if self._closed:
            raise StorageError(f"postgres {operation} failed: the store is closed")
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise _storage_error(operation, exc) from exc
        except UnicodeEncodeError as exc:
            # A str with a lone surrogate cannot be sent. Its message gives only a position.
            raise StorageError(
                f"postgres {operation} failed: a value is not encodable as UTF-8"
            ) from exc

    @contextmanager
    def _transaction(self, operation: str) -> Iterator[psycopg.Cursor[tuple[Any, ...]]]:
        """A cursor in a transaction: committed if the block completes, rolled back otherwise."""
        with self._connection(operation) as conn, conn.transaction(), conn.cursor() as cursor:
            yield cursor

    def _fetch_one(self, operation: str, query: str, params: Sequence[object]) -> Any:
        with self._connection(operation) as conn:
            return conn.execute(query, params).fetchone()

    def _fetch_all(self, operation: str, query: str, params: Sequence[object] = ()) -> list[Any]:
        with self._connection(operation) as conn:
            return conn.execute(query, params).fetchall()

    def _rowcount(self, operation: str, query: str, params: Sequence[object]) -> int:
        with self._connection(operation) as conn:
            return conn.execute(query, params).rowcount

    # -- GraphStore ----------------------------------------------------------------------------

    def existing_keys(self, canonical_keys: Sequence[str]) -> set[str]:
        unique = list(dict.fromkeys(canonical_keys))
        if not unique:
            return set()
        with self._connection("existing_keys") as conn:
            rows = conn.execute(
                "SELECT canonical_key FROM field_values WHERE canonical_key = ANY(%s::text[])",
                (unique,),
            ).fetchall()
        return {row[0] for row in rows}

    def write_batch(
        self,
        field_values: Sequence[FieldValue],
        sightings: Sequence[Sighting],
        records: Sequence[RecordRow],
    ) -> int:
        """Write all three in one transaction; returns the number of FieldValues inserted.

        A FieldValue's created_at and updated_at are its own updated_at when set (a copy from
        another store keeps its history), otherwise the time of this write. Of two FieldValues
        with one canonical_key in a batch the first is kept; of two sightings of one
        (canonical_key, record_id, source), the first; of two records, the last. A sighting
        already stored is skipped and keeps its first seen_at.
        """
        now = utc_now()
        firsts: dict[str, FieldValue] = {}
        for f in field_values:
            firsts.setdefault(f.canonical_key, f)
        field_rows = [
            (
                f.canonical_key,
                f.field_name,
                f.encrypted_data,
                f.is_encrypted,
                f.key_version,
                f.encryption_version,
                f.dek_id,
                f.updated_at or now,
            )
            for f in firsts.values()
        ]
        sighting_rows = _first_sightings(sightings)
        record_columns = _record_columns(records)
        inserted = 0
        with self._transaction("write_batch") as cursor:
            if field_rows:
                cursor.execute(_CREATE_INCOMING)
                with cursor.copy(_COPY_INCOMING) as copy:
                    for field_row in field_rows:
                        copy.write_row(field_row)
                inserted = cursor.execute(_INSERT_INCOMING).rowcount
            if sighting_rows:
                cursor.execute(_CREATE_INCOMING_SIGHTINGS)
                with cursor.copy(_COPY_INCOMING_SIGHTINGS) as copy:
                    for sighting_row in sighting_rows:
                        copy.write_row(sighting_row)
                cursor.execute(_INSERT_INCOMING_SIGHTINGS)
            if record_columns:
                cursor.execute(_UPSERT_RECORDS, record_columns)
        return inserted

    def get_field(self, canonical_key: str) -> FieldValue | None:
        row = self._fetch_one("get_field", SQL.get_field, (canonical_key,))
        return None if row is None else field_from_row(row)

    def get_fields(self, canonical_keys: Sequence[str]) -> dict[str, FieldValue]:
        """One query, the keys bound as one array (PostgreSQL has no cap to chunk around)."""
        unique = list(dict.fromkeys(canonical_keys))
        if not unique:
            return {}
        rows = self._fetch_all("get_fields", _GET_FIELDS, (unique,))
        fields = (field_from_row(row) for row in rows)
        return {field.canonical_key: field for field in fields}

    def count_sightings(self, canonical_key: str) -> int:
        return int(self._fetch_one("count_sightings", SQL.count_sightings, (canonical_key,))[0])

    def field_counts(self) -> list[FieldCount]:
        rows = self._fetch_all("field_counts", SQL.field_counts)
        return [field_count(row) for row in rows]

    def key_names(self) -> list[str]:
        return [str(name) for (name,) in self._fetch_all("key_names", SQL.key_names)]

    def count_fields(
        self,
        *,
        encryption_version: str | None = None,
        key_version_below: int | None = None,
        key_name: str | None = None,
    ) -> int:
        clauses, params = _field_filter(encryption_version, key_version_below, key_name)
        return int(self._fetch_one("count_fields", SQL.count_fields(clauses), params)[0])

    def iter_fields(
        self,
        *,
        encryption_version: str | None = None,
        key_version_below: int | None = None,
        batch_size: int = 500,
    ) -> Iterator[list[FieldValue]]:
        """Non-empty batches of matching FieldValues in canonical_key (byte) order.

        Each batch is one query resuming after the last key yielded (keyset pagination), and no
        connection or transaction is held between batches, so the caller may update the yielded
        fields, even out of the filter, without a field being skipped or yielded twice.
        """
        clauses, params = _field_filter(encryption_version, key_version_below)
        return SQL.pages(clauses, params, batch_size, partial(self._fetch_all, "iter_fields"))

    def compare_and_swap(
        self, canonical_key: str, expected_encrypted_data: str, update: FieldUpdate
    ) -> bool:
        """One conditional UPDATE; is_encrypted is not touched (FieldUpdate does not carry it)."""
        params = swap_params(canonical_key, expected_encrypted_data, update, utc_now())
        return self._rowcount("compare_and_swap", COMPARE_AND_SWAP_FIELD, params) == 1

    def get_meta(self, key: str) -> str | None:
        row = self._fetch_one("get_meta", SQL.get_meta, (key,))
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._rowcount("set_meta", SQL.set_meta, (key, value))

    def insert_meta_if_absent(self, key: str, value: str) -> bool:
        return self._rowcount("insert_meta_if_absent", SQL.insert_meta_if_absent, (key, value)) == 1

    def compare_and_swap_meta(self, key: str, expected: str, value: str) -> bool:
        params = (value, key, expected)
        return self._rowcount("compare_and_swap_meta", SQL.compare_and_swap_meta, params) == 1

    def close(self) -> None:
        """Close the pool. Idempotent; any later call raises StorageError."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._pool.close()


def _first_sightings(sightings: Sequence[Sighting]) -> list[tuple[str, str, str, str]]:
    """Rows of the sightings, the first of each (canonical_key, record_id, source) only, so
    which seen_at is kept does not hang on the order the INSERT meets the rows in."""
    firsts: dict[tuple[str, str, str], str] = {}
    for s in sightings:
        firsts.setdefault((s.canonical_key, s.record_id, s.source), s.seen_at)
    return [(*occurrence, seen_at) for occurrence, seen_at in firsts.items()]


def _record_columns(records: Sequence[RecordRow]) -> list[list[str]]:
    """The records as four parallel columns for unnest; the last of a repeated record_id wins
    (one INSERT ... ON CONFLICT DO UPDATE may not touch a row twice)."""
    lasts = {r.record_id: r for r in records}
    try:
        attributes = [attributes_json(r.attributes) for r in lasts.values()]
    except (TypeError, ValueError) as exc:
        raise StorageError(
            "postgres write_batch failed: record attributes are not finite JSON values"
        ) from exc
    if not lasts:
        return []
    return [
        [r.record_id for r in lasts.values()],
        [r.source for r in lasts.values()],
        [r.ingested_at for r in lasts.values()],
        attributes,
    ]
