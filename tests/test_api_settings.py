"""The API service's settings (``HMD_API_*``, ``HMD_OIDC_*``), its OIDC token checks, and
``heimdall serve``'s refusals, without a running server.

The token tests use a JWKS file and tokens signed in the test with RSA, EC and Ed25519 keys:
each check of :mod:`heimdall.api.oidc` (signature, algorithm allow-list, key binding, ``exp``,
``nbf``, ``iss``, ``aud``, leeway, the roles claim) has a token that passes it only if it holds.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import ssl
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from api_server import AUDIENCE, ISSUER, LOOPBACK, Issuer, SigningKey, free_port, rsa_key
from cli_runner import HEIMDALL, Cli, assert_one_line_error, clean_environ
from heimdall.api.config import DEFAULT_ALGORITHMS, OidcSettings
from heimdall.api.errors import Unauthenticated
from heimdall.api.oidc import OidcVerifier
from heimdall.errors import ConfigurationError
from heimdall.rbac import Role
from heimdall.settings import Settings

OIDC = {
    "HMD_OIDC_ISSUER": ISSUER,
    "HMD_OIDC_AUDIENCE": AUDIENCE,
    "HMD_OIDC_JWKS_URL": "https://idp.example.com/jwks.json",
}


def _refusal(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigurationError) as excinfo:
        Settings.from_env(environ)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_the_defaults_serve_on_loopback_with_no_oidc() -> None:
    api = Settings.from_env({}).api
    assert (api.host, api.port, api.listen) == ("127.0.0.1", 8700, "127.0.0.1:8700")
    assert api.oidc is None and api.tls_cert is None and not api.metrics_public
    assert (api.max_body_bytes, api.max_batch, api.trusted_proxies) == (1024 * 1024, 1000, ())


def test_every_api_setting_is_read() -> None:
    api = Settings.from_env(
        {
            **OIDC,
            "HMD_API_LISTEN": "[::1]:9443",
            "HMD_API_TLS_CERT": "/etc/heimdall/tls.crt",
            "HMD_API_TLS_KEY": "/etc/heimdall/tls.key",
            "HMD_API_METRICS_PUBLIC": "yes",
            "HMD_API_MAX_BODY_BYTES": "2048",
            "HMD_API_MAX_BATCH": "50",
            "HMD_API_REFUSALS_PER_MINUTE": "0",
            "HMD_API_TRUSTED_PROXIES": "10.0.0.1, 10.0.0.2",
            "HMD_OIDC_ROLES_CLAIM": "groups",
            "HMD_OIDC_ROLE_MAP": "pii-admins=heimdall-admin, auditors=heimdall-audit",
            "HMD_OIDC_ALGORITHMS": "ES256,RS256",
            "HMD_OIDC_LEEWAY": "5",
        }
    ).api
    assert (api.host, api.port, api.listen) == ("::1", 9443, "[::1]:9443")
    assert api.tls_cert == Path("/etc/heimdall/tls.crt")
    assert api.metrics_public and api.max_body_bytes == 2048 and api.max_batch == 50
    assert api.refusals_per_minute == 0
    assert api.trusted_proxies == ("10.0.0.1", "10.0.0.2")
    assert api.oidc == OidcSettings(
        issuer=ISSUER,
        audience=AUDIENCE,
        jwks_url="https://idp.example.com/jwks.json",
        roles_claim="groups",
        role_map=(("pii-admins", Role.ADMIN), ("auditors", Role.AUDIT)),
        algorithms=("ES256", "RS256"),
        leeway_seconds=5.0,
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"HMD_API_LISTEN": "8700"}, "HMD_API_LISTEN='8700' is not host:port"),
        ({"HMD_API_LISTEN": "host:99999"}, "is not host:port"),
        ({"HMD_API_LISTEN": "::1:8700"}, "is not host:port (e.g. 127.0.0.1:8700 or [::1]:8700)"),
        (
            {"HMD_API_LISTEN": "127.0.0.1:\uff18\uff17\uff10\uff10"},
            "is not host:port",
        ),  # full-width
        ({"HMD_API_TLS_CERT": "/c.pem"}, "HMD_API_TLS_CERT and HMD_API_TLS_KEY go together"),
        ({"HMD_API_TLS_KEY": "/k.pem"}, "HMD_API_TLS_CERT and HMD_API_TLS_KEY go together"),
        ({"HMD_API_METRICS_PUBLIC": "maybe"}, "must be true or false"),
        ({"HMD_API_MAX_BATCH": "0"}, "HMD_API_MAX_BATCH must be between 1 and 100000"),
        ({"HMD_API_MAX_BODY_BYTES": "lots"}, "must be a number"),
        ({"HMD_OIDC_AUDIENCE": "a"}, "HMD_OIDC_AUDIENCE is set but HMD_OIDC_ISSUER is not"),
        ({"HMD_OIDC_ISSUER": ISSUER}, "HMD_OIDC_ISSUER is set but HMD_OIDC_AUDIENCE is not"),
        ({**OIDC, "HMD_OIDC_JWKS_FILE": "/j.json"}, "exactly one of HMD_OIDC_JWKS_URL"),
        (
            {**OIDC, "HMD_OIDC_JWKS_URL": "http://idp.example.com/jwks.json"},
            "must be an https:// URL (http:// only on loopback)",
        ),
        (
            {**OIDC, "HMD_OIDC_JWKS_URL": "file:///etc/passwd"},
            "must be an https:// URL",
        ),
        ({**OIDC, "HMD_OIDC_ALGORITHMS": "RS256,none"}, "may not allow none"),
        ({**OIDC, "HMD_OIDC_ALGORITHMS": "HS256"}, "may not allow HS256"),
        ({**OIDC, "HMD_OIDC_ALGORITHMS": "hs512"}, "may not allow hs512"),
        ({**OIDC, "HMD_OIDC_ALGORITHMS": "RS1"}, "names 'RS1', not one of"),
        ({**OIDC, "HMD_OIDC_ROLE_MAP": "admins"}, "is not claim-value=heimdall-role"),
        ({**OIDC, "HMD_OIDC_ROLE_MAP": "a=root"}, "maps to 'root', not a heimdall role"),
        ({**OIDC, "HMD_OIDC_ROLE_MAP": "a=heimdall-app,a=heimdall-audit"}, "maps 'a' twice"),
        ({**OIDC, "HMD_OIDC_LEEWAY": "3600"}, "HMD_OIDC_LEEWAY must be between 0 and 300"),
        (
            {**OIDC, "HMD_OIDC_JWKS_URL": "https://idp.example.com:99999/jwks"},
            "HMD_OIDC_JWKS_URL is not a usable URL (its host or port is not valid)",
        ),
        (
            {**OIDC, "HMD_OIDC_JWKS_URL": "https://idp.example.com/jw ks"},
            "HMD_OIDC_JWKS_URL holds a space or a control character",
        ),
        (
            {**OIDC, "HMD_OIDC_MAX_LIFETIME_SECONDS": "10"},
            "HMD_OIDC_MAX_LIFETIME_SECONDS must be between 60 and",
        ),
        (
            {**OIDC, "HMD_OIDC_JWKS_REFRESH_SECONDS": "0"},
            "HMD_OIDC_JWKS_REFRESH_SECONDS must be between 1 and 3600",
        ),
    ],
)
def test_a_bad_api_setting_is_one_line(environ: dict[str, str], message: str) -> None:
    assert message in _refusal(environ)


def test_an_http_jwks_on_loopback_is_allowed() -> None:
    settings = Settings.from_env({**OIDC, "HMD_OIDC_JWKS_URL": "http://127.0.0.1:9/jwks.json"})
    assert settings.api.oidc is not None
    assert settings.api.oidc.jwks_url == "http://127.0.0.1:9/jwks.json"


# -- tokens ---------------------------------------------------------------------------------


def _ed25519_jwk(kid: str, key: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    data = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    return {**data, "kid": kid, "use": "sig", "alg": "EdDSA"}


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    """Keys only: the JWKS goes to a file, no server is started."""
    return Issuer()


def _verifier(
    issuer: Issuer, tmp_path: Path, extra: list[dict[str, Any]] | None = None, **settings: Any
) -> OidcVerifier:
    jwks = issuer.jwks()
    jwks["keys"].extend(extra or [])
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    return OidcVerifier(OidcSettings(issuer=ISSUER, audience=AUDIENCE, jwks_file=path, **settings))


def _refused(verifier: OidcVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as excinfo:
        verifier.verify(token)
    assert token not in str(excinfo.value)
    return excinfo.value.reason


def test_a_valid_token_gives_the_actor_and_the_roles(issuer: Issuer, tmp_path: Path) -> None:
    verifier = _verifier(issuer, tmp_path)
    for kid in ("rsa-1", "ec-1"):
        identity = verifier.verify(
            issuer.token(
                kid=kid,
                email="user@example.com",
                email_verified=True,
                roles=["heimdall-admin", "x"],
            )
        )
        assert identity.actor == "oidc:user@example.com"
        assert identity.roles == frozenset({Role.ADMIN})


def test_an_ed25519_token_is_accepted(issuer: Issuer, tmp_path: Path) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    verifier = _verifier(issuer, tmp_path, [_ed25519_jwk("ed-1", private)])
    token = issuer.token(key=SigningKey("ed-1", "EdDSA", private), kid="ed-1", sub="svc-1")
    assert verifier.verify(token).actor == "oidc:svc-1"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"lifetime": -31}, "the token has expired"),
        ({"aud": "someone-else"}, "the token is for another audience"),
        ({"iss": "https://evil.test/"}, "the token is from another issuer"),
        ({"exp": None}, "the token has no exp claim"),
        ({"aud": None}, "the token has no aud claim"),
        ({"iss": None}, "the token has no iss claim"),
        ({"nbf": 120}, "the token is not valid yet"),  # seconds from now
        ({"sub": None}, "the token names no usable subject (sub)"),
        ({"sub": "two words"}, "the token names no usable subject (sub)"),
    ],
)
def test_a_token_failing_a_claim_check_is_refused(
    issuer: Issuer, tmp_path: Path, claims: dict[str, Any], reason: str
) -> None:
    if "nbf" in claims:  # made now: the parameters are made when the tests are collected
        claims = {**claims, "nbf": int(time.time()) + claims["nbf"]}
    assert _refused(_verifier(issuer, tmp_path), issuer.token(**claims)) == reason


def test_the_leeway_covers_a_small_clock_skew_only(issuer: Issuer, tmp_path: Path) -> None:
    verifier = _verifier(issuer, tmp_path, leeway_seconds=30)
    assert verifier.verify(issuer.token(lifetime=-20)).actor.startswith("oidc:user-")
    assert verifier.verify(issuer.token(nbf=int(time.time()) + 20)).actor.startswith("oidc:")
    assert _refused(verifier, issuer.token(lifetime=-40)) == "the token has expired"
    strict = _verifier(issuer, tmp_path, leeway_seconds=0)
    assert _refused(strict, issuer.token(lifetime=-2)) == "the token has expired"


def test_forged_and_confused_tokens_are_refused(issuer: Issuer, tmp_path: Path) -> None:
    verifier = _verifier(issuer, tmp_path)
    allowed = "the token's signature algorithm is not allowed"
    assert _refused(verifier, issuer.unsigned()) == allowed
    assert _refused(verifier, issuer.forged_hs256()) == allowed
    impostor = rsa_key("rsa-1")
    signature = "the token's signature does not verify"
    assert _refused(verifier, issuer.token(key=impostor)) == signature
    header, body, sig = issuer.token().split(".")
    flipped = sig[:-4] + ("AAAA" if not sig.endswith("AAAA") else "BBBB")
    assert _refused(verifier, f"{header}.{body}.{flipped}") == signature
    assert _refused(verifier, "not-a-jwt") == "the bearer token is not a well-formed JWT"


def test_a_token_must_use_its_key_s_algorithm(issuer: Issuer, tmp_path: Path) -> None:
    """An RSA key published for RS256 does not verify PS256, nor an EC key's kid RS256."""
    verifier = _verifier(issuer, tmp_path)
    pss = SigningKey("rsa-1", "PS256", issuer.key("rsa-1").private)
    assert _refused(verifier, issuer.token(key=pss)) == "the token's algorithm is not its key's"
    wrong_kid = issuer.token(key=issuer.key("rsa-1"), kid="ec-1")
    assert _refused(verifier, wrong_kid) == "the token's algorithm is not its key's"


