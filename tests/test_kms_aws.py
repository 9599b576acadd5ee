"""The AWS KMS key provider against moto's server: the contract, binding, versions, floors.

moto enforces what these tests lean on KMS for: the EncryptionContext on Decrypt and ReEncrypt,
the KeyId named in Decrypt (it answers AccessDeniedException where AWS answers
IncorrectKeyException), aliases created at most once. It does not enforce a disabled or
pending-deletion key (it decrypts with it), nor ReEncrypt's SourceKeyId, nor key policies: where
a test needs those, it checks heimdall's own refusal and says so.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any

import pytest
from botocore.exceptions import ClientError

from aws_server import (
    ACCOUNT,
    DUMMY_SECRET_KEY,
    IamServer,
    MotoServer,
    new_key_name,
    recorded_calls,
)
from heimdall.errors import (
    AccessDenied,
    ConfigurationError,
    DecryptionFailed,
    KeyNotFound,
    KeyVersionDisabled,
    LifecycleError,
)
from heimdall.kms.aws import AwsKms, encryption_context
from heimdall.kms.aws_bootstrap import bootstrap
from heimdall.kms.aws_rotation import rotate
from heimdall.kms.aws_trust import Ownership
from heimdall.kms.aws_versions import load_chain, version_alias
from heimdall.kms.base import KeyManagementService, KeyState, WrappedKey
from heimdall.kms.local import LocalKeyring
from heimdall.kms.vault import VaultTransit
from heimdall.kms.vault_config import VaultSettings
from heimdall.rbac import Role
from heimdall.secret import SecretBytes
from kms_contract import AccessControlContract, KmsContract

AD = b"heimdall.data-key.v1\x00aws"
OWNED = Ownership(ACCOUNT)
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
OTHER_AD = b"heimdall.data-key.v1\x00another field"


def _plain(secret: SecretBytes) -> bytes:
    with secret:
        return bytes(secret.view())


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def provider(moto: MotoServer, aws_key: str) -> AwsKms:
    return AwsKms(moto.settings(aws_key), moto.clients())


def _state(moto: MotoServer, name: str, version: int) -> str:
    metadata = moto.client("kms").describe_key(KeyId=version_alias(name, version))
    return str(metadata["KeyMetadata"]["KeyState"])


class TestAwsKmsContract(KmsContract, AccessControlContract):
    @pytest.fixture
    def provider(self, moto: MotoServer, aws_key: str) -> AwsKms:
        """The SDK's own clients (default chain: the test's dummy credentials)."""
        return AwsKms(moto.settings(aws_key))

    @pytest.fixture
    def unreachable(self, moto: MotoServer, aws_environment: dict[str, str]) -> AwsKms:
        settings = moto.settings(new_key_name(), max_attempts=1, timeout=1)
        return AwsKms(dataclasses.replace(settings, endpoint_url="http://127.0.0.1:9"))

    @pytest.fixture
    def secrets(self) -> list[str]:
        return [DUMMY_SECRET_KEY]

    @pytest.fixture
    def denied(self, moto_iam: IamServer) -> AwsKms:
        """heimdall-worker's KMS actions only (moto enforces IAM identity policies' actions)."""
        name = new_key_name()
        settings = moto_iam.server.settings(name)
        bootstrap(moto_iam.server.clients(moto_iam.operator), settings, {})
        worker = moto_iam.role_user(Role.WORKER)
        return AwsKms(settings, moto_iam.server.clients(worker))


# -- binding: KMS itself enforces the context and the key ---------------------------------


def test_another_encryption_context_fails_inside_kms(provider: AwsKms, moto: MotoServer) -> None:
    """Called on KMS directly, bypassing heimdall: the context is KMS's to enforce."""
    data_key = provider.generate_data_key(AD)
    expected = _plain(data_key.plaintext)
    kms = moto.client("kms")
    key_id = load_chain(kms, provider.settings.key_name, OWNED).versions[1].key_id
    blob = data_key.wrapped.ciphertext
    with pytest.raises(ClientError) as refused:
        kms.decrypt(
            CiphertextBlob=blob, KeyId=key_id, EncryptionContext=encryption_context(OTHER_AD)
        )
    assert refused.value.response["Error"]["Code"] == "InvalidCiphertextException"
    with pytest.raises(ClientError):
        kms.decrypt(CiphertextBlob=blob, KeyId=key_id)  # no context at all
    same = kms.decrypt(CiphertextBlob=blob, KeyId=key_id, EncryptionContext=encryption_context(AD))
    assert same["Plaintext"] == expected


