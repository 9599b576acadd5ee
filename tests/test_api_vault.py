"""``heimdall serve`` on Vault / OpenBao Transit: data through the API, and ``/readyz`` following
the key provider's reachability.

The OpenBao dev server here is this module's own (the session's ``bao`` is shared and must not
be stopped). It is frozen with SIGSTOP, which is what a hung or partitioned provider looks like
to a client: connections are accepted by the kernel and never answered. A dev server keeps its
keys in memory, so SIGCONT brings back the very server, keys included; a restart would not.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from api_server import ApiServer, start_server
from heimdall.rbac import Role
from vault_server import BaoServer, require_bao_binary, start_dev_server

KEY = "heimdall-api-test"


@dataclass
class Setup:
    bao: BaoServer
    server: ApiServer
    app: str
    admin: str


def _check(response: tuple[int, dict[str, object]], what: str) -> None:
    status, body = response
    assert status in (200, 204), f"{what}: {status} {body}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("api-vault")
    bao = start_dev_server(require_bao_binary(), workdir / "bao", with_audit=False)
    try:
        _check(bao.api("POST", "sys/mounts/transit", {"type": "transit"}), "enable transit")
        key = {"type": "aes256-gcm96", "derived": True, "exportable": False}
        _check(bao.api("POST", f"transit/keys/{KEY}", key), "create the key")
        audit = {"type": "hmac", "key_size": 32, "exportable": False}
        _check(bao.api("POST", f"transit/keys/{KEY}-audit", audit), "create the audit key")
        server = start_server(
            workdir / "serve",
            {
                "HMD_KMS_PROVIDER": "vault",
                "HMD_KMS_KEY_NAME": KEY,
                "HMD_VAULT_ADDR": bao.addr,
                "HMD_VAULT_TOKEN": bao.root_token,
                "HMD_VAULT_TIMEOUT": "1",
            },
        )
        try:
            yield Setup(
                bao,
                server,
                app=server.service_token(Role.APP.value),
                admin=server.service_token(Role.ADMIN.value),
            )
        finally:
            server.stop()
    finally:
        os.kill(bao.pid, signal.SIGCONT)  # never leave it frozen for its own teardown
        bao.stop()


def test_fields_round_trip_through_the_api_on_transit(setup: Setup) -> None:
    emails = [f"vault-{n}-{uuid.uuid4().hex[:6]}@example.com" for n in range(20)]
    with setup.server.client(setup.app) as app:
        stored = app.post("/v1/records", json={"records": [{"email": e} for e in emails]})
        assert stored.status_code == 200, stored.text
        keys = [r["canonical_keys"]["email"] for r in stored.json()["results"]]
        answer = app.post("/v1/decrypt", json={"keys": keys, "reason": "vault:check"})
    assert [r["plaintext"] for r in answer.json()["results"]] == emails
    with setup.server.client(setup.admin) as admin:
        description = admin.get("/admin/keys").json()
    assert (description["provider"], description["key_name"]) == ("vault", f"transit/{KEY}")


def _ready(client: httpx.Client) -> httpx.Response:
    return client.get("/readyz", timeout=30)


def test_readyz_follows_the_key_provider_s_reachability(setup: Setup) -> None:
    with setup.server.client(setup.admin) as client:
        ready = _ready(client)
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ready",
            "checks": {"store": "ok", "kms": "ok", "audit": "ok"},
        }
        os.kill(setup.bao.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            frozen = _ready(client)
            assert time.monotonic() - started < 10  # bounded, whatever the provider does
            assert frozen.status_code == 503
            body = frozen.json()
            assert body["status"] == "not_ready"
            assert body["checks"]["store"] == "ok"
            assert body["checks"]["kms"] in ("not_answering", "kms_unavailable")
            assert setup.bao.root_token not in frozen.text
            assert setup.bao.addr not in frozen.text
            assert _ready(client).status_code == 503  # still, without a pile of stuck checks
        finally:
            os.kill(setup.bao.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while (answer := _ready(client)).status_code != 200:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.2)
        assert answer.json()["checks"] == {"store": "ok", "kms": "ok", "audit": "ok"}
    assert setup.bao.root_token not in setup.server.logs()
