"""The PostgreSQL store's schema, the forward-only migrations that build it, and the SQL text
that follows from its layout, for the store and its job state alike.

``MIGRATIONS`` is append-only: version n is ``MIGRATIONS[n - 1]``, each applied version is
recorded in ``schema_migrations``, and :func:`migrate` applies the missing ones in one
transaction under a transaction-scoped advisory lock, so processes starting together migrate
one after the other. A database at a newer version than this module knows is refused.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg

from heimdall.errors import StorageError
from heimdall.store.sql import SqlStatements

__all__ = [
    "COMPARE_AND_SWAP_FIELD",
    "FIELD_COLUMNS",
    "JOB_TABLES",
    "KEY_NAME_PATTERN",
    "MIGRATIONS",
    "SQL",
    "key_name_of",
    "migrate",
]

# pg_advisory_xact_lock key serialising migrations: the bytes of "heimdall" as a bigint.
_MIGRATION_LOCK: Final = int.from_bytes(b"heimdall", "big")

# The key name (a POSIX regular expression's group) in a kms_v1 envelope's header, as
# heimdall.envelope lays it out: see migration 4. Never change it: it is part of that migration.
KEY_NAME_PATTERN: Final = (
    r'^\{"encryption_version":"kms_v1","algorithm":"[^"]*","key_identifier":"([^"]*)-v[0-9]+",'
)

# The same key name found by splitting the envelope at its quotes instead: the header as
# heimdall.envelope lays it out, compared part by part, the identifier (a part of its own) then
# matched alone. The same result as KEY_NAME_PATTERN for every text (tests/test_store_age.py
# compares the two on generated envelopes), some twenty times cheaper: PostgreSQL's regular
# expression engine takes about 80 microseconds for the whole pattern on an envelope, which
# every written and every rewrapped field paid in migration 4's column (see migration 6).
_KMS_V1_HEADER: Final = '{"encryption_version":"kms_v1","algorithm":"'


def key_name_of(envelope: str) -> str:
    """SQL for the key name of the envelope text *envelope* (an SQL expression), or NULL."""

    def part(n: int) -> str:
        return f"split_part({envelope}, '\"', {n})"

    return (
        f"(CASE WHEN starts_with({envelope}, '{_KMS_V1_HEADER}') AND {part(9)} = ','"
        f" AND {part(10)} = 'key_identifier' AND {part(11)} = ':'"
        f" AND starts_with({part(13)}, ',')"
        f" THEN substring({part(12)} FROM '^(.*)-v[0-9]+$') END COLLATE \"C\")"
    )


# A FieldValue's columns, in field_from_row's order: the envelope is the JSON string's exact text.
FIELD_COLUMNS: Final = (
    "canonical_key, field_name, properties ->> 'encrypted_data',"
    " (properties -> 'is_encrypted')::boolean, key_version, encryption_version, dek_id,"
    " properties ->> 'updated_at'"
)
# A field's new envelope properties, written only while its envelope is still the one expected
# (parameters in swap_params' order). is_encrypted is not touched.
COMPARE_AND_SWAP_FIELD: Final = """
    UPDATE field_values
    SET properties = properties || jsonb_build_object(
        'encrypted_data', %s::text, 'key_version', %s::bigint,
        'encryption_version', %s::text, 'dek_id', %s::text, 'updated_at', %s::text)
    WHERE canonical_key = %s AND properties ->> 'encrypted_data' = %s
