"""Changes to heimdall's key versions on AWS KMS: a new version, the floors, deletion.

spec: Key Rotation Strategy and Runbook: Emergency Key Compromise Response. The version model is
:mod:`heimdall.kms.aws_versions`'. Every change here is made in AWS, so it binds every process
and every host, heimdall's or not:

* **a new version** is a new KMS key (symmetric, tagged as the version), with automatic
  rotation of its key material turned on (AWS's practice for every customer managed key: yearly
  new backing material under the same key, which heimdall's versions cannot see and need not),
  committed by creating its version alias. Then ``alias/<name>`` is pointed at it. It is created
  with AWS's default key policy (the account's IAM policies apply, as the first statement of
  heimdall's does), never with one of heimdall's choosing: AWS refuses a key policy at creation
  unless it lets the creating principal call PutKeyPolicy afterwards (the lockout safety check,
  which heimdall never bypasses), and heimdall-admin, who rotates, is denied PutKeyPolicy. The
  roles reach it through their IAM policies (``deploy/aws``); ``heimdall aws bootstrap`` writes
  heimdall's key policy on it, and ``heimdall kms check`` reports a key still on the default;
* **the decryption floor** disables, in KMS itself, the key of every version below it (KMS then
  refuses it to anyone, not only to heimdall) and tags it ``disabled``; lowering the floor
  enables them again (cancelling a scheduled deletion first);
* **the encryption floor** tags the versions below it ``retired``;
* **deletion** (the runbook's last step) schedules the deletion of disabled versions' keys after
  a waiting period of 7-30 days, during which it can still be cancelled by lowering the floor.

CreateKey, CreateAlias and UpdateAlias are never retried (see :mod:`heimdall.kms.aws_client`):
after a failure the alias is read again to learn what happened.

**Regions** (``HMD_AWS_REGIONS``). A new version is a multi-Region key: made in the first region,
replicated to every other one (:mod:`heimdall.kms.aws_replicas`), and committed only then, by
its alias in the first region; its aliases in the others follow. So a rotation needs every
region: a version some region lacked would leave the fields written under it unreadable there,
exactly when a failover needs that region. It is never made in whichever region answers, which
would scatter the primaries. The floors and deletions are made in each region's own keys (KMS
keeps a key's state per region); a region that cannot be reached is named in the error after
the others were changed, and running the command again completes it.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Final

from heimdall.errors import (
    HeimdallError,
    KeyNotFound,
    KeyVersionDisabled,
    KmsError,
    KmsUnavailable,
    LifecycleError,
)
from heimdall.kms.aws_client import PROVIDER, AliasTaken, AwsClients, RegionClients, aws_call
from heimdall.kms.aws_regions import in_every_region
from heimdall.kms.aws_replicas import replicate
from heimdall.kms.aws_versions import (
    TAG_STATE,
    TAG_VERSION,
    KeyChain,
    VersionKey,
    describe_key,
    key_id_of,
    latest_alias,
    version_alias,
    version_tags,
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
_PENDING_DELETION: Final = frozenset({"PendingDeletion", "PendingReplicaDeletion"})
_log = logging.getLogger("heimdall.kms.aws")


def create_version_key(clients: AwsClients, name: str, version: int, policy: str | None) -> str:
    """A new KMS key for *version* of *name* in the first region, with automatic rotation on
    (for a multi-Region key, set on the primary only: its replicas share it); its key ID.
    *policy*: its key policy (None: AWS's default); the lockout safety check is never
    bypassed."""
    arguments: dict[str, Any] = {
        "Description": f"heimdall master key {name}, version {version}",
        "KeySpec": "SYMMETRIC_DEFAULT",
        "KeyUsage": "ENCRYPT_DECRYPT",
        "Origin": "AWS_KMS",
        "Tags": version_tags(name, version),
        "MultiRegion": bool(clients.replicas),
    }
    if policy is not None:
        arguments["Policy"] = policy
    try:
        answer = aws_call(
            f"create the KMS key of version {version} of {name}",
            lambda: clients.once.create_key(**arguments),
        )
    except KmsUnavailable as exc:
        failed = str(exc)
    else:
        failed = ""
    if failed:
        raise KmsUnavailable(
            f"{failed}; not retried, as a retry could create a second key (a key tagged "
            f"{TAG_VERSION}={version} may exist without its alias)",
            provider=PROVIDER,
        )
    key_id = str(answer["KeyMetadata"]["KeyId"])
    aws_call(
        f"turn on automatic rotation of KMS key {key_id}",
        lambda: clients.kms.enable_key_rotation(KeyId=key_id),
    )
    return key_id


def alias_target(region: RegionClients, alias: str) -> str | None:
    """The key ID *alias* points at in *region*; None if it does not exist (or cannot be read)."""
    try:
        return key_id_of(str(describe_key(region.kms, alias).get("KeyId") or ""))
    except KmsError:
        return None


def claim_version(region: RegionClients, name: str, version: int, key_id: str) -> bool:
    """Create *version*'s alias for *key_id* in *region*: True if it now names that key, False
    if another process made the version first."""
    alias = version_alias(name, version)
    try:
        aws_call(
            f"create the alias {alias} in {region.region}",
            lambda: region.once.create_alias(AliasName=alias, TargetKeyId=key_id),
        )
    except AliasTaken:
        return alias_target(region, alias) == key_id
    except KmsUnavailable:
        if alias_target(region, alias) == key_id:
            return True  # created; only the answer was lost
        raise
    return True


def point_latest(region: RegionClients, name: str, key_id: str, current: str | None) -> None:
    """Point ``alias/<name>`` at *key_id* in *region* (its current target: *current*)."""
    alias = latest_alias(name)
    action = f"point {alias} at KMS key {key_id}"
    if current is None:
        aws_call(action, lambda: region.once.create_alias(AliasName=alias, TargetKeyId=key_id))
    elif current != key_id:
        aws_call(action, lambda: region.once.update_alias(AliasName=alias, TargetKeyId=key_id))


def rotate(clients: AwsClients, chain: KeyChain) -> None:
    """Make the next version of *chain*'s key (see the module docstring)."""
    name, version = chain.name, chain.latest_version + 1
    key_id = _new_version_key(clients, chain)
    if not claim_version(clients.first, name, version, key_id):
        # Another process rotated first: its version stands, this key never wrapped anything.
        _discard(clients, key_id)
        return
    for region in clients.replicas:
        try:
            if not claim_version(region, name, version, key_id):
                _log.warning(
                    "%s in %s names another KMS key than in %s: run `heimdall aws bootstrap`",
                    version_alias(name, version),
                    region.region,
                    clients.region,
                )
        except KmsError as exc:
            # Committed in the first region, which answers while it is up; bootstrap makes
            # the alias here, and `heimdall kms check` reports it missing until then.
            _log.warning("%s; run `heimdall aws bootstrap` once it answers", exc)
    for index, region in enumerate(clients.regions):
        try:
            # The chain was read in the first region that answered: a replica names the same key.
            current = chain.latest_target
            if index > 0:
                current = alias_target(region, latest_alias(name))
            point_latest(region, name, key_id, current)
        except KmsError as exc:
            # The new version is committed and used by heimdall; only the alias AWS tools read
            # lags. `heimdall aws bootstrap` points it, `heimdall kms check` reports it.
            _log.warning("%s; run `heimdall aws bootstrap` to point it", exc)


def _new_version_key(clients: AwsClients, chain: KeyChain) -> str:
    """The next version's KMS key, with its replicas ready in every other region; AWS's
    default key policy on each (see the module docstring)."""
    name, version = chain.name, chain.latest_version + 1
    try:
        key_id = create_version_key(clients, name, version, None)
    except KmsUnavailable as exc:
        raise _every_region(clients, exc) from None
    try:
        replicate(clients, key_id, version_tags(name, version), None)
    except HeimdallError as exc:
        _discard(clients, key_id)
        if isinstance(exc, KmsUnavailable):
            raise _every_region(clients, exc) from None
        raise
    return key_id


def _every_region(clients: AwsClients, error: KmsUnavailable) -> KmsUnavailable:
    if not clients.replicas:
        return error
    regions = ", ".join(region.region for region in clients.regions)
    return KmsUnavailable(
        f"{error}; a new version is made in every region ({regions}), and none was committed",
        provider=PROVIDER,
    )


def _discard(clients: AwsClients, key_id: str) -> None:
    """Schedule the deletion of a key that never wrapped anything, its replicas first (KMS
    deletes a primary only after them)."""
    for region in reversed(clients.regions):
        try:
            _schedule(region.kms, key_id, ORPHAN_DELETION_DAYS, f"unused KMS key {key_id}")
        except KeyNotFound:
            pass  # never replicated here
        except KmsError as exc:
            _log.warning(
                "%s; KMS key %s in %s is unused: schedule its deletion", exc, key_id, region.region
            )


def _tag(kms: Any, key: VersionKey, state: KeyState) -> None:
    if key.marked is state:
        return
    tags = [{"TagKey": TAG_STATE, "TagValue": state.value}]
    aws_call(
        f"tag version {key.version}'s KMS key {state.value}",
        lambda: kms.tag_resource(KeyId=key.key_id, Tags=tags),
    )


def _check_floor(chain: KeyChain, version: int, which: str) -> None:
    if not 1 <= version <= chain.latest_version:
        raise LifecycleError(
            f"{which} must be between 1 and the latest version {chain.latest_version}"
        )


def set_min_decryption_version(clients: AwsClients, chain: KeyChain, floor: int) -> None:
    """Disable every version below *floor* in KMS, enable those at or above it that heimdall
    disabled, in every region. KMS's refusal is what matters, so it changes first and the tag
    second."""
    _check_floor(chain, floor, "min_decryption_version")
    encryption_floor = max(chain.min_encryption_version, floor)

    def change(region: RegionClients, here: KeyChain) -> None:
        kms = region.kms
        for version, key in sorted(here.versions.items()):
            if version < floor:
                if key.key_state == "Enabled":
                    aws_call(
                        f"disable version {version}'s KMS key {key.key_id}",
                        partial(kms.disable_key, KeyId=key.key_id),
                    )
                _tag(kms, key, KeyState.DISABLED)
            elif key.marked is KeyState.DISABLED:
                if key.key_state in _PENDING_DELETION:
                    _cancel_deletion(kms, key)
                aws_call(
                    f"enable version {version}'s KMS key {key.key_id}",
                    partial(kms.enable_key, KeyId=key.key_id),
                )
                state = KeyState.RETIRED if version < encryption_floor else KeyState.ACTIVE
                _tag(kms, key, state)

    in_every_region(clients, chain, f"set the decryption floor to {floor}", change)


def set_min_encryption_version(clients: AwsClients, chain: KeyChain, floor: int) -> None:
    """Tag the versions below *floor* retired, those at or above it active (disabled versions
    stay disabled), in every region."""
    _check_floor(chain, floor, "min_encryption_version")

    def change(region: RegionClients, here: KeyChain) -> None:
        for version, key in sorted(here.versions.items()):
            if key.marked is not KeyState.DISABLED:
                _tag(region.kms, key, KeyState.RETIRED if version < floor else KeyState.ACTIVE)

    in_every_region(clients, chain, f"set the encryption floor to {floor}", change)


def _cancel_deletion(kms: Any, key: VersionKey) -> None:
    try:
        aws_call(
            f"cancel the deletion of version {key.version}'s KMS key",
            lambda: kms.cancel_key_deletion(KeyId=key.key_id),
        )
    except KeyVersionDisabled:
        # KMSInvalidStateException: no deletion is pending (any more): what was wanted.
        if describe_key(kms, key.key_id).get("KeyState") in _PENDING_DELETION:
            raise


def _schedule(kms: Any, key_id: str, days: int, what: str) -> str:
    """Schedule *key_id*'s deletion; the deletion date (empty if it was scheduled already)."""
    try:
        answer = aws_call(
            f"schedule the deletion of {what}",
            lambda: kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=days),
        )
    except KeyVersionDisabled:
        # KMSInvalidStateException: scheduled already (a retry of a call that succeeded).
        if describe_key(kms, key_id).get("KeyState") not in _PENDING_DELETION:
            raise
        return ""
    date = answer.get("DeletionDate")
    return date.strftime("%Y-%m-%d") if hasattr(date, "strftime") else ""


def schedule_deletion(
    clients: AwsClients, chain: KeyChain, below: int, days: int
) -> list[tuple[int, str]]:
    """Schedule the deletion of the KMS key of every version below *below*, each of which must
    be disabled already, in every region (the replicas first: KMS deletes a primary only after
    them); (version, deletion date) of each scheduled now in the first region."""
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
    scheduled: list[tuple[int, str]] = []

    def change(region: RegionClients, here: KeyChain) -> None:
        done = [
            (key.version, _schedule(region.kms, key.key_id, days, f"version {key.version}'s key"))
            for version, key in sorted(here.versions.items())
            if version < below and key.key_state not in _PENDING_DELETION
        ]
        if region.region == clients.region:
            scheduled.extend(done)

    what = f"schedule the deletion of versions below {below}"
    in_every_region(clients, chain, what, change, replicas_first=True)
    return scheduled
