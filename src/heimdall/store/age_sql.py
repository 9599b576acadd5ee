"""The AGE store's SQL and Cypher text, for one graph.

A FieldValue's property is read with the expression AGE's own Cypher translation writes for
``fv.name``, ``agtype_access_operator(VARIADIC ARRAY[properties, '"name"'::agtype])``: the
indexes are built on these expressions (:mod:`heimdall.store.age_schema`), so heimdall's SQL and
Cypher's ``WHERE fv.canonical_key = $k`` find rows through the same index. Text comes out
through ``agtype_object_field_text``, which returns a string property's characters exactly.

Everything is constant text but the graph's name, which AGE accepts only as a literal and which
:func:`~heimdall.store.age_names.valid_graph_name` has checked admits no character that needs
quoting. Values are bound parameters; a value compared with an agtype expression is bound as its
JSON text (:func:`agtype`) and cast.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Final

from heimdall.errors import StorageError
from heimdall.store.age_names import FIELD_LABEL, SIGHTING_EDGE, SIGHTING_LABEL, valid_graph_name
from heimdall.store.base import FieldValue
from heimdall.store.nodes import NODE_PROPERTIES
from heimdall.store.postgres_schema import key_name_of

__all__ = [
    "CANONICAL_KEY",
    "DEK_ID",
    "ENCRYPTION_VERSION",
    "KEY_NAME",
    "KEY_VERSION",
    "AgeStatements",
    "agtype",
    "field_from_node",
    "prop",
    "text_prop",
]


def prop(name: str, entity: str = "properties") -> str:
    """The agtype value of property *name* (a constant), as AGE writes the access."""
    return (
        "ag_catalog.agtype_access_operator("
        f"VARIADIC ARRAY[{entity}, '\"{name}\"'::ag_catalog.agtype])"
    )


def text_prop(name: str, entity: str = "properties") -> str:
    """Property *name* as text: a string's characters exactly, another value's agtype text."""
    return f"ag_catalog.agtype_object_field_text({entity}, '{name}')"


def agtype(value: object) -> str:
    """*value* as agtype input text (JSON), for a parameter cast to ``ag_catalog.agtype``."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


# The FieldValue expressions heimdall's indexes are built on, and its queries test.
CANONICAL_KEY: Final = prop("canonical_key")
# Text, not agtype: an index column tested for equality hands out the next column's order only
# when the planner may treat the equality as an equivalence, which needs a mergejoinable
# operator, and agtype's = is not one. So a claim (encryption_version fixed, key name and
# key_version ordered) and a page (encryption_version fixed, canonical_key ordered) read their
# index in order, and sort nothing.
ENCRYPTION_VERSION: Final = text_prop("encryption_version")
KEY_VERSION: Final = prop("key_version")
DEK_ID: Final = prop("dek_id")

# The key name, as the PostgreSQL store's column computes it (by splitting at quotes).
KEY_NAME: Final = key_name_of(text_prop("encrypted_data"))
_KMS_V1: Final = "'kms_v1'"
_LEGACY: Final = "'legacy'"
_AGTYPE: Final = "::ag_catalog.agtype"

# A FieldValue's columns, in field_from_node's order: field_from_row's, then the vertex id.
FIELD_COLUMNS: Final = ", ".join(
    [
        text_prop("canonical_key"),
        text_prop("field_name"),
        text_prop("encrypted_data"),
        f"CASE {prop('is_encrypted')} WHEN 'true'{_AGTYPE} THEN true"
        f" WHEN 'false'{_AGTYPE} THEN false END",
        text_prop("key_version"),
        text_prop("encryption_version"),
        text_prop("dek_id"),
        text_prop("updated_at"),
        "id::text",
    ]
)
_INTEGER: Final = re.compile(r"-?[0-9]{1,18}\Z", re.ASCII)


def field_from_node(row: Sequence[Any]) -> FieldValue:
    """A FieldValue from a row of :data:`FIELD_COLUMNS`. A vertex that lacks a property heimdall
    needs (one an application wrote, not yet adopted) raises StorageError naming its id."""
    key, name, data, is_encrypted, key_version, version, dek_id, updated_at, node_id = row
    required = (key, name, data, is_encrypted, version, dek_id)
    if any(value is None for value in required) or not _INTEGER.match(key_version or ""):
        raise StorageError(
            f"age read failed: FieldValue node {node_id} lacks properties heimdall needs "
            "(`heimdall age adopt` lists such nodes)"
        )
    return FieldValue(
        canonical_key=key,
        field_name=name,
        encrypted_data=data,
        key_version=int(key_version),
        encryption_version=version,
        dek_id=dek_id,
        is_encrypted=bool(is_encrypted),
        updated_at=updated_at or "",
    )