def test_a_rewrap_under_another_context_fails_inside_kms(provider: AwsKms) -> None:
    old = provider.generate_data_key(AD)
    old.plaintext.wipe()
    provider.rotate()
    with pytest.raises(DecryptionFailed):
        provider.rewrap(old.wrapped, OTHER_AD)


def test_decrypt_names_the_key_of_the_recorded_version(provider: AwsKms) -> None:
    """A v1 wrapped key relabelled as v2 is refused by KMS, not opened with v1's key (moto
    answers AccessDeniedException; AWS IncorrectKeyException, heimdall's DecryptionFailed)."""
    old = provider.generate_data_key(AD)
    old.plaintext.wipe()
    provider.rotate()
    relabelled = WrappedKey(provider.key_identifier(2), 2, old.wrapped.ciphertext)
    refused = pytest.raises((DecryptionFailed, AccessDenied))
    with recorded_calls(provider.clients.kms) as calls, refused:
        provider.unwrap(relabelled, AD)
    assert "Decrypt" in calls


def test_associated_data_over_3_kib_binds_through_its_digest(provider: AwsKms) -> None:
    big, other = b"a" * 10_000, b"a" * 9_999 + b"b"
    assert list(encryption_context(big)) == ["heimdall:associated-data-sha256"]
    data_key = provider.generate_data_key(big)
    expected = _plain(data_key.plaintext)
    assert _plain(provider.unwrap(data_key.wrapped, big)) == expected
    with pytest.raises(DecryptionFailed):
        provider.unwrap(data_key.wrapped, other)


def test_a_rewrap_is_one_reencrypt_and_never_a_decrypt(provider: AwsKms) -> None:
    old = provider.generate_data_key(AD)
    expected = _plain(old.plaintext)
    provider.rotate()
    with recorded_calls(provider.clients.kms) as calls:
        moved = provider.rewrap(old.wrapped, AD)
    assert [c for c in calls if c not in ("ListAliases", "DescribeKey", "ListResourceTags")] == [
        "ReEncrypt"
    ]
    assert (moved.key_identifier, moved.key_version) == (provider.key_identifier(2), 2)
    assert _plain(provider.unwrap(moved, AD)) == expected


def test_a_rewrap_names_both_keys_and_keeps_the_context(provider: AwsKms, moto: MotoServer) -> None:
    """moto ignores ReEncrypt's SourceKeyId (AWS refuses a ciphertext of another key with
    IncorrectKeyException): what heimdall sends is checked instead."""
    old = provider.generate_data_key(AD)
    old.plaintext.wipe()
    provider.rotate()
    sent: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        sent.append(dict(params))

    events = provider.clients.kms.meta.events
    events.register("provide-client-params.kms.ReEncrypt", record)
    try:
        provider.rewrap(old.wrapped, AD)
    finally:
        events.unregister("provide-client-params.kms.ReEncrypt", record)
    chain = load_chain(moto.client("kms"), provider.settings.key_name, OWNED)
    (params,) = sent
    assert params["SourceKeyId"] == chain.versions[1].key_id
    assert params["DestinationKeyId"] == chain.versions[2].key_id
    assert params["SourceEncryptionContext"] == params["DestinationEncryptionContext"]
    assert params["SourceEncryptionContext"] == encryption_context(AD)


# -- versions -------------------------------------------------------------------------------