def test_the_allow_list_is_the_configured_one(issuer: Issuer, tmp_path: Path) -> None:
    verifier = _verifier(issuer, tmp_path, algorithms=("ES256",))
    assert verifier.verify(issuer.token(kid="ec-1")).actor.startswith("oidc:")
    refused = _refused(verifier, issuer.token(kid="rsa-1"))
    assert refused == "the token's signature algorithm is not allowed"
    assert "RS256" in DEFAULT_ALGORITHMS


def test_a_key_is_found_by_kid_or_as_the_only_key(issuer: Issuer, tmp_path: Path) -> None:
    verifier = _verifier(issuer, tmp_path)
    unknown = issuer.token(key=issuer.key("rsa-1"), kid="nobody")
    assert _refused(verifier, unknown) == ("no key of the issuer matches the token")
    kidless = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "s", "exp": int(time.time()) + 60},
        issuer.key("rsa-1").private,
        algorithm="RS256",
    )
    assert _refused(verifier, kidless) == "no key of the issuer matches the token"
    only_rsa = Issuer()
    only_rsa.keys = [only_rsa.keys[0]]
    (tmp_path / "single").mkdir()
    single = _verifier(only_rsa, tmp_path / "single")
    key = only_rsa.keys[0]
    kidless = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "s", "exp": int(time.time()) + 60},
        key.private,
        algorithm="RS256",
    )
    assert single.verify(kidless).actor == "oidc:s"


