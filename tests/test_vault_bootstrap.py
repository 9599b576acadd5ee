"""``vault_bootstrap`` against a real OpenBao: idempotent set-up and what each role may do.

The session ``bao`` server is shared, so every test uses its own key name and AppRole mount.
Policies are global to a server and their names are fixed (``heimdall-app``, ...), so each test
bootstraps first and checks its tokens right after; tests of one xdist worker run in sequence
and each worker has its own server.
"""

from __future__ import annotations

import base64
import importlib.resources
import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from heimdall.errors import AccessDenied, ConfigurationError, KmsUnavailable
from heimdall.kms.vault_bootstrap import (
    ROLES,
    BootstrapReport,
    bootstrap,
    credential_instructions,
    policy_text,
)
from vault_server import BaoServer, bao_binary

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "vault"
CONTEXT = base64.b64encode(b"person:42|email").decode()
PLAINTEXT = base64.b64encode(b"ada@example.org").decode()
FORBIDDEN = hvac.exceptions.Forbidden


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Deployment:
    """One bootstrapped key on ``bao`` and a way to log in as each of its roles."""

    bao: BaoServer
    report: BootstrapReport

    @property
    def key(self) -> str:
        return self.report.key_name

    @property
    def mount(self) -> str:
        return self.report.mount

    def secret_id(self, role: str) -> str:
        approle = self.bao.client().auth.approle
        answer = approle.generate_secret_id(role, mount_point=self.report.approle_mount)
        return str(answer["data"]["secret_id"])

    def role_id(self, role: str) -> str:
        approle = self.bao.client().auth.approle
        answer = approle.read_role_id(role, mount_point=self.report.approle_mount)
        return str(answer["data"]["role_id"])

    def login(self, role: str) -> hvac.Client:
        """A client holding a fresh AppRole token of ``role`` (never the root token)."""
        client = self.bao.client()
        client.auth.approle.login(
            self.role_id(role), self.secret_id(role), mount_point=self.report.approle_mount
        )
        assert client.token != self.bao.root_token
        return client

    def capabilities(self, token: str, path: str) -> list[str]:
        answer = self.bao.client().sys.get_capabilities([path], token=token)
        return list(answer["data"][path])


@pytest.fixture
def deployment(bao: BaoServer) -> Iterator[Deployment]:
    """The defaults' mount ``transit`` with a fresh key and a fresh AppRole mount."""
    approle = _unique("approle")
    report = bootstrap(bao.client(), key_name=_unique("bootstrap"), approle_mount=approle)
    yield Deployment(bao, report)
    bao.client().sys.disable_auth_method(approle)


@pytest.fixture
def roles(deployment: Deployment) -> dict[str, hvac.Client]:
    return {role: deployment.login(role) for role in ROLES}


def _refused(call: Callable[[], Any]) -> None:
    with pytest.raises(FORBIDDEN):
        call()


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_on_fresh_mount_enables_it_creates_derived_key_policies_and_roles(
    bao: BaoServer,
) -> None:
    mount, key, approle = _unique("transit"), _unique("bootstrap"), _unique("approle")
    report = bootstrap(bao.client(), mount=mount, key_name=key, approle_mount=approle)

    assert report.actions == (
        f"enabled transit at {mount}/",
        f"created key {key} (aes256-gcm96, derived, not exportable)",
        f"created audit key {key}-audit (hmac, not exportable)",
        *(f"wrote policy {role}" for role in ROLES),
        f"enabled approle at {approle}/",
        *(
            f"created role {role} (policy {role}; service tokens for 1h up to 4h, "
            f"secret-ids valid 24h)"
            for role in ROLES
        ),
    )
    assert (report.mount, report.key_name, report.approle_mount, report.roles) == (
        mount,
        key,
        approle,
        ROLES,
    )
    root = bao.client()
    assert root.sys.list_mounted_secrets_engines()["data"][f"{mount}/"]["type"] == "transit"
    assert root.sys.list_auth_methods()["data"][f"{approle}/"]["type"] == "approle"
    described = root.secrets.transit.read_key(key, mount_point=mount)["data"]
    assert described["type"] == "aes256-gcm96"
    assert described["derived"] is True
    assert described["exportable"] is False
    assert described["allow_plaintext_backup"] is False
    audit_key = root.secrets.transit.read_key(f"{key}-audit", mount_point=mount)["data"]
    assert audit_key["type"] == "hmac"
    assert (audit_key["exportable"], audit_key["allow_plaintext_backup"]) == (False, False)
    for role in ROLES:
        rules = root.sys.read_policy(role)["data"]["rules"]
        assert rules == policy_text(role, mount=mount, key_name=key)
        settings = root.auth.approle.read_role(role, mount_point=approle)["data"]
        assert settings["token_policies"] == [role]
        assert settings["token_type"] == "service"
        assert settings["bind_secret_id"] is True
        assert (settings["token_ttl"], settings["token_max_ttl"]) == (3600, 4 * 3600)
        assert settings["secret_id_ttl"] == 24 * 3600
    root.sys.disable_auth_method(approle)
    root.sys.disable_secrets_engine(mount)


