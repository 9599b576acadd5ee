"""Working the re-encryption job in the foreground: progress bar, signals, summary.

Shared by ``heimdall reencrypt``, ``reencrypt run`` and ``migrate start``. The first SIGTERM or
SIGINT stops the job after the batch in flight (see :func:`heimdall.cli.signals.stop_signals`),
leaving it running for the next worker; the second ends the process at once.
"""

from __future__ import annotations

import signal
import time
from typing import Annotated

import typer

from heimdall.cli.common import err, out, progress_bar, tracked
from heimdall.cli.signals import stop_signals
from heimdall.modes import MIGRATE_HINT
from heimdall.rbac import Caller
from heimdall.rotation.job import StopRequest, job_store, run_job, work_left
from heimdall.service import Heimdall
from heimdall.settings import Settings
from heimdall.store.jobs import Job, JobKind, JobState

__all__ = ["BatchOption", "IntervalOption", "WorkersOption", "run_here"]

# The options of every command that works the job here.
BatchOption = Annotated[
    int | None, typer.Option("--batch-size", min=1, max=100_000, help="Fields per batch.")
]
IntervalOption = Annotated[
    float | None,
    typer.Option(
        "--interval",
        min=0,
        help="Seconds to wait between batches (default: HMD_REENCRYPT_INTERVAL_SECONDS).",
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers", min=1, max=64, help="Batches worked side by side (threads) in this process."
    ),
]


def _summary(job: Job, elapsed: float) -> str:
    target = f"version {job.target_version}"
    if job.kind is JobKind.KMS_MIGRATION:
        target = f"key {job.target_key} {target}"
    return (
        f"{_verb(job)} to {target} in {elapsed:.2f} s: job {job.job_id} "
        f"{job.state.value}, {job.completed:,} of {job.total:,} fields done, {job.failed:,} failed"
    )


def _verb(job: Job) -> str:
    return "kms migrate" if job.kind is JobKind.KMS_MIGRATION else "reencrypt"


def run_here(
    service: Heimdall,
    settings: Settings,
    job: Job,
    *,
    caller: Caller,
    batch_size: int | None,
    interval: float | None,
    workers: int | None,
) -> None:
    """Work *job* in this process; None options take the key_rotation settings. The first
    SIGTERM or SIGINT stops it after the batch in flight (exit status 128 + the signal's
    number), the second at once."""
    remaining = job_store(service).count_pending(job)
    stop = StopRequest()
    stopped_by: list[signal.Signals] = []

    def announce(received: signal.Signals) -> None:
        stopped_by.append(received)
        err.print(
            f"{received.name} received: stopping after the batch in flight "
            "(send it again to exit at once)",
            markup=False,
        )

    started = time.monotonic()
    with stop_signals(stop.set, announce), progress_bar(remaining, _verb(job)) as progress:
        final = run_job(
            service,
            job.job_id,
            caller=caller,
            batch_size=batch_size or settings.reencrypt_batch_size,
            interval_seconds=settings.reencrypt_interval_seconds if interval is None else interval,
            workers=workers or settings.reencrypt_workers,
            progress=tracked(progress, remaining),
            stop=stop,
        )
    out.print(_summary(final, time.monotonic() - started), markup=False)
    if stopped_by and final.state is JobState.RUNNING:
        err.print(
            f"stopped: job {final.job_id} stays running; `heimdall reencrypt run` resumes it",
            markup=False,
        )
        raise typer.Exit(128 + stopped_by[0])
    legacy_left = work_left(service).legacy_left
    if legacy_left:
        err.print(
            f"{legacy_left:,} legacy fields were left as they are: {MIGRATE_HINT}",
            markup=False,
        )
    if final.failed:
        raise typer.Exit(1)
