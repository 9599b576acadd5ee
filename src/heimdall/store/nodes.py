"""FieldValue vertices as a graph holds them, before heimdall reads them as fields.

An application's graph may hold FieldValue nodes heimdall did not write: written by the old
env-key code (an envelope in ``encrypted_data``), or in the clear (``is_encrypted`` false), or
lacking properties heimdall needs. :mod:`heimdall.rotation.adopt` reads them through this
interface, raw, and changes each only by compare-and-swap on everything it read. Pure: no driver.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

__all__ = ["NODE_PROPERTIES", "FieldNode", "NodeStore"]

# The properties adoption reads; the rest of a node's properties are the application's own.
NODE_PROPERTIES: Final = (
    "canonical_key",
    "field_name",
    "encrypted_data",
    "is_encrypted",
    "value",
    "key_version",
    "encryption_version",
    "dek_id",
    "created_at",
    "updated_at",
)


@dataclass(frozen=True, slots=True)
class FieldNode:
    """One FieldValue vertex: its id, and each of :data:`NODE_PROPERTIES` as the JSON text of
    its value (None where the node has no such property). *version* is the whole properties
    map as the store read it, which a change must still find. Neither is in the repr: they may
    hold an envelope or a plaintext value."""

    node_id: int
    texts: Mapping[str, str | None] = field(repr=False)
    version: str = field(repr=False)


class NodeStore(Protocol):
    def field_nodes(self, after: int, limit: int) -> list[FieldNode]:
        """Up to *limit* FieldValue vertices whose id is above *after*, in id order."""
        ...

    def change_node(
        self, node: FieldNode, changes: Mapping[str, object], remove: Sequence[str] = ()
    ) -> bool:
        """Set *changes* on *node*'s properties and remove the properties *remove* names, in
        one update, only if its properties are still those read; whether it was changed. Its
        other properties stay as they are."""
        ...
