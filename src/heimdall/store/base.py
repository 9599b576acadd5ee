"""The graph store interface, shaped like the spec's Apache AGE model.

spec: Envelope Encryption Architecture, Storage in Apache AGE. Nodes:

* ``FieldValue`` keyed by ``canonical_key`` (``email:hash:<hex>``) with properties
  ``encrypted_data`` (the envelope JSON), ``is_encrypted``, ``key_version``,
  ``encryption_version`` and ``dek_id``; equal values share one node.
* ``Sighting``, one per occurrence of a value (record id, source, time), linked to its FieldValue.
  An occurrence is a (canonical_key, record_id, source): the same record seen again with the
  same value is the same sighting, and keeps the seen_at first written, as a graph MERGE would.
  A record whose value changed gets a sighting of the new value; the old one stays.
* ``Record``, one per ingested record, holding the fields the policy keeps in the clear.

Every backend passes ``tests/store_contract.py``, which also pins these rules: a FieldValue's
``updated_at`` is kept when the caller sets it and stamped by the store otherwise; compare-and-swap
never changes ``is_encrypted``; ``iter_fields`` never yields an empty batch and rejects a batch
size below one; sightings are idempotent, so re-running an ingest adds none; ``close()`` may
be called twice and any later call raises StorageError.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from heimdall.store.tokens import TokenStore

__all__ = [
    "FieldCount",
    "FieldUpdate",
    "FieldValue",
    "GraphStore",
    "RecordRow",
    "Sighting",
]


@dataclass(frozen=True, slots=True)
class FieldValue:
    """A FieldValue node. Its repr leaves out the envelope."""

    canonical_key: str
    field_name: str
    encrypted_data: str = field(repr=False)
    key_version: int
    encryption_version: str
    dek_id: str
    is_encrypted: bool = True
    updated_at: str = ""


@dataclass(frozen=True, slots=True)
class FieldUpdate:
    """New encryption properties for an existing FieldValue (after a rewrap or re-encrypt)."""

    encrypted_data: str = field(repr=False)
    key_version: int
    encryption_version: str
    dek_id: str


@dataclass(frozen=True, slots=True)
class Sighting:
    canonical_key: str
    record_id: str
    source: str
    seen_at: str


@dataclass(frozen=True, slots=True)
class RecordRow:
    record_id: str
    source: str
    ingested_at: str
    attributes: Mapping[str, str | int | float | bool | None]


@dataclass(frozen=True, slots=True)
class FieldCount:
    """How many FieldValues are under one key version. *key_name* is the key their envelope
    names (its key_identifier without ``-v<N>``): None for legacy fields, and for an envelope
    that names none."""

    encryption_version: str
    key_version: int
    count: int
    key_name: str | None = None


class GraphStore(TokenStore, Protocol):
    """Persistent FieldValue / Sighting / Record graph plus a small metadata map, and the
    service tokens (:class:`heimdall.store.tokens.TokenStore`)."""

    def existing_keys(self, canonical_keys: Sequence[str]) -> set[str]:
        """The subset of *canonical_keys* that already have a FieldValue."""
        ...

    def write_batch(
        self,
        field_values: Sequence[FieldValue],
        sightings: Sequence[Sighting],
        records: Sequence[RecordRow],
    ) -> int:
        """Write all three atomically (all or nothing).

        A FieldValue whose canonical_key already exists is left as it is (first writer wins).
        So is a sighting whose (canonical_key, record_id, source) already exists, seen_at
        included; of two in one batch, the first is kept. A record whose record_id already
        exists is replaced. Returns the number of FieldValues actually inserted.
        """
        ...

    def get_field(self, canonical_key: str) -> FieldValue | None: ...

    def get_fields(self, canonical_keys: Sequence[str]) -> dict[str, FieldValue]:
        """The FieldValues of *canonical_keys*, by canonical_key: a key without one is absent
        from the answer, a key given twice is in it once. One query per chunk of keys (a batch
        decrypt costs one round trip, not one per key), however many are given."""
        ...

    def count_sightings(self, canonical_key: str) -> int:
        """The number of distinct (record_id, source) that have sighted *canonical_key*."""
        ...

    def field_counts(self) -> list[FieldCount]:
        """FieldValue counts grouped by (encryption_version, key_name, key_version), sorted by
        the three (no key name first)."""
        ...

    def key_names(self) -> list[str]:
        """The distinct key names kms_v1 fields are under (see :class:`FieldCount`), sorted;
        cheap however many fields there are."""
        ...

    def count_fields(
        self,
        *,
        encryption_version: str | None = None,
        key_version_below: int | None = None,
        key_name: str | None = None,
    ) -> int:
        """FieldValues matching every filter given; *key_name* is the key their envelope names
        (see :class:`FieldCount`)."""
        ...

    def iter_fields(
        self,
        *,
        encryption_version: str | None = None,
        key_version_below: int | None = None,
        batch_size: int = 500,
    ) -> Iterator[list[FieldValue]]:
        """Batches of matching FieldValues in canonical_key order (keyset pagination).

        Safe to update the yielded fields while iterating.
        """
        ...

    def compare_and_swap(
        self, canonical_key: str, expected_encrypted_data: str, update: FieldUpdate
    ) -> bool:
        """Replace the field's encryption properties only if its encrypted_data is still
        *expected_encrypted_data*. Returns False (and changes nothing) otherwise."""
        ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def insert_meta_if_absent(self, key: str, value: str) -> bool:
        """Store *value* unless *key* exists. True if this call stored it."""
        ...

    def compare_and_swap_meta(self, key: str, expected: str, value: str) -> bool: ...

    def close(self) -> None: ...


# -- shared by the stores ------------------------------------------------------------------


def utc_now() -> str:
    """The time stamps the stores write: UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def field_count(row: Sequence[Any]) -> FieldCount:
    """A FieldCount from a row of the stores' ``field_counts`` query: encryption_version,
    key_name, key_version, count."""
    encryption_version, key_name, key_version, count = row
    return FieldCount(encryption_version, int(key_version), int(count), key_name)


