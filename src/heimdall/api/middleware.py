"""Two ASGI middlewares around every request.

:class:`RequestContext` (outermost) gives each request its id, the ``request_id`` of its audit
events (the caller's ``X-Request-ID`` when it is a plain token of up to 128 characters, else a
new ``req-<uuid>``), echoes it in the answer, and answers an exception nobody anticipated with
one fixed JSON line, so that neither a traceback nor an exception's message (which could hold
anything) ever reaches a client or the server's log. A request the server cancels as it stops
(its graceful shutdown ran out) is answered 503 ``server_stopping`` and logged in one line.
It also writes the access log (``heimdall.access``), one line per answer: the client's address,
the method and the route's template (never the path as sent, nor its query string: a caller
may put a token or a value there), the status, the request id and the time taken.

:class:`BodyLimit` refuses a body over ``HMD_API_MAX_BODY_BYTES`` with 413, by its declared
length before reading a byte, or as soon as a streamed body passes the limit, and reads every
body as JSON whatever its ``Content-Type`` (``curl -d``, as in the spec's runbooks, sends
``application/x-www-form-urlencoded``). That is safe because only bearer tokens authenticate:
a browser attaches none to a cross-site form, so no form can act for a signed-in user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from typing import Final

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heimdall.api.errors import error_body, unexpected_error

__all__ = ["BodyLimit", "RequestContext"]

_log = logging.getLogger("heimdall.api")
_access_log = logging.getLogger("heimdall.access")
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")
_BODILESS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


def _stopping(request_id: str) -> JSONResponse:
    return JSONResponse(
        error_body("server_stopping", f"the server is stopping (request {request_id}); retry"),
        503,
        headers={"X-Request-ID": request_id, "Retry-After": "1"},
    )


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else f"req-{uuid.uuid4()}"
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0
        began = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # The server stopped waiting for it (its graceful shutdown ran out): one line in
            # the log and, if nothing was sent yet, a JSON 503, never uvicorn's traceback and
            # plain-text 500. The request's task ends here, as uvicorn asked.
            _log.error("request %s was cancelled: the server is stopping", request_id)
            if not status:
                with contextlib.suppress(Exception):
                    await _stopping(request_id)(scope, receive, send_with_id)
        except Exception as exc:
            if status:  # a streamed answer broke off: the client sees the connection end
                _log.error("request %s broke off: %s", request_id, type(exc).__name__)
                return
            await unexpected_error(request_id, exc)(scope, receive, send_with_id)
        finally:
            if status:
                _access(scope, status, request_id, time.perf_counter() - began)


_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)


def _access(scope: Scope, status: int, request_id: str, seconds: float) -> None:
    client = scope.get("client")
    route = getattr(scope.get("route"), "path", None) or "(no such route)"
    method = scope["method"]  # any token the caller sent: only the standard ones are written
    _access_log.info(
        '%s - "%s %s" %d %s %.1f ms',
        f"{client[0]}:{client[1]}" if client else "-",
        method if method in _METHODS else "(other method)",
        route,
        status,
        request_id,
        seconds * 1000,
    )


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> str:
        return f"the request body is over the limit of {self.max_bytes:,} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _BODILESS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status, code = (
                (413, "payload_too_large") if declared.isdigit() else (400, "bad_request")
            )
            message = self._too_large() if status == 413 else "Content-Length is not a number"
            await JSONResponse(error_body(code, message), status)(scope, receive, send)
            return
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            scope["headers"] = [
                (name, value) for name, value in scope["headers"] if name != b"content-type"
            ] + [(b"content-type", b"application/json")]
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, limited, send)
