"""The ``heimdall worker`` loop: scheduled key rotation, the re-encryption job, metrics.

spec: Key Rotation Strategy (Rotation Cadence, Rotation Procedure, Configuration Example: the
``key_rotation`` settings) and Runbook: Routine Key Rotation ("Every 90 days (automated)";
"Monitor Re-encryption: heimdall_reencryption_progress"). One :meth:`Worker.cycle`:

1. **Rotate** when ``rotation_enabled`` and the latest master key version is at least
   ``rotation_cadence_days`` old (its ``created_at`` at the provider; a cadence of 0 never
   rotates), through :func:`heimdall.rotation.lifecycle.rotate`, audited as key.rotate.
   Workers sharing a store first claim "the rotation from version N" in the store, so only one
   of them rotates.
2. **Start** a job when ``auto_reencrypt`` and this worker rotated, or fields lag the latest
   version and no job has targeted it yet (a ``heimdall keys rotate``, or a rotation made in
   Vault as in the runbook's step 1). A job an operator cancelled, or one that ended with
   failed fields, is not started again by the worker.
3. **Work** the active job, whoever started it, until it is done, paused or cancelled: batches
   of ``reencrypt_batch_size`` with ``reencrypt_interval_seconds`` between them, the spec's
   pause that keeps a job under the KMS's request quotas (``reencrypt_interval_seconds=0``
   works a job at full speed; no pause follows the batch that drains the queue).
4. **Disable** retired versions past ``grace_period_days`` that nothing depends on
   (:func:`heimdall.rotation.lifecycle.disable_expired`; spec: Retire Old Key), when rotation is on.
5. **Refresh** ``heimdall_fields_by_key_version`` and ``heimdall_reencryption_progress``.

Cycles start ``reencrypt_interval_seconds`` apart (at least one second). :meth:`Worker.stop`
ends the worker between batches: the batch in flight commits first, a pause ends at once, and
the job stays running for the next worker to resume. It takes a lock, so it is called from a
thread, never from a signal handler: the CLI calls it from its signal watcher on the first
SIGTERM or SIGINT (see :mod:`heimdall.cli.signals`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from heimdall import metrics
from heimdall.errors import KmsUnavailable
from heimdall.kms.base import KeyDescription
from heimdall.rbac import Caller
from heimdall.rotation.job import (
    StopRequest,
    job_store,
    may_reencrypt_emergency,
    plan,
    run_job,
    start_job,
)
from heimdall.rotation.lifecycle import disable_expired, rotate
from heimdall.service import Heimdall
from heimdall.settings import Settings
from heimdall.store.jobs import Job, JobKind, JobState
from heimdall.types import EncryptionMode

__all__ = ["ROTATION_CLAIM_META", "CycleReport", "Worker"]

DAY_SECONDS: Final = 86_400.0
MIN_CYCLE_SECONDS: Final = 1.0
# A rotation claim older than this belongs to a worker that died before rotating.
CLAIM_TIMEOUT_SECONDS: Final = 3_600.0
# Field counts are a GROUP BY over every field: refreshed at most this often during a job.
FIELD_COUNTS_EVERY_SECONDS: Final = 60.0
ROTATION_CLAIM_META: Final = "worker_rotation_from_v"


@dataclass(frozen=True, slots=True)
class CycleReport:
    rotated_to: int | None = None
    started: Job | None = None
    worked: Job | None = None
    disabled_below: int | None = None


def _epoch(stamp: str) -> float | None:
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


class Worker:
    """Runs cycles until :meth:`stop`. *clock* (seconds since the epoch) decides key ages."""

    def __init__(
        self,
        heimdall: Heimdall,
        settings: Settings,
        *,
        caller: Caller,
        clock: Callable[[], float] = time.time,
        log: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.heimdall = heimdall
        self.settings = settings
        self.caller = caller
        self._clock = clock
        self._log = log
        self._stop = StopRequest()
        self._counts_refreshed = float("-inf")
        self._warned_no_created_at = False
        self._warned_foreign = ""

    def stop(self) -> None:
        """Stop after the batch in flight; from any thread, but not from a signal handler."""
        self._stop.set()

    def run(self, *, once: bool = False) -> None:
        jobs = job_store(self.heimdall)
        metrics.set_job_progress(jobs.active_job() or jobs.latest_job())
        while not self._stop.is_set():
            try:
                self.cycle()
            except KmsUnavailable as exc:
                if once:
                    raise
                self._log(f"warning: {exc}; retrying next cycle")
            if once:
                return
            self._stop.wait(max(self.settings.reencrypt_interval_seconds, MIN_CYCLE_SECONDS))

    def cycle(self) -> CycleReport:
        """One pass: rotate if due, start and work the job, disable expired versions."""
        heimdall, jobs = self.heimdall, job_store(self.heimdall)
        writes_kms = heimdall.router.kms is not None and (
            heimdall.router.mode is not EncryptionMode.LEGACY
        )
        rotated_to = started = worked = disabled_below = None
        if writes_kms:
            rotated_to = self._rotate_if_due()
            started = self._start_if_needed(jobs.active_job(), rotated=rotated_to is not None)
        active = jobs.active_job()
        if (
            active is not None
            and active.state is JobState.RUNNING
            and heimdall.router.kms
            and self._ours(active)
        ):
            worked = self._work(active)
        if writes_kms and self.settings.rotation_enabled and not self._stop.is_set():
            disabled = disable_expired(
                heimdall,
                caller=self.caller,
                grace_period_days=self.settings.grace_period_days,
                clock=self._clock,
            )
            if disabled is not None:
                disabled_below = disabled.min_decryption_version
                self._log(f"disabled key versions below {disabled_below} (grace period over)")
        metrics.set_job_progress(jobs.active_job() or jobs.latest_job())
        self._refresh_counts(force=True)
        return CycleReport(rotated_to, started, worked, disabled_below)

    # -- rotation ---------------------------------------------------------------------------

    def _rotate_if_due(self) -> int | None:
        description = self.heimdall.kms.describe()
        now = self._clock()
        if not self._rotation_due(description, now):
            return None
        if not self._claim_rotation(description.latest_version, now):
            return None  # another worker is rotating from this version
        rotated = rotate(self.heimdall, caller=self.caller)
        self._log(
            f"rotated {rotated.key_name} to version {rotated.latest_version} "
            f"(version {description.latest_version} was due after "
            f"{self.settings.rotation_cadence_days:g} days)"
        )
        return rotated.latest_version

    def _rotation_due(self, description: KeyDescription, now: float) -> bool:
        cadence = self.settings.rotation_cadence_days
        if not self.settings.rotation_enabled or cadence <= 0:
            return False
        latest = [v for v in description.versions if v.version == description.latest_version]
        created = _epoch(latest[0].created_at) if latest else None
        if created is None:
            if not self._warned_no_created_at:
                self._warned_no_created_at = True
                self._log("warning: the latest key version has no creation time; not rotating")
            return False
        return now - created >= cadence * DAY_SECONDS

    def _claim_rotation(self, version: int, now: float) -> bool:
        store = self.heimdall.store
        key, stamp = f"{ROTATION_CLAIM_META}{version}", f"{now:.0f}"
        if store.insert_meta_if_absent(key, stamp):
            return True
        held = store.get_meta(key)
        if held is None:
            return False
        try:
            fresh = now - float(held) < CLAIM_TIMEOUT_SECONDS
        except ValueError:
            fresh = False
        return not fresh and store.compare_and_swap_meta(key, held, stamp)

    # -- the job ----------------------------------------------------------------------------

    def _ours(self, job: Job) -> bool:
        """Whether this worker may work *job*: not an emergency job this worker's role may not
        run (it decrypts every field), nor one on another key (see :meth:`_on_our_key`)."""
        if job.kind is JobKind.EMERGENCY and not may_reencrypt_emergency(self.caller):
            self._warn_once(
                job,
                f"warning: emergency job {job.job_id} re-encrypts every field, which this "
                "worker's role may not do; run `heimdall reencrypt run` as heimdall-app",
            )
            return False
        return self._on_our_key(job)

    def _on_our_key(self, job: Job) -> bool:
        """Whether *job* brings fields to the key this worker writes under. One that brings
        them to another key (a move between providers, configured elsewhere) is left alone,
        with a warning, rather than undone."""
        if not job.target_key:
            return True
        key_name = self.heimdall.kms.describe().key_name
        if job.target_key == key_name:
            return True
        self._warn_once(
            job,
            f"warning: job {job.job_id} moves fields to the key {job.target_key}, and this "
            f"worker writes under {key_name}; not working it (check HMD_KMS_PROVIDER)",
        )
        return False

    def _warn_once(self, job: Job, message: str) -> None:
        if self._warned_foreign != job.job_id:
            self._warned_foreign = job.job_id
            self._log(message)

    def _start_if_needed(self, active: Job | None, *, rotated: bool) -> Job | None:
        if not self.settings.auto_reencrypt or (active is not None and not rotated):
            return None
        latest = job_store(self.heimdall).latest_job()
        if latest is not None and not self._on_our_key(latest):
            return None  # the fields went (or are going) to another key: not ours to move
        if not rotated:
            would = plan(self.heimdall, caller=self.caller)
            if not would.rewrap_fields and not would.reencrypt_fields:
                return None
            if (
                latest is not None
                and latest.target_version == would.target_version
                and latest.target_key in ("", would.target_key)
            ):
                return None  # done, failed or cancelled for this version: that stands
        job = start_job(self.heimdall, caller=self.caller)
        if job is not None:
            self._log(
                f"started re-encryption job {job.job_id}: {job.total:,} fields "
                f"to version {job.target_version}"
            )
        return job

    def _work(self, job: Job) -> Job | None:
        """Run the job until it stops; None when this worker was asked to stop first."""
        final = run_job(
            self.heimdall,
            job.job_id,
            caller=self.caller,
            batch_size=self.settings.reencrypt_batch_size,
            interval_seconds=self.settings.reencrypt_interval_seconds,
            workers=self.settings.reencrypt_workers,
            progress=self._after_batch,
            stop=self._stop,
        )
        if final.state is JobState.RUNNING and self._stop.is_set():
            self._log(f"stopping: job {job.job_id} stays running for the next worker")
            return None
        self._log(
            f"job {final.job_id} {final.state.value}: {final.completed:,} of {final.total:,} "
            f"fields done, {final.failed:,} failed"
        )
        return final

    def _after_batch(self, claimed: int) -> None:
        # run_job has committed the batch and set heimdall_reencryption_progress already.
        self._refresh_counts(force=False)

    def _refresh_counts(self, *, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._counts_refreshed >= FIELD_COUNTS_EVERY_SECONDS:
            metrics.set_field_counts(self.heimdall.store.field_counts())
            self._counts_refreshed = now
