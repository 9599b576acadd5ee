"""Connections to one Vault / OpenBao address.

Requests go out through urllib3 connection pools, one per address, with the environment's
proxy settings (``HTTP(S)_PROXY``/``NO_PROXY``) read once per address and the CA bundle of
``HMD_VAULT_CACERT``. Not through hvac: its requests session costs about twice urllib3's
client CPU per call, and Transit batches are thousands of calls during a rotation (measured
in the ``vault/rewrap-2000`` bench row). hvac remains the admin client (``heimdall vault
bootstrap``). What to do when a request fails is :mod:`heimdall.kms.vault_transport`'s.
"""

from __future__ import annotations

import urllib.request
from typing import Any, NamedTuple

import orjson
import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, MaxRetryError, ProxyError

from heimdall.kms.vault_config import VaultSettings

__all__ = ["UNREACHABLE", "Answer", "cause", "connections", "never_sent"]

# What urlopen raises when no answer arrived: refused, reset, timed out, TLS refused.
UNREACHABLE = (HTTPError, OSError)


class Answer(NamedTuple):
    """One HTTP answer: its status and body."""

    status: int
    body: bytes

    def object(self) -> dict[str, Any] | None:
        """The body as a JSON object; None if it is not one."""
        try:
            value = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None


# Redirects followed (a standby may send a client to the active node); nothing retried here:
# failover and its backoff are the transport's, and only for idempotent calls.
_NO_RETRIES = urllib3.Retry(
    total=None,
    connect=0,
    read=0,
    status=0,
    other=0,
    redirect=2,
    raise_on_redirect=False,
    raise_on_status=False,
)


# Connections are opened as needed; this bounds how many stay open for reuse: the batch
# senders (HMD_VAULT_CONCURRENCY) and every thread that calls the provider itself.
_KEPT_CONNECTIONS = 32


def connections(address: str, settings: VaultSettings) -> urllib3.PoolManager:
    """Connections to one address: through the environment's proxy for it, if any, read once
    here; TLS verified against ``HMD_VAULT_CACERT`` or the system's trust store."""
    url = urllib3.util.parse_url(address)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme or "") or proxies.get("all")
    if proxy and urllib.request.proxy_bypass(url.netloc or ""):
        proxy = None
    options: dict[str, Any] = {
        "num_pools": 4,  # the address and the nodes a standby may redirect to
        "maxsize": _KEPT_CONNECTIONS,
        "timeout": urllib3.Timeout(connect=settings.timeout, read=settings.timeout),
        "retries": _NO_RETRIES,
    }
    if url.scheme == "https":
        if settings.verify is False:
            options["cert_reqs"] = "CERT_NONE"
        else:
            options["cert_reqs"] = "CERT_REQUIRED"
            if isinstance(settings.verify, str):
                options["ca_certs"] = settings.verify
    if proxy:
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


def never_sent(error: BaseException) -> bool:
    """Whether the request certainly did not reach a server: no connection was made (to the
    server or to the proxy in front of it)."""
    if isinstance(error, ProxyError):
        error = error.original_error
    return isinstance(error, ConnectTimeoutError)


def cause(error: BaseException) -> BaseException:
    """The error behind urllib3's "max retries exceeded" wrapper (the wrapped one, if any)."""
    if isinstance(error, MaxRetryError) and error.reason is not None:
        return error.reason
    return error