def test_each_version_is_a_kms_key_of_its_own_found_through_aliases(
    provider: AwsKms, moto: MotoServer
) -> None:
    name = provider.settings.key_name
    provider.rotate()
    kms = moto.client("kms")
    ids = {v: load_chain(kms, name, OWNED).versions[v].key_id for v in (1, 2)}
    assert ids[1] != ids[2]
    latest = kms.describe_key(KeyId=f"alias/{name}")["KeyMetadata"]["KeyId"]
    assert latest == ids[2]
    tags = kms.list_resource_tags(KeyId=ids[2])["Tags"]
    assert {t["TagKey"]: t["TagValue"] for t in tags} == {
        "heimdall:key": name,
        "heimdall:version": "2",
        "heimdall:state": "active",
    }
    assert kms.get_key_rotation_status(KeyId=ids[2])["KeyRotationEnabled"] is True


def _policy(kms: Any, key_id: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]
    )
    return document


def test_a_rotation_never_chooses_a_key_policy_and_the_bootstrap_writes_heimdalls(
    provider: AwsKms, moto: MotoServer
) -> None:
    """AWS creates a key with a key policy only if that policy lets the creator call
    PutKeyPolicy (the lockout safety check), and heimdall-admin, who rotates, is denied it: a
    rotation's CreateKey (and ReplicateKey) carries no Policy, never BypassPolicyLockoutSafety
    Check, and the key gets AWS's default key policy until the bootstrap writes heimdall's.
    moto runs no lockout check: what heimdall sends is what this shows."""
    sent: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        sent.append(dict(params))

    events = provider.clients.once.meta.events
    events.register("provide-client-params.kms.CreateKey", record)
    try:
        provider.rotate()
    finally:
        events.unregister("provide-client-params.kms.CreateKey", record)
    (params,) = sent
    assert "Policy" not in params and "BypassPolicyLockoutSafetyCheck" not in params
    assert params["Origin"] == "AWS_KMS"
    kms, name = moto.client("kms"), provider.settings.key_name
    ids = {v: key.key_id for v, key in load_chain(kms, name, OWNED).versions.items()}
    (default,) = _policy(kms, ids[2])["Statement"]
    assert (default["Principal"], default["Action"]) == ({"AWS": f"{ROOT}"}, "kms:*")
    checks = {check.name: check for check in provider.preflight()}
    assert checks["key policies"].ok and "version 2: AWS's default" in checks["key policies"].detail

    arn = "arn:aws:iam::123456789012:role/heimdall-app"
    sent.clear()
    events.register("provide-client-params.kms.CreateKey", record)
    try:
        bootstrap(provider.clients, provider.settings, {Role.APP: arn})
    finally:
        events.unregister("provide-client-params.kms.CreateKey", record)
    assert sent == []  # every key exists already
    assert _policy(kms, ids[2]) == _policy(kms, ids[1])
    assert arn in json.dumps(_policy(kms, ids[2]))


def test_another_process_agrees_on_the_versions_from_aws_alone(
    provider: AwsKms, moto: MotoServer
) -> None:
    clock = _Clock()
    other = AwsKms(provider.settings, moto.clients(), monotonic=clock)
    assert other.generate_data_key(AD).wrapped.key_version == 1
    provider.rotate()
    provider.set_min_encryption_version(2)
    clock.now += 10.1  # past the seconds a process may wrap under the version it knows
    described = other.describe()
    assert described.latest_version == 2
    assert {v.version: v.state for v in described.versions} == {
        1: KeyState.RETIRED,
        2: KeyState.ACTIVE,
    }
    assert other.generate_data_key(AD).wrapped.key_version == 2


