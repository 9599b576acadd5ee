"""The behaviour every GraphStore backend must have, as a reusable pytest base class.

A backend's test module subclasses :class:`StoreContract` (as ``Test<Backend>Contract``) and
provides:

* a fixture ``store`` yielding a fresh, empty, open store, closed on teardown (``close`` must be
  idempotent: some tests close the store themselves);
* ``stored_record(store, record_id)``, reading a Record back by the backend's own means, because
  the GraphStore protocol has no read method for records. Required;
* ``stored_sightings(store)``, every stored Sighting, in any order, read back likewise (the
  protocol only counts them). Required;
* ``reopen(store)``, closing *store* and returning a new store over the same data. Optional: a
  backend that cannot reopen (say, an in-memory one) leaves the default, which skips only
  :meth:`StoreContract.test_data_survives_close_and_reopen`.

Every test builds its own small data set, so the suite is deterministic, needs no ordering
between tests and runs in well under a second per backend.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace

import pytest

from heimdall.errors import StorageError
from heimdall.store.base import (
    FieldCount,
    FieldUpdate,
    FieldValue,
    GraphStore,
    RecordRow,
    Sighting,
)

__all__ = ["StoreContract"]

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
FIXED_TIME = "2026-01-02T03:04:05Z"
LATER = "2026-02-03T04:05:06Z"
LONG_AGO = "2000-01-01T00:00:00Z"

# (encryption_version, key_version_below) as passed to count_fields and iter_fields.
Filter = tuple[str | None, int | None]
FILTERS = [
    pytest.param((None, None), id="no-filter"),
    pytest.param(("kms_v1", None), id="encryption-version"),
    pytest.param((None, 3), id="key-version-below"),
    pytest.param(("kms_v1", 3), id="both"),
    pytest.param(("absent", None), id="no-match"),
]


def key(n: int) -> str:
    """A canonical key whose string order is the numeric order of *n*."""
    return f"email:hash:{n:064x}"


def envelope(tag: str) -> str:
    return '{"encryption_version":"kms_v1","ciphertext":"secret-envelope-' + tag + '"}'


def keyed_envelope(tag: str, key_identifier: str, *, dek_id: str = "0" * 32) -> str:
    """An envelope whose header names *key_identifier*, laid out as heimdall.envelope writes
    one (the stores derive a field's key_name from it)."""
    number = key_identifier.rpartition("-v")[2]
    return (
        '{"encryption_version":"kms_v1","algorithm":"AES-256-GCM","key_identifier":"'
        + key_identifier
        + '","key_version":'
        + (number if number.isdigit() else "1")
        + ',"dek_id":"'
        + dek_id
        + '","encrypted_dek":"AAAA","ciphertext":"secret-envelope-'
        + tag
        + '","encryption_timestamp":"2026-01-02T03:04:05Z"}'
    )


# Envelopes, and the key_name a store must derive from each: the key_identifier without -v<N>,
# or None where the envelope is not a kms_v1 one in heimdall's layout or names no version.
KEY_NAMES = [
    pytest.param(keyed_envelope("1", "heimdall-pii-v1"), "heimdall-pii", id="local"),
    pytest.param(keyed_envelope("2", "transit/pii-v12"), "transit/pii", id="vault"),
    pytest.param(keyed_envelope("3", "alias/key1-v-v3"), "alias/key1-v", id="last-version-only"),
    pytest.param(keyed_envelope("4", "unversioned"), None, id="no-version"),
    pytest.param(keyed_envelope("5", "trailing-v"), None, id="no-version-number"),
    pytest.param(
        keyed_envelope("6", "heimdall-pii-v1").replace("AES-256-GCM", "KMS-DIRECT"),
        "heimdall-pii",
        id="direct",
    ),
    pytest.param(
        '{"algorithm":"AES-256-GCM","encryption_version":"kms_v1","key_identifier":"k-v1"}',
        None,
        id="other-layout",
    ),
    pytest.param(envelope("7"), None, id="no-identifier"),
    pytest.param("v1:not-json-at-all", None, id="not-json"),
    pytest.param("", None, id="empty"),
]


def field_value(
    n: int,
    *,
    data: str | None = None,
    key_version: int = 1,
    encryption_version: str = "kms_v1",
    is_encrypted: bool = True,
    updated_at: str = FIXED_TIME,
) -> FieldValue:
    return FieldValue(
        canonical_key=key(n),
        field_name="email",
        encrypted_data=envelope(str(n)) if data is None else data,
        key_version=key_version,
        encryption_version=encryption_version,
        dek_id=f"{n:032x}",
        is_encrypted=is_encrypted,
        updated_at=updated_at,
    )


def sighting(
    n: int, record_id: str = "record-1", *, source: str = "crm", seen_at: str = FIXED_TIME
) -> Sighting:
    return Sighting(canonical_key=key(n), record_id=record_id, source=source, seen_at=seen_at)


def in_order(sightings: Iterable[Sighting]) -> list[Sighting]:
    """*sightings* sorted by every field, to compare a store's with the ones expected."""
    return sorted(sightings, key=lambda s: (s.canonical_key, s.record_id, s.source, s.seen_at))


def repeated_sightings() -> tuple[list[Sighting], list[Sighting]]:
    """Sightings as an ingest run twice wrote them before they were made unique, and, sorted
    by in_order, what the schema migration must keep of them: the earliest of each
    (canonical_key, record_id, source). r1's sighting of key 1 comes three times, the first
    written not the earliest; r2's twice at one time; the others once each."""
    written = [
        sighting(1, "r1", seen_at=FIXED_TIME),
        sighting(1, "r1", seen_at=LONG_AGO),
        sighting(1, "r2"),
        sighting(1, "r1", source="billing", seen_at=LATER),
        sighting(2, "r1"),
        sighting(1, "r1", seen_at=LATER),
        sighting(1, "r2"),
    ]
    kept = [
        sighting(1, "r1", source="billing", seen_at=LATER),
        sighting(1, "r1", seen_at=LONG_AGO),
        sighting(1, "r2"),
        sighting(2, "r1"),
    ]
    return written, kept


def mixed_fields() -> list[FieldValue]:
    """20 fields over two encryption versions and key versions 1-4, in scrambled key order."""
    return [
        field_value(
            n,
            encryption_version="legacy" if n % 3 == 0 else "kms_v1",
            key_version=1 + n % 4,
        )
        for n in ((i * 7) % 20 for i in range(20))
    ]


def matches(f: FieldValue, filters: Filter) -> bool:
    encryption_version, key_version_below = filters
    return (encryption_version is None or f.encryption_version == encryption_version) and (
        key_version_below is None or f.key_version < key_version_below
    )


def bounded(batches: Iterator[list[FieldValue]]) -> list[list[FieldValue]]:
    """At most 100 batches, so a backend that pages forever fails instead of hanging."""
    return list(itertools.islice(batches, 100))


def rewrap(f: FieldValue, *, key_version: int) -> FieldUpdate:
    return FieldUpdate(
        encrypted_data=envelope(f"{f.canonical_key}-v{key_version}"),
        key_version=key_version,
        encryption_version=f.encryption_version,
        dek_id=f.dek_id,
    )


class StoreContract:
    """Contract tests for a GraphStore; see the module docstring for the hooks to provide."""

    def stored_record(self, store: GraphStore, record_id: str) -> RecordRow | None:
        """The Record stored under *record_id*, read back outside the GraphStore protocol."""
        raise NotImplementedError(f"{type(self).__name__} must implement stored_record")

    def stored_sightings(self, store: GraphStore) -> list[Sighting]:
        """Every stored Sighting, read back outside the GraphStore protocol."""
        raise NotImplementedError(f"{type(self).__name__} must implement stored_sightings")

    def reopen(self, store: GraphStore) -> GraphStore:
        """Close *store* and open the same data again. Override if the backend can."""
        pytest.skip(f"{type(self).__name__} cannot reopen a closed store")

    # -- FieldValues -------------------------------------------------------------------------

    def test_written_field_round_trips_every_property(self, store: GraphStore) -> None:
        encrypted = field_value(1, key_version=7, encryption_version="kms_v1")
        in_clear = field_value(2, key_version=1, encryption_version="legacy", is_encrypted=False)
        store.write_batch([encrypted, in_clear], [], [])

        assert store.get_field(encrypted.canonical_key) == encrypted
        assert store.get_field(in_clear.canonical_key) == in_clear

    def test_write_stamps_updated_at_when_the_field_has_none(self, store: GraphStore) -> None:
        written = field_value(1, updated_at="")
        store.write_batch([written], [], [])

        got = store.get_field(written.canonical_key)
        assert got is not None
        assert TIMESTAMP.fullmatch(got.updated_at)
        assert replace(got, updated_at="") == written

    def test_get_field_of_unknown_key_returns_none(self, store: GraphStore) -> None:
        store.write_batch([field_value(1)], [], [])

        assert store.get_field(key(2)) is None

    def test_write_batch_of_nothing_inserts_nothing(self, store: GraphStore) -> None:
        assert store.write_batch([], [], []) == 0
        assert store.field_counts() == []

    def test_write_batch_first_writer_wins_within_a_batch(self, store: GraphStore) -> None:
        first = field_value(1, data=envelope("first"))
        second = field_value(1, data=envelope("second"))

        inserted = store.write_batch([first, field_value(2), second], [], [])

        assert inserted == 2
        assert store.get_field(key(1)) == first

    def test_write_batch_first_writer_wins_across_batches(self, store: GraphStore) -> None:
        first = field_value(1, data=envelope("first"))
        assert store.write_batch([first], [], []) == 1

        assert store.write_batch([field_value(1, data=envelope("second"))], [], []) == 0
        assert store.get_field(key(1)) == first
        assert (
            store.write_batch([field_value(1, data=envelope("third")), field_value(2)], [], []) == 1
        )
        assert store.get_field(key(1)) == first
        assert store.count_fields() == 2

    def test_existing_keys_returns_the_stored_subset(self, store: GraphStore) -> None:
        store.write_batch([field_value(1), field_value(3)], [], [])

        assert store.existing_keys([key(1), key(2), key(3), key(1)]) == {key(1), key(3)}
        assert store.existing_keys([key(4)]) == set()
        assert store.existing_keys([]) == set()

    def test_existing_keys_answers_more_keys_than_one_query_binds(self, store: GraphStore) -> None:
        # Ingest asks about every field of a batch at once; SQLite binds at most 999 per query.
        store.write_batch([field_value(n) for n in range(0, 2400, 2)], [], [])

        assert store.existing_keys([key(n) for n in range(2400)]) == {
            key(n) for n in range(0, 2400, 2)
        }

    def test_get_fields_returns_each_stored_field_once_and_leaves_out_the_missing(
        self, store: GraphStore
    ) -> None:
        encrypted = field_value(1, key_version=7)
        in_clear = field_value(3, encryption_version="legacy", is_encrypted=False)
        store.write_batch([encrypted, in_clear, field_value(5)], [], [])

        got = store.get_fields([key(1), key(2), key(3), key(1), key(4)])

        assert got == {key(1): encrypted, key(3): in_clear}
        assert store.get_fields([key(4)]) == {}
        assert store.get_fields([]) == {}

    def test_get_fields_answers_more_keys_than_one_query_binds(self, store: GraphStore) -> None:
        # A decrypt batch asks for up to HMD_API_MAX_BATCH keys at once; SQLite binds at most
        # 999 per query. Stored keys sit on both sides of each place a 500-key chunk ends (the
        # keys asked for again at the end change no chunk).
        stored = sorted({*range(0, 1202, 3), 499, 500, 999, 1000, 1001})
        store.write_batch([field_value(n) for n in stored], [], [])
        asked = [key(n) for n in range(1202)]

        got = store.get_fields([*asked, key(499), key(1000)])

        assert got == {key(n): field_value(n) for n in stored}

    # -- Sightings and Records ---------------------------------------------------------------

    def test_sightings_are_counted_per_canonical_key(self, store: GraphStore) -> None:
        store.write_batch(
            [field_value(1), field_value(2), field_value(3)],
            [sighting(1, "r1"), sighting(1, "r2"), sighting(2, "r2")],
            [],
        )
        # A later batch may sight a value that an earlier batch stored.
        store.write_batch([], [sighting(1, "r3")], [])

        assert store.count_sightings(key(1)) == 3
        assert store.count_sightings(key(2)) == 1
        assert store.count_sightings(key(3)) == 0
        assert store.count_sightings(key(4)) == 0

    def test_writing_the_same_sightings_again_keeps_one_each_with_the_first_seen_at(
        self, store: GraphStore
    ) -> None:
        first = [sighting(1, "r1"), sighting(2, "r1"), sighting(1, "r2")]
        store.write_batch([field_value(1), field_value(2)], first, [])

        # An ingest run again: the same occurrences, seen later.
        store.write_batch([], [replace(s, seen_at=LATER) for s in first], [])

        assert in_order(self.stored_sightings(store)) == in_order(first)

    def test_a_sighting_repeated_within_a_batch_is_stored_once_the_first_kept(
        self, store: GraphStore
    ) -> None:
        store.write_batch(
            [field_value(1)],
            [sighting(1, "r1"), sighting(1, "r2"), sighting(1, "r1", seen_at=LATER)],
            [],
        )

        assert store.count_sightings(key(1)) == 2
        assert in_order(self.stored_sightings(store)) == [sighting(1, "r1"), sighting(1, "r2")]

    def test_a_batch_repeating_many_sightings_keeps_the_first_of_each(
        self, store: GraphStore
    ) -> None:
        # Enough repeats that a backend which lets its sort order pick would keep another.
        fields = [field_value(n) for n in range(50)]
        batch = [
            sighting(
                i % 50,
                f"r{i % 7}",
                seen_at=f"2026-01-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z",
            )
            for i in range(4000)
        ]
        firsts: dict[tuple[str, str, str], Sighting] = {}
        for s in batch:
            firsts.setdefault((s.canonical_key, s.record_id, s.source), s)

        store.write_batch(fields, batch, [])

        assert in_order(self.stored_sightings(store)) == in_order(firsts.values())

    def test_count_sightings_is_unchanged_by_writing_a_batch_again(self, store: GraphStore) -> None:
        fields = [field_value(1), field_value(2)]
        sightings = [sighting(1, "r1"), sighting(2, "r1"), sighting(1, "r2")]
        records = [RecordRow("r1", "crm", FIXED_TIME, {}), RecordRow("r2", "crm", FIXED_TIME, {})]
        store.write_batch(fields, sightings, records)

        assert store.write_batch(fields, sightings, records) == 0

        assert (store.count_sightings(key(1)), store.count_sightings(key(2))) == (2, 1)

    def test_a_sighting_is_one_per_value_record_and_source(self, store: GraphStore) -> None:
        store.write_batch([field_value(1), field_value(2)], [sighting(1, "r1")], [])

        # The record comes back with another value: a new sighting, and the old one stays,
        # since that value was seen. The same record id from another source is another one.
        store.write_batch([], [sighting(2, "r1", seen_at=LATER)], [])
        store.write_batch([], [sighting(1, "r1", source="billing", seen_at=LATER)], [])

        assert (store.count_sightings(key(1)), store.count_sightings(key(2))) == (2, 1)
        assert in_order(self.stored_sightings(store)) == [
            sighting(1, "r1", source="billing", seen_at=LATER),
            sighting(1, "r1"),
            sighting(2, "r1", seen_at=LATER),
        ]

    def test_record_with_existing_record_id_is_replaced(self, store: GraphStore) -> None:
        old = RecordRow("record-1", "crm", LONG_AGO, {"country": "SE", "tier": 1})
        other = RecordRow("record-2", "crm", LONG_AGO, {"country": "NO"})
        new = RecordRow("record-1", "billing", FIXED_TIME, {"country": "DK"})
        store.write_batch([], [], [old, other])

        store.write_batch([], [], [new])

        assert self.stored_record(store, "record-1") == new
        assert self.stored_record(store, "record-2") == other

    def test_record_attributes_keep_their_json_types(self, store: GraphStore) -> None:
        record = RecordRow(
            "record-1",
            "crm",
            FIXED_TIME,
            {"text": "x", "count": 3, "ratio": 0.5, "active": True, "missing": None},
        )
        store.write_batch([], [], [record])

        stored = self.stored_record(store, "record-1")
        assert stored == record
        assert stored is not None
        # == alone would accept 1 for True and 3.0 for 3.
        assert [type(v) for v in stored.attributes.values()] == [
            type(v) for v in record.attributes.values()
        ]

    # -- write_batch atomicity ---------------------------------------------------------------

    def test_write_batch_with_orphan_sighting_raises_and_writes_nothing(
        self, store: GraphStore
    ) -> None:
        store.write_batch([field_value(1)], [sighting(1)], [])
        batch_fields = [field_value(2), field_value(3)]
        orphan = sighting(99)

        with pytest.raises(StorageError) as caught:
            store.write_batch(
                batch_fields,
                [sighting(1, "r2"), sighting(2, "r2"), orphan],
                [RecordRow("r2", "crm", FIXED_TIME, {})],
            )

        assert store.existing_keys([key(2), key(3), key(99)]) == set()
        assert store.count_fields() == 1
        assert store.count_sightings(key(1)) == 1
        assert store.count_sightings(key(2)) == 0
        assert self.stored_record(store, "r2") is None
        message = str(caught.value)
        assert "\n" not in message
        assert "secret-envelope" not in message

    def test_a_sighting_already_stored_does_not_hide_an_orphan_in_its_batch(
        self, store: GraphStore
    ) -> None:
        store.write_batch([field_value(1)], [sighting(1)], [])

        with pytest.raises(StorageError):
            store.write_batch([field_value(2)], [sighting(1), sighting(2), sighting(99)], [])

        assert store.existing_keys([key(2)]) == set()
        assert self.stored_sightings(store) == [sighting(1)]

    def test_store_stays_usable_after_a_failed_batch(self, store: GraphStore) -> None:
        with pytest.raises(StorageError):
            store.write_batch([field_value(1)], [sighting(99)], [])

        assert store.write_batch([field_value(1)], [sighting(1)], []) == 1
        assert store.count_sightings(key(1)) == 1

    # -- counts and iteration ----------------------------------------------------------------

    def test_field_counts_group_by_version_pair_in_sorted_order(self, store: GraphStore) -> None:
        store.write_batch(
            [
                field_value(1, encryption_version="kms_v1", key_version=10),
                field_value(2, encryption_version="legacy", key_version=1),
                field_value(3, encryption_version="kms_v1", key_version=2),
                field_value(4, encryption_version="kms_v1", key_version=10),
                field_value(5, encryption_version="kms_v1", key_version=2),
                field_value(6, encryption_version="kms_v1", key_version=10),
            ],
            [],
            [],
        )

        # key_version sorts as a number: 2 before 10.
        assert store.field_counts() == [
            FieldCount("kms_v1", 2, 2),
            FieldCount("kms_v1", 10, 3),
            FieldCount("legacy", 1, 1),
        ]

    @pytest.mark.parametrize(("data", "key_name"), KEY_NAMES)
    def test_field_counts_name_the_key_each_envelope_is_under(
        self, store: GraphStore, data: str, key_name: str | None
    ) -> None:
        store.write_batch([field_value(1, data=data), field_value(2, data=data)], [], [])

        assert store.field_counts() == [FieldCount("kms_v1", 1, 2, key_name)]

    def test_field_counts_group_by_key_name_before_key_version(self, store: GraphStore) -> None:
        store.write_batch(
            [
                field_value(1, data=keyed_envelope("1", "b-key-v2"), key_version=2),
                field_value(2, data=keyed_envelope("2", "a-key-v3"), key_version=3),
                field_value(3, data=keyed_envelope("3", "b-key-v1")),
                field_value(4, data=keyed_envelope("4", "b-key-v2"), key_version=2),
                field_value(5),
                field_value(6, encryption_version="legacy", data="legacy"),
            ],
            [],
            [],
        )

        assert store.field_counts() == [
            FieldCount("kms_v1", 1, 1, None),
            FieldCount("kms_v1", 3, 1, "a-key"),
            FieldCount("kms_v1", 1, 1, "b-key"),
            FieldCount("kms_v1", 2, 2, "b-key"),
            FieldCount("legacy", 1, 1, None),
        ]

    def test_a_compare_and_swap_moves_the_field_to_the_key_its_new_envelope_names(
        self, store: GraphStore
    ) -> None:
        original = field_value(1, data=keyed_envelope("1", "old-key-v4"), key_version=4)
        store.write_batch([original], [], [])
        update = FieldUpdate(keyed_envelope("1", "new-key-v1"), 1, "kms_v1", original.dek_id)

        assert store.compare_and_swap(key(1), original.encrypted_data, update)

        assert store.field_counts() == [FieldCount("kms_v1", 1, 1, "new-key")]

    def test_count_fields_under_one_key_counts_no_other_key(self, store: GraphStore) -> None:
        store.write_batch(
            [
                field_value(1, data=keyed_envelope("1", "pii-v1")),
                field_value(2, data=keyed_envelope("2", "pii-v2"), key_version=2),
                field_value(3, data=keyed_envelope("3", "pii-old-v1")),
                field_value(4, data=keyed_envelope("4", "transit/pii-v1")),
                field_value(5),
            ],
            [],
            [],
        )

        assert store.count_fields(key_name="pii") == 2
        assert store.count_fields(key_name="pii", key_version_below=2) == 1
        assert store.count_fields(encryption_version="kms_v1", key_name="transit/pii") == 1
        assert store.count_fields(key_name="absent") == 0

    def test_key_names_are_the_distinct_keys_of_kms_fields(self, store: GraphStore) -> None:
        assert store.key_names() == []
        store.write_batch(
            [
                field_value(1, data=keyed_envelope("1", "pii-v1")),
                field_value(2, data=keyed_envelope("2", "pii-v2"), key_version=2),
                field_value(3, data=keyed_envelope("3", "aws:alias/pii-v1")),
                field_value(4, data=keyed_envelope("4", "transit/pii-v7"), key_version=7),
                field_value(5),
                field_value(6, encryption_version="legacy", data="legacy"),
            ],
            [],
            [],
        )

        assert store.key_names() == ["aws:alias/pii", "pii", "transit/pii"]

    def test_field_counts_of_empty_store_is_empty(self, store: GraphStore) -> None:
        assert store.field_counts() == []

    @pytest.mark.parametrize("filters", FILTERS)
    def test_count_fields_applies_each_filter_and_both_together(
        self, store: GraphStore, filters: Filter
    ) -> None:
        fields = mixed_fields()
        store.write_batch(fields, [], [])
        encryption_version, key_version_below = filters

        counted = store.count_fields(
            encryption_version=encryption_version, key_version_below=key_version_below
        )

        assert counted == sum(matches(f, filters) for f in fields)

    @pytest.mark.parametrize("filters", FILTERS)
    def test_iter_fields_pages_every_match_once_in_key_order(
        self, store: GraphStore, filters: Filter
    ) -> None:
        fields = mixed_fields()
        store.write_batch(fields, [], [])
        encryption_version, key_version_below = filters

        batches = bounded(
            store.iter_fields(
                encryption_version=encryption_version,
                key_version_below=key_version_below,
                batch_size=3,
            )
        )

        expected = sorted((f for f in fields if matches(f, filters)), key=lambda f: f.canonical_key)
        assert [f for batch in batches for f in batch] == expected
        assert all(len(batch) == 3 for batch in batches[:-1])
        assert all(0 < len(batch) <= 3 for batch in batches)

    def test_iter_fields_never_yields_an_empty_batch(self, store: GraphStore) -> None:
        store.write_batch([field_value(n) for n in range(6)], [], [])

        assert [len(batch) for batch in bounded(store.iter_fields(batch_size=3))] == [3, 3]
        assert bounded(store.iter_fields(encryption_version="absent")) == []

    def test_iter_fields_yields_each_field_once_while_caller_rewraps_it_out_of_the_filter(
        self, store: GraphStore
    ) -> None:
        # Offset pagination would skip fields here: each rewrap shrinks the filtered set.
        store.write_batch([field_value(n, key_version=1) for n in range(10)], [], [])
        yielded: list[str] = []

        # Lazily, so each batch's swaps land before the next batch is read; capped like bounded.
        batches = store.iter_fields(key_version_below=2, batch_size=3)
        for batch in itertools.islice(batches, 100):
            for f in batch:
                yielded.append(f.canonical_key)
                assert store.compare_and_swap(
                    f.canonical_key, f.encrypted_data, rewrap(f, key_version=2)
                )

        assert yielded == [key(n) for n in range(10)]
        assert store.count_fields(key_version_below=2) == 0
        assert store.count_fields(key_version_below=3) == 10

    def test_iter_fields_yields_each_field_once_while_caller_rewrites_it_within_the_filter(
        self, store: GraphStore
    ) -> None:
        # Restarting from the top would yield the rewritten fields again, forever.
        store.write_batch([field_value(n, key_version=1) for n in range(10)], [], [])
        yielded: list[str] = []

        # Lazily, so each batch's swaps land before the next batch is read; capped like bounded.
        batches = store.iter_fields(key_version_below=5, batch_size=3)
        for batch in itertools.islice(batches, 100):
            for f in batch:
                yielded.append(f.canonical_key)
                assert store.compare_and_swap(
                    f.canonical_key, f.encrypted_data, rewrap(f, key_version=2)
                )

        assert yielded == [key(n) for n in range(10)]

    def test_iter_fields_rejects_a_batch_size_below_one(self, store: GraphStore) -> None:
        store.write_batch([field_value(1)], [], [])

        for batch_size in (0, -1):
            with pytest.raises(ValueError, match="batch_size"):
                bounded(store.iter_fields(batch_size=batch_size))

    # -- compare_and_swap --------------------------------------------------------------------

    def test_compare_and_swap_replaces_encryption_properties_when_expected_matches(
        self, store: GraphStore
    ) -> None:
        original = field_value(1, key_version=1, updated_at=LONG_AGO)
        store.write_batch([original], [], [])
        update = FieldUpdate(
            encrypted_data=envelope("rewrapped"),
            key_version=2,
            encryption_version="kms_v2",
            dek_id="f" * 32,
        )

        assert store.compare_and_swap(key(1), original.encrypted_data, update) is True

        got = store.get_field(key(1))
        assert got is not None
        assert TIMESTAMP.fullmatch(got.updated_at)
        assert got.updated_at != LONG_AGO
        assert got == replace(
            original,
            encrypted_data=update.encrypted_data,
            key_version=2,
            encryption_version="kms_v2",
            dek_id="f" * 32,
            updated_at=got.updated_at,
        )

    def test_compare_and_swap_with_stale_expected_changes_nothing(self, store: GraphStore) -> None:
        original = field_value(1)
        store.write_batch([original], [], [])

        swapped = store.compare_and_swap(key(1), envelope("stale"), rewrap(original, key_version=2))

        assert swapped is False
        assert store.get_field(key(1)) == original

    def test_compare_and_swap_succeeds_once_per_expected_value(self, store: GraphStore) -> None:
        # Two rotators racing on one field: only the first swap from a given value may land.
        original = field_value(1)
        store.write_batch([original], [], [])

        first = store.compare_and_swap(
            key(1), original.encrypted_data, rewrap(original, key_version=2)
        )
        second = store.compare_and_swap(
            key(1), original.encrypted_data, rewrap(original, key_version=3)
        )

        assert (first, second) == (True, False)
        got = store.get_field(key(1))
        assert got is not None
        assert got.key_version == 2

    def test_compare_and_swap_of_unknown_key_returns_false(self, store: GraphStore) -> None:
        original = field_value(1)
        store.write_batch([original], [], [])

        assert (
            store.compare_and_swap(key(2), original.encrypted_data, rewrap(original, key_version=2))
            is False
        )
        assert store.get_field(key(2)) is None
        assert store.get_field(key(1)) == original

    # -- meta --------------------------------------------------------------------------------

    def test_get_meta_of_unknown_key_returns_none(self, store: GraphStore) -> None:
        store.set_meta("a", "1")

        assert store.get_meta("b") is None

    def test_set_meta_stores_and_overwrites(self, store: GraphStore) -> None:
        store.set_meta("a", "1")
        store.set_meta("b", "2")
        store.set_meta("a", "3")

        assert (store.get_meta("a"), store.get_meta("b")) == ("3", "2")

    def test_insert_meta_if_absent_keeps_the_first_value(self, store: GraphStore) -> None:
        assert store.insert_meta_if_absent("a", "1") is True
        assert store.insert_meta_if_absent("a", "2") is False
        assert store.get_meta("a") == "1"

    def test_compare_and_swap_meta_succeeds_only_from_the_expected_value(
        self, store: GraphStore
    ) -> None:
        store.set_meta("a", "1")

        assert store.compare_and_swap_meta("a", "0", "2") is False
        assert store.get_meta("a") == "1"
        assert store.compare_and_swap_meta("a", "1", "2") is True
        assert store.get_meta("a") == "2"
        assert store.compare_and_swap_meta("absent", "1", "2") is False
        assert store.get_meta("absent") is None

    # -- lifecycle ---------------------------------------------------------------------------

    def test_data_survives_close_and_reopen(self, store: GraphStore) -> None:
        written = field_value(1)
        record = RecordRow("record-1", "crm", FIXED_TIME, {"country": "SE"})
        store.write_batch([written], [sighting(1)], [record])
        store.set_meta("a", "1")

        reopened = self.reopen(store)
        try:
            assert reopened.get_field(key(1)) == written
            assert reopened.count_sightings(key(1)) == 1
            assert self.stored_record(reopened, "record-1") == record
            assert reopened.get_meta("a") == "1"
            assert reopened.write_batch([field_value(1, data=envelope("late"))], [], []) == 0
        finally:
            reopened.close()

    def test_close_is_idempotent_and_later_calls_raise_storage_error(
        self, store: GraphStore
    ) -> None:
        store.close()
        store.close()

        with pytest.raises(StorageError):
            store.get_field(key(1))
        with pytest.raises(StorageError):
            store.write_batch([field_value(1)], [], [])
