"""The API's error answers, in process: one JSON body for every failure, a status per error type,
and nothing of an unanticipated exception (message, traceback) in the answer or the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from heimdall.api.app import create_app
from heimdall.api.errors import ApiError, Unauthenticated, error_of
from heimdall.errors import (
    AccessDenied,
    AuditError,
    AuditUnreadable,
    ConfigurationError,
    DecryptionFailed,
    FieldNotFound,
    HeimdallError,
    InvalidEnvelope,
    InvalidInput,
    KeyNotFound,
    KeyVersionDisabled,
    KmsUnavailable,
    LifecycleError,
    ModeViolation,
    PermissionDenied,
    StorageError,
)
from heimdall.service import Heimdall
from heimdall.settings import Settings

SECRET = "alice@example.com-4111111111111111"


@pytest.mark.parametrize(
    ("error", "status", "code", "shown"),
    [
        (Unauthenticated("no bearer token was given"), 401, "unauthenticated", True),
        (PermissionDenied(f"role x may not decrypt {SECRET}"), 403, "forbidden", True),
        (FieldNotFound("no field has this canonical key"), 404, "not_found", True),
        (InvalidInput("bad"), 422, "invalid_input", True),
        (LifecycleError("fields depend", dependent_fields=3), 409, "conflict", True),
        (ModeViolation("legacy refused"), 409, "mode_violation", True),
        (KeyVersionDisabled("disabled"), 409, "key_version_disabled", True),
        (KmsUnavailable(f"vault at http://10.0.0.1 {SECRET}"), 503, "kms_unavailable", False),
        (AccessDenied(f"denied {SECRET}"), 502, "kms_denied", False),
        (KeyNotFound(f"no key {SECRET}"), 502, "kms_key_not_found", False),
        (AuditError(f"audit log /var/log {SECRET}"), 503, "audit_unavailable", False),
        (AuditUnreadable(f"audit log /var/log {SECRET}"), 503, "audit_unreadable", False),
        (StorageError(f"sqlite {SECRET}"), 503, "storage_unavailable", False),
        (DecryptionFailed(), 500, "decryption_failed", True),  # its one fixed message
        (InvalidEnvelope(f"envelope {SECRET}"), 500, "invalid_envelope", False),
        (ConfigurationError(f"HMD_X {SECRET}"), 500, "configuration_error", False),
        (HeimdallError(f"something {SECRET}"), 500, "internal_error", False),
        (ApiError(413, "batch_too_large", "too many"), 413, "batch_too_large", True),
    ],
)
def test_each_error_type_has_its_status_and_a_5xx_shows_no_message(
    error: HeimdallError, status: int, code: str, shown: bool
) -> None:
    got_status, got_code, message = error_of(error)
    assert (got_status, got_code) == (status, code)
    assert (message == str(error)) is shown
    if not shown:
        assert SECRET not in message


class Client:
    """Requests to the app in this process (httpx's ASGI transport, no server)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(send())

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)


@pytest.fixture
def client(make_service: Callable[..., Heimdall], data_dir: Any) -> Client:
    service = make_service()
    app = create_app(Settings(data_dir=data_dir, audit_fsync=False), service)
    _add_failing_routes(app)
    return Client(app)


def _add_failing_routes(app: FastAPI) -> None:
    @app.get("/test/unexpected")
    def unexpected() -> None:
        raise RuntimeError(f"internal detail {SECRET}")

    @app.get("/test/cancelled")
    async def cancelled() -> None:
        raise asyncio.CancelledError  # as when the server's graceful shutdown runs out

    @app.get("/test/storage")
    def storage() -> None:
        raise StorageError(f"sqlite failed on {SECRET}")


def test_an_unanticipated_exception_is_one_json_line_and_its_message_is_nowhere(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        answer = client.get("/test/unexpected", headers={"X-Request-ID": "boom-1"})
    assert answer.status_code == 500
    assert answer.json() == {
        "error": {"code": "internal_error", "message": "internal error (request boom-1)"}
    }
    assert SECRET not in caplog.text
    assert "Traceback" not in caplog.text
    assert "request boom-1 failed: internal error (RuntimeError)" in caplog.text


def test_a_request_cancelled_as_the_server_stops_is_a_json_503_and_one_log_line(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        answer = client.get("/test/cancelled", headers={"X-Request-ID": "stop-1"})
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "server_stopping"
    assert "stop-1" in answer.json()["error"]["message"]
    assert "Traceback" not in caplog.text
    assert "request stop-1 was cancelled: the server is stopping" in caplog.text


def test_a_5xx_names_the_request_and_logs_the_cause(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        answer = client.get("/test/storage", headers={"X-Request-ID": "st-1"})
    assert answer.status_code == 503
    assert answer.json()["error"]["message"] == "the store failed; try again later (request st-1)"
    assert SECRET not in answer.text
    assert "request st-1 failed: StorageError" in caplog.text


def test_a_validation_error_names_where_never_what(client: Client) -> None:
    answer = client.post(
        "/v1/decrypt",
        json={"keys": [SECRET, 5], "reason": "r", SECRET: SECRET},
        headers={"Authorization": "Bearer hmd_" + "A" * 43},
    )
    # Authentication runs first: an unknown service token.
    assert answer.status_code == 401
    assert SECRET not in answer.text
    assert "hmd_" not in answer.text


@pytest.mark.parametrize(("public", "status"), [(True, 200), (False, 401)])
def test_metrics_need_credentials_unless_made_public(
    make_service: Callable[..., Heimdall], data_dir: Any, public: bool, status: int
) -> None:
    settings = Settings.from_env(
        {"HMD_DATA_DIR": str(data_dir), "HMD_API_METRICS_PUBLIC": str(public).lower()}
    )
    client = Client(create_app(settings, make_service()))
    answer = client.get("/metrics")
    assert answer.status_code == status
    if public:
        assert "heimdall_reencryption_progress" in answer.text
    assert client.get("/readyz").status_code == 401  # only /metrics is opened
    assert client.get("/healthz").status_code == 200
