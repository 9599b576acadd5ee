"""The OpenBao fixtures of ``vault_server`` start real servers that behave as the provider needs."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import hvac.exceptions
import pytest

import vault_server
from vault_server import (
    CLUSTER_KEY,
    CLUSTER_SIZE,
    BaoCluster,
    BaoServer,
    K8sAuth,
    bao_binary,
    make_service_account_jwt,
    require_bao_binary,
    start_dev_server,
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _group_alive(pid: int) -> bool:
    """Whether any process of the group led by ``pid`` is left."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def binary() -> Path:
    return require_bao_binary()


def test_missing_binary_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    found = bao_binary()
    assert found is None or found.name == "bao"
    monkeypatch.setattr(vault_server, "bao_binary", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="bao"):
        require_bao_binary()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_bao_binary()


def test_dev_server_answers_with_root_token_and_has_transit(bao: BaoServer) -> None:
    assert bao.addr.startswith("http://127.0.0.1:")
    client = bao.client()
    assert client.is_authenticated()
    assert client.auth.token.lookup_self()["data"]["policies"] == ["root"]
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    assert mounts["transit/"]["type"] == "transit"
    assert not bao.client(token="not-the-root-token").is_authenticated()


def test_transit_requests_are_audited_without_plaintext(bao: BaoServer, transit_key: str) -> None:
    assert bao.audit_log is not None
    devices = bao.client().sys.list_enabled_audit_devices()["data"]
    assert devices["file/"]["options"]["file_path"] == str(bao.audit_log)
    before = len(bao.audit_log.read_text().splitlines())

    secret = f"Ada Lovelace, 10 Dec 1815, marker {os.urandom(6).hex()}".encode()
    response = bao.client().secrets.transit.encrypt_data(
        name=transit_key, plaintext=_b64(secret), context=_b64(b"people/42/name")
    )
    assert response["data"]["ciphertext"].startswith("vault:v1:")

    text = bao.audit_log.read_text()
    entries = [json.loads(line) for line in text.splitlines()[before:]]
    encrypts = [e for e in entries if e["request"]["path"] == f"transit/encrypt/{transit_key}"]
    assert [e["type"] for e in encrypts] == ["request", "response"]
    assert encrypts[0]["request"]["data"]["plaintext"].startswith("hmac-sha256:")
    assert secret.decode() not in text
    assert _b64(secret) not in text


def test_transit_key_is_derived_and_not_exportable(bao: BaoServer, transit_key: str) -> None:
    assert transit_key.startswith("heimdall-test-")
    key = bao.client().secrets.transit.read_key(name=transit_key)["data"]
    assert key["name"] == transit_key
    assert key["type"] == "aes256-gcm96"
    assert key["derived"] is True
    assert key["exportable"] is False


def test_stop_and_kill_end_the_process_group(binary: Path, tmp_path: Path) -> None:
    stopped = start_dev_server(binary, tmp_path / "stopped", with_audit=False)
    killed = start_dev_server(binary, tmp_path / "killed", with_audit=False)
    assert stopped.audit_log is None
    assert stopped.client().is_authenticated()
    assert _group_alive(stopped.pid)
    assert _group_alive(killed.pid)

    stopped.stop()
    killed.kill()
    assert not _group_alive(stopped.pid)
    assert not _group_alive(killed.pid)
    assert not stopped.running
    assert not killed.running
    stopped.stop()  # idempotent, also after a kill
    killed.stop()
    assert stopped.log_path is not None
    assert "OpenBao server started" in stopped.log_path.read_text()


def test_a_server_that_does_not_start_fails_with_its_log(binary: Path, tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception) as failure:
        start_dev_server(binary, tmp_path / "broken", extra_config='storage "nonsense" {}\n')
    message = str(failure.value)
    assert "server exited" in message
    assert "last lines of" in message
    assert "nonsense" in message  # the server's own complaint, from its log


def test_raft_cluster_fails_over_to_a_new_leader(bao_cluster: BaoCluster) -> None:
    assert len(bao_cluster.nodes) == CLUSTER_SIZE
    assert len(set(bao_cluster.addrs)) == CLUSTER_SIZE
    assert all(node.root_token == bao_cluster.root_token for node in bao_cluster.nodes)
    servers = bao_cluster.raft_servers()
    assert sorted(server["node_id"] for server in servers) == ["node1", "node2", "node3"]
    assert all(server["voter"] for server in servers)
    assert sum(1 for server in servers if server["leader"]) == 1

    old = bao_cluster.leader()
    key = old.client().secrets.transit.read_key(name=CLUSTER_KEY)["data"]
    assert key["derived"] is True
    context = _b64(b"people/7/email")
    before = old.client().secrets.transit.encrypt_data(
        name=CLUSTER_KEY, plaintext=_b64(b"before failover"), context=context
    )["data"]["ciphertext"]

    started = time.monotonic()
    old.kill()
    assert not _group_alive(old.pid)
    new = bao_cluster.wait_for_leader(exclude=old, timeout=30)
    assert new is not old
    assert new.addr != old.addr
    assert time.monotonic() - started < 30
    assert bao_cluster.leader() is new

    transit = new.client().secrets.transit
    after = transit.encrypt_data(
        name=CLUSTER_KEY, plaintext=_b64(b"after failover"), context=context
    )
    decrypted = transit.decrypt_data(
        name=CLUSTER_KEY, ciphertext=after["data"]["ciphertext"], context=context
    )
    assert base64.b64decode(decrypted["data"]["plaintext"]) == b"after failover"
    old_plain = transit.decrypt_data(name=CLUSTER_KEY, ciphertext=before, context=context)
    assert base64.b64decode(old_plain["data"]["plaintext"]) == b"before failover"


def test_k8s_login_returns_token_with_role_policies(bao: BaoServer, k8s_auth: K8sAuth) -> None:
    policy = f"heimdall-transit-{k8s_auth.mount}"
    bao.client().sys.create_or_update_policy(
        name=policy, policy='path "transit/encrypt/*" { capabilities = ["update"] }'
    )
    k8s_auth.set_policies([policy])
    assert k8s_auth.jwt_path.read_text() == k8s_auth.jwt
    assert k8s_auth.reviews == []

    client = bao.client()
    client.token = None
    login = client.auth.kubernetes.login(
        k8s_auth.role, k8s_auth.jwt_path.read_text(), mount_point=k8s_auth.mount
    )
    assert policy in login["auth"]["policies"]
    assert login["auth"]["metadata"]["service_account_name"] == "heimdall-app"
    assert login["auth"]["metadata"]["service_account_namespace"] == "heimdall"
    assert 0 < login["auth"]["lease_duration"] <= 60
    assert k8s_auth.reviews == [k8s_auth.jwt]  # OpenBao really asked the stand-in
    assert client.token == login["auth"]["client_token"]
    assert policy in client.auth.token.lookup_self()["data"]["policies"]


def test_k8s_login_with_another_jwt_is_refused(bao: BaoServer, k8s_auth: K8sAuth) -> None:
    impostor = make_service_account_jwt()  # the same claims, but not the token the stand-in issued
    client = bao.client()
    client.token = None
    with pytest.raises(hvac.exceptions.Forbidden):
        client.auth.kubernetes.login(k8s_auth.role, impostor, mount_point=k8s_auth.mount)
    assert k8s_auth.reviews == [impostor]
    assert client.token is None