def test_second_bootstrap_changes_nothing_and_keeps_the_key_version(
    deployment: Deployment,
) -> None:
    root = deployment.bao.client()
    before = root.secrets.transit.read_key(deployment.key, mount_point="transit")["data"]

    again = bootstrap(root, key_name=deployment.key, approle_mount=deployment.report.approle_mount)

    assert len(again.actions) == len(deployment.report.actions) == 12
    assert all(re.search(r" (exists|unchanged)\b", action) for action in again.actions)
    after = root.secrets.transit.read_key(deployment.key, mount_point="transit")["data"]
    assert after["latest_version"] == before["latest_version"] == 1
    assert after["keys"] == before["keys"]


def test_bootstrap_restores_a_changed_policy_and_role(deployment: Deployment) -> None:
    root = deployment.bao.client()
    approle = deployment.report.approle_mount
    root.sys.create_or_update_policy(
        "heimdall-worker", 'path "transit/*" { capabilities = ["update"] }'
    )
    root.auth.approle.create_or_update_approle(
        "heimdall-app",
        token_policies=["heimdall-app", "root"],
        token_ttl="2h",
        token_max_ttl="720h",
        mount_point=approle,
    )

    again = bootstrap(root, key_name=deployment.key, approle_mount=approle)

    assert "wrote policy heimdall-worker" in again.actions
    assert any(action.startswith("updated role heimdall-app ") for action in again.actions)
    rules = root.sys.read_policy("heimdall-worker")["data"]["rules"]
    assert rules == policy_text("heimdall-worker", key_name=deployment.key)
    settings = root.auth.approle.read_role("heimdall-app", mount_point=approle)["data"]
    assert (settings["token_policies"], settings["token_ttl"]) == (["heimdall-app"], 3600)


@pytest.mark.parametrize(
    ("key_settings", "complaint"),
    [
        ({"key_type": "aes256-gcm96"}, "is not derived"),
        ({"key_type": "aes256-gcm96", "derived": True, "exportable": True}, "is exportable"),
        (
            {"key_type": "aes256-gcm96", "derived": True, "convergent_encryption": True},
            "convergent",
        ),
        ({"key_type": "chacha20-poly1305", "derived": True}, "not aes256-gcm96"),
    ],
    ids=["not-derived", "exportable", "convergent", "other-type"],
)
def test_bootstrap_refuses_an_existing_key_it_cannot_use(
    bao: BaoServer, key_settings: dict[str, Any], complaint: str
) -> None:
    root = bao.client()
    key, approle = _unique("bootstrap"), _unique("approle")
    root.secrets.transit.create_key(key, mount_point="transit", **key_settings)

    with pytest.raises(ConfigurationError, match=complaint) as refused:
        bootstrap(root, key_name=key, approle_mount=approle)

    assert "new key name" in str(refused.value)
    assert root.secrets.transit.read_key(key, mount_point="transit")["data"]["latest_version"] == 1
    assert f"{approle}/" not in root.sys.list_auth_methods()["data"]  # stopped at the key


