"""Heimdall's key versions on AWS KMS, read from AWS alone.

spec: Key Identifiers and Versioning ("AWS KMS: use key aliases (alias/heimdall-pii)") and Key
Rotation Strategy. AWS rotates a KMS key's backing material under the same key ID and can never
disable the old material on its own, so a heimdall key version is a KMS key of its own. For the
key named N:

* ``alias/N-v1``, ``alias/N-v2``, ...: one per version. A rotation is committed when the next
  version's alias is created, which AWS does at most once, so every process agrees on the
  versions, and two concurrent rotations make one version;
* ``alias/N``: the latest version, kept for AWS tooling and the spec's naming. heimdall itself
  always names a version's key, never this alias;
* tags on each version's KMS key: ``heimdall:key`` = N and ``heimdall:version`` = the version,
  and ``heimdall:state``, ``active``, ``retired`` or ``disabled``: heimdall's floors, the same
  for every process.

Every version's key is checked on every load to be heimdall's (:mod:`heimdall.kms.aws_trust`:
customer managed, symmetric, key material made by KMS, in the expected account, tagged as the
version): an alias pointed at any other key refuses the whole chain with
:class:`~heimdall.kms.aws_trust.UntrustedKey`, before any data key is wrapped or unwrapped.

A version is *disabled* when heimdall disabled it (its tag) or when KMS will not use its key
(disabled, pending deletion); *retired* when tagged so; *active* otherwise.
``min_decryption_version`` is one above the highest version heimdall disabled, and never below
the lowest version that still exists (a deleted key's aliases go with it);
``min_encryption_version`` is one above the highest retired or disabled version, never below
``min_decryption_version``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from heimdall.errors import ConfigurationError, KeyNotFound
from heimdall.kms.aws_client import PROVIDER, aws_call
from heimdall.kms.aws_config import key_id_of
from heimdall.kms.aws_trust import VERSION_KEY, Ownership, check_key
from heimdall.kms.base import KeyDescription, KeyState, KeyVersionInfo

__all__ = [
    "TAG_KEY",
    "TAG_STATE",
    "TAG_VERSION",
    "KeyChain",
    "VersionKey",
    "describe_key",
    "key_id_of",
    "latest_alias",
    "list_versions",
    "load_chain",
    "tags_of",
    "version_alias",
    "version_fix",
    "version_tags",
]

TAG_KEY: Final = "heimdall:key"
TAG_VERSION: Final = "heimdall:version"
TAG_STATE: Final = "heimdall:state"
ENABLED: Final = "Enabled"


def version_tags(
    name: str, version: int, state: KeyState = KeyState.ACTIVE
) -> list[dict[str, str]]:
    """The tags of *version*'s KMS key, in every region it is in."""
    return [
        {"TagKey": TAG_KEY, "TagValue": name},
        {"TagKey": TAG_VERSION, "TagValue": str(version)},
        {"TagKey": TAG_STATE, "TagValue": state.value},
    ]


def version_alias(name: str, version: int) -> str:
    return f"alias/{name}-v{version}"


def latest_alias(name: str) -> str:
    return f"alias/{name}"


@dataclass(frozen=True, slots=True)
class VersionKey:
    """One version's KMS key, as AWS describes it."""

    version: int
    key_id: str
    key_state: str  # KMS's: Enabled, Disabled, PendingDeletion, ...
    marked: KeyState  # heimdall's, from the heimdall:state tag
    created_at: str

    @property
    def state(self) -> KeyState:
        if self.key_state != ENABLED:
            return KeyState.DISABLED
        return self.marked


@dataclass(frozen=True, slots=True)
class KeyChain:
    """Every version of one key, and where ``alias/<name>`` points; *ownership*: what each
    version's key was checked against (and is again, when read in another region)."""

    name: str
    versions: Mapping[int, VersionKey]
    latest_target: str | None
    ownership: Ownership

    @property
    def latest_version(self) -> int:
        return max(self.versions, default=0)

    @property
    def min_decryption_version(self) -> int:
        disabled = [v for v, key in self.versions.items() if key.marked is KeyState.DISABLED]
        return max(max(disabled, default=0) + 1, min(self.versions, default=1))

    @property
    def min_encryption_version(self) -> int:
        below = [v for v, key in self.versions.items() if key.marked is not KeyState.ACTIVE]
        return max(max(below, default=0) + 1, self.min_decryption_version)

    def aliases(self) -> dict[int, str]:
        return {version: key.key_id for version, key in self.versions.items()}

    def describe(self, key_name: str) -> KeyDescription:
        """Every version up to the latest; those whose KMS key is gone are reported disabled."""
        floor = self.min_decryption_version
        infos = []
        for version in range(1, self.latest_version + 1):
            key = self.versions.get(version)
            if key is None:
                infos.append(KeyVersionInfo(version, KeyState.DISABLED, ""))
                continue
            state = KeyState.DISABLED if version < floor else key.state
            if state is KeyState.ACTIVE and version < self.min_encryption_version:
                state = KeyState.RETIRED
            infos.append(KeyVersionInfo(version, state, key.created_at))
        return KeyDescription(
            provider=PROVIDER,
            key_name=key_name,
            latest_version=self.latest_version,
            min_decryption_version=floor,
            min_encryption_version=self.min_encryption_version,
            versions=tuple(infos),
        )