@pytest.mark.parametrize(
    ("claims", "roles_claim", "role_map", "roles"),
    [
        ({"roles": ["heimdall-app"]}, "roles", None, {Role.APP}),
        ({"roles": "heimdall-audit heimdall-app"}, "roles", None, {Role.AUDIT, Role.APP}),
        ({"roles": ["admins"]}, "roles", None, set()),
        ({"groups": ["pii", "other"]}, "groups", (("pii", Role.WORKER),), {Role.WORKER}),
        ({"groups": ["heimdall-admin"]}, "groups", (("pii", Role.WORKER),), set()),
        ({"realm_access": {"roles": ["heimdall-admin"]}}, "realm_access.roles", None, {Role.ADMIN}),
        (
            {"https://example.com/roles": ["heimdall-app"]},
            "https://example.com/roles",
            None,
            {Role.APP},
        ),
        ({"roles": [1, None, "heimdall-app"]}, "roles", None, {Role.APP}),
        ({"roles": {"heimdall-app": True}}, "roles", None, set()),
    ],
)
def test_roles_come_from_the_claim_through_the_map(  # noqa: PLR0917 - parametrized
    issuer: Issuer,
    tmp_path: Path,
    claims: dict[str, Any],
    roles_claim: str,
    role_map: tuple[tuple[str, Role], ...] | None,
    roles: set[Role],
) -> None:
    verifier = _verifier(issuer, tmp_path, roles_claim=roles_claim, role_map=role_map)
    assert verifier.verify(issuer.token(**claims)).roles == frozenset(roles)


