"""Prometheus metrics: re-encryption progress, crypto and KMS call counts, fields per key version.

spec: Key Rotation Strategy ("Track progress via metrics/dashboard"); Migration Strategy,
Phase 4 ("Progress tracking and metrics (Prometheus counters)"); Runbook: Routine Key Rotation,
step 3 and Runbook: Re-encryption After Migration, step 3 (``heimdall_reencryption_progress``).

Every metric lives in :data:`REGISTRY`, a registry of heimdall's own (not prometheus_client's
global one), so an embedding application's metrics never collide with these and tests read exact
values. prometheus-client comes with the ``server`` extra; without it every function here is a
no-op and ``REGISTRY`` is None, so the core stays light and the call sites stay one line.

Security: labels are closed sets (operation, provider, result, status, versions) and values are
counts and durations. No label or value ever holds a canonical key, a plaintext, an envelope,
key material or a key name.

Counting is per batch, never per field: :class:`heimdall.cipher.FieldCipher` seals ~180k fields/s
and a labelled counter increment per field would cost a large share of that.

``heimdall_kms_calls_total`` and ``heimdall_kms_call_seconds``: every call to a key provider,
counted once and timed by the one seam all providers sit behind
(:class:`heimdall.kms.provider.KeyProvider`), which reports to the observer the composition root
gives it, :func:`record_kms_call`: the provider, the operation (``generate_data_key``, ``wrap``,
``unwrap``, ``rewrap``, ``rotate``, ``configure``, ``describe``, ...) and how it ended
(``success``, ``unavailable``, ``denied``, ``not_found``, ``disabled``, ``invalid``,
``failure``). A batch is one call, whatever the service does underneath (Vault splits it into
``batch_input`` requests, a cloud KMS sends its items side by side).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol

from heimdall.errors import ConfigurationError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

    from heimdall.cipher import Cipher
    from heimdall.store.base import FieldCount
    from heimdall.store.jobs import Job

__all__ = [
    "CRYPTO_OPERATIONS",
    "REGISTRY",
    "CryptoBatch",
    "Tally",
    "add_reencrypted",
    "record_crypto",
    "record_kms_call",
    "serve",
    "set_field_counts",
    "set_job_progress",
]

CRYPTO_OPERATIONS: Final = frozenset({"encrypt", "decrypt", "rewrap", "reencrypt"})
_RESULTS: Final = frozenset({"success", "failure"})
_SECONDS_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import (  # noqa: PLC0415 - optional: the server extra
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
        )

        self.registry = registry = CollectorRegistry()
        self.progress = Gauge(
            "heimdall_reencryption_progress",
            "Fields of the active (else the latest) re-encryption job, by status.",
            ["status"],
            registry=registry,
        )
        self.reencrypted = Counter(
            "heimdall_reencrypted_fields_total",
            "Fields whose update a re-encryption job batch committed.",
            registry=registry,
        )
        self.crypto = Counter(
            "heimdall_crypto_operations_total",
            "Fields encrypted, decrypted, rewrapped or re-encrypted, counted per batch.",
            ["operation", "provider", "result"],
            registry=registry,
        )
        self.seconds = Histogram(
            "heimdall_crypto_operation_seconds",
            "Duration of one batch of field crypto operations.",
            ["operation", "provider"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.kms_calls = Counter(
            "heimdall_kms_calls_total",
            "Calls to the key provider, by operation and how they ended (a batch is one call).",
            ["provider", "operation", "result"],
            registry=registry,
        )
        self.kms_seconds = Histogram(
            "heimdall_kms_call_seconds",
            "Duration of one call to the key provider.",
            ["provider", "operation"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.fields = Gauge(
            "heimdall_fields_by_key_version",
            "Stored fields by encryption_version and key_version.",
            ["encryption_version", "key_version"],
            registry=registry,
        )


def _load() -> _Metrics | None:
    try:
        return _Metrics()
    except ImportError:  # the core installs without the server extra
        return None


_METRICS: Final = _load()
REGISTRY: Final[CollectorRegistry | None] = _METRICS.registry if _METRICS else None
_LOCK: Final = threading.Lock()


def record_crypto(
    operation: str, provider: str, result: str, count: int, seconds: float | None
) -> None:
    """Count *count* fields of one batch; observe the batch's duration unless it is None."""
    if operation not in CRYPTO_OPERATIONS or result not in _RESULTS:
        raise ValueError(f"unknown crypto operation {operation!r} or result {result!r}")
    if _METRICS is None or count <= 0:
        return
    _METRICS.crypto.labels(operation, provider, result).inc(count)
    if seconds is not None:
        _METRICS.seconds.labels(operation, provider).observe(seconds)


