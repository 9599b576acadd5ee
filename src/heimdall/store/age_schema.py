"""The AGE store's graph: how each connection is prepared, and the labels and indexes heimdall
adds to the graph.

spec: Envelope Encryption Architecture, Storage in Apache AGE. A FieldValue is a vertex whose
properties are the spec's (``canonical_key``, ``encrypted_data`` as the envelope's JSON text,
``is_encrypted``, ``key_version``) plus ``encryption_version``, ``dek_id``, ``field_name``,
``created_at`` and ``updated_at``; a Sighting is a vertex (``canonical_key``, ``record_id``,
``source``, ``seen_at``) with a ``SIGHTING_OF`` edge to its FieldValue. AGE keeps each label in a
table of its own, ``<graph>."<Label>"`` (``id graphid, properties agtype``): heimdall's indexes
are expression indexes on those tables (see :mod:`heimdall.store.age_sql`), so an application
writing the same graph keeps them right without knowing of them. They serve Cypher too:
``MATCH (fv:FieldValue) WHERE fv.canonical_key = $k`` always, and the map form
``MATCH (fv:FieldValue {canonical_key: $k})`` in a session that sets ``age.enable_containment``
off (a superuser setting); with it on, as by default, AGE tests the map by containment (``@>``),
which no btree index serves. heimdall's own Cypher uses the WHERE form.

The graph's part of the schema only moves forward, like the tables': :data:`GRAPH_MIGRATIONS` is
append-only, the version applied is recorded in ``meta`` (``age_schema``) together with the
graph's name (``age_graph``: one heimdall graph per database, since the jobs and ``meta`` are
shared), and :func:`prepare_graph` applies what is missing under an advisory lock. Whatever this
user may not create (the extension, the graph, a label, an index) is refused with the statement
an administrator must run instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import psycopg

from heimdall.errors import StorageError
from heimdall.store.age_names import FIELD_LABEL, SIGHTING_EDGE, SIGHTING_LABEL
from heimdall.store.age_sql import (
    CANONICAL_KEY,
    DEK_ID,
    ENCRYPTION_VERSION,
    KEY_NAME,
    KEY_VERSION,
    AgeStatements,
    prop,
)

__all__ = ["GRAPH_MIGRATIONS", "configure_session", "prepare_graph"]

Connection = psycopg.Connection[tuple[Any, ...]]

# pg_advisory_xact_lock key serialising the graph's setup: the bytes of "hmd-age!" as a bigint.
_SETUP_LOCK: Final = int.from_bytes(b"hmd-age!", "big")
GRAPH_META: Final = "age_graph"
SCHEMA_META: Final = "age_schema"


# Append only: never edit or reorder an entry once released. Version n is GRAPH_MIGRATIONS[n-1];
# {fv}, {s} and {e} are the label tables of FieldValue, Sighting and SIGHTING_OF. IF NOT EXISTS:
# a graph made again applies them again, over whatever an administrator created already.
GRAPH_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        # One FieldValue per canonical_key whoever writes it: AGE's MERGE alone is not safe
        # across sessions (each inserts what its snapshot does not show). Also the lookup by
        # key, for heimdall and for an application's Cypher.
        f"CREATE UNIQUE INDEX IF NOT EXISTS heimdall_fieldvalue_key ON {{fv}} ({CANONICAL_KEY})",
        # Claims, counts and key names, as field_values_by_key on PostgreSQL.
        f"""CREATE INDEX IF NOT EXISTS heimdall_fieldvalue_by_key_name
            ON {{fv}} ({ENCRYPTION_VERSION}, {KEY_NAME}, {KEY_VERSION})""",
        # iter_fields pages of one encryption_version, as field_values_by_version_and_key.
        f"""CREATE INDEX IF NOT EXISTS heimdall_fieldvalue_by_version_and_key
            ON {{fv}} ({ENCRYPTION_VERSION}, {CANONICAL_KEY}, {KEY_VERSION})""",
        f"CREATE INDEX IF NOT EXISTS heimdall_fieldvalue_by_dek ON {{fv}} ({DEK_ID})",
        # AGE indexes no id; an edge's ends and `age adopt`'s updates find vertices by it.
        "CREATE INDEX IF NOT EXISTS heimdall_fieldvalue_id ON {fv} (id)",
        # One Sighting per (canonical_key, record_id, source); its leading column counts them.
        f"""CREATE UNIQUE INDEX IF NOT EXISTS heimdall_sighting_key ON {{s}} (
            {prop("canonical_key")}, {prop("record_id")}, {prop("source")})""",
        "CREATE INDEX IF NOT EXISTS heimdall_sighting_id ON {s} (id)",
        "CREATE INDEX IF NOT EXISTS heimdall_sighting_of_start ON {e} (start_id)",
        "CREATE INDEX IF NOT EXISTS heimdall_sighting_of_end ON {e} (end_id)",
    ),
)

# What a user who may not set the graph up needs an administrator to run, by step.
_ADMIN_SQL: Final = {
    "extension": "CREATE EXTENSION age;",
    "graph": "SELECT ag_catalog.create_graph('{graph}');",
}


def configure_session(conn: Connection, graph: str) -> None:
    """Prepare a connection for the graph: AGE loaded (``LOAD 'age'``, unless a preload did it,
    for a user who may not LOAD), then ``ag_catalog`` last on the search path, and the graph's
    schema off it, so the ordinary tables resolve (and are created) where the PostgreSQL store
    puts them even when the graph is named like the user (``"$user"``)."""
    loaded = conn.execute("SELECT current_setting('age.enable_containment', true)").fetchone()
    if loaded is None or loaded[0] is None:
        try:
            conn.execute("LOAD 'age'")
        except psycopg.errors.UndefinedFile:
            raise StorageError(
                "age open failed: the server has no Apache AGE library (age); install the "
                "apache/age release for this PostgreSQL major (see README)"
            ) from None
        except psycopg.errors.InsufficientPrivilege:
            row = conn.execute("SELECT quote_ident(current_database())").fetchone()
            database = row[0] if row else "<database>"
            raise StorageError(
                "age open failed: this user may not LOAD 'age'; an administrator must run "
                f"ALTER DATABASE {database} SET session_preload_libraries = 'age'; "
                "(see README, Apache AGE)"
            ) from None
    conn.execute(
        "SELECT set_config('search_path', coalesce(("
        "  SELECT string_agg(quote_ident(schema), ', ' ORDER BY position)"
        "  FROM unnest(current_schemas(false)) WITH ORDINALITY AS s (schema, position)"
        "  WHERE schema NOT IN (%s, 'ag_catalog')) || ', ', '') || 'ag_catalog', false)",
        (graph,),
    )


def prepare_graph(conn: Connection, statements: AgeStatements) -> None:
    """Create what the graph lacks (the extension, the graph, its labels, heimdall's indexes),
    once, under an advisory lock; refuse a database bound to another graph, or whose
    PostgreSQL-store tables hold fields (they would be invisible here)."""
    graph = statements.graph
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SETUP_LOCK,))
        _bind_graph(conn, graph)
        applied = _meta_int(conn, SCHEMA_META)
        if applied > len(GRAPH_MIGRATIONS):
            raise StorageError(
                f"age open failed: graph schema version {applied} is newer than this heimdall"
                f" supports ({len(GRAPH_MIGRATIONS)})"
            )
        if not _exists(conn, "SELECT FROM pg_extension WHERE extname = 'age'", ()):
            _admin_step(conn, "extension", graph, "CREATE EXTENSION age")
        usage = conn.execute(
            "SELECT has_schema_privilege('ag_catalog', 'USAGE'), quote_ident(current_user)"
        ).fetchone()
        if usage is None or not usage[0]:
            user = usage[1] if usage else "<user>"
            raise StorageError(
                "age open failed: this user may not use AGE's functions; an administrator must "
                f"run GRANT USAGE ON SCHEMA ag_catalog TO {user}; (see README, Apache AGE)"
            )
        # AGE's functions, not its catalog tables, which a user without SELECT on them (all
        # heimdall needs is USAGE on ag_catalog) cannot read.
        found = conn.execute("SELECT ag_catalog.graph_exists(%s)::text", (graph,)).fetchone()
        if found is None or found[0] != "true":
            _admin_step(conn, "graph", graph, "SELECT ag_catalog.create_graph(%s)", (graph,))
        for label, kind in ((FIELD_LABEL, "v"), (SIGHTING_LABEL, "v"), (SIGHTING_EDGE, "e")):
            _ensure_label(conn, graph, label, kind)
        if not _exists(conn, _UNIQUE_INDEX, (graph,)):
            # A graph dropped and made again since (its indexes went with it): all over again.
            applied = 0
        for version in range(applied + 1, len(GRAPH_MIGRATIONS) + 1):
            for statement in GRAPH_MIGRATIONS[version - 1]:
                _index(conn, statements, statement)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (%s, %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (SCHEMA_META, str(version)),
            )


# The index that keeps one FieldValue per canonical_key, which every version has.
_UNIQUE_INDEX: Final = (
    "SELECT FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
    " WHERE n.nspname = %s AND c.relname = 'heimdall_fieldvalue_key'"
)


def _exists(conn: Connection, query: str, params: Sequence[object]) -> bool:
    return conn.execute(query, params).fetchone() is not None


def _meta_int(conn: Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
    return int(row[0]) if row is not None and str(row[0]).isdigit() else 0


def _bind_graph(conn: Connection, graph: str) -> None:
    row = conn.execute("SELECT value FROM meta WHERE key = %s", (GRAPH_META,)).fetchone()
    if row is not None and row[0] != graph:
        raise StorageError(
            f"age open failed: this database's heimdall tables belong to the graph {row[0]}, "
            f"not {graph} (one heimdall graph per database); set HMD_AGE_GRAPH={row[0]}"
        )
    if _exists(conn, "SELECT FROM field_values LIMIT 1", ()):
        raise StorageError(
            "age open failed: this database holds fields written with HMD_STORE=postgres "
            "(table field_values), which the graph would not show; use another database"
        )
    if row is None:
        conn.execute("INSERT INTO meta (key, value) VALUES (%s, %s)", (GRAPH_META, graph))


def _admin_step(
    conn: Connection, step: str, graph: str, query: str, params: Sequence[object] = ()
) -> None:
    """Run one setup step in a savepoint; a privilege error names what an administrator must
    run instead."""
    try:
        with conn.transaction():
            conn.execute(query.encode(), params)
    except psycopg.errors.InsufficientPrivilege:
        admin = _ADMIN_SQL[step].format(graph=graph)
        raise StorageError(
            f"age open failed: this user may not create the {step}; an administrator must run"
            f" {admin} in this database (see README, Apache AGE)"
        ) from None
    except psycopg.errors.DuplicateSchema:
        raise StorageError(
            f"age open failed: a schema named {graph} exists and is not an AGE graph; set "
            "HMD_AGE_GRAPH to another name"
        ) from None


def _ensure_label(conn: Connection, graph: str, label: str, kind: str) -> None:
    # A label is a table in the graph's schema inheriting from AGE's vertex or edge parent.
    parents = {"v": "_ag_label_vertex", "e": "_ag_label_edge"}
    row = conn.execute(
        "SELECT (SELECT p.relname FROM pg_inherits AS i JOIN pg_class AS p"
        " ON p.oid = i.inhparent WHERE i.inhrelid = l.oid LIMIT 1)"
        " FROM pg_class AS l JOIN pg_namespace AS n ON n.oid = l.relnamespace"
        " WHERE n.nspname = %s AND l.relname = %s",
        (graph, label),
    ).fetchone()
    wanted = "vertex" if kind == "v" else "edge"
    if row is not None:
        if row[0] != parents[kind]:
            raise StorageError(
                f"age open failed: {label} is not a {wanted} label in graph {graph}; heimdall "
                f"needs it to be one"
            )
        return
    create = "create_vlabel" if kind == "v" else "create_elabel"
    try:
        with conn.transaction():
            conn.execute(f"SELECT ag_catalog.{create}(%s, %s)".encode(), (graph, label))
    except psycopg.errors.InsufficientPrivilege:
        raise StorageError(
            f"age open failed: this user may not create the {wanted} label {label}; an "
            f"administrator must run SELECT ag_catalog.{create}('{graph}', '{label}'); in this"
            " database (see README, Apache AGE)"
        ) from None


def _index(conn: Connection, statements: AgeStatements, statement: str) -> None:
    text = statements.migration(statement)
    try:
        with conn.transaction():
            conn.execute(text.encode())  # constant text: see AgeStatements
    except psycopg.errors.UniqueViolation:
        raise StorageError(
            f"age open failed: graph {statements.graph} holds two FieldValue (or Sighting) "
            "nodes with one canonical_key; heimdall needs each once: merge or delete the "
            "duplicates (`heimdall age adopt` cannot open such a graph)"
        ) from None
    except psycopg.errors.InsufficientPrivilege:
        first_line = " ".join(text.split())
        raise StorageError(
            f"age open failed: this user may not index graph {statements.graph}; an "
            f"administrator (or the labels' owner) must run {first_line}; in this database "
            "(see README, Apache AGE)"
        ) from None
