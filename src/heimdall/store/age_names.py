"""The names heimdall gives things in an Apache AGE graph, and the rule for the graph's own name.

spec: Envelope Encryption Architecture, Storage in Apache AGE. Pure (no driver import), so
settings can check ``HMD_AGE_GRAPH`` before anything connects.

AGE takes a graph name only as a literal inside the SQL text: ``cypher('<graph>', $$...$$)``
has no parameter for it. So a name is accepted only if it is plain enough that no quoting is
ever needed: lower-case letters, digits and underscores, 3 to 63 characters (AGE's own limits),
not starting with a digit. Names PostgreSQL reserves for its own schemas (``pg_*``,
``information_schema``), ``public`` and AGE's ``ag_catalog`` are refused too: a graph is a schema
of the same name.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "DEFAULT_GRAPH",
    "FIELD_LABEL",
    "GRAPH_NAME_RULE",
    "SIGHTING_EDGE",
    "SIGHTING_LABEL",
    "valid_graph_name",
]

DEFAULT_GRAPH: Final = "heimdall"
# The vertex labels and the edge label, as the spec names the nodes: (Sighting)-[:SIGHTING_OF]->
# (FieldValue). heimdall.service.FIELD_LABEL is the same text (it is bound into every envelope).
FIELD_LABEL: Final = "FieldValue"
SIGHTING_LABEL: Final = "Sighting"
SIGHTING_EDGE: Final = "SIGHTING_OF"

_GRAPH_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{2,62}\Z", re.ASCII)
_RESERVED: Final = frozenset({"public", "ag_catalog", "information_schema"})
GRAPH_NAME_RULE: Final = (
    "must be 3-63 characters of lower-case letters, digits and underscores, not starting "
    "with a digit or pg_, and not public, ag_catalog or information_schema"
)


def valid_graph_name(name: object) -> bool:
    """Whether *name* may name heimdall's graph (see the module docstring)."""
    return (
        isinstance(name, str)
        and _GRAPH_NAME.match(name) is not None
        and not name.startswith("pg_")
        and name not in _RESERVED
    )
