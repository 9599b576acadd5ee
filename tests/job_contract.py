"""The behaviour every JobStore backend must have, as a reusable pytest base class.

A backend's test module subclasses :class:`JobStoreContract` (as ``Test<Backend>JobContract``)
and provides:

* a fixture ``store`` yielding a fresh, empty, open store that is both a GraphStore and a
  JobStore, closed on teardown;
* ``open_again(store)``, a second open store over the same data (another connection, as another
  worker process would have). The caller closes it. Required.

The fields are written with the GraphStore's ``write_batch``; jobs target key version 2, so a
kms_v1 field on version 1 is pending and one on version 2 is done. No test calls the store
inside a claim block: on SQLite the claim holds the store's only connection, as it would in
``run_job``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import Protocol

import pytest

from heimdall.errors import LifecycleError, StorageError
from heimdall.store.base import FieldUpdate, FieldValue, GraphStore
from heimdall.store.jobs import Job, JobKind, JobState, JobStore
from store_contract import TIMESTAMP, envelope, field_value, key, keyed_envelope, rewrap

__all__ = ["JobGraphStore", "JobStoreContract"]

TARGET = 2
# The key a keyed job brings fields to; "a-key" sorts before it and "z-key" after.
TARGET_KEY = "m-key"
# Seconds a thread waits for the other at the start line before the test fails.
BARRIER_TIMEOUT = 30
FINISHED = [JobState.DONE, JobState.CANCELLED]


class JobGraphStore(GraphStore, JobStore, Protocol):
    """A store holding both the fields and the jobs working on them."""


def new_job(
    job_id: str = "job-1",
    *,
    include_legacy: bool = False,
    state: JobState = JobState.RUNNING,
    total: int = 0,
    created_at: str = "",
) -> Job:
    return Job(
        job_id=job_id,
        kind=JobKind.ROTATION,
        target_version=TARGET,
        include_legacy=include_legacy,
        state=state,
        total=total,
        created_at=created_at,
    )


def kms_fields(numbers: Iterable[int], *, key_version: int = 1) -> list[FieldValue]:
    return [field_value(n, key_version=key_version) for n in numbers]


def legacy_fields(numbers: Iterable[int]) -> list[FieldValue]:
    # A legacy field's key_version says nothing about the KMS: it is pending whatever it is.
    return [field_value(n, encryption_version="legacy", key_version=5) for n in numbers]


def keyed_fields(
    numbers: Iterable[int], key_name: str, *, key_version: int = 1, shared_dek: bool = False
) -> list[FieldValue]:
    """kms_v1 fields under *key_name*; with *shared_dek*, fields n and n+1 (n even) share a
    data key, as fields written one after the other do."""
    out = []
    for n in numbers:
        dek_id = f"{n // 2 if shared_dek else n:032x}"
        data = keyed_envelope(str(n), f"{key_name}-v{key_version}", dek_id=dek_id)
        out.append(replace(field_value(n, data=data, key_version=key_version), dek_id=dek_id))
    return out


def moved(f: FieldValue, *, key_name: str = TARGET_KEY, key_version: int = TARGET) -> FieldUpdate:
    """*f* rewrapped under *key_name* at *key_version*."""
    data = keyed_envelope(f.canonical_key, f"{key_name}-v{key_version}", dek_id=f.dek_id)
    return FieldUpdate(data, key_version, "kms_v1", f.dek_id)


def keys(fields: Iterable[FieldValue]) -> set[str]:
    return {f.canonical_key for f in fields}


class JobStoreContract:
    """Contract tests for a JobStore; see the module docstring for the hooks to provide."""

    def open_again(self, store: JobGraphStore) -> JobGraphStore:
        """Another open store on *store*'s data, as a second worker would have."""
        raise NotImplementedError(f"{type(self).__name__} must implement open_again")

    def with_job(
        self, store: JobGraphStore, fields: list[FieldValue], *, include_legacy: bool = False
    ) -> Job:
        """*fields* written, and a job over them created with its total counted."""
        store.write_batch(fields, [], [])
        draft = new_job(include_legacy=include_legacy)
        job = replace(draft, total=store.count_pending(draft))
        store.create_job(job)
        return job

    def current(self, store: JobStore, job: Job) -> Job:
        got = store.get_job(job.job_id)
        assert got is not None
        return got

    # -- jobs ----------------------------------------------------------------------------------

    @pytest.mark.parametrize("target_key", ["", TARGET_KEY])
    def test_created_job_reads_back_with_every_property(
        self, store: JobGraphStore, target_key: str
    ) -> None:
        job = replace(
            new_job(include_legacy=True, total=12), kind=JobKind.MIGRATION, target_key=target_key
        )
        store.create_job(job)

        got = store.get_job(job.job_id)
        assert got is not None
        assert TIMESTAMP.fullmatch(got.created_at) and TIMESTAMP.fullmatch(got.updated_at)
        assert replace(got, created_at="", updated_at="") == job

    def test_created_job_keeps_the_creation_time_it_was_given(self, store: JobGraphStore) -> None:
        store.create_job(new_job(created_at="2020-01-01T00:00:00Z"))

        assert self.current(store, new_job()).created_at == "2020-01-01T00:00:00Z"

    def test_unknown_job_reads_as_none(self, store: JobGraphStore) -> None:
        store.create_job(new_job("job-1"))

        assert store.get_job("job-2") is None

    def test_without_jobs_there_is_no_active_or_latest_job(self, store: JobGraphStore) -> None:
        assert store.active_job() is None
        assert store.latest_job() is None

    def test_active_job_is_the_newest_running_or_paused_one(self, store: JobGraphStore) -> None:
        store.create_job(new_job("old", created_at="2020-01-01T00:00:00Z"))
        store.create_job(
            new_job("paused", state=JobState.PAUSED, created_at="2020-01-02T00:00:00Z")
        )
        store.create_job(new_job("newest", state=JobState.DONE, created_at="2020-01-03T00:00:00Z"))

        active, latest = store.active_job(), store.latest_job()
        assert active is not None and active.job_id == "paused"
        assert latest is not None and latest.job_id == "newest"

    def test_jobs_created_in_the_same_second_are_ordered_by_creation(
        self, store: JobGraphStore
    ) -> None:
        for job_id in ("b", "c", "a"):
            store.create_job(new_job(job_id, created_at="2020-01-01T00:00:00Z"))

        latest = store.latest_job()
        assert latest is not None and latest.job_id == "a"

    def test_job_moves_between_running_and_paused_and_back(self, store: JobGraphStore) -> None:
        store.create_job(new_job())

        assert store.set_job_state("job-1", JobState.PAUSED).state is JobState.PAUSED
        assert self.current(store, new_job()).state is JobState.PAUSED
        assert store.active_job() is not None
        assert store.set_job_state("job-1", JobState.RUNNING).state is JobState.RUNNING

    @pytest.mark.parametrize("finished", FINISHED)
    @pytest.mark.parametrize("wanted", list(JobState))
    def test_finished_job_refuses_any_other_state(
        self, store: JobGraphStore, finished: JobState, wanted: JobState
    ) -> None:
        store.create_job(new_job())
        store.set_job_state("job-1", finished)

        if wanted is finished:
            # Two workers may both close the job: the second close changes nothing.
            assert store.set_job_state("job-1", wanted).state is finished
            return
        with pytest.raises(LifecycleError, match="cannot change"):
            store.set_job_state("job-1", wanted)
        assert self.current(store, new_job()).state is finished
        assert store.active_job() is None

    def test_changing_the_state_of_an_unknown_job_raises_storage_error(
        self, store: JobGraphStore
    ) -> None:
        with pytest.raises(StorageError, match="job-9"):
            store.set_job_state("job-9", JobState.PAUSED)

    # -- pending fields ------------------------------------------------------------------------

    def test_pending_are_kms_fields_below_the_target_version(self, store: JobGraphStore) -> None:
        below = kms_fields(range(3))
        at_or_above = kms_fields([3, 4], key_version=TARGET) + kms_fields(
            [5], key_version=TARGET + 1
        )
        store.write_batch(below + at_or_above + legacy_fields(range(6, 10)), [], [])

        assert store.count_pending(new_job()) == 3

    def test_legacy_fields_are_pending_only_when_the_job_migrates_them(
        self, store: JobGraphStore
    ) -> None:
        store.write_batch([*kms_fields(range(3)), *legacy_fields(range(3, 7))], [], [])

        assert store.count_pending(new_job(include_legacy=False)) == 3
        assert store.count_pending(new_job(include_legacy=True)) == 7

    def test_fields_that_failed_in_the_job_are_not_pending(self, store: JobGraphStore) -> None:
        job = self.with_job(
            store, kms_fields(range(3)) + legacy_fields(range(3, 5)), include_legacy=True
        )
        with store.claim(job, 10) as claim:
            for f in claim.fields:
                if f.canonical_key in (key(1), key(4)):
                    claim.fail(f, "DecryptionFailed")

        assert store.count_pending(job) == 3
        assert store.count_pending(replace(job, job_id="job-2")) == 5

    # -- jobs with a target key ----------------------------------------------------------------

    def keyed_store(self, store: JobGraphStore) -> dict[str, set[str]]:
        """Fields of every kind written to *store*, by kind: the canonical keys."""
        kinds = {
            "target below": keyed_fields(range(3), TARGET_KEY),
            "target done": keyed_fields([3, 4], TARGET_KEY, key_version=TARGET)
            + keyed_fields([5], TARGET_KEY, key_version=TARGET + 1),
            # Another key is pending whatever its version, above the target's too.
            "key before": keyed_fields([6, 7], "a-key", key_version=TARGET + 5),
            "key after": keyed_fields([8, 9], "z-key"),
            "a longer name": keyed_fields([10], TARGET_KEY + "-2", key_version=TARGET),
            "no key": [field_value(11, key_version=TARGET)],
            "legacy": legacy_fields([12, 13]),
        }
        store.write_batch([f for fields in kinds.values() for f in fields], [], [])
        return {kind: keys(fields) for kind, fields in kinds.items()}

    def test_a_job_with_a_key_takes_fields_under_any_other_key_and_below_its_version(
        self, store: JobGraphStore
    ) -> None:
        kinds = self.keyed_store(store)
        job = replace(new_job(), target_key=TARGET_KEY)
        pending = set().union(*(v for k, v in kinds.items() if k not in ("target done", "legacy")))

        assert store.count_pending(job) == len(pending) == 9
        with store.claim(job, 100) as claim:
            assert keys(claim.fields) == pending
        with_legacy = replace(job, job_id="job-2", include_legacy=True)
        assert store.count_pending(with_legacy) == len(pending) + 2
        with store.claim(with_legacy, 100) as claim:
            assert keys(claim.fields) == pending | kinds["legacy"]

    def test_small_claims_of_a_job_with_a_key_take_each_pending_field_once(
        self, store: JobGraphStore
    ) -> None:
        kinds = self.keyed_store(store)
        job = replace(new_job(include_legacy=True), target_key=TARGET_KEY)
        store.create_job(replace(job, total=store.count_pending(job)))
        claimed: list[str] = []

        for _ in range(20):
            with store.claim(job, 2) as claim:
                claimed += [f.canonical_key for f in claim.fields]
                for f in claim.fields:
                    claim.update(f, moved(f))
            if not claim.fields:
                break

        assert sorted(claimed) == sorted(set().union(*kinds.values()) - kinds["target done"])
        assert store.count_pending(job) == 0
        assert self.current(store, job).completed == 11

    def test_data_keys_of_a_job_with_a_key_are_those_of_its_pending_fields(
        self, store: JobGraphStore
    ) -> None:
        store.write_batch(
            keyed_fields(range(4), "a-key", shared_dek=True)
            + keyed_fields(range(4, 8), TARGET_KEY, key_version=TARGET, shared_dek=True)
            + keyed_fields(range(8, 10), TARGET_KEY, shared_dek=True),
            [],
            [],
        )
        job = replace(new_job(), target_key=TARGET_KEY)

        envelopes = store.data_key_envelopes(job, 100)

        # One envelope for each of the data keys 0, 1 (a-key) and 4 (the target key, below).
        dek_ids = sorted(e.split('"dek_id":"')[1][:32] for e in envelopes)
        assert dek_ids == [f"{n:032x}" for n in (0, 1, 4)]
        assert len(store.data_key_envelopes(job, 2)) == 2

    def test_a_job_without_a_key_takes_any_key_below_its_version(
        self, store: JobGraphStore
    ) -> None:
        # As a job recorded before jobs had keys did.
        kinds = self.keyed_store(store)

        with store.claim(new_job(), 100) as claim:
            assert keys(claim.fields) == kinds["target below"] | kinds["key after"]

    # -- claims --------------------------------------------------------------------------------

    def test_claim_returns_at_most_limit_pending_fields(self, store: JobGraphStore) -> None:
        job = self.with_job(store, kms_fields(range(10)) + kms_fields(range(10, 15), key_version=2))

        with store.claim(job, 4) as claim:
            assert len(claim.fields) == 4
            assert keys(claim.fields) <= {key(n) for n in range(10)}
        with store.claim(job, 100) as claim:
            assert keys(claim.fields) == {key(n) for n in range(10)}

    def test_claim_fills_its_batch_with_legacy_fields_when_the_job_migrates_them(
        self, store: JobGraphStore
    ) -> None:
        job = self.with_job(
            store, kms_fields(range(3)) + legacy_fields(range(3, 8)), include_legacy=True
        )

        with store.claim(job, 6) as claim:
            assert len(claim.fields) == 6
        with store.claim(job, 100) as claim:
            assert keys(claim.fields) == {key(n) for n in range(8)}

    def test_claimed_fields_are_the_stored_field_values(self, store: JobGraphStore) -> None:
        job = self.with_job(
            store, kms_fields(range(3)) + legacy_fields(range(3, 5)), include_legacy=True
        )

        # Read first: on SQLite the claim holds the store's only connection.
        stored = [store.get_field(key(n)) for n in range(5)]
        with store.claim(job, 10) as claim:
            assert sorted(claim.fields, key=lambda f: f.canonical_key) == stored

    def test_claim_with_nothing_pending_is_empty_and_changes_nothing(
        self, store: JobGraphStore
    ) -> None:
        job = self.with_job(store, kms_fields(range(3), key_version=TARGET))

        with store.claim(job, 10) as claim:
            assert claim.fields == []
        assert (self.current(store, job).completed, self.current(store, job).failed) == (0, 0)

    def test_clean_exit_commits_updates_failures_and_counters(self, store: JobGraphStore) -> None:
        job = self.with_job(store, kms_fields(range(6)))

        with store.claim(job, 10) as claim:
            for f in claim.fields:
                if f.canonical_key == key(0):
                    claim.fail(f, "KmsUnavailable")
                else:
                    claim.update(f, rewrap(f, key_version=TARGET))

        after = self.current(store, job)
        assert (after.completed, after.failed, after.total) == (5, 1, 6)
        assert list(store.failures(job.job_id)) == [(key(0), "KmsUnavailable")]
        for n in range(1, 6):
            got = store.get_field(key(n))
            assert got is not None
            assert got.key_version == TARGET
            assert got.encrypted_data == envelope(f"{key(n)}-v{TARGET}")
        assert store.count_fields(encryption_version="kms_v1", key_version_below=TARGET) == 1
        assert store.count_pending(job) == 0

    def test_an_exception_in_the_claim_rolls_back_updates_failures_and_counters(
        self, store: JobGraphStore
    ) -> None:
        fields = kms_fields(range(6))
        job = self.with_job(store, fields)

        with pytest.raises(RuntimeError, match="worker died"), store.claim(job, 10) as claim:
            claim.fail(claim.fields[0], "KmsUnavailable")
            for f in claim.fields[1:]:
                claim.update(f, rewrap(f, key_version=TARGET))
            raise RuntimeError("worker died")

        after = self.current(store, job)
        assert (after.completed, after.failed) == (0, 0)
        assert list(store.failures(job.job_id)) == []
        assert [store.get_field(f.canonical_key) for f in fields] == fields
        with store.claim(job, 10) as claim:  # the batch is pending again, and not locked
            assert keys(claim.fields) == keys(fields)

    def test_failed_field_is_not_claimed_again_by_its_job_but_is_by_another(
        self, store: JobGraphStore
    ) -> None:
        job = self.with_job(store, kms_fields(range(4)))
        with store.claim(job, 10) as claim:
            claim.fail(
                next(f for f in claim.fields if f.canonical_key == key(2)), "InvalidEnvelope"
            )

        with store.claim(job, 10) as claim:
            assert keys(claim.fields) == {key(0), key(1), key(3)}
        other = replace(job, job_id="job-2")
        store.create_job(other)
        with store.claim(other, 10) as claim:
            assert keys(claim.fields) == {key(n) for n in range(4)}
        assert list(store.failures(other.job_id)) == []

    def test_update_against_a_changed_envelope_is_not_written_or_counted(
        self, store: JobGraphStore
    ) -> None:
        job = self.with_job(store, kms_fields(range(3)))

        with store.claim(job, 10) as claim:
            for f in claim.fields:
                # key(1) as if it had been read before someone else rewrote it.
                read = (
                    replace(f, encrypted_data=envelope("stale")) if f.canonical_key == key(1) else f
                )
                claim.update(read, rewrap(f, key_version=TARGET))

        assert self.current(store, job).completed == 2
        assert store.get_field(key(1)) == field_value(1)
        assert store.count_pending(job) == 1

    def test_create_unless_active_creates_when_no_job_is_active(self, store: JobGraphStore) -> None:
        store.create_job(new_job("finished", state=JobState.DONE))

        created = store.create_job_unless_active(new_job("fresh", total=3))

        assert (created.job_id, created.total) == ("fresh", 3)
        active = store.active_job()
        assert active is not None and active.job_id == "fresh"

    @pytest.mark.parametrize("state", [JobState.RUNNING, JobState.PAUSED])
    def test_create_unless_active_returns_the_active_job_and_creates_nothing(
        self, store: JobGraphStore, state: JobState
    ) -> None:
        store.create_job(new_job("first", state=state))

        got = store.create_job_unless_active(new_job("second"))

        assert (got.job_id, got.state) == ("first", state)
        assert store.get_job("second") is None

    def test_two_stores_creating_at_once_end_with_one_job(self, store: JobGraphStore) -> None:
        second = self.open_again(store)
        rounds = 10
        got: list[tuple[str, str]] = []
        errors: list[BaseException] = []
        start = threading.Barrier(2, timeout=BARRIER_TIMEOUT)

        def create(worker: int, jobs: JobGraphStore, round_: int, answers: dict[int, str]) -> None:
            try:
                start.wait()
                job = jobs.create_job_unless_active(new_job(f"job-{round_}-{worker}"))
                answers[worker] = job.job_id
            except BaseException as exc:  # reported below
                errors.append(exc)

        try:
            for round_ in range(rounds):
                answers: dict[int, str] = {}
                threads = [
                    threading.Thread(target=create, args=(i, s, round_, answers))
                    for i, s in enumerate([store, second])
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                assert errors == []
                got.append((answers[0], answers[1]))
                store.set_job_state(answers[0], JobState.CANCELLED)
        finally:
            second.close()

        assert [pair for pair in got if pair[0] != pair[1]] == []
        assert store.active_job() is None

    def test_claims_from_two_stores_at_once_never_share_a_field(self, store: JobGraphStore) -> None:
        fields = kms_fields(range(200))
        job = self.with_job(store, fields)
        second = self.open_again(store)
        got: dict[int, list[str]] = {0: [], 1: []}
        errors: list[BaseException] = []
        start = threading.Barrier(2, timeout=BARRIER_TIMEOUT)

        def work(worker: int, jobs: JobGraphStore) -> None:
            try:
                start.wait()
                while True:
                    with jobs.claim(job, 10) as claim:
                        if not claim.fields:
                            return
                        got[worker] += [f.canonical_key for f in claim.fields]
                        time.sleep(0.002)  # hold the batch a moment, as real work would
                        for f in claim.fields:
                            claim.update(f, rewrap(f, key_version=TARGET))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [
            threading.Thread(target=work, args=(i, s)) for i, s in enumerate([store, second])
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            second.close()

        assert errors == []
        claimed = Counter(got[0] + got[1])
        assert [k for k, times in claimed.items() if times > 1] == []
        assert set(claimed) == keys(fields)
        assert self.current(store, job).completed == 200
        assert store.count_pending(job) == 0

    def test_failures_list_each_failed_field_with_its_error(self, store: JobGraphStore) -> None:
        job = self.with_job(store, kms_fields(range(4)))
        with store.claim(job, 10) as claim:
            for f in claim.fields:
                if f.canonical_key != key(1):
                    claim.fail(f, f"Error{f.canonical_key[-1]}")

        assert list(store.failures(job.job_id)) == [
            (key(0), "Error0"),
            (key(2), "Error2"),
            (key(3), "Error3"),
        ]
        assert list(store.failures("job-2")) == []
