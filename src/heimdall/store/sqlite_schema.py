"""The SQLite store's schema, the forward-only migrations that build it, and the SQL text
that follows from its layout, for the store and its job state alike.

``MIGRATIONS`` is append-only: version n is ``MIGRATIONS[n - 1]``, and each applied version is
recorded in ``schema_migrations``. :func:`migrate` runs inside the store's write transaction
(``BEGIN IMMEDIATE``), so processes opening one file together migrate it once; a database at a
newer version than this module knows is refused.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from heimdall.errors import StorageError
from heimdall.store.sql import SqlStatements

__all__ = [
    "COMPARE_AND_SWAP_FIELD",
    "FIELD_COLUMNS",
    "JOB_TABLES",
    "MIGRATIONS",
    "SQL",
    "is_current",
    "migrate",
]

# The field_values columns a FieldValue is read from, in field_from_row's order.
FIELD_COLUMNS: Final = (
    "canonical_key, field_name, encrypted_data, is_encrypted, key_version,"
    " encryption_version, dek_id, updated_at"
)
# A field's new envelope properties, written only while its envelope is still the one expected
# (parameters in swap_params' order). is_encrypted is not touched.
COMPARE_AND_SWAP_FIELD: Final = """
    UPDATE field_values
    SET encrypted_data = ?, key_version = ?, encryption_version = ?, dek_id = ?, updated_at = ?
    WHERE canonical_key = ? AND encrypted_data = ?
