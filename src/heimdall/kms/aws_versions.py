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
  checked on every load (an alias pointed at any other key is refused), and ``heimdall:state``,
  ``active``, ``retired`` or ``disabled``: heimdall's floors, the same for every process.

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
from heimdall.kms.aws_client import PROVIDER, aws_errors
from heimdall.kms.aws_config import key_id_of
from heimdall.kms.base import KeyDescription, KeyState, KeyVersionInfo

__all__ = [
    "TAG_KEY",
    "TAG_STATE",
    "TAG_VERSION",
    "KeyChain",
    "VersionKey",
    "describe_key",
    "is_encryption_key",
    "key_id_of",
    "latest_alias",
    "list_versions",
    "load_chain",
    "tags_of",
    "version_alias",
    "version_tags",
]

TAG_KEY: Final = "heimdall:key"
TAG_VERSION: Final = "heimdall:version"
TAG_STATE: Final = "heimdall:state"
ENABLED: Final = "Enabled"
SYMMETRIC: Final = "SYMMETRIC_DEFAULT"


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
    """Every version of one key, and where ``alias/<name>`` points."""

    name: str
    versions: Mapping[int, VersionKey]
    latest_target: str | None

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


def list_versions(kms: Any, name: str) -> tuple[dict[int, str], str | None]:
    """The key ID of every version alias of *name*, and the target of ``alias/<name>``."""
    pattern = re.compile(rf"alias/{re.escape(name)}-v([1-9][0-9]{{0,8}})\Z")
    versions: dict[int, str] = {}
    latest: str | None = None
    with aws_errors(f"list the aliases of {latest_alias(name)}"):
        for page in kms.get_paginator("list_aliases").paginate():
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
    with aws_errors(f"read the tags of KMS key {key_id}"):
        pages = kms.get_paginator("list_resource_tags").paginate(KeyId=key_id)
        return {t["TagKey"]: t["TagValue"] for page in pages for t in page.get("Tags", [])}


def describe_key(kms: Any, key_id: str, key_identifier: str = "") -> dict[str, Any]:
    with aws_errors(f"describe KMS key {key_id}", key_identifier=key_identifier):
        metadata: dict[str, Any] = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    return metadata


def is_encryption_key(metadata: dict[str, Any]) -> bool:
    """Whether DescribeKey's *metadata* is of a symmetric encryption key (KeyUsage defaults to
    ENCRYPT_DECRYPT, and an emulator may leave the default out)."""
    usage = metadata.get("KeyUsage") or "ENCRYPT_DECRYPT"
    return metadata.get("KeySpec", SYMMETRIC) == SYMMETRIC and usage == "ENCRYPT_DECRYPT"


def _stamp(value: object) -> str:
    if not isinstance(value, datetime):
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _version_key(kms: Any, name: str, version: int, key_id: str) -> VersionKey | None:
    """*version*'s key, checked to be what heimdall made; None if it was deleted meanwhile."""
    try:
        metadata = describe_key(kms, key_id)
        tags = tags_of(kms, key_id)
    except KeyNotFound:
        return None
    alias = version_alias(name, version)
    if not is_encryption_key(metadata):
        raise ConfigurationError(
            f"{alias} points at KMS key {key_id}, which is not a symmetric encryption key"
        )
    if tags.get(TAG_KEY) != name or tags.get(TAG_VERSION) != str(version):
        raise ConfigurationError(
            f"{alias} points at KMS key {key_id}, which is not tagged {TAG_KEY}={name}, "
            f"{TAG_VERSION}={version}: heimdall uses only the keys it made or adopted (run "
            "`heimdall aws bootstrap`, or point the alias back at version "
            f"{version}'s key)"
        )
    try:
        marked = KeyState(tags.get(TAG_STATE, KeyState.ACTIVE.value))
    except ValueError:
        raise ConfigurationError(
            f"KMS key {key_id} ({alias}) has a {TAG_STATE} tag heimdall does not know"
        ) from None
    return VersionKey(
        version=version,
        key_id=str(metadata.get("KeyId") or key_id),
        key_state=str(metadata.get("KeyState") or ""),
        marked=marked,
        created_at=_stamp(metadata.get("CreationDate")),
    )


def load_chain(kms: Any, name: str) -> KeyChain:
    """Every version of the key *name*, read from AWS: one ListAliases, then one DescribeKey
    and one ListResourceTags per version."""
    aliases, latest = list_versions(kms, name)
    versions: dict[int, VersionKey] = {}
    for version, key_id in sorted(aliases.items()):
        key = _version_key(kms, name, version, key_id)
        if key is not None:
            versions[version] = key
    return KeyChain(name=name, versions=versions, latest_target=latest)
