"""What every route needs from the app: the service, the settings, the batch limit."""

from __future__ import annotations

from fastapi import Request

from heimdall.api.errors import ApiError
from heimdall.audit import ForwardedAuditLog, JsonlAuditLog
from heimdall.service import Heimdall
from heimdall.settings import Settings

__all__ = ["audit_log_of", "check_batch", "service_of", "settings_of"]


def service_of(request: Request) -> Heimdall:
    """The process's one service: its store, key provider, cipher cache and audit sink are
    shared by every request (each is safe under threads; see heimdall.api.app)."""
    service: Heimdall = request.app.state.service
    return service


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def check_batch(request: Request, items: int) -> None:
    """413 when a batch holds more than ``HMD_API_MAX_BATCH`` items."""
    limit = settings_of(request).api.max_batch
    if items > limit:
        raise ApiError(
            413,
            "batch_too_large",
            f"a batch holds at most {limit:,} items (HMD_API_MAX_BATCH); this one holds "
            f"{items:,}: split it",
        )


def audit_log_of(service: Heimdall) -> JsonlAuditLog | None:
    """The file the service's audit trail is written to (behind any forwarders), or None for
    a sink that is not a file (one an embedding program gave)."""
    sink = service.audit
    log = sink.log if isinstance(sink, ForwardedAuditLog) else sink
    return log if isinstance(log, JsonlAuditLog) else None