@pytest.mark.parametrize(
    ("key_settings", "complaint"),
    [
        ({"type": "aes256-gcm96"}, "not hmac"),
        ({"type": "hmac", "key_size": 32, "exportable": True}, "is exportable"),
        ({"type": "hmac", "key_size": 32, "allow_plaintext_backup": True}, "plaintext backup"),
    ],
    ids=["other-type", "exportable", "plaintext-backup"],
)
def test_bootstrap_refuses_an_existing_audit_key_it_cannot_use(
    bao: BaoServer, key_settings: dict[str, Any], complaint: str
) -> None:
    root = bao.client()
    key, approle = _unique("bootstrap"), _unique("approle")
    root.adapter.post(f"/v1/transit/keys/{key}-audit", json=key_settings)

    with pytest.raises(ConfigurationError, match=complaint) as refused:
        bootstrap(root, key_name=key, approle_mount=approle)

    assert f"{key}-audit" in str(refused.value)
    assert f"{approle}/" not in root.sys.list_auth_methods()["data"]  # stopped at the key


def test_bootstrap_refuses_a_mount_of_another_type(bao: BaoServer) -> None:
    root = bao.client()
    mount = _unique("kv")
    root.sys.enable_secrets_engine("kv", path=mount)

    with pytest.raises(ConfigurationError, match=f"{mount}/ is already mounted as kv"):
        bootstrap(root, mount=mount, key_name=_unique("bootstrap"))
    root.sys.disable_secrets_engine(mount)


def test_bootstrap_with_a_weak_token_is_access_denied_without_the_token(bao: BaoServer) -> None:
    token = bao.client().auth.token.create(policies=["default"], ttl="5m")["auth"]["client_token"]

    with pytest.raises(AccessDenied, match="may not list the secrets engines") as denied:
        bootstrap(bao.client(token=token), key_name=_unique("bootstrap"))

    assert token not in str(denied.value)
    assert denied.value.__cause__ is None


def test_unreachable_vault_is_kms_unavailable_without_the_token() -> None:
    token = "hvs.not-a-real-token-but-secret"
    client = hvac.Client(url="http://127.0.0.1:9", token=token, timeout=2)
    client.session.trust_env = False

    with pytest.raises(KmsUnavailable, match="could not be reached") as unavailable:
        bootstrap(client)

    assert unavailable.value.retryable
    assert token not in str(unavailable.value)


# --------------------------------------------------------------------------- roles


def test_worker_decrypts_what_the_app_encrypted_and_may_do_nothing_else(
    deployment: Deployment, roles: dict[str, hvac.Client]
) -> None:
    key, app, worker = deployment.key, roles["heimdall-app"], roles["heimdall-worker"]
    ciphertext = app.secrets.transit.encrypt_data(key, PLAINTEXT, context=CONTEXT)["data"][
        "ciphertext"
    ]
    wrapped = app.secrets.transit.generate_data_key(key, "wrapped", context=CONTEXT)["data"]

    transit = worker.secrets.transit
    assert transit.decrypt_data(key, ciphertext, context=CONTEXT)["data"]["plaintext"] == PLAINTEXT
    assert transit.decrypt_data(key, wrapped["ciphertext"], context=CONTEXT)["data"]["plaintext"]
    _refused(lambda: transit.encrypt_data(key, PLAINTEXT, context=CONTEXT))
    _refused(lambda: transit.generate_data_key(key, "plaintext", context=CONTEXT))
    _refused(lambda: transit.generate_data_key(key, "wrapped", context=CONTEXT))
    _refused(lambda: transit.rotate_key(key))
    _refused(lambda: transit.read_key(key))
    _refused(lambda: transit.rewrap_data(key, ciphertext, context=CONTEXT))


