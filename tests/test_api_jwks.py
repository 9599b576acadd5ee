"""The OIDC issuer's key set over HTTP (heimdall.api.jwks), against a JWKS endpoint served here
on loopback whose answers the tests choose: slow, trickling, failing, oversize, not JSON, a
redirect. No lookup waits behind a fetch, fetches are rate-limited whatever their outcome, a
fetch is bounded as a whole, and a failure is a 503 of the identity provider, never a 500.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from api_server import AUDIENCE, ISSUER, LOOPBACK, Issuer, rsa_key
from heimdall.api.config import OidcSettings
from heimdall.api.errors import ApiError, Unauthenticated
from heimdall.api.jwks import KeysUnavailable, RemoteKeySet
from heimdall.api.oidc import OidcVerifier


@dataclass
class Endpoint:
    """What the JWKS endpoint answers next, and how often it was asked."""

    issuer: Issuer
    status: int = 200
    body: bytes | None = None  # None: the issuer's key set
    delay: float = 0.0  # before answering
    trickle: float = 0.0  # seconds between single bytes of the body
    location: str | None = None  # a redirect
    header_trickle: float = 0.0  # seconds between single bytes of a header
    gzip: bool = False  # the body compressed, whatever the client asked for
    hits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self) -> bytes:
        return self.body if self.body is not None else json.dumps(self.issuer.jwks()).encode()


@pytest.fixture
def endpoint() -> Iterator[tuple[Endpoint, str]]:
    state = Endpoint(Issuer())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state.lock:
                state.hits += 1
            time.sleep(state.delay)
            body = state.answer()
            if state.gzip:
                body = gzip.compress(body)
            self.send_response(state.status)
            if state.header_trickle:
                self.flush_headers()
                try:
                    for byte in b"X-Slow: " + b"x" * 200:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(state.header_trickle)
                except OSError:
                    return  # the client gave up
            if state.gzip:
                self.send_header("Content-Encoding", "gzip")
            if state.location:
                self.send_header("Location", state.location)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                if state.trickle:
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(state.trickle)
                else:
                    self.wfile.write(body)
            except OSError:
                pass  # the client gave up

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state, f"http://{LOOPBACK}:{server.server_address[1]}/jwks"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _verifier(url: str, **remote: Any) -> OidcVerifier:
    verifier = OidcVerifier(
        OidcSettings(issuer=ISSUER, audience=AUDIENCE, jwks_url=url, jwks_refresh_seconds=1)
    )
    options = {"refresh_seconds": 1.0, "timeout_seconds": 1.0, **remote}
    verifier._remote = RemoteKeySet(url, **options)
    return verifier


def test_a_lookup_does_not_wait_behind_a_slow_fetch(endpoint: tuple[Endpoint, str]) -> None:
    state, url = endpoint
    verifier = _verifier(url, timeout_seconds=1.5)
    assert verifier.verify(state.issuer.token(sub="warm")).actor == "oidc:warm"
    time.sleep(1.1)  # the refresh interval has passed
    state.trickle = 0.05  # the next fetch trickles for longer than the deadline

    unknown = state.issuer.token(key=rsa_key("rsa-new"), kid="rsa-new", sub="x")
    outcome: list[BaseException] = []

    def verify_unknown() -> None:
        try:
            verifier.verify(unknown)
        except Unauthenticated as refused:  # no such key: the slow fetch was cut off
            outcome.append(refused)

    slow = threading.Thread(target=verify_unknown)
    slow.start()
    deadline = time.monotonic() + 2
    while state.hits < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.hits == 2  # the fetch for the unknown kid is under way
    started = time.monotonic()
    assert verifier.verify(state.issuer.token(sub="cached")).actor == "oidc:cached"
    assert time.monotonic() - started < 1.0  # the fetch under way takes 1.5 s
    slow.join(timeout=10)
    assert not slow.is_alive()
    assert [type(refused) for refused in outcome] == [Unauthenticated]


@pytest.mark.parametrize(
    ("knob", "pace"),
    [
        pytest.param("trickle", 0.05, id="the-body"),  # ~1 KB: about a minute
        pytest.param("header_trickle", 0.2, id="the-headers"),  # each read well within timeout
    ],
)
def test_a_fetch_sent_a_byte_at_a_time_is_cut_off_at_its_deadline(
    endpoint: tuple[Endpoint, str], knob: str, pace: float
) -> None:
    state, url = endpoint
    setattr(state, knob, pace)
    keys = RemoteKeySet(url, refresh_seconds=1.0, timeout_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(KeysUnavailable):
        keys.find("rsa-1")
    assert time.monotonic() - started < 1.5


def test_a_slow_name_lookup_does_not_hold_the_fetch_past_its_deadline(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    resolve = socket.getaddrinfo

    def slow(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "jwks.slow.test":
            time.sleep(3.0)  # a resolver that takes its time (glibc retries take longer)
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    keys = RemoteKeySet("http://jwks.slow.test:9/jwks", refresh_seconds=1.0, timeout_seconds=0.5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "heimdall.api"), pytest.raises(KeysUnavailable):
        keys.find("rsa-1")
    assert time.monotonic() - started < 2.0
    assert "the identity provider's keys could not be fetched from" in caplog.text


@pytest.mark.parametrize(
    "url", ["https://xn--a.test/jwks", "http://127.0.0.1:1/jwks"], ids=["bad-idna", "refused"]
)
def test_a_url_that_cannot_be_fetched_is_one_warning_and_a_503(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys = RemoteKeySet(url, refresh_seconds=1.0, timeout_seconds=1.0)
    with caplog.at_level(logging.WARNING, "heimdall.api"), pytest.raises(KeysUnavailable):
        keys.find("rsa-1")
    (record,) = caplog.records
    assert record.getMessage().startswith(
        f"the identity provider's keys could not be fetched from {url}: "
    )


def test_a_fetch_on_a_thread_running_an_event_loop_fails_as_a_503(
    endpoint: tuple[Endpoint, str],
) -> None:
    _, url = endpoint
    keys = RemoteKeySet(url, refresh_seconds=1.0)

    async def inside() -> None:
        with pytest.raises(KeysUnavailable):
            keys.find("rsa-1")

    asyncio.run(inside())


def test_a_compressed_key_set_is_refused_not_unpacked(
    endpoint: tuple[Endpoint, str], caplog: pytest.LogCaptureFixture
) -> None:
    state, url = endpoint
    state.body = b'{"keys": []' + b" " * 50_000_000 + b"}"  # 50 MB that compress to 50 KB
    state.gzip = True
    with caplog.at_level(logging.WARNING, "heimdall.api"), pytest.raises(KeysUnavailable):
        RemoteKeySet(url, refresh_seconds=1.0).find("rsa-1")
    assert state.hits == 1
    assert "the key set came compressed, though it was asked for as is" in caplog.text


def test_no_request_waits_for_a_fetch_another_is_making(endpoint: tuple[Endpoint, str]) -> None:
    state, url = endpoint
    state.delay = 2.0
    keys = RemoteKeySet(url, refresh_seconds=1.0, timeout_seconds=4.0)
    first = threading.Thread(target=lambda: keys.find("rsa-1"))
    first.start()
    deadline = time.monotonic() + 2
    while state.hits < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(KeysUnavailable):  # no key set yet, one being fetched: 503 at once
        keys.find("rsa-1")
    assert time.monotonic() - started < 1.0  # the fetch under way takes 2 s
    first.join(timeout=10)
    assert keys.find("rsa-1") is not None  # the first fetch brought it
    assert state.hits == 1


@pytest.mark.parametrize(
    "failure",
    [
        {"status": 500},
        {"body": b"<html>an error page</html>"},
        {"body": b"{not json"},
        {"body": b'{"keys": "none"}'},
        {"body": b"[]"},
        {"body": json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}] * 40_000}).encode()},
        {"status": 302, "location": "http://127.0.0.1:9/elsewhere"},
    ],
    ids=["500", "html", "not-json", "keys-not-a-list", "a-list", "over-1-MiB", "redirect"],
)
def test_a_failed_fetch_is_a_503_and_is_not_retried_within_the_interval(
    endpoint: tuple[Endpoint, str], failure: dict[str, Any]
) -> None:
    state, url = endpoint
    for name, value in failure.items():
        setattr(state, name, value)
    verifier = _verifier(url)
    impostor = rsa_key("k")
    for n in range(20):  # random kids, as an attacker would send
        token = state.issuer.token(key=impostor, kid=f"k-{n}")
        with pytest.raises(ApiError) as refused:
            verifier.verify(token)
        assert (refused.value.status, refused.value.code) == (503, "identity_provider_unavailable")
    assert state.hits == 1
    time.sleep(1.1)
    with pytest.raises(ApiError):
        verifier.verify(state.issuer.token())
    assert state.hits == 2


def test_unknown_kids_fetch_at_most_once_per_interval(endpoint: tuple[Endpoint, str]) -> None:
    state, url = endpoint
    verifier = _verifier(url)
    verifier.verify(state.issuer.token())
    impostor = rsa_key("r")
    tokens = [state.issuer.token(key=impostor, kid=f"r-{n}") for n in range(50)]
    time.sleep(1.1)
    for token in tokens:
        with pytest.raises(Unauthenticated, match="no key of the issuer matches"):
            verifier.verify(token)
    assert state.hits == 2


def test_the_last_key_set_serves_while_the_issuer_is_down_then_expires(
    endpoint: tuple[Endpoint, str],
) -> None:
    state, url = endpoint
    clock = [1000.0]
    keys = RemoteKeySet(
        url, refresh_seconds=1.0, lifespan_seconds=300.0, monotonic=lambda: clock[0]
    )
    assert keys.find("rsa-1") is not None
    state.status = 503
    clock[0] += 400  # stale: a fetch is tried, fails, and the last set still serves
    assert keys.find("rsa-1") is not None
    assert state.hits == 2
    clock[0] += 250  # over twice the lifespan since the last fetch that worked
    with pytest.raises(KeysUnavailable, match="too old"):
        keys.find("rsa-1")
    state.status = 200
    clock[0] += 2
    assert keys.find("rsa-1") is not None  # the issuer is back
    assert state.hits == 4
