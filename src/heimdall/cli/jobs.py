"""``heimdall reencrypt``: start or join the background job, and steer it.

``heimdall reencrypt`` starts a job (or joins the active one) and works it in the foreground
with a progress bar; more workers join with ``heimdall reencrypt run``, on any machine sharing
the store. ``status``, ``pause``, ``resume`` and ``cancel`` act on the active job from anywhere.
Both pause ``reencrypt_interval_seconds`` between batches, as ``heimdall worker`` does, unless
``--interval`` says otherwise, and stop as it does on SIGTERM and SIGINT (see
:func:`heimdall.cli.signals.stop_signals`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from heimdall.cli.common import (
    ActorOption,
    JsonOption,
    caller_for,
    fail,
    open_service,
    out,
    reencrypt_app,
)
from heimdall.cli.foreground import BatchOption, IntervalOption, WorkersOption, run_here
from heimdall.cli.output import write_json
from heimdall.rbac import Permission
from heimdall.rotation.job import change_state, job_store, plan, start_job
from heimdall.service import Heimdall
from heimdall.store.jobs import Job, JobState


@reencrypt_app.callback()
def reencrypt_command(
    ctx: typer.Context,
    *,
    actor: ActorOption = None,
    batch_size: BatchOption = None,
    interval: IntervalOption = None,
    workers: WorkersOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would change.")] = False,
) -> None:
    """Start (or join) the re-encryption job and work it here until it is done."""
    if ctx.invoked_subcommand is not None:
        return
    with open_service() as (service, settings):
        caller = caller_for(settings, actor)
        if dry_run:
            would = plan(service, caller=caller)
            out.print(
                f"dry run, nothing written: to version {would.target_version}, "
                f"{would.rewrap_fields:,} fields would be rewrapped and "
                f"{would.reencrypt_fields:,} re-encrypted from legacy",
                markup=False,
            )
            return
        job = start_job(service, caller=caller)
        if job is None:
            out.print(
                "nothing to re-encrypt: every field is on the latest key version", markup=False
            )
            return
        run_here(
            service,
            settings,
            job,
            caller=caller,
            batch_size=batch_size,
            interval=interval,
            workers=workers,
        )


@reencrypt_app.command("run")
def reencrypt_run(
    actor: ActorOption = None,
    batch_size: BatchOption = None,
    interval: IntervalOption = None,
    workers: WorkersOption = None,
) -> None:
    """Join the active job as one more worker."""
    with open_service() as (service, settings):
        job = job_store(service).active_job()
        if job is None:
            fail("there is no active re-encryption job; start one with `heimdall reencrypt`")
        run_here(
            service,
            settings,
            job,
            caller=caller_for(settings, actor),
            batch_size=batch_size,
            interval=interval,
            workers=workers,
        )


def _active(service: Heimdall) -> Job:
    job = job_store(service).active_job()
    if job is None:
        fail("there is no active re-encryption job")
    return job


@reencrypt_app.command("status")
def reencrypt_status(as_json: JsonOption = False, actor: ActorOption = None) -> None:
    """Total, completed, failed and pending of the newest job."""
    with open_service() as (service, settings):
        service.require(caller_for(settings, actor), Permission.READ_STATUS)
        jobs = job_store(service)
        job = jobs.latest_job()
        if job is None:
            fail("no re-encryption job has run yet")
        pending = jobs.count_pending(job) if job.state is not JobState.DONE else 0
    rate = _rate(job)
    body = {
        "rate_per_second": rate,
        "job_id": job.job_id,
        "kind": job.kind.value,
        "state": job.state.value,
        "target_key": job.target_key or None,
        "target_version": job.target_version,
        "total": job.total,
        "completed": job.completed,
        "failed": job.failed,
        "pending": pending,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }
    if as_json:
        write_json(body)
        return
    target = f"{job.target_key} version " if job.target_key else "version "
    out.print(
        f"{job.kind.value} job {job.job_id} {job.state.value}: {job.completed:,} of "
        f"{job.total:,} done, {job.failed:,} failed, {pending:,} pending, {rate:,.0f} fields/s "
        f"(target {target}{job.target_version})",
        markup=False,
    )


def _rate(job: Job) -> float:
    """Fields per second between the job's creation and its last committed batch."""
    try:
        started = datetime.strptime(job.created_at, "%Y-%m-%dT%H:%M:%SZ")
        last = datetime.strptime(job.updated_at, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return 0.0
    return job.completed / max((last - started).total_seconds(), 1.0)


def _steer(state: JobState, actor: str | None) -> None:
    with open_service() as (service, settings):
        job = _active(service)
        changed = change_state(service, job.job_id, state, caller=caller_for(settings, actor))
    out.print(f"job {changed.job_id} is {changed.state.value}", markup=False)


@reencrypt_app.command("pause")
def reencrypt_pause(actor: ActorOption = None) -> None:
    """Workers stop after their current batch."""
    _steer(JobState.PAUSED, actor)


@reencrypt_app.command("resume")
def reencrypt_resume(actor: ActorOption = None) -> None:
    """Let workers go on (start them with `heimdall reencrypt run`)."""
    _steer(JobState.RUNNING, actor)


@reencrypt_app.command("cancel")
def reencrypt_cancel(actor: ActorOption = None) -> None:
    """Stop the job for good; fields already done stay done."""
    _steer(JobState.CANCELLED, actor)
