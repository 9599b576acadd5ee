"""Who may call what: every endpoint of ``heimdall serve`` against every kind of credential.

spec: Access Control Model (Role-Based Access); Audit Log Requirements (Access Denied Events).
One real server (a subprocess on a free loopback port) with OIDC against a JWKS served here, a
role map on a ``groups`` claim, and service tokens made with the CLI. The expected status of
each (endpoint, credential) pair is derived from :data:`heimdall.rbac.ROLE_PERMISSIONS` and the
table of the permissions each endpoint needs, so a change in either shows here: 401 for no or
bad credentials, 403 for a role without the permission, the endpoint's success otherwise; and
every refusal is in the audit trail as ``access.denied``, with no token anywhere.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import shutil
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from api_server import (
    LOOPBACK,
    ApiServer,
    Issuer,
    audit_records,
    oidc_env,
    rsa_key,
    running_issuer,
    start_server,
)
from heimdall.blind_index import META_KEY, StoredIndexKey
from heimdall.envelope import parse, wrap_associated_data
from heimdall.kms.base import WrappedKey
from heimdall.kms.local import LocalKeyring
from heimdall.rbac import ROLE_PERMISSIONS, Permission, Role

GROUP_OF = {
    Role.APP: "pii-app",
    Role.WORKER: "pii-workers",
    Role.ADMIN: "pii-admins",
    Role.AUDIT: "auditors",
}
ROLE_MAP = ",".join(f"{group}={role.value}" for role, group in GROUP_OF.items())
UNKNOWN_KEY = "email:hash:" + "0" * 64
ANY_ROLE: frozenset[Permission] = frozenset()  # authenticated, whatever the role


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    needs: frozenset[Permission] | None  # None: no credentials needed at all
    body: dict[str, Any] | None = None
    prepare: str | None = None  # a job state the request needs: running, paused, active

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"


def _needs(*permissions: Permission) -> frozenset[Permission]:
    return frozenset(permissions)


ENDPOINTS = (
    Endpoint("GET", "/healthz", None),
    Endpoint("GET", "/readyz", ANY_ROLE),
    Endpoint("GET", "/metrics", ANY_ROLE),
    Endpoint("GET", "/openapi.json", ANY_ROLE),
    Endpoint(
        "POST", "/v1/records", _needs(Permission.ENCRYPT), {"records": [{"email": "m@example.com"}]}
    ),
    Endpoint(
        "POST",
        "/v1/lookup",
        _needs(Permission.LOOKUP),
        {"field": "email", "value": "m@example.com"},
    ),
    Endpoint(
        "POST",
        "/v1/decrypt",
        _needs(Permission.DECRYPT),
        {"keys": [UNKNOWN_KEY], "reason": "matrix"},
    ),
    Endpoint("GET", "/admin/keys", _needs(Permission.READ_KEYS)),
    Endpoint("POST", "/admin/keys/rotate", _needs(Permission.ROTATE)),
    Endpoint(
        "POST",
        "/admin/keys/retire",
        _needs(Permission.CONFIGURE_KEYS),
        {"version": 1, "force": True},
    ),
    Endpoint(
        "POST",
        "/admin/keys/disable",
        _needs(Permission.CONFIGURE_KEYS),
        {"version": 1, "force": True},
    ),
    Endpoint(
        "POST",
        "/admin/keys/set-min-decryption-version",
        _needs(Permission.CONFIGURE_KEYS),
        {"version": 1, "force": True},
    ),
    Endpoint("POST", "/admin/crypto/reencrypt", _needs(Permission.REENCRYPT), {"dry_run": True}),
    Endpoint("GET", "/admin/crypto/reencrypt/status", _needs(Permission.READ_STATUS)),
    Endpoint(
        "POST", "/admin/crypto/reencrypt/pause", _needs(Permission.REENCRYPT), prepare="running"
    ),
    Endpoint(
        "POST", "/admin/crypto/reencrypt/resume", _needs(Permission.REENCRYPT), prepare="paused"
    ),
    Endpoint(
        "POST", "/admin/crypto/reencrypt/cancel", _needs(Permission.REENCRYPT), prepare="active"
    ),
    Endpoint("GET", "/admin/migration", _needs(Permission.READ_STATUS)),
    Endpoint(
        "POST",
        "/admin/migration/start",
        _needs(Permission.CONFIGURE_KEYS, Permission.REENCRYPT),
    ),
    Endpoint("POST", "/admin/migration/verify", _needs(Permission.READ_STATUS), {"sample": 0}),
    Endpoint("POST", "/admin/migration/enforce", _needs(Permission.CONFIGURE_KEYS), {"sample": 0}),
    Endpoint(
        "POST", "/admin/migration/rollback", _needs(Permission.CONFIGURE_KEYS), {"to": "hybrid"}
    ),
    Endpoint("GET", "/admin/audit?limit=1", _needs(Permission.READ_AUDIT)),
    Endpoint("GET", "/admin/audit/verify", _needs(Permission.READ_AUDIT)),
)

BAD_CREDENTIALS = (
    "anonymous",
    "expired",
    "wrong-audience",
    "wrong-issuer",
    "bad-signature",
    "alg-none",
    "hs256-confusion",
    "revoked-service-token",
)
ROLE_CREDENTIALS = tuple(f"oidc:{role.value}" for role in Role) + tuple(
    f"service-token:{role.value}" for role in Role
)


@dataclass
class Setup:
    server: ApiServer
    issuer: Issuer
    credentials: dict[str, str | None] = field(default_factory=dict)
    admin: str = ""
    app: str = ""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with running_issuer() as issuer:
        env = oidc_env(
            issuer,
            HMD_OIDC_ROLES_CLAIM="groups",
            HMD_OIDC_ROLE_MAP=ROLE_MAP,
            # For the migration endpoints, which build a hybrid service as the CLI does.
            HMD_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
            # The local CLI's role and actor: the API must take neither.
            HMD_ROLE=Role.ADMIN.value,
            HMD_ACTOR="cli:spoofed",
        )
        server = start_server(tmp_path_factory.mktemp("api-access"), env)
        try:
            yield _credentials(Setup(server, issuer))
        finally:
            server.stop()


def _credentials(setup: Setup) -> Setup:
    issuer, server = setup.issuer, setup.server
    admin_groups = [GROUP_OF[Role.ADMIN], "staff"]
    impostor = rsa_key("rsa-1")  # same kid, another key: the signature cannot verify
    revoked = server.service_token(Role.ADMIN.value, "revoked-admin")
    assert server.cli("tokens", "revoke", "revoked-admin").returncode == 0
    creds: dict[str, str | None] = {
        "anonymous": None,
        "expired": issuer.token(lifetime=-120, groups=admin_groups),
        "wrong-audience": issuer.token(aud="another-api", groups=admin_groups),
        "wrong-issuer": issuer.token(iss="https://evil.test/", groups=admin_groups),
        "bad-signature": issuer.token(key=impostor, groups=admin_groups),
        "alg-none": issuer.unsigned(groups=admin_groups),
        "hs256-confusion": issuer.forged_hs256(groups=admin_groups),
        "revoked-service-token": revoked,
    }
    for index, role in enumerate(Role):
        kid = "rsa-1" if index % 2 == 0 else "ec-1"
        creds[f"oidc:{role.value}"] = issuer.token(
            kid=kid,
            email=f"{role.value}@example.com",
            email_verified=True,
            groups=[GROUP_OF[role], "staff"],
        )
        creds[f"service-token:{role.value}"] = server.service_token(role.value, f"svc-{role.value}")
    setup.credentials = creds
    setup.admin = str(creds[f"service-token:{Role.ADMIN.value}"])
    setup.app = str(creds[f"service-token:{Role.APP.value}"])
    with server.client(setup.app) as app:
        records = [{"email": f"seed-{n}@example.com", "name": f"Seed {n}"} for n in range(5)]
        assert app.post("/v1/records", json={"records": records}).status_code == 200
    with server.client(setup.admin) as admin:
        assert admin.post("/admin/keys/rotate").status_code == 200
        assert admin.post("/admin/crypto/reencrypt").status_code == 200
    return setup


def _ensure_job(admin: httpx.Client, state: str) -> None:
    """An active job in *state* (running, paused; active: either), made through the API."""
    status = admin.get("/admin/crypto/reencrypt/status").json()
    if status.get("state") not in ("running", "paused"):
        assert admin.post("/admin/keys/rotate").status_code == 200
        status = admin.post("/admin/crypto/reencrypt").json()
        assert status["state"] == "running", status
    if state == "paused" and status["state"] == "running":
        assert admin.post("/admin/crypto/reencrypt/pause").status_code == 200
    if state == "running" and status["state"] == "paused":
        assert admin.post("/admin/crypto/reencrypt/resume").status_code == 200


def _expected(endpoint: Endpoint, credential: str) -> int:
    if endpoint.needs is None:
        return 200
    if credential in BAD_CREDENTIALS:
        return 401
    role = Role(credential.split(":", 1)[1])
    return 200 if endpoint.needs <= ROLE_PERMISSIONS[role] else 403


def _actor(credential: str) -> str:
    kind, _, role = credential.partition(":")
    if kind == "oidc":
        return f"oidc:{role}@example.com"
    if kind == "service-token":
        return f"token:svc-{role}"
    if credential == "revoked-service-token":
        return "token:revoked-admin"
    return "anonymous"


@pytest.mark.parametrize("credential", BAD_CREDENTIALS + ROLE_CREDENTIALS)
def test_every_endpoint_answers_each_credential_as_the_role_table_says(
    setup: Setup, credential: str
) -> None:
    server, token = setup.server, setup.credentials[credential]
    denied: dict[str, int] = {}
    wrong: list[str] = []
    with server.client(token) as client, server.client(setup.admin) as admin:
        for endpoint in ENDPOINTS:
            if endpoint.prepare:
                _ensure_job(admin, endpoint.prepare)
            request_id = f"matrix-{uuid.uuid4().hex}"
            response = client.request(
                endpoint.method,
                endpoint.path,
                json=endpoint.body,
                headers={"X-Request-ID": request_id},
            )
            expected = _expected(endpoint, credential)
            if response.status_code != expected:
                wrong.append(f"{endpoint.name}: {response.status_code} (expected {expected})")
                continue
            assert response.headers["x-request-id"] == request_id
            if token:
                assert token not in response.text
            if expected in (401, 403):
                body = response.json()
                assert set(body) == {"error"}, body
                assert body["error"]["code"] == (
                    "unauthenticated" if expected == 401 else "forbidden"
                )
                denied[request_id] = expected
            if expected == 401:
                assert response.headers["www-authenticate"].startswith("Bearer")
    assert wrong == []
    # Every refusal is audited, with the actor when known, the operation, a reason, the source.
    events = {
        event["request_id"]: event
        for event in audit_records(server.audit_log)
        if event["event_type"] == "access.denied" and event.get("request_id") in denied
    }
    assert sorted(events) == sorted(denied)
    for event in events.values():
        assert event["result"] == "denied"
        assert event["actor"] == _actor(credential)
        assert event["source_ip"] == "127.0.0.1"
        assert event["operation"] and event["reason"]
    if token:
        assert token not in server.audit_log.read_text()


def test_the_servers_hmd_role_and_actor_grant_nothing(setup: Setup) -> None:
    """The server runs with HMD_ROLE=heimdall-admin and HMD_ACTOR set: neither reaches a
    caller, whose role comes from its token only."""
    server = setup.server
    assert server.env["HMD_ROLE"] == Role.ADMIN.value
    with server.client() as anonymous:
        assert anonymous.get("/admin/keys").status_code == 401
        assert anonymous.post("/admin/keys/rotate").status_code == 401
    with server.client(setup.credentials[f"oidc:{Role.AUDIT.value}"]) as auditor:
        refused = auditor.post("/admin/keys/rotate", headers={"X-Request-ID": "role-check-1"})
        assert refused.status_code == 403
        assert refused.json()["error"]["message"] == "role heimdall-audit may not rotate"
    events = [e for e in audit_records(server.audit_log) if e.get("request_id") == "role-check-1"]
    assert [(e["event_type"], e["actor"]) for e in events] == [
        ("access.denied", "oidc:heimdall-audit@example.com")
    ]


def test_a_service_token_revoked_while_the_server_runs_is_refused_on_its_next_request(
    setup: Setup,
) -> None:
    server = setup.server
    token = server.service_token(Role.APP.value, "to-revoke")
    with server.client(token) as client:
        assert client.get("/admin/keys").status_code == 200
        revoked = server.cli("tokens", "revoke", "to-revoke")
        assert revoked.returncode == 0, revoked.stderr
        refused = client.get("/admin/keys", headers={"X-Request-ID": "after-revoke"})
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == (
        "authentication required: the service token is revoked"
    )
    (event,) = [e for e in audit_records(server.audit_log) if e.get("request_id") == "after-revoke"]
    assert (event["event_type"], event["actor"]) == ("access.denied", "token:to-revoke")
    assert token not in server.audit_log.read_text()


def test_a_token_sent_in_the_url_never_reaches_the_server_log(setup: Setup) -> None:
    token = setup.admin
    request_id = f"url-token-{uuid.uuid4().hex}"
    with setup.server.client() as anonymous:
        in_query = anonymous.get(
            "/readyz", params={"access_token": token}, headers={"X-Request-ID": request_id}
        )
        in_path = anonymous.get(f"/{token}")
    with socket.create_connection((LOOPBACK, int(setup.server.url.rsplit(":", 1)[1]))) as raw:
        raw.sendall(f"{token} /healthz HTTP/1.1\r\nHost: heimdall\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 ")  # a token sent as the method
    assert (in_query.status_code, in_path.status_code) == (401, 404)
    deadline = time.monotonic() + 5
    while request_id not in setup.server.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    logs = setup.server.logs()
    assert f'"GET /readyz" 401 {request_id}' in logs  # the access line, by the route
    assert '"GET (no such route)" 404' in logs
    assert token not in logs and token[4:20] not in logs


@pytest.mark.parametrize("first", ["app", "admin"])
def test_a_request_with_two_authorization_headers_is_refused(setup: Setup, first: str) -> None:
    tokens = [setup.app, setup.admin] if first == "app" else [setup.admin, setup.app]
    request_id = f"two-headers-{uuid.uuid4().hex}"
    headers = [("Authorization", f"Bearer {token}") for token in tokens]
    with httpx.Client(base_url=setup.server.url, trust_env=False) as client:
        refused = client.get(
            "/admin/keys", headers=[*headers, ("X-Request-ID", request_id)], timeout=30
        )
    assert refused.status_code == 401
    reason = "the request has more than one Authorization header"
    assert refused.json()["error"]["message"] == f"authentication required: {reason}"
    (event,) = [
        e for e in audit_records(setup.server.audit_log) if e.get("request_id") == request_id
    ]
    assert (event["event_type"], event["actor"], event["reason"]) == (
        "access.denied",
        "anonymous",
        reason,
    )


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (
            ["pii-admins", "pii-app"],
            "the identity holds several heimdall roles (heimdall-admin, heimdall-app); "
            "a token must carry exactly one",
        ),
        (["staff"], "the identity holds no heimdall role"),
        ([], "the identity holds no heimdall role"),
    ],
)
def test_an_identity_must_map_to_exactly_one_role(
    setup: Setup, groups: list[str], message: str
) -> None:
    token = setup.issuer.token(email="two-hats@example.com", email_verified=True, groups=groups)
    request_id = f"roles-{uuid.uuid4().hex}"
    with setup.server.client(token) as client:
        refused = client.get("/admin/keys", headers={"X-Request-ID": request_id})
    assert refused.status_code == 403
    assert refused.json()["error"]["message"] == message
    (event,) = [
        e for e in audit_records(setup.server.audit_log) if e.get("request_id") == request_id
    ]
    assert event["actor"] == "oidc:two-hats@example.com"
    assert event["reason"] == message


def test_the_actor_is_the_subject_when_the_email_is_not_verified(setup: Setup) -> None:
    token = setup.issuer.token(
        sub="subject-42", email="ceo@example.com", email_verified=False, groups=["pii-app"]
    )
    with setup.server.client(token) as client:
        lookup = client.post(
            "/v1/lookup",
            json={"field": "email", "value": "seed-1@example.com"},
            headers={"X-Request-ID": "actor-check"},
        )
    assert lookup.status_code == 200
    (event,) = [
        e for e in audit_records(setup.server.audit_log) if e.get("request_id") == "actor-check"
    ]
    assert (event["event_type"], event["actor"]) == ("index.lookup", "oidc:subject-42")


def test_a_key_the_issuer_adds_is_fetched_for_its_unknown_kid(setup: Setup) -> None:
    issuer = setup.issuer
    added = rsa_key(f"rsa-{uuid.uuid4().hex[:6]}")
    token = issuer.token(key=added, kid=added.kid, groups=["auditors"])
    interval = float(oidc_env(issuer)["HMD_OIDC_JWKS_REFRESH_SECONDS"])
    with setup.server.client(token) as client:
        time.sleep(interval + 0.1)  # no fetch of an earlier test within the interval
        fetches = issuer.fetches
        assert client.get("/readyz").status_code == 401  # not published yet
        assert issuer.fetches == fetches + 1
        issuer.keys.append(added)
        try:
            # At most one fetch per interval, whatever kids tokens name.
            assert client.get("/readyz").status_code == 401
            assert issuer.fetches == fetches + 1
            time.sleep(interval + 0.1)
            assert client.get("/readyz").status_code == 200
            assert issuer.fetches == fetches + 2
            assert client.get("/readyz").status_code == 200
            assert issuer.fetches == fetches + 2  # cached
        finally:
            issuer.keys.remove(added)


def test_the_runbooks_curl_calls_work_as_written(setup: Setup) -> None:
    """spec: Runbook: Re-encryption After Migration, steps 2 and 3, with a bearer token."""
    curl = shutil.which("curl") or "/usr/bin/curl"
    if not os.access(curl, os.X_OK):
        pytest.skip("curl is not installed")
    server = setup.server
    with server.client(setup.admin) as admin:
        assert admin.post("/admin/keys/rotate").status_code == 200  # fields lag: a job to start
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "ADMIN_TOKEN": setup.admin,
        "HEIMDALL": server.url,
    }
    start = subprocess.run(
        [
            "bash",
            "-c",
            'curl -s --noproxy "*" -X POST "$HEIMDALL/admin/crypto/reencrypt" '
            '-H "Authorization: Bearer $ADMIN_TOKEN" '
            '-d \'{"batch_size": 1000, "interval_seconds": 60}\'',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    job = httpx.Response(200, content=start.stdout).json()
    assert job["state"] == "running" and job["kind"] == "rotation", start.stdout
    status = subprocess.run(
        [
            "bash",
            "-c",
            'curl -s --noproxy "*" "$HEIMDALL/admin/crypto/reencrypt/status" '
            '-H "Authorization: Bearer $ADMIN_TOKEN"',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    progress = httpx.Response(200, content=status.stdout).json()
    assert progress["job_id"] == job["job_id"]
    assert progress["total"] == progress["pending"] + progress["completed"] + progress["failed"]


def test_concurrent_requests_are_served_correctly_and_the_trail_stays_intact(
    setup: Setup,
) -> None:
    """16 clients at once, each ingesting and decrypting its own values through the shared
    service (store, cipher cache, audit log): every answer is its own, the chain verifies."""
    server = setup.server
    reader = setup.credentials[f"oidc:{Role.AUDIT.value}"]

    def client_work(number: int) -> list[tuple[str, str]]:
        mismatches = []
        with server.client(setup.app) as client:
            for round_ in range(4):
                email = f"c{number}-r{round_}-{uuid.uuid4().hex[:6]}@example.com"
                stored = client.post("/v1/records", json={"records": [{"email": email}]})
                assert stored.status_code == 200, stored.text
                key = stored.json()["results"][0]["canonical_keys"]["email"]
                answer = client.post("/v1/decrypt", json={"keys": [key], "reason": "load"})
                assert answer.status_code == 200, answer.text
                got = answer.json()["results"][0]["plaintext"]
                if got != email:
                    mismatches.append((email, got))
        return mismatches

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client_work, range(16)))
    assert [m for result in results for m in result] == []
    with server.client(reader) as auditor:
        verified = auditor.get("/admin/audit/verify").json()
    assert verified["ok"] is True, verified


def _data_keys(server: ApiServer) -> dict[str, bytes]:
    """Every data key the server's fields and its blind-index key are wrapped with, unwrapped
    here with the keyring file (read-only)."""
    keyring = LocalKeyring(server.data_dir / "keyring.json", create=False)
    found: dict[str, bytes] = {}
    with sqlite3.connect(f"file:{server.database}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT encrypted_data FROM field_values").fetchall()
        (index_json,) = conn.execute("SELECT value FROM meta WHERE key = ?", (META_KEY,)).fetchone()
    conn.close()
    for (text,) in rows:
        envelope = parse(text)
        ad = wrap_associated_data(
            envelope.encryption_version.value, envelope.algorithm, envelope.dek_id
        )
        wrapped = WrappedKey(envelope.key_identifier, envelope.key_version, envelope.encrypted_dek)
        with keyring.unwrap(wrapped, ad) as key:
            found[f"data key {envelope.dek_id}"] = bytes(key.view())
    stored = StoredIndexKey.from_json(index_json)
    with keyring.unwrap(stored.wrapped, stored.associated_data) as key:
        found["blind-index key"] = bytes(key.view())
    return found


def _forms(secret: bytes) -> list[str]:
    return [
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        secret.hex(),
    ]


def test_no_plaintext_token_or_data_key_reaches_the_logs_or_the_trail(setup: Setup) -> None:
    """After a run that ingests and decrypts known values, with OIDC and service tokens, valid
    and not, through successes and refusals, the server's stdout and stderr and the audit trail
    hold none of the values, none of the tokens and none of the data keys."""
    server, issuer = setup.server, setup.issuer
    marker = uuid.uuid4().hex[:8]
    values = {
        "email": f"leak-{marker}@example.com",
        "name": f"Leaky McLeakface {marker}",
        "phone": "+1 555 0199 " + marker[:2].translate(str.maketrans("abcdef", "123456")),
        "ssn": "078-05-1120",
    }
    oidc_app = issuer.token(kid="ec-1", email=f"leaky-{marker}@example.com", groups=["pii-app"])
    with server.client(oidc_app) as app:
        stored = app.post("/v1/records", json={"records": [values]})
        keys = list(stored.json()["results"][0]["canonical_keys"].values())
        decrypted = app.post("/v1/decrypt", json={"keys": keys, "reason": "leak:check"})
        assert sorted(r["plaintext"] for r in decrypted.json()["results"]) == sorted(
            values.values()
        )
        for value in values.values():
            app.post("/v1/lookup", json={"field": "email", "value": value})  # some refused
            app.post("/v1/decrypt", json={"keys": [value], "reason": "typed a value"})
            app.post("/v1/decrypt", json={"keys": keys, "reason": value + "\n"})
            app.post("/v1/records", json={"records": [values], "source": value})
            app.post("/v1/records", json={"records": [values], value: 1})
            app.post("/v1/decrypt", json={"keys": [keys[0]], "reason": {"x": value}})
    with server.client(setup.app) as service_app:
        assert (
            service_app.post("/v1/decrypt", json={"keys": keys, "reason": "r"}).status_code == 200
        )
    altered = setup.app[:-1] + ("B" if setup.app.endswith("A") else "A")  # never the token itself
    for bad in (issuer.forged_hs256(), issuer.unsigned(), oidc_app + "x", altered):
        with server.client(bad) as client:
            assert client.post("/v1/decrypt", json={"keys": keys, "reason": "r"}).status_code == 401
    tokens = [oidc_app, *(t for t in setup.credentials.values() if t)]
    secrets = {f"value {name}": value for name, value in values.items()}
    secrets.update({f"token {n}": token for n, token in enumerate(tokens)})
    secrets.update(
        {f"signature of token {n}": t.rsplit(".", 1)[-1] for n, t in enumerate(tokens) if "." in t}
    )
    for name, key in _data_keys(server).items():
        secrets.update({f"{name} ({n})": form for n, form in enumerate(_forms(key))})
    places = {
        "server output": server.logs(),
        "audit trail": server.audit_log.read_text(),
        "audit head": server.audit_log.with_name("audit.log.head").read_text(),
    }
    leaks = [
        f"{what} in the {place}"
        for place, text in places.items()
        for what, secret in secrets.items()
        if secret and secret in text
    ]
    assert leaks == []
    assert "Traceback" not in places["server output"]
