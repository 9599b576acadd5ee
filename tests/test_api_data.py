"""The data plane and the admin endpoints of ``heimdall serve``: what they return, how bad input
is refused, and that a refusal writes nothing.

One real server (service tokens only, no OIDC) per module. Bad input must get a 4xx with a JSON
error body that does not repeat what was sent, and leave the store exactly as it was (counted in
the database file itself); a batch's bad item is an error of its own, not of the batch.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest

from api_server import ApiServer, audit_records, start_server
from heimdall.rbac import Role

UNKNOWN_KEY = "email:hash:" + "f" * 64
SECRET_MARKER = "marker-4c1f9e@example.com"


@dataclass
class Setup:
    server: ApiServer
    app: str
    admin: str
    auditor: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    server = start_server(tmp_path_factory.mktemp("api-data"), {})
    try:
        yield Setup(
            server,
            app=server.service_token(Role.APP.value, "app"),
            admin=server.service_token(Role.ADMIN.value, "admin"),
            auditor=server.service_token(Role.AUDIT.value, "auditor"),
        )
    finally:
        server.stop()


def _counts(server: ApiServer) -> tuple[int, int, int]:
    """FieldValues, sightings and records in the database file, read-only."""
    with sqlite3.connect(f"file:{server.database}?mode=ro", uri=True) as conn:
        counted = tuple(
            int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: S608
            for table in ("field_values", "sightings", "records")
        )
    conn.close()
    return counted  # type: ignore[return-value]


def _events(server: ApiServer, request_id: str) -> list[dict[str, Any]]:
    return [e for e in audit_records(server.audit_log) if e.get("request_id") == request_id]


def test_a_server_without_oidc_or_any_token_says_so_at_start(setup: Setup) -> None:
    logs = setup.server.logs()
    assert "neither OIDC (HMD_OIDC_ISSUER) nor any service token is set up" in logs
    with setup.server.client() as anonymous:
        refused = anonymous.get("/admin/keys")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthenticated"
    with setup.server.client("eyJhbGciOiJSUzI1NiJ9.e30.c2ln") as oidc_less:
        refused = oidc_less.get("/admin/keys")
    assert refused.status_code == 401
    assert "OIDC is not set up" in refused.json()["error"]["message"]


def test_ingest_lookup_and_decrypt_round_trip_with_an_error_per_item(setup: Setup) -> None:
    server = setup.server
    email = f"round-{uuid.uuid4().hex[:8]}@example.com"
    with server.client(setup.app) as app:
        stored = app.post(
            "/v1/records",
            json={
                "records": [
                    {"email": email, "name": "Round Trip", "city": "Oslo"},
                    {"email": "not an email"},
                ],
                "source": "crm",
            },
        )
        assert stored.status_code == 200, stored.text
        body = stored.json()
        first, second = body["results"]
        assert first["ok"] is True and set(first["canonical_keys"]) == {"email", "name"}
        assert second == {
            "index": 1,
            "ok": False,
            "canonical_keys": None,
            "error": {
                "code": "invalid_record",
                "message": "field 'email': not a valid email address (expected exactly one '@' "
                "between two parts)",
            },
        }
        assert body["records"] == 1
        key = first["canonical_keys"]["email"]
        found = app.post("/v1/lookup", json={"field": "email", "value": email.upper()})
        assert found.json() == {"canonical_key": key, "found": True, "sightings": 1}
        answer = app.post(
            "/v1/decrypt",
            json={"keys": [key, UNKNOWN_KEY, SECRET_MARKER, key], "reason": "support:ticket-9"},
            headers={"X-Request-ID": "round-trip"},
        )
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [r["ok"] for r in results] == [True, False, False, True]
    assert results[0]["plaintext"] == results[3]["plaintext"] == email
    assert results[1]["error"]["code"] == "not_found"
    assert results[1]["canonical_key"] == UNKNOWN_KEY
    assert results[2]["canonical_key"] is None  # a value typed for a key is never repeated
    assert results[2]["error"]["code"] == "invalid_input"
    assert SECRET_MARKER not in answer.text
    decrypts = [e for e in _events(server, "round-trip") if e["event_type"] == "crypto.decrypt"]
    outcomes = sorted((e.get("field_identifier") or "", e["result"]) for e in decrypts)
    assert outcomes == sorted([("", "failure"), (UNKNOWN_KEY, "failure"), (key, "success")])
    assert all(e["reason"] == "support:ticket-9" and e["actor"] == "token:app" for e in decrypts)
    assert SECRET_MARKER not in server.audit_log.read_text()


def _tamper(server: ApiServer, key: str) -> None:
    """Flip one character of a stored field's ciphertext, in the database file itself."""
    with sqlite3.connect(server.database) as conn:
        query = "SELECT encrypted_data FROM field_values WHERE canonical_key = ?"
        (data,) = conn.execute(query, (key,)).fetchone()
        at = data.index('"ciphertext":"') + len('"ciphertext":"')
        tampered = data[:at] + ("B" if data[at] == "A" else "A") + data[at + 1 :]
        update = "UPDATE field_values SET encrypted_data = ? WHERE canonical_key = ?"
        assert conn.execute(update, (tampered, key)).rowcount == 1
    conn.close()


