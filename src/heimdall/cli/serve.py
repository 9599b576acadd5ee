"""``heimdall serve``: the HTTP API (:mod:`heimdall.api`) on ``HMD_API_LISTEN``, with uvicorn.

One process serves the API; ``heimdall worker`` processes work the jobs it starts. Both may run
on many hosts against one PostgreSQL and one key provider. TLS is served with
``HMD_API_TLS_CERT`` and ``HMD_API_TLS_KEY``; without them, put a TLS-terminating proxy in front
of a non-loopback address (and name it in ``HMD_API_TRUSTED_PROXIES`` so the audit trail records
the client's address, not the proxy's). ``--openapi`` prints the OpenAPI document and exits.

The service is built before the server starts, so a configuration error is one ``error:``
line; it is closed (a closing audit checkpoint, the blind-index key wiped) when the server stops
on SIGTERM or SIGHUP (exit 0) or SIGINT (130), all graceful (see _graceful_stop).
``HMD_MASTER_KEY``'s text is wiped once the ciphers hold the key, as the other commands do.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import socket
import ssl
import sys
from collections.abc import Iterator
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
    # heimdall's access log (heimdall.api.middleware) takes the place of uvicorn's, which
    # writes each URL as sent, query string and all; on stdout, as uvicorn's was.
    config["handlers"]["heimdall_access"] = {
        "formatter": "default",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stdout",
    }
    config["loggers"]["heimdall.access"] = {
        "handlers": ["heimdall_access"],
        "level": "INFO",
        "propagate": False,
    }
    return config


def _check_tls(settings: Settings) -> None:
    api = settings.api
    if api.tls_cert is None or api.tls_key is None:
        return

    def no_passphrase() -> str:
        # OpenSSL would ask for one on the terminal (twice: uvicorn loads the key again), and
        # a server started by systemd has none to answer.
        raise ConfigurationError(
            f"HMD_API_TLS_KEY {api.tls_key} is encrypted: give the key unencrypted, readable by "
            "this user alone"
        )

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            api.tls_cert, api.tls_key, password=no_passphrase
        )
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or "not PEM"
        raise ConfigurationError(
            f"HMD_API_TLS_CERT {api.tls_cert} and HMD_API_TLS_KEY {api.tls_key} cannot be "
            f"loaded: {reason}"
        ) from None


def _server(settings: Settings, application: Any) -> Any:
    """The uvicorn server of *application*, as heimdall runs it."""
    import uvicorn  # noqa: PLC0415 - the server extra

    api = settings.api
    return uvicorn.Server(
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
            access_log=False,  # heimdall writes its own (see _log_config)
            timeout_graceful_shutdown=10,
            # No lifespan protocol: a second Ctrl-C makes uvicorn skip its shutdown event and
            # cancel the application's lifespan task, which Starlette then reports as a
            # traceback. What the lifespan would release, serve releases itself (close_app).
            lifespan="off",
        )
    )


def _bind(settings: Settings) -> socket.socket:
    """The listening socket on ``HMD_API_LISTEN``, bound before the server says it serves: an
    address in use, not this host's or not resolvable is one ``error:`` line."""
    api = settings.api
    family = socket.AF_INET6 if ":" in api.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        listener.bind((api.host, api.port))
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(f"HMD_API_LISTEN {api.listen} cannot be bound: {reason}") from None
    return listener


def _announce(settings: Settings, service: Heimdall) -> None:
    api = settings.api
    now = datetime.now(UTC)  # the tokens first: a store that fails is one line, never after
    active = [t for t in ServiceTokens(service.store).list() if t.state(now) == "active"]
    scheme = "https" if api.tls_cert else "http"
    err.print(f"serving the heimdall API on {scheme}://{api.listen}", markup=False)
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
        import uvicorn  # noqa: F401, PLC0415 - the server extra, used by _serve

        from heimdall.api.app import openapi_document  # noqa: PLC0415 - likewise
    except ImportError:
        raise ConfigurationError(
            "heimdall serve needs the server extra: pip install 'heimdall[server]'"
        ) from None
    settings = load_settings()
    if openapi:
        write_json(openapi_document(settings))
        return
    with _graceful_stop() as stop:
        _serve(settings, stop)


class _Stop:
    """A stop asked for by signal, before the server runs or while it does."""

    def __init__(self) -> None:
        self.requested = False
        self.server: Any = None  # the uvicorn.Server, once there is one

    def __call__(self, signum: int, frame: object) -> None:
        self.requested = True
        if self.server is not None:
            self.server.should_exit = True


@contextlib.contextmanager
def _graceful_stop() -> Iterator[_Stop]:
    """SIGTERM and SIGHUP (a closed terminal or session) stop the server gracefully once the
    command has loaded (before, nothing is written): no signal is lost between start-up and
    uvicorn's own handlers
    (which it installs for SIGTERM and SIGINT only while it serves, then raises the signal
    again: it comes back here and the command still ends with status 0), and none kills the
    process in the middle of an audit append."""
    stop = _Stop()
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _serve(settings: Settings, stop: _Stop) -> None:
    from heimdall.api.app import close_app, create_app  # noqa: PLC0415 - the server extra

    _check_tls(settings)
    service = build(settings, warn=lambda line: err.print(line, markup=False))
    try:
        try:
            application = create_app(settings, service)  # reads the OIDC key file, if any
        finally:
            # The ciphers hold the env key now; the text taken from the environment goes.
            if isinstance(settings.master_key, SecretBytes):
                settings.master_key.wipe()
        try:
            with _bind(settings) as listener:
                _announce(settings, service)
                server = _server(settings, application)
                stop.server = server
                server.should_exit = stop.requested  # asked for while the service was built
                with Sealer(service.audit, settings.audit_checkpoint_seconds):
                    server.run(sockets=[listener])
        finally:
            close_app(application)
    finally:
        service.close()
    if not server.started:
        sys.exit(1)  # uvicorn has said why
    err.print("heimdall serve stopped", markup=False)
