"""The emergency rotation, for a compromised master key.

spec: Runbook: Emergency Key Compromise Response. Rotate; stop encrypting with every old version;
re-encrypt every field under new data keys at full speed (the old master key may have exposed
the old data keys, so a rewrap is not enough: the job is an :attr:`JobKind.EMERGENCY` one);
then disable the old versions once no field depends on them.

Re-encrypting under new data keys decrypts every field, which heimdall-admin may not do (it
never sees plaintext; on AWS its IAM policy denies Decrypt and GenerateDataKey outright). As
the runbook's steps 2 and 3, the work then splits: the admin rotates, retires the old versions
and starts the job; an identity that may decrypt and encrypt (heimdall-app, or the operator)
runs it with ``heimdall reencrypt run``; the admin then disables the old versions (``heimdall
keys disable``), which is refused until nothing depends on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from heimdall.audit import EventType
from heimdall.kms.base import KeyDescription
from heimdall.rbac import Caller, Permission
from heimdall.rotation import lifecycle
from heimdall.rotation.job import JobKind, may_reencrypt_emergency, run_job, start_job
from heimdall.service import Heimdall
from heimdall.store.jobs import Job

__all__ = ["EmergencyResult", "emergency_rotate"]


@dataclass(frozen=True, slots=True)
class EmergencyResult:
    description: KeyDescription
    job: Job | None
    disabled_below: int | None


def emergency_rotate(
    heimdall: Heimdall, *, caller: Caller, batch_size: int = 5000
) -> EmergencyResult:
    """Rotate, retire every older version, re-encrypt every field under new data keys, then
    disable the older versions if nothing depends on them any more."""
    heimdall.require(caller, Permission.ROTATE)
    description = lifecycle.rotate(heimdall, caller=caller)
    latest = description.latest_version
    description = heimdall.kms.set_min_encryption_version(latest)
    heimdall.router.forget_keys()
    heimdall.record(
        lifecycle.key_event(
            EventType.KEY_CONFIG,
            caller,
            description,
            None,
            operation=f"emergency: retire versions < {latest}",
        )
    )
    job = start_job(heimdall, caller=caller, kind=JobKind.EMERGENCY)
    if job is not None and may_reencrypt_emergency(caller):
        job = run_job(heimdall, job.job_id, caller=caller, batch_size=batch_size)
    fields, index_key = lifecycle.dependents_below(heimdall, latest)
    disabled = None
    if not fields and not index_key:
        description = lifecycle.set_min_decryption_version(heimdall, latest, caller=caller)
        disabled = latest
    return EmergencyResult(description, job, disabled)
