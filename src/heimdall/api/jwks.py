"""The issuer's signing keys, fetched from its JWKS URL and kept for every request to use.

A lookup never waits on the network behind another request: the key set is a snapshot that any
thread reads without a lock. It is fetched again, by one thread at a time, when it is older than
:data:`LIFESPAN_SECONDS` or a token names a ``kid`` it lacks (a key the issuer has just added),
but at most once per ``HMD_OIDC_JWKS_REFRESH_SECONDS`` whatever the outcome: tokens with random
``kid`` values, or an identity provider that fails or hangs, never make heimdall ask it more
often. While a fetch runs, or after one failed, the last set fetched still serves, for up to
:data:`LIFESPAN_SECONDS` past its own lifespan; after that, and before the first fetch succeeds,
tokens are refused with 503 ``identity_provider_unavailable``.

A fetch is bounded as a whole, not per read (a server trickling one byte at a time, of the
headers or the body, is cut off at the deadline): :data:`TIMEOUT_SECONDS` and :data:`MAX_BYTES`
of the bytes as sent (nothing compressed is accepted, so nothing unpacks past the cap), no
redirects, TLS verified against the system's trust store. No request waits for a fetch another
one is making. A failure is logged in one line (the URL and what went wrong, never the body)
and leaves the last set in place.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import threading
import time
from collections.abc import Callable
from typing import Final

import httpx
import jwt
import orjson

from heimdall.errors import HeimdallError

__all__ = ["LIFESPAN_SECONDS", "MAX_BYTES", "TIMEOUT_SECONDS", "KeysUnavailable", "RemoteKeySet"]

LIFESPAN_SECONDS: Final = 300.0
TIMEOUT_SECONDS: Final = 5.0
MAX_BYTES: Final = 1024 * 1024

_log = logging.getLogger("heimdall.api")


class KeysUnavailable(HeimdallError):
    """There is no key set to look in: none could be fetched yet, or the last is too old."""


class _FetchFailed(Exception):
    pass


class RemoteKeySet:
    """The signing keys at *url*. Safe to share between threads."""

    def __init__(
        self,
        url: str,
        *,
        refresh_seconds: float,
        lifespan_seconds: float = LIFESPAN_SECONDS,
        timeout_seconds: float = TIMEOUT_SECONDS,
        max_bytes: int = MAX_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._refresh = refresh_seconds
        self._lifespan = lifespan_seconds
        self._timeout = timeout_seconds
        self._max_bytes = max_bytes
        self._monotonic = monotonic
        # One snapshot, replaced whole: (the signing keys, when they were fetched).
        self._snapshot: tuple[tuple[jwt.PyJWK, ...], float] | None = None
        self._attempted = -math.inf  # the last fetch's start, whatever came of it
        self._fetching = threading.Lock()

    def find(self, kid: str | None) -> jwt.PyJWK | None:
        """The signing key *kid* names (without a *kid*, the set's only key, if it has one);
        None if there is no such key. KeysUnavailable when there is no set to look in."""
        snapshot = self._snapshot
        now = self._monotonic()
        if (
            snapshot is None
            or now - snapshot[1] >= self._lifespan
            or _select(snapshot[0], kid) is None
        ):
            self._refresh_if_due()
            snapshot = self._snapshot
        if snapshot is None:
            raise KeysUnavailable("the identity provider's keys could not be fetched")
        keys, fetched = snapshot
        if self._monotonic() - fetched >= 2 * self._lifespan:
            raise KeysUnavailable("the identity provider's keys are too old to trust")
        return _select(keys, kid)

    def _refresh_if_due(self) -> None:
        """Fetch the set if no fetch started within the refresh interval and none is running.
        No thread waits for a fetch another one is making: it uses the set there is (or, with
        none yet, is answered 503 at once)."""
        attempted = self._attempted
        if self._monotonic() - attempted < self._refresh:
            return
        if not self._fetching.acquire(blocking=False):
            return
        try:
            if self._attempted != attempted:
                return  # fetched (or tried) while this thread waited for the lock
            self._attempted = self._monotonic()
            try:
                keys = _signing_keys(self._fetch())
            except _FetchFailed as failure:
                _log.warning(
                    "the identity provider's keys could not be fetched from %s: %s",
                    self.url,
                    failure,
                )
                return
            self._snapshot = (keys, self._monotonic())
        finally:
            self._fetching.release()

    def _fetch(self) -> bytes:
        """The key set's bytes, in at most the timeout all told: asyncio cancels the fetch at
        the deadline wherever it is (connecting, the headers, the body), where a client's own
        timeouts bound each read alone and a server sending a byte at a time never trips
        them."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no loop in this thread (a worker thread of the server): one is made below
        else:
            raise _FetchFailed("called on a thread that runs an event loop")
        # Not asyncio.run: it waits, without limit, for the loop's resolver thread, which a
        # slow DNS server holds past the deadline. A closed loop leaves that thread to finish.
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(asyncio.wait_for(self._get(), self._timeout))
        except TimeoutError:
            raise _FetchFailed(f"the fetch took over {self._timeout:g} s") from None
        except _FetchFailed:
            raise
        except Exception as exc:  # httpx's errors, a URL it cannot use, anything else
            raise _FetchFailed(type(exc).__name__) from None
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _get(self) -> bytes:
        body = bytearray()
        async with (
            httpx.AsyncClient(
                # The connection (and TLS handshake) ends itself before the deadline cancels
                # it: a cancelled handshake would leave its socket open until collected.
                timeout=httpx.Timeout(self._timeout, connect=self._timeout / 2),
                follow_redirects=False,
                verify=ssl.create_default_context(),
            ) as client,
            client.stream(
                "GET",
                self.url,
                # Bytes as sent, never decompressed: a few compressed KB can unpack to gigabytes
                # before any cap on what was read could stop them.
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
            ) as answer,
        ):
            if answer.status_code != 200:
                raise _FetchFailed(f"HTTP status {answer.status_code}")
            if answer.headers.get("content-encoding", "identity").strip().lower() != "identity":
                raise _FetchFailed("the key set came compressed, though it was asked for as is")
            async for chunk in answer.aiter_raw():
                body += chunk
                if len(body) > self._max_bytes:
                    raise _FetchFailed(f"the key set is over {self._max_bytes:,} bytes")
        return bytes(body)


def _signing_keys(body: bytes) -> tuple[jwt.PyJWK, ...]:
    try:
        keys = jwt.PyJWKSet.from_dict(orjson.loads(body)).keys
    except (ValueError, TypeError, AttributeError, jwt.PyJWTError):
        raise _FetchFailed("the answer is not a JSON Web Key Set with a usable key") from None
    return tuple(key for key in keys if key.public_key_use in ("sig", None))


def _select(keys: tuple[jwt.PyJWK, ...], kid: str | None) -> jwt.PyJWK | None:
    if kid is None:
        return keys[0] if len(keys) == 1 else None
    return next((key for key in keys if key.key_id == kid), None)