# New encryption properties, merged into the vertex's properties (an application's own stay).
_NEW_ENVELOPE: Final = (
    "ag_catalog.agtype_build_map('encrypted_data', {data}::text, 'key_version',"
    " {key_version}::bigint, 'encryption_version', {ev}::text, 'dek_id', {dek}::text,"
    " 'updated_at', {now}::text)"
)

# The kinds of pending field, as heimdall.store.postgres_jobs names them, over the index
# heimdall_fieldvalue_by_key_name (encryption_version, key name, key_version).
_KMS: Final = f"{ENCRYPTION_VERSION} = {_KMS_V1}"
_TARGET: Final = f"%(target)s{_AGTYPE}"
PENDING: Final = {
    "same key": f"{_KMS} AND {KEY_NAME} = %(key)s AND {KEY_VERSION} < {_TARGET}",
    "key before": f"{_KMS} AND {KEY_NAME} < %(key)s",
    "key after": f"{_KMS} AND {KEY_NAME} > %(key)s",
    "no key": f"{_KMS} AND {KEY_NAME} IS NULL",
    "any key": f"{_KMS} AND {KEY_VERSION} < {_TARGET}",
    "legacy": f"{ENCRYPTION_VERSION} = {_LEGACY}",
}
KEYED: Final = ("same key", "key before", "key after", "no key")
_PENDING_KMS_KEYED: Final = (
    f"{_KMS} AND ({KEY_NAME} IS DISTINCT FROM %(key)s OR {KEY_VERSION} < {_TARGET})"
)