def test_a_field_that_fails_to_decrypt_fails_alone_and_each_key_is_audited_once(
    setup: Setup,
) -> None:
    server = setup.server
    emails = [f"once-{n}-{uuid.uuid4().hex[:8]}@example.com" for n in range(3)]
    with server.client(setup.app) as app:
        stored = app.post("/v1/records", json={"records": [{"email": e} for e in emails]})
        keys = [r["canonical_keys"]["email"] for r in stored.json()["results"]]
        _tamper(server, keys[1])
        answer = app.post(
            "/v1/decrypt",
            json={"keys": [*keys, keys[0]], "reason": "support:once"},
            headers={"X-Request-ID": "decrypt-once"},
        )
    assert answer.status_code == 200
    assert answer.json()["results"] == [
        {"canonical_key": keys[0], "ok": True, "plaintext": emails[0], "error": None},
        {
            "canonical_key": keys[1],
            "ok": False,
            "plaintext": None,
            "error": {"code": "decryption_failed", "message": "decryption failed"},
        },
        {"canonical_key": keys[2], "ok": True, "plaintext": emails[2], "error": None},
        {"canonical_key": keys[0], "ok": True, "plaintext": emails[0], "error": None},
    ]
    decrypts = [e for e in _events(server, "decrypt-once") if e["event_type"] == "crypto.decrypt"]
    outcomes = sorted((e["field_identifier"], e["result"], e.get("error")) for e in decrypts)
    assert outcomes == sorted(  # each key once, the good ones not again after the bad one
        [
            (keys[0], "success", None),
            (keys[1], "failure", "DecryptionFailed"),
            (keys[2], "success", None),
        ]
    )
    assert all(e["key_identifier"].startswith("heimdall-pii-v") for e in decrypts)


@dataclass(frozen=True)
class BadInput:
    name: str
    path: str
    status: int
    code: str
    content: bytes | None = None
    json: Any = None
    headers: tuple[tuple[str, str], ...] = ()


BIG = b'{"records": [{"email": "' + b"a" * (1024 * 1024) + b'@example.com"}]}'
BAD_INPUTS = (
    BadInput("malformed JSON", "/v1/records", 422, "invalid_request", content=b'{"records": ['),
    BadInput("records not a list", "/v1/records", 422, "invalid_request", json={"records": "x"}),
    BadInput(
        "a record not an object",
        "/v1/records",
        422,
        "invalid_request",
        json={"records": [SECRET_MARKER]},
    ),
    BadInput("no records", "/v1/records", 422, "invalid_request", json={"records": []}),
    BadInput(
        "an unknown member",
        "/v1/records",
        422,
        "invalid_request",
        json={"records": [{"email": SECRET_MARKER}], SECRET_MARKER: 1},
    ),
    BadInput(
        "a number as a string",
        "/admin/keys/set-min-decryption-version",
        422,
        "invalid_request",
        json={"version": "2"},
    ),
    BadInput(
        "keys not a list",
        "/v1/decrypt",
        422,
        "invalid_request",
        json={"keys": SECRET_MARKER, "reason": "r"},
    ),
    BadInput("a body over the limit", "/v1/records", 413, "payload_too_large", content=BIG),
    BadInput(
        "a streamed body over the limit",
        "/v1/records",
        413,
        "payload_too_large",
        content=BIG,
        headers=(("Transfer-Encoding", "chunked"),),
    ),
    BadInput(
        "10,000 records",
        "/v1/records",
        413,
        "batch_too_large",
        json={"records": [{"email": f"n{n}@example.com"} for n in range(10_000)]},
    ),
    BadInput(
        "10,000 keys",
        "/v1/decrypt",
        413,
        "batch_too_large",
        json={"keys": [UNKNOWN_KEY] * 10_000, "reason": "bulk"},
    ),
)


