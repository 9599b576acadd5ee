"""Replicas of heimdall's multi-Region KMS keys, and what KMS keeps per region.

KMS shares a multi-Region key's ID, key material and automatic rotation between its primary and
its replicas, and nothing else: aliases, tags, the key policy and the key state (enabled,
disabled, pending deletion) are each region's own. heimdall finds its versions through aliases
and tags (:mod:`heimdall.kms.aws_versions`), so a replica gets the version's tags here, its key
policy from the bootstrap (a rotation's replicas start, as its new key does, on AWS's default
key policy), and its alias from the rotation (:mod:`heimdall.kms.aws_rotation`) or the bootstrap
(:mod:`heimdall.kms.aws_bootstrap_regions`).

AWS makes a replica asynchronously: it is ``Creating`` for a few seconds and cannot be used
meanwhile. :func:`replicate` waits until every replica is ready, so a version is never committed
while a region could not yet unwrap what it wraps.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any, Final

from heimdall.errors import ConfigurationError, KeyNotFound, KmsUnavailable
from heimdall.kms.aws_client import PROVIDER, AliasTaken, AwsClients, RegionClients, aws_call
from heimdall.kms.aws_versions import TAG_KEY, TAG_VERSION, describe_key, tags_of

__all__ = [
    "REPLICA_WAIT_SECONDS",
    "apply_key_policy",
    "await_replica",
    "ensure_tags",
    "key_policy_of",
    "primary_region",
    "replica_exists",
    "replicate",
    "replicate_to",
]

REPLICA_WAIT_SECONDS: Final = 120.0
_POLL_SECONDS: Final = 1.0
_CREATING: Final = "Creating"


def replicate(
    clients: AwsClients, key_id: str, tags: list[dict[str, str]], policy: str | None
) -> None:
    """Replicate the new multi-Region key *key_id*, made in the first region, to every other
    region, with *tags* and *policy* (None: AWS's default key policy; the lockout safety check
    is never bypassed); return once every replica can be used."""
    for target in clients.replicas:
        replicate_to(clients.first, target, key_id, tags, policy)
    for target in clients.replicas:
        await_replica(target, key_id)
        ensure_tags(target, key_id, tags)


def replicate_to(
    source: RegionClients,
    target: RegionClients,
    key_id: str,
    tags: list[dict[str, str]],
    policy: str | None,
) -> None:
    """ReplicateKey from *source*, the region of *key_id*'s primary, to *target*. The tags go
    with the request: the role policies allow creating keys with heimdall's tags only."""
    arguments: dict[str, Any] = {"KeyId": key_id, "ReplicaRegion": target.region, "Tags": tags}
    if policy is not None:
        arguments["Policy"] = policy
    # AlreadyExistsException (AliasTaken): made by an attempt whose answer was lost.
    with contextlib.suppress(AliasTaken):
        aws_call(
            f"replicate KMS key {key_id} to {target.region}",
            lambda: source.kms.replicate_key(**arguments),
        )


def await_replica(
    target: RegionClients,
    key_id: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Wait while *key_id*'s replica in *target* is still being created."""
    deadline = monotonic() + REPLICA_WAIT_SECONDS
    while describe_key(target.kms, key_id).get("KeyState") == _CREATING:
        if monotonic() >= deadline:
            raise KmsUnavailable(
                f"the replica of KMS key {key_id} in {target.region} was still being created "
                f"after {REPLICA_WAIT_SECONDS:.0f} s",
                provider=PROVIDER,
            )
        sleep(_POLL_SECONDS)


def ensure_tags(region: RegionClients, key_id: str, tags: list[dict[str, str]]) -> bool:
    """Add those of *tags* that *key_id* lacks in *region* (ReplicateKey sets them itself; a
    replica made otherwise may have none); True if it lacked any. A key tagged as another
    heimdall key or version is refused, and a state it carries is left as it is: the floors
    change it, not this."""
    current = tags_of(region.kms, key_id)
    for tag in tags:
        name, value = tag["TagKey"], tag["TagValue"]
        if name in (TAG_KEY, TAG_VERSION) and current.get(name, value) != value:
            raise ConfigurationError(
                f"KMS key {key_id} in {region.region} is tagged as another heimdall key or "
                "version; it is left as it is"
            )
    missing = [tag for tag in tags if tag["TagKey"] not in current]
    if missing:
        aws_call(
            f"tag KMS key {key_id} in {region.region}",
            lambda: region.kms.tag_resource(KeyId=key_id, Tags=missing),
        )
    return bool(missing)


def replica_exists(region: RegionClients, key_id: str) -> bool:
    try:
        describe_key(region.kms, key_id)
    except KeyNotFound:
        return False
    return True


def primary_region(clients: AwsClients, metadata: dict[str, Any]) -> RegionClients:
    """The clients of the region that holds the primary of the key *metadata* describes."""
    configuration = metadata.get("MultiRegionConfiguration") or {}
    region = (configuration.get("PrimaryKey") or {}).get("Region")
    for candidate in clients.regions:
        if candidate.region == region:
            return candidate
    raise ConfigurationError(
        f"the primary of KMS key {metadata.get('KeyId')} is in {region}, which is not among "
        "HMD_AWS_REGIONS: add it, or make the first region the key's primary"
    )


def apply_key_policy(region: RegionClients, key_id: str, policy: str, what: str) -> str:
    """Give *key_id* in *region* the key policy *policy* unless it has it; what was done."""
    current = key_policy_of(region, key_id, what)
    if _same_policy(current, policy):
        return f"key policy of {what} unchanged"
    aws_call(
        f"write the key policy of {what}",
        lambda: region.kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=policy),
    )
    return f"wrote the key policy of {what}"


def key_policy_of(region: RegionClients, key_id: str, what: str) -> str:
    """*key_id*'s key policy in *region*, as AWS keeps it (JSON text)."""
    answer = aws_call(
        f"read the key policy of {what}",
        lambda: region.kms.get_key_policy(KeyId=key_id, PolicyName="default"),
    )
    return str(answer["Policy"])


def _same_policy(current: str, wanted: str) -> bool:
    try:
        parsed: Any = json.loads(current)
    except ValueError:
        return False
    return bool(parsed == json.loads(wanted))
