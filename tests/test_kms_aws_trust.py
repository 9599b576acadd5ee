"""heimdall uses only its own KMS keys: an alias pointed elsewhere is refused before any call.

Against moto, which keeps aliases, tags, key origins and accounts as AWS does (an assumed role
in another account acts in that account), but does not model AWS managed keys behind a
customer's alias (its own ``alias/aws/*`` keys say ``KeyManager`` ``CUSTOMER``): that refusal is
checked on the rules themselves (:func:`heimdall.kms.aws_trust.key_problem`) and on a stand-in
KMS in ``test_kms_aws_sdk.py``. Nor does moto enforce key policies or grants, which is why
``heimdall kms check`` reports the grants rather than heimdall refusing a key for them.
"""

from __future__ import annotations

from typing import Any

import boto3
import pytest

from aws_server import ACCOUNT, REGION, MotoServer, new_key_name, recorded_calls
from heimdall.errors import KeyNotFound
from heimdall.kms.aws import AwsKms
from heimdall.kms.aws_audit import AwsAuditKey
from heimdall.kms.aws_bootstrap import bootstrap
from heimdall.kms.aws_client import AwsClients
from heimdall.kms.aws_trust import (
    AUDIT_KEY,
    VERSION_KEY,
    KeyKind,
    Ownership,
    UntrustedKey,
    key_problem,
)
from heimdall.kms.aws_versions import version_alias, version_tags

AD = b"heimdall.data-key.v1\x00trust"
OTHER_ACCOUNT = "111111111111"
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
MRK = "mrk-1234abcd12ab34cd56ef1234567890ab"
DATA_KEY_CALLS = {"GenerateDataKey", "Encrypt", "Decrypt", "ReEncrypt"}


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tag(kms: Any, key_id: str, name: str, version: int) -> None:
    kms.tag_resource(KeyId=key_id, Tags=version_tags(name, version))


def _next_version_at(moto: MotoServer, name: str, **create: Any) -> str:
    """Someone with CreateKey, TagResource and CreateAlias in the account makes a key of their
    own look like version 2 of *name*; its key ID."""
    kms = moto.client("kms")
    key_id = str(kms.create_key(**create)["KeyMetadata"]["KeyId"])
    _tag(kms, key_id, name, 2)
    kms.create_alias(AliasName=version_alias(name, 2), TargetKeyId=key_id)
    return key_id


def test_a_version_key_with_imported_material_is_refused_before_any_data_key(
    moto: MotoServer, aws_key: str
) -> None:
    key_id = _next_version_at(moto, aws_key, Origin="EXTERNAL")
    provider = AwsKms(moto.settings(aws_key), moto.clients())
    with recorded_calls(provider.clients.kms) as calls, pytest.raises(UntrustedKey) as caught:
        provider.generate_data_key(AD)
    assert not DATA_KEY_CALLS & set(calls)
    message = str(caught.value)
    assert version_alias(aws_key, 2) in message and key_id in message
    assert "origin EXTERNAL" in message and "HMD_AWS_KEY_ORIGINS" in message
    checks = {check.name: check for check in provider.preflight()}
    assert not checks["key readable"].ok and "origin EXTERNAL" in checks["key readable"].detail


def test_imported_material_is_used_where_the_operator_accepts_it(
    moto: MotoServer, aws_key: str
) -> None:
    _next_version_at(moto, aws_key, Origin="EXTERNAL")
    settings = moto.settings(aws_key, key_origins=frozenset({"AWS_KMS", "EXTERNAL"}))
    assert AwsKms(settings, moto.clients()).describe().latest_version == 2


def test_an_untagged_key_behind_a_version_alias_is_refused(moto: MotoServer, aws_key: str) -> None:
    kms = moto.client("kms")
    foreign = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=version_alias(aws_key, 2), TargetKeyId=foreign)
    provider = AwsKms(moto.settings(aws_key), moto.clients())
    with pytest.raises(UntrustedKey, match=f"{foreign}, which is not tagged heimdall:key="):
        provider.generate_data_key(AD)


def test_a_version_alias_pointed_at_another_key_since_is_refused(
    moto: MotoServer, aws_key: str
) -> None:
    """Even a key that passes every check, tagged as the version by someone who may tag keys:
    a version is one KMS key for good, so a process that has used one refuses another."""
    clock = _Clock()
    provider = AwsKms(moto.settings(aws_key), moto.clients(), monotonic=clock)
    provider.generate_data_key(AD).plaintext.wipe()
    kms = moto.client("kms")
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    _tag(kms, other, aws_key, 1)
    kms.update_alias(AliasName=version_alias(aws_key, 1), TargetKeyId=other)
    clock.now += 61
    with recorded_calls(provider.clients.kms) as calls, pytest.raises(UntrustedKey) as caught:
        provider.generate_data_key(AD)
    assert "not the key" in str(caught.value) and other in str(caught.value)
    assert not DATA_KEY_CALLS & set(calls)