"""
# The statements shared with the PostgreSQL store. rowid orders jobs created within a second.
SQL: Final = SqlStatements(placeholder="?", field_columns=FIELD_COLUMNS, job_order="rowid")

# The key name in a kms_v1 envelope's header, as heimdall.envelope lays it out (by position:
# no envelope can make it fail), for migration 4. SQLite has no regular expressions, so this is
# PostgreSQL's KEY_NAME_PATTERN spelled out: the key_identifier follows the fixed start of the
# header, and loses its -v<N>; NULL when there is none of that form. Never change it.
_HEADER_START: Final = '{"encryption_version":"kms_v1","algorithm":"'
_AFTER_ALGORITHM: Final = '","key_identifier":"'
_IDENTIFIER_ON: Final = (
    f"substr(encrypted_data, instr(encrypted_data, '{_AFTER_ALGORITHM}') + {len(_AFTER_ALGORITHM)})"
)
_IDENTIFIER: Final = f"substr({_IDENTIFIER_ON}, 1, instr({_IDENTIFIER_ON}, '\"') - 1)"
_WITHOUT_NUMBER: Final = f"rtrim({_IDENTIFIER}, '0123456789')"
_KEY_NAME: Final = (
    f"CASE WHEN substr(encrypted_data, 1, {len(_HEADER_START)}) = '{_HEADER_START}'"
    f" AND instr(encrypted_data, '{_AFTER_ALGORITHM}') > 0"
    f" AND substr({_WITHOUT_NUMBER}, -2) = '-v'"
    f" AND length({_WITHOUT_NUMBER}) < length({_IDENTIFIER})"
    f" THEN substr({_WITHOUT_NUMBER}, 1, length({_WITHOUT_NUMBER}) - 2) END"
)

# The re-encryption job's state (heimdall.store.jobs): migration 2.
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

# Each migration is a sequence of single statements rather than one script, because
# Connection.executescript commits first and so cannot run inside the migration transaction.
# Append only: never edit or reorder an entry once released. Version n is MIGRATIONS[n - 1].
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE field_values (
            canonical_key      TEXT PRIMARY KEY,
            field_name         TEXT NOT NULL,
            encrypted_data     TEXT NOT NULL,
            is_encrypted       INTEGER NOT NULL CHECK (is_encrypted IN (0, 1)),
            key_version        INTEGER NOT NULL,
            encryption_version TEXT NOT NULL,
            dek_id             TEXT NOT NULL,
            created_at         TEXT NOT NULL,
            updated_at         TEXT NOT NULL
        )
        """,
        # Deliberately not (encryption_version, key_version, canonical_key). SQLite appends the
        # rowid to every index entry, so this index still covers count_fields and field_counts,
        # and a new row lands at the end of its (encryption_version, key_version) run rather
        # than at a random hashed canonical_key: ingest of 300k field values wrote a third
        # fewer bytes and ran 1.6x faster. iter_fields does not use it either way (_field_filter).
        "CREATE INDEX field_values_by_version ON field_values (encryption_version, key_version)",
        "CREATE INDEX field_values_by_dek ON field_values (dek_id)",
        """
        CREATE TABLE sightings (
            id            INTEGER PRIMARY KEY,
            canonical_key TEXT NOT NULL REFERENCES field_values (canonical_key),
            record_id     TEXT NOT NULL,
            source        TEXT NOT NULL,
            seen_at       TEXT NOT NULL
        )
        """,
        "CREATE INDEX sightings_by_key ON sightings (canonical_key)",
        """
        CREATE TABLE records (
            record_id   TEXT PRIMARY KEY,
            source      TEXT NOT NULL,
            ingested_at TEXT NOT NULL,
            attributes  TEXT NOT NULL
        )
        """,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    JOB_TABLES,
    # One sighting per (canonical_key, record_id, source): a database written before this
    # version may hold repeats from a re-run ingest. Of each group the earliest seen_at stays
    # (the first written, id, among equal times), then the unique index makes write_batch's
    # ON CONFLICT DO NOTHING possible. Its leading column serves count_sightings and the
    # foreign key, so the index on canonical_key alone goes: one index per sighting to write.
    (
        """
        DELETE FROM sightings WHERE id IN (
            SELECT id FROM (
                SELECT id, row_number() OVER (
                    PARTITION BY canonical_key, record_id, source ORDER BY seen_at, id
                ) AS position
                FROM sightings
            )
            WHERE position > 1
        )
        """,
        """
        CREATE UNIQUE INDEX sightings_by_key_record_source
            ON sightings (canonical_key, record_id, source)
        """,
        "DROP INDEX sightings_by_key",
    ),
    # The key each field is wrapped under, without its version: key_name, as on PostgreSQL
    # (see postgres_schema's migration 4, and _KEY_NAME above). A virtual column, the only kind
    # ALTER TABLE can add: computed when read, and kept in the index, which takes over from
    # field_values_by_version (its leading column still serves every count by
    # encryption_version).
    (
        "ALTER TABLE field_values ADD COLUMN key_name TEXT"
        f" GENERATED ALWAYS AS ({_KEY_NAME}) VIRTUAL",
        """
        CREATE INDEX field_values_by_key
            ON field_values (encryption_version, key_name, key_version)
        """,
        "DROP INDEX field_values_by_version",
        "ALTER TABLE reencrypt_jobs ADD COLUMN target_key TEXT",
    ),
    # Service tokens (heimdall.store.tokens): the SHA-256 of each token, never the token, found
    # through its unique index; names unique for ever, revoked tokens included.
    (
        """
        CREATE TABLE service_tokens (
            token_id   TEXT PRIMARY KEY,
            name       TEXT NOT NULL,
            role       TEXT NOT NULL,
            token_hash TEXT NOT NULL CHECK (length(token_hash) = 64),
            created_at TEXT NOT NULL,
            expires_at TEXT,
            revoked_at TEXT,
            created_by TEXT NOT NULL,
            revoked_by TEXT
        )
        """,
        "CREATE UNIQUE INDEX service_tokens_by_hash ON service_tokens (token_hash)",
        "CREATE UNIQUE INDEX service_tokens_by_name ON service_tokens (name)",
    ),
)

_CREATE_MIGRATIONS_TABLE: Final = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version    INTEGER PRIMARY KEY,
        applied_at TEXT NOT NULL
    )
"""


def _applied_versions(conn: sqlite3.Connection) -> set[int]:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if exists is None:
        return set()
    return {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}


def is_current(conn: sqlite3.Connection) -> bool:
    """Whether every migration is applied (read without taking the write lock)."""
    return _applied_versions(conn) == set(range(1, len(MIGRATIONS) + 1))


def migrate(conn: sqlite3.Connection, now: str) -> None:
    """Apply the missing migrations; *conn* is in a write transaction."""
    applied = _applied_versions(conn)
    newest = max(applied, default=0)
    if newest > len(MIGRATIONS):
        raise StorageError(
            f"sqlite open failed: schema version {newest} is newer than this heimdall"
            f" supports ({len(MIGRATIONS)})"
        )
    conn.execute(_CREATE_MIGRATIONS_TABLE)
    for version, statements in enumerate(MIGRATIONS, start=1):
        if version in applied:
            continue
        for statement in statements:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", (version, now)
        )
