"""Each role's KMS actions (heimdall.kms.aws_access) on a moto server that enforces IAM.

Each role is stood in for by an IAM user whose identity policy allows exactly its actions from
the table, on every resource: moto checks the actions of identity policies, not their resources
or conditions, nor key policies (those are held to the same table by test_aws_policies.py). So
these tests show the table is enough for everything heimdall does in each role, and that what it
leaves out is refused by AWS, not only by heimdall.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aws_server import REGION, IamServer, new_key_name, sdk_environment
from heimdall.errors import AccessDenied
from heimdall.kms.aws import AwsKms
from heimdall.kms.aws_access import role_actions
from heimdall.kms.aws_audit import AwsAuditKey
from heimdall.kms.aws_bootstrap import bootstrap
from heimdall.preflight import run_checks
from heimdall.rbac import Role

AD = b"heimdall.data-key.v1\x00iam"


@pytest.fixture
def key_name(moto_iam: IamServer) -> str:
    name = new_key_name()
    server = moto_iam.server
    bootstrap(server.clients(moto_iam.operator), server.settings(name), {})
    return name


def _as(moto_iam: IamServer, role: Role, name: str) -> AwsKms:
    return AwsKms(moto_iam.server.settings(name), moto_iam.server.clients(moto_iam.role_user(role)))


def _operator(moto_iam: IamServer, name: str) -> AwsKms:
    return AwsKms(moto_iam.server.settings(name), moto_iam.server.clients(moto_iam.operator))


@pytest.mark.parametrize("role", list(Role))
def test_kms_check_passes_for_each_role_with_exactly_its_actions(
    moto_iam: IamServer, key_name: str, role: Role
) -> None:
    checks = run_checks(_as(moto_iam, role, key_name), role)
    assert [c for c in checks if not c.ok] == []
    ran = {c.name for c in checks if not c.skipped}
    assert "credentials" in ran
    assert ("round trip" in ran) is (role is Role.APP)


def test_the_app_wraps_and_unwraps_but_may_not_rotate(moto_iam: IamServer, key_name: str) -> None:
    app = _as(moto_iam, Role.APP, key_name)
    data_key = app.generate_data_key(AD)
    with data_key.plaintext as plaintext, app.unwrap(data_key.wrapped, AD) as back:
        assert bytes(back.view()) == bytes(plaintext.view())
    with pytest.raises(AccessDenied):
        app.rotate()
    _operator(moto_iam, key_name).rotate()
    with pytest.raises(AccessDenied):
        app.set_min_decryption_version(2)


def test_the_worker_only_unwraps(moto_iam: IamServer, key_name: str) -> None:
    wrapped = _operator(moto_iam, key_name).generate_data_key(AD).wrapped
    worker = _as(moto_iam, Role.WORKER, key_name)
    worker.unwrap(wrapped, AD).wipe()
    with pytest.raises(AccessDenied):
        worker.generate_data_key(AD)
    with pytest.raises(AccessDenied):
        worker.rotate()


def test_the_admin_rotates_sets_floors_and_rewraps_but_never_sees_a_data_key(
    moto_iam: IamServer, key_name: str
) -> None:
    old = _operator(moto_iam, key_name).generate_data_key(AD)
    old.plaintext.wipe()
    admin = _as(moto_iam, Role.ADMIN, key_name)
    assert admin.rotate().latest_version == 2
    moved = admin.rewrap(old.wrapped, AD)
    assert moved.key_version == 2
    admin.set_min_encryption_version(2)
    admin.set_min_decryption_version(2)
    assert admin.schedule_deletion(2, 7)
    with pytest.raises(AccessDenied):
        admin.unwrap(moved, AD)
    with pytest.raises(AccessDenied):
        admin.generate_data_key(AD)


def test_the_auditor_verifies_checkpoints_and_nothing_else(
    moto_iam: IamServer, key_name: str
) -> None:
    operator = _operator(moto_iam, key_name)
    mac = AwsAuditKey(operator.clients, key_name).sign(b"checkpoint")
    auditor = _as(moto_iam, Role.AUDIT, key_name)
    assert AwsAuditKey(auditor.clients, key_name).verify(b"checkpoint", mac)
    with pytest.raises(AccessDenied):
        AwsAuditKey(auditor.clients, key_name).sign(b"checkpoint")
    with pytest.raises(AccessDenied):
        auditor.describe()


def test_credentials_assume_the_role_in_hmd_aws_role_arn(
    moto_iam: IamServer, key_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Cross-account access (spec: Authentication Methods): credentials that may do nothing
    but sts:AssumeRole get the role's temporary credentials, refreshed by botocore."""
    server = moto_iam.server
    wrapped = _operator(moto_iam, key_name).generate_data_key(AD).wrapped
    caller = moto_iam.user(f"assumer-{key_name}", {"sts:AssumeRole"})
    role_arn = moto_iam.role(f"worker-{key_name}", role_actions(Role.WORKER), trusted=caller)
    environment = sdk_environment(tmp_path, server)
    environment["AWS_ACCESS_KEY_ID"] = caller.access_key
    environment["AWS_SECRET_ACCESS_KEY"] = caller.secret_key
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)

    worker = AwsKms(server.settings(key_name, role_arn=role_arn))

    identity = worker.clients.sts.get_caller_identity()
    assert ":assumed-role/" in identity["Arn"] and REGION
    worker.unwrap(wrapped, AD).wipe()
    with pytest.raises(AccessDenied):
        worker.generate_data_key(AD)
    checks = {c.name: c for c in run_checks(worker, Role.WORKER)}
    assert checks["credentials"].ok and "assumed-role" in checks["credentials"].detail
