"""The Vault / OpenBao Transit provider, against a real OpenBao server."""

from __future__ import annotations

import base64
import json
import logging
import multiprocessing
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import urllib3

from heimdall.app import build
from heimdall.cipher import CachePolicy, FieldCipher
from heimdall.envelope import KMS_DIRECT, EncryptionContext, EncryptionVersion, parse
from heimdall.errors import (
    AccessDenied,
    DecryptionFailed,
    KeyNotFound,
    KeyVersionDisabled,
    KmsError,
    KmsUnavailable,
)
from heimdall.ingest import ingest_lines
from heimdall.kms.base import DirectCiphertext, KeyState, WrappedKey
from heimdall.kms.vault import VaultTransit
from heimdall.kms.vault_bootstrap import bootstrap
from heimdall.kms.vault_config import (
    MAX_BATCH_SIZE,
    VaultAuthMethod,
    VaultPattern,
    VaultSettings,
)
from heimdall.rbac import Caller
from heimdall.reencrypt import reencrypt
from heimdall.secret import SecretBytes
from heimdall.service import Heimdall
from heimdall.settings import Settings
from kms_contract import AccessControlContract, KmsContract
from vault_server import BaoCluster, BaoServer, K8sAuth, require_bao_binary, start_dev_server

CTX = EncryptionContext("FieldValue", "email:hash:" + "ab" * 32, "email")
OTHER = EncryptionContext("FieldValue", "email:hash:" + "cd" * 32, "email")
CALLER = Caller(actor="test:vault")


def _provider(server: BaoServer, key: str, **options: Any) -> VaultTransit:
    settings = VaultSettings(
        addresses=(server.addr,), token=server.root_token, key_name=key, **options
    )
    return VaultTransit(settings)


def _service(
    tmp_path: Path,
    server: BaoServer,
    key: str,
    pattern: VaultPattern = VaultPattern.DATAKEY,
    dek_max_uses: int = 10_000,
    **options: Any,
) -> Heimdall:
    vault = VaultSettings(
        addresses=(server.addr,), token=server.root_token, key_name=key, **options
    )
    settings = Settings(
        data_dir=tmp_path / "data",
        kms_provider="vault",
        kms_key_name=key,
        audit_fsync=False,
        vault=vault,
        vault_pattern=pattern,
        dek_max_uses=dek_max_uses,
    )
    return build(settings)


def _people(count: int, offset: int = 0) -> list[str]:
    return [
        json.dumps(
            {
                "id": f"p-{i}",
                "email": f"person{i}@example.com",
                "phone": f"+1 415 555 {i:04d}",
                "name": f"Person Number{i}",
            }
        )
        for i in range(offset, offset + count)
    ]


def _values(service: Heimdall) -> dict[str, str]:
    keys = [f.canonical_key for batch in service.store.iter_fields() for f in batch]
    return service.decrypt_many(keys, reason="test:verify", caller=CALLER)


@pytest.mark.parametrize("direct", [False, True], ids=["pattern-a-datakey", "pattern-b-transit"])
def test_round_trip_and_context_binding(bao: BaoServer, transit_key: str, direct: bool) -> None:
    cipher = FieldCipher(_provider(bao, transit_key), EncryptionVersion.KMS_V1, direct=direct)
    sealed = cipher.encrypt(b"alice@example.com", CTX)
    envelope = parse(sealed.envelope)
    assert envelope.key_identifier == f"transit/{transit_key}-v1"
    assert (envelope.algorithm == KMS_DIRECT) is direct
    if direct:
        assert envelope.ciphertext.startswith(b"vault:v1:")
    assert cipher.decrypt(sealed.envelope, CTX) == b"alice@example.com"
    fresh = FieldCipher(_provider(bao, transit_key), EncryptionVersion.KMS_V1)
    with pytest.raises(DecryptionFailed):
        fresh.decrypt(sealed.envelope, OTHER)