def _stream(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), 64 * 1024):
        yield data[start : start + 64 * 1024]


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[bad.name for bad in BAD_INPUTS])
def test_bad_input_is_a_json_4xx_that_writes_nothing(setup: Setup, bad: BadInput) -> None:
    server = setup.server
    token = setup.admin if bad.path.startswith("/admin") else setup.app
    before = _counts(server)
    events_before = len(audit_records(server.audit_log))
    with server.client(token) as client:
        if bad.headers:  # chunked: no Content-Length, the limit is found while reading
            assert bad.content is not None
            response = client.post(bad.path, content=_stream(bad.content))
        else:
            response = client.post(bad.path, content=bad.content, json=bad.json)
    assert response.status_code == bad.status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == bad.code, body
    assert SECRET_MARKER not in response.text
    assert "Traceback" not in response.text
    assert _counts(server) == before
    new_events = audit_records(server.audit_log)[events_before:]
    assert [e for e in new_events if e["event_type"] == "crypto.encrypt"] == []


@pytest.mark.parametrize("token", [None, "hmd_" + "A" * 43], ids=["no-token", "unknown-token"])
@pytest.mark.parametrize("path", ["/v1/decrypt", "/v1/records", "/admin/keys/rotate"])
def test_malformed_json_without_valid_credentials_is_refused_and_audited_first(
    setup: Setup, path: str, token: str | None
) -> None:
    request_id = f"malformed-{uuid.uuid4().hex}"
    with setup.server.client(token) as client:
        response = client.post(path, content=b"{", headers={"X-Request-ID": request_id})
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthenticated"
    (event,) = _events(setup.server, request_id)
    assert (event["event_type"], event["operation"]) == ("access.denied", f"POST {path}")


def test_a_batch_with_a_bad_record_writes_the_good_ones_only(setup: Setup) -> None:
    server = setup.server
    before = _counts(server)
    good = f"good-{uuid.uuid4().hex[:8]}@example.com"
    with server.client(setup.app) as app:
        stored = app.post(
            "/v1/records",
            json={"records": [{"email": good}, {"phone": "12"}, {"email": ["a", "list"]}]},
        )
    assert stored.status_code == 200
    assert [r["ok"] for r in stored.json()["results"]] == [True, False, False]
    fields, sightings, records = _counts(server)
    assert (fields, sightings, records) == (before[0] + 1, before[1] + 1, before[2] + 1)


def test_the_floor_is_refused_while_fields_depend_on_it_as_on_the_command_line(
    setup: Setup,
) -> None:
    server = setup.server
    with server.client(setup.app) as app:
        app.post("/v1/records", json={"records": [{"email": "floor@example.com"}]})
    with server.client(setup.admin) as admin:
        latest = admin.post("/admin/keys/rotate").json()["keys"]["latest_version"]
        floor = admin.get("/admin/keys").json()["min_decryption_version"]
        refused = admin.post("/admin/keys/set-min-decryption-version", json={"version": latest})
        assert refused.status_code == 409
        error = refused.json()["error"]
        cli = server.cli("keys", "set-min-decryption-version", str(latest))
        assert cli.returncode == 1
        assert cli.stderr.strip() == f"error: {error['message']}"
        fields = _counts(server)[0]
        assert error["code"] == "conflict"
        assert error["dependent_fields"] == fields + 1  # and the blind-index key
        assert admin.get("/admin/keys").json()["min_decryption_version"] == floor
        forced = admin.post(
            "/admin/keys/set-min-decryption-version", json={"version": latest, "force": True}
        )
        assert forced.status_code == 200
        assert forced.json()["min_decryption_version"] == latest
        lowered = admin.post("/admin/keys/set-min-decryption-version", json={"version": floor})
        assert lowered.status_code == 409
        assert "re-enables versions that were disabled" in lowered.json()["error"]["message"]
        back = admin.post(
            "/admin/keys/set-min-decryption-version", json={"version": floor, "force": True}
        )
        assert back.status_code == 200
        assert back.json()["min_decryption_version"] == floor
    changes = [
        (e["event_type"], e["result"], e["actor"].split(":")[0])
        for e in audit_records(server.audit_log)
        if e["event_type"] in ("key.config", "key.reenable")
    ]
    assert changes[-5:] == [
        ("key.config", "failure", "token"),  # the API's refusal
        ("key.config", "failure", "cli"),  # the command line's, the same
        ("key.config", "success", "token"),
        ("key.reenable", "failure", "token"),
        ("key.reenable", "success", "token"),
    ]


