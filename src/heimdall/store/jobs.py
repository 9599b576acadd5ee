"""The re-encryption job's persistent state, kept by the store beside the fields.

spec: Migration Strategy, Phase 4 and Runbook: Re-encryption After Migration. The fields table is
the work queue: a field is *pending* for a job while it is kms_v1 and not under the job's target
(its ``target_key`` at ``target_version`` or above), or legacy when the job migrates legacy
fields, and has not failed in this job. A field is under a key when its envelope's
key_identifier names a version of it (``<target_key>-v<N>``): the stores keep that key name in a
column derived from the envelope (``key_name``), so fields wrapped under another key (another
provider's, during a move between providers) are pending too.

A worker :meth:`JobStore.claim` s a batch of pending fields inside one transaction that locks
them (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the database write lock on SQLite), computes their
new envelopes, and commits the updates together with the job's counters. So

* a crash at any point loses nothing: an uncommitted batch is rolled back and its fields stay
  pending, to be claimed again — the database *is* the checkpoint;
* several workers, in several processes or on several machines, never process the same field:
  a locked field is skipped, a committed one is no longer pending;
* ``completed`` counts committed updates, so after any number of crashes it ends equal to the
  number of fields the job had to do.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from heimdall.errors import LifecycleError
from heimdall.store.base import FieldUpdate, FieldValue

__all__ = [
    "Claim",
    "ClaimedBatch",
    "Job",
    "JobKind",
    "JobState",
    "JobStore",
    "check_state_change",
    "job_from_row",
    "job_row",
    "stored_job",
]


class JobKind(enum.StrEnum):
    """Why a job was started, which decides what it does to a pending kms_v1 field. Stored as
    its value."""

    ROTATION = "rotation"  # after a key rotation: the field's data key is rewrapped
    # spec: Emergency Key Compromise Response. The old master key may have exposed the data
    # keys it wrapped, so the field is re-encrypted under a new data key instead.
    EMERGENCY = "emergency"
    MIGRATION = "migration"  # started by the migration to the KMS, for its legacy fields
    # Started by ``heimdall kms migrate``: fields under another provider's key are moved to this
    # one, each data key unwrapped there and wrapped here; the data ciphertexts stay as they are.
    KMS_MIGRATION = "kms-migration"


class JobState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    kind: JobKind
    target_version: int
    include_legacy: bool
    state: JobState
    total: int
    completed: int = 0
    failed: int = 0
    created_at: str = ""
    updated_at: str = ""
    # The key name whose versions the job brings fields to (the stores' key_name). Empty for a
    # job written by a heimdall before key names were recorded: its target is any key's
    # target_version, as then.
    target_key: str = ""


def job_from_row(row: Sequence[Any]) -> Job:
    """A Job from a row of the stores' job columns (``heimdall.store.sql.JOB_COLUMNS``)."""
    (
        job_id,
        kind,
        target,
        include_legacy,
        state,
        total,
        completed,
        failed,
        created,
        updated,
        target_key,
    ) = row
    return Job(
        job_id=job_id,
        kind=JobKind(kind),
        target_version=int(target),
        include_legacy=bool(include_legacy),
        state=JobState(state),
        total=int(total),
        completed=int(completed),
        failed=int(failed),
        created_at=created,
        updated_at=updated,
        target_key=target_key or "",
    )


def stored_job(job: Job, now: str) -> Job:
    """*job* as a store creates it: its kind a JobKind, its created_at kept if set and *now*
    otherwise, its updated_at *now*."""
    return replace(job, kind=JobKind(job.kind), created_at=job.created_at or now, updated_at=now)


def job_row(job: Job) -> tuple[object, ...]:
    """The values the stores write for *job*, in job_from_row's order: its kind and state as
    their text. Raises ValueError for a kind that is not a JobKind, which could not be read
    back."""
    return (
        job.job_id,
        JobKind(job.kind).value,
        job.target_version,
        job.include_legacy,
        job.state.value,
        job.total,
        job.completed,
        job.failed,
        job.created_at,
        job.updated_at,
        job.target_key,
    )


def check_state_change(job: Job, state: JobState) -> None:
    """Raise LifecycleError if *job* may not move to *state*: a done or cancelled job cannot
    change any more."""
    if job.state in (JobState.DONE, JobState.CANCELLED) and state is not job.state:
        raise LifecycleError(f"job {job.job_id} is {job.state.value} and cannot change")


class Claim(Protocol):
    """A locked batch of pending fields. Updates are written when the claim's block exits."""

    fields: list[FieldValue]

    def update(self, field: FieldValue, update: FieldUpdate) -> None:
        """Replace *field*'s envelope (compare-and-swap against the envelope it was read with)."""
        ...

    def fail(self, field: FieldValue, error: str) -> None:
        """Record that *field* failed in this job; it is not claimed again by the job."""
        ...


@dataclass
class ClaimedBatch:
    """The stores' :class:`Claim`: it keeps the updates and failures for the store to write
    when the claim's block exits."""

    fields: list[FieldValue]
    updates: list[tuple[FieldValue, FieldUpdate]] = field(default_factory=list)
    failed: list[tuple[FieldValue, str]] = field(default_factory=list)

    def update(self, field: FieldValue, update: FieldUpdate) -> None:
        self.updates.append((field, update))

    def fail(self, field: FieldValue, error: str) -> None:
        self.failed.append((field, error))


class JobStore(Protocol):
    def create_job(self, job: Job) -> None: ...

    def create_job_unless_active(self, job: Job) -> Job:
        """Create *job* unless a job is already running or paused; the active job afterwards.

        Check and insert are one step for every process on the store, so workers started
        together join one job instead of each creating its own."""
        ...

    def get_job(self, job_id: str) -> Job | None: ...

    def active_job(self) -> Job | None:
        """The newest job that is running or paused, if any."""
        ...

    def latest_job(self) -> Job | None:
        """The newest job in any state, if any."""
        ...

    def set_job_state(self, job_id: str, state: JobState) -> Job:
        """Change a job's state. A done or cancelled job cannot change any more."""
        ...

    def count_pending(self, job: Job) -> int: ...

    def data_key_envelopes(self, job: Job, limit: int) -> list[str]:
        """One envelope per distinct data key among the job's pending kms_v1 fields (at most
        *limit*), so a worker can rewrap every data key up front, in batches."""
        ...

    def claim(self, job: Job, limit: int) -> AbstractContextManager[Claim]:
        """Lock up to *limit* pending fields; on a clean exit write the updates, the failures
        and the counters in the same transaction, else roll everything back."""
        ...

    def failures(self, job_id: str) -> Iterator[tuple[str, str]]:
        """(canonical_key, error) of the fields that failed in the job."""
        ...
