"""The app factory: settings and a wired service in, the FastAPI app out.

One process serves the API with one :class:`heimdall.service.Heimdall` (built by
:func:`heimdall.app.build`, the composition root, and closed by whoever built it). FastAPI runs
the routes, which are plain functions, in a pool of threads, so all of it is shared by
concurrent requests, and each part is safe under threads: the SQLite store serialises its one
connection with a lock (``check_same_thread=False``), the PostgreSQL store lends each call a
connection of its pool, the envelope cipher's data key cache takes a lock, the key providers'
clients and batch senders are shared by design, the audit log serialises appends with an
exclusive ``flock`` taken on a descriptor of its own per append, and the Prometheus registry
locks. ``heimdall worker`` processes, on this host or others, share the store and the key
provider; the API only starts, joins and steers the jobs they work.

Order of the layers around a route (outermost first): request context (request id, the last
line of defence against an unanticipated exception), body limit, FastAPI's error handlers
(:mod:`.errors`), then authentication (:mod:`.auth`) as each route's dependency.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI

from heimdall.api import audit, data, jobs, keys, migration
from heimdall.api.auth import Authenticator, authenticated
from heimdall.api.errors import install_error_handlers
from heimdall.api.health import Readiness, health_router
from heimdall.api.middleware import BodyLimit, RequestContext
from heimdall.api.oidc import OidcVerifier
from heimdall.api.refusals import RefusalBudget
from heimdall.cipher import CachePolicy, FieldCipher
from heimdall.envelope import EncryptionVersion
from heimdall.kms.legacy import LegacyMasterKey, parse_master_key
from heimdall.service import Heimdall
from heimdall.settings import Settings

__all__ = ["close_app", "create_app", "openapi_document"]

DESCRIPTION = """\
Envelope encryption of PII fields under keys held in a key management service.

Every endpoint but `/healthz` needs `Authorization: Bearer <token>`: an OIDC token of the
configured issuer, or a service token (`hmd_...`) made with `heimdall tokens create`. The
token's role (heimdall-app, heimdall-worker, heimdall-admin, heimdall-audit) decides what it may
do; every refusal is audited. Errors are `{"error": {"code": ..., "message": ...}}`.
"""


def _version() -> str:
    try:
        return version("heimdall")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def create_app(settings: Settings, service: Heimdall | None) -> FastAPI:
    """The API of *service*, configured by *settings* (``settings.api``). With *service*
    None the app only describes itself (:func:`openapi_document`); it cannot serve."""
    app = FastAPI(
        title="heimdall",
        version=_version(),
        description=DESCRIPTION,
        docs_url=None,  # the interactive pages load scripts from a CDN: not from this server
        redoc_url=None,
        openapi_url=None,  # served by the health router, to authenticated callers only
        lifespan=_lifespan,
    )
    app.state.settings = settings
    if service is not None:
        oidc = settings.api.oidc
        app.state.service = service
        app.state.legacy = _legacy_cipher(service, settings)
        app.state.authenticator = Authenticator(
            service,
            OidcVerifier(oidc) if oidc else None,
            RefusalBudget(settings.api.refusals_per_minute),
        )
        app.state.readiness = Readiness(service)
    install_error_handlers(app, authenticate=authenticated if service is not None else None)
    app.add_middleware(BodyLimit, max_bytes=settings.api.max_body_bytes)
    app.add_middleware(RequestContext)  # added last: the outermost
    for module in (data, keys, jobs, migration, audit):
        app.include_router(module.router)
    app.include_router(health_router(metrics_public=settings.api.metrics_public))
    return app


def _legacy_cipher(service: Heimdall, settings: Settings) -> FieldCipher | None:
    """The env key's cipher, for the migration endpoints that move to a mode reading legacy
    fields (kms mode's service has none): built once, from HMD_MASTER_KEY, before the caller
    wipes the key's text. A second store is never opened in this process: SQLite's POSIX locks
    belong to the process, and closing another descriptor of the database drops them."""
    if service.router.legacy is not None or not settings.master_key:
        return service.router.legacy
    cache = CachePolicy(
        max_uses=settings.dek_max_uses, max_age_seconds=settings.dek_max_age_seconds
    )
    key = LegacyMasterKey(parse_master_key(settings.master_key))
    return FieldCipher(key, EncryptionVersion.LEGACY, cache)


def close_app(app: FastAPI) -> None:
    """Release what the application holds besides the service (the readiness probes' thread)
    and audit the refusals it still counts; before the service is closed. ``heimdall serve``
    calls it once uvicorn has stopped; other ASGI servers run it through the lifespan
    protocol."""
    readiness = getattr(app.state, "readiness", None)
    if isinstance(readiness, Readiness):
        readiness.close()
    authenticator = getattr(app.state, "authenticator", None)
    if isinstance(authenticator, Authenticator):
        authenticator.close()  # the refusals still counted go to the trail


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        yield
    finally:
        close_app(app)


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document of the API these settings would serve."""
    return create_app(settings, None).openapi()