def test_app_encrypts_decrypts_gets_data_keys_and_reads_the_key_but_may_not_manage_it(
    deployment: Deployment, roles: dict[str, hvac.Client]
) -> None:
    key, transit = deployment.key, roles["heimdall-app"].secrets.transit

    ciphertext = transit.encrypt_data(key, PLAINTEXT, context=CONTEXT)["data"]["ciphertext"]
    assert transit.decrypt_data(key, ciphertext, context=CONTEXT)["data"]["plaintext"] == PLAINTEXT
    data_key = transit.generate_data_key(key, "plaintext", context=CONTEXT)["data"]
    assert len(base64.b64decode(data_key["plaintext"])) == 32
    unwrapped = transit.decrypt_data(key, data_key["ciphertext"], context=CONTEXT)["data"]
    assert unwrapped["plaintext"] == data_key["plaintext"]
    assert "plaintext" not in transit.generate_data_key(key, "wrapped", context=CONTEXT)["data"]
    assert transit.read_key(key)["data"]["latest_version"] == 1

    _refused(lambda: transit.rotate_key(key))
    _refused(lambda: transit.update_key_configuration(key, min_decryption_version=1))
    _refused(lambda: transit.rewrap_data(key, ciphertext, context=CONTEXT))
    _refused(lambda: transit.trim_key(key, min_version=1))


def test_admin_rotates_configures_rewraps_and_lists_audit_devices_but_never_sees_plaintext(
    deployment: Deployment, roles: dict[str, hvac.Client]
) -> None:
    key, admin = deployment.key, roles["heimdall-admin"]
    transit = admin.secrets.transit
    old = roles["heimdall-app"].secrets.transit.encrypt_data(key, PLAINTEXT, context=CONTEXT)
    ciphertext = old["data"]["ciphertext"]

    transit.rotate_key(key)
    rewrapped = transit.rewrap_data(key, ciphertext, context=CONTEXT)["data"]["ciphertext"]
    assert rewrapped.startswith("vault:v2:")
    transit.update_key_configuration(key, min_decryption_version=1)
    described = transit.read_key(key)["data"]
    assert (described["latest_version"], described["min_decryption_version"]) == (2, 1)
    # Transit has no read operation on .../config; the grant is there as the spec writes it.
    path = f"transit/keys/{key}/config"
    assert deployment.capabilities(admin.token, path) == ["read", "update"]
    assert "file/" in admin.sys.list_enabled_audit_devices()["data"]

    _refused(lambda: transit.encrypt_data(key, PLAINTEXT, context=CONTEXT))
    _refused(lambda: transit.decrypt_data(key, rewrapped, context=CONTEXT))
    _refused(lambda: transit.generate_data_key(key, "plaintext", context=CONTEXT))
    _refused(lambda: transit.update_key_configuration(key, exportable=True))
    _refused(lambda: transit.update_key_configuration(key, allow_plaintext_backup=True))
    assert deployment.capabilities(admin.token, "sys/audit/file") == ["deny"]
    assert transit.read_key(key)["data"]["exportable"] is False
    assert (
        roles["heimdall-worker"].secrets.transit.decrypt_data(key, rewrapped, context=CONTEXT)[
            "data"
        ]["plaintext"]
        == PLAINTEXT
    )


def test_audit_lists_audit_devices_and_is_denied_the_master_key(
    deployment: Deployment, roles: dict[str, hvac.Client]
) -> None:
    key, audit = deployment.key, roles["heimdall-audit"]
    ciphertext = roles["heimdall-app"].secrets.transit.encrypt_data(
        key, PLAINTEXT, context=CONTEXT
    )["data"]["ciphertext"]

    assert "file/" in audit.sys.list_enabled_audit_devices()["data"]
    transit = audit.secrets.transit
    _refused(lambda: transit.encrypt_data(key, PLAINTEXT, context=CONTEXT))
    _refused(lambda: transit.decrypt_data(key, ciphertext, context=CONTEXT))
    _refused(lambda: transit.generate_data_key(key, "wrapped", context=CONTEXT))
    _refused(lambda: transit.read_key(key))
    _refused(lambda: transit.rotate_key(key))
    _refused(lambda: transit.rewrap_data(key, ciphertext, context=CONTEXT))
    for path in (f"transit/keys/{key}", f"transit/decrypt/{key}", "transit/keys", "transit/"):
        assert deployment.capabilities(audit.token, path) == ["deny"]


def _hmac(client: hvac.Client, key: str, message: bytes) -> str:
    body = {"input": base64.b64encode(message).decode(), "algorithm": "sha2-256"}
    return str(client.adapter.post(f"/v1/transit/hmac/{key}", json=body)["data"]["hmac"])


