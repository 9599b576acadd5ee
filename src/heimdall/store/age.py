"""The GraphStore on Apache AGE: FieldValue and Sighting as graph nodes, as the spec stores them.

spec: Envelope Encryption Architecture, Storage in Apache AGE. ``HMD_STORE=age``: a graph
(``HMD_AGE_GRAPH``) in the PostgreSQL database of ``HMD_POSTGRES_DSN``. A FieldValue is a vertex
keyed by ``canonical_key`` with the spec's properties, a Sighting a vertex linked to its FieldValue
by a ``SIGHTING_OF`` edge (:mod:`heimdall.store.age_schema`), so an application already using the
graph sees heimdall's nodes as its own, and heimdall sees the application's. Records, ``meta``,
the job tables and whatever else the PostgreSQL store keeps in ordinary tables are that store's
own, in the same database: :class:`AgeStore` is a :class:`~heimdall.store.postgres.PostgresStore`
(its migrations, pool, error translation and those tables) whose fields live in the graph.

Invariants, beyond the PostgreSQL store's (which hold here too):

* One FieldValue per canonical_key, and one Sighting per (canonical_key, record_id, source),
  whoever writes them: unique expression indexes on the label tables. AGE's ``MERGE`` alone
  does not give that across sessions, each inserting what its snapshot does not show.
* New FieldValues are written in Cypher, one ``UNWIND ... CREATE`` per batch, after the
  batch's keys are found absent; a key another writer stores meanwhile makes the insert fail on
  the unique index, and the batch is retried from a savepoint, its keys looked up again. That
  is the result of the spec's ``MERGE ... SET`` (first writer wins), with an exact count of what
  was created. Not ``MERGE ... SET`` itself: AGE 1.6 finds each vertex a ``SET`` changes by a
  sequential scan of its label table, a cost per node that grows with the graph. New Sightings
  and their edges are inserted into their label tables with SQL, ids from AGE's own sequences,
  for the same reason: AGE's ``CREATE`` of an edge to a vertex matched earlier scans that
  vertex's table to check it still exists.
* Changes to existing FieldValues (compare-and-swap, a claim's updates) are SQL ``UPDATE`` s of
  the label table that merge heimdall's properties into the vertex's (an application's own
  properties stay). An UPDATE re-checks its compare-and-swap against a row another transaction
  changed meanwhile; AGE's ``SET`` fails there instead.
* Every connection loads AGE and has ``ag_catalog`` on its search path
  (:func:`~heimdall.store.age_schema.configure_session`, the pool's configure hook).
* A vertex that lacks what heimdall needs is never read as a field: it raises StorageError
  naming its id. :meth:`AgeStore.field_nodes` and :meth:`AgeStore.change_node` read and change
  vertices as the graph holds them, for ``heimdall age adopt``
  (:class:`~heimdall.store.nodes.NodeStore`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Final

import psycopg

from heimdall.errors import StorageError
from heimdall.store.age_jobs import AgeJobs
from heimdall.store.age_names import DEFAULT_GRAPH
from heimdall.store.age_schema import configure_session, prepare_graph
from heimdall.store.age_sql import AgeStatements, agtype, field_from_node
from heimdall.store.base import (
    FieldCount,
    FieldUpdate,
    FieldValue,
    RecordRow,
    Sighting,
    keyset_pages,
    swap_params,
    utc_now,
)
from heimdall.store.nodes import NODE_PROPERTIES, FieldNode
from heimdall.store.postgres import _UPSERT_RECORDS, _first_sightings, _record_columns

__all__ = ["AgeStore"]

Cursor = psycopg.Cursor[tuple[Any, ...]]

# How often a batch is tried again after another writer stored one of its keys first.
_WRITE_ATTEMPTS: Final = 5


class AgeStore(AgeJobs):
    """A :class:`~heimdall.store.base.GraphStore` (and JobStore) in one graph of one PostgreSQL
    database with the ``age`` extension.

    ``graph`` is the graph's name (see :mod:`heimdall.store.age_names`). Construction connects,
    creates what is missing (the extension, the graph, its labels and indexes, the ordinary
    tables) where this user may, and fills the pool; it raises :class:`StorageError` naming the
    SQL an administrator must run where the user may not.
    """

    def __init__(self, dsn: str, *, graph: str = DEFAULT_GRAPH, pool_size: int = 8) -> None:
        self._sql = AgeStatements(graph)
        super().__init__(dsn, pool_size=pool_size)

    def __repr__(self) -> str:
        target = ", ".join(f"{k}={v!r}" for k, v in self._target.items())
        return f"{type(self).__name__}({target}, graph={self._sql.graph!r})"

    @property
    def graph(self) -> str:
        return self._sql.graph

    def _configure(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        configure_session(conn, self._sql.graph)

    def _migrated(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        prepare_graph(conn, self._sql)

    # -- GraphStore ----------------------------------------------------------------------------

    def existing_keys(self, canonical_keys: Sequence[str]) -> set[str]:
        unique = list(dict.fromkeys(canonical_keys))
        if not unique:
            return set()
        with self._connection("existing_keys") as conn:
            return _existing(conn.cursor(), self._sql, unique)

    def write_batch(
        self,
        field_values: Sequence[FieldValue],
        sightings: Sequence[Sighting],
        records: Sequence[RecordRow],
    ) -> int:
        """Write all three in one transaction; returns the number of FieldValues created.

        As PostgresStore.write_batch: a FieldValue's created_at and updated_at are its own
        updated_at when set, else the time of this write; the first of two FieldValues (or
        sightings) with one key in a batch is kept, the last of two records; a FieldValue or
        sighting already stored is left as it is. A sighting whose canonical_key has no
        FieldValue fails the whole batch.
        """
        now = utc_now()
        firsts: dict[str, FieldValue] = {}
        for f in field_values:
            firsts.setdefault(f.canonical_key, f)
        field_rows = [_field_row(f, now) for _, f in sorted(firsts.items())]
        sighting_rows = sorted(_first_sightings(sightings))
        record_columns = _record_columns(records)
        with self._transaction("write_batch") as cursor:
            # Every statement here probes a unique index per row: never a hash of a whole label
            # table, which the planner would pick for a table it has not yet seen grow.
            for setting in ("enable_hashjoin", "enable_mergejoin", "enable_seqscan"):
                cursor.execute(f"SET LOCAL {setting} = off")
            inserted = self._write_nodes(cursor, field_rows, sighting_rows)
            if record_columns:
                cursor.execute(_UPSERT_RECORDS, record_columns)
        return inserted

    def _write_nodes(
        self,
        cursor: Cursor,
        field_rows: list[dict[str, object]],
        sighting_rows: list[tuple[str, str, str, str]],
    ) -> int:
        """The batch's new FieldValues and Sightings, from a savepoint tried again when another
        writer stores one of the same keys first (the unique indexes refuse the second)."""
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                with cursor.connection.transaction():
                    return self._create_nodes(cursor, field_rows, sighting_rows)
            except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected):
                if attempt == _WRITE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _create_nodes(
        self,
        cursor: Cursor,
        field_rows: list[dict[str, object]],
        sighting_rows: list[tuple[str, str, str, str]],
    ) -> int:
        sql = self._sql
        existing = _existing(cursor, sql, [str(r["canonical_key"]) for r in field_rows])
        new = [r for r in field_rows if r["canonical_key"] not in existing]
        if new:
            cursor.execute(sql.create_fields, (json.dumps({"rows": new}),))
        if sighting_rows:
            fresh = _unstored_sightings(cursor, sql, sighting_rows)
            if fresh:
                columns = [list(column) for column in zip(*fresh, strict=True)]
                if cursor.execute(sql.create_sightings, columns).rowcount != len(fresh):
                    raise StorageError(
                        "age write_batch failed: a sighting names a canonical_key that has no "
                        "FieldValue"
                    )
        return len(new)

    def get_field(self, canonical_key: str) -> FieldValue | None:
        row = self._fetch_one("get_field", self._sql.get_field, (agtype(canonical_key),))
        return None if row is None else field_from_node(row)

    def get_fields(self, canonical_keys: Sequence[str]) -> dict[str, FieldValue]:
        """One query, the keys bound as one array of agtype text (a probe of the unique index
        on canonical_key each). A vertex lacking what heimdall needs fails the whole call."""
        unique = list(dict.fromkeys(canonical_keys))
        if not unique:
            return {}
        params = ([agtype(key) for key in unique],)
        rows = self._fetch_all("get_fields", self._sql.get_fields, params)
        fields = (field_from_node(row) for row in rows)
        return {field.canonical_key: field for field in fields}

    def count_sightings(self, canonical_key: str) -> int:
        query = self._sql.count_sightings
        return int(self._fetch_one("count_sightings", query, (agtype(canonical_key),))[0])

    def field_counts(self) -> list[FieldCount]:
        counts = []
        for version, key_name, key_version, count in self._fetch_all(
            "field_counts", self._sql.field_counts
        ):
            if version is None or key_version is None or not key_version.lstrip("-").isdigit():
                raise StorageError(
                    "age field_counts failed: a FieldValue has an encryption_version but no "
                    "integer key_version (`heimdall age adopt` lists such nodes)"
                )
            counts.append(FieldCount(version, int(key_version), int(count), key_name))
        return counts

    def key_names(self) -> list[str]:
        return [str(name) for (name,) in self._fetch_all("key_names", self._sql.key_names)]

    def count_fields(
        self,
        *,
        encryption_version: str | None = None,
        key_version_below: int | None = None,
        key_name: str | None = None,
    ) -> int:
        clauses, params = self._sql.field_filter(encryption_version, key_version_below, key_name)
        query = self._sql.count_fields(clauses)
        return int(self._fetch_one("count_fields", query, params)[0])

    def iter_fields(
        self,
        *,
        encryption_version: str | None = None,
        key_version_below: int | None = None,
        batch_size: int = 500,
    ) -> Iterator[list[FieldValue]]:
        """Non-empty batches of matching FieldValues in canonical_key order, each one query
        resuming after the last key yielded (keyset pagination); nothing is held between
        batches, so the caller may update the yielded fields."""
        clauses, params = self._sql.field_filter(encryption_version, key_version_below)
        first = self._sql.page(clauses, resume=False)
        resumed = self._sql.page(clauses, resume=True)
        fetch = partial(self._fetch_all, "iter_fields")

        def page(after: str | None) -> list[FieldValue]:
            if after is None:
                rows = fetch(first, [*params, batch_size])
            else:
                rows = fetch(resumed, [*params, agtype(after), batch_size])
            return [field_from_node(row) for row in rows]

        return keyset_pages(page, batch_size)

    def compare_and_swap(
        self, canonical_key: str, expected_encrypted_data: str, update: FieldUpdate
    ) -> bool:
        """One conditional UPDATE of the vertex; is_encrypted is not touched."""
        *new, key, expected = swap_params(canonical_key, expected_encrypted_data, update, utc_now())
        params = (*new, agtype(key), expected)
        query = self._sql.compare_and_swap
        return self._rowcount("compare_and_swap", query, params) == 1

    # -- NodeStore: FieldValue vertices as the graph holds them (heimdall age adopt) -----------

    def field_nodes(self, after: int, limit: int) -> list[FieldNode]:
        """Up to *limit* FieldValue vertices with an id above *after*, in id order, raw."""
        rows = self._fetch_all("field_nodes", self._sql.field_nodes, [str(after), limit])
        return [
            FieldNode(int(node_id), dict(zip(NODE_PROPERTIES, values, strict=True)), version)
            for node_id, version, *values in rows
        ]

    def change_node(
        self, node: FieldNode, changes: Mapping[str, object], remove: Sequence[str] = ()
    ) -> bool:
        """One UPDATE of the vertex, only while its properties are still those read."""
        params = (agtype(list(remove)), agtype(dict(changes)), str(node.node_id), node.version)
        return self._rowcount("change_node", self._sql.change_node, params) == 1


def _field_row(f: FieldValue, now: str) -> dict[str, object]:
    """A FieldValue's properties as the Cypher CREATE takes them."""
    written = f.updated_at or now
    return {
        "canonical_key": f.canonical_key,
        "field_name": f.field_name,
        "encrypted_data": f.encrypted_data,
        "is_encrypted": f.is_encrypted,
        "key_version": f.key_version,
        "encryption_version": f.encryption_version,
        "dek_id": f.dek_id,
        "created_at": written,
        "updated_at": written,
    }


def _existing(cursor: Cursor, sql: AgeStatements, keys: list[str]) -> set[str]:
    if not keys:
        return set()
    rows = cursor.execute(sql.existing_keys, ([agtype(k) for k in keys],)).fetchall()
    return {row[0] for row in rows}


def _unstored_sightings(
    cursor: Cursor, sql: AgeStatements, rows: list[tuple[str, str, str, str]]
) -> list[tuple[str, str, str, str]]:
    """The sightings of *rows* not stored yet."""
    columns = [[agtype(row[i]) for row in rows] for i in range(3)]
    stored = {position for (position,) in cursor.execute(sql.stored_sightings, columns)}
    return [row for position, row in enumerate(rows, start=1) if position not in stored]