class AgeStatements:
    """The statements of one graph (see the module docstring)."""

    def __init__(self, graph: str) -> None:
        if not valid_graph_name(graph):
            raise StorageError("age open failed: the graph name is not a valid AGE graph name")
        self.graph: Final = graph
        fv = self.fields = f'"{graph}"."{FIELD_LABEL}"'
        s = self.sightings = f'"{graph}"."{SIGHTING_LABEL}"'
        self.edges: Final = f'"{graph}"."{SIGHTING_EDGE}"'
        key = text_prop("canonical_key")

        # FieldValues, looked up by key through the unique index.
        self.existing_keys: Final = (
            f"SELECT {key} FROM {fv} WHERE {CANONICAL_KEY} = ANY(%s::text[]::ag_catalog.agtype[])"  # noqa: S608 - constant text
        )
        self.get_field: Final = (
            f"SELECT {FIELD_COLUMNS} FROM {fv} WHERE {CANONICAL_KEY} = %s{_AGTYPE}"  # noqa: S608 - constant text
        )
        self.get_fields: Final = (
            f"SELECT {FIELD_COLUMNS} FROM {fv}"  # noqa: S608 - constant text
            f" WHERE {CANONICAL_KEY} = ANY(%s::text[]::ag_catalog.agtype[])"
        )
        self.count_sightings: Final = (
            f"SELECT count(*) FROM {s} WHERE {prop('canonical_key')} = %s{_AGTYPE}"  # noqa: S608 - constant text
        )
        # The sightings of a batch already stored: a probe of heimdall_sighting_key each.
        self.stored_sightings: Final = (
            "SELECT u.position FROM unnest(%s::text[], %s::text[], %s::text[])"  # noqa: S608 - constant text
            " WITH ORDINALITY AS u (canonical_key, record_id, source, position)"
            f" JOIN {s} AS s ON {prop('canonical_key', 's.properties')} = u.canonical_key{_AGTYPE}"
            f" AND {prop('record_id', 's.properties')} = u.record_id{_AGTYPE}"
            f" AND {prop('source', 's.properties')} = u.source{_AGTYPE}"
        )
        # Text of the grouped agtype values (agtype to text gives a string's characters).
        self.field_counts: Final = (
            f"SELECT {ENCRYPTION_VERSION}, {KEY_NAME}, ({KEY_VERSION})::text, count(*)"  # noqa: S608 - constant text
            f" FROM {fv} WHERE {ENCRYPTION_VERSION} IS NOT NULL"
            f" GROUP BY {ENCRYPTION_VERSION}, {KEY_NAME}, {KEY_VERSION}"
            f" ORDER BY {ENCRYPTION_VERSION}, {KEY_NAME} NULLS FIRST, {KEY_VERSION}"
        )
        # The distinct key names of kms_v1 fields, one index probe each (a loose index scan).
        self.key_names: Final = f"""
            WITH RECURSIVE names (name) AS (
                SELECT min({KEY_NAME}) FROM {fv} WHERE {_KMS}
                UNION ALL
                SELECT (SELECT min({KEY_NAME}) FROM {fv} WHERE {_KMS} AND {KEY_NAME} > names.name)
                FROM names WHERE names.name IS NOT NULL
            )
            SELECT name FROM names WHERE name IS NOT NULL
        """  # noqa: S608 - constant text
        # A field's new envelope, only while its envelope is still the one expected
        # (parameters in swap_params' order, the key as agtype text). is_encrypted untouched.
        envelope = _NEW_ENVELOPE.format(data="%s", key_version="%s", ev="%s", dek="%s", now="%s")
        self.compare_and_swap: Final = (
            f"UPDATE {fv} SET properties = properties || {envelope}"  # noqa: S608
            f" WHERE {CANONICAL_KEY} = %s{_AGTYPE} AND {text_prop('encrypted_data')} = %s"
        )

        # The new nodes of a batch, as Cypher: vertices a query of the application's own
        # finds as the spec writes them (labels, property names and types).
        self.create_fields: Final = self.cypher(
            "UNWIND $rows AS r CREATE (:FieldValue {canonical_key: r.canonical_key,"
            " field_name: r.field_name, encrypted_data: r.encrypted_data,"
            " is_encrypted: r.is_encrypted, key_version: r.key_version,"
            " encryption_version: r.encryption_version, dek_id: r.dek_id,"
            " created_at: r.created_at, updated_at: r.updated_at})"
        )
        # A batch's new Sightings and their SIGHTING_OF edges, in SQL: AGE 1.6's CREATE of an
        # edge to a vertex it did not create in the same clause first checks that the vertex
        # exists by scanning its label table, a cost per sighting that grows with the graph.
        # The ids are AGE's own (the label tables' default); a sighting whose FieldValue does
        # not exist joins nothing, so a count below the batch's means an orphan.
        sighting_id = (
            f"ag_catalog._graphid(ag_catalog._label_id('{graph}'::name,"
            f" '{SIGHTING_LABEL}'::name)::integer,"
            f' nextval(\'"{graph}"."{SIGHTING_LABEL}_id_seq"\'::regclass))'
        )
        self.create_sightings: Final = f"""
            WITH fresh AS MATERIALIZED (
                SELECT {sighting_id} AS id, fv.id AS field_id, u.*
                FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[])
                    AS u (canonical_key, record_id, source, seen_at)
                JOIN {fv} AS fv ON {prop("canonical_key", "fv.properties")}
                    = to_json(u.canonical_key)::text{_AGTYPE}
            ), vertices AS (
                INSERT INTO {s} (id, properties)
                SELECT id, ag_catalog.agtype_build_map('canonical_key', canonical_key,
                    'record_id', record_id, 'source', source, 'seen_at', seen_at)
                FROM fresh
            )
            INSERT INTO {self.edges} (start_id, end_id, properties)
            SELECT id, field_id, ag_catalog.agtype_build_map() FROM fresh
        """  # noqa: S608 - constant text

        # The re-encryption job (heimdall.store.age_jobs): as heimdall.store.postgres_jobs.
        not_failed = (
            "NOT EXISTS (SELECT FROM reencrypt_failures AS failure"
            " WHERE failure.job_id = %(job_id)s"
            f' AND failure.canonical_key = ({key} COLLATE "C"))'
        )
        self.claims: Final = {
            name: f"SELECT {FIELD_COLUMNS} FROM {fv} WHERE {pending} AND {not_failed}"  # noqa: S608
            f" ORDER BY {KEY_NAME}, {KEY_VERSION} LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
            for name, pending in PENDING.items()
        }
        self.count_kms_keyed: Final = self._count(_PENDING_KMS_KEYED, not_failed)
        self.count_kms_any: Final = self._count(PENDING["any key"], not_failed)
        self.count_legacy: Final = self._count(PENDING["legacy"], not_failed)
        self.data_keys_keyed: Final = self._data_keys(_PENDING_KMS_KEYED)
        self.data_keys_any: Final = self._data_keys(PENDING["any key"])
        # A claim's updates in one statement, each a compare-and-swap on the envelope read,
        # with the parameters of heimdall.store.postgres_jobs' own.
        self.update_fields: Final = (
            f"UPDATE {fv} AS f SET properties = f.properties || "  # noqa: S608
            + _NEW_ENVELOPE.format(
                data="u.data",
                key_version="u.key_version",
                ev="u.encryption_version",
                dek="u.dek_id",
                now="%b",
            )
            + " FROM unnest(%b::text[], %b::text[], %b::text[], %b::bigint[], %b::text[],"
            " %b::text[]) AS u (canonical_key, expected, data, key_version,"
            " encryption_version, dek_id)"
            f" WHERE {prop('canonical_key', 'f.properties')}"
            f" = to_json(u.canonical_key)::text{_AGTYPE}"
            f" AND {text_prop('encrypted_data', 'f.properties')} = u.expected"
        )

        # Adoption (heimdall.store.nodes): FieldValue vertices in id order, raw, and a change
        # by compare-and-swap on the whole properties map read.
        node_values = ", ".join(prop(name) for name in NODE_PROPERTIES)
        self.field_nodes: Final = (
            f"SELECT id::text, properties, {node_values} FROM {fv}"  # noqa: S608 - constant text
            f" WHERE id > %s::text::ag_catalog.graphid ORDER BY id LIMIT %s"
        )
        self.change_node: Final = (
            f"UPDATE {fv} SET properties = (properties - %s{_AGTYPE}) || %s{_AGTYPE}"  # noqa: S608
            f" WHERE id = %s::text::ag_catalog.graphid AND properties = %s{_AGTYPE}"
        )

    def cypher(self, query: str) -> str:
        """*query* (constant Cypher; values as ``$name`` of one agtype map, the statement's one
        bound parameter) as SQL."""
        return (
            f"SELECT * FROM ag_catalog.cypher('{self.graph}', $$ {query} $$, %s)"  # noqa: S608 - constant text
            " AS (result ag_catalog.agtype)"
        )

    def field_filter(
        self,
        encryption_version: str | None,
        key_version_below: int | None,
        key_name: str | None = None,
    ) -> tuple[list[str], list[object]]:
        """WHERE clauses (constant SQL) and their parameters for count_fields and iter_fields."""
        clauses: list[str] = []
        params: list[object] = []
        if encryption_version is not None:
            clauses.append(f"{ENCRYPTION_VERSION} = %s")
            params.append(encryption_version)
        if key_name is not None:
            clauses.append(f"{KEY_NAME} = %s")
            params.append(key_name)
        if key_version_below is not None:
            clauses.append(f"{KEY_VERSION} < %s{_AGTYPE}")
            params.append(agtype(key_version_below))
        return clauses, params

    def count_fields(self, clauses: list[str]) -> str:
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        return f"SELECT count(*) FROM {self.fields}" + where  # noqa: S608 - constant clauses

    def page(self, clauses: list[str], *, resume: bool) -> str:
        """One keyset page of iter_fields: the filter's parameters, then (if *resume*) the last
        key yielded as agtype text, then the page size."""
        if resume:
            clauses = [*clauses, f"{CANONICAL_KEY} > %s{_AGTYPE}"]
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        return (
            f"SELECT {FIELD_COLUMNS} FROM {self.fields}"  # noqa: S608 - constant clauses
            + where
            + f" ORDER BY {CANONICAL_KEY} LIMIT %s"
        )

    def migration(self, statement: str) -> str:
        """A statement of heimdall.store.age_schema.GRAPH_MIGRATIONS for this graph."""
        # replace, not format: the key-name pattern holds braces.
        for token, table in (("{fv}", self.fields), ("{s}", self.sightings), ("{e}", self.edges)):
            statement = statement.replace(token, table)
        return statement

    def _count(self, pending: str, not_failed: str) -> str:
        return f"SELECT count(*) FROM {self.fields} WHERE {pending} AND {not_failed}"  # noqa: S608

    def _data_keys(self, pending: str) -> str:
        return (
            f"SELECT DISTINCT ON ({DEK_ID}) {text_prop('encrypted_data')} FROM {self.fields}"  # noqa: S608
            f" WHERE {pending} ORDER BY {DEK_ID} LIMIT %(limit)s"
        )
