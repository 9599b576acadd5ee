"""The admin API of the re-encryption job. spec: Migration Strategy, Phase 4 ("Admin API
endpoint to trigger/monitor re-encryption"); Runbook: Re-encryption After Migration, steps 2-3.

``POST /admin/crypto/reencrypt`` starts the job, or joins the active one, as ``heimdall
reencrypt`` does (:func:`heimdall.rotation.job.start_job`), and returns it; the job is worked by
``heimdall worker`` processes, on any host that shares the store, never by this server. Workers
pace it by their own ``HMD_REENCRYPT_BATCH_SIZE`` and ``HMD_REENCRYPT_INTERVAL_SECONDS``: the
runbook's ``batch_size`` and ``interval_seconds`` are accepted when they are what this
deployment is configured with, and refused (422) otherwise, rather than pretending to apply
them. ``status``, ``pause``, ``resume`` and ``cancel`` act on the newest (active) job.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel

from heimdall.api.auth import AuthenticatedCaller
from heimdall.api.deps import service_of, settings_of
from heimdall.api.errors import ApiError
from heimdall.api.schemas import (
    JobBody,
    JobPlanBody,
    ReencryptRequest,
    job_body,
    plan_body,
)
from heimdall.rbac import Caller, Permission
from heimdall.rotation.job import change_state, job_store, plan, start_job
from heimdall.settings import Settings
from heimdall.store.jobs import Job, JobState

__all__ = ["router"]

router = APIRouter(prefix="/admin/crypto/reencrypt", tags=["re-encryption"])


class NoJobBody(BaseModel):
    job: None = None
    message: str


def _check_pacing(body: ReencryptRequest, settings: Settings) -> None:
    """Refuse pacing the workers would not apply."""
    wanted = (
        ("batch_size", body.batch_size, settings.reencrypt_batch_size, "BATCH_SIZE"),
        (
            "interval_seconds",
            body.interval_seconds,
            settings.reencrypt_interval_seconds,
            "INTERVAL_SECONDS",
        ),
    )
    for name, asked, configured, variable in wanted:
        if asked is not None and asked != configured:
            raise ApiError(
                422,
                "pacing_not_applied",
                f"{name} {asked:g} is not what the workers use: they pace the job by "
                f"HMD_REENCRYPT_{variable} ({configured:g} in this deployment); change it in "
                "the workers' configuration, or leave it out",
            )


@router.post("", response_model=JobBody | JobPlanBody | NoJobBody)
def start_reencryption(
    request: Request, caller: AuthenticatedCaller, body: ReencryptRequest | None = None
) -> JobBody | JobPlanBody | NoJobBody:
    """Start (or join) the job that brings every field to the latest key version, and return it
    (permission: reencrypt); ``dry_run`` reports what it would do and starts nothing."""
    body = body or ReencryptRequest()
    service = service_of(request)
    service.require(caller, Permission.REENCRYPT)  # before the request says anything back
    _check_pacing(body, settings_of(request))
    if body.dry_run:
        return plan_body(plan(service, caller=caller))
    job = start_job(service, caller=caller)
    if job is None:
        return NoJobBody(message="nothing to re-encrypt: every field is on the latest key version")
    return job_body(job_store(service).get_job(job.job_id) or job)  # as stored: its times


def _rate(job: Job) -> float:
    """Fields per second between the job's creation and its last committed batch."""
    try:
        started = datetime.strptime(job.created_at, "%Y-%m-%dT%H:%M:%SZ")
        last = datetime.strptime(job.updated_at, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return 0.0
    return job.completed / max((last - started).total_seconds(), 1.0)


@router.get("/status", response_model=JobBody)
def reencryption_status(request: Request, caller: AuthenticatedCaller) -> JobBody:
    """Total, completed, failed and pending of the newest job (permission: read_status)."""
    service = service_of(request)
    service.require(caller, Permission.READ_STATUS)  # as `heimdall reencrypt status`
    jobs = job_store(service)
    job = jobs.latest_job()
    if job is None:
        raise ApiError(404, "no_job", "no re-encryption job has run yet")
    pending = jobs.count_pending(job) if job.state is not JobState.DONE else 0
    return job_body(job, pending=pending, rate=_rate(job))


def _steer(request: Request, caller: Caller, state: JobState) -> JobBody:
    service = service_of(request)
    # Checked first, so that a caller who may not steer the job learns nothing of it.
    service.require(caller, Permission.REENCRYPT)
    job = job_store(service).active_job()
    if job is None:
        raise ApiError(404, "no_active_job", "there is no active re-encryption job")
    return job_body(change_state(service, job.job_id, state, caller=caller))


@router.post("/pause", response_model=JobBody)
def pause_reencryption(request: Request, caller: AuthenticatedCaller) -> JobBody:
    """Workers stop after their current batch (permission: reencrypt)."""
    return _steer(request, caller, JobState.PAUSED)


@router.post("/resume", response_model=JobBody)
def resume_reencryption(request: Request, caller: AuthenticatedCaller) -> JobBody:
    """Workers go on (permission: reencrypt)."""
    return _steer(request, caller, JobState.RUNNING)


@router.post("/cancel", response_model=JobBody)
def cancel_reencryption(request: Request, caller: AuthenticatedCaller) -> JobBody:
    """Stop the job for good; fields already done stay done (permission: reencrypt)."""
    return _steer(request, caller, JobState.CANCELLED)