def record_kms_call(provider: str, operation: str, result: str, seconds: float) -> None:
    """Count and time one call to a key provider: a :class:`heimdall.kms.base.KmsCallObserver`."""
    if _METRICS is not None:
        _METRICS.kms_calls.labels(provider, operation, result).inc()
        _METRICS.kms_seconds.labels(provider, operation).observe(seconds)


def add_reencrypted(count: int) -> None:
    if _METRICS is not None and count > 0:
        _METRICS.reencrypted.inc(count)


def set_job_progress(job: Job | None) -> None:
    """Show *job*'s counters (zeros when no job has run, so the series always exist)."""
    if _METRICS is None:
        return
    total, completed, failed = (job.total, job.completed, job.failed) if job else (0, 0, 0)
    _METRICS.progress.labels("total").set(total)
    _METRICS.progress.labels("completed").set(completed)
    _METRICS.progress.labels("failed").set(failed)


def set_field_counts(counts: Iterable[FieldCount]) -> None:
    """Replace the fields-by-key-version gauge with *counts* (versions no longer held vanish).
    Fields under several keys at one version number (while a deployment moves between key
    providers) are counted together: the gauge's labels are the spec's, with no key name."""
    if _METRICS is None:
        return
    totals: dict[tuple[str, str], int] = {}
    for count in counts:
        labels = (count.encryption_version, str(count.key_version))
        totals[labels] = totals.get(labels, 0) + count.count
    gauge = _METRICS.fields
    with _LOCK:
        gauge.clear()
        for labels, total in totals.items():
            gauge.labels(*labels).set(total)


def serve(port: int, addr: str = "127.0.0.1") -> WSGIServer:
    """Serve ``/metrics`` on *addr*:*port* from a daemon thread; the server (``shutdown()``
    stops it, ``server_port`` is the port when *port* was 0)."""
    if _METRICS is None:
        raise ConfigurationError(
            "serving metrics needs the server extra: pip install 'heimdall[server]'"
        )
    from prometheus_client import start_http_server  # noqa: PLC0415 - optional: the server extra

    try:
        server, _ = start_http_server(port, addr=addr, registry=_METRICS.registry)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {addr}:{port}: {exc.strerror or type(exc).__name__}"
        ) from None
    return server


class Tally(Protocol):
    """Anything that counts per-field failures, e.g. a re-encryption run's report."""

    failed: int


class CryptoBatch:
    """One batch of field operations, measured from creation to :meth:`finish`.

    ``with CryptoBatch(...):`` finishes it on exit: *count* fields succeeded, less the rise of
    ``tally.failed`` during the block (fields that failed one by one); an exception fails all
    *count*. The first of *ciphers* names the provider label (their KMS calls are counted by
    the providers themselves).
    """

    def __init__(
        self,
        operation: str,
        count: int,
        *ciphers: Cipher | None,
        tally: Tally | None = None,
    ) -> None:
        if operation not in CRYPTO_OPERATIONS:
            raise ValueError(f"unknown crypto operation {operation!r}")
        self.operation = operation
        self.count = count
        present = [cipher for cipher in ciphers if cipher is not None]
        self._ciphers = list({id(cipher): cipher for cipher in present}.values())
        self.provider = self._ciphers[0].kms.provider if self._ciphers else "none"
        self._tally = tally
        self._failed_before = tally.failed if tally else 0
        self._started = time.perf_counter()
        self._finished = False

    def finish(self, *, failed: int = 0) -> None:
        """Record the batch once: ``count - failed`` successes and *failed* failures."""
        if self._finished:
            return
        self._finished = True
        seconds = time.perf_counter() - self._started
        failed = min(failed, self.count)
        # One duration per batch, observed with whichever count comes first.
        record_crypto(self.operation, self.provider, "success", self.count - failed, seconds)
        timed = self.count - failed > 0
        record_crypto(self.operation, self.provider, "failure", failed, None if timed else seconds)

    def __enter__(self) -> CryptoBatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.finish(failed=self.count)
        elif self._tally is not None:
            self.finish(failed=self._tally.failed - self._failed_before)
        else:
            self.finish()