def test_emergency_rotation_retires_the_old_versions_and_starts_the_emergency_job(
    setup: Setup,
) -> None:
    server = setup.server
    with server.client(setup.app) as app:
        app.post("/v1/records", json={"records": [{"email": "compromised@example.com"}]})
    with server.client(setup.admin) as admin:
        answer = admin.post("/admin/keys/rotate", json={"emergency": True})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        keys = body["keys"]
        assert body["emergency"] is True
        assert keys["min_encryption_version"] == keys["latest_version"]
        assert body["job"]["kind"] == "emergency" and body["job"]["state"] == "running"
        assert body["disabled_below"] is None
        assert "heimdall reencrypt run" in body["message"]
        status = admin.get("/admin/crypto/reencrypt/status").json()
        assert status["job_id"] == body["job"]["job_id"]
        assert admin.post("/admin/crypto/reencrypt/cancel").json()["state"] == "cancelled"
        assert admin.post("/admin/crypto/reencrypt/cancel").status_code == 404


def _stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_the_compromise_window_query_returns_exactly_the_window_s_decrypts_under_the_version(
    setup: Setup,
) -> None:
    """spec: Runbook: Emergency Key Compromise Response, step 4, through GET /admin/audit."""
    server = setup.server
    with server.client(setup.app) as app, server.client(setup.admin) as admin:
        version = admin.post("/admin/keys/rotate").json()["keys"]["latest_version"]
        emails = [f"window-{n}-{uuid.uuid4().hex[:6]}@example.com" for n in range(6)]
        stored = app.post("/v1/records", json={"records": [{"email": e} for e in emails]})
        keys = [r["canonical_keys"]["email"] for r in stored.json()["results"]]
        admin.post("/admin/keys/rotate")  # later fields and decrypts: another version
        other = app.post("/v1/records", json={"records": [{"email": "other@example.com"}]})
        other_key = other.json()["results"][0]["canonical_keys"]["email"]
        for index, key in enumerate(keys):
            for decrypted in ([key], [other_key]):
                time.sleep(0.005)  # a distinct millisecond for each event
                answer = app.post(
                    "/v1/decrypt",
                    json={"keys": decrypted, "reason": "window"},
                    headers={"X-Request-ID": f"window-{index}-{len(decrypted[0])}"},
                )
                assert answer.json()["results"][0]["ok"] is True
            app.post("/v1/lookup", json={"field": "email", "value": emails[index]})
    decrypts = [
        e
        for e in audit_records(server.audit_log)
        if e["event_type"] == "crypto.decrypt" and e.get("reason") == "window"
    ]
    under = [e for e in decrypts if e.get("key_version") == version]
    assert len(under) == 6
    since, until = under[1]["timestamp"], under[4]["timestamp"]  # edges on events themselves
    expected = [e for e in under if _stamp(since) <= _stamp(e["timestamp"]) < _stamp(until)]
    assert [e["field_identifier"] for e in expected] == keys[1:4]
    params: dict[str, Any] = {
        "since": since,
        "until": until,
        "event_type": "crypto.decrypt",
        "key_version": version,
        "limit": 2,
    }
    pages: list[dict[str, Any]] = []
    with server.client(setup.auditor) as auditor:
        while True:
            page = auditor.get("/admin/audit", params=params)
            assert page.status_code == 200, page.text
            pages.extend(page.json()["events"])
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
            params["cursor"] = cursor
        bad = auditor.get("/admin/audit", params={"cursor": "garbled", "limit": 2})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_input"
        window = auditor.get("/admin/audit", params={"since": until, "until": since})
        assert window.status_code == 422
        # A misspelt filter, or one given twice, is refused: never a page of every event.
        for wrong in (f"keyversion={version}", f"since={since}&since={until}"):
            refused = auditor.get(f"/admin/audit?{wrong}")
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["code"] == "invalid_input"
        assert "keyversion" not in auditor.get("/admin/audit?keyversion=3").text
        types = "event_type=crypto.decrypt&event_type=index.lookup&limit=1"
        assert auditor.get(f"/admin/audit?{types}").status_code == 200  # repeatable
    assert [e["hash"] for e in pages] == [e["hash"] for e in expected]
    with server.client(setup.app) as app:
        refused = app.get("/admin/audit", headers={"X-Request-ID": "app-reads-audit"})
    assert refused.status_code == 403
    assert [e["event_type"] for e in _events(server, "app-reads-audit")] == ["access.denied"]


