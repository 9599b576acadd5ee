"""The command line on AWS KMS (moto): aws bootstrap, kms check, schedule-deletion, the tour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from aws_server import (
    DUMMY_SECRET_KEY,
    IamServer,
    MotoServer,
    new_key_name,
    sdk_environment,
)
from heimdall.rbac import Role

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


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
            "HMD_AWS_ENDPOINT_URL": server.url,
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


def test_aws_bootstrap_is_idempotent(tmp_path: Path, moto: MotoServer) -> None:
    key = new_key_name()
    env = _env(tmp_path, moto, key)
    arn = "arn:aws:iam::123456789012:role/heimdall-app"
    first = _heimdall(env, "aws", "bootstrap", "--app-role", arn)
    assert first.returncode == 0, first.stderr
    assert "for version 1 (symmetric, automatic rotation)" in first.stdout
    assert f"created alias/{key}-v1" in first.stdout
    assert f"alias/{key}-audit" in first.stdout
    # Without the role options: the roles the key policy grants are kept, not stripped.
    second = _heimdall(env, "aws", "bootstrap")
    assert second.returncode == 0, second.stderr
    assert "kept the roles the key policies grant: heimdall-app" in second.stdout
    assert "created" not in second.stdout and "wrote" not in second.stdout
    assert "key policy of version 1 unchanged" in second.stdout
    assert "automatic rotation of version 1's key material is on" in second.stdout
    assert DUMMY_SECRET_KEY not in first.stdout + second.stdout + first.stderr
    described = json.loads(_heimdall(env, "keys", "show", "--json").stdout)
    assert (described["provider"], described["key_name"]) == ("aws", f"aws:alias/{key}")
    assert described["latest_version"] == 1


def test_aws_bootstrap_adopts_the_key_hmd_aws_key_names(tmp_path: Path, moto: MotoServer) -> None:
    existing = moto.client("kms").create_key()["KeyMetadata"]["KeyId"]
    key = new_key_name()
    env = _env(tmp_path, moto, key, HMD_AWS_KEY=existing)
    result = _heimdall(env, "aws", "bootstrap")
    assert result.returncode == 0, result.stderr
    assert f"adopted KMS key {existing} as version 1" in result.stdout
    check = _heimdall(env, "kms", "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_kms_check_passes_on_a_bootstrapped_key(tmp_path: Path, moto: MotoServer) -> None:
    env = _env(tmp_path, moto, new_key_name())
    assert _heimdall(env, "aws", "bootstrap").returncode == 0
    result = _heimdall(env, "kms", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in (
        "credentials",
        "key readable",
        "latest key",
        "automatic rotation",
        "audit key signs",
        "audit key verifies",
        "round trip",
    ):
        assert any(line.startswith("ok") and name in line for line in lines), result.stdout
    assert DUMMY_SECRET_KEY not in result.stdout + result.stderr


def test_kms_check_fails_on_an_unreachable_endpoint(tmp_path: Path, moto: MotoServer) -> None:
    env = _env(
        tmp_path,
        moto,
        new_key_name(),
        HMD_AWS_ENDPOINT_URL="http://127.0.0.1:9",
        HMD_AWS_MAX_ATTEMPTS="1",
    )
    result = _heimdall(env, "kms", "check")
    assert result.returncode == 1
    assert "FAIL key readable: AWS KMS could not be reached" in result.stdout


def test_kms_check_for_the_worker_with_only_the_workers_actions(
    tmp_path: Path, moto_iam: IamServer
) -> None:
    server, key = moto_iam.server, new_key_name()
    operator = _env(tmp_path, server, key)
    operator["AWS_ACCESS_KEY_ID"] = moto_iam.operator.access_key
    operator["AWS_SECRET_ACCESS_KEY"] = moto_iam.operator.secret_key
    assert _heimdall(operator, "aws", "bootstrap").returncode == 0
    worker = moto_iam.role_user(Role.WORKER)
    env = {
        **operator,
        "AWS_ACCESS_KEY_ID": worker.access_key,
        "AWS_SECRET_ACCESS_KEY": worker.secret_key,
        "HMD_ROLE": Role.WORKER.value,
    }
    result = _heimdall(env, "kms", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skip round trip: heimdall-worker may not generate data keys" in result.stdout
    assert "skip automatic rotation" in result.stdout
    assert worker.secret_key not in result.stdout + result.stderr


def test_schedule_deletion_after_an_emergency_rotation(tmp_path: Path, moto: MotoServer) -> None:
    key = new_key_name()
    env = _env(tmp_path, moto, key)
    assert _heimdall(env, "aws", "bootstrap").returncode == 0
    people = tmp_path / "people.jsonl"
    people.write_text("".join(f'{{"id": "p{n}", "email": "p{n}@example.org"}}\n' for n in range(5)))
    assert _heimdall(env, "ingest", str(people)).returncode == 0
    refused = _heimdall(env, "aws", "schedule-deletion", "1")
    assert refused.returncode == 1 and "still depend on key versions up to 1" in refused.stderr
    rotated = _heimdall(env, "keys", "rotate", "--emergency")
    assert rotated.returncode == 0, rotated.stderr
    kms = moto.client("kms")
    assert kms.describe_key(KeyId=f"alias/{key}-v1")["KeyMetadata"]["KeyState"] == "Disabled"

    result = _heimdall(env, "aws", "schedule-deletion", "1", "--days", "7")

    assert result.returncode == 0, result.stderr
    assert "version 1: KMS key deletion scheduled for" in result.stdout
    state = kms.describe_key(KeyId=f"alias/{key}-v1")["KeyMetadata"]["KeyState"]
    assert state == "PendingDeletion"
    trail = (tmp_path / "data" / "audit.log").read_text()
    assert "schedule deletion of versions <= 1 in 7 days" in trail
    lookup = _heimdall(env, "lookup", "email", "p3@example.org", "--json")
    canonical = json.loads(lookup.stdout)["canonical_key"]
    read = _heimdall(env, "decrypt", canonical, "--reason", "test:read")
    assert read.stdout.strip() == "p3@example.org"


def test_the_tour_runs_on_aws(tmp_path: Path, moto: MotoServer) -> None:
    env = _env(tmp_path, moto, new_key_name())
    assert _heimdall(env, "aws", "bootstrap").returncode == 0
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    first = json.loads((ROOT / "examples" / "people.jsonl").read_text().splitlines()[0])
    assert first["email"] in result.stdout
    assert "provider aws" in result.stdout
    assert "audit trail intact" in result.stdout
    assert "FAIL" not in result.stdout
    assert DUMMY_SECRET_KEY not in result.stdout + result.stderr


def test_no_region_is_one_error_line(tmp_path: Path, moto: MotoServer) -> None:
    env = _env(tmp_path, moto, new_key_name())
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        env.pop(name)
    result = _heimdall(env, "status")
    assert result.returncode == 1
    assert result.stderr == "error: no AWS region: set HMD_AWS_REGION (or the SDK's AWS_REGION)\n"


def test_kms_check_fails_on_a_version_key_heimdall_did_not_make(
    tmp_path: Path, moto: MotoServer
) -> None:
    key = new_key_name()
    env = _env(tmp_path, moto, key)
    assert _heimdall(env, "aws", "bootstrap").returncode == 0
    kms = moto.client("kms")
    imported = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    tags = [
        {"TagKey": "heimdall:key", "TagValue": key},
        {"TagKey": "heimdall:version", "TagValue": "2"},
    ]
    kms.tag_resource(KeyId=imported, Tags=tags)
    kms.create_alias(AliasName=f"alias/{key}-v2", TargetKeyId=imported)
    result = _heimdall(env, "kms", "check")
    assert result.returncode == 1
    assert f"FAIL key readable: alias/{key}-v2 points at KMS key {imported}" in result.stdout
    people = tmp_path / "people.jsonl"
    people.write_text('{"id": "p1", "email": "p1@example.org"}\n')
    ingested = _heimdall(env, "ingest", str(people))
    assert ingested.returncode == 1
    assert ingested.stderr.startswith(f"error: alias/{key}-v2 points at KMS key {imported}")
    assert ingested.stderr.count("\n") == 1


def test_a_malformed_endpoint_is_one_error_line(tmp_path: Path, moto: MotoServer) -> None:
    runs = [
        ("http://[::1", ("status",)),
        ("https://kms.local:abc", ("kms", "check")),
        ("http://kms.example.com", ("aws", "bootstrap")),
    ]
    for url, command in runs:
        env = _env(tmp_path, moto, new_key_name(), HMD_AWS_ENDPOINT_URL=url)
        result = _heimdall(env, *command)
        assert result.returncode == 1, (url, command, result.stderr)
        assert result.stderr.startswith("error: HMD_AWS_ENDPOINT_URL: ")
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
