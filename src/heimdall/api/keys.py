"""The master key's lifecycle: show, rotate (routine or emergency), retire, disable, and the
decryption floor. spec: Key Rotation Strategy; Runbook: Routine Key Rotation; Runbook: Emergency
Key Compromise Response.

The same library calls as ``heimdall keys``: a change that would strand stored fields is
refused by the library (409, with ``dependent_fields``) unless the request says ``"force":
true``, exactly as ``--force`` does, and every change and refusal is audited there. An emergency
rotation made here starts the emergency job and leaves it to an identity that may decrypt and
encrypt (``heimdall reencrypt run`` as heimdall-app), as the CLI does for heimdall-admin.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from heimdall.api.auth import AuthenticatedCaller
from heimdall.api.deps import service_of
from heimdall.api.schemas import (
    JobBody,
    KeysBody,
    RotateRequest,
    VersionRequest,
    job_body,
    keys_body,
)
from heimdall.rotation.emergency import emergency_rotate
from heimdall.rotation.job import may_reencrypt_emergency, work_left
from heimdall.rotation.lifecycle import disable, retire

__all__ = ["router"]

router = APIRouter(prefix="/admin/keys", tags=["keys"])


class RotateResponse(BaseModel):
    keys: KeysBody
    emergency: bool
    fields_on_older_versions: int | None = None
    job: JobBody | None = None
    disabled_below: int | None = None
    message: str


@router.get("", response_model=KeysBody)
def show_keys(request: Request, caller: AuthenticatedCaller) -> KeysBody:
    """The master key's versions, their states and the version floors (permission: read_keys)."""
    return keys_body(service_of(request).describe_keys(caller=caller))


@router.post("/rotate", response_model=RotateResponse)
def rotate_keys(
    request: Request, caller: AuthenticatedCaller, body: RotateRequest | None = None
) -> RotateResponse:
    """A new master key version (permission: rotate); ``{"emergency": true}`` for a compromised
    key: also retire every older version and start the emergency re-encryption job."""
    service = service_of(request)
    if body is None or not body.emergency:
        description = service.rotate_keys(caller=caller)
        waiting = work_left(service).fields
        return RotateResponse(
            keys=keys_body(description),
            emergency=False,
            fields_on_older_versions=waiting,
            message=f"rotated {description.key_name} to version "
            f"{description.latest_version}; {waiting:,} fields are on older versions "
            "(POST /admin/crypto/reencrypt)",
        )
    result = emergency_rotate(service, caller=caller)
    if result.job is not None and not may_reencrypt_emergency(caller):
        message = (
            f"job {result.job.job_id} started to re-encrypt {result.job.total:,} fields under "
            "new data keys: run `heimdall reencrypt run` as heimdall-app, then disable the old "
            "versions (POST /admin/keys/disable)"
        )
    elif result.disabled_below:
        message = f"versions below {result.disabled_below} disabled"
    else:
        message = "old versions NOT disabled yet: fields still depend on them"
    return RotateResponse(
        keys=keys_body(result.description),
        emergency=True,
        job=job_body(result.job) if result.job else None,
        disabled_below=result.disabled_below,
        message=message,
    )


@router.post("/retire", response_model=KeysBody)
def retire_versions(
    body: VersionRequest, request: Request, caller: AuthenticatedCaller
) -> KeysBody:
    """Versions up to ``version`` decrypt but never encrypt again (permission:
    configure_keys); refused (409) while fields depend on them, unless ``force``."""
    return keys_body(retire(service_of(request), body.version, caller=caller, force=body.force))


@router.post("/disable", response_model=KeysBody)
def disable_versions(
    body: VersionRequest, request: Request, caller: AuthenticatedCaller
) -> KeysBody:
    """Versions up to ``version`` no longer decrypt (permission: configure_keys); refused (409)
    while fields depend on them, unless ``force``."""
    return keys_body(disable(service_of(request), body.version, caller=caller, force=body.force))


@router.post("/set-min-decryption-version", response_model=KeysBody)
def set_min_decryption_version(
    body: VersionRequest, request: Request, caller: AuthenticatedCaller
) -> KeysBody:
    """Disable decryption below ``version`` (permission: configure_keys; the emergency
    runbook's step 2). Refused (409, with ``dependent_fields``) while stored fields depend on
    lower versions, and lowering the floor always needs ``force``, as with the CLI."""
    service = service_of(request)
    return keys_body(
        service.set_min_decryption_version(body.version, caller=caller, force=body.force)
    )
