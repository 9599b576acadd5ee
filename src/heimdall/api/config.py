"""Settings of the API service: plain data, importable without the server extra.

Read by :mod:`heimdall.settings` from ``HMD_API_*`` and ``HMD_OIDC_*`` variables (or the config
file) like every other setting; a bad value is one :class:`ConfigurationError` line.

==============================  ===============================================================
``HMD_API_LISTEN``              ``host:port`` to serve on, default ``127.0.0.1:8700``
                                (``[::1]:8700`` for IPv6)
``HMD_API_TLS_CERT`` / ``_KEY`` PEM certificate chain and private key: both or neither
``HMD_API_METRICS_PUBLIC``      serve ``/metrics`` without credentials, default false
``HMD_API_MAX_BODY_BYTES``      largest request body, default 1 MiB
``HMD_API_MAX_BATCH``           most items in one batch request, default 1,000
``HMD_API_TRUSTED_PROXIES``     addresses of proxies whose ``X-Forwarded-For`` is believed
                                (comma-separated); default none: the peer address is the source
``HMD_OIDC_ISSUER``             the issuer (``iss``) tokens must name; sets OIDC on
``HMD_OIDC_AUDIENCE``           the audience (``aud``) tokens must name
``HMD_OIDC_JWKS_URL``           the issuer's JWKS (https, or http on loopback only), or
``HMD_OIDC_JWKS_FILE``          a JWKS file read at start
``HMD_OIDC_ROLES_CLAIM``        the claim holding roles, default ``roles`` (a list such as
                                ``groups`` too; ``a.b`` reaches a nested claim)
``HMD_OIDC_ROLE_MAP``           ``claim-value=heimdall-role,...``; default: the claim's values are
                                heimdall role names
``HMD_OIDC_ALGORITHMS``         allowed signature algorithms, asymmetric only, default
                                ``RS256,ES256,PS256,EdDSA``
``HMD_OIDC_LEEWAY``             clock skew allowed on exp and nbf, seconds, default 30
``HMD_OIDC_JWKS_REFRESH_SECONDS``  least time between two fetches of the JWKS forced by an
                                unknown key id, default 30
==============================  ===============================================================
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from heimdall.errors import ConfigurationError
from heimdall.rbac import Role

__all__ = [
    "ALLOWED_ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "FILE_KEYS",
    "ApiSettings",
    "OidcSettings",
    "api_settings",
]

# Asymmetric only: with an HMAC algorithm, a verifier holding the issuer's public key could be
# fed a token "signed" with that public key as the HMAC secret (algorithm confusion).
ALLOWED_ALGORITHMS: Final = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
DEFAULT_ALGORITHMS: Final = ("RS256", "ES256", "PS256", "EdDSA")
DEFAULT_LISTEN: Final = ("127.0.0.1", 8700)
MIB: Final = 1024 * 1024

FILE_KEYS: Final = frozenset(
    {
        "api_listen",
        "api_tls_cert",
        "api_tls_key",
        "api_metrics_public",
        "api_max_body_bytes",
        "api_max_batch",
        "api_refusals_per_minute",
        "api_trusted_proxies",
        "oidc_issuer",
        "oidc_audience",
        "oidc_jwks_url",
        "oidc_jwks_file",
        "oidc_roles_claim",
        "oidc_role_map",
        "oidc_algorithms",
        "oidc_leeway",
        "oidc_max_lifetime_seconds",
        "oidc_jwks_refresh_seconds",
    }
)


@dataclass(frozen=True, slots=True)
class OidcSettings:
    """Where tokens come from and how their roles read. Exactly one of *jwks_url* and
    *jwks_file* is set."""

    issuer: str
    audience: str
    jwks_url: str | None = None
    jwks_file: Path | None = None
    roles_claim: str = "roles"
    # Claim value -> heimdall role; None: the claim's values are heimdall role names.
    role_map: tuple[tuple[str, Role], ...] | None = None
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_seconds: float = 30.0
    max_lifetime_seconds: float = 86_400.0  # how far ahead a token's exp may lie
    jwks_refresh_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class ApiSettings:
    host: str = DEFAULT_LISTEN[0]
    port: int = DEFAULT_LISTEN[1]
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_public: bool = False
    max_body_bytes: int = MIB
    max_batch: int = 1000
    refusals_per_minute: int = 60  # audited one by one per address (heimdall.api.refusals)
    trusted_proxies: tuple[str, ...] = ()
    oidc: OidcSettings | None = field(default=None)

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _name(key: str) -> str:
    return f"HMD_{key.upper()}"


def _number(key: str, value: str, low: float, high: float, kind: type[int] | type[float]) -> float:
    try:
        number = kind(value)
    except ValueError:
        raise ConfigurationError(f"{_name(key)} must be a number, not {value!r}") from None
    if not low <= number <= high:
        bounds = (f"{low:g}", f"{high:g}") if kind is float else (f"{low:.0f}", f"{high:.0f}")
        raise ConfigurationError(f"{_name(key)} must be between {bounds[0]} and {bounds[1]}")
    return number


def _flag(key: str, value: str) -> bool:
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"{_name(key)} must be true or false, not {value!r}")


def _words(value: str) -> list[str]:
    return [word.strip() for word in value.split(",") if word.strip()]


def _listen(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if (
        not sep
        or not host
        or (":" in host and not bracketed)  # "::1:8700" is itself an IPv6 address
        or not port_text.isascii()
        or not port_text.isdigit()
        or not 1 <= int(port_text) <= 65_535
    ):
        raise ConfigurationError(
            f"HMD_API_LISTEN={value!r} is not host:port (e.g. 127.0.0.1:8700 or [::1]:8700)"
        )
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _jwks_url(value: str) -> str:
    parts = urlsplit(value)
    try:
        _ = parts.port  # ValueError when out of range
        if parts.hostname:
            parts.hostname.encode("idna")
    except (ValueError, UnicodeError):
        raise ConfigurationError(
            "HMD_OIDC_JWKS_URL is not a usable URL (its host or port is not valid)"
        ) from None
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise ConfigurationError("HMD_OIDC_JWKS_URL holds a space or a control character")
    if parts.scheme == "https" and parts.hostname:
        return value
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return value
    raise ConfigurationError(
        "HMD_OIDC_JWKS_URL must be an https:// URL (http:// only on loopback): keys fetched "
        "in the clear could be swapped for an attacker's"
    )


def _algorithms(value: str) -> tuple[str, ...]:
    names = _words(value)
    if not names:
        raise ConfigurationError("HMD_OIDC_ALGORITHMS names no algorithm")
    for name in names:
        if name.lower() == "none" or name.upper().startswith("HS"):
            raise ConfigurationError(
                f"HMD_OIDC_ALGORITHMS may not allow {name}: only asymmetric signatures "
                f"({', '.join(ALLOWED_ALGORITHMS)}) prove who issued a token"
            )
        if name not in ALLOWED_ALGORITHMS:
            raise ConfigurationError(
                f"HMD_OIDC_ALGORITHMS names {name!r}, not one of {', '.join(ALLOWED_ALGORITHMS)}"
            )
    return tuple(dict.fromkeys(names))


def _role(key: str, value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        roles = ", ".join(role.value for role in Role)
        raise ConfigurationError(
            f"{_name(key)} maps to {value!r}, not a heimdall role ({roles})"
        ) from None


def _role_map(value: str) -> tuple[tuple[str, Role], ...]:
    pairs: dict[str, Role] = {}
    for item in _words(value):
        claim_value, sep, role = (part.strip() for part in item.partition("="))
        if not sep or not claim_value or not role:
            raise ConfigurationError(
                f"HMD_OIDC_ROLE_MAP entry {item!r} is not claim-value=heimdall-role "
                "(e.g. pii-admins=heimdall-admin)"
            )
        if claim_value in pairs:
            raise ConfigurationError(f"HMD_OIDC_ROLE_MAP maps {claim_value!r} twice")
        pairs[claim_value] = _role("oidc_role_map", role)
    if not pairs:
        raise ConfigurationError("HMD_OIDC_ROLE_MAP is set but maps nothing")
    return tuple(pairs.items())


def _oidc(values: Mapping[str, str]) -> OidcSettings | None:
    given = sorted(key for key in values if key.startswith("oidc_"))
    issuer = values.get("oidc_issuer", "").strip()
    if not issuer:
        if given:
            raise ConfigurationError(f"{_name(given[0])} is set but HMD_OIDC_ISSUER is not")
        return None
    audience = values.get("oidc_audience", "").strip()
    if not audience:
        raise ConfigurationError("HMD_OIDC_ISSUER is set but HMD_OIDC_AUDIENCE is not")
    url, file = values.get("oidc_jwks_url"), values.get("oidc_jwks_file")
    if bool(url) == bool(file):
        raise ConfigurationError(
            "OIDC needs exactly one of HMD_OIDC_JWKS_URL and HMD_OIDC_JWKS_FILE"
        )
    claim = values.get("oidc_roles_claim", "roles").strip()
    if not claim:
        raise ConfigurationError("HMD_OIDC_ROLES_CLAIM is empty")
    return OidcSettings(
        issuer=issuer,
        audience=audience,
        jwks_url=_jwks_url(url) if url else None,
        jwks_file=Path(file) if file else None,
        roles_claim=claim,
        role_map=_role_map(values["oidc_role_map"]) if "oidc_role_map" in values else None,
        algorithms=(
            _algorithms(values["oidc_algorithms"])
            if "oidc_algorithms" in values
            else DEFAULT_ALGORITHMS
        ),
        leeway_seconds=_number("oidc_leeway", values.get("oidc_leeway", "30"), 0, 300, float),
        max_lifetime_seconds=_number(
            "oidc_max_lifetime_seconds",
            values.get("oidc_max_lifetime_seconds", "86400"),
            60,
            31_536_000,
            float,
        ),
        jwks_refresh_seconds=_number(
            "oidc_jwks_refresh_seconds",
            values.get("oidc_jwks_refresh_seconds", "30"),
            1,
            3600,
            float,
        ),
    )


def api_settings(values: Mapping[str, str]) -> ApiSettings:
    """Build the API settings from ``api_*`` and ``oidc_*`` values (strings, as read)."""
    host, port = _listen(values["api_listen"]) if "api_listen" in values else DEFAULT_LISTEN
    cert, key = values.get("api_tls_cert"), values.get("api_tls_key")
    if bool(cert) != bool(key):
        raise ConfigurationError(
            "HMD_API_TLS_CERT and HMD_API_TLS_KEY go together: set both or neither"
        )
    return ApiSettings(
        host=host,
        port=port,
        tls_cert=Path(cert) if cert else None,
        tls_key=Path(key) if key else None,
        metrics_public=_flag("api_metrics_public", values.get("api_metrics_public", "false")),
        max_body_bytes=int(
            _number(
                "api_max_body_bytes",
                values.get("api_max_body_bytes", str(MIB)),
                1024,
                64 * MIB,
                int,
            )
        ),
        max_batch=int(
            _number("api_max_batch", values.get("api_max_batch", "1000"), 1, 100_000, int)
        ),
        refusals_per_minute=int(
            _number(
                "api_refusals_per_minute",
                values.get("api_refusals_per_minute", "60"),
                0,
                1_000_000,
                int,
            )
        ),
        trusted_proxies=tuple(_words(values.get("api_trusted_proxies", ""))),
        oidc=_oidc(values),
    )
