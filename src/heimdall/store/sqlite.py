"""The GraphStore on one SQLite file, with the standard library's sqlite3 only.

Invariants:

* Every write is one transaction. ``write_batch`` is all or nothing: a sighting whose
  canonical_key has no FieldValue fails the foreign key and rolls the whole batch back.
* Sightings are idempotent: one row per (canonical_key, record_id, source), held by a unique
  index. Writing a sighting again, as a re-run ingest does, changes nothing, so its seen_at
  stays the time first written (a graph MERGE's ON CREATE).
* The database file is created with mode 0600 (SQLite gives its ``-wal`` and ``-shm`` files the
  mode of the database file), in a parent directory created 0700 if it did not exist.
* The schema only moves forward (:mod:`heimdall.store.sqlite_schema`): migrations are
  append-only and recorded in ``schema_migrations``, and a database recorded at a newer version
  than this module knows is refused rather than written with an older idea of the schema.
* No ``sqlite3`` exception leaves this module. Each becomes a one-line :class:`StorageError`
  naming the operation and SQLite's error code; values are always bound parameters, so neither
  that message nor SQLite's own (kept as ``__cause__``) can contain an envelope.
* One connection per instance, serialised by a lock so a progress thread cannot interleave with
  a transaction. Other processes on the same file are coordinated by WAL and the busy timeout.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Final

from heimdall.errors import StorageError
from heimdall.private_files import check_private_file, ensure_private_dir
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
from heimdall.store.sqlite_jobs import SqliteJobs
from heimdall.store.sqlite_schema import (
    COMPARE_AND_SWAP_FIELD,
    FIELD_COLUMNS,
    SQL,
    is_current,
    migrate,
)
from heimdall.store.sqlite_tokens import SqliteTokens

__all__ = ["SqliteStore"]

_BUSY_TIMEOUT_SECONDS: Final = 10.0
_CACHE_KIB: Final = 64 * 1024
_WAL_CHECKPOINT_PAGES: Final = 10_000

# Old SQLite builds cap bound parameters at 999 per statement.
_IN_CHUNK: Final = 500


# ON CONFLICT (canonical_key) DO NOTHING is INSERT OR IGNORE narrowed to the key conflict:
# first writer wins, but a NOT NULL or CHECK violation still fails the batch instead of
# silently dropping the row.
_INSERT_FIELD: Final = """
    INSERT INTO field_values (
        canonical_key, field_name, encrypted_data, is_encrypted, key_version,
        encryption_version, dek_id, created_at, updated_at
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (canonical_key) DO NOTHING
"""
# Narrowed to the (canonical_key, record_id, source) conflict like _INSERT_FIELD: a sighting
# already stored, or met earlier in the batch, keeps its first seen_at; a missing FieldValue
# still fails the foreign key and with it the batch.
_INSERT_SIGHTING: Final = """
    INSERT INTO sightings (canonical_key, record_id, source, seen_at) VALUES (?, ?, ?, ?)
    ON CONFLICT (canonical_key, record_id, source) DO NOTHING
"""
_REPLACE_RECORD: Final = """
    INSERT OR REPLACE INTO records (record_id, source, ingested_at, attributes)
    VALUES (?, ?, ?, ?)
"""

# Readable causes for the SQLite error codes a caller can provoke; the rest are reported by code.
_EXPLANATIONS: Final = {
    "SQLITE_CONSTRAINT_FOREIGNKEY": "a sighting names a canonical_key that has no FieldValue",
    "SQLITE_BUSY": "the database stayed locked by another writer past the busy timeout",
}


def _storage_error(operation: str, exc: sqlite3.Error) -> StorageError:
    # sqlite_errorname is None for errors the sqlite3 module raises itself.
    code = exc.sqlite_errorname or type(exc).__name__
    return StorageError(f"sqlite {operation} failed: {_EXPLANATIONS.get(code, code)}")


def _field_filter(
    encryption_version: str | None,
    key_version_below: int | None,
    key_name: str | None = None,
    *,
    walk_keys: bool,
) -> tuple[list[str], list[object]]:
    """WHERE clauses (constant SQL) and their bound parameters for the optional filters.

    With *walk_keys*, the filter columns are written ``+column``, which stops SQLite from
    using field_values_by_version. That index cannot return rows in canonical_key order under a
    ``key_version < ?`` range, so every page would sort all remaining matches (quadratic over a
    rotation); walking the primary key index from the cursor reads each row at most once in all.
    """
    clauses, params = SQL.field_filter(encryption_version, key_version_below, key_name)
    if walk_keys:
        clauses = ["+" + clause for clause in clauses]
    return clauses, params


# A keyset page of iter_fields under _field_filter's clauses, as SQL.pages builds it.
_page_sql: Final = SQL.page


def _create_private_file(path: Path) -> None:
    """Create *path* with mode 0600 unless it exists, before SQLite would create it 0644, and
    refuse it (or its -wal / -shm files) if another user could have planted or swapped it
    (see :mod:`heimdall.private_files`)."""
    try:
        if not path.parent.exists():
            ensure_private_dir(path.parent, "database directory")
        # Checked without opening: closing a descriptor of these files would drop the locks
        # of another connection this process has open on them (another store on this file).
        check_private_file(path, what="database file", create=True)
        for suffix in ("-wal", "-shm"):
            check_private_file(path.with_name(path.name + suffix), what="database file")
    except OSError as exc:
        raise StorageError(f"cannot create database file {path}: {exc.strerror}") from exc


class SqliteStore(SqliteJobs, SqliteTokens):
    """A :class:`~heimdall.store.base.GraphStore` in one SQLite database file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._closed = False
        _create_private_file(path)
        try:
            # isolation_level=None: no implicit transactions; every transaction here is explicit.
            self._conn = sqlite3.connect(
                path,
                timeout=_BUSY_TIMEOUT_SECONDS,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise _storage_error("open", exc) from exc
        try:
            self._configure()
            self._migrate()
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._path)!r})"

    # -- connection plumbing -------------------------------------------------------------------

    @contextmanager
    def _session(self, operation: str) -> Iterator[sqlite3.Connection]:
        """The connection, held under the lock, with sqlite3 errors translated."""
        with self._lock:
            if self._closed:
                raise StorageError(f"sqlite {operation} failed: the store is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise _storage_error(operation, exc) from exc

    @contextmanager
    def _transaction(self, operation: str) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed if the block completes, rolled back otherwise."""
        with self._session(operation) as conn:
            # IMMEDIATE takes the write lock up front, so a concurrent writer makes us wait in
            # the busy handler here instead of failing a lock upgrade halfway through.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    # A failed rollback must not hide the error that caused it.
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _configure(self) -> None:
        with self._session("open") as conn:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError("sqlite open failed: the file system does not support WAL")
            # NORMAL is durable across application crashes in WAL mode; only an OS crash or
            # power loss can lose the last commits, never corrupt the file.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # Hashed canonical keys make every index insert land on a random page, so one
            # ingest batch dirties thousands of pages. A 64 MiB cache keeps them from spilling
            # mid-transaction, and checkpointing every ~40 MiB of WAL instead of ~4 MiB writes a
            # page that several batches touched back to the database once, not once per batch.
            conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_CHECKPOINT_PAGES}")

    def _migrate(self) -> None:
        with self._session("open") as conn:
            if is_current(conn):
                # Up to date: skip the write lock, which a busy writer elsewhere may be holding.
                return
        with self._transaction("migrate") as conn:
            # Re-read under the write lock: another process may have migrated meanwhile.
            migrate(conn, utc_now())

    # -- GraphStore ----------------------------------------------------------------------------

    def existing_keys(self, canonical_keys: Sequence[str]) -> set[str]:
        unique = list(dict.fromkeys(canonical_keys))
        found: set[str] = set()
        with self._session("existing_keys") as conn:
            for start in range(0, len(unique), _IN_CHUNK):
                chunk = unique[start : start + _IN_CHUNK]
                # Only placeholders are interpolated; the keys themselves are bound.
                sql = (
                    "SELECT canonical_key FROM field_values WHERE canonical_key IN ("  # noqa: S608
                    + ", ".join("?" * len(chunk))
                    + ")"
                )
                found.update(row[0] for row in conn.execute(sql, chunk))
        return found

    def write_batch(
        self,
        field_values: Sequence[FieldValue],
        sightings: Sequence[Sighting],
        records: Sequence[RecordRow],
    ) -> int:
        """Write all three in one transaction; returns the number of FieldValues inserted.

        A FieldValue's created_at and updated_at are its own updated_at when set (a copy from
        another store keeps its history), otherwise the time of this write. A sighting already
        stored, or repeated earlier in the batch, is skipped and keeps its first seen_at.
        """
        now = utc_now()
        # Build every row before taking the lock, so the write lock is held for SQL only.
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
                f.updated_at or now,
            )
            for f in field_values
        ]
        sighting_rows = [(s.canonical_key, s.record_id, s.source, s.seen_at) for s in sightings]
        try:
            record_rows = [
                (r.record_id, r.source, r.ingested_at, attributes_json(r.attributes))
                for r in records
            ]
        except (TypeError, ValueError) as exc:
            raise StorageError(
                "sqlite write_batch failed: record attributes are not finite JSON values"
            ) from exc
        with self._transaction("write_batch") as conn:
            before = conn.total_changes
            conn.executemany(_INSERT_FIELD, field_rows)
            inserted = conn.total_changes - before
            conn.executemany(_INSERT_SIGHTING, sighting_rows)
            conn.executemany(_REPLACE_RECORD, record_rows)
        return inserted

    def get_field(self, canonical_key: str) -> FieldValue | None:
        with self._session("get_field") as conn:
            row = conn.execute(SQL.get_field, (canonical_key,)).fetchone()
        return None if row is None else field_from_row(row)

    def get_fields(self, canonical_keys: Sequence[str]) -> dict[str, FieldValue]:
        # In key order, so that each chunk reads one stretch of the index, not pages all over.
        unique = sorted(set(canonical_keys))
        rows: list[Any] = []
        with self._session("get_fields") as conn:
            for start in range(0, len(unique), _IN_CHUNK):
                chunk = unique[start : start + _IN_CHUNK]
                # Only placeholders are interpolated; the keys themselves are bound. Every full
                # chunk is the same text, so SQLite's statement cache prepares it once.
                sql = (
                    f"SELECT {FIELD_COLUMNS} FROM field_values"  # noqa: S608
                    f" WHERE canonical_key IN ({', '.join('?' * len(chunk))})"
                )
                rows.extend(conn.execute(sql, chunk).fetchall())
        return {row[0]: field_from_row(row) for row in rows}  # row[0] is the canonical_key

    def count_sightings(self, canonical_key: str) -> int:
        with self._session("count_sightings") as conn:
            row = conn.execute(SQL.count_sightings, (canonical_key,)).fetchone()
        return int(row[0])

    def field_counts(self) -> list[FieldCount]:
        with self._session("field_counts") as conn:
            rows = conn.execute(SQL.field_counts).fetchall()
        return [field_count(row) for row in rows]

    def key_names(self) -> list[str]:
        with self._session("key_names") as conn:
            rows = conn.execute(SQL.key_names).fetchall()
        return [str(name) for (name,) in rows]

    def count_fields(
        self,
        *,
        encryption_version: str | None = None,
        key_version_below: int | None = None,
        key_name: str | None = None,
    ) -> int:
        clauses, params = _field_filter(
            encryption_version, key_version_below, key_name, walk_keys=False
        )
        with self._session("count_fields") as conn:
            row = conn.execute(SQL.count_fields(clauses), params).fetchone()
        return int(row[0])

    def iter_fields(
        self,
        *,
        encryption_version: str | None = None,
        key_version_below: int | None = None,
        batch_size: int = 500,
    ) -> Iterator[list[FieldValue]]:
        """Non-empty batches of matching FieldValues in canonical_key order.

        Each batch is one query resuming after the last key yielded (keyset pagination), and no
        lock or transaction is held between batches, so the caller may update the yielded
        fields, even out of the filter, without a field being skipped or yielded twice.
        """
        clauses, params = _field_filter(encryption_version, key_version_below, walk_keys=True)

        def fetch_all(sql: str, values: list[object]) -> list[Any]:
            with self._session("iter_fields") as conn:
                return conn.execute(sql, values).fetchall()

        return SQL.pages(clauses, params, batch_size, fetch_all)

    def compare_and_swap(
        self, canonical_key: str, expected_encrypted_data: str, update: FieldUpdate
    ) -> bool:
        """One conditional UPDATE; is_encrypted is not touched (FieldUpdate does not carry it)."""
        with self._session("compare_and_swap") as conn:
            params = swap_params(canonical_key, expected_encrypted_data, update, utc_now())
            return conn.execute(COMPARE_AND_SWAP_FIELD, params).rowcount == 1

    def get_meta(self, key: str) -> str | None:
        with self._session("get_meta") as conn:
            row = conn.execute(SQL.get_meta, (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._session("set_meta") as conn:
            conn.execute(SQL.set_meta, (key, value))

    def insert_meta_if_absent(self, key: str, value: str) -> bool:
        with self._session("insert_meta_if_absent") as conn:
            return conn.execute(SQL.insert_meta_if_absent, (key, value)).rowcount == 1

    def compare_and_swap_meta(self, key: str, expected: str, value: str) -> bool:
        with self._session("compare_and_swap_meta") as conn:
            return conn.execute(SQL.compare_and_swap_meta, (value, key, expected)).rowcount == 1

    def close(self) -> None:
        """Close the connection. Idempotent; any later call raises StorageError."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()