def version_fix(name: str, version: int) -> str:
    """What to do about a version alias naming a key that is not heimdall's."""
    return (
        f"point {version_alias(name, version)} back at version {version}'s key, or delete it; "
        "heimdall uses only the keys it made or adopted"
    )


def list_versions(kms: Any, name: str) -> tuple[dict[int, str], str | None]:
    """The key ID of every version alias of *name*, and the target of ``alias/<name>``."""
    pattern = re.compile(rf"alias/{re.escape(name)}-v([1-9][0-9]{{0,8}})\Z")
    versions: dict[int, str] = {}
    latest: str | None = None
    pages = aws_call(
        f"list the aliases of {latest_alias(name)}",
        lambda: list(kms.get_paginator("list_aliases").paginate()),
    )
    for page in pages:
        for alias in page.get("Aliases", []):
            alias_name, target = alias.get("AliasName", ""), alias.get("TargetKeyId")
            if not target:
                continue
            if alias_name == latest_alias(name):
                latest = target
            elif (match := pattern.match(alias_name)) is not None:
                versions[int(match.group(1))] = target
    return versions, latest


def tags_of(kms: Any, key_id: str) -> dict[str, str]:
    pages = aws_call(
        f"read the tags of KMS key {key_id}",
        lambda: list(kms.get_paginator("list_resource_tags").paginate(KeyId=key_id)),
    )
    return {t["TagKey"]: t["TagValue"] for page in pages for t in page.get("Tags", [])}


def describe_key(kms: Any, key_id: str, key_identifier: str = "") -> dict[str, Any]:
    answer = aws_call(
        f"describe KMS key {key_id}",
        lambda: kms.describe_key(KeyId=key_id),
        key_identifier=key_identifier,
    )
    metadata: dict[str, Any] = answer["KeyMetadata"]
    return metadata


def _stamp(value: object) -> str:
    if not isinstance(value, datetime):
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _version_key(
    kms: Any, name: str, version: int, key_id: str, ownership: Ownership
) -> VersionKey | None:
    """*version*'s key, checked to be heimdall's; None if it was deleted meanwhile."""
    try:
        metadata = describe_key(kms, key_id)
        tags = tags_of(kms, key_id)
    except KeyNotFound:
        return None
    alias = version_alias(name, version)
    check_key(
        metadata,
        tags,
        ownership,
        VERSION_KEY,
        {TAG_KEY: name, TAG_VERSION: str(version)},
        what=alias,
        fix=version_fix(name, version),
    )
    try:
        marked = KeyState(tags.get(TAG_STATE, KeyState.ACTIVE.value))
    except ValueError:
        marked = None
    if marked is None:
        raise ConfigurationError(
            f"KMS key {key_id} ({alias}) has a {TAG_STATE} tag heimdall does not know"
        )
    return VersionKey(
        version=version,
        key_id=str(metadata.get("KeyId") or key_id),
        key_state=str(metadata.get("KeyState") or ""),
        marked=marked,
        created_at=_stamp(metadata.get("CreationDate")),
    )


def load_chain(kms: Any, name: str, ownership: Ownership) -> KeyChain:
    """Every version of the key *name*, read from AWS (one ListAliases, then one DescribeKey
    and one ListResourceTags per version), each checked against *ownership*."""
    aliases, latest = list_versions(kms, name)
    versions: dict[int, VersionKey] = {}
    for version, key_id in sorted(aliases.items()):
        key = _version_key(kms, name, version, key_id, ownership)
        if key is not None:
            versions[version] = key
    return KeyChain(name=name, versions=versions, latest_target=latest, ownership=ownership)