# A batch read builds thousands of FieldValues. The __init__ of a frozen dataclass sets each
# slot through object.__setattr__; the slots' own setters store the same values in half the
# time. FieldValue has no __post_init__ to skip (tests/test_store_sqlite.py checks that both
# ways build equal values); one added to it, or a field, fails here at import.
if hasattr(FieldValue, "__post_init__"):
    raise TypeError("field_from_row would skip FieldValue.__post_init__")
_NEW_FIELD = object.__new__
(
    _SET_KEY,
    _SET_NAME,
    _SET_DATA,
    _SET_KEY_VERSION,
    _SET_ENCRYPTION_VERSION,
    _SET_DEK_ID,
    _SET_IS_ENCRYPTED,
    _SET_UPDATED_AT,
) = (FieldValue.__dict__[f.name].__set__ for f in fields(FieldValue))


def field_from_row(row: Sequence[Any]) -> FieldValue:
    """A FieldValue from a row of the stores' field columns, in this order: canonical_key,
    field_name, encrypted_data, is_encrypted, key_version, encryption_version, dek_id,
    updated_at."""
    key, name, data, is_encrypted, key_version, encryption_version, dek_id, updated_at = row
    value: FieldValue = _NEW_FIELD(FieldValue)
    _SET_KEY(value, key)
    _SET_NAME(value, name)
    _SET_DATA(value, data)
    _SET_KEY_VERSION(value, key_version)
    _SET_ENCRYPTION_VERSION(value, encryption_version)
    _SET_DEK_ID(value, dek_id)
    _SET_IS_ENCRYPTED(value, bool(is_encrypted))
    _SET_UPDATED_AT(value, updated_at)
    return value


def swap_params(
    canonical_key: str, expected_encrypted_data: str, update: FieldUpdate, now: str
) -> tuple[object, ...]:
    """The parameters of the stores' field compare-and-swap, in this order: the new
    encrypted_data, key_version, encryption_version and dek_id, the time it is written, then
    the canonical_key and the encrypted_data the field must still have."""
    return (
        update.encrypted_data,
        update.key_version,
        update.encryption_version,
        update.dek_id,
        now,
        canonical_key,
        expected_encrypted_data,
    )


def attributes_json(attributes: Mapping[str, str | int | float | bool | None]) -> str:
    """A record's attributes as both stores write them: compact, strict JSON (no NaN, which
    PostgreSQL's jsonb rejects, so a copy between the stores always loads). Raises TypeError
    or ValueError for a value that has no such JSON."""
    return json.dumps(dict(attributes), separators=(",", ":"), allow_nan=False)


def keyset_pages(
    page: Callable[[str | None], list[FieldValue]], batch_size: int
) -> Iterator[list[FieldValue]]:
    """Non-empty batches from *page*, called with None for the first and then with the last
    canonical_key yielded, until a page comes back shorter than *batch_size*.

    Raises ValueError at once (not on the first ``next``) for a batch_size below 1, which
    SQL's LIMIT would otherwise read as "no limit" or refuse late.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    return _keyset_pages(page, batch_size)


def _keyset_pages(
    page: Callable[[str | None], list[FieldValue]], batch_size: int
) -> Iterator[list[FieldValue]]:
    batch = page(None)
    while batch:
        yield batch
        if len(batch) < batch_size:
            return
        batch = page(batch[-1].canonical_key)
