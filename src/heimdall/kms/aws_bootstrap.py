"""Idempotent AWS KMS set-up for heimdall: the version keys, their aliases and key policy, the
automatic rotation of their material, the audit key.

spec: AWS KMS Policy Example, Key Identifiers and Versioning, Key Rotation Strategy. Run by an
operator whose credentials may manage KMS keys (``kms:*`` on them, and CreateKey), and whose IAM
policies allow ``kms:PutKeyPolicy`` (AWS refuses to create a key with a key policy otherwise:
the lockout safety check, never bypassed here; so never as heimdall-admin, who is denied it).
It may be run again at any time: every step first reads, then changes only what differs, and
reports what it found or did.

* Version 1: the KMS key ``HMD_AWS_KEY`` names (adopted), or a new symmetric key; tagged
  (:mod:`heimdall.kms.aws_versions`) and aliased ``alias/<name>-v1``.
* heimdall tags only the keys it creates and the one ``HMD_AWS_KEY`` names. Every key a version
  alias (or the audit key's alias) names must be heimdall's already
  (:mod:`heimdall.kms.aws_trust`: customer managed, of the right spec, key material made by
  KMS, in the expected account, tagged as that version); anything else is refused with the
  alias and key ID, and left as it is, never adopted.
* Every version's key gets the key policy (:mod:`heimdall.kms.aws_key_policy`): the account's
  IAM policies apply, and each role is granted exactly its key actions. With ``--*-role``
  options the roles given are the ones granted; without, the roles the keys' policies name
  already are kept. Every enabled key gets the automatic rotation of its material.
* ``alias/<name>`` points at the latest version.
* The audit key (:mod:`heimdall.kms.aws_audit`): ``HMAC_256``, ``GENERATE_VERIFY_MAC``, same
  key policy, alias ``alias/<name>-audit``.
* With several regions (``HMD_AWS_REGIONS``), the keys it creates are multi-Region keys, and
  each other region gets their replicas, tags, key policy and aliases
  (:mod:`heimdall.kms.aws_bootstrap_regions`). The bootstrap needs every region to answer.

No credential is read, returned or printed; AWS's errors are translated by
:func:`heimdall.kms.aws_client.aws_call`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from heimdall.errors import ConfigurationError, KeyNotFound
from heimdall.kms.aws_audit import AUDIT_KEY_SPEC, audit_alias, audit_key_name
from heimdall.kms.aws_bootstrap_regions import bootstrap_region
from heimdall.kms.aws_client import AwsClients, aws_call
from heimdall.kms.aws_config import AwsSettings
from heimdall.kms.aws_key_policy import ROLE_PLACEHOLDERS, key_policy, roles_in_policies
from heimdall.kms.aws_replicas import apply_key_policy, key_policy_of
from heimdall.kms.aws_rotation import claim_version, create_version_key, point_latest
from heimdall.kms.aws_trust import (
    AUDIT_KEY,
    VERSION_KEY,
    Ownership,
    UntrustedKey,
    caller_account,
    check_key,
    key_problem,
)
from heimdall.kms.aws_versions import (
    TAG_KEY,
    TAG_VERSION,
    describe_key,
    key_id_of,
    latest_alias,
    list_versions,
    tags_of,
    version_alias,
    version_tags,
)
from heimdall.rbac import Role

__all__ = ["ROLE_PLACEHOLDERS", "BootstrapReport", "bootstrap", "instructions", "key_policy"]

_LOCKED_OUT: Final = "(MalformedPolicyDocumentException)"


@dataclass(frozen=True, slots=True)
class BootstrapReport:
    """What :func:`bootstrap` found and did: one line per step, in order."""

    key_name: str
    account: str
    actions: tuple[str, ...]


def bootstrap(
    clients: AwsClients, settings: AwsSettings, roles: Mapping[Role, str]
) -> BootstrapReport:
    """Bring AWS to the wanted state (see the module docstring); idempotent. *roles*: the IAM
    role ARN of each role the key policy grants; empty: the roles it grants already."""
    account = caller_account(clients.sts)
    if settings.account and settings.account != account:
        raise ConfigurationError(
            f"heimdall's keys are to be in account {settings.account} (HMD_AWS_ACCOUNT_ID, "
            f"HMD_AWS_KEY or HMD_AWS_ROLE_ARN), but the credentials are in {account}"
        )
    regions = tuple(r for r in settings.regions if r) if settings.replica_regions else ()
    ownership = Ownership(account, settings.key_origins, regions)
    name = settings.key_name
    actions: list[str] = []
    versions, latest_target = list_versions(clients.kms, name)
    adoptable = _check_versions(clients, settings, ownership, versions)
    audit_id = _audit_key_id(clients, name, ownership)
    if not roles:
        keys = [*versions.values(), *([audit_id] if audit_id else [])]
        roles = _granted_roles(clients, keys, actions)
    policy = key_policy(account, roles)
    if not versions:
        versions = {1: _first_version(clients, settings, ownership, policy, actions)}
    else:
        listed = ", ".join(version_alias(name, v) for v in sorted(versions))
        actions.append(f"found {len(versions)} version(s): {listed}")
    for version, key_id in sorted(versions.items()):
        if version == 1 and adoptable:
            _tag_adopted(clients, name, key_id)
            actions.append(f"tagged version 1's KMS key {key_id} (HMD_AWS_KEY)")
        actions += _version_key(clients, version, key_id, policy)
    latest = max(versions)
    point_latest(clients.first, name, versions[latest], latest_target)
    pointer = latest_alias(name)
    if latest_target == versions[latest]:
        actions.append(f"{pointer} points at version {latest}")
    else:
        actions.append(f"pointed {pointer} at version {latest}")
    actions += _audit_key(clients, name, audit_id, policy)
    for region in clients.replicas:
        actions += bootstrap_region(clients, region, name, versions, policy)
    return BootstrapReport(key_name=name, account=account, actions=tuple(actions))


def _granted_roles(clients: AwsClients, keys: list[str], actions: list[str]) -> dict[Role, str]:
    """The roles the key policies of *keys* grant: what a run without role options keeps."""
    roles = roles_in_policies(key_policy_of(clients.first, key, f"KMS key {key}") for key in keys)
    if roles:
        granted = ", ".join(sorted(role.value for role in roles))
        actions.append(f"kept the roles the key policies grant: {granted}")
    return roles


def _adopt_fix(name: str, version: int) -> str:
    fix = (
        f"heimdall tags only the keys it creates and the one HMD_AWS_KEY names; point "
        f"{version_alias(name, version)} at heimdall's key for version {version}, or delete it"
    )
    if version == 1:
        fix += ", or set HMD_AWS_KEY to the key to adopt it"
    return fix


def _check_versions(
    clients: AwsClients, settings: AwsSettings, ownership: Ownership, versions: Mapping[int, str]
) -> bool:
    """Refuse any version alias naming a key that is not heimdall's; True if version 1's is
    the key HMD_AWS_KEY names, untagged yet (the bootstrap then tags it)."""
    adopted = settings.adopt_key
    if adopted and versions.get(1) not in (None, key_id_of(adopted)):
        raise ConfigurationError(
            f"HMD_AWS_KEY names KMS key {adopted}, but version 1 of {settings.key_name} is "
            f"{versions[1]}"
        )
    name = settings.key_name
    adoptable = False
    for version, key_id in sorted(versions.items()):
        metadata = describe_key(clients.kms, key_id)
        tags = tags_of(clients.kms, key_id)
        if version == 1 and adopted and not any(k.startswith("heimdall:") for k in tags):
            _check_adoptable(metadata, ownership, version_alias(name, 1), _adopt_fix(name, 1))
            adoptable = True
            continue
        wanted = {TAG_KEY: name, TAG_VERSION: str(version)}
        check_key(
            metadata,
            tags,
            ownership,
            VERSION_KEY,
            wanted,
            what=version_alias(name, version),
            fix=_adopt_fix(name, version),
        )
    return adoptable


def _check_adoptable(metadata: dict[str, Any], ownership: Ownership, what: str, fix: str) -> None:
    problem = key_problem(metadata, ownership, VERSION_KEY)
    if not problem and metadata.get("KeyState") != "Enabled":
        problem = f"is {metadata.get('KeyState')}, not enabled"
    if problem:
        key_id = metadata.get("KeyId")
        raise UntrustedKey(f"{what} points at KMS key {key_id}, which {problem}: {fix}")


def _first_version(
    clients: AwsClients,
    settings: AwsSettings,
    ownership: Ownership,
    policy: str,
    actions: list[str],
) -> str:
    name = settings.key_name
    if settings.adopt_key:
        key_id = _adopt(clients, name, settings.adopt_key, ownership)
        actions.append(f"adopted KMS key {key_id} as version 1")
    else:
        key_id = _created(lambda: create_version_key(clients, name, 1, policy))
        kind = "symmetric, multi-Region" if clients.replicas else "symmetric"
        actions.append(f"created KMS key {key_id} for version 1 ({kind}, automatic rotation)")
    if not claim_version(clients.first, name, 1, key_id):
        raise ConfigurationError(
            f"{version_alias(name, 1)} was created by someone else meanwhile; run the bootstrap "
            "again"
        )
    actions.append(f"created {version_alias(name, 1)}")
    return key_id


def _created(create: Callable[[], str]) -> str:
    """*create*'s key ID; AWS's refusal of the key policy explained."""
    try:
        return create()
    except ConfigurationError as exc:
        refused = str(exc)
    if _LOCKED_OUT not in refused:
        raise ConfigurationError(refused)
    raise ConfigurationError(
        f"{refused}: AWS creates a key with a key policy only if the policy lets the creating "
        "credentials call kms:PutKeyPolicy later (heimdall's does so through their IAM "
        "policies), and only if every role ARN given exists"
    )


def _adopt(clients: AwsClients, name: str, key: str, ownership: Ownership) -> str:
    """Tag the key HMD_AWS_KEY names as version 1, once checked to be one heimdall may use."""
    metadata = describe_key(clients.kms, key)
    key_id = str(metadata["KeyId"])
    _check_adoptable(metadata, ownership, "HMD_AWS_KEY", "name a key heimdall may use")
    tags = tags_of(clients.kms, key_id)
    if any(k.startswith("heimdall:") for k in tags):
        check_key(
            metadata,
            tags,
            ownership,
            VERSION_KEY,
            {TAG_KEY: name, TAG_VERSION: "1"},
            what="HMD_AWS_KEY",
            fix="it is tagged as another heimdall key or version, and is left as it is",
        )
        return key_id
    _tag_adopted(clients, name, key_id)
    return key_id


def _tag_adopted(clients: AwsClients, name: str, key_id: str) -> None:
    aws_call(
        f"tag KMS key {key_id} as version 1 of {name}",
        lambda: clients.kms.tag_resource(KeyId=key_id, Tags=version_tags(name, 1)),
    )


def _version_key(clients: AwsClients, version: int, key_id: str, policy: str) -> list[str]:
    what = f"version {version}"
    metadata = describe_key(clients.kms, key_id)
    actions = [apply_key_policy(clients.first, key_id, policy, what)]
    if metadata.get("KeyState") != "Enabled":
        actions.append(f"{what} is {metadata.get('KeyState')}: left as it is")
        return actions
    status = aws_call(
        f"read the rotation status of {what}'s KMS key",
        lambda: clients.kms.get_key_rotation_status(KeyId=key_id),
    )
    if status.get("KeyRotationEnabled") is True:
        actions.append(f"automatic rotation of {what}'s key material is on")
    else:
        aws_call(
            f"turn on automatic rotation of {what}'s KMS key",
            lambda: clients.kms.enable_key_rotation(KeyId=key_id),
        )
        actions.append(f"turned on automatic rotation of {what}'s key material")
    return actions


def _audit_key_id(clients: AwsClients, name: str, ownership: Ownership) -> str | None:
    """The audit key's ID, checked to be heimdall's audit key; None if there is none yet."""
    alias = audit_alias(name)
    try:
        metadata = describe_key(clients.kms, alias)
    except KeyNotFound:
        return None
    key_id = str(metadata["KeyId"])
    check_key(
        metadata,
        tags_of(clients.kms, key_id),
        ownership,
        AUDIT_KEY,
        {TAG_KEY: audit_key_name(name)},
        what=alias,
        fix=(
            "heimdall uses only the audit key it created; point the alias back at it, or delete "
            "the alias to have a new audit key created"
        ),
    )
    return key_id


def _audit_key(clients: AwsClients, name: str, key_id: str | None, policy: str) -> list[str]:
    alias = audit_alias(name)
    if key_id is not None:
        return [
            f"audit key {alias} exists",
            apply_key_policy(clients.first, key_id, policy, "the audit key"),
        ]
    arguments = {
        "Description": f"heimdall audit checkpoints of {name}",
        "KeySpec": AUDIT_KEY_SPEC,
        "KeyUsage": "GENERATE_VERIFY_MAC",
        "Origin": "AWS_KMS",
        "Policy": policy,
        "Tags": [{"TagKey": TAG_KEY, "TagValue": audit_key_name(name)}],
        "MultiRegion": bool(clients.replicas),
    }

    def create() -> str:
        answer = aws_call(
            f"create the audit key {alias}", lambda: clients.once.create_key(**arguments)
        )
        return str(answer["KeyMetadata"]["KeyId"])

    created = _created(create)
    aws_call(
        f"create the alias {alias}",
        lambda: clients.once.create_alias(AliasName=alias, TargetKeyId=created),
    )
    return [f"created audit key {created} ({AUDIT_KEY_SPEC}) as {alias}"]


def instructions(report: BootstrapReport, settings: AwsSettings) -> list[str]:
    """What to do next: the IAM policy of each role, and the settings. Names no credential."""
    name = report.key_name
    renamed = "" if name == "heimdall-pii" else f" and heimdall-pii with {name}"
    lines = [
        f"# heimdall's KMS keys for {name} in account {report.account}. Attach to each role's",
        "# IAM role its policy in deploy/aws/<role>.json (written for the key heimdall-pii:",
        f"# replace ${{ACCOUNT_ID}} with {report.account}{renamed}), then run heimdall there with:",
        "HMD_KMS_PROVIDER=aws",
        f"HMD_KMS_KEY_NAME={name}",
    ]
    if settings.replica_regions:
        lines.append(f"HMD_AWS_REGIONS={','.join(map(str, settings.regions))}")
    elif settings.region:
        lines.append(f"HMD_AWS_REGION={settings.region}")
    lines.append(f"HMD_AWS_ACCOUNT_ID={report.account}")
    lines += [
        "# and its role (with HMD_ENV=production: role = ... in the config file instead):",
        *(f"#   HMD_ROLE={role.value}" for role in Role),
        "# Credentials come from the SDK's default chain (instance profile, ECS/EKS role, SSO);",
        "# HMD_AWS_ROLE_ARN assumes a role in the key's account from another one.",
    ]
    return lines
