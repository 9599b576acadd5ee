"""OIDC bearer tokens (JWTs), verified with PyJWT against the issuer's keys.

spec: Access Control Model, Authentication Methods; Audit Log Requirements (the actor
``oidc:user@example.com``). A token is accepted only if

* its header names an algorithm of ``HMD_OIDC_ALGORITHMS``, asymmetric ones only (never
  ``none``, never an HMAC: a public key used as an HMAC secret proves nothing), and the key its
  ``kid`` names (the only key, when the set holds one and the token names none) is bound to
  that algorithm (the JWK's ``alg``, else its type's: RSA RS256, P-256 ES256, Ed25519 EdDSA)
  and verifies its signature;
* it carries ``exp``, ``iss`` and ``aud``; ``iss`` is ``HMD_OIDC_ISSUER``, ``aud`` names
  ``HMD_OIDC_AUDIENCE``; ``exp`` and ``nbf`` (if present) hold, give or take
  ``HMD_OIDC_LEEWAY`` seconds; ``exp`` is a number at most ``HMD_OIDC_MAX_LIFETIME_SECONDS``
  (a day) ahead.

The keys come from ``HMD_OIDC_JWKS_URL`` (:class:`heimdall.api.jwks.RemoteKeySet`: the key set
is kept for five minutes and fetched again for a ``kid`` it lacks, at most every
``HMD_OIDC_JWKS_REFRESH_SECONDS``, and no request waits behind a fetch), or from
``HMD_OIDC_JWKS_FILE``, read at start.

The identity is ``oidc:<email>`` when the token has an email its issuer marks verified
(``email_verified: true``), else ``oidc:<sub>``; its roles are the values of
``HMD_OIDC_ROLES_CLAIM`` (a list of strings, or one string of space-separated values; ``a.b``
also reaches into a nested object, and a token with both is refused) read through
``HMD_OIDC_ROLE_MAP``, or taken as heimdall role names when there is no map. Values that name no
heimdall role are ignored.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt

from heimdall.api.config import OidcSettings
from heimdall.api.errors import ApiError, Unauthenticated
from heimdall.api.jwks import KeysUnavailable, RemoteKeySet
from heimdall.errors import ConfigurationError
from heimdall.rbac import Role

__all__ = ["OidcIdentity", "OidcVerifier"]

# What an actor may hold: printable ASCII without spaces, bounded, so that a claim cannot
# forge a line or another actor in the audit trail.
_ACTOR_TEXT: Final = re.compile(r"[\x21-\x7e]{1,200}\Z")


@dataclass(frozen=True, slots=True)
class OidcIdentity:
    actor: str
    roles: frozenset[Role]


def _read_jwks_file(settings: OidcSettings) -> jwt.PyJWKSet:
    path = settings.jwks_file
    assert path is not None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return jwt.PyJWKSet.from_dict(data)
    except OSError as exc:
        raise ConfigurationError(
            f"HMD_OIDC_JWKS_FILE {path} cannot be read: {exc.strerror}"
        ) from None
    except (ValueError, jwt.PyJWTError):
        raise ConfigurationError(
            f"HMD_OIDC_JWKS_FILE {path} is not a JSON Web Key Set with a usable key"
        ) from None


class OidcVerifier:
    """Verifies OIDC bearer tokens; safe to share between threads."""

    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self._remote: RemoteKeySet | None = None
        self._file_keys: jwt.PyJWKSet | None = None
        if settings.jwks_url is not None:
            self._remote = RemoteKeySet(
                settings.jwks_url, refresh_seconds=settings.jwks_refresh_seconds
            )
        else:
            self._file_keys = _read_jwks_file(settings)

    def verify(self, token: str) -> OidcIdentity:
        """The identity *token* proves; Unauthenticated (with a short reason, never the token)
        when it proves nothing."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("the bearer token is not a well-formed JWT") from None
        algorithm = header.get("alg")
        if algorithm not in self.settings.algorithms:
            raise Unauthenticated("the token's signature algorithm is not allowed")
        key = self._key(header.get("kid"), algorithm)
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the token is from another issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the token has no {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the token's signature does not verify") from None
        except jwt.PyJWTError:
            raise Unauthenticated("the token is not valid") from None
        self._check_lifetime(claims)
        return OidcIdentity(_actor(claims), self._roles(claims))

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        """``exp`` must be a JSON number (PyJWT also takes a string of digits) no further
        ahead than ``HMD_OIDC_MAX_LIFETIME_SECONDS``: an issuer's mistake, or a token minted
        to last for years, is not accepted for as long as it claims."""
        expires = claims["exp"]
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            raise Unauthenticated("the token's exp is not a number")
        if expires - time.time() > self.settings.max_lifetime_seconds:
            raise Unauthenticated("the token expires further ahead than this server accepts")

    def _key(self, kid: Any, algorithm: str) -> jwt.PyJWK:
        """The issuer's key to verify with; it must be bound to *algorithm*."""
        if kid is not None and not isinstance(kid, str):
            raise Unauthenticated("the token's key id is not a string")
        try:
            jwk = self._find(kid)
        except KeysUnavailable:
            raise ApiError(
                503,
                "identity_provider_unavailable",
                "the identity provider's keys cannot be fetched; try again later",
            ) from None
        if jwk is None:
            raise Unauthenticated("no key of the issuer matches the token")
        if jwk.algorithm_name != algorithm:
            raise Unauthenticated("the token's algorithm is not its key's")
        return jwk

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if self._remote is not None:
            return self._remote.find(kid)
        assert self._file_keys is not None
        keys = [k for k in self._file_keys.keys if k.public_key_use in ("sig", None)]
        if kid is not None:
            return next((k for k in keys if k.key_id == kid), None)
        return keys[0] if len(keys) == 1 else None

    def _roles(self, claims: Mapping[str, Any]) -> frozenset[Role]:
        values = _claim_values(claims, self.settings.roles_claim)
        if self.settings.role_map is not None:
            mapping = dict(self.settings.role_map)
            return frozenset(mapping[value] for value in values if value in mapping)
        names = {role.value: role for role in Role}
        return frozenset(names[value] for value in values if value in names)


def _claim_values(claims: Mapping[str, Any], name: str) -> list[str]:
    value: Any = claims.get(name)
    if "." in name:
        nested: Any = claims
        for part in name.split("."):
            nested = nested.get(part) if isinstance(nested, Mapping) else None
        if value is not None and nested is not None:
            # Both spellings: one of them may be a claim whoever edits a user's attributes at
            # the issuer added to override the other. Neither is believed.
            raise Unauthenticated(f"the token carries the {name} claim twice (dotted and nested)")
        if value is None:
            value = nested
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def _actor(claims: Mapping[str, Any]) -> str:
    email = claims.get("email")
    # Only an email its issuer vouches for (``email_verified`` the JSON true, not "true", 1 or
    # absent): anyone may put any address in a profile the issuer does not check.
    if isinstance(email, str) and claims.get("email_verified") is True and _ACTOR_TEXT.match(email):
        return f"oidc:{email}"
    subject = claims.get("sub")
    if isinstance(subject, str) and _ACTOR_TEXT.match(subject):
        return f"oidc:{subject}"
    raise Unauthenticated("the token names no usable subject (sub)")
