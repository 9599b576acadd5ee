"""The re-encryption job: persisted, resumable, shared by any number of workers.

spec: Migration Strategy, Phase 4; Key Rotation Strategy (Re-encryption); Runbook:
Re-encryption After Migration. :func:`start_job` records a job (its :class:`JobKind`, the target
key version, whether legacy fields migrate, how many fields it must do); :func:`run_job` works
it in batches claimed from the store (see :mod:`heimdall.store.jobs` for why a crash loses
nothing and two workers never do the same field), each computed by a
:class:`~heimdall.rotation.batch.BatchWorker`: the rewrap path for kms_v1 fields (data keys
rewrapped inside the KMS, once each), the re-encrypt path for legacy fields, and for every field
of an emergency job. :func:`reencrypt` is the foreground form: start (or join) and run, in one
call. It is the only engine.

Batch size and the pause between batches keep the job under KMS quotas; a batch that comes back
short has drained the queue, so no pause follows it. A job can be paused, resumed and cancelled
from any process; workers notice between batches. A :class:`StopRequest` ends one run early,
from another thread of the same process.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from heimdall import metrics
from heimdall.audit import AuditEvent, EventType
from heimdall.errors import LifecycleError, ModeViolation
from heimdall.rbac import Caller, Permission
from heimdall.rotation.batch import KMS_V1, LEGACY, BatchWorker, ReencryptReport, rewrap_index_key
from heimdall.service import Heimdall
from heimdall.store.jobs import Job, JobKind, JobState, JobStore
from heimdall.types import EncryptionMode

__all__ = [
    "JobKind",
    "JobPlan",
    "StopRequest",
    "change_state",
    "job_store",
    "may_reencrypt_emergency",
    "plan",
    "reencrypt",
    "run_job",
    "start_job",
    "work_left",
]

_START_ATTEMPTS = 3
_PREFETCH_MAX = 60_000  # below the rewrap memo's bound; beyond it, keys are rewrapped per batch


@dataclass(frozen=True, slots=True)
class JobPlan:
    """What a job would do now (``--dry-run``): nothing is written. *rewrap_fields* counts
    the kms_v1 fields whose data key is rewrapped, *moved_fields* of them under another key
    than the target's (another provider's)."""

    target_version: int
    rewrap_fields: int
    reencrypt_fields: int
    legacy_left: int
    target_key: str = ""
    moved_fields: int = 0

    @property
    def fields(self) -> int:
        return self.rewrap_fields + self.reencrypt_fields


class StopRequest:
    """Asks :func:`run_job` to end: each of its threads ends after its batch in flight, which
    commits, and a pause between batches ends at once; the job stays running for the next worker.

    :meth:`set` may be called from any thread, but not from a signal handler: it takes a lock,
    which the code the handler interrupted may hold (see :mod:`heimdall.cli.signals`).
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._set = False

    def set(self) -> None:
        with self._condition:
            self._set = True
            self._condition.notify_all()

    def is_set(self) -> bool:
        return self._set

    def wait(self, seconds: float) -> bool:
        """Wait up to *seconds* for the request; whether it has been made."""
        return self._wait(seconds, until=lambda: False)

    def _wait(self, seconds: float, *, until: Callable[[], bool]) -> bool:
        """:meth:`wait`, ending early too once *until* holds (it is checked on :meth:`_wake`)."""
        with self._condition:
            self._condition.wait_for(lambda: self._set or until(), seconds)
            return self._set

    def _wake(self) -> None:
        """Have every :meth:`_wait` check its *until* again."""
        with self._condition:
            self._condition.notify_all()


def job_store(heimdall: Heimdall) -> JobStore:
    store = heimdall.store
    if not hasattr(store, "claim"):
        raise ModeViolation("this store cannot run background re-encryption jobs")
    return store  # type: ignore[return-value]


def _event(
    caller: Caller, job: Job, operation: str, *, error: Exception | None = None
) -> AuditEvent:
    return AuditEvent.of(
        EventType.REENCRYPT_JOB,
        caller,
        error=error,
        key_version=job.target_version,
        operation=f"{operation} {job.job_id}",
        count=job.total,
    )


def _includes_legacy(heimdall: Heimdall) -> bool:
    """Whether a job started now migrates legacy fields: in hybrid mode, which has the env key."""
    router = heimdall.router
    return router.mode is EncryptionMode.HYBRID and router.legacy is not None


def _target(heimdall: Heimdall) -> tuple[int, str]:
    """The latest version of the key this deployment writes under, and that key's name."""
    description = heimdall.router.require_kms("re-encryption").kms.describe()
    return description.latest_version, description.key_name


