"""``heimdall aws bootstrap`` in each region after the first (``HMD_AWS_REGIONS``).

What the bootstrap made in the first region (:mod:`heimdall.kms.aws_bootstrap`), each other
region gets, read first and changed only where it differs:

* every version's replica (ReplicateKey from its primary's region), tagged as the version, with
  the key policy, and the version's alias ``alias/<name>-v<N>``, naming the same key ID as in the
  first region;
* ``alias/<name>`` at the latest version;
* the audit key's replica, tag, key policy and alias.

A version whose KMS key is single-Region (made before the regions were set, or adopted as one)
cannot be replicated: it is reported, and its fields read in the first region only until
``heimdall keys rotate`` and ``heimdall reencrypt`` move them onto a multi-Region version. The
state of each version (enabled or disabled, its ``heimdall:state`` tag) is left to the floors,
which set it in every region; a replica made here starts with the first region's tag.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from heimdall.errors import ConfigurationError, KeyNotFound
from heimdall.kms.aws_audit import audit_alias, audit_key_name
from heimdall.kms.aws_client import AwsClients, RegionClients, aws_call
from heimdall.kms.aws_replicas import (
    apply_key_policy,
    await_replica,
    ensure_tags,
    primary_region,
    replica_exists,
    replicate_to,
)
from heimdall.kms.aws_rotation import claim_version, point_latest
from heimdall.kms.aws_versions import (
    TAG_KEY,
    TAG_STATE,
    describe_key,
    key_id_of,
    list_versions,
    tags_of,
    version_alias,
    version_tags,
)
from heimdall.kms.base import KeyState

__all__ = ["bootstrap_region"]


def bootstrap_region(
    clients: AwsClients,
    target: RegionClients,
    name: str,
    versions: Mapping[int, str],
    policy: str,
) -> list[str]:
    """Bring *target* to the first region's versions *versions* (version: key ID) and audit
    key; what was found and done, one line each, naming the region."""
    return _RegionBootstrap(clients, target, name, policy).run(versions)


class _RegionBootstrap:
    def __init__(self, clients: AwsClients, target: RegionClients, name: str, policy: str) -> None:
        self.clients, self.target, self.name, self.policy = clients, target, name, policy
        self.first = clients.region

    def run(self, versions: Mapping[int, str]) -> list[str]:
        target, name = self.target, self.name
        actions: list[str] = []
        present = []
        for version, key_id in sorted(versions.items()):
            lines = self._version_replica(version, key_id)
            if lines is None:
                actions.append(
                    f"version {version}'s KMS key is single-Region: its fields read in "
                    f"{self.first} only"
                )
                continue
            actions += lines
            present.append(version)
        # Read after the replicas exist: an alias made with a key may come with its replica.
        aliases, latest_target = list_versions(target.kms, name)
        for version in present:
            actions += self._version_alias(version, versions[version], aliases.get(version))
        latest = max(versions)
        if latest in present:
            point_latest(target, name, versions[latest], latest_target)
            pointed = "points" if latest_target == versions[latest] else "pointed"
            actions.append(f"alias/{name} {pointed} at version {latest}")
        actions += self._audit_key()
        return [f"{target.region}: {line}" for line in actions]

    def _version_replica(self, version: int, key_id: str) -> list[str] | None:
        """*version*'s replica in the region, tagged and with the key policy; None for a
        single-Region key."""
        target, what = self.target, f"version {version}"
        metadata = describe_key(self.clients.kms, key_id)
        if not metadata.get("MultiRegion"):
            return None
        state = tags_of(self.clients.kms, key_id).get(TAG_STATE, KeyState.ACTIVE.value)
        actions = self._replica(metadata, version_tags(self.name, version, KeyState(state)), what)
        actions.append(apply_key_policy(target, key_id, self.policy, f"{what} in {target.region}"))
        return actions

    def _version_alias(self, version: int, key_id: str, aliased: str | None) -> list[str]:
        target, alias = self.target, version_alias(self.name, version)
        if aliased is None:
            if not claim_version(target, self.name, version, key_id):
                raise ConfigurationError(
                    f"{alias} was created in {target.region} by someone else meanwhile; run "
                    "the bootstrap again"
                )
            return [f"created {alias}"]
        if aliased != key_id:
            raise ConfigurationError(
                f"{alias} in {target.region} points at KMS key {aliased}, but in {self.first} "
                f"at {key_id}: point it at {key_id}"
            )
        return []

    def _replica(
        self, metadata: dict[str, Any], tags: list[dict[str, str]], what: str
    ) -> list[str]:
        """The replica of the key *metadata* describes, made if missing, with *tags*."""
        target, key_id = self.target, str(metadata["KeyId"])
        actions = []
        if not replica_exists(target, key_id):
            source = primary_region(self.clients, metadata)
            replicate_to(source, target, key_id, tags, self.policy)
            await_replica(target, key_id)
            actions.append(f"replicated {what}'s KMS key {key_id}")
        if ensure_tags(target, key_id, tags):
            actions.append(f"tagged {what}'s replica")
        return actions

    def _audit_key(self) -> list[str]:
        target, alias = self.target, audit_alias(self.name)
        metadata = describe_key(self.clients.kms, alias)
        key_id = str(metadata["KeyId"])
        if not metadata.get("MultiRegion"):
            return [
                "the audit key is single-Region: checkpoints are signed and verified in "
                f"{self.first} only"
            ]
        tags = [{"TagKey": TAG_KEY, "TagValue": audit_key_name(self.name)}]
        actions = self._replica(metadata, tags, "the audit key")
        where = f"the audit key in {target.region}"
        actions.append(apply_key_policy(target, key_id, self.policy, where))
        try:
            aliased = key_id_of(str(describe_key(target.kms, alias).get("KeyId") or ""))
        except KeyNotFound:
            aliased = ""
        if not aliased:
            aws_call(
                f"create the alias {alias} in {target.region}",
                lambda: target.once.create_alias(AliasName=alias, TargetKeyId=key_id),
            )
            actions.append(f"created {alias}")
            return actions
        if aliased != key_id:
            raise ConfigurationError(
                f"{alias} in {target.region} points at KMS key {aliased}, not at the audit key "
                f"{key_id}: point it there"
            )
        return actions