def _verify(client: hvac.Client, key: str, message: bytes, mac: str) -> bool:
    body = {"input": base64.b64encode(message).decode(), "hmac": mac, "algorithm": "sha2-256"}
    return bool(client.adapter.post(f"/v1/transit/verify/{key}", json=body)["data"]["valid"])


def test_writers_make_audit_macs_and_checkers_verify_them_and_nothing_else(
    deployment: Deployment, roles: dict[str, hvac.Client]
) -> None:
    audit_key = f"{deployment.key}-audit"
    message = b"heimdall.audit.checkpoint.v1\n1000"
    writers = ("heimdall-app", "heimdall-worker", "heimdall-admin")
    checkers = ("heimdall-admin", "heimdall-audit")

    macs = {role: _hmac(roles[role], audit_key, message) for role in writers}

    assert len(set(macs.values())) == 1  # one key, whoever asks
    mac = macs["heimdall-app"]
    assert mac.startswith("vault:v1:")
    for role in checkers:
        assert _verify(roles[role], audit_key, message, mac)
        assert not _verify(roles[role], audit_key, message + b"1", mac)
    _refused(lambda: _hmac(roles["heimdall-audit"], audit_key, message))
    for role in ("heimdall-app", "heimdall-worker"):
        _refused(partial(_verify, roles[role], audit_key, message, mac))
    for role, client in roles.items():
        # The audit key authenticates checkpoints and nothing else; the master key is no MAC key.
        assert deployment.capabilities(client.token, f"transit/keys/{audit_key}") == ["deny"], role
        _refused(partial(_hmac, client, deployment.key, message))


EXPORT_PATHS = (
    "transit/export/encryption-key/{key}",
    "transit/export/encryption-key/{key}/1",
    "transit/export/hmac-key/{key}",
    "transit/export/hmac-key/{key}/1",
    "transit/backup/{key}",
    "transit/keys/{key}/trim",
    "transit/export/encryption-key/{key}-audit",
    "transit/export/encryption-key/{key}-audit/1",
    "transit/export/hmac-key/{key}-audit",
    "transit/export/hmac-key/{key}-audit/1",
    "transit/backup/{key}-audit",
    "transit/keys/{key}-audit/trim",
)


@pytest.fixture
def grant_everything(deployment: Deployment) -> Iterator[str]:
    """A policy granting all on transit/*, on the key's own paths and on globs over them.

    What an explicit deny has to win against. (Vault lets the most specific matching path
    decide, so the grants name the same paths and patterns the heimdall policies deny.)
    """
    name = _unique("grant-everything")
    root = deployment.bao.client()
    patterns = [
        "transit/*",
        "transit/export/+/{key}",
        "transit/export/encryption-key/{key}/*",
        "transit/export/hmac-key/{key}/*",
        "transit/export/encryption-key/{key}",
        "transit/export/hmac-key/{key}",
        "transit/backup/{key}",
        "transit/keys/{key}/trim",
        "transit/export/+/{key}-audit",
        "transit/export/encryption-key/{key}-audit/*",
        "transit/export/hmac-key/{key}-audit/*",
        "transit/export/encryption-key/{key}-audit",
        "transit/export/hmac-key/{key}-audit",
        "transit/backup/{key}-audit",
        "transit/keys/{key}-audit/trim",
    ]
    everything = '["create", "read", "update", "delete", "list", "sudo"]'
    rules = "\n".join(
        f'path "{pattern.format(key=deployment.key)}" {{ capabilities = {everything} }}'
        for pattern in patterns
    )
    root.sys.create_or_update_policy(name, rules)
    yield name
    root.sys.delete_policy(name)


