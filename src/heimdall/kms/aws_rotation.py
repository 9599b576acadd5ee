"""Changes to heimdall's key versions on AWS KMS: a new version, the floors, deletion.

spec: Key Rotation Strategy and Runbook: Emergency Key Compromise Response. The version model is
:mod:`heimdall.kms.aws_versions`'. Every change here is made in AWS, so it binds every process
and every host, heimdall's or not:

* **a new version** is a new KMS key (symmetric, created with the latest version's key policy
  and tagged as the version), with automatic rotation of its key material turned on (AWS's
  practice for every customer managed key: yearly new backing material under the same key, which
  heimdall's versions cannot see and need not), committed by creating its version alias. Then
  ``alias/<name>`` is pointed at it;
* **the decryption floor** disables, in KMS itself, the key of every version below it (KMS then
  refuses it to anyone, not only to heimdall) and tags it ``disabled``; lowering the floor
  enables them again (cancelling a scheduled deletion first);
* **the encryption floor** tags the versions below it ``retired``;
* **deletion** (the runbook's last step) schedules the deletion of disabled versions' keys after
  a waiting period of 7-30 days, during which it can still be cancelled by lowering the floor.

CreateKey, CreateAlias and UpdateAlias are never retried (see :mod:`heimdall.kms.aws_client`):
after a failure the alias is read again to learn what happened.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from heimdall.errors import KeyVersionDisabled, KmsError, KmsUnavailable, LifecycleError
from heimdall.kms.aws_client import AliasTaken, AwsClients, aws_errors
from heimdall.kms.aws_versions import (
    TAG_KEY,
    TAG_STATE,
    TAG_VERSION,
    KeyChain,
    VersionKey,
    describe_key,
    key_id_of,
    latest_alias,
    version_alias,
)
from heimdall.kms.base import KeyState

__all__ = [
    "MAX_DELETION_DAYS",
    "MIN_DELETION_DAYS",
    "claim_version",
    "create_version_key",
    "point_latest",
    "rotate",
    "schedule_deletion",
    "set_min_decryption_version",
    "set_min_encryption_version",
]

MIN_DELETION_DAYS: Final = 7
MAX_DELETION_DAYS: Final = 30
ORPHAN_DELETION_DAYS: Final = 7
_log = logging.getLogger("heimdall.kms.aws")


def create_version_key(clients: AwsClients, name: str, version: int, policy: str | None) -> str:
    """A new KMS key for *version* of *name*, with automatic rotation on; its key ID."""
    arguments: dict[str, Any] = {
        "Description": f"heimdall master key {name}, version {version}",
        "KeySpec": "SYMMETRIC_DEFAULT",
        "KeyUsage": "ENCRYPT_DECRYPT",
        "Tags": [
            {"TagKey": TAG_KEY, "TagValue": name},
            {"TagKey": TAG_VERSION, "TagValue": str(version)},
            {"TagKey": TAG_STATE, "TagValue": KeyState.ACTIVE.value},
        ],
    }
    if policy is not None:
        arguments["Policy"] = policy
    try:
        with aws_errors(f"create the KMS key of version {version} of {name}"):
            key_id = str(clients.once.create_key(**arguments)["KeyMetadata"]["KeyId"])
    except KmsUnavailable as exc:
        raise KmsUnavailable(
            f"{exc}; not retried, as a retry could create a second key (a key tagged "
            f"{TAG_VERSION}={version} may exist without its alias)",
            provider=exc.provider,
        ) from None
    with aws_errors(f"turn on automatic rotation of KMS key {key_id}"):
        clients.kms.enable_key_rotation(KeyId=key_id)
    return key_id


def _alias_target(clients: AwsClients, alias: str) -> str | None:
    try:
        return key_id_of(str(describe_key(clients.kms, alias).get("KeyId") or ""))
    except KmsError:
        return None


def claim_version(clients: AwsClients, name: str, version: int, key_id: str) -> bool:
    """Create *version*'s alias for *key_id*: True if it now names that key, False if another
    process made the version first."""
    alias = version_alias(name, version)
    try:
        with aws_errors(f"create the alias {alias}"):
            clients.once.create_alias(AliasName=alias, TargetKeyId=key_id)
    except AliasTaken:
        return _alias_target(clients, alias) == key_id
    except KmsUnavailable:
        if _alias_target(clients, alias) == key_id:
            return True  # created; only the answer was lost
        raise
    return True


def point_latest(clients: AwsClients, name: str, key_id: str, current: str | None) -> None:
    """Point ``alias/<name>`` at *key_id* (its current target: *current*)."""
    alias = latest_alias(name)
    with aws_errors(f"point {alias} at KMS key {key_id}"):
        if current is None:
            clients.once.create_alias(AliasName=alias, TargetKeyId=key_id)
        elif current != key_id:
            clients.once.update_alias(AliasName=alias, TargetKeyId=key_id)


def _key_policy(clients: AwsClients, key: VersionKey) -> str:
    with aws_errors(f"read the key policy of KMS key {key.key_id}"):
        return str(clients.kms.get_key_policy(KeyId=key.key_id, PolicyName="default")["Policy"])


def rotate(clients: AwsClients, chain: KeyChain) -> None:
    """Make the next version of *chain*'s key (see the module docstring)."""
    name, latest = chain.name, chain.latest_version
    policy = _key_policy(clients, chain.versions[latest])
    key_id = create_version_key(clients, name, latest + 1, policy)
    if not claim_version(clients, name, latest + 1, key_id):
        # Another process rotated first: its version stands, this key never wrapped anything.
        try:
            _schedule(clients, key_id, ORPHAN_DELETION_DAYS, f"unused KMS key {key_id}")
        except KmsError as exc:
            _log.warning("%s; KMS key %s is unused: schedule its deletion", exc, key_id)
        return
    try:
        point_latest(clients, name, key_id, chain.latest_target)
    except KmsError as exc:
        # The new version is committed and used by heimdall; only the alias AWS tools read
        # lags. `heimdall aws bootstrap` points it, `heimdall kms check` reports it.
        _log.warning("%s; run `heimdall aws bootstrap` to point it", exc)


