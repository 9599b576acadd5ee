"""AWS KMS across regions (HMD_AWS_REGIONS): multi-Region keys, failover, changes everywhere.

Against ``moto_regions`` (see ``aws_server``): one moto server keeps every region's state apart,
and its ReplicateKey copies a key, with its ID and key material, into another region's state, as
AWS does. A region goes down mid-test through a stopped :class:`Relay` (its port then refuses
connections, and the connections it carried are cut), or is never up (an endpoint nobody
listens on). What moto does not show: a replica's ``Creating`` state (its replicas are ready at
once: :func:`await_replica` is checked against a stand-in instead); ReplicateKey's Tags and
Policy (moto drops both: its replicas get their tags from heimdall's own TagResource, and their
key policy from the bootstrap); aliases kept per region (moto keeps a key's aliases on the key,
shared with its replicas, so an alias made in one region shows in all: the tests check that
heimdall asks each region for its own); a region that hangs rather than refuses (heimdall treats
both alike, after HMD_AWS_TIMEOUT); and the IAM side of ReplicateKey.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aws_server import (
    DUMMY_SECRET_KEY,
    REGIONS,
    MotoServer,
    Relay,
    new_key_name,
    recorded_calls,
    sdk_environment,
    unreachable_url,
)
from heimdall.errors import (
    AccessDenied,
    DecryptionFailed,
    HeimdallError,
    KeyNotFound,
    KeyVersionDisabled,
    KmsUnavailable,
)
from heimdall.kms.aws import AwsKms
from heimdall.kms.aws_bootstrap import bootstrap
from heimdall.kms.aws_client import AwsClients, RegionClients, connect
from heimdall.kms.aws_config import AwsSettings
from heimdall.kms.aws_regions import COOL_DOWN_SECONDS, Regions
from heimdall.kms.aws_replicas import REPLICA_WAIT_SECONDS, await_replica
from heimdall.kms.aws_trust import UntrustedKey
from heimdall.kms.aws_versions import version_alias, version_tags
from heimdall.kms.base import WrappedKey
from heimdall.secret import SecretBytes

FIRST, SECOND = REGIONS
AD = b"heimdall.data-key.v1\x00regions"
BIN = Path(sys.executable).parent


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _plain(secret: SecretBytes) -> bytes:
    with secret:
        return bytes(secret.view())


# -- which region answers (no server) ---------------------------------------------------------


def _regions(clock: _Clock) -> Regions:
    clients = AwsClients(
        kms=None, once=None, sts=None, region=FIRST, replicas=(RegionClients(SECOND, None, None),)
    )
    return Regions(clients, monotonic=clock)


def _call(
    down: set[str], asked: list[str], answer: Callable[[], HeimdallError] | None = None
) -> Callable[[RegionClients], str]:
    """A call that regions in *down* fail as unreachable and the others answer (with *answer*
    raised, when given); each region it reaches is appended to *asked*."""

    def call(region: RegionClients) -> str:
        asked.append(region.region)
        if region.region in down:
            raise KmsUnavailable("AWS KMS could not be reached to unwrap a data key")
        if answer is not None:
            raise answer()
        return region.region

    return call


def test_a_region_that_fails_is_skipped_for_the_cool_down_then_tried_first_again() -> None:
    clock, down = _Clock(), {FIRST}
    asked: list[str] = []
    regions = _regions(clock)
    assert regions.call(_call(down, asked)) == SECOND
    assert asked == [FIRST, SECOND]
    asked.clear()
    clock.now += COOL_DOWN_SECONDS - 1
    assert regions.call(_call(down, asked)) == SECOND
    assert asked == [SECOND]  # not knocked at again while it cools down
    assert regions.cooling_down() == [FIRST]
    down.clear()
    asked.clear()
    clock.now += 1
    assert regions.call(_call(down, asked)) == FIRST
    assert asked == [FIRST]
    assert regions.cooling_down() == []
    assert regions.failovers == 1


@pytest.mark.parametrize(
    "refusal", [AccessDenied, DecryptionFailed, KeyNotFound, KeyVersionDisabled]
)
def test_an_answer_is_final_and_never_asked_of_another_region(refusal: type[HeimdallError]) -> None:
    asked: list[str] = []

    def answer() -> HeimdallError:
        return DecryptionFailed() if refusal is DecryptionFailed else refusal("refused")

    with pytest.raises(refusal):
        _regions(_Clock()).call(_call(set(), asked, answer))
    assert asked == [FIRST]


def test_every_region_is_tried_even_while_cooling_down_and_the_error_names_them() -> None:
    clock, down = _Clock(), set(REGIONS)
    asked: list[str] = []
    regions = _regions(clock)
    with pytest.raises(KmsUnavailable, match=rf"in every region \({FIRST}, {SECOND}\)"):
        regions.call(_call(down, asked))
    asked.clear()
    with pytest.raises(KmsUnavailable):
        regions.call(_call(down, asked))
    assert asked == [FIRST, SECOND]  # both cooling down: both tried anyway, in order
    down.discard(FIRST)
    asked.clear()
    assert regions.call(_call(down, asked)) == FIRST


def test_with_one_region_its_error_is_passed_on_as_it_is() -> None:
    only = Regions(AwsClients(kms=None, once=None, sts=None, region=FIRST))
    with pytest.raises(KmsUnavailable) as caught:
        only.call(_call({FIRST}, []))
    assert str(caught.value) == "AWS KMS could not be reached to unwrap a data key"


class _Creating:
    """DescribeKey of a replica that is still being created for the first *polls* calls."""

    def __init__(self, polls: int) -> None:
        self.polls = polls
        self.calls = 0

    def describe_key(self, KeyId: str) -> dict[str, Any]:  # noqa: N803 - boto3's name
        self.calls += 1
        state = "Creating" if self.calls <= self.polls else "Enabled"
        return {"KeyMetadata": {"KeyId": KeyId, "KeyState": state}}


def test_a_replica_still_being_created_is_awaited() -> None:
    kms = _Creating(3)
    slept: list[float] = []
    await_replica(RegionClients(SECOND, kms, kms), "mrk-1", sleep=slept.append, monotonic=_Clock())
    assert kms.calls == 4
    assert len(slept) == 3


def test_a_replica_that_is_never_ready_is_unavailable_after_the_wait() -> None:
    clock, kms = _Clock(), _Creating(10**6)

    def sleep(seconds: float) -> None:
        clock.now += seconds

    with pytest.raises(KmsUnavailable, match=f"in {SECOND} was still being created"):
        await_replica(RegionClients(SECOND, kms, kms), "mrk-1", sleep=sleep, monotonic=clock)
    assert clock.now - 1000.0 >= REPLICA_WAIT_SECONDS


# -- on moto ----------------------------------------------------------------------------------


def _settings(
    server: MotoServer, name: str, first: str | None = None, second: str | None = None
) -> AwsSettings:
    """Both regions on *server*, or the first at *first*, the second at *second*. One attempt
    per call, so a region that refuses connections fails over at once."""
    endpoints = tuple((r, url) for r, url in zip(REGIONS, (first, second), strict=True) if url)
    return AwsSettings(
        key_name=name,
        region=FIRST,
        replica_regions=(SECOND,),
        endpoint_url=server.url,
        endpoint_urls=endpoints,
        max_attempts=1,
    )


def _bootstrapped(server: MotoServer) -> str:
    name = new_key_name()
    settings = _settings(server, name)
    bootstrap(connect(settings), settings, {})
    return name


def _tags(kms: Any, key_id: str) -> dict[str, str]:
    return {t["TagKey"]: t["TagValue"] for t in kms.list_resource_tags(KeyId=key_id)["Tags"]}


def _state(server: MotoServer, region: str, name: str, version: int) -> str:
    kms = server.client("kms", region=region)
    return str(kms.describe_key(KeyId=version_alias(name, version))["KeyMetadata"]["KeyState"])


def test_the_bootstrap_makes_multi_region_keys_aliased_and_tagged_in_each_region(
    moto_regions: MotoServer, regions_environment: dict[str, str]
) -> None:
    name = new_key_name()
    settings = _settings(moto_regions, name)
    report = bootstrap(connect(settings), settings, {})
    first, second = (moto_regions.client("kms", region=region) for region in REGIONS)
    key = first.describe_key(KeyId=version_alias(name, 1))["KeyMetadata"]
    key_id = key["KeyId"]
    assert key_id.startswith("mrk-")
    assert key["MultiRegion"] is True
    replica = second.describe_key(KeyId=version_alias(name, 1))["KeyMetadata"]
    assert (replica["KeyId"], replica["Arn"].split(":")[3]) == (key_id, SECOND)
    for kms in (first, second):
        assert _tags(kms, key_id) == {
            "heimdall:key": name,
            "heimdall:version": "1",
            "heimdall:state": "active",
        }
        assert kms.describe_key(KeyId=f"alias/{name}")["KeyMetadata"]["KeyId"] == key_id
        audit = kms.describe_key(KeyId=f"alias/{name}-audit")["KeyMetadata"]
        assert audit["MultiRegion"] is True
        assert _tags(kms, audit["KeyId"]) == {"heimdall:key": f"{name}-audit"}
    assert f"{SECOND}: replicated version 1's KMS key {key_id}" in report.actions
    again = bootstrap(connect(settings), settings, {})
    changed = [
        line
        for line in again.actions
        if line.split(": ")[-1].startswith(("created", "repl", "wrote", "tagged", "pointed"))
    ]
    assert changed == []
    assert f"{SECOND}: key policy of version 1 in {SECOND} unchanged" in again.actions


def test_fields_written_before_the_first_region_went_down_read_through_the_second(
    moto_regions: MotoServer, regions_environment: dict[str, str], relay: Relay
) -> None:
    name = _bootstrapped(moto_regions)
    clock = _Clock()
    kms = AwsKms(_settings(moto_regions, name, first=relay.url), monotonic=clock)
    first, second = kms.clients.kms, kms.clients.replicas[0].kms
    with recorded_calls(second) as in_second:
        written = [kms.generate_data_key(AD) for _ in range(3)]
    assert in_second == []  # while the first region answers, the second is never asked
    expected = [_plain(data_key.plaintext) for data_key in written]

    relay.stop()
    with recorded_calls(first) as in_first, recorded_calls(second) as in_second:
        read = [_plain(kms.unwrap(data_key.wrapped, AD)) for data_key in written]
        during = kms.generate_data_key(AD)
    assert read == expected
    assert in_first == ["Decrypt"]  # once; then it cools down
    assert in_second == ["Decrypt", "Decrypt", "Decrypt", "GenerateDataKey"]
    assert during.wrapped.key_identifier == written[0].wrapped.key_identifier
    assert during.wrapped.key_identifier == f"aws:alias/{name}-v1"  # no region in it
    written_during = _plain(during.plaintext)

    clock.now += COOL_DOWN_SECONDS
    with recorded_calls(first) as in_first:
        assert _plain(kms.unwrap(during.wrapped, AD)) == written_during
    assert in_first == ["Decrypt"]  # tried first again once the cool-down is over

    back = AwsKms(_settings(moto_regions, name))  # the first region answering again
    with recorded_calls(back.clients.replicas[0].kms) as in_second:
        assert _plain(back.unwrap(during.wrapped, AD)) == written_during
    assert in_second == []


def test_a_refusal_in_the_first_region_is_never_asked_of_the_second(
    moto_regions: MotoServer, regions_environment: dict[str, str]
) -> None:
    kms = AwsKms(_settings(moto_regions, _bootstrapped(moto_regions)))
    data_key = kms.generate_data_key(AD)
    data_key.plaintext.wipe()
    kms.rotate()
    relabelled = WrappedKey(kms.key_identifier(2), 2, data_key.wrapped.ciphertext)
    with recorded_calls(kms.clients.replicas[0].kms) as in_second:
        with pytest.raises(DecryptionFailed):
            kms.unwrap(data_key.wrapped, b"another field's context")
        with pytest.raises((AccessDenied, DecryptionFailed)):  # moto: AccessDenied
            kms.unwrap(relabelled, AD)
    assert in_second == []


def test_a_rotation_makes_the_new_version_in_every_region(
    moto_regions: MotoServer, regions_environment: dict[str, str], relay: Relay
) -> None:
    name = _bootstrapped(moto_regions)
    kms = AwsKms(_settings(moto_regions, name, first=relay.url))
    with recorded_calls(kms.clients.replicas[0].once) as in_second:
        kms.rotate()
    assert "CreateAlias" in in_second  # each region's own alias (moto shares them: see above)
    ids = set()
    for region in REGIONS:
        client = moto_regions.client("kms", region=region)
        key_id = client.describe_key(KeyId=version_alias(name, 2))["KeyMetadata"]["KeyId"]
        assert _tags(client, key_id)["heimdall:version"] == "2"
        assert client.describe_key(KeyId=f"alias/{name}")["KeyMetadata"]["KeyId"] == key_id
        ids.add(key_id)
    assert len(ids) == 1
    assert ids.pop().startswith("mrk-")

    relay.stop()
    data_key = kms.generate_data_key(AD)  # in the second region
    assert data_key.wrapped.key_version == 2
    back = AwsKms(_settings(moto_regions, name))
    assert _plain(back.unwrap(data_key.wrapped, AD)) == _plain(data_key.plaintext)


def _keys_tagged(server: MotoServer, region: str, name: str, version: int) -> list[str]:
    kms = server.client("kms", region=region)
    found = []
    for page in kms.get_paginator("list_keys").paginate():
        for key in page["Keys"]:
            tags = _tags(kms, key["KeyId"])
            if tags.get("heimdall:key") == name and tags.get("heimdall:version") == str(version):
                found.append(str(kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"]))
    return found


@pytest.mark.parametrize("down", REGIONS)
def test_a_rotation_needs_every_region_and_commits_nothing_without_one(
    moto_regions: MotoServer, regions_environment: dict[str, str], down: str
) -> None:
    name = _bootstrapped(moto_regions)
    endpoints = {down: unreachable_url()}
    kms = AwsKms(
        _settings(moto_regions, name, first=endpoints.get(FIRST), second=endpoints.get(SECOND))
    )
    with pytest.raises(KmsUnavailable, match="a new version is made in every region"):
        kms.rotate()
    for region in REGIONS:
        aliases = moto_regions.client("kms", region=region).list_aliases()["Aliases"]
        assert version_alias(name, 2) not in {alias["AliasName"] for alias in aliases}
    # The second region down: the key made in the first never wrapped anything.
    assert _keys_tagged(moto_regions, FIRST, name, 2) == (
        ["PendingDeletion"] if down == SECOND else []
    )
    # A failover never sends what cannot be repeated: no key was made in the second region.
    assert _keys_tagged(moto_regions, SECOND, name, 2) == []


def test_a_region_failed_over_to_cannot_hand_heimdall_a_key_of_its_own(
    moto_regions: MotoServer, regions_environment: dict[str, str]
) -> None:
    """With the first region down, the versions are read in the second: a version alias made
    there for a key of that region alone (not a replica of heimdall's multi-Region key) is
    refused, before any data key is wrapped under it."""
    name = _bootstrapped(moto_regions)
    second = moto_regions.client("kms", region=SECOND)
    local = second.create_key(Tags=version_tags(name, 2))["KeyMetadata"]["KeyId"]
    second.create_alias(AliasName=version_alias(name, 2), TargetKeyId=local)
    kms = AwsKms(_settings(moto_regions, name, first=unreachable_url()))
    refused = pytest.raises(UntrustedKey, match=f"{local}, which is a single-Region key in")
    with recorded_calls(kms.clients.replicas[0].kms) as in_second, refused:
        kms.generate_data_key(AD)
    assert "GenerateDataKey" not in in_second


def test_the_floors_reach_every_region_and_a_region_missed_is_named(
    moto_regions: MotoServer, regions_environment: dict[str, str]
) -> None:
    name = _bootstrapped(moto_regions)
    AwsKms(_settings(moto_regions, name)).rotate()
    cut_off = AwsKms(_settings(moto_regions, name, second=unreachable_url()))
    missed = rf"could not be reached in {SECOND} to set the decryption floor to 2; {FIRST} changed"
    with pytest.raises(KmsUnavailable, match=missed):
        cut_off.set_min_decryption_version(2)
    assert (_state(moto_regions, FIRST, name, 1), _state(moto_regions, SECOND, name, 1)) == (
        "Disabled",
        "Enabled",
    )

    kms = AwsKms(_settings(moto_regions, name))
    kms.set_min_decryption_version(2)  # again, once every region answers
    for region in REGIONS:
        assert _state(moto_regions, region, name, 1) == "Disabled"
        client = moto_regions.client("kms", region=region)
        key_id = client.describe_key(KeyId=version_alias(name, 1))["KeyMetadata"]["KeyId"]
        assert _tags(client, key_id)["heimdall:state"] == "disabled"
    assert kms.describe().min_decryption_version == 2

    assert [version for version, _ in kms.schedule_deletion(2, 7)] == [1]
    for region in REGIONS:
        assert _state(moto_regions, region, name, 1) == "PendingDeletion"


def test_a_checkpoint_signed_in_one_region_verifies_in_the_other(
    moto_regions: MotoServer, regions_environment: dict[str, str], relay: Relay
) -> None:
    name = _bootstrapped(moto_regions)
    signer = AwsKms(_settings(moto_regions, name, first=relay.url)).audit_key()
    relay.stop()
    mac = signer.sign(b"checkpoint")  # in the second region
    checker = AwsKms(_settings(moto_regions, name, second=unreachable_url())).audit_key()
    assert checker.verify(b"checkpoint", mac)  # in the first
    assert not checker.verify(b"another checkpoint", mac)


def test_a_single_region_version_is_reported_and_its_missing_replica_checked(
    moto_regions: MotoServer, regions_environment: dict[str, str]
) -> None:
    name = new_key_name()
    single = AwsSettings(key_name=name, region=FIRST, endpoint_url=moto_regions.url)
    bootstrap(connect(single), single, {})  # before the regions were set
    settings = _settings(moto_regions, name)
    report = bootstrap(connect(settings), settings, {})
    assert (
        f"{SECOND}: version 1's KMS key is single-Region: its fields read in {FIRST} only"
    ) in report.actions
    assert any("the audit key is single-Region" in line for line in report.actions)
    checks = {check.name: check for check in AwsKms(settings).preflight()}
    assert checks[f"region {FIRST}"].ok
    assert not checks[f"region {SECOND}"].ok
    assert f"no {version_alias(name, 1)} here" in checks[f"region {SECOND}"].detail


# -- the command line -------------------------------------------------------------------------


def _env(tmp_path: Path, server: MotoServer, key: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HMD_", "AWS_"))}
    env.update(sdk_environment(tmp_path, server))
    env.update(
        {
            "PATH": f"{BIN}:{env.get('PATH', '')}",
            "HMD_DATA_DIR": str(tmp_path / "data"),
            "HMD_AUDIT_FSYNC": "false",
            "HMD_KMS_PROVIDER": "aws",
            "HMD_KMS_KEY_NAME": key,
            "HMD_AWS_REGIONS": ",".join(REGIONS),
            "HMD_AWS_ENDPOINT_URL": server.url,
            "HMD_AWS_MAX_ATTEMPTS": "1",
            **extra,
        }
    )
    return env


def _heimdall(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "heimdall"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _lines(result: subprocess.CompletedProcess[str], mark: str) -> set[str]:
    """The names of the checks ``kms check`` printed with *mark* (``ok``, ``FAIL``)."""
    return {
        line.split(maxsplit=1)[1].split(":")[0]
        for line in result.stdout.splitlines()
        if line.split(maxsplit=1)[0] == mark
    }


def test_kms_check_reports_each_region(tmp_path: Path, moto_regions: MotoServer) -> None:
    key = new_key_name()
    env = _env(tmp_path, moto_regions, key)
    assert _heimdall(env, "aws", "bootstrap").returncode == 0
    both = _heimdall(env, "kms", "check")
    assert both.returncode == 0, both.stdout + both.stderr
    assert {f"region {FIRST}", f"region {SECOND}", "round trip"} <= _lines(both, "ok")

    down = _env(tmp_path, moto_regions, key, HMD_AWS_ENDPOINT_URLS=f"{FIRST}={unreachable_url()}")
    one = _heimdall(down, "kms", "check")
    assert one.returncode == 1
    assert _lines(one, "FAIL") == {f"region {FIRST}"}
    assert f"FAIL region {FIRST}: AWS KMS could not be reached" in one.stdout
    assert {f"region {SECOND}", "key readable", "latest key", "round trip"} <= _lines(one, "ok")


def test_fields_stay_readable_and_writable_while_the_first_region_is_down(
    tmp_path: Path, moto_regions: MotoServer, relay: Relay
) -> None:
    key = new_key_name()
    env = _env(tmp_path, moto_regions, key, HMD_AWS_ENDPOINT_URLS=f"{FIRST}={relay.url}")
    assert _heimdall(env, "aws", "bootstrap").returncode == 0
    people = [f'{{"id": "p{n}", "email": "p{n}@example.org"}}\n' for n in range(10)]
    (tmp_path / "before.jsonl").write_text("".join(people[:5]))
    (tmp_path / "during.jsonl").write_text("".join(people[5:]))
    outputs = [_heimdall(env, "ingest", str(tmp_path / "before.jsonl"))]
    assert outputs[-1].returncode == 0, outputs[-1].stderr

    def read(environment: dict[str, str], n: int) -> str:
        found = _heimdall(environment, "lookup", "email", f"p{n}@example.org", "--json")
        assert found.returncode == 0, found.stderr
        canonical = json.loads(found.stdout)["canonical_key"]
        value = _heimdall(environment, "decrypt", canonical, "--reason", "test:read")
        assert value.returncode == 0, value.stderr
        outputs.extend((found, value))
        return value.stdout.strip()

    relay.stop()  # the first region's endpoint goes down
    assert [read(env, n) for n in range(0, 5, 2)] == [
        "p0@example.org",
        "p2@example.org",
        "p4@example.org",
    ]
    outputs.append(_heimdall(env, "ingest", str(tmp_path / "during.jsonl")))
    assert outputs[-1].returncode == 0, outputs[-1].stderr
    outputs.append(_heimdall(env, "kms", "check"))
    assert f"FAIL region {FIRST}" in outputs[-1].stdout
    assert f"ok   region {SECOND}" in outputs[-1].stdout

    back = _env(tmp_path, moto_regions, key)  # the first region answers again
    assert [read(back, n) for n in (5, 9)] == ["p5@example.org", "p9@example.org"]
    outputs.append(_heimdall(back, "audit", "verify"))
    assert outputs[-1].returncode == 0, outputs[-1].stdout + outputs[-1].stderr
    for result in outputs:
        assert DUMMY_SECRET_KEY not in result.stdout + result.stderr
