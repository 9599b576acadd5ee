"""The migration from the static env key to the KMS. spec: Migration Strategy, Phases 3-5, and
the Rollback Plan; Runbook: Re-encryption After Migration, steps 4-5.

The same library calls as ``heimdall migrate``: ``start`` records hybrid mode and starts the
migration job (worked by ``heimdall worker`` processes, never here), ``verify`` proves by query
that no legacy field remains and decrypts a random sample as the caller (so the sample needs a
role that may decrypt: heimdall-admin's sample fails, as on the command line), ``enforce``
records kms mode only when verify passes, ``rollback`` records legacy or hybrid mode.

The mode is recorded in the store, and a process reads it when it starts: this server and the
workers keep the mode they started with until restarted (the runbook's rolling restart). Each
answer says so, and ``GET /admin/migration`` shows both the recorded mode and this process's.
``start`` and ``rollback`` work on this process's service seen in the new mode, as the CLI
opens one, which needs ``HMD_MASTER_KEY`` in this server's environment.
"""

from __future__ import annotations

from typing import Final, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from heimdall.api.auth import AuthenticatedCaller
from heimdall.api.deps import service_of
from heimdall.api.schemas import JobBody, StrictBody, job_body
from heimdall.envelope import EncryptionVersion
from heimdall.errors import LifecycleError
from heimdall.modes import CipherRouter
from heimdall.rbac import Permission
from heimdall.rotation.job import JobKind, job_store, start_job
from heimdall.rotation.migration import (
    recorded_mode,
    require_verified,
    set_mode,
    verify,
)
from heimdall.service import Heimdall
from heimdall.types import EncryptionMode

__all__ = ["router"]

router = APIRouter(prefix="/admin/migration", tags=["migration"])

RESTART: Final = (
    "running heimdall serve and heimdall worker processes keep the mode they started with: "
    "restart them (a rolling restart) to apply it"
)


class JobSummary(BaseModel):
    job_id: str
    state: str
    completed: int
    total: int


class MigrationStatus(BaseModel):
    mode: str = Field(description="The mode this process runs in.")
    recorded_mode: str | None = Field(description="The mode recorded in the store.")
    legacy_fields: int
    kms_fields: int
    kms_fields_by_key: dict[str, int]
    job: JobSummary | None


class ModeChange(BaseModel):
    mode: str
    job: JobBody | None = None
    message: str


class SampleRequest(StrictBody):
    sample: int = Field(default=50, ge=0, le=100_000, description="Fields to decrypt for real.")


class RollbackRequest(StrictBody):
    to: Literal["legacy", "hybrid"] = Field(
        default="legacy",
        description="legacy: new fields under HMD_MASTER_KEY again (the spec's rollback); "
        "hybrid: new fields stay under the KMS.",
    )


class VerifyResponse(BaseModel):
    verified: bool
    problem: str | None
    legacy_fields: int
    index_key_legacy: bool
    sampled: int
    sample_failures: int
    key_name: str
    other_key_fields: int
    index_key_elsewhere: bool


def _in_mode(request: Request, mode: EncryptionMode) -> Heimdall:
    """This process's service, seen in *mode*: its store, audit trail and policy, with the
    ciphers that mode reads and writes with (``heimdall migrate`` opens the same in a process of
    its own). Not closed: it shares what the process's service closes."""
    service = service_of(request)
    router = CipherRouter(mode, kms=service.router.kms, legacy=request.app.state.legacy)
    return Heimdall(router=router, store=service.store, audit=service.audit, policy=service.policy)