def test_a_version_made_elsewhere_is_encrypted_under_within_ten_seconds(
    provider: AwsKms, moto: MotoServer
) -> None:
    """Before encrypting, the version aliases are listed again at most every ten seconds: a
    version another process made is used from then on, and no sooner than that (until then the
    version before it, still active, serves)."""
    clock = _Clock()
    other = AwsKms(provider.settings, moto.clients(), monotonic=clock)
    other.generate_data_key(AD).plaintext.wipe()
    provider.rotate()
    clock.now += 9.9
    first = other.generate_data_key(AD)
    first.plaintext.wipe()
    assert first.wrapped.key_version == 1
    clock.now += 0.2
    second = other.generate_data_key(AD)
    second.plaintext.wipe()
    assert second.wrapped.key_version == 2


def test_a_latest_key_kms_refuses_as_disabled_is_left_for_the_version_made_since(
    provider: AwsKms, moto: MotoServer
) -> None:
    """Another process's emergency rotation disables the key this one still wraps under: the
    refusal makes it read the versions again and wrap under the new one, so no write fails.
    moto does not refuse a disabled key; KMS's DisabledException is injected for the old one."""
    clock = _Clock()
    other = AwsKms(provider.settings, moto.clients(), monotonic=clock)
    other.generate_data_key(AD).plaintext.wipe()
    kms = moto.client("kms")
    old_key = load_chain(kms, provider.settings.key_name, OWNED).versions[1].key_id
    provider.rotate()
    refused: list[str] = []

    def refuse(params: dict[str, Any], **_: Any) -> None:
        if params.get("KeyId") == old_key:
            refused.append(params["KeyId"])
            error = {"Error": {"Code": "DisabledException", "Message": "key is disabled"}}
            raise ClientError(error, "GenerateDataKey")

    events = other.clients.kms.meta.events
    events.register("provide-client-params.kms.GenerateDataKey", refuse)
    try:
        fresh = other.generate_data_key(AD)
    finally:
        events.unregister("provide-client-params.kms.GenerateDataKey", refuse)
    fresh.plaintext.wipe()
    assert refused == [old_key]
    assert fresh.wrapped.key_version == 2


def test_a_latest_version_heimdall_itself_refuses_costs_no_call_to_aws(
    provider: AwsKms, moto: MotoServer
) -> None:
    """Only KMS's refusal makes the provider read the versions again: a latest version that
    heimdall's own view shows disabled is refused at once, without a call."""
    clock = _Clock()
    other = AwsKms(provider.settings, moto.clients(), monotonic=clock)
    provider.rotate()
    other.generate_data_key(AD).plaintext.wipe()
    kms = moto.client("kms")
    kms.disable_key(KeyId=load_chain(kms, provider.settings.key_name, OWNED).versions[2].key_id)
    clock.now += 61  # the view is read again, and shows version 2 disabled
    with pytest.raises(KeyVersionDisabled):
        other.generate_data_key(AD)
    with recorded_calls(other.clients.kms) as calls:
        for _ in range(3):
            with pytest.raises(KeyVersionDisabled):
                other.generate_data_key(AD)
    assert calls == []


def test_two_rotations_from_the_same_version_make_one(provider: AwsKms, moto: MotoServer) -> None:
    """Both read version 1 as the latest; the second to claim alias v2 loses, and its unused
    key is scheduled for deletion."""
    kms = moto.client("kms")
    stale = load_chain(kms, provider.settings.key_name, OWNED)
    rotate(provider.clients, stale)
    created: list[str] = []

    def record(parsed: dict[str, Any], **_: Any) -> None:
        created.append(parsed["KeyMetadata"]["KeyId"])

    events = provider.clients.kms.meta.events
    events.register("after-call.kms.CreateKey", record)
    try:
        rotate(provider.clients, stale)
    finally:
        events.unregister("after-call.kms.CreateKey", record)
    chain = load_chain(kms, provider.settings.key_name, OWNED)
    assert chain.latest_version == 2
    (orphan,) = created
    assert orphan not in {key.key_id for key in chain.versions.values()}
    assert kms.describe_key(KeyId=orphan)["KeyMetadata"]["KeyState"] == "PendingDeletion"


