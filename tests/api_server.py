"""The API service's test helpers: ``heimdall serve`` as a subprocess, an OIDC issuer's JWKS on
loopback, tokens signed (or forged) in the test, and service tokens made with the CLI.

:class:`ApiServer` runs the installed console script, as an operator would, on a free
127.0.0.1 port in its own process group, its stdout and stderr captured to files (the leak
scanner reads them), and stops it by pid: SIGTERM, then SIGKILL after a grace period; an
``atexit`` hook kills what a crashed session left. :class:`Issuer` holds an RSA and an EC key
generated in the test and serves their public JWKS from a stdlib HTTP server in a thread.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cli_runner import HEIMDALL, clean_environ

LOOPBACK = "127.0.0.1"
ISSUER = "https://idp.heimdall.test/realms/pii"
AUDIENCE = "heimdall-api"
STARTUP_TIMEOUT = 30.0
STOP_GRACE = 10.0
PORT_ATTEMPTS = 3

_LIVE: dict[int, subprocess.Popen[bytes]] = {}
_LIVE_LOCK = threading.Lock()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


@atexit.register
def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- the issuer


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class SigningKey:
    kid: str
    algorithm: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if self.algorithm.startswith(("RS", "PS")):
            data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
        else:
            data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
        return {**data, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def public_pem(self) -> bytes:
        key: bytes = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return key


def rsa_key(kid: str, algorithm: str = "RS256") -> SigningKey:
    return SigningKey(
        kid, algorithm, rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


class Issuer:
    """An OIDC issuer's keys and its JWKS endpoint (``url``), and tokens signed with them."""

    def __init__(self) -> None:
        self.keys: list[SigningKey] = [rsa_key("rsa-1"), ec_key("ec-1")]
        self.fetches = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() serves the JWKS"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/jwks.json"

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.jwk() for key in self.keys]}

    def start(self) -> None:
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)

    def key(self, kid: str) -> SigningKey:
        return next(key for key in self.keys if key.kid == kid)

    def token(
        self,
        *,
        kid: str = "rsa-1",
        lifetime: float = 300,
        key: SigningKey | None = None,
        **claims: Any,
    ) -> str:
        """A token signed by *key* (else the issuer's key *kid*): issuer, audience, a subject,
        ``iat`` and ``exp`` (``lifetime`` seconds from now), then *claims* (None removes)."""
        signer = key or self.key(kid)
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": f"user-{uuid.uuid4().hex[:8]}",
            "iat": now,
            "exp": now + int(lifetime),
            **claims,
        }
        body = {name: value for name, value in body.items() if value is not None}
        return jwt.encode(body, signer.private, algorithm=signer.algorithm, headers={"kid": kid})

    def forged_hs256(self, **claims: Any) -> str:
        """HS256 "signed" with the RSA key's public PEM as the HMAC secret (key confusion)."""
        now = int(time.time())
        header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 300, **claims}
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, body)
        )
        mac = hmac.new(self.key("rsa-1").public_pem(), signing_input.encode(), hashlib.sha256)
        return f"{signing_input}.{_b64url(mac.digest())}"

    def unsigned(self, **claims: Any) -> str:
        """``alg: none``, no signature."""
        now = int(time.time())
        header = {"alg": "none", "typ": "JWT"}
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 300, **claims}
        parts = [_b64url(json.dumps(p, separators=(",", ":")).encode()) for p in (header, body)]
        return ".".join(parts) + "."

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/jwks.json":
                    self.send_error(404)
                    return
                issuer.fetches += 1
                data = json.dumps(issuer.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        return Handler


# --------------------------------------------------------------------------- the server


@dataclass
class ApiServer:
    """A running ``heimdall serve``."""

    url: str
    env: dict[str, str]
    workdir: Path
    stdout_path: Path
    stderr_path: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    @property
    def data_dir(self) -> Path:
        return Path(self.env["HMD_DATA_DIR"])

    @property
    def audit_log(self) -> Path:
        return self.data_dir / "audit.log"

    @property
    def database(self) -> Path:
        return self.data_dir / "heimdall.db"

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            base_url=self.url, headers=headers, timeout=30, trust_env=False, **kwargs
        )

    def cli(
        self, *args: str, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the CLI on the server's data dir as the local operator (no HMD_ROLE)."""
        assert HEIMDALL is not None
        cli_env = {k: v for k, v in self.env.items() if k not in ("HMD_ROLE", "HMD_ACTOR")}
        return subprocess.run(
            [HEIMDALL, *args],
            cwd=self.workdir,
            env={**cli_env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def service_token(self, role: str, name: str | None = None) -> str:
        result = self.cli(
            "tokens", "create", "--role", role, "--name", name or f"t-{uuid.uuid4().hex[:8]}"
        )
        assert result.returncode == 0, result.stderr
        token = result.stdout.strip().splitlines()[0]
        assert token.startswith("hmd_")
        return token

    def logs(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, SIGKILL after a grace period; the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with _LIVE_LOCK:
            _LIVE.pop(self.proc.pid, None)
        return self.proc.returncode


def _wait_ready(server: ApiServer) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if not server.running:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/healthz", timeout=2, trust_env=False).status_code == 200:
                return True
        time.sleep(0.05)
    return False


def start_server(workdir: Path, env: Mapping[str, str]) -> ApiServer:
    """``heimdall serve`` with a clean environment plus *env*, on a free loopback port."""
    assert HEIMDALL is not None
    workdir.mkdir(parents=True, exist_ok=True)
    base = clean_environ()
    # Every refusal audited one by one: the tests count them (a test of the limit sets it).
    base.update(
        {
            "HMD_DATA_DIR": str(workdir / "data"),
            "HMD_AUDIT_FSYNC": "false",
            "HMD_API_REFUSALS_PER_MINUTE": "0",
        }
    )
    base.update(env)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        full = {**base, "HMD_API_LISTEN": f"{LOOPBACK}:{port}"}
        stdout_path, stderr_path = workdir / "serve.out", workdir / "serve.err"
        with stdout_path.open("ab") as out, stderr_path.open("ab") as err:
            proc = subprocess.Popen(
                [HEIMDALL, "serve"],
                cwd=workdir,
                env=full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        with _LIVE_LOCK:
            _LIVE[proc.pid] = proc
        server = ApiServer(
            f"http://{LOOPBACK}:{port}", full, workdir, stdout_path, stderr_path, proc
        )
        if _wait_ready(server):
            return server
        server.stop()
        if attempt < PORT_ATTEMPTS and "address already in use" in server.logs().lower():
            continue
        pytest.fail(f"heimdall serve did not start:\n{server.logs()[-4000:]}", pytrace=False)
    raise AssertionError("unreachable")


def oidc_env(issuer: Issuer, **more: str) -> dict[str, str]:
    return {
        "HMD_OIDC_ISSUER": ISSUER,
        "HMD_OIDC_AUDIENCE": AUDIENCE,
        "HMD_OIDC_JWKS_URL": issuer.url,
        "HMD_OIDC_JWKS_REFRESH_SECONDS": "1",
        **more,
    }


@contextlib.contextmanager
def running_issuer() -> Iterator[Issuer]:
    issuer = Issuer()
    issuer.start()
    try:
        yield issuer
    finally:
        issuer.stop()


def audit_records(path: Path) -> list[dict[str, Any]]:
    """Every record of the audit log, oldest first (read as a file, as a reviewer would)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