def test_every_role_even_all_together_is_denied_export_backup_and_trim(
    deployment: Deployment, roles: dict[str, hvac.Client], grant_everything: str
) -> None:
    key = deployment.key
    root = deployment.bao.client()
    tokens = {role: client.token for role, client in roles.items()}
    together = root.auth.token.create(policies=[*ROLES, grant_everything], ttl="5m")
    tokens["all four and a grant of everything"] = everything = together["auth"]["client_token"]

    paths = [pattern.format(key=key) for pattern in EXPORT_PATHS]
    for holder, token in tokens.items():
        for path in paths:
            assert deployment.capabilities(token, path) == ["deny"], (holder, path)
    # The grant is real where no heimdall policy denies, yet the deny wins when a call is made.
    assert "sudo" in deployment.capabilities(everything, f"transit/hmac/{key}")
    _refused(lambda: deployment.bao.client(everything).secrets.transit.trim_key(key, 1))
    _refused(lambda: deployment.bao.client(everything).secrets.transit.backup_key(key))
    audit_key = f"{key}-audit"
    _refused(lambda: deployment.bao.client(everything).secrets.transit.backup_key(audit_key))
    _refused(
        lambda: deployment.bao.client(everything).secrets.transit.export_key(audit_key, "hmac-key")
    )


# --------------------------------------------------------------------------- policy files


def test_deploy_copies_are_byte_identical_to_the_packaged_policies() -> None:
    packaged = importlib.resources.files("heimdall.kms").joinpath("vault_policies")
    names = sorted(entry.name for entry in packaged.iterdir() if entry.name.endswith(".hcl"))
    assert names == sorted(f"{role}.hcl" for role in ROLES)
    assert sorted(path.name for path in DEPLOY_DIR.glob("*.hcl")) == names
    for name in names:
        assert (DEPLOY_DIR / name).read_bytes() == packaged.joinpath(name).read_bytes(), name


@pytest.mark.parametrize("role", ROLES)
def test_policy_text_with_defaults_is_the_file_and_every_policy_denies_key_export(
    role: str,
) -> None:
    text = policy_text(role)
    assert text == (DEPLOY_DIR / f"{role}.hcl").read_text(encoding="utf-8")
    assert text.startswith(f"# {role}: ")
    assert "spec: Access Control Model" in text
    denied = (
        "transit/export/*",
        "transit/export/encryption-key/heimdall-pii",
        "transit/export/encryption-key/heimdall-pii/*",
        "transit/export/hmac-key/heimdall-pii",
        "transit/export/hmac-key/heimdall-pii/*",
        "transit/backup/*",
        "transit/backup/heimdall-pii",
        "transit/keys/heimdall-pii/trim",
        "transit/export/encryption-key/heimdall-pii-audit",
        "transit/export/encryption-key/heimdall-pii-audit/*",
        "transit/export/hmac-key/heimdall-pii-audit",
        "transit/export/hmac-key/heimdall-pii-audit/*",
        "transit/backup/heimdall-pii-audit",
        "transit/keys/heimdall-pii-audit/trim",
    )
    for path in denied:
        assert f'path "{path}" {{\n  capabilities = ["deny"]\n}}' in text, path


@pytest.mark.parametrize("role", ROLES)
def test_policy_text_substitutes_the_mount_and_key_name_everywhere(role: str) -> None:
    text = policy_text(role, mount="team/heimdall-pii", key_name="customers.transit")

    assert "transit/" not in text.replace("customers.transit", "")
    assert text.count("heimdall-pii") == text.count("team/heimdall-pii")
    paths = re.findall(r'^path "([^"]+)"', text, flags=re.MULTILINE)
    assert paths
    assert all(path.startswith(("team/heimdall-pii/", "sys/")) for path in paths)
    assert all("*" not in path or path.endswith("/*") for path in paths)
    assert policy_text(role, mount="/transit/") == policy_text(role)


@pytest.mark.parametrize(
    ("arguments", "rule"),
    [
        ({"role": "root"}, "role must be one of"),
        ({"key_name": "*"}, "key name"),
        ({"key_name": 'pii" { capabilities = ["sudo"] } #'}, "key name"),
        ({"mount": "transit/+"}, "transit mount"),
        ({"mount": ""}, "transit mount"),
    ],
)
def test_policy_text_refuses_unknown_roles_and_names_that_are_not_plain(
    arguments: dict[str, str], rule: str
) -> None:
    role = arguments.pop("role", "heimdall-app")
    with pytest.raises(ConfigurationError, match=rule):
        policy_text(role, **arguments)


# --------------------------------------------------------------------------- credentials