@router.get("", response_model=MigrationStatus)
def migration_status(request: Request, caller: AuthenticatedCaller) -> MigrationStatus:
    """The mode, legacy and KMS field counts, the newest job (permission: read_status)."""
    service = service_of(request)
    service.require(caller, Permission.READ_STATUS)  # as `heimdall migrate status`
    store = service.store
    by_key: dict[str, int] = {}
    for count in store.field_counts():
        if count.encryption_version == EncryptionVersion.KMS_V1.value:
            name = count.key_name or "(none)"
            by_key[name] = by_key.get(name, 0) + count.count
    recorded = recorded_mode(store)
    job = job_store(service).latest_job()
    return MigrationStatus(
        mode=service.router.mode.value,
        recorded_mode=recorded.value if recorded else None,
        legacy_fields=store.count_fields(encryption_version=EncryptionVersion.LEGACY.value),
        kms_fields=sum(by_key.values()),
        kms_fields_by_key=by_key,
        job=None
        if job is None
        else JobSummary(
            job_id=job.job_id, state=job.state.value, completed=job.completed, total=job.total
        ),
    )


@router.post("/start", response_model=ModeChange)
def migration_start(request: Request, caller: AuthenticatedCaller) -> ModeChange:
    """legacy -> hybrid, and start the job that re-encrypts every legacy field under the KMS
    (permissions: configure_keys and reencrypt)."""
    service_of(request).require(caller, Permission.CONFIGURE_KEYS)  # before building anything
    hybrid = _in_mode(request, EncryptionMode.HYBRID)
    set_mode(hybrid, EncryptionMode.HYBRID, caller=caller, reason="migrate start")
    job = start_job(hybrid, caller=caller, kind=JobKind.MIGRATION)
    done = "no legacy field remains" if job is None else "heimdall worker processes work the job"
    return ModeChange(
        mode=EncryptionMode.HYBRID.value,
        job=job_body(job) if job else None,
        message=f"mode is now hybrid: {done}; {RESTART}",
    )


@router.post("/verify", response_model=VerifyResponse)
def migration_verify(
    request: Request, caller: AuthenticatedCaller, body: SampleRequest | None = None
) -> VerifyResponse:
    """Prove by query that no legacy field remains, and decrypt a random sample for real as the
    caller (permission: read_status; the sample needs decrypt)."""
    service = service_of(request)
    service.require(caller, Permission.READ_STATUS)
    result = verify(service, caller=caller, sample=(body or SampleRequest()).sample)
    problem = None
    try:
        require_verified(result)
    except LifecycleError as exc:
        problem = str(exc)
    return VerifyResponse(
        verified=problem is None,
        problem=problem,
        legacy_fields=result.legacy_fields,
        index_key_legacy=result.index_key_legacy,
        sampled=result.sampled,
        sample_failures=result.sample_failures,
        key_name=result.key_name,
        other_key_fields=result.other_key_fields,
        index_key_elsewhere=result.index_key_elsewhere,
    )


@router.post("/enforce", response_model=ModeChange)
def migration_enforce(
    request: Request, caller: AuthenticatedCaller, body: SampleRequest | None = None
) -> ModeChange:
    """hybrid -> kms, only when verify passes (409 otherwise) (permission: configure_keys)."""
    service = service_of(request)
    service.require(caller, Permission.CONFIGURE_KEYS)  # before the sample is decrypted
    result = verify(service, caller=caller, sample=(body or SampleRequest()).sample)
    require_verified(result, one_key=False)
    set_mode(service, EncryptionMode.KMS, caller=caller, reason="migrate enforce")
    return ModeChange(
        mode=EncryptionMode.KMS.value,
        message=f"mode is now kms: legacy fields are refused; HMD_MASTER_KEY can be removed; "
        f"{RESTART}",
    )


@router.post("/rollback", response_model=ModeChange)
def migration_rollback(
    request: Request, caller: AuthenticatedCaller, body: RollbackRequest | None = None
) -> ModeChange:
    """Back off the KMS (spec: Rollback Plan); every stored field stays readable
    (permission: configure_keys)."""
    mode = EncryptionMode((body or RollbackRequest()).to)
    service_of(request).require(caller, Permission.CONFIGURE_KEYS)  # before building anything
    target = _in_mode(request, mode)
    set_mode(target, mode, caller=caller, reason=f"migrate rollback to {mode.value}")
    return ModeChange(mode=mode.value, message=f"mode is now {mode.value}; {RESTART}")