"""
# The statements shared with the SQLite store. seq orders jobs created within the same second.
SQL: Final = SqlStatements(placeholder="%s", field_columns=FIELD_COLUMNS, job_order="seq")

# The re-encryption job's state (heimdall.store.jobs): migration 2. Timestamps are text in the
# store's YYYY-MM-DDTHH:MM:SSZ form, as on SQLite; seq stands in for SQLite's rowid.
JOB_TABLES: Final = (
    """
    CREATE TABLE reencrypt_jobs (
        job_id         text COLLATE "C" PRIMARY KEY,
        kind           text NOT NULL,
        target_version bigint NOT NULL,
        include_legacy boolean NOT NULL,
        state          text NOT NULL,
        total          bigint NOT NULL,
        completed      bigint NOT NULL DEFAULT 0,
        failed         bigint NOT NULL DEFAULT 0,
        created_at     text NOT NULL,
        updated_at     text NOT NULL,
        seq            bigint GENERATED ALWAYS AS IDENTITY UNIQUE
    )
    """,
    # COLLATE "C" like field_values.canonical_key, so the anti-join compares plain bytes and
    # can probe this primary key.
    """
    CREATE TABLE reencrypt_failures (
        job_id        text COLLATE "C" NOT NULL REFERENCES reencrypt_jobs (job_id),
        canonical_key text COLLATE "C" NOT NULL,
        error         text NOT NULL,
        PRIMARY KEY (job_id, canonical_key)
    )
    """,
)

# Append only: never edit or reorder an entry once released. Version n is MIGRATIONS[n - 1].
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE field_values (
            canonical_key      text COLLATE "C" PRIMARY KEY,
            field_name         text NOT NULL,
            properties         jsonb NOT NULL CONSTRAINT field_values_properties_types CHECK (
                jsonb_typeof(properties -> 'encrypted_data') = 'string'
                AND jsonb_typeof(properties -> 'is_encrypted') = 'boolean'
                AND jsonb_typeof(properties -> 'key_version') = 'number'
                AND jsonb_typeof(properties -> 'encryption_version') = 'string'
                AND jsonb_typeof(properties -> 'dek_id') = 'string'
                AND jsonb_typeof(properties -> 'created_at') = 'string'
                AND jsonb_typeof(properties -> 'updated_at') = 'string'
            ),
            encryption_version text COLLATE "C" NOT NULL
                GENERATED ALWAYS AS (properties ->> 'encryption_version') STORED,
            key_version        bigint NOT NULL
                GENERATED ALWAYS AS ((properties ->> 'key_version')::bigint) STORED,
            dek_id             text COLLATE "C" NOT NULL
                GENERATED ALWAYS AS (properties ->> 'dek_id') STORED
        )
        """,
        # Counts by version (count_fields, field_counts). B-tree deduplication makes this index
        # tiny: a few distinct keys, each with a list of row pointers.
        "CREATE INDEX field_values_by_version ON field_values (encryption_version, key_version)",
        # iter_fields pages for one encryption_version. canonical_key second, not last: with
        # encryption_version fixed the index hands out rows in canonical_key order and tests
        # key_version < N inside the index, so a page reads from its cursor to its last row and
        # sorts nothing. Ordered (encryption_version, key_version, canonical_key), a page under
        # a key_version range would have to read and sort every remaining match.
        """
        CREATE INDEX field_values_by_version_and_key
            ON field_values (encryption_version, canonical_key, key_version)
        """,
        "CREATE INDEX field_values_by_dek ON field_values (dek_id)",
        """
        CREATE TABLE sightings (
            id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            canonical_key text COLLATE "C" NOT NULL REFERENCES field_values (canonical_key),
            record_id     text NOT NULL,
            source        text NOT NULL,
            seen_at       text NOT NULL
        )
        """,
        "CREATE INDEX sightings_by_key ON sightings (canonical_key)",
        """
        CREATE TABLE records (
            record_id   text PRIMARY KEY,
            source      text NOT NULL,
            ingested_at text NOT NULL,
            attributes  jsonb NOT NULL
        )
        """,
        "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
    ),
    JOB_TABLES,
    # One sighting per (canonical_key, record_id, source): a database written before this
    # version may hold repeats from a re-run ingest. Of each group the earliest seen_at stays
    # (compared bytewise, as SQLite does; the first written, id, among equal times), then the
    # unique index makes write_batch's ON CONFLICT DO NOTHING possible. Building it locks
    # sightings against writes, once, while the store opens. All three columns sort bytewise
    # (COLLATE "C"), the order write_batch inserts in. The index's leading column serves
    # count_sightings and the foreign key, so the index on canonical_key alone goes.
    (
        """
        DELETE FROM sightings WHERE id IN (
            SELECT id FROM (
                SELECT id, row_number() OVER (
                    PARTITION BY canonical_key, record_id, source
                    ORDER BY seen_at COLLATE "C", id
                ) AS position
                FROM sightings
            ) AS ranked
            WHERE position > 1
        )
        """,
        """
        CREATE UNIQUE INDEX sightings_by_key_record_source
            ON sightings (canonical_key, record_id COLLATE "C", source COLLATE "C")
        """,
        "DROP INDEX sightings_by_key",
    ),
    # The key each field is wrapped under, without its version: key_name. Derived from the
    # envelope's header in the layout heimdall writes (its members in one order, compact), by
    # position, so that no envelope can make the expression fail: an envelope in another
    # layout (which heimdall.envelope still reads), not kms_v1, or whose key_identifier does
    # not end in -v<N>, has none (NULL). Every reader of the column allows for that: a field
    # without a key name is pending for every job, and counts as a dependent of every version.
    # Adding a stored column rewrites the table once, under an exclusive lock, while the store
    # opens. The re-encryption job finds the fields under another key (another provider's,
    # while a deployment moves between providers) through the index, which takes over from
    # field_values_by_version: its leading column still serves every count by
    # encryption_version, and with key_name fixed it hands out key_version ranges as that one
    # did. A job records the key name it brings fields to.
    (
        f"""
        ALTER TABLE field_values ADD COLUMN key_name text COLLATE "C"
            GENERATED ALWAYS AS (substring(properties ->> 'encrypted_data'
                FROM '{KEY_NAME_PATTERN}')) STORED
        """,
        """
        CREATE INDEX field_values_by_key
            ON field_values (encryption_version, key_name, key_version)
        """,
        "DROP INDEX field_values_by_version",
        "ALTER TABLE reencrypt_jobs ADD COLUMN target_key text",
    ),
    # Service tokens (heimdall.store.tokens): the SHA-256 of each token, never the token, found
    # through its unique index; names unique for ever, revoked tokens included. Bytewise
    # (COLLATE "C"), as every key here.
    (
        """
        CREATE TABLE service_tokens (
            token_id   text COLLATE "C" PRIMARY KEY,
            name       text COLLATE "C" NOT NULL,
            role       text NOT NULL,
            token_hash text COLLATE "C" NOT NULL CHECK (length(token_hash) = 64),
            created_at text NOT NULL,
            expires_at text,
            revoked_at text,
            created_by text NOT NULL,
            revoked_by text
        )
        """,
        "CREATE UNIQUE INDEX service_tokens_by_hash ON service_tokens (token_hash)",
        "CREATE UNIQUE INDEX service_tokens_by_name ON service_tokens (name)",
    ),
    # key_name again, computed by key_name_of instead of migration 4's regular expression: the
    # same value for every envelope, without the regex engine's cost on every write (it halved
    # the rewrap rate). PostgreSQL cannot change a generated column's expression: the column
    # and its index are made again, which rewrites the table once while the store opens.
    (
        "ALTER TABLE field_values DROP COLUMN key_name",
        f"""
        ALTER TABLE field_values ADD COLUMN key_name text COLLATE "C"
            GENERATED ALWAYS AS ({key_name_of("(properties ->> 'encrypted_data')")}) STORED
        """,
        """
        CREATE INDEX field_values_by_key
            ON field_values (encryption_version, key_name, key_version)
        """,
    ),
)

_CREATE_MIGRATIONS_TABLE: Final = """
    CREATE TABLE schema_migrations (
        version    integer PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
"""


def migrate(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    with conn.transaction():
        # Held to the end of this transaction: a second process waits here, then finds the
        # migrations recorded and applies nothing.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        if exists is None or not exists[0]:
            conn.execute(_CREATE_MIGRATIONS_TABLE)
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        newest = max(applied, default=0)
        if newest > len(MIGRATIONS):
            raise StorageError(
                f"postgres open failed: schema version {newest} is newer than this heimdall"
                f" supports ({len(MIGRATIONS)})"
            )
        for version, statements in enumerate(MIGRATIONS, start=1):
            if version in applied:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
