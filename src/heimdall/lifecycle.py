"""Key version lifecycle, one model for every provider: active, retired, disabled.

spec: Key Rotation Strategy (Dual-Key Period, Retire Old Key) and Runbook: Emergency Key
Compromise Response. States follow the two floors every provider keeps (Vault's
min_encryption_version / min_decryption_version, the keyring's own): a version below
min_decryption_version is **disabled**, below min_encryption_version **retired** (decrypt-only),
otherwise **active**. So retiring version N raises the encryption floor to N+1, disabling it
raises the decryption floor to N+1.

Retiring or disabling versions that stored fields still depend on is refused with the number of
dependent fields, unless forced. Retirement times are kept in the store, so the worker can
disable a retired version once ``grace_period_days`` have passed and nothing depends on it.
Every change is audited (``key.config``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from heimdall.audit import EventType
from heimdall.errors import HeimdallError, LifecycleError
from heimdall.kms.base import KeyDescription, KeyState
from heimdall.rbac import Caller, Permission
from heimdall.reencrypt_job import run_job, start_job
from heimdall.service import Heimdall
from heimdall.store.jobs import Job

__all__ = ["EmergencyResult", "disable_expired", "emergency_rotate", "retire", "retired_at"]

LIFECYCLE_META = "key_lifecycle"
_DAY = 86_400.0


def retired_at(heimdall: Heimdall) -> dict[int, float]:
    """When each retired version was retired (seconds since the epoch)."""
    text = heimdall.store.get_meta(LIFECYCLE_META)
    if text is None:
        return {}
    return {int(v): float(t) for v, t in orjson.loads(text).get("retired_at", {}).items()}


def _record_retirement(heimdall: Heimdall, versions: range, now: float) -> None:
    known = retired_at(heimdall)
    for version in versions:
        known.setdefault(version, now)
    body = {"retired_at": {str(v): t for v, t in sorted(known.items())}}
    heimdall.store.set_meta(LIFECYCLE_META, orjson.dumps(body).decode())


def _audit(
    heimdall: Heimdall,
    caller: Caller,
    operation: str,
    description: KeyDescription | None,
    error: HeimdallError | None = None,
) -> None:
    heimdall.key_event(EventType.KEY_CONFIG, caller, description, error, operation=operation)


def retire(
    heimdall: Heimdall,
    version: int,
    *,
    caller: Caller,
    force: bool = False,
    clock: Callable[[], float] = time.time,
) -> KeyDescription:
    """Retire every version up to *version* (decrypt-only). Never the latest one."""
    heimdall.require(caller, Permission.CONFIGURE_KEYS)
    operation = f"retire versions <= {version}"
    before = heimdall.kms.describe()
    latest = before.latest_version
    if not 1 <= version < latest:
        error = LifecycleError(f"only versions below the latest ({latest}) can be retired")
        _audit(heimdall, caller, operation, None, error)
        raise error
    fields, index_key = heimdall.dependents_below(version + 1)
    if (fields or index_key) and not force:
        error = LifecycleError(
            f"{fields} stored fields still depend on key versions up to {version}; "
            "run `heimdall reencrypt` first or pass --force",
            dependent_fields=fields + int(index_key),
        )
        _audit(heimdall, caller, operation, None, error)
        raise error
    # Retiring never lowers the floor: versions retired already (here, or by another
    # deployment sharing the key) stay retired.
    description = heimdall.kms.set_min_encryption_version(
        max(version + 1, before.min_encryption_version)
    )
    heimdall.router.forget_keys()
    _record_retirement(heimdall, range(1, version + 1), clock())
    _audit(heimdall, caller, operation, description)
    return description


def disable_expired(
    heimdall: Heimdall,
    *,
    caller: Caller,
    grace_period_days: float,
    clock: Callable[[], float] = time.time,
) -> KeyDescription | None:
    """Disable retired versions past their grace period that no field depends on."""
    description = heimdall.kms.describe()
    since = retired_at(heimdall)
    now = clock()
    eligible = [
        v.version
        for v in description.versions
        if v.state is KeyState.RETIRED
        and v.version in since
        and now - since[v.version] >= grace_period_days * _DAY
    ]
    highest = 0
    for version in sorted(eligible):
        fields, index_key = heimdall.dependents_below(version + 1)
        if fields or index_key:
            break
        highest = version
    if not highest:
        return None
    return heimdall.set_min_decryption_version(highest + 1, caller=caller)


@dataclass(frozen=True, slots=True)
class EmergencyResult:
    description: KeyDescription
    job: Job | None
    disabled_below: int | None


def emergency_rotate(
    heimdall: Heimdall, *, caller: Caller, batch_size: int = 5000
) -> EmergencyResult:
    """spec: Emergency Key Compromise Response. Rotate; stop encrypting with every old version;
    re-encrypt every field under new data keys at full speed (the old master key may have
    exposed the old data keys, so a rewrap is not enough); then disable the old versions once no
    field depends on them."""
    heimdall.require(caller, Permission.ROTATE)
    description = heimdall.rotate_keys(caller=caller)
    latest = description.latest_version
    description = heimdall.kms.set_min_encryption_version(latest)
    heimdall.router.forget_keys()
    _audit(heimdall, caller, f"emergency: retire versions < {latest}", description)
    job = start_job(heimdall, caller=caller, kind="emergency")
    if job is not None:
        job = run_job(heimdall, job.job_id, caller=caller, batch_size=batch_size)
    fields, index_key = heimdall.dependents_below(latest)
    disabled = None
    if not fields and not index_key:
        description = heimdall.set_min_decryption_version(latest, caller=caller)
        disabled = latest
    return EmergencyResult(description, job, disabled)
