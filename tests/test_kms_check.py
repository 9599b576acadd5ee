"""``heimdall kms check`` checks each role for what it may do, on the local keyring and Vault.

The Vault tests bootstrap a key of their own on the session ``bao`` server with `heimdall vault
bootstrap` and then run the check with each AppRole role's credentials. Policies are global to
a server, so a test that strips one restores it before it ends; tests of one xdist worker run in
sequence and each worker has its own server. The last test starts a server of its own with the
audit device exactly as ``deploy/vault/README.md`` documents it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from heimdall.errors import AccessDenied
from heimdall.kms.vault_bootstrap import ROLES, policy_text
from heimdall.kms.vault_preflight import ROLE_NEEDS, access_checks
from heimdall.kms.vault_transport import VaultTransport
from heimdall.rbac import Role
from vault_server import BaoServer, require_bao_binary, start_dev_server

BIN = Path(sys.executable).parent
DEPLOY_README = Path(__file__).resolve().parent.parent / "deploy" / "vault" / "README.md"
MOUNT = "transit"

# What each role's check skips, because the role may not do it.
SKIPPED = {
    Role.APP: {"audit device"},
    Role.WORKER: {"audit device", "key readable", "round trip"},
    Role.ADMIN: {"round trip"},
    Role.AUDIT: {"key readable", "round trip"},
}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _environ(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("HMD_", "VAULT_", "BAO_"))
    }
    env.update(
        {
            "PATH": f"{BIN}:{env.get('PATH', '')}",
            "HMD_DATA_DIR": str(tmp_path / "data"),
            "HMD_AUDIT_FSYNC": "false",
            **settings,
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


def _marks(stdout: str) -> dict[str, str]:
    """Each check's name and mark (``ok``, ``skip``, ``FAIL``) from the check's output."""
    marks = {}
    for line in stdout.splitlines():
        mark, _, rest = line.partition(" ")
        marks[rest.strip().partition(": ")[0]] = mark
    return marks


# --------------------------------------------------------------------------- local keyring


@pytest.mark.parametrize("role", [None, *Role], ids=lambda role: str(role or "operator"))
def test_local_check_passes_for_every_role_and_round_trips_only_where_it_may_encrypt(
    tmp_path: Path, role: Role | None
) -> None:
    env = _environ(tmp_path, **({"HMD_ROLE": role.value} if role else {}))

    result = _heimdall(env, "kms", "check")

    assert result.returncode == 0, result.stdout + result.stderr
    marks = _marks(result.stdout)
    assert marks["key readable"] == "ok", result.stdout  # the keyring file, for every role
    may_round_trip = role in (None, Role.APP)
    assert marks["round trip"] == ("ok" if may_round_trip else "skip"), result.stdout
    if not may_round_trip:
        assert f"skip round trip: {role} may not generate data keys" in result.stdout


# --------------------------------------------------------------------------- vault roles


@dataclass
class Bootstrapped:
    """A key bootstrapped with `heimdall vault bootstrap`, and its AppRole mount."""

    bao: BaoServer
    key: str
    approle: str
    tmp_path: Path

    def operator_env(self, **settings: str) -> dict[str, str]:
        return _environ(
            self.tmp_path,
            HMD_KMS_PROVIDER="vault",
            HMD_KMS_KEY_NAME=self.key,
            HMD_VAULT_ADDR=self.bao.addr,
            HMD_VAULT_TOKEN=self.bao.root_token,
            HMD_VAULT_APPROLE_MOUNT=self.approle,
            **settings,
        )

    def role_env(self, role: Role) -> tuple[dict[str, str], list[str]]:
        """The settings of heimdall running as *role* over AppRole, and its credentials."""
        approle = self.bao.client().auth.approle
        role_id = str(approle.read_role_id(role.value, mount_point=self.approle)["data"]["role_id"])
        secret_id = str(
            approle.generate_secret_id(role.value, mount_point=self.approle)["data"]["secret_id"]
        )
        files = {}
        for name, value in (("role_id", role_id), ("secret_id", secret_id)):
            path = self.tmp_path / f"{role.value}.{name}"
            path.write_text(value)
            path.chmod(0o600)
            files[name] = str(path)
        env = self.operator_env(
            HMD_ROLE=role.value,
            HMD_VAULT_AUTH="approle",
            HMD_VAULT_ROLE_ID_FILE=files["role_id"],
            HMD_VAULT_SECRET_ID_FILE=files["secret_id"],
        )
        del env["HMD_VAULT_TOKEN"]
        return env, [role_id, secret_id, self.bao.root_token]


@pytest.fixture
def bootstrapped(bao: BaoServer, tmp_path: Path) -> Iterator[Bootstrapped]:
    deployment = Bootstrapped(bao, _unique("kms-check"), _unique("approle"), tmp_path)
    result = _heimdall(deployment.operator_env(), "vault", "bootstrap")
    assert result.returncode == 0, result.stdout + result.stderr
    yield deployment
    bao.client().sys.disable_auth_method(deployment.approle)


def _without_path(policy: str, path: str) -> str:
    """*policy* without the block that grants *path* (a block of one ``capabilities`` line)."""
    stripped, count = re.subn(rf'path "{re.escape(path)}" \{{[^{{}}]*\}}\n', "", policy)
    assert count == 1, f"{path} is not a plain block of the policy"
    return stripped


@pytest.mark.parametrize("role", list(Role), ids=str)
def test_vault_check_passes_for_a_bootstrapped_role_checking_only_what_it_may_do(
    bootstrapped: Bootstrapped, role: Role
) -> None:
    env, secrets = bootstrapped.role_env(role)

    result = _heimdall(env, "kms", "check")

    assert result.returncode == 0, result.stdout + result.stderr
    marks = _marks(result.stdout)
    for name in ("audit device", "key readable", "round trip"):
        assert marks[name] == ("skip" if name in SKIPPED[role] else "ok"), result.stdout
    for need in ROLE_NEEDS[role]:
        assert marks[f"capability {need.render(MOUNT, bootstrapped.key)}"] == "ok", result.stdout
    assert marks["export denied"] == "ok", result.stdout
    assert marks["authentication"] == "ok", result.stdout
    assert "FAIL" not in marks.values(), result.stdout
    for secret in secrets:
        assert secret not in result.stdout + result.stderr


# One path each role needs, and the line that must then fail.
STRIPPED = {
    Role.APP: "{mount}/datakey/plaintext/{key}",
    Role.WORKER: "{mount}/decrypt/{key}",
    Role.ADMIN: "{mount}/rewrap/{key}",
    Role.AUDIT: "sys/audit",
}


@pytest.mark.parametrize("role", list(Role), ids=str)
def test_vault_check_fails_for_a_role_whose_policy_lacks_a_path_it_needs(
    bootstrapped: Bootstrapped, role: Role
) -> None:
    root = bootstrapped.bao.client()
    path = STRIPPED[role].format(mount=MOUNT, key=bootstrapped.key)
    policy = policy_text(role.value, mount=MOUNT, key_name=bootstrapped.key)
    root.sys.create_or_update_policy(role.value, _without_path(policy, path))
    try:
        env, secrets = bootstrapped.role_env(role)
        result = _heimdall(env, "kms", "check")
    finally:
        root.sys.create_or_update_policy(role.value, policy)

    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failed[0].startswith(f"FAIL capability {path}: lacks "), result.stdout
    for secret in secrets:
        assert secret not in result.stdout + result.stderr


def test_vault_check_fails_when_the_roles_token_may_export_the_key(
    bootstrapped: Bootstrapped,
) -> None:
    # The root token may do everything an app needs, and also export: not what an app runs with.
    result = _heimdall(bootstrapped.operator_env(HMD_ROLE=Role.APP.value), "kms", "check")

    assert result.returncode == 1, result.stdout + result.stderr
    export = f"{MOUNT}/export/encryption-key/{bootstrapped.key}"
    assert f"FAIL export denied: the token may read {export}" in result.stdout
    assert bootstrapped.bao.root_token not in result.stdout + result.stderr


def test_vault_check_as_the_operator_lists_audit_devices_reads_the_key_and_round_trips(
    bootstrapped: Bootstrapped,
) -> None:
    result = _heimdall(bootstrapped.operator_env(), "kms", "check")

    assert result.returncode == 0, result.stdout + result.stderr
    marks = _marks(result.stdout)
    assert [marks[name] for name in ("audit device", "key readable", "round trip")] == ["ok"] * 3
    assert not any(name.startswith(("capability", "export")) for name in marks)


def test_every_role_has_its_row_in_the_vault_table() -> None:
    assert set(ROLE_NEEDS) == set(Role) == {Role(name) for name in ROLES}


class _RefusingTransport:
    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        raise AccessDenied("vault denied the operation (permission denied)", provider="vault")


def test_capabilities_vault_will_not_tell_are_one_failed_line() -> None:
    transport = cast("VaultTransport", _RefusingTransport())

    checks = access_checks(transport, Role.WORKER, MOUNT, "heimdall-pii")

    assert [(check.name, check.ok) for check in checks] == [("capabilities", False)]
    assert "permission denied" in checks[0].detail
    assert access_checks(transport, None, MOUNT, "heimdall-pii") == []  # the operator does it


# --------------------------------------------------------------------------- documented audit


def _documented_audit_device() -> str:
    """The first ```hcl block after the heading "Audit device" of deploy/vault/README.md."""
    text = DEPLOY_README.read_text(encoding="utf-8")
    heading = text.index("\n## Audit device\n")
    start = text.index("```hcl\n", heading) + len("```hcl\n")
    return text[start : text.index("```", start)]