def test_one_store_holds_both_patterns(tmp_path: Path, bao: BaoServer, transit_key: str) -> None:
    service_a = _service(tmp_path, bao, transit_key, VaultPattern.DATAKEY)
    ingest_lines(service_a, _people(20), caller=CALLER, source_name="a")
    service_a.close()
    service_b = _service(tmp_path, bao, transit_key, VaultPattern.TRANSIT)
    ingest_lines(service_b, _people(20, offset=20), caller=CALLER, source_name="b")
    fields = [f for batch in service_b.store.iter_fields() for f in batch]
    algorithms = {parse(f.encrypted_data).algorithm for f in fields}
    assert algorithms == {"AES-256-GCM", KMS_DIRECT}
    values = _values(service_b)
    assert "person3@example.com" in values.values()
    assert "person33@example.com" in values.values()
    service_b.close()


@pytest.mark.parametrize("pattern", list(VaultPattern))
def test_rotation_keeps_old_fields_readable_and_reencrypt_brings_all_to_latest(
    tmp_path: Path, bao: BaoServer, transit_key: str, pattern: VaultPattern
) -> None:
    service = _service(tmp_path, bao, transit_key, pattern)
    ingest_lines(service, _people(30), caller=CALLER, source_name="old")
    before = _values(service)
    assert service.rotate_keys(caller=CALLER).latest_version == 2
    ingest_lines(service, _people(5, offset=100), caller=CALLER, source_name="new")
    counts = {(c.key_version, c.count) for c in service.status(caller=CALLER).counts}
    assert (2, 15) in counts and (1, 90) in counts
    assert before.items() <= _values(service).items()
    report = reencrypt(service, caller=CALLER)
    assert report.failed == 0 and report.rewrapped == 90
    assert [c.key_version for c in service.status(caller=CALLER).counts] == [2]
    assert before.items() <= _values(service).items()
    # Found by the blind index after the rewrap of its key, too.
    assert service.lookup("email", "person7@example.com", caller=CALLER).found
    service.close()


def test_min_decryption_version_disables_old_fields(
    tmp_path: Path, bao: BaoServer, transit_key: str
) -> None:
    service = _service(tmp_path, bao, transit_key)
    ingest_lines(service, _people(3), caller=CALLER, source_name="old")
    key = next(f.canonical_key for batch in service.store.iter_fields() for f in batch)
    service.rotate_keys(caller=CALLER)
    description = service.set_min_decryption_version(2, caller=CALLER, force=True)
    assert [v.state for v in description.versions] == [KeyState.DISABLED, KeyState.ACTIVE]
    with pytest.raises(KeyVersionDisabled):
        service.decrypt(key, reason="test:floor", caller=CALLER)
    service.close()


def test_batch_reports_each_bad_item_against_its_own_field(
    bao: BaoServer, transit_key: str
) -> None:
    provider = _provider(bao, transit_key, batch_size=50)
    items: list[tuple[WrappedKey, bytes]] = []
    for index in range(120):
        ad = f"ad-{index}".encode()
        items.append((provider.generate_data_key(ad).wrapped, ad))
    wrapped, ad = items[7]
    items[7] = (wrapped, b"someone else's context")
    items[60] = (WrappedKey(wrapped.key_identifier, 1, b"vault:v1:AAAA"), ad)
    items[99] = (WrappedKey(f"transit/{transit_key}-v9", 9, wrapped.ciphertext), ad)
    results = provider.unwrap_many(items)
    assert isinstance(results[7], DecryptionFailed)
    assert isinstance(results[60], DecryptionFailed)
    assert isinstance(results[99], KeyNotFound)
    good = [r for i, r in enumerate(results) if i not in {7, 60, 99}]
    assert len(good) == 117 and all(len(r) == 32 for r in good)  # type: ignore[arg-type]


