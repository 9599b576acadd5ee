"""Service tokens: how a machine (an enrichment worker, a service calling heimdall) shows its role.

spec: Access Control Model (Role-Based Access, Authentication Methods). A token is ``hmd_``
followed by 32 random bytes in base64url without padding (43 characters); the prefix lets secret
scanners find one that leaked. It grants one :class:`heimdall.rbac.Role` until it expires or is
revoked.

Invariants:

* The token is returned once, by :meth:`ServiceTokens.create`. The store keeps its SHA-256 only
  (:mod:`heimdall.store.tokens`): a 256-bit random secret needs no slow hash, since no guess
  list can shorten the search, and the hash cannot be presented in its place.
* :meth:`ServiceTokens.authenticate` is one indexed store read and caches nothing, so a
  revocation committed by any process refuses the token in every process at its next use.
* A token is named by its name, its short id (random, not derived from the token) and its role:
  in :class:`ServiceToken` and its repr, in audit events and in every message. Nothing here
  logs, and no error carries what was presented.
* Managing tokens (:func:`issue_token`, :func:`revoke_token`, :func:`list_tokens`) needs
  heimdall-admin's :data:`MANAGE_TOKENS` (the local operator may too); a refusal is audited as
  ``access.denied``, each creation and revocation as ``token.create`` / ``token.revoke``.

Errors: :class:`TokenRejected` (``reason`` is one of :data:`REJECT_REASONS`),
:class:`TokenNotFound`, :class:`TokenNameTaken`, and :class:`heimdall.errors.InvalidInput` for a
bad name, role or lifetime; all are :class:`heimdall.errors.HeimdallError`.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

from heimdall.audit import AuditEvent, EventType
from heimdall.errors import HeimdallError, InvalidInput, PermissionDenied, StorageError
from heimdall.rbac import Caller, Permission, Role
from heimdall.store.base import GraphStore
from heimdall.store.tokens import StoredToken

__all__ = [
    "MANAGE_TOKENS",
    "MAX_LIFETIME",
    "PREFIX",
    "REJECT_REASONS",
    "ServiceToken",
    "ServiceTokens",
    "TokenNameTaken",
    "TokenNotFound",
    "TokenRejected",
    "issue_token",
    "list_tokens",
    "parse_lifetime",
    "revoke_token",
    "token_hash",
    "token_role",
]

PREFIX: Final = "hmd_"
MAX_LIFETIME: Final = timedelta(days=3650)
REJECT_REASONS: Final = ("malformed", "unknown", "revoked", "expired")
# heimdall-admin's permission for the key lifecycle also covers who may call heimdall: a
# permission of its own would need a row in every provider's role table (kms/aws_access.py,
# the Vault policies), though managing tokens calls no provider.
MANAGE_TOKENS: Final = Permission.CONFIGURE_KEYS

_TOKEN: Final = re.compile(r"hmd_[A-Za-z0-9_-]{43}\Z")
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_LIFETIME: Final = re.compile(r"([0-9]{1,7})([dhm])\Z")
_UNITS: Final = {"d": "days", "h": "hours", "m": "minutes"}
_STAMP: Final = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True, slots=True)
class ServiceToken:
    """A service token's record: never the token, nor its hash."""

    token_id: str  # short, random, not secret
    name: str
    role: Role
    created_at: str  # ISO-8601 UTC, to the second
    expires_at: str | None
    revoked_at: str | None
    created_by: str

    def state(self, now: datetime) -> str:
        """``revoked``, ``expired`` (at *now*) or ``active``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and _utc(now) >= _parse_stamp(self.expires_at):
            return "expired"
        return "active"


class TokenRejected(HeimdallError):
    """A presented token is not accepted. ``reason`` says why (one of :data:`REJECT_REASONS`);
    ``token_name`` names the token when it exists. The message never holds what was presented."""

    reason: str
    token_name: str | None

    def __init__(self, reason: str, token: ServiceToken | None = None) -> None:
        self.reason = reason
        self.token_name = token.name if token is not None else None
        if reason == "malformed":
            message = "not a heimdall service token (hmd_ and 43 base64url characters)"
        elif token is None:
            message = "no such service token"
        else:
            message = f"service token {token.name} is {reason}"
        super().__init__(f"service token refused: {message}")


class TokenNotFound(HeimdallError):
    """No service token has this name."""


class TokenNameTaken(HeimdallError):
    """A service token with this name exists (names are never reused, revoked tokens' too)."""


def token_hash(token: str) -> str:
    """What the store keeps of *token*: its SHA-256, hex."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def parse_lifetime(text: str) -> timedelta:
    """``30d``, ``12h`` or ``90m`` as a timedelta; InvalidInput if it is not one, not positive,
    or over :data:`MAX_LIFETIME`."""
    match = _LIFETIME.match(text)
    if match is None or int(match[1]) == 0:
        raise InvalidInput(
            "a token lifetime is a positive whole number of days, hours or minutes: 30d, 12h or 90m"
        )
    lifetime = timedelta(**{_UNITS[match[2]]: int(match[1])})
    _check_lifetime(lifetime)
    return lifetime


class ServiceTokens:
    """Create, check, list and revoke service tokens in *store*; *clock* gives the time (UTC)."""

    def __init__(
        self, store: GraphStore, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._store = store
        self._clock = clock

    def create(
        self, name: str, role: Role, *, expires_in: timedelta | None, created_by: str
    ) -> tuple[str, ServiceToken]:
        """A new token for *role*, valid for *expires_in* (None: until revoked), and its record.
        The token is shown here only; TokenNameTaken if *name* is in use."""
        _check_name(name)
        role = token_role(role)
        if expires_in is not None:
            _check_lifetime(expires_in)
        if not created_by:
            raise InvalidInput("a service token needs the actor who creates it")
        token = PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        created = self._now().replace(microsecond=0)
        stored = StoredToken(
            token_id=secrets.token_hex(6),
            name=name,
            role=role.value,
            token_hash=token_hash(token),
            created_at=created.strftime(_STAMP),
            expires_at=None if expires_in is None else (created + expires_in).strftime(_STAMP),
            revoked_at=None,
            created_by=created_by,
        )
        if not self._store.insert_token(stored):
            raise TokenNameTaken(
                f"a service token named {name} exists already (names are never reused, "
                "revoked tokens' included)"
            )
        return token, _public(stored)

    def authenticate(self, presented: str) -> ServiceToken:
        """The token's record if *presented* is a token that exists, is not revoked and has
        not expired; else TokenRejected. One indexed store read, nothing cached."""
        if not isinstance(presented, str) or not _well_formed(presented):
            raise TokenRejected("malformed")
        stored = self._store.token_by_hash(token_hash(presented))
        if stored is None:
            raise TokenRejected("unknown")
        token = _public(stored)
        state = token.state(self._now())
        if state != "active":
            raise TokenRejected(state, token)
        return token

    def list(self) -> builtins.list[ServiceToken]:
        """Every token, revoked and expired ones included, oldest first."""
        return [_public(stored) for stored in self._store.list_tokens()]

    def revoke(self, name: str, *, revoked_by: str) -> ServiceToken:
        """Revoke the token *name* at once for every process; revoking it again keeps the
        first revocation. TokenNotFound if no token has that name."""
        _check_name(name)
        now = self._now().strftime(_STAMP)
        stored = self._store.revoke_token(name, revoked_at=now, revoked_by=revoked_by)
        if stored is None:
            raise TokenNotFound(f"no service token is named {name}")
        return _public(stored)

    def _now(self) -> datetime:
        return _utc(self._clock())


# -- audited, permission-checked management ---------------------------------------------------


class TokenOwner(Protocol):
    """What token management needs of the service: its store and its audit trail."""

    store: GraphStore

    def record(self, *events: AuditEvent) -> None: ...


def issue_token(
    owner: TokenOwner, name: str, role: Role, *, expires_in: timedelta | None, caller: Caller
) -> tuple[str, ServiceToken]:
    """:meth:`ServiceTokens.create` for *caller*, audited (``token.create``). A token whose
    creation could not be audited is revoked at once, and never returned."""
    _require(owner, caller, "token.create")
    tokens = ServiceTokens(owner.store)
    try:
        token, issued = tokens.create(name, role, expires_in=expires_in, created_by=caller.actor)
    except HeimdallError as exc:
        owner.record(_event(EventType.TOKEN_CREATE, caller, name, role, exc))
        raise
    try:
        owner.record(_event(EventType.TOKEN_CREATE, caller, name, issued.role, None))
    except BaseException:
        tokens.revoke(name, revoked_by=f"{caller.actor} (creation not audited)")
        raise
    return token, issued


def revoke_token(owner: TokenOwner, name: str, *, caller: Caller) -> ServiceToken:
    """:meth:`ServiceTokens.revoke` for *caller*, audited (``token.revoke``). A revocation
    stands even if its event cannot be written (AuditError is raised then)."""
    _require(owner, caller, "token.revoke")
    try:
        revoked = ServiceTokens(owner.store).revoke(name, revoked_by=caller.actor)
    except HeimdallError as exc:
        owner.record(_event(EventType.TOKEN_REVOKE, caller, name, None, exc))
        raise
    owner.record(_event(EventType.TOKEN_REVOKE, caller, name, revoked.role, None))
    return revoked


def list_tokens(owner: TokenOwner, *, caller: Caller) -> list[ServiceToken]:
    """:meth:`ServiceTokens.list` for *caller* (a refusal is audited)."""
    _require(owner, caller, "token.list")
    return ServiceTokens(owner.store).list()


def _require(owner: TokenOwner, caller: Caller, operation: str) -> None:
    if caller.may(MANAGE_TOKENS):
        return
    role = caller.role.value if caller.role else "none"
    owner.record(AuditEvent.denial(caller, operation, f"role {role} lacks {MANAGE_TOKENS.value}"))
    raise PermissionDenied(f"role {role} may not manage service tokens ({Role.ADMIN.value} may)")


def _event(
    event_type: EventType,
    caller: Caller,
    name: str,
    role: Role | str | None,
    error: HeimdallError | None,
) -> AuditEvent:
    """The event of a token change. A name that is not a valid one (a token pasted where its
    name belongs, perhaps) is left out, and so is a role that is not one."""
    valid_role = Role(role).value if role in {r.value for r in Role} else None
    return AuditEvent.of(
        event_type,
        caller,
        error=error,
        token_name=name if _NAME.match(name) and not _looks_like_token(name) else None,
        role=valid_role,
    )


# -- checks and conversions --------------------------------------------------------------------


def _well_formed(presented: str) -> bool:
    if _TOKEN.match(presented) is None:
        return False
    body = presented[len(PREFIX) :]
    # Only the canonical encoding: the last character's unused bits must be zero.
    return base64.urlsafe_b64encode(base64.urlsafe_b64decode(body + "=")).decode() == body + "="


def _looks_like_token(name: str) -> bool:
    return name.lower().startswith(PREFIX)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or _looks_like_token(name):
        raise InvalidInput(
            "that is not a token name (a name starting hmd_ would be taken for a token: "
            "never type a token where a name belongs)"
        )
    if _NAME.match(name) is None:
        raise InvalidInput(
            "a token name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def token_role(role: Role | str) -> Role:
    """*role* as a Role; InvalidInput (naming the roles) if it is not one."""
    try:
        return Role(role)
    except ValueError:
        names = ", ".join(r.value for r in Role)
        raise InvalidInput(f"a service token's role is one of {names}") from None


def _check_lifetime(lifetime: timedelta) -> None:
    if not timedelta(0) < lifetime <= MAX_LIFETIME:
        raise InvalidInput(
            f"a token lifetime must be positive and at most {MAX_LIFETIME.days} days"
        )


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _parse_stamp(stamp: str) -> datetime:
    try:
        return datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC)
    except ValueError:
        raise StorageError("a service token's time in the store is not a UTC time stamp") from None


def _public(stored: StoredToken) -> ServiceToken:
    try:
        role = Role(stored.role)
    except ValueError:
        raise StorageError(
            f"service token {stored.name} has an unknown role in the store"
        ) from None
    return ServiceToken(
        token_id=stored.token_id,
        name=stored.name,
        role=role,
        created_at=stored.created_at,
        expires_at=stored.expires_at,
        revoked_at=stored.revoked_at,
        created_by=stored.created_by,
    )