def test_credential_instructions_name_every_role_and_print_no_secret(
    deployment: Deployment,
) -> None:
    issued = [deployment.secret_id(role) for role in ROLES]
    role_ids = [deployment.role_id(role) for role in ROLES]

    lines = credential_instructions(deployment.report, deployment.bao.addr)

    text = "\n".join(lines)
    for role in ROLES:
        assert f"auth/{deployment.report.approle_mount}/role/{role}/role-id" in text
        assert f"auth/{deployment.report.approle_mount}/role/{role}/secret-id" in text
        assert f"HMD_VAULT_ROLE_ID_FILE=/path/to/{role}.role_id" in text
        assert f"HMD_VAULT_SECRET_ID_FILE=/path/to/{role}.secret_id" in text
        assert f"\nHMD_ROLE={role}\n" in text + "\n"  # so kms check checks that role
    assert text.count("HMD_VAULT_AUTH=approle") == len(ROLES)
    assert text.count(f"HMD_VAULT_ADDR={deployment.bao.addr}") == len(ROLES)
    assert text.count(f"HMD_KMS_KEY_NAME={deployment.key}") == len(ROLES)
    assert text.count(f"HMD_VAULT_APPROLE_MOUNT={deployment.report.approle_mount}") == len(ROLES)
    assert text.count("HMD_VAULT_MOUNT=transit") == len(ROLES)
    for secret in (deployment.bao.root_token, *issued, *role_ids):
        assert secret not in text


def test_credential_instructions_run_as_shell_and_their_files_log_in(
    deployment: Deployment, tmp_path: Path
) -> None:
    binary = bao_binary()
    assert binary is not None
    lines = credential_instructions(deployment.report, deployment.bao.addr)
    env = {
        "PATH": f"{binary.parent}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "VAULT_TOKEN": deployment.bao.root_token,
    }

    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert deployment.bao.root_token not in done.stdout + done.stderr
    for role in ROLES:
        secret_file = tmp_path / f"{role}.secret_id"
        assert secret_file.stat().st_mode & 0o077 == 0
        client = deployment.bao.client()
        login = client.auth.approle.login(
            (tmp_path / f"{role}.role_id").read_text().strip(),
            secret_file.read_text().strip(),
            mount_point=deployment.report.approle_mount,
        )
        assert login["auth"]["policies"] == ["default", role]
        assert secret_file.read_text().strip() not in done.stdout + done.stderr


def test_credential_instructions_take_a_comma_separated_address_list() -> None:
    report = BootstrapReport("transit", "heimdall-pii", "approle", (), ROLES)
    addr = "https://vault-1.internal:8200, https://vault-2.internal:8200"

    lines = credential_instructions(report, addr)

    assert "export VAULT_ADDR=https://vault-1.internal:8200" in lines
    expected = "HMD_VAULT_ADDR=https://vault-1.internal:8200,https://vault-2.internal:8200"
    assert lines.count(expected) == len(ROLES)


@pytest.mark.parametrize(
    "addr",
    [
        "https://user:pass@vault.internal:8200",
        "vault.internal:8200",
        "ftp://vault",
        "https://vault-1.internal:8200,https://token@vault-2.internal:8200",
    ],
)
def test_credential_instructions_refuse_an_address_that_is_not_a_plain_url(addr: str) -> None:
    report = BootstrapReport("transit", "heimdall-pii", "approle", (), ROLES)
    with pytest.raises(ConfigurationError, match="Vault address"):
        credential_instructions(report, addr)


@pytest.mark.parametrize(
    "report",
    [
        BootstrapReport("transit", "heimdall-pii", "approle", (), ("heimdall-app; id",)),
        BootstrapReport("transit", "$(id)", "approle", (), ROLES),
        BootstrapReport("transit", "heimdall-pii", "approle/../x y", (), ROLES),
    ],
    ids=["role", "key", "approle-mount"],
)
def test_credential_instructions_refuse_a_report_with_names_unsafe_in_a_shell(
    report: BootstrapReport,
) -> None:
    with pytest.raises(ConfigurationError):
        credential_instructions(report, "https://vault.internal:8200")