def test_rewrap_of_many_keys_respects_the_request_limit(bao: BaoServer, transit_key: str) -> None:
    provider = _provider(bao, transit_key)
    assert provider.settings.batch_size == MAX_BATCH_SIZE  # the default: the largest accepted
    items = [(provider.generate_data_key(b"x").wrapped, b"x") for _ in range(10)] * 200
    provider.rotate()
    calls = provider.transport.calls
    results = provider.rewrap_many(items)  # 2,000 items: 8,000 JSON strings in all
    assert all(isinstance(r, WrappedKey) and r.key_version == 2 for r in results)
    assert provider.transport.calls - calls == 9  # 8 chunks of 240 items and one of 80


def test_encrypt_and_decrypt_batches_of_the_largest_size_are_accepted(
    bao: BaoServer, transit_key: str
) -> None:
    provider = _provider(bao, transit_key)
    values = [f"value-{n:04d}".encode() for n in range(2 * MAX_BATCH_SIZE)]
    calls = provider.transport.calls
    sealed = provider.encrypt_values([(SecretBytes(v), b"ctx") for v in values])
    keys = [w for w in sealed if isinstance(w, DirectCiphertext)]
    assert len(keys) == len(values)
    opened = provider.decrypt_values([(key, b"ctx") for key in keys])
    assert [bytes(o.view()) if isinstance(o, SecretBytes) else o for o in opened] == values
    assert provider.transport.calls - calls == 4  # two full chunks each way


def _login(server: BaoServer, role: str, approle_mount: str) -> tuple[str, str]:
    client = server.client()
    role_id = client.read(f"auth/{approle_mount}/role/{role}/role-id")["data"]["role_id"]
    secret_id = client.write(f"auth/{approle_mount}/role/{role}/secret-id")["data"]["secret_id"]
    return str(role_id), str(secret_id)


@pytest.fixture
def roles(bao: BaoServer) -> Iterator[tuple[str, str]]:
    """A bootstrapped key with its four role policies and AppRole roles."""
    key = f"roles-{os.urandom(4).hex()}"
    approle = f"approle-{os.urandom(4).hex()}"
    bootstrap(bao.client(), key_name=key, approle_mount=approle)
    yield key, approle
    bao.client().sys.disable_auth_method(approle)


def _role_provider(server: BaoServer, key: str, approle: str, role: str) -> VaultTransit:
    role_id, secret_id = _login(server, role, approle)
    settings = VaultSettings(
        addresses=(server.addr,),
        key_name=key,
        auth=VaultAuthMethod.APPROLE,
        role_id=role_id,
        secret_id=secret_id,
        approle_mount=approle,
    )
    return VaultTransit(settings)


def test_worker_token_is_denied_encrypt_and_rotate(bao: BaoServer, roles: tuple[str, str]) -> None:
    key, approle = roles
    app = _role_provider(bao, key, approle, "heimdall-app")
    worker = _role_provider(bao, key, approle, "heimdall-worker")
    data_key = app.generate_data_key(b"ctx")
    with worker.unwrap(data_key.wrapped, b"ctx") as plaintext:
        assert bytes(plaintext.view()) == bytes(data_key.plaintext.view())
    with pytest.raises(AccessDenied):
        worker.generate_data_key(b"ctx")
    with pytest.raises(AccessDenied):
        worker.wrap(data_key.plaintext, b"ctx")
    with pytest.raises(AccessDenied):
        worker.transport.call("POST", f"transit/keys/{key}/rotate", {}, idempotent=False)
    with pytest.raises(AccessDenied):
        app.transport.call("POST", f"transit/keys/{key}/rotate", {}, idempotent=False)


@pytest.mark.parametrize(
    "role", ["heimdall-app", "heimdall-worker", "heimdall-admin", "heimdall-audit"]
)
def test_every_role_is_denied_key_export(bao: BaoServer, roles: tuple[str, str], role: str) -> None:
    key, approle = roles
    provider = _role_provider(bao, key, approle, role)
    for path in (f"transit/export/encryption-key/{key}", f"transit/backup/{key}"):
        with pytest.raises(AccessDenied):
            provider.transport.call("GET", path)