def _draft(heimdall: Heimdall, kind: JobKind, *, include_legacy: bool) -> Job:
    target, key_name = _target(heimdall)
    return Job(
        job_id=f"job-{uuid.uuid4().hex[:12]}",
        kind=JobKind(kind),
        target_version=target,
        include_legacy=include_legacy,
        state=JobState.RUNNING,
        total=0,
        target_key=key_name,
    )


def work_left(heimdall: Heimdall) -> JobPlan:
    """What a job started now would do. Not permission-checked: callers check their own."""
    draft = _draft(heimdall, JobKind.ROTATION, include_legacy=False)
    store = heimdall.store
    legacy = store.count_fields(encryption_version=LEGACY)
    include_legacy = _includes_legacy(heimdall)
    rewrap = job_store(heimdall).count_pending(draft)
    below = store.count_fields(
        encryption_version=KMS_V1, key_version_below=draft.target_version, key_name=draft.target_key
    )
    return JobPlan(
        target_version=draft.target_version,
        rewrap_fields=rewrap,
        reencrypt_fields=legacy if include_legacy else 0,
        legacy_left=0 if include_legacy else legacy,
        target_key=draft.target_key,
        moved_fields=max(rewrap - below, 0),
    )


def _foreign_job(job: Job, key_name: str) -> LifecycleError:
    if job.state in (JobState.RUNNING, JobState.PAUSED):
        return LifecycleError(
            f"re-encryption job {job.job_id} moves fields to the key {job.target_key}, and this "
            f"process writes under {key_name}: run it where HMD_KMS_PROVIDER names that key, "
            "or cancel it (`heimdall reencrypt cancel`)"
        )
    return LifecycleError(
        f"the last re-encryption job ({job.job_id}) brought fields to the key "
        f"{job.target_key}, and this process writes under {key_name}: set HMD_KMS_PROVIDER to "
        "that key's provider, or move the fields back with `heimdall kms migrate`"
    )


def plan(heimdall: Heimdall, *, caller: Caller) -> JobPlan:
    heimdall.require(caller, Permission.REENCRYPT)
    return work_left(heimdall)


def start_job(
    heimdall: Heimdall, *, caller: Caller, kind: JobKind = JobKind.ROTATION
) -> Job | None:
    """The active job if it already targets the latest version of this deployment's key, else
    a new one; None when no field needs work. Workers started together all get the same job.

    A newer version of the same key supersedes the active job. A job that brings fields to
    another key (a move between providers, started where that key is written) is superseded
    only by a ``KMS_MIGRATION`` job, the operator's explicit move: a process still configured
    for the old key must not undo the move (LifecycleError)."""
    heimdall.require(caller, Permission.REENCRYPT)
    jobs = job_store(heimdall)
    include_legacy = _includes_legacy(heimdall)
    for _ in range(_START_ATTEMPTS):
        draft = _draft(heimdall, kind, include_legacy=include_legacy)
        latest = jobs.latest_job()
        if (
            latest is not None
            and latest.target_key
            and latest.target_key != draft.target_key
            and draft.kind is not JobKind.KMS_MIGRATION
        ):
            # The fields were moved to another key (or are being moved): only an explicit move
            # brings them back, never a process whose settings still name this key.
            raise _foreign_job(latest, draft.target_key)
        active = jobs.active_job()
        if active is not None:
            same_key = active.target_key == draft.target_key
            if (
                same_key
                and active.target_version == draft.target_version
                and active.include_legacy == include_legacy
            ):
                return active
            # Superseded; what it finished stays finished.
            jobs.set_job_state(active.job_id, JobState.CANCELLED)
            heimdall.record(_event(caller, active, "superseded"))
        job = replace(draft, total=jobs.count_pending(draft))
        if job.total == 0:
            return None
        created = jobs.create_job_unless_active(job)
        if created.job_id == job.job_id:
            heimdall.record(_event(caller, job, "start"))
            return job
        # Another process started a job in the meantime: join it, or supersede it next pass.
    raise LifecycleError("other processes keep starting re-encryption jobs; try again")


def change_state(heimdall: Heimdall, job_id: str, state: JobState, *, caller: Caller) -> Job:
    """Pause, resume or cancel a job; audited."""
    heimdall.require(caller, Permission.REENCRYPT)
    jobs = job_store(heimdall)
    try:
        job = jobs.set_job_state(job_id, state)
    except LifecycleError as exc:
        current = jobs.get_job(job_id)
        if current is not None:
            heimdall.record(_event(caller, current, state.value, error=exc))
        raise
    heimdall.record(_event(caller, job, state.value))
    return job


