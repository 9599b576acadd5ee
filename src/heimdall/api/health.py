"""Liveness, readiness, metrics and the OpenAPI document.

* ``/healthz``: the process answers; no credentials needed, nothing checked.
* ``/readyz``: the store and the key provider answer, each within a few seconds, and the audit
  trail takes appends (it opens for writing and ends where its head record says): 200, or 503
  naming the one that did not (by an error code, never a message or an address). A check still
  waiting from an earlier request is waited on again rather than started twice, so a provider
  that hangs ties up one thread, however often the probe asks.
* ``/metrics``: Prometheus text from heimdall's own registry (:data:`heimdall.metrics.REGISTRY`:
  the spec's ``heimdall_reencryption_progress``, crypto and KMS call counts, fields by key
  version), refreshed from the store for the job's progress on each scrape and for the field
  counts at most once a minute. Any authenticated role may read it; ``HMD_API_METRICS_PUBLIC``
  opens it to anyone (metrics hold no secret, but versions and rates are nobody else's
  business).
* ``/openapi.json``: any authenticated role.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from heimdall import metrics
from heimdall.api.auth import authenticated
from heimdall.api.deps import audit_log_of, service_of
from heimdall.api.errors import error_of
from heimdall.app import ENVIRONMENT_META
from heimdall.errors import HeimdallError
from heimdall.rotation.job import job_store
from heimdall.rotation.worker import FIELD_COUNTS_EVERY_SECONDS
from heimdall.service import Heimdall

__all__ = ["Readiness", "health_router"]

READY_TIMEOUT_SECONDS: Final = 3.0


class Readiness:
    """Probes the store and the key provider from a small pool of threads of its own."""

    def __init__(self, service: Heimdall, *, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        self._service = service
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="heimdall-ready")
        self._running: dict[str, Future[object]] = {}
        self._lock = threading.Lock()

    def _probes(self) -> dict[str, Callable[[], object]]:
        service = self._service
        probes: dict[str, Callable[[], object]] = {
            "store": lambda: service.store.get_meta(ENVIRONMENT_META),
            "kms": service.kms.describe,
        }
        log = audit_log_of(service)
        if log is not None:
            # Every audited operation is refused while an append would be: not ready then.
            probes["audit"] = log.check_appendable
        return probes

    def check(self) -> dict[str, str]:
        """``ok`` or what went wrong, by check."""
        futures: dict[str, Future[object]] = {}
        with self._lock:
            for name, probe in self._probes().items():
                running = self._running.get(name)
                if running is None or running.done():
                    running = self._running[name] = self._pool.submit(probe)
                futures[name] = running
        deadline = time.monotonic() + self._timeout
        results = {}
        for name, future in futures.items():
            try:
                future.result(timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                results[name] = "not_answering"
            except HeimdallError as exc:
                results[name] = error_of(exc)[1]
            except Exception:  # a probe that fails in a way nobody anticipated
                results[name] = "failed"
            else:
                results[name] = "ok"
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Counts:
    """When the field counts were last refreshed (a GROUP BY over every field)."""

    def __init__(self) -> None:
        self.refreshed = float("-inf")
        self.lock = threading.Lock()


def health_router(*, metrics_public: bool) -> APIRouter:
    router = APIRouter(tags=["health"])
    counts = _Counts()

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process answers (no credentials, nothing checked)."""
        return {"status": "ok"}

    @router.get(
        "/readyz",
        dependencies=[Depends(authenticated)],
        responses={503: {"description": "the store or the key provider did not answer"}},
    )
    def readyz(request: Request) -> JSONResponse:
        """The store and the key provider answer (any authenticated role)."""
        readiness: Readiness = request.app.state.readiness
        checks = readiness.check()
        ready = all(result == "ok" for result in checks.values())
        body = {"status": "ready" if ready else "not_ready", "checks": checks}
        return JSONResponse(body, 200 if ready else 503)

    def scrape(request: Request) -> Response:
        if metrics.REGISTRY is None:  # the server extra brings prometheus-client
            return JSONResponse({"error": {"code": "no_metrics", "message": "no metrics"}}, 503)
        from prometheus_client import (  # noqa: PLC0415 - the server extra, like metrics.py
            CONTENT_TYPE_LATEST,
            generate_latest,
        )

        service = service_of(request)
        jobs = job_store(service)
        metrics.set_job_progress(jobs.active_job() or jobs.latest_job())
        with counts.lock:
            if time.monotonic() - counts.refreshed >= FIELD_COUNTS_EVERY_SECONDS:
                metrics.set_field_counts(service.store.field_counts())
                counts.refreshed = time.monotonic()
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    dependencies: list[Any] = [] if metrics_public else [Depends(authenticated)]
    router.add_api_route(
        "/metrics",
        scrape,
        methods=["GET"],
        dependencies=dependencies,
        summary="Prometheus metrics",
        response_class=Response,
    )

    @router.get("/openapi.json", dependencies=[Depends(authenticated)], include_in_schema=False)
    def openapi(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    return router