def test_documented_audit_device_is_accepted_by_openbao_and_seen_by_kms_check(
    tmp_path: Path,
) -> None:
    assert "bao audit enable" not in DEPLOY_README.read_text(encoding="utf-8")
    audit_log = tmp_path / "audit.log"
    block, count = re.subn(
        r'file_path\s*=\s*"[^"]*"',
        f"file_path = {json.dumps(str(audit_log))}",
        _documented_audit_device(),
    )
    assert count == 1, block
    server = start_dev_server(
        require_bao_binary(), tmp_path / "bao", with_audit=False, extra_config=block
    )
    try:
        key = _unique("audited")
        env = _environ(
            tmp_path,
            HMD_KMS_PROVIDER="vault",
            HMD_KMS_KEY_NAME=key,
            HMD_VAULT_ADDR=server.addr,
            HMD_VAULT_TOKEN=server.root_token,
        )
        bootstrap = _heimdall(env, "vault", "bootstrap")
        check = _heimdall(env, "kms", "check")
    finally:
        server.stop()

    assert bootstrap.returncode == 0, bootstrap.stdout + bootstrap.stderr
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok   audit device: enabled: file" in check.stdout
    entries = [json.loads(line) for line in audit_log.read_text().splitlines()]
    paths = {entry.get("request", {}).get("path") for entry in entries}
    assert f"{MOUNT}/keys/{key}" in paths
    assert f"{MOUNT}/datakey/plaintext/{key}" in paths
    assert server.root_token not in audit_log.read_text()