def run_job(
    heimdall: Heimdall,
    job_id: str,
    *,
    caller: Caller,
    batch_size: int = 1000,
    interval_seconds: float = 0.0,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    stop: StopRequest | None = None,
) -> Job:
    """Work *job_id* until nothing is pending, it is paused or cancelled, or *stop* is set; the
    job as it then is (still running after a stop).

    *workers* threads claim batches side by side, as separate worker processes would (each
    pausing *interval_seconds* after its own batch): while one waits for the store or the KMS,
    another computes. A batch smaller than *batch_size* drained the queue: no thread pauses
    after it, and the pauses under way end. The first error stops every thread after its
    current batch, and is raised.
    """
    job, _ = _run(
        heimdall,
        job_id,
        caller=caller,
        batch_size=batch_size,
        interval_seconds=interval_seconds,
        workers=workers,
        progress=progress,
        stop=stop,
    )
    return job


def reencrypt(
    heimdall: Heimdall,
    *,
    caller: Caller,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
) -> ReencryptReport:
    """Bring every field to the latest key version (and legacy fields to the KMS in hybrid mode)
    now: start or join the job and run it here, at full speed, in this thread."""
    heimdall.require(caller, Permission.REENCRYPT)
    left = work_left(heimdall)
    job = start_job(heimdall, caller=caller)
    if job is None:
        report = ReencryptReport(target_version=left.target_version)
        cipher = heimdall.router.require_kms("re-encryption")
        report.index_key_rewrapped = rewrap_index_key(
            heimdall, cipher, left.target_version, left.target_key, caller=caller
        )
    else:
        _, report = _run(
            heimdall, job.job_id, caller=caller, batch_size=batch_size, progress=progress
        )
    report.legacy_skipped = left.legacy_left
    return report


def may_reencrypt_emergency(caller: Caller) -> bool:
    """Whether *caller* may work an emergency job: every field is decrypted and encrypted under
    a new data key, so it takes a role that may do both (see :mod:`heimdall.rotation.
    emergency`)."""
    return caller.may(Permission.DECRYPT) and caller.may(Permission.ENCRYPT)


def _require_run(heimdall: Heimdall, caller: Caller, job: Job | None) -> None:
    """A job is worked by a role that may re-encrypt; an emergency one by a role that may
    decrypt and encrypt, whose key provider policy lets it (heimdall-app), and no other: the
    provider would refuse every field of it."""
    if job is not None and job.kind is JobKind.EMERGENCY:
        heimdall.require(caller, Permission.DECRYPT)
        heimdall.require(caller, Permission.ENCRYPT)
    else:
        heimdall.require(caller, Permission.REENCRYPT)