@pytest.mark.parametrize("verified", [False, None, "true", "false", 1, 0], ids=repr)
def test_an_email_the_issuer_does_not_mark_verified_is_not_the_actor(
    issuer: Issuer, tmp_path: Path, verified: object
) -> None:
    verifier = _verifier(issuer, tmp_path)
    token = issuer.token(sub="s-1", email="boss@example.com", email_verified=verified)
    assert verifier.verify(token).actor == "oidc:s-1"


def test_a_token_must_expire_within_the_lifetime_the_server_accepts(
    issuer: Issuer, tmp_path: Path
) -> None:
    verifier = _verifier(issuer, tmp_path, max_lifetime_seconds=3600.0)
    assert verifier.verify(issuer.token(sub="s", lifetime=3500)).actor == "oidc:s"
    far = issuer.token(sub="s", lifetime=10 * 86_400)
    assert _refused(verifier, far) == "the token expires further ahead than this server accepts"
    huge = issuer.token(sub="s", exp=1e300)
    assert _refused(verifier, huge) == "the token expires further ahead than this server accepts"
    digits = issuer.token(sub="s", exp=str(int(time.time()) + 60))
    assert _refused(verifier, digits) == "the token's exp is not a number"
    fractional = issuer.token(sub="s", exp=time.time() + 60.5)  # a NumericDate may be one
    assert verifier.verify(fractional).actor == "oidc:s"


def test_an_email_with_a_line_break_is_not_the_actor(issuer: Issuer, tmp_path: Path) -> None:
    verifier = _verifier(issuer, tmp_path)
    forged_line = issuer.token(sub="s-2", email="a@example.com\nforged", email_verified=True)
    assert verifier.verify(forged_line).actor == "oidc:s-2"


def test_a_dotted_roles_claim_given_both_ways_is_refused(issuer: Issuer, tmp_path: Path) -> None:
    verifier = _verifier(issuer, tmp_path, roles_claim="realm_access.roles")
    both: dict[str, Any] = {
        "realm_access.roles": ["heimdall-admin"],
        "realm_access": {"roles": ["heimdall-audit"]},
    }
    token = issuer.token(**both)
    assert _refused(verifier, token) == (
        "the token carries the realm_access.roles claim twice (dotted and nested)"
    )
    literal: dict[str, Any] = {"realm_access.roles": ["heimdall-audit"]}
    literal_only = issuer.token(**literal)
    assert verifier.verify(literal_only).roles == frozenset({Role.AUDIT})