def test_an_alias_pointed_at_a_key_heimdall_did_not_make_is_refused(
    provider: AwsKms, moto: MotoServer
) -> None:
    kms = moto.client("kms")
    foreign = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=version_alias(provider.settings.key_name, 2), TargetKeyId=foreign)
    with pytest.raises(ConfigurationError, match="not tagged"):
        provider.describe()
    with pytest.raises(ConfigurationError):
        provider.generate_data_key(AD)


def test_no_version_yet_names_the_bootstrap(moto: MotoServer) -> None:
    empty = AwsKms(moto.settings(new_key_name()), moto.clients())
    with pytest.raises(KeyNotFound, match="heimdall aws bootstrap"):
        empty.generate_data_key(AD)
    with pytest.raises(KeyNotFound, match="heimdall aws bootstrap"):
        empty.rotate()


# -- floors: in KMS itself, and heimdall's own refusal ---------------------------------------


def test_the_decryption_floor_disables_old_keys_in_kms_and_lowering_it_enables_them(
    provider: AwsKms, moto: MotoServer
) -> None:
    name = provider.settings.key_name
    old = provider.generate_data_key(AD)
    expected = _plain(old.plaintext)
    provider.rotate()
    provider.set_min_decryption_version(2)
    assert _state(moto, name, 1) == "Disabled"
    assert _state(moto, name, 2) == "Enabled"
    described = provider.set_min_decryption_version(1)
    assert _state(moto, name, 1) == "Enabled"
    assert described.min_decryption_version == 1
    # Still retired: raising the decryption floor raised the encryption floor with it.
    assert {v.version: v.state for v in described.versions}[1] is KeyState.RETIRED
    assert _plain(provider.unwrap(old.wrapped, AD)) == expected


def test_a_version_below_the_floor_is_refused_before_any_call(provider: AwsKms) -> None:
    """moto decrypts with a disabled key (AWS answers DisabledException): heimdall's own
    refusal is what this shows."""
    old = provider.generate_data_key(AD)
    old.plaintext.wipe()
    provider.rotate()
    provider.set_min_decryption_version(2)
    with recorded_calls(provider.clients.kms) as calls:
        with pytest.raises(KeyVersionDisabled):
            provider.unwrap(old.wrapped, AD)
        results = provider.rewrap_many([(old.wrapped, AD)])
    assert isinstance(results[0], KeyVersionDisabled)
    assert not {"Decrypt", "ReEncrypt"} & set(calls)


def test_a_floor_raised_elsewhere_reaches_heimdall_within_a_minute(
    provider: AwsKms, moto: MotoServer
) -> None:
    """Another process's heimdall refuses a version disabled here within _STATE_SECONDS; KMS
    refuses it at once (moto does not: only heimdall's refusal is checked)."""
    clock = _Clock()
    other = AwsKms(provider.settings, moto.clients(), monotonic=clock)
    old = provider.generate_data_key(AD)
    old.plaintext.wipe()
    other.unwrap(old.wrapped, AD).wipe()
    provider.rotate()
    provider.set_min_decryption_version(2)
    clock.now += 61
    with pytest.raises(KeyVersionDisabled):
        other.unwrap(old.wrapped, AD)


def test_a_key_disabled_outside_heimdall_is_reported_disabled(
    provider: AwsKms, moto: MotoServer
) -> None:
    provider.rotate()
    kms = moto.client("kms")
    kms.disable_key(KeyId=load_chain(kms, provider.settings.key_name, OWNED).versions[1].key_id)
    states = {v.version: v.state for v in provider.describe().versions}
    assert states == {1: KeyState.DISABLED, 2: KeyState.ACTIVE}


def test_floors_outside_the_versions_are_refused(provider: AwsKms) -> None:
    with pytest.raises(LifecycleError):
        provider.set_min_decryption_version(2)
    with pytest.raises(LifecycleError):
        provider.set_min_encryption_version(2)