def test_the_audit_trail_verifies_through_the_api(setup: Setup) -> None:
    with setup.server.client(setup.auditor) as auditor:
        report = auditor.get("/admin/audit/verify").json()
    assert report["ok"] is True
    assert report["problem"] is None
    assert report["events"] > 0
    assert report["checkpoints"] > 0
    assert report["key_identifiers"] == [report["key_identifier"]] == ["local/audit"]


def test_migration_endpoints_without_the_env_key_fail_in_one_json_line(setup: Setup) -> None:
    server = setup.server
    with server.client(setup.admin) as admin:
        status = admin.get("/admin/migration").json()
        assert status["mode"] == "kms" and status["legacy_fields"] == 0
        answer = admin.post("/admin/migration/start", headers={"X-Request-ID": "no-env-key"})
    assert answer.status_code == 500
    assert answer.json() == {
        "error": {
            "code": "configuration_error",
            "message": "the server's configuration does not allow this; see its log "
            "(request no-env-key)",
        }
    }
    assert "request no-env-key failed: ConfigurationError: HMD_ENCRYPTION_MODE=hybrid" in (
        server.logs()
    )
    assert "Traceback" not in server.logs()


def test_a_curl_style_form_body_is_read_as_json(setup: Setup) -> None:
    """curl -d sends application/x-www-form-urlencoded: the API reads JSON whatever the type."""
    with setup.server.client(setup.admin) as admin:
        answer = admin.post(
            "/admin/crypto/reencrypt",
            content=b'{"dry_run": true}',
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert answer.status_code == 200
    assert answer.json()["dry_run"] is True


def test_unknown_paths_and_methods_answer_json(setup: Setup) -> None:
    with setup.server.client(setup.admin) as admin:
        missing = admin.get("/v1/nothing-here")
        wrong = admin.get("/v1/decrypt")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, "method_not_allowed")


def test_the_client_s_request_id_reaches_the_trail_and_a_bad_one_is_replaced(
    setup: Setup,
) -> None:
    server = setup.server
    with server.client(setup.app) as app:
        # The field's blind-index key exists before the request watched (its creation would be
        # audited under that request too).
        app.post("/v1/lookup", json={"field": "email", "value": "x@example.com"})
        kept = app.post(
            "/v1/lookup",
            json={"field": "email", "value": "x@example.com"},
            headers={"X-Request-ID": "req-xyz-789"},
        )
        replaced = app.post(
            "/v1/lookup",
            json={"field": "email", "value": "x@example.com"},
            headers={"X-Request-ID": "bad id\twith spaces"},
        )
    assert kept.headers["x-request-id"] == "req-xyz-789"
    assert [e["event_type"] for e in _events(server, "req-xyz-789")] == ["index.lookup"]
    assert replaced.headers["x-request-id"].startswith("req-")
    assert replaced.headers["x-request-id"] != "bad id\twith spaces"


def test_metrics_show_the_job_progress_the_runbook_watches(setup: Setup) -> None:
    with setup.server.client(setup.app) as app:  # a field for the job, whatever ran before
        stored = app.post("/v1/records", json={"records": [{"email": "metrics@example.com"}]})
        assert stored.status_code == 200, stored.text
    with setup.server.client(setup.admin) as admin:
        admin.post("/admin/keys/rotate")
        job = admin.post("/admin/crypto/reencrypt").json()
        text = admin.get("/metrics").text
    assert f'heimdall_reencryption_progress{{status="total"}} {float(job["total"])}' in text
    assert "heimdall_crypto_operations_total" in text
    with setup.server.client() as anonymous:
        assert anonymous.get("/metrics").status_code == 401


def test_oversized_request_headers_are_refused_before_they_are_read_whole(setup: Setup) -> None:
    """Before any authentication, a request's line and headers are bounded (h11's 16 KiB):
    a client offering a header of many MiB is cut off, and the server goes on serving."""
    url = httpx.URL(setup.server.url)
    assert url.host and url.port
    offered = 0
    with socket.create_connection((url.host, url.port), timeout=10) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: heimdall\r\nX-Padding: ")
        with contextlib.suppress(OSError):
            for _ in range(64):
                conn.sendall(b"a" * (1 << 20))
                offered += 1
    assert offered < 64  # cut off long before the 64 MiB were read
    with setup.server.client() as client:
        assert client.get("/healthz").status_code == 200