def _tag(clients: AwsClients, key: VersionKey, state: KeyState) -> None:
    if key.marked is state:
        return
    with aws_errors(f"tag version {key.version}'s KMS key {state.value}"):
        clients.kms.tag_resource(
            KeyId=key.key_id, Tags=[{"TagKey": TAG_STATE, "TagValue": state.value}]
        )


def _check_floor(chain: KeyChain, version: int, which: str) -> None:
    if not 1 <= version <= chain.latest_version:
        raise LifecycleError(
            f"{which} must be between 1 and the latest version {chain.latest_version}"
        )


def set_min_decryption_version(clients: AwsClients, chain: KeyChain, floor: int) -> None:
    """Disable every version below *floor* in KMS, enable those at or above it that heimdall
    disabled. KMS's refusal is what matters, so it changes first and the tag second."""
    _check_floor(chain, floor, "min_decryption_version")
    encryption_floor = max(chain.min_encryption_version, floor)
    for version, key in sorted(chain.versions.items()):
        if version < floor:
            if key.key_state == "Enabled":
                with aws_errors(f"disable version {version}'s KMS key {key.key_id}"):
                    clients.kms.disable_key(KeyId=key.key_id)
            _tag(clients, key, KeyState.DISABLED)
        elif key.marked is KeyState.DISABLED:
            if key.key_state == "PendingDeletion":
                _cancel_deletion(clients, key)
            with aws_errors(f"enable version {version}'s KMS key {key.key_id}"):
                clients.kms.enable_key(KeyId=key.key_id)
            state = KeyState.RETIRED if version < encryption_floor else KeyState.ACTIVE
            _tag(clients, key, state)


def set_min_encryption_version(clients: AwsClients, chain: KeyChain, floor: int) -> None:
    """Tag the versions below *floor* retired, those at or above it active (disabled versions
    stay disabled)."""
    _check_floor(chain, floor, "min_encryption_version")
    for version, key in sorted(chain.versions.items()):
        if key.marked is not KeyState.DISABLED:
            _tag(clients, key, KeyState.RETIRED if version < floor else KeyState.ACTIVE)


def _cancel_deletion(clients: AwsClients, key: VersionKey) -> None:
    try:
        with aws_errors(f"cancel the deletion of version {key.version}'s KMS key"):
            clients.kms.cancel_key_deletion(KeyId=key.key_id)
    except KeyVersionDisabled:
        # KMSInvalidStateException: no deletion is pending (any more): what was wanted.
        if describe_key(clients.kms, key.key_id).get("KeyState") == "PendingDeletion":
            raise


def _schedule(clients: AwsClients, key_id: str, days: int, what: str) -> str:
    """Schedule *key_id*'s deletion; the deletion date (empty if it was scheduled already)."""
    try:
        with aws_errors(f"schedule the deletion of {what}"):
            answer = clients.kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=days)
    except KeyVersionDisabled:
        # KMSInvalidStateException: scheduled already (a retry of a call that succeeded).
        if describe_key(clients.kms, key_id).get("KeyState") != "PendingDeletion":
            raise
        return ""
    date = answer.get("DeletionDate")
    return date.strftime("%Y-%m-%d") if hasattr(date, "strftime") else ""


def schedule_deletion(
    clients: AwsClients, chain: KeyChain, below: int, days: int
) -> list[tuple[int, str]]:
    """Schedule the deletion of the KMS key of every version below *below*, each of which must
    be disabled already; (version, deletion date) of each scheduled now."""
    if not MIN_DELETION_DAYS <= days <= MAX_DELETION_DAYS:
        raise LifecycleError(
            f"the waiting period is {MIN_DELETION_DAYS} to {MAX_DELETION_DAYS} days"
        )
    keys = [key for version, key in sorted(chain.versions.items()) if version < below]
    active = [key.version for key in keys if key.marked is not KeyState.DISABLED]
    if active:
        raise LifecycleError(
            f"version {active[-1]} is not disabled; disable the versions first "
            f"(`heimdall keys disable {below - 1}`)"
        )
    return [
        (key.version, _schedule(clients, key.key_id, days, f"version {key.version}'s KMS key"))
        for key in keys
        if key.key_state != "PendingDeletion"
    ]
