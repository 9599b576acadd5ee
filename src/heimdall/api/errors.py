"""One error body for every failure: ``{"error": {"code": "...", "message": "..."}}``.

heimdall's typed exceptions become a status and a code here, in one table, and nowhere else.
A 4xx carries the library's message, which by the rules of :mod:`heimdall.errors` names a rule,
never a value. A 5xx carries a fixed sentence and the request id; its cause goes to the server's
log (type and message, which hold no secret either), never to the client. A validation error
lists where the request is wrong and why, never the value submitted there (a value may be
plaintext), and an exception nobody anticipated is one fixed line: never a traceback.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    KmsError,
    KmsUnavailable,
    LifecycleError,
    ModeViolation,
    PermissionDenied,
    StorageError,
)
from heimdall.policy import RecordError

__all__ = [
    "ApiError",
    "Unauthenticated",
    "error_body",
    "error_of",
    "install_error_handlers",
    "request_id_of",
    "unexpected_error",
]

_log = logging.getLogger("heimdall.api")

WWW_AUTHENTICATE: Final = 'Bearer realm="heimdall"'
_FIELD_NAME: Final = re.compile(r"[a-z_]{1,40}\Z")


class ApiError(HeimdallError):
    """A refusal of the API's own (a batch over the limit, no job to steer): its status, code
    and one-sentence message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or {}


class Unauthenticated(HeimdallError):
    """No credentials, or credentials that prove nothing: answered 401. *reason* is a short
    phrase for the message and the audit trail, never the credentials; *actor* names who the
    credentials were issued to when that is known (a revoked service token's name)."""

    def __init__(self, reason: str, *, actor: str | None = None) -> None:
        super().__init__(f"authentication required: {reason}")
        self.reason = reason
        self.actor = actor


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "")) or "unknown"


# (type, status, code, fixed message or None to show the library's own). Most specific first.
_TABLE: Final[Sequence[tuple[type[HeimdallError], int, str, str | None]]] = (
    (Unauthenticated, 401, "unauthenticated", None),
    (PermissionDenied, 403, "forbidden", None),
    (FieldNotFound, 404, "not_found", None),
    (InvalidInput, 422, "invalid_input", None),
    (RecordError, 422, "invalid_record", None),
    (LifecycleError, 409, "conflict", None),
    (ModeViolation, 409, "mode_violation", None),
    (KeyVersionDisabled, 409, "key_version_disabled", None),
    (
        KmsUnavailable,
        503,
        "kms_unavailable",
        "the key management service is unavailable; try again later",
    ),
    (AccessDenied, 502, "kms_denied", "the key management service refused this server"),
    (KeyNotFound, 502, "kms_key_not_found", "the key management service has no such key"),
    (KmsError, 502, "kms_error", "the key management service failed"),
    (
        AuditUnreadable,
        503,
        "audit_unreadable",
        "the audit trail cannot be read; see the server's log (`heimdall audit verify`)",
    ),
    (
        AuditError,
        503,
        "audit_unavailable",
        "the audit trail cannot be written, so the operation was refused",
    ),
    (StorageError, 503, "storage_unavailable", "the store failed; try again later"),
    (DecryptionFailed, 500, "decryption_failed", "decryption failed"),
    (InvalidEnvelope, 500, "invalid_envelope", "a stored envelope is not valid"),
    (
        ConfigurationError,
        500,
        "configuration_error",
        "the server's configuration does not allow this; see its log",
    ),
)