def test_approle_logs_in_again_after_its_token_is_revoked(
    bao: BaoServer, roles: tuple[str, str]
) -> None:
    key, approle = roles
    app = _role_provider(bao, key, approle, "heimdall-app")
    app.describe()
    token = app.transport._token
    assert token
    bao.client().write("auth/token/revoke", token=token)
    assert app.describe().latest_version == 1
    assert app.transport._token != token


def test_role_credentials_from_files(
    tmp_path: Path, bao: BaoServer, roles: tuple[str, str]
) -> None:
    key, approle = roles
    role_id, secret_id = _login(bao, "heimdall-app", approle)
    (tmp_path / "role-id").write_text(role_id)
    (tmp_path / "secret-id").write_text(secret_id + "\n")
    settings = VaultSettings(
        addresses=(bao.addr,),
        key_name=key,
        auth=VaultAuthMethod.APPROLE,
        role_id_file=tmp_path / "role-id",
        secret_id_file=tmp_path / "secret-id",
        approle_mount=approle,
    )
    provider = VaultTransit(settings)
    assert provider.describe().latest_version == 1
    assert secret_id not in repr(settings) and secret_id not in repr(provider)


def test_kubernetes_auth_logs_in_with_the_service_account_token(
    bao: BaoServer, roles: tuple[str, str], k8s_auth: K8sAuth
) -> None:
    key, _ = roles
    k8s_auth.set_policies(["heimdall-app"])
    settings = VaultSettings(
        addresses=(bao.addr,),
        key_name=key,
        auth=VaultAuthMethod.KUBERNETES,
        kubernetes_role=k8s_auth.role,
        kubernetes_jwt_path=k8s_auth.jwt_path,
        kubernetes_mount=k8s_auth.mount,
    )
    provider = VaultTransit(settings)
    data_key = provider.generate_data_key(b"ctx")
    assert data_key.wrapped.key_version == 1
    assert k8s_auth.jwt in k8s_auth.reviews  # OpenBao asked the TokenReview stand-in
    with pytest.raises(AccessDenied):
        provider.transport.call("POST", f"transit/keys/{key}/rotate", {}, idempotent=False)


def test_tokens_never_appear_in_errors_or_reprs(bao: BaoServer, transit_key: str) -> None:
    provider = _provider(bao, transit_key)
    wrong = VaultTransit(
        VaultSettings(addresses=(bao.addr,), token="s.not-a-real-token", key_name=transit_key)
    )
    with pytest.raises(AccessDenied) as caught:
        wrong.describe()
    for text in (str(caught.value), repr(caught.value), repr(wrong), repr(provider)):
        assert bao.root_token not in text and "s.not-a-real-token" not in text


def test_unreachable_vault_is_retryable_unavailable(transit_key: str) -> None:
    settings = VaultSettings(
        addresses=("http://127.0.0.1:9", "http://127.0.0.1:1"),
        token="t",
        key_name=transit_key,
        attempts=2,
        backoff_seconds=0.01,
        timeout=1,
    )
    with pytest.raises(KmsUnavailable) as caught:
        VaultTransit(settings).describe()
    assert caught.value.retryable


def test_every_call_is_reported_to_the_observer_once(bao: BaoServer, transit_key: str) -> None:
    reports: list[tuple[str, str, str]] = []

    def observe(provider: str, operation: str, result: str, seconds: float) -> None:
        assert seconds >= 0
        reports.append((provider, operation, result))

    settings = VaultSettings(addresses=(bao.addr,), token=bao.root_token, key_name=transit_key)
    VaultTransit(settings, observer=observe).describe()
    assert reports == [("vault", "describe", "success")]
    unreachable = VaultSettings(
        addresses=("http://127.0.0.1:9",), token="t", key_name=transit_key, attempts=2, timeout=1
    )
    with pytest.raises(KmsUnavailable):
        VaultTransit(unreachable, observer=observe).describe()
    assert reports[1:] == [("vault", "describe", "unavailable")]  # once, for both attempts