def test_deletion_is_scheduled_only_for_disabled_versions(
    provider: AwsKms, moto: MotoServer
) -> None:
    name = provider.settings.key_name
    provider.rotate()
    with pytest.raises(LifecycleError, match="not disabled"):
        provider.schedule_deletion(2, 7)
    provider.set_min_decryption_version(2)
    with pytest.raises(LifecycleError, match="7 to 30"):
        provider.schedule_deletion(2, 3)
    scheduled = provider.schedule_deletion(2, 7)
    assert [version for version, _ in scheduled] == [1]
    assert _state(moto, name, 1) == "PendingDeletion"
    assert provider.schedule_deletion(2, 7) == []  # idempotent
    assert {v.version: v.state for v in provider.describe().versions}[1] is KeyState.DISABLED
    provider.set_min_decryption_version(1)  # within the waiting period: undone
    assert _state(moto, name, 1) == "Enabled"


def test_wrap_puts_an_existing_data_key_under_the_latest_version(provider: AwsKms) -> None:
    provider.rotate()
    with SecretBytes.random(32) as data_key:
        wrapped = provider.wrap(data_key, AD)
        assert (wrapped.key_identifier, wrapped.key_version) == (provider.key_identifier(2), 2)
        assert _plain(provider.unwrap(wrapped, AD)) == bytes(data_key.view())
    with pytest.raises(DecryptionFailed):
        provider.unwrap(wrapped, OTHER_AD)


# -- identifiers -----------------------------------------------------------------------------


def test_identifiers_are_never_another_providers(provider: AwsKms, tmp_path: Any) -> None:
    name = provider.settings.key_name
    assert provider.owns(f"aws:alias/{name}-v3")
    for other in (
        f"{name}-v3",  # the local keyring's
        f"transit/{name}-v3",  # Vault's
        f"aws:alias/{name}-v03",
        f"aws:alias/{name}-v",
        f"aws:alias/other-{name}-v1",
        f"aws:arn:aws:kms:eu-west-1:123456789012:alias/{name}-v1",
    ):
        assert not provider.owns(other), other
    local = LocalKeyring(tmp_path / "keyring.json", key_name=name)
    vault = VaultTransit(
        VaultSettings(addresses=("http://127.0.0.1:9",), token="s.unused", key_name=name)
    )
    assert not local.owns(f"aws:alias/{name}-v1")
    assert not vault.owns(f"aws:alias/{name}-v1")
    assert isinstance(provider, KeyManagementService)
    wrapped = provider.generate_data_key(AD).wrapped
    assert wrapped.key_identifier == f"aws:alias/{name}-v1"
    with pytest.raises(KeyNotFound, match="AWS KMS key"):
        local.unwrap(wrapped, AD)


def test_an_identifier_that_does_not_name_its_version_is_refused(provider: AwsKms) -> None:
    wrapped = provider.generate_data_key(AD).wrapped
    with pytest.raises(KeyNotFound):
        provider.unwrap(WrappedKey(provider.key_identifier(2), 1, wrapped.ciphertext), AD)


# -- batches ---------------------------------------------------------------------------------


def test_batch_items_go_side_by_side_up_to_the_concurrency(moto: MotoServer, aws_key: str) -> None:
    provider = AwsKms(moto.settings(aws_key, concurrency=3), moto.clients())
    keys = [provider.generate_data_key(AD) for _ in range(12)]
    for key in keys:
        key.plaintext.wipe()
    in_flight, peak = [0], [0]
    lock = threading.Lock()

    def enter(**_: Any) -> None:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.02)

    def leave(**_: Any) -> None:
        with lock:
            in_flight[0] -= 1

    events = provider.clients.kms.meta.events
    events.register("before-call.kms.Decrypt", enter)
    events.register("after-call.kms.Decrypt", leave)
    try:
        results = provider.unwrap_many([(k.wrapped, AD) for k in keys])
    finally:
        events.unregister("before-call.kms.Decrypt", enter)
        events.unregister("after-call.kms.Decrypt", leave)
    assert all(isinstance(r, SecretBytes) for r in results)
    assert 1 < peak[0] <= 3