def error_of(exc: HeimdallError) -> tuple[int, str, str]:
    """The status, code and public message of *exc*."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code, str(exc)
    for kind, status, code, fixed in _TABLE:
        if isinstance(exc, kind):
            return status, code, fixed if fixed is not None else str(exc)
    return 500, "internal_error", "the operation failed; see the server's log"


def _respond(
    request: Request,
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    request_id = request_id_of(request)
    if status >= 500:
        message = f"{message} (request {request_id})"
    all_headers = {"X-Request-ID": request_id, **(headers or {})}
    if status == 401:
        all_headers.setdefault("WWW-Authenticate", WWW_AUTHENTICATE)
    return JSONResponse(error_body(code, message, **extra), status, headers=all_headers)


async def _heimdall_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HeimdallError)
    status, code, message = error_of(exc)
    if status >= 500:
        _log.error("request %s failed: %s: %s", request_id_of(request), type(exc).__name__, exc)
    extra: dict[str, Any] = {}
    if isinstance(exc, LifecycleError) and exc.dependent_fields:
        extra["dependent_fields"] = exc.dependent_fields
    headers = exc.headers if isinstance(exc, ApiError) else {}
    if isinstance(exc, KmsUnavailable):
        headers = {"Retry-After": "5"}
    return _respond(request, status, code, message, headers=headers, **extra)


def _location(loc: Sequence[int | str]) -> str:
    """Where a validation problem is, by the names of the request's own fields: a name the
    caller chose (an unexpected key) is not repeated, for it may be a value."""
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif _FIELD_NAME.match(part):
            parts.append(f".{part}" if parts else part)
        else:
            parts.append(".?")
            break
    return "".join(parts)


def _validation_error(
    authenticate: Callable[[Request], object] | None,
) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        if authenticate is not None and any(
            error.get("type") == "json_invalid" for error in exc.errors()
        ):
            # FastAPI parses a JSON body before it runs any dependency, authentication
            # included: the caller is authenticated here first, so that no credentials are
            # refused (and audited) as on every other request, not told about the body.
            try:
                await run_in_threadpool(authenticate, request)  # reads the store
            except HeimdallError as refused:
                return await _heimdall_error(request, refused)
        return _invalid(request, exc)

    return handle


def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for error in exc.errors()[:20]:
        kind = str(error.get("type", ""))
        loc = tuple(error.get("loc", ()))
        if kind == "json_invalid":
            message, loc = "the body is not valid JSON", loc[:1]
        elif kind == "extra_forbidden":
            message, loc = "unexpected field (its name is not repeated)", loc[:-1]
        else:
            message = str(error.get("msg", "not valid"))
        problems.append({"location": _location(loc), "message": message})
    first = problems[0] if problems else {"location": "request", "message": "not valid"}
    return _respond(
        request,
        422,
        "invalid_request",
        f"the request is not valid: {first['location']}: {first['message']}",
        problems=problems,
    )


_HTTP_CODES: Final = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    400: "bad_request",
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else "request refused"
    return _respond(request, exc.status_code, code, message, headers=dict(exc.headers or {}))


def unexpected_error(request_id: str, exc: BaseException) -> JSONResponse:
    """The answer to an exception nobody anticipated; its type (never its message, which could
    hold anything) goes to the log, its traceback too with ``HMD_DEBUG=1``."""
    _log.error("request %s failed: internal error (%s)", request_id, type(exc).__name__)
    if os.environ.get("HMD_DEBUG") == "1":
        _log.error("HMD_DEBUG=1: the traceback", exc_info=exc)
    return JSONResponse(
        error_body("internal_error", f"internal error (request {request_id})"),
        500,
        headers={"X-Request-ID": request_id},
    )


def install_error_handlers(
    app: FastAPI, *, authenticate: Callable[[Request], object] | None = None
) -> None:
    """The handlers of heimdall's errors, validation errors and HTTP errors (404, 405, 413).
    Anything else is :func:`unexpected_error`, answered by the request context middleware.
    *authenticate* (raising the refusal, audited) runs before a body that is not JSON is
    answered 422."""
    app.add_exception_handler(HeimdallError, _heimdall_error)
    app.add_exception_handler(RequestValidationError, _validation_error(authenticate))
    app.add_exception_handler(StarletteHTTPException, _http_error)
