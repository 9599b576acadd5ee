"""``heimdall serve``: the HTTP API (:mod:`heimdall.api`) on ``HMD_API_LISTEN``, with uvicorn.

One process serves the API; ``heimdall worker`` processes work the jobs it starts. Both may run
on many hosts against one PostgreSQL and one key provider. TLS is served with
``HMD_API_TLS_CERT`` and ``HMD_API_TLS_KEY``; without them, put a TLS-terminating proxy in front
of a non-loopback address (and name it in ``HMD_API_TRUSTED_PROXIES`` so the audit trail records
the client's address, not the proxy's). ``--openapi`` prints the OpenAPI document and exits.

The service is built before the server starts, so a configuration error is one ``error:``
line; it is closed (a closing audit checkpoint, the blind-index key wiped) when the server stops
on SIGTERM (exit 0) or SIGINT. ``HMD_MASTER_KEY``'s text is wiped once the ciphers hold the
key, as the other commands do.
"""

from __future__ import annotations

import copy
import signal
import ssl
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from heimdall.app import build
from heimdall.audit.group import Sealer
from heimdall.cli.common import app, err, load_settings
from heimdall.cli.output import write_json
from heimdall.errors import ConfigurationError
from heimdall.secret import SecretBytes
from heimdall.service import Heimdall
from heimdall.settings import Settings
from heimdall.tokens import ServiceTokens

__all__ = ["serve_command"]


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, with heimdall's own loggers on the same handler."""
    from uvicorn.config import LOGGING_CONFIG  # noqa: PLC0415 - the server extra

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["heimdall"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def _check_tls(settings: Settings) -> None:
    api = settings.api
    if api.tls_cert is None or api.tls_key is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            api.tls_cert, api.tls_key
        )
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or "not PEM"
        raise ConfigurationError(
            f"HMD_API_TLS_CERT {api.tls_cert} and HMD_API_TLS_KEY {api.tls_key} cannot be "
            f"loaded: {reason}"
        ) from None


def _announce(settings: Settings, service: Heimdall) -> None:
    api = settings.api
    scheme = "https" if api.tls_cert else "http"
    err.print(f"serving the heimdall API on {scheme}://{api.listen}", markup=False)
    now = datetime.now(UTC)
    active = [t for t in ServiceTokens(service.store).list() if t.state(now) == "active"]
    if api.oidc is None and not active:
        err.print(
            "warning: neither OIDC (HMD_OIDC_ISSUER) nor any service token is set up: every "
            "endpoint but /healthz answers 401 until one is (`heimdall tokens create`)",
            markup=False,
        )
    if not api.tls_cert and api.host not in ("127.0.0.1", "::1", "localhost"):
        err.print(
            f"warning: plain HTTP on {api.listen}: bearer tokens cross the network in the "
            "clear unless a TLS-terminating proxy is in front (HMD_API_TLS_CERT / _KEY)",
            markup=False,
        )


@app.command("serve")
def serve_command(
    openapi: Annotated[
        bool, typer.Option("--openapi", help="Print the OpenAPI document and exit.")
    ] = False,
) -> None:
    """Serve heimdall's HTTP API to callers with OIDC or service tokens (HMD_API_* settings)."""
    try:
        import uvicorn  # noqa: PLC0415 - the server extra

        from heimdall.api.app import (  # noqa: PLC0415 - likewise
            close_app,
            create_app,
            openapi_document,
        )
    except ImportError:
        raise ConfigurationError(
            "heimdall serve needs the server extra: pip install 'heimdall[server]'"
        ) from None
    settings = load_settings()
    if openapi:
        write_json(openapi_document(settings))
        return
    _check_tls(settings)
    service = build(settings, warn=lambda line: err.print(line, markup=False))
    try:
        try:
            application = create_app(settings, service)  # reads the OIDC key file, if any
        finally:
            # The ciphers hold the env key now; the text taken from the environment goes.
            if isinstance(settings.master_key, SecretBytes):
                settings.master_key.wipe()
        _announce(settings, service)
        api = settings.api
        server = uvicorn.Server(
            uvicorn.Config(
                application,
                host=api.host,
                port=api.port,
                # h11 bounds a request's line and headers (16 KiB) before any authentication;
                # httptools, uvicorn's choice when installed, reads them without a limit.
                http="h11",
                ssl_certfile=str(api.tls_cert) if api.tls_cert else None,
                ssl_keyfile=str(api.tls_key) if api.tls_key else None,
                proxy_headers=bool(api.trusted_proxies),
                forwarded_allow_ips=list(api.trusted_proxies) or None,
                server_header=False,
                log_config=_log_config(),
                timeout_graceful_shutdown=10,
                # No lifespan protocol: a second Ctrl-C makes uvicorn skip its shutdown event
                # and cancel the application's lifespan task, which Starlette then reports as
                # a traceback. What the lifespan would release is released below instead.
                lifespan="off",
            )
        )
        # uvicorn stops gracefully on SIGTERM, then raises it again: with this handler that
        # returns here, so the service below is closed and the exit status is 0.
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            with Sealer(service.audit, settings.audit_checkpoint_seconds):
                server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
            close_app(application)
    finally:
        service.close()
    if not server.started:
        sys.exit(1)  # uvicorn has said why (the address in use, ...)
    err.print("heimdall serve stopped", markup=False)
