"""Working the re-encryption job in the foreground: progress bar, signals, summary.

Shared by ``heimdall reencrypt``, ``reencrypt run`` and ``migrate start``. The first SIGTERM or
SIGINT stops the job after the batch in flight (see :func:`heimdall.cli.signals.stop_signals`),
leaving it running for the next worker; the second ends the process at once.
"""

from __future__ import annotations

import signal
import time

import typer

from heimdall.cli.common import err, out, progress_bar, tracked
from heimdall.cli.signals import stop_signals
from heimdall.modes import MIGRATE_HINT
from heimdall.rbac import Caller
from heimdall.rotation.job import StopRequest, job_store, run_job, work_left
from heimdall.service import Heimdall
from heimdall.settings import Settings
from heimdall.store.jobs import Job, JobState

__all__ = ["run_here"]


def _summary(job: Job, elapsed: float) -> str:
    return (
        f"reencrypt to version {job.target_version} in {elapsed:.2f} s: job {job.job_id} "
        f"{job.state.value}, {job.completed:,} of {job.total:,} fields done, {job.failed:,} failed"
    )


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
    with stop_signals(stop.set, announce), progress_bar(remaining, "reencrypt") as progress:
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