def _other_account_clients(moto: MotoServer) -> AwsClients:
    """Clients whose credentials are a role in OTHER_ACCOUNT (moto acts in its account)."""
    role = f"arn:aws:iam::{OTHER_ACCOUNT}:role/heimdall-elsewhere"
    answer = moto.client("sts").assume_role(RoleArn=role, RoleSessionName="heimdall-test")
    credentials = answer["Credentials"]
    session = boto3.Session(
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"],
        region_name=REGION,
    )
    kms = session.client("kms", endpoint_url=moto.url)
    return AwsClients(kms=kms, once=kms, sts=session.client("sts", endpoint_url=moto.url))


def test_keys_in_another_account_than_the_expected_one_are_refused(
    moto: MotoServer, aws_environment: dict[str, str]
) -> None:
    """Credentials in another account find that account's aliases: with the account named
    (HMD_AWS_ACCOUNT_ID, or the ARN in HMD_AWS_KEY), its keys are refused."""
    elsewhere = _other_account_clients(moto)
    name = new_key_name()
    bootstrap(elsewhere, moto.settings(name), {})
    expected = AwsKms(moto.settings(name, account=ACCOUNT), elsewhere)
    with recorded_calls(elsewhere.kms) as calls, pytest.raises(UntrustedKey) as caught:
        expected.generate_data_key(AD)
    assert f"is in account {OTHER_ACCOUNT}, not {ACCOUNT}" in str(caught.value)
    assert not DATA_KEY_CALLS & set(calls)
    # Without an account set, the credentials' own (from STS) is the expected one.
    own = AwsKms(moto.settings(name), elsewhere)
    assert own.ownership().account == OTHER_ACCOUNT
    own.generate_data_key(AD).plaintext.wipe()


def test_the_audit_key_alias_pointed_at_a_key_heimdall_did_not_make_is_refused(
    moto: MotoServer, aws_key: str
) -> None:
    kms = moto.client("kms")
    foreign = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
    kms.update_alias(AliasName=f"alias/{aws_key}-audit", TargetKeyId=foreign["KeyId"])
    audit = AwsAuditKey(moto.clients(), aws_key)
    with recorded_calls(moto.clients().kms) as calls:
        with pytest.raises(UntrustedKey, match=f"{foreign['KeyId']}, which is not tagged"):
            audit.sign(b"checkpoint")
        with pytest.raises(UntrustedKey):
            audit.verify(b"checkpoint", "aws-kms:v1:" + "A" * 43 + "=")
    assert not {"GenerateMac", "VerifyMac"} & set(calls)
    checks = {check.name: check for check in AwsKms(moto.settings(aws_key)).preflight()}
    assert not checks["audit key signs"].ok
    assert not checks["audit key verifies"].ok


def test_the_audit_key_is_used_by_the_key_id_checked_not_by_its_alias(
    moto: MotoServer, aws_key: str
) -> None:
    audit = AwsAuditKey(moto.clients(), aws_key)
    kms = moto.client("kms")
    checked = kms.describe_key(KeyId=f"alias/{aws_key}-audit")["KeyMetadata"]["KeyId"]
    mac = audit.sign(b"checkpoint")
    foreign = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
    kms.update_alias(AliasName=f"alias/{aws_key}-audit", TargetKeyId=foreign["KeyId"])
    sent: list[str] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        sent.append(str(params["KeyId"]))

    events = moto.clients().kms.meta.events
    events.register("provide-client-params.kms.VerifyMac", record)
    try:
        assert audit.verify(b"checkpoint", mac)
    finally:
        events.unregister("provide-client-params.kms.VerifyMac", record)
    assert sent == [checked]


def test_kms_check_reports_grants_on_heimdalls_keys(moto: MotoServer, aws_key: str) -> None:
    """A grant lets a principal use a key whatever its key policy says; heimdall makes none."""
    provider = AwsKms(moto.settings(aws_key), moto.clients())
    assert {c.name: c for c in provider.preflight()}["grants"].ok
    kms = moto.client("kms")
    key_id = kms.describe_key(KeyId=version_alias(aws_key, 1))["KeyMetadata"]["KeyId"]
    grantee = f"arn:aws:iam::{ACCOUNT}:role/someone-else"
    grant = kms.create_grant(KeyId=key_id, GranteePrincipal=grantee, Operations=["Decrypt"])
    check = {c.name: c for c in provider.preflight()}["grants"]
    assert not check.ok
    assert grant["GrantId"] in check.detail and grantee in check.detail
    assert "version 1" in check.detail and "Decrypt" in check.detail