@pytest.mark.parametrize("no_proxy", ["", "127.0.0.1"])
def test_the_environments_proxy_settings_still_apply(
    bao: BaoServer, transit_key: str, monkeypatch: pytest.MonkeyPatch, no_proxy: str
) -> None:
    # The proxy is a closed loopback port: going through it fails, bypassing it works.
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, no_proxy)
    provider = _provider(bao, transit_key, attempts=1, timeout=2)
    if no_proxy:
        assert provider.describe().latest_version >= 1
    else:
        with pytest.raises(KmsUnavailable):
            provider.describe()


def _wrapped_keys(provider: VaultTransit, count: int) -> list[tuple[WrappedKey, bytes]]:
    """*count* data keys from Transit, each wrapped under associated data of its own."""
    ads = [f"dek-{n}".encode() for n in range(count)]
    return [(provider.generate_data_key(ad).wrapped, ad) for ad in ads]


def test_threads_sharing_a_provider_reuse_connections_without_warnings(
    bao: BaoServer, transit_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    provider = _provider(bao, transit_key, batch_size=10, concurrency=8)
    items = _wrapped_keys(provider, 80)
    provider.rotate()
    with caplog.at_level(logging.WARNING), ThreadPoolExecutor(3) as pool:
        results = list(pool.map(provider.rewrap_many, [items] * 3))  # 24 requests at once
    assert all(isinstance(r, WrappedKey) and r.key_version == 2 for rs in results for r in rs)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")] == []


def _rewrap_in_child(provider: VaultTransit, items: list[tuple[WrappedKey, bytes]]) -> None:
    parents = provider.transport._pools[0]
    results = provider.rewrap_many(items)
    if provider.transport._pools[0] is parents:
        os._exit(2)  # the parent's connections: two processes on one socket
    os._exit(0 if all(isinstance(r, WrappedKey) for r in results) else 1)


def test_a_forked_child_sends_batches_on_threads_and_connections_of_its_own(
    bao: BaoServer, transit_key: str
) -> None:
    provider = _provider(bao, transit_key, batch_size=5, concurrency=4)
    items = _wrapped_keys(provider, 20)
    assert len(provider.rewrap_many(items)) == 20  # the parent's sender threads exist now
    child = multiprocessing.get_context("fork").Process(
        target=_rewrap_in_child, args=(provider, items)
    )
    child.start()
    child.join(timeout=30)
    hung = child.exitcode is None
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0


class _NotVault(BaseHTTPRequestHandler):
    """Answers every request 200 with a page, as a captive portal or a misrouted proxy does."""

    def do_GET(self) -> None:
        body = b"<html>sign in to continue</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_an_answer_that_is_not_json_is_a_kms_error() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotVault)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = f"http://127.0.0.1:{server.server_address[1]}"
        provider = VaultTransit(VaultSettings(addresses=(address,), token="t", key_name="k"))
        with pytest.raises(KmsError, match="without a JSON object"):
            provider.describe()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[BaoServer]:
    """A dev server on https, its certificate from a CA of its own (``ca_file``)."""
    server = start_dev_server(require_bao_binary(), tmp_path / "https", with_audit=False, tls=True)
    try:
        assert server.api("POST", "sys/mounts/transit", {"type": "transit"})[0] == 204
        key = {"type": "aes256-gcm96", "derived": True}
        assert server.api("POST", "transit/keys/heimdall-pii", key)[0] in (200, 204)
        yield server
    finally:
        server.stop()


def test_https_is_verified_against_the_configured_ca(https_server: BaoServer) -> None:
    assert https_server.addr.startswith("https://") and https_server.ca_file is not None
    trusting = _provider(https_server, "heimdall-pii", verify=str(https_server.ca_file))
    cipher = FieldCipher(trusting, EncryptionVersion.KMS_V1, direct=True)
    sealed = cipher.encrypt(b"alice@example.com", CTX)
    assert cipher.decrypt(sealed.envelope, CTX) == b"alice@example.com"
    # The system's trust store does not know the server's CA: refused, naming TLS.
    untrusting = _provider(https_server, "heimdall-pii", attempts=1)
    with pytest.raises(KmsUnavailable, match="SSLError") as caught:
        untrusting.describe()
    assert https_server.root_token not in str(caught.value)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[BaoServer]:
    binary = require_bao_binary()
    server = start_dev_server(binary, tmp_path / "own", with_audit=False)
    try:
        client = server.client()
        client.sys.enable_secrets_engine("transit")
        client.write("transit/keys/heimdall-pii", type="aes256-gcm96", derived=True)
        yield server
    finally:
        server.stop()


def test_server_stopped_mid_batch_is_unavailable_and_writes_nothing(
    tmp_path: Path, own_server: BaoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _service(
        tmp_path,
        own_server,
        "heimdall-pii",
        dek_max_uses=1,  # a data key per field, so the rewrap needs several chunks
        batch_size=20,
        concurrency=1,
        attempts=2,
        backoff_seconds=0.01,
    )
    ingest_lines(service, _people(40), caller=CALLER, source_name="x")
    service.rotate_keys(caller=CALLER)
    provider = service.kms
    assert isinstance(provider, VaultTransit)
    stored = {f.canonical_key: f.encrypted_data for b in service.store.iter_fields() for f in b}
    transport = provider.transport
    original = transport.call
    seen = []

    def call_then_die(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if "rewrap" in args[1]:
            seen.append(args[1])
            if len(seen) == 2:
                own_server.kill()  # the server dies between two chunks of one batch
        return original(*args, **kwargs)

    monkeypatch.setattr(transport, "call", call_then_die)
    with pytest.raises(KmsUnavailable):
        reencrypt(service, caller=CALLER, batch_size=500)
    after = {f.canonical_key: f.encrypted_data for b in service.store.iter_fields() for f in b}
    assert after == stored  # not one field half-updated
    service.close()


def test_unwrap_fails_over_when_the_raft_leader_dies(bao_cluster: BaoCluster) -> None:
    leader = bao_cluster.leader()
    others = [n for n in bao_cluster.nodes if n is not leader]
    settings = VaultSettings(
        addresses=(leader.addr, *(n.addr for n in others)),
        token=bao_cluster.root_token,
        key_name="heimdall-pii",
        backoff_seconds=0.2,
        attempts=6,
    )
    provider = VaultTransit(settings)
    cipher = FieldCipher(provider, EncryptionVersion.KMS_V1, CachePolicy(max_uses=1))
    envelopes = [cipher.encrypt(f"v{i}".encode(), CTX).envelope for i in range(5)]
    leader.kill()
    bao_cluster.wait_for_leader(exclude=leader)
    reader = FieldCipher(provider, EncryptionVersion.KMS_V1)
    assert [reader.decrypt(e, CTX) for e in envelopes] == [f"v{i}".encode() for i in range(5)]
    assert provider.transport.failovers >= 1
    assert provider.transport.active_address != leader.addr


def test_vault_audit_log_holds_none_of_the_plaintexts(
    tmp_path: Path, bao: BaoServer, transit_key: str
) -> None:
    assert bao.audit_log is not None
    values = [f"secret-value-{os.urandom(6).hex()}@example.com" for _ in range(5)]
    for direct in (False, True):
        cipher = FieldCipher(_provider(bao, transit_key), EncryptionVersion.KMS_V1, direct=direct)
        for value in values:
            assert cipher.decrypt(cipher.encrypt(value.encode(), CTX).envelope, CTX)
    audit = bao.audit_log.read_text()
    assert transit_key in audit  # the requests were logged...
    for value in values:  # ...with their values HMACed
        assert value not in audit
        assert base64.b64encode(value.encode()).decode() not in audit


class _FlakyRotation:
    """A transport whose rotate request fails mid-request; the rotation may or may not land."""

    def __init__(self, lands: bool) -> None:
        self.latest = 1
        self.lands = lands
        self.rotations = 0

    def call(self, method: str, path: str, body: Any = None, **_: Any) -> dict[str, Any]:
        if path.endswith("/rotate"):
            self.rotations += 1
            if self.lands:
                self.latest += 1
            raise KmsUnavailable("vault connection failed mid-request")
        keys = {str(v): 1_700_000_000 for v in range(1, self.latest + 1)}
        return {"data": {"derived": True, "latest_version": self.latest, "keys": keys}}


@pytest.mark.parametrize("lands", [True, False])
def test_rotate_is_never_retried_blindly(lands: bool) -> None:
    transport = _FlakyRotation(lands)
    provider = VaultTransit(
        VaultSettings(addresses=("http://127.0.0.1:1",), token="t"),
        transport=transport,  # type: ignore[arg-type]
    )
    if lands:
        assert provider.rotate().latest_version == 2  # it happened: reported, not repeated
    else:
        with pytest.raises(KmsUnavailable):
            provider.rotate()
    assert transport.rotations == 1


def test_a_rotate_that_fails_mid_request_is_not_resent_to_another_node(
    bao: BaoServer, transit_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = VaultTransit(
        VaultSettings(addresses=(bao.addr, bao.addr), token=bao.root_token, key_name=transit_key)
    )
    sent: list[str] = []
    pool = provider.transport._pools[0]
    original = pool.urlopen

    def reset_after_sending(method: str, url: str, **kwargs: Any) -> Any:
        sent.append(url)
        if url.endswith("/rotate"):
            original(method, url, **kwargs)  # the server rotates...
            # ...and the answer never arrives.
            raise urllib3.exceptions.ProtocolError(
                "Connection aborted.", ConnectionResetError("connection reset by peer")
            )
        return original(method, url, **kwargs)

    monkeypatch.setattr(pool, "urlopen", reset_after_sending)
    description = provider.rotate()
    assert description.latest_version == 2  # rotated exactly once
    assert sum(url.endswith("/rotate") for url in sent) == 1


def test_pattern_b_values_decrypt_in_batches_with_per_item_errors(
    bao: BaoServer, transit_key: str
) -> None:
    provider = _provider(bao, transit_key, batch_size=40)
    cipher = FieldCipher(provider, EncryptionVersion.KMS_V1, direct=True)
    contexts = [
        EncryptionContext("FieldValue", f"email:hash:{i:064x}", "email") for i in range(100)
    ]
    sealed = cipher.encrypt_many([(f"v{i}".encode(), c) for i, c in enumerate(contexts)])
    items = [(s.envelope, c) for s, c in zip(sealed, contexts, strict=True)]
    items[5] = (items[5][0], contexts[6])  # moved to another node
    calls = provider.transport.calls
    results = cipher.decrypt_many(items)
    assert provider.transport.calls - calls == 3  # 100 values in chunks of 40
    assert isinstance(results[5], DecryptionFailed)
    assert [r for i, r in enumerate(results) if i != 5] == [
        f"v{i}".encode() for i in range(100) if i != 5
    ]


class TestVaultTransitContract(KmsContract, AccessControlContract):
    @pytest.fixture
    def provider(self, bao: BaoServer, transit_key: str) -> VaultTransit:
        return _provider(bao, transit_key)

    @pytest.fixture
    def unreachable(self, transit_key: str) -> VaultTransit:
        settings = VaultSettings(
            addresses=("http://127.0.0.1:9",),
            token="s.unreachable",
            key_name=transit_key,
            attempts=1,
            timeout=1,
        )
        return VaultTransit(settings)

    @pytest.fixture
    def denied(self, bao: BaoServer, transit_key: str) -> VaultTransit:
        """A token that may only decrypt with the key (heimdall-worker's grant)."""
        client = bao.client()
        name = f"decrypt-only-{transit_key}"
        client.sys.create_or_update_policy(
            name, f'path "transit/decrypt/{transit_key}" {{ capabilities = ["update"] }}'
        )
        token = client.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"]
        settings = VaultSettings(addresses=(bao.addr,), token=token, key_name=transit_key)
        return VaultTransit(settings)

    @pytest.fixture
    def secrets(self, bao: BaoServer) -> list[str]:
        return [bao.root_token, "s.unreachable"]