def _run(
    heimdall: Heimdall,
    job_id: str,
    *,
    caller: Caller,
    batch_size: int,
    interval_seconds: float = 0.0,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    stop: StopRequest | None = None,
) -> tuple[Job, ReencryptReport]:
    """:func:`run_job`, and what its first thread's worker did (all of it, with one thread)."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    jobs = job_store(heimdall)
    first = jobs.get_job(job_id)
    _require_run(heimdall, caller, first)
    cipher = heimdall.router.require_kms("re-encryption")
    if first is not None and first.target_key:
        key_name = cipher.kms.describe().key_name
        if first.target_key != key_name:
            # Its fields would go under this process's key, not the job's, and stay pending.
            raise _foreign_job(first, key_name)
    worker = BatchWorker(heimdall, caller, cipher)
    worker.report.target_version = first.target_version if first else 0
    if first is not None and first.kind is not JobKind.EMERGENCY:
        # Rewrap every distinct data key up front, in batch calls: KMS calls then number
        # (distinct data keys / KMS batch size), whatever the field batches look like.
        worker.prefetch(jobs.data_key_envelopes(first, _PREFETCH_MAX))
    batches = _Batches(
        heimdall,
        jobs,
        job_id,
        batch_size=batch_size,
        interval_seconds=interval_seconds,
        progress=progress,
        stop=stop or StopRequest(),
    )
    if workers == 1:
        stopped = batches.work(worker)
    else:
        stopped = batches.work_together([worker, *(worker.sibling() for _ in range(workers - 1))])
    if stopped is not None:
        return stopped, worker.report
    final = jobs.get_job(job_id)
    if final is None:
        raise LifecycleError(f"no re-encryption job {job_id}")
    return _finish(heimdall, jobs, final, caller, worker.report), worker.report


class _Batches:
    """The batch loop of :func:`run_job`, for one thread or several."""

    def __init__(
        self,
        heimdall: Heimdall,
        jobs: JobStore,
        job_id: str,
        *,
        batch_size: int,
        interval_seconds: float,
        progress: Callable[[int], None] | None,
        stop: StopRequest,
    ) -> None:
        self.heimdall = heimdall
        self.jobs = jobs
        self.job_id = job_id
        self.batch_size = batch_size
        self.interval_seconds = interval_seconds
        self.progress = progress
        self.stop = stop
        # Set once, never cleared; each is followed by stop._wake(), which ends the pauses.
        self.failed = False  # a thread raised: the others end after their batch
        self.drained = False  # a batch came back short: no more pauses in this run
        self._progress_lock = threading.Lock()

    def work_together(self, workers: list[BatchWorker]) -> Job | None:
        stopped: list[Job] = []
        errors: list[BaseException] = []

        def work(worker: BatchWorker) -> None:
            try:
                job = self.work(worker)
            except BaseException as exc:  # raised again below, in the caller's thread
                errors.append(exc)
                self.failed = True
                self.stop._wake()
                return
            if job is not None:
                stopped.append(job)

        threads = [
            threading.Thread(target=work, args=(worker,), name=f"heimdall-reencrypt-{index}")
            for index, worker in enumerate(workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        if not stopped:
            return None
        # A thread's snapshot predates the batches the other threads committed after it.
        return self.jobs.get_job(self.job_id) or stopped[0]

    def work(self, worker: BatchWorker) -> Job | None:
        """Claim and do batches until none is left (None), or the job stops running or this run
        is asked to stop (the job)."""
        jobs, cipher, legacy = self.jobs, worker.cipher, self.heimdall.router.legacy
        report = worker.report
        while not self.failed:
            job = jobs.get_job(self.job_id)
            if job is None:
                raise LifecycleError(f"no re-encryption job {self.job_id}")
            metrics.set_job_progress(job)  # the counters as of the last committed batch
            if job.state is not JobState.RUNNING or self.stop.is_set():
                return job
            updated = report.rewrapped + report.reencrypted
            with jobs.claim(job, self.batch_size) as claim:
                if not claim.fields:
                    return None
                kms_fields = [f for f in claim.fields if f.encryption_version == KMS_V1]
                legacy_fields = [f for f in claim.fields if f.encryption_version == LEGACY]
                if kms_fields and job.kind is JobKind.EMERGENCY:
                    # The compromised master key may have exposed the old data keys: a rewrap
                    # would keep them, so every field gets a new data key.
                    with metrics.CryptoBatch("reencrypt", len(kms_fields), cipher, tally=report):
                        worker.reencrypt(kms_fields, cipher, claim)
                elif kms_fields:
                    with metrics.CryptoBatch("rewrap", len(kms_fields), cipher, tally=report):
                        worker.rewrap(kms_fields, claim)
                if legacy_fields and legacy is not None:
                    with metrics.CryptoBatch(
                        "reencrypt", len(legacy_fields), cipher, legacy, tally=report
                    ):
                        worker.reencrypt(legacy_fields, legacy, claim)
                claimed = len(claim.fields)
            metrics.add_reencrypted(report.rewrapped + report.reencrypted - updated)
            if self.progress is not None:
                with self._progress_lock:
                    self.progress(claimed)
            if claimed < self.batch_size:
                # The queue is drained: pacing the last claim (it finds nothing, or what a
                # rolled-back batch left) would only make the job end an interval later.
                self.drained = True
                self.stop._wake()
            elif self.interval_seconds and not self.drained:
                self.stop._wait(self.interval_seconds, until=lambda: self.drained or self.failed)
        return None


def _finish(
    heimdall: Heimdall, jobs: JobStore, job: Job, caller: Caller, report: ReencryptReport
) -> Job:
    cipher = heimdall.router.require_kms("re-encryption")
    target_key = job.target_key or cipher.kms.describe().key_name
    if rewrap_index_key(heimdall, cipher, job.target_version, target_key, caller=caller):
        report.index_key_rewrapped = True
    if jobs.count_pending(job):
        # Another worker still holds a batch; the last one to finish closes the job.
        current = jobs.get_job(job.job_id)
        assert current is not None
        return current
    current = jobs.get_job(job.job_id)
    assert current is not None
    if current.state is JobState.RUNNING:
        current = jobs.set_job_state(job.job_id, JobState.DONE)
        heimdall.record(_event(caller, current, "done"))
    metrics.set_job_progress(current)
    return current