def test_the_account_is_asked_of_sts_once_per_process(moto: MotoServer, aws_key: str) -> None:
    provider = AwsKms(moto.settings(aws_key), moto.clients())
    asked: list[str] = []

    def record(model: Any, **_: Any) -> None:
        asked.append(str(model.name))

    events = provider.clients.sts.meta.events
    events.register("before-call.sts", record)
    try:
        for _ in range(3):
            provider.describe()
        provider.audit_key().sign(b"checkpoint")
    finally:
        events.unregister("before-call.sts", record)
    assert asked == ["GetCallerIdentity"]


# -- the rules themselves ---------------------------------------------------------------------


def _metadata(**changes: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "KeyId": KEY_ID,
        "Arn": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{KEY_ID}",
        "AWSAccountId": ACCOUNT,
        "KeyManager": "CUSTOMER",
        "KeySpec": "SYMMETRIC_DEFAULT",
        "KeyUsage": "ENCRYPT_DECRYPT",
        "Origin": "AWS_KMS",
        "MultiRegion": False,
    }
    metadata.update(changes)
    return metadata


def _replica(region: str, primary_region: str, account: str = ACCOUNT) -> dict[str, Any]:
    return _metadata(
        KeyId=MRK,
        Arn=f"arn:aws:kms:{region}:{ACCOUNT}:key/{MRK}",
        MultiRegion=True,
        MultiRegionConfiguration={
            "PrimaryKey": {
                "Arn": f"arn:aws:kms:{primary_region}:{account}:key/{MRK}",
                "Region": primary_region,
            }
        },
    )


REGIONS = Ownership(ACCOUNT, regions=("us-west-2", REGION))


@pytest.mark.parametrize(
    ("metadata", "ownership", "kind", "problem"),
    [
        (_metadata(KeyManager="AWS"), Ownership(ACCOUNT), VERSION_KEY, "not a customer managed"),
        (_metadata(KeySpec="RSA_2048"), Ownership(ACCOUNT), VERSION_KEY, "not a symmetric"),
        (_metadata(), Ownership(ACCOUNT), AUDIT_KEY, "not an HMAC_256 MAC key"),
        (_metadata(Origin="AWS_CLOUDHSM"), Ownership(ACCOUNT), VERSION_KEY, "origin AWS_CLOUDHSM"),
        (_metadata(Origin="EXTERNAL_KEY_STORE"), Ownership(ACCOUNT), VERSION_KEY, "origin"),
        (_metadata(), Ownership(OTHER_ACCOUNT), VERSION_KEY, f"in account {ACCOUNT}, not"),
        (_metadata(AWSAccountId=OTHER_ACCOUNT), Ownership(ACCOUNT), VERSION_KEY, "in account"),
        (_metadata(Arn=""), Ownership(ACCOUNT), VERSION_KEY, "no key ARN"),
        (_metadata(), REGIONS, VERSION_KEY, f"single-Region key in {REGION}"),
        (_replica(REGION, "ap-south-1"), REGIONS, VERSION_KEY, "not among HMD_AWS_REGIONS"),
        (_replica(REGION, "us-west-2", OTHER_ACCOUNT), REGIONS, VERSION_KEY, "a key in account"),
    ],
)
def test_a_key_that_is_not_heimdalls_kind_place_or_making_is_refused(
    metadata: dict[str, Any], ownership: Ownership, kind: KeyKind, problem: str
) -> None:
    assert problem in key_problem(metadata, ownership, kind)


@pytest.mark.parametrize(
    ("metadata", "ownership"),
    [
        (_metadata(), Ownership(ACCOUNT)),
        (_metadata(Origin="EXTERNAL"), Ownership(ACCOUNT, frozenset({"AWS_KMS", "EXTERNAL"}))),
        (_replica(REGION, "us-west-2"), REGIONS),
        (_replica("us-west-2", "us-west-2"), REGIONS),
        (_metadata(Arn=f"arn:aws:kms:us-west-2:{ACCOUNT}:key/{KEY_ID}"), REGIONS),
    ],
)
def test_heimdalls_own_keys_pass(metadata: dict[str, Any], ownership: Ownership) -> None:
    assert key_problem(metadata, ownership, VERSION_KEY) == ""


def test_a_missing_audit_key_is_not_found_not_untrusted(moto: MotoServer) -> None:
    with pytest.raises(KeyNotFound, match="heimdall aws bootstrap"):
        AwsAuditKey(moto.clients(), new_key_name()).sign(b"checkpoint")
