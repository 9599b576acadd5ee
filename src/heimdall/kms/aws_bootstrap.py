"""Idempotent AWS KMS set-up for heimdall: the version keys, their aliases and key policy, the
automatic rotation of their material, the audit key.

spec: AWS KMS Policy Example, Key Identifiers and Versioning, Key Rotation Strategy. Run by an
operator whose credentials may manage KMS keys (``kms:*`` on them, and CreateKey); it may be run
again at any time: every step first reads, then changes only what differs, and reports what it
found or did.

* Version 1: the KMS key ``HMD_AWS_KEY`` names (adopted), or a new symmetric key; tagged
  (:mod:`heimdall.kms.aws_versions`) and aliased ``alias/<name>-v1``. A key of another spec or
  usage, or tagged as another key's, is refused, never adopted.
* Every version's key gets the key policy (``aws_policies/key-policy.json``, the spec's example:
  the account's IAM policies apply, and each role given is granted exactly its key actions of
  :mod:`heimdall.kms.aws_access`); every enabled one the automatic rotation of its material.
* ``alias/<name>`` points at the latest version.
* The audit key (:mod:`heimdall.kms.aws_audit`): ``HMAC_256``, ``GENERATE_VERIFY_MAC``, same
  key policy, alias ``alias/<name>-audit``.
* With several regions (``HMD_AWS_REGIONS``), the keys it creates are multi-Region keys, and
  each other region gets their replicas, tags, key policy and aliases
  (:mod:`heimdall.kms.aws_bootstrap_regions`). The bootstrap needs every region to answer.

No credential is read, returned or printed; AWS's errors are translated by
:func:`heimdall.kms.aws_client.aws_errors`.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from heimdall.errors import ConfigurationError, KeyNotFound
from heimdall.kms.aws_audit import AUDIT_KEY_SPEC, audit_alias, audit_key_name
from heimdall.kms.aws_bootstrap_regions import bootstrap_region
from heimdall.kms.aws_client import AwsClients, aws_errors
from heimdall.kms.aws_config import AwsSettings
from heimdall.kms.aws_replicas import apply_key_policy
from heimdall.kms.aws_rotation import claim_version, create_version_key, point_latest
from heimdall.kms.aws_versions import (
    TAG_KEY,
    TAG_VERSION,
    describe_key,
    is_encryption_key,
    key_id_of,
    latest_alias,
    list_versions,
    tags_of,
    version_alias,
    version_tags,
)
from heimdall.rbac import Role

__all__ = ["ROLE_PLACEHOLDERS", "BootstrapReport", "bootstrap", "instructions", "key_policy"]

ROLE_PLACEHOLDERS: Final[Mapping[Role, str]] = {
    Role.APP: "${HEIMDALL_APP_ROLE_ARN}",
    Role.WORKER: "${HEIMDALL_WORKER_ROLE_ARN}",
    Role.ADMIN: "${HEIMDALL_ADMIN_ROLE_ARN}",
    Role.AUDIT: "${HEIMDALL_AUDIT_ROLE_ARN}",
}
_ACCOUNT: Final = "${ACCOUNT_ID}"
_ROLE_ARN: Final = re.compile(r"arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}\Z")


@dataclass(frozen=True, slots=True)
class BootstrapReport:
    """What :func:`bootstrap` found and did: one line per step, in order."""

    key_name: str
    account: str
    actions: tuple[str, ...]


def key_policy(account: str, roles: Mapping[Role, str]) -> str:
    """The key policy for *account*, with a statement for each role in *roles* (its IAM role
    ARN); the roles not given get none."""
    if not re.fullmatch(r"[0-9]{12}", account):
        raise ConfigurationError("an AWS account ID is 12 digits")
    for role, arn in roles.items():
        if not _ROLE_ARN.match(arn):
            raise ConfigurationError(f"the IAM role of {role} must be a role ARN")
    text = importlib.resources.files("heimdall.kms").joinpath("aws_policies", "key-policy.json")
    template = json.loads(text.read_text(encoding="utf-8"))
    placeholders = {placeholder: role for role, placeholder in ROLE_PLACEHOLDERS.items()}
    statements = []
    for statement in template["Statement"]:
        principal = statement["Principal"]["AWS"]
        granted = placeholders.get(principal)
        if granted is not None:
            if granted not in roles:
                continue
            principal = roles[granted]
        statements.append({**statement, "Principal": {"AWS": principal.replace(_ACCOUNT, account)}})
    return json.dumps({**template, "Statement": statements}, indent=2)


def bootstrap(
    clients: AwsClients, settings: AwsSettings, roles: Mapping[Role, str]
) -> BootstrapReport:
    """Bring AWS to the wanted state (see the module docstring); idempotent."""
    with aws_errors("ask STS which account the credentials are in"):
        account = str(clients.sts.get_caller_identity()["Account"])
    if settings.account and settings.account != account:
        raise ConfigurationError(
            f"HMD_AWS_KEY is in account {settings.account}, the credentials in {account}"
        )
    policy = key_policy(account, roles)
    name = settings.key_name
    actions: list[str] = []
    versions, latest_target = list_versions(clients.kms, name)
    if not versions:
        versions = {1: _first_version(clients, settings, policy, actions)}
    else:
        listed = ", ".join(version_alias(name, v) for v in sorted(versions))
        actions.append(f"found {len(versions)} version(s): {listed}")
        _check_adopted(settings, versions)
    for version, key_id in sorted(versions.items()):
        actions += _version_key(clients, name, version, key_id, policy)
    latest = max(versions)
    point_latest(clients.first, name, versions[latest], latest_target)
    pointer = latest_alias(name)
    if latest_target == versions[latest]:
        actions.append(f"{pointer} points at version {latest}")
    else:
        actions.append(f"pointed {pointer} at version {latest}")
    actions += _audit_key(clients, name, policy)
    for region in clients.replicas:
        actions += bootstrap_region(clients, region, name, versions, policy)
    return BootstrapReport(key_name=name, account=account, actions=tuple(actions))


def _first_version(
    clients: AwsClients, settings: AwsSettings, policy: str, actions: list[str]
) -> str:
    name = settings.key_name
    if settings.adopt_key:
        key_id = _adopt(clients, name, settings.adopt_key)
        actions.append(f"adopted KMS key {key_id} as version 1")
    else:
        key_id = create_version_key(clients, name, 1, policy)
        kind = "symmetric, multi-Region" if clients.replicas else "symmetric"
        actions.append(f"created KMS key {key_id} for version 1 ({kind}, automatic rotation)")
    if not claim_version(clients.first, name, 1, key_id):
        raise ConfigurationError(
            f"{version_alias(name, 1)} was created by someone else meanwhile; run the bootstrap "
            "again"
        )
    actions.append(f"created {version_alias(name, 1)}")
    return key_id


def _adopt(clients: AwsClients, name: str, key: str) -> str:
    metadata = describe_key(clients.kms, key)
    key_id = str(metadata["KeyId"])
    if not is_encryption_key(metadata):
        raise ConfigurationError(f"KMS key {key_id} is not a symmetric encryption key")
    if metadata.get("KeyManager") != "CUSTOMER" or metadata.get("KeyState") != "Enabled":
        raise ConfigurationError(f"KMS key {key_id} is not an enabled customer managed key")
    _tag_version(clients, name, 1, key_id)
    return key_id


def _check_adopted(settings: AwsSettings, versions: Mapping[int, str]) -> None:
    adopted = settings.adopt_key
    if adopted and versions.get(1) not in (None, key_id_of(adopted)):
        raise ConfigurationError(
            f"HMD_AWS_KEY names KMS key {adopted}, but version 1 of {settings.key_name} is "
            f"{versions[1]}"
        )


def _tag_version(clients: AwsClients, name: str, version: int, key_id: str) -> bool:
    """Tag an untagged key as *version*; False if it was tagged so already. A key tagged as
    anything else is refused."""
    tags = tags_of(clients.kms, key_id)
    wanted = {TAG_KEY: name, TAG_VERSION: str(version)}
    if all(tags.get(k) == v for k, v in wanted.items()):
        return False
    if any(k.startswith("heimdall:") for k in tags):
        raise ConfigurationError(
            f"KMS key {key_id} is tagged as another heimdall key or version; it is left as it is"
        )
    with aws_errors(f"tag KMS key {key_id} as version {version} of {name}"):
        clients.kms.tag_resource(KeyId=key_id, Tags=version_tags(name, version))
    return True


def _version_key(
    clients: AwsClients, name: str, version: int, key_id: str, policy: str
) -> list[str]:
    what = f"version {version}"
    actions = (
        [f"tagged {what}'s KMS key {key_id}"]
        if _tag_version(clients, name, version, key_id)
        else []
    )
    metadata = describe_key(clients.kms, key_id)
    if not is_encryption_key(metadata):
        raise ConfigurationError(f"{version_alias(name, version)} is not a symmetric key")
    actions.append(apply_key_policy(clients.first, key_id, policy, what))
    if metadata.get("KeyState") != "Enabled":
        actions.append(f"{what} is {metadata.get('KeyState')}: left as it is")
        return actions
    with aws_errors(f"read the rotation status of {what}'s KMS key"):
        enabled = clients.kms.get_key_rotation_status(KeyId=key_id).get("KeyRotationEnabled")
    if enabled is True:
        actions.append(f"automatic rotation of {what}'s key material is on")
    else:
        with aws_errors(f"turn on automatic rotation of {what}'s KMS key"):
            clients.kms.enable_key_rotation(KeyId=key_id)
        actions.append(f"turned on automatic rotation of {what}'s key material")
    return actions


def _audit_key(clients: AwsClients, name: str, policy: str) -> list[str]:
    alias, tag = audit_alias(name), audit_key_name(name)
    try:
        metadata = describe_key(clients.kms, alias)
    except KeyNotFound:
        metadata = None
    if metadata is None:
        with aws_errors(f"create the audit key {alias}"):
            key_id = str(
                clients.once.create_key(
                    Description=f"heimdall audit checkpoints of {name}",
                    KeySpec=AUDIT_KEY_SPEC,
                    KeyUsage="GENERATE_VERIFY_MAC",
                    Policy=policy,
                    Tags=[{"TagKey": TAG_KEY, "TagValue": tag}],
                    MultiRegion=bool(clients.replicas),
                )["KeyMetadata"]["KeyId"]
            )
        with aws_errors(f"create the alias {alias}"):
            clients.once.create_alias(AliasName=alias, TargetKeyId=key_id)
        return [f"created audit key {key_id} ({AUDIT_KEY_SPEC}) as {alias}"]
    key_id = str(metadata["KeyId"])
    if metadata.get("KeySpec") != AUDIT_KEY_SPEC or metadata.get("KeyUsage") != (
        "GENERATE_VERIFY_MAC"
    ):
        raise ConfigurationError(f"{alias} is not an {AUDIT_KEY_SPEC} MAC key")
    if tags_of(clients.kms, key_id).get(TAG_KEY) != tag:
        raise ConfigurationError(f"{alias} points at a KMS key not tagged {TAG_KEY}={tag}")
    return [
        f"audit key {alias} exists",
        apply_key_policy(clients.first, key_id, policy, "the audit key"),
    ]


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
    lines += [
        "# and its role (with HMD_ENV=production: role = ... in the config file instead):",
        *(f"#   HMD_ROLE={role.value}" for role in Role),
        "# Credentials come from the SDK's default chain (instance profile, ECS/EKS role, SSO);",
        "# HMD_AWS_ROLE_ARN assumes a role in the key's account from another one.",
    ]
    return lines
