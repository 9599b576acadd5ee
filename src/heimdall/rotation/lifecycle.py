"""Key version lifecycle, one model for every provider: active, retired, disabled.

spec: Key Rotation Strategy (Create New Key Version, Dual-Key Period, Retire Old Key) and
Runbook: Emergency Key Compromise Response. States follow the two floors every provider keeps
(Vault's min_encryption_version / min_decryption_version, the keyring's own): a version below
min_decryption_version is **disabled**, below min_encryption_version **retired** (decrypt-only),
otherwise **active**. So retiring version N raises the encryption floor to N+1, disabling it
raises the decryption floor to N+1.

* **Rotate**: a new latest version; new fields use it, old fields still decrypt.
* **Retire / disable** versions that stored fields (or the blind-index key) still depend on is
  refused with the number of dependents, unless forced. Retiring never lowers the encryption
  floor; lowering the decryption floor (re-enabling versions disabled, perhaps as compromised,
  perhaps by another deployment sharing the key) always needs force and is its own event,
  ``key.reenable``.
* **Grace period**: retirement times are kept in the store, so the worker disables a retired
  version once ``grace_period_days`` have passed and nothing depends on it.

Every change is audited (``key.rotate``, ``key.config``, ``key.reenable``). The functions take
the service's parts through :class:`KeyOwner`, so this module sits below the service, which
offers them as its ``rotate_keys`` / ``set_min_decryption_version`` methods. The emergency
rotation, which runs the re-encryption job, is :mod:`heimdall.rotation.emergency`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import orjson

from heimdall.audit import AuditEvent, EventType
from heimdall.blind_index import StoredIndexKey
from heimdall.envelope import EncryptionVersion
from heimdall.errors import HeimdallError, LifecycleError
from heimdall.kms.base import KeyDescription, KeyManagementService, KeyState
from heimdall.modes import CipherRouter
from heimdall.rbac import Caller, Permission
from heimdall.store.base import GraphStore

__all__ = [
    "KeyOwner",
    "dependents_below",
    "describe",
    "disable",
    "disable_expired",
    "key_event",
    "retire",
    "retired_at",
    "rotate",
    "set_min_decryption_version",
]

LIFECYCLE_META = "key_lifecycle"
_DAY = 86_400.0


class KeyOwner(Protocol):
    """What the lifecycle needs of the service: its key provider, store, router and trail."""

    router: CipherRouter
    store: GraphStore

    @property
    def kms(self) -> KeyManagementService: ...

    def require(
        self, caller: Caller, permission: Permission, *, field: str | None = None
    ) -> None: ...

    def record(self, *events: AuditEvent) -> None: ...


def key_event(
    event_type: EventType,
    caller: Caller,
    description: KeyDescription | None,
    error: BaseException | None,
    *,
    operation: str,
) -> AuditEvent:
    """A key lifecycle event, naming the latest version the change left (when it succeeded)."""
    latest = description.latest_version if description else None
    return AuditEvent.of(
        event_type,
        caller,
        error=error,
        key_identifier=description.key_identifier(latest) if description and latest else None,
        key_version=latest,
        operation=operation,
    )


def _change(
    owner: KeyOwner,
    event_type: EventType,
    caller: Caller,
    operation: str,
    change: Callable[[], KeyDescription],
) -> KeyDescription:
    """Make *change* at the provider, drop the cached data keys it may outdate, audit it."""
    try:
        description = change()
    except HeimdallError as exc:
        owner.record(key_event(event_type, caller, None, exc, operation=operation))
        raise
    owner.router.forget_keys()
    owner.record(key_event(event_type, caller, description, None, operation=operation))
    return description


def _refuse(
    owner: KeyOwner, event_type: EventType, caller: Caller, operation: str, error: LifecycleError
) -> LifecycleError:
    owner.record(key_event(event_type, caller, None, error, operation=operation))
    return error


def describe(owner: KeyOwner, *, caller: Caller) -> KeyDescription:
    owner.require(caller, Permission.READ_KEYS)
    return owner.kms.describe()


def rotate(owner: KeyOwner, *, caller: Caller) -> KeyDescription:
    """A new master key version: new fields use it, old fields still decrypt."""
    owner.require(caller, Permission.ROTATE)
    return _change(owner, EventType.KEY_ROTATE, caller, "rotate", owner.kms.rotate)


def dependents_below(owner: KeyOwner, version: int) -> tuple[int, bool]:
    """Stored fields whose data key is wrapped below *version* of the provider's key, and
    whether the blind-index key is too. (Fields under another provider's key, while a
    deployment moves between providers, depend on that key, not on this one's versions.)"""
    key_name = owner.kms.describe().key_name
    kms_v1 = EncryptionVersion.KMS_V1.value
    store = owner.store
    # Counted as every field below the version less those under another named key, so that a
    # field whose key the store could not name (an envelope not in heimdall's own layout)
    # counts as a dependent: refusing a floor too early is safe, allowing it is not.
    fields = store.count_fields(encryption_version=kms_v1, key_version_below=version) - sum(
        store.count_fields(encryption_version=kms_v1, key_version_below=version, key_name=other)
        for other in store.key_names()
        if other != key_name
    )
    stored = StoredIndexKey.stored_in(owner.store)
    return fields, stored is not None and stored.wrapped_below(version, key_name)


def set_min_decryption_version(
    owner: KeyOwner, version: int, *, caller: Caller, force: bool = False
) -> KeyDescription:
    """Raise the decryption floor; refused while fields still depend on lower versions."""
    owner.require(caller, Permission.CONFIGURE_KEYS)
    current = owner.kms.describe().min_decryption_version
    if version < current:
        return _lower_decryption_floor(owner, current, version, caller=caller, force=force)
    operation = f"min_decryption_version={version}"
    fields, index_key = dependents_below(owner, version)
    if (fields or index_key) and not force:
        also = " and the blind-index key" if index_key else ""
        raise _refuse(
            owner,
            EventType.KEY_CONFIG,
            caller,
            operation,
            LifecycleError(
                f"{fields} stored fields{also} still depend on key versions below {version}; "
                "run `heimdall reencrypt` first or pass --force",
                dependent_fields=fields + int(index_key),
            ),
        )
    return _change(
        owner,
        EventType.KEY_CONFIG,
        caller,
        operation,
        lambda: owner.kms.set_min_decryption_version(version),
    )


def _lower_decryption_floor(
    owner: KeyOwner, current: int, version: int, *, caller: Caller, force: bool
) -> KeyDescription:
    """Versions disabled (perhaps as compromised, perhaps by another deployment sharing the
    key) decrypt again: never without force, and audited as an event of its own."""
    operation = f"min_decryption_version {current} -> {version}"
    if not force:
        raise _refuse(
            owner,
            EventType.KEY_REENABLE,
            caller,
            operation,
            LifecycleError(
                f"lowering min_decryption_version from {current} to {version} re-enables "
                "versions that were disabled, perhaps as compromised; pass --force if that is "
                "what you mean"
            ),
        )
    return _change(
        owner,
        EventType.KEY_REENABLE,
        caller,
        operation,
        lambda: owner.kms.set_min_decryption_version(version),
    )


def disable(
    owner: KeyOwner, version: int, *, caller: Caller, force: bool = False
) -> KeyDescription:
    """Disable every version up to *version*: fields still under them no longer decrypt."""
    return set_min_decryption_version(owner, version + 1, caller=caller, force=force)


def retired_at(owner: KeyOwner) -> dict[int, float]:
    """When each retired version was retired (seconds since the epoch)."""
    text = owner.store.get_meta(LIFECYCLE_META)
    if text is None:
        return {}
    return {int(v): float(t) for v, t in orjson.loads(text).get("retired_at", {}).items()}


def _record_retirement(owner: KeyOwner, versions: range, now: float) -> None:
    known = retired_at(owner)
    for version in versions:
        known.setdefault(version, now)
    body = {"retired_at": {str(v): t for v, t in sorted(known.items())}}
    owner.store.set_meta(LIFECYCLE_META, orjson.dumps(body).decode())


def retire(
    owner: KeyOwner,
    version: int,
    *,
    caller: Caller,
    force: bool = False,
    clock: Callable[[], float] = time.time,
) -> KeyDescription:
    """Retire every version up to *version* (decrypt-only). Never the latest one."""
    owner.require(caller, Permission.CONFIGURE_KEYS)
    operation = f"retire versions <= {version}"
    before = owner.kms.describe()
    if not 1 <= version < before.latest_version:
        raise _refuse(
            owner,
            EventType.KEY_CONFIG,
            caller,
            operation,
            LifecycleError(
                f"only versions below the latest ({before.latest_version}) can be retired"
            ),
        )
    fields, index_key = dependents_below(owner, version + 1)
    if (fields or index_key) and not force:
        raise _refuse(
            owner,
            EventType.KEY_CONFIG,
            caller,
            operation,
            LifecycleError(
                f"{fields} stored fields still depend on key versions up to {version}; "
                "run `heimdall reencrypt` first or pass --force",
                dependent_fields=fields + int(index_key),
            ),
        )
    # Retiring never lowers the floor: versions retired already (here, or by another
    # deployment sharing the key) stay retired.
    floor = max(version + 1, before.min_encryption_version)
    description = owner.kms.set_min_encryption_version(floor)
    owner.router.forget_keys()
    _record_retirement(owner, range(1, version + 1), clock())
    owner.record(key_event(EventType.KEY_CONFIG, caller, description, None, operation=operation))
    return description


def disable_expired(
    owner: KeyOwner,
    *,
    caller: Caller,
    grace_period_days: float,
    clock: Callable[[], float] = time.time,
) -> KeyDescription | None:
    """Disable retired versions past their grace period that no field depends on."""
    description = owner.kms.describe()
    since = retired_at(owner)
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
        fields, index_key = dependents_below(owner, version + 1)
        if fields or index_key:
            break
        highest = version
    if not highest:
        return None
    return set_min_decryption_version(owner, highest + 1, caller=caller)
