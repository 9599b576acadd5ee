"""``heimdall aws bootstrap`` adopts only what it should and keeps the roles it was given.

On moto, which keeps tags, origins and key policies (but runs neither the key policy lockout
check nor any key policy: what heimdall writes is what these tests read back).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from aws_server import ACCOUNT, MotoServer, new_key_name
from heimdall.errors import ConfigurationError
from heimdall.kms.aws import AwsKms
from heimdall.kms.aws_bootstrap import bootstrap
from heimdall.kms.aws_key_policy import key_policy, roles_in_policies
from heimdall.kms.aws_trust import UntrustedKey
from heimdall.kms.aws_versions import version_alias
from heimdall.rbac import Role

ROLE = "arn:aws:iam::" + ACCOUNT + ":role/heimdall-{}"


def _tags(kms: Any, key_id: str) -> dict[str, str]:
    return {t["TagKey"]: t["TagValue"] for t in kms.list_resource_tags(KeyId=key_id)["Tags"]}


def _principals(kms: Any, key: str) -> dict[str, str]:
    key_id = kms.describe_key(KeyId=key)["KeyMetadata"]["KeyId"]
    policy = json.loads(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])
    return {s["Sid"]: s["Principal"]["AWS"] for s in policy["Statement"]}


def test_a_key_behind_a_version_alias_that_heimdall_did_not_make_is_never_tagged(
    moto: MotoServer, aws_key: str
) -> None:
    """Someone who may create aliases points version 2's at a key of theirs: the bootstrap
    refuses it, names the alias and the key, and leaves the key untagged."""
    kms = moto.client("kms")
    foreign = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=version_alias(aws_key, 2), TargetKeyId=foreign)
    with pytest.raises(UntrustedKey) as caught:
        bootstrap(moto.clients(), moto.settings(aws_key), {})
    message = str(caught.value)
    assert version_alias(aws_key, 2) in message and foreign in message
    assert "heimdall tags only the keys it creates and the one HMD_AWS_KEY names" in message
    assert "\n" not in message
    assert _tags(kms, foreign) == {}


def test_an_untagged_first_version_is_adopted_only_when_hmd_aws_key_names_it(
    moto: MotoServer, aws_environment: dict[str, str]
) -> None:
    kms = moto.client("kms")
    existing = kms.create_key()["KeyMetadata"]["KeyId"]
    name = new_key_name()
    kms.create_alias(AliasName=version_alias(name, 1), TargetKeyId=existing)
    with pytest.raises(UntrustedKey, match="or set HMD_AWS_KEY to the key to adopt it"):
        bootstrap(moto.clients(), moto.settings(name), {})
    assert _tags(kms, existing) == {}
    report = bootstrap(moto.clients(), moto.settings(name, adopt_key=existing), {})
    assert f"tagged version 1's KMS key {existing} (HMD_AWS_KEY)" in report.actions
    assert _tags(kms, existing)["heimdall:version"] == "1"
    AwsKms(moto.settings(name), moto.clients()).generate_data_key(b"ad").plaintext.wipe()


def test_a_key_with_imported_material_is_adopted_only_where_the_operator_accepts_it(
    moto: MotoServer, aws_environment: dict[str, str]
) -> None:
    kms = moto.client("kms")
    imported = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    name = new_key_name()
    with pytest.raises(UntrustedKey, match="origin EXTERNAL"):
        bootstrap(moto.clients(), moto.settings(name, adopt_key=imported), {})
    assert _tags(kms, imported) == {}
    accepting = moto.settings(
        name, adopt_key=imported, key_origins=frozenset({"AWS_KMS", "EXTERNAL"})
    )
    report = bootstrap(moto.clients(), accepting, {})
    assert f"adopted KMS key {imported} as version 1" in report.actions


def test_an_audit_alias_pointed_at_another_key_is_refused(moto: MotoServer, aws_key: str) -> None:
    kms = moto.client("kms")
    foreign = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
    kms.update_alias(AliasName=f"alias/{aws_key}-audit", TargetKeyId=foreign["KeyId"])
    with pytest.raises(UntrustedKey, match=f"{foreign['KeyId']}, which is not tagged"):
        bootstrap(moto.clients(), moto.settings(aws_key), {})


def test_a_run_without_role_options_keeps_the_roles_and_one_with_them_replaces_them(
    moto: MotoServer, aws_environment: dict[str, str]
) -> None:
    kms, name = moto.client("kms"), new_key_name()
    settings = moto.settings(name)
    roles = {Role.APP: ROLE.format("app"), Role.WORKER: ROLE.format("worker")}
    bootstrap(moto.clients(), settings, roles)
    granted = {"HeimdallApp": ROLE.format("app"), "HeimdallWorker": ROLE.format("worker")}
    assert _principals(kms, version_alias(name, 1)).items() >= granted.items()

    again = bootstrap(moto.clients(), settings, {})

    assert "kept the roles the key policies grant: heimdall-app, heimdall-worker" in again.actions
    assert "key policy of version 1 unchanged" in again.actions
    for key in (version_alias(name, 1), f"alias/{name}-audit"):
        assert _principals(kms, key).items() >= granted.items()

    AwsKms(settings, moto.clients()).rotate()  # version 2: AWS's default key policy
    bootstrap(moto.clients(), settings, {})
    assert _principals(kms, version_alias(name, 2)).items() >= granted.items()

    bootstrap(moto.clients(), settings, {Role.ADMIN: ROLE.format("admin")})
    assert set(_principals(kms, version_alias(name, 1))) == {
        "EnableIamPolicies",
        "HeimdallAdmin",
        "HeimdallAdminStateTags",
    }


def test_roles_named_differently_by_two_keys_policies_are_the_operators_to_choose() -> None:
    first = key_policy(ACCOUNT, {Role.APP: ROLE.format("app")})
    second = key_policy(ACCOUNT, {Role.APP: ROLE.format("app-2")})
    assert roles_in_policies([first, first]) == {Role.APP: ROLE.format("app")}
    with pytest.raises(ConfigurationError, match="--app-role"):
        roles_in_policies([first, second])
    deleted = first.replace(ROLE.format("app"), "AROAEXAMPLEUNIQUEID12")  # a deleted role
    with pytest.raises(ConfigurationError, match="one IAM role for heimdall-app"):
        roles_in_policies([deleted])
    assert roles_in_policies(["not json", json.dumps({"Statement": "x"})]) == {}