def test_a_jwks_file_that_is_not_one_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": "none"}')
    with pytest.raises(ConfigurationError, match="is not a JSON Web Key Set"):
        OidcVerifier(OidcSettings(issuer=ISSUER, audience=AUDIENCE, jwks_file=path))
    with pytest.raises(ConfigurationError, match="cannot be read"):
        OidcVerifier(OidcSettings(issuer=ISSUER, audience=AUDIENCE, jwks_file=tmp_path / "no"))


# -- heimdall serve -----------------------------------------------------------------------


def test_serve_refuses_a_half_tls_setting_in_one_line(cli: Cli) -> None:
    result = cli.run("serve", env={"HMD_API_TLS_CERT": "/nowhere/cert.pem"})
    line = assert_one_line_error(result)
    assert line == ("error: HMD_API_TLS_CERT and HMD_API_TLS_KEY go together: set both or neither")
    assert result.returncode == 1


def test_serve_refuses_unreadable_tls_files_in_one_line(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    result = cli.run(
        "serve",
        env={
            "HMD_API_TLS_CERT": str(tmp_path / "cert.pem"),
            "HMD_API_TLS_KEY": str(tmp_path / "key.pem"),
        },
    )
    assert "cannot be loaded" in assert_one_line_error(result)


def test_serve_refuses_a_bad_oidc_setting_in_one_line(cli: Cli) -> None:
    result = cli.run("serve", env={**OIDC, "HMD_OIDC_ALGORITHMS": "HS256"})
    assert "may not allow HS256" in assert_one_line_error(result)


def test_serve_openapi_prints_the_document(cli: Cli) -> None:
    document = json.loads(cli.ok("serve", "--openapi"))
    assert document["info"]["title"] == "heimdall"
    paths = document["paths"]
    for path in (
        "/v1/records",
        "/v1/lookup",
        "/v1/decrypt",
        "/admin/crypto/reencrypt",
        "/admin/crypto/reencrypt/status",
        "/admin/keys/set-min-decryption-version",
        "/admin/migration/enforce",
        "/admin/audit",
        "/readyz",
    ):
        assert path in paths
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert not (cli.data_dir / "heimdall.db").exists()  # describing the API opens no store


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made in the test."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "heimdall test")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def test_serve_refuses_an_encrypted_tls_key_in_one_line_without_asking(
    cli: Cli, tmp_path: Path
) -> None:
    cert_path, key_path = _self_signed(tmp_path)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    result = cli.run(
        "serve", env={"HMD_API_TLS_CERT": str(cert_path), "HMD_API_TLS_KEY": str(key_path)}
    )
    assert assert_one_line_error(result) == (
        f"error: HMD_API_TLS_KEY {key_path} is encrypted: give the key unencrypted, readable by "
        "this user alone"
    )
    assert "pass phrase" not in result.stdout + result.stderr


def test_serve_speaks_tls_with_the_configured_certificate_and_nothing_else(
    tmp_path: Path,
) -> None:
    assert HEIMDALL is not None
    cert, key = _self_signed(tmp_path)
    port = free_port()
    env = {
        **clean_environ(),
        "HMD_DATA_DIR": str(tmp_path / "data"),
        "HMD_API_LISTEN": f"{LOOPBACK}:{port}",
        "HMD_API_TLS_CERT": str(cert),
        "HMD_API_TLS_KEY": str(key),
    }
    proc = subprocess.Popen(
        [HEIMDALL, "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 30
        answer: httpx.Response | None = None
        while answer is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.get(
                    f"https://{LOOPBACK}:{port}/healthz", verify=trusted, trust_env=False
                )
            except httpx.ConnectError:
                time.sleep(0.1)
        assert answer is not None and answer.status_code == 200
        with pytest.raises(httpx.HTTPError):  # no plain HTTP beside it
            httpx.get(f"http://{LOOPBACK}:{port}/healthz", trust_env=False, timeout=5)
        with pytest.raises(httpx.ConnectError):  # and a client that checks finds no public CA
            httpx.get(f"https://{LOOPBACK}:{port}/healthz", trust_env=False, timeout=5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
