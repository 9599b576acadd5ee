"""Who is calling: an identity proven by a bearer token, and the one role it holds.

spec: Access Control Model (Role-Based Access, Authentication Methods); Audit Log Requirements,
Access Denied Events. Every route but ``/healthz`` depends on :func:`authenticated`, which
answers

* **401** (with ``WWW-Authenticate: Bearer``) when there is no ``Authorization: Bearer``
  header, or its token proves nothing: a service token (``hmd_...``) that
  :meth:`heimdall.tokens.ServiceTokens.authenticate` refuses (checked in the store on every
  request, so a revocation holds at once in every process), or an OIDC token
  :class:`~heimdall.api.oidc.OidcVerifier` refuses;
* **403** when the identity maps to no heimdall role, or to several: the union of two roles'
  permissions would undo the separation of duties the roles exist for (heimdall-admin never
  decrypts, heimdall-app never rotates), so an identity must hold exactly one; an identity
  provider issues a token per role (its own client, audience or claim) instead.

Either refusal is audited as ``access.denied`` with the actor when known (``oidc:<email or sub>``
or ``token:<name>``, else ``anonymous``), the operation (the method and route), the reason and
the caller's address; neither the answer nor the event holds the token. Otherwise the route gets
a :class:`heimdall.rbac.Caller` with that actor and role, the request's id and address, and
hands it to the library, which checks the permission (403 on refusal, audited there) and audits
the operation. ``HMD_ROLE`` and ``HMD_ACTOR`` play no part here: they are the local CLI's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Final

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from heimdall.api.errors import ApiError, Unauthenticated, request_id_of
from heimdall.api.oidc import OidcVerifier
from heimdall.api.refusals import ANY_ADDRESS, COUNTED, RefusalBudget
from heimdall.audit import AuditEvent, EventType
from heimdall.errors import PermissionDenied
from heimdall.rbac import Caller, Role
from heimdall.service import Heimdall
from heimdall.tokens import PREFIX, ServiceTokens, TokenRejected

__all__ = ["ANONYMOUS", "AuthenticatedCaller", "Authenticator", "Identity", "authenticated"]

ANONYMOUS: Final = "anonymous"


@dataclass(frozen=True, slots=True)
class Identity:
    actor: str
    roles: frozenset[Role]


class Authenticator:
    """Turns an ``Authorization`` header into an :class:`Identity`; shared by all requests."""

    def __init__(
        self,
        service: Heimdall,
        oidc: OidcVerifier | None,
        refusals: RefusalBudget | None = None,
    ) -> None:
        self._service = service
        self._oidc = oidc
        self._tokens = ServiceTokens(service.store)
        self._refusals = refusals or RefusalBudget(0)

    @property
    def oidc_enabled(self) -> bool:
        return self._oidc is not None

    def identify(self, authorization: str | None) -> Identity:
        if not authorization:
            raise Unauthenticated("no bearer token was given")
        scheme, _, credentials = authorization.partition(" ")
        token = credentials.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the Authorization header is not a bearer token")
        if token.startswith(PREFIX):
            try:
                found = self._tokens.authenticate(token)
            except TokenRejected as exc:
                actor = f"token:{exc.token_name}" if exc.token_name else None
                raise Unauthenticated(f"the service token is {exc.reason}", actor=actor) from None
            return Identity(f"token:{found.name}", frozenset({found.role}))
        if self._oidc is None:
            raise Unauthenticated("this server accepts service tokens only (OIDC is not set up)")
        identity = self._oidc.verify(token)
        return Identity(identity.actor, identity.roles)

    def deny(self, request: Request, actor: str, reason: str) -> None:
        """Audit a refusal made here (the library audits its own): one by one, or counted
        past the limit of its address (heimdall.api.refusals)."""
        address = source_ip(request)
        one_by_one, counted = self._refusals.admit(address or "-")
        events = _counted(counted)
        if one_by_one:
            who = Caller(actor, request_id=request_id_of(request), source_ip=address)
            events.append(AuditEvent.denial(who, operation_of(request), reason))
        if events:
            self._service.record(*events)

    def close(self) -> None:
        """Audit the refusals still counted (the server is stopping)."""
        events = _counted(self._refusals.drain())
        if events:
            self._service.record(*events)


def _counted(counts: list[tuple[str, int]]) -> list[AuditEvent]:
    return [
        AuditEvent.of(
            EventType.ACCESS_DENIED,
            Caller(ANONYMOUS, source_ip=None if address in ("-", ANY_ADDRESS) else address),
            denied=True,
            operation=COUNTED,
            reason=(
                "refused at authentication, from many addresses at once, past the refusals "
                "audited one by one"
                if address == ANY_ADDRESS
                else "refused at authentication, past the refusals audited one by one"
            ),
            count=count,
        )
        for address, count in counts
    ]


def source_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def operation_of(request: Request) -> str:
    route = request.scope.get("route")
    path = getattr(route, "path", None) or request.url.path
    return f"{request.method} {path}"


def _one_role(identity: Identity) -> Role:
    if len(identity.roles) == 1:
        (role,) = identity.roles
        return role
    if not identity.roles:
        raise PermissionDenied("the identity holds no heimdall role")
    names = ", ".join(sorted(role.value for role in identity.roles))
    raise PermissionDenied(
        f"the identity holds several heimdall roles ({names}); a token must carry exactly one"
    )


def _authorization(request: Request) -> str | None:
    """The request's one Authorization header. Several are refused: a proxy that judges or logs
    another copy than this server reads would disagree with it about who called."""
    values = request.headers.getlist("authorization")
    if len(values) > 1:
        raise Unauthenticated("the request has more than one Authorization header")
    return values[0] if values else None


# Declares the scheme in the OpenAPI document; the header is read and judged below.
_BEARER: Final = HTTPBearer(
    auto_error=False,
    description="An OIDC token of the configured issuer, or a service token (hmd_...).",
)


def authenticated(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)] = None,
) -> Caller:
    """The caller of *request* (a FastAPI dependency); Unauthenticated or PermissionDenied,
    both audited, when there is none."""
    authenticator: Authenticator = request.app.state.authenticator
    try:
        identity = authenticator.identify(_authorization(request))
    except Unauthenticated as exc:
        authenticator.deny(request, exc.actor or ANONYMOUS, exc.reason)
        raise
    except ApiError as exc:  # the identity provider's keys cannot be fetched: still a refusal
        authenticator.deny(request, ANONYMOUS, str(exc))
        raise
    try:
        role = _one_role(identity)
    except PermissionDenied as exc:
        authenticator.deny(request, identity.actor, str(exc))
        raise
    return Caller(
        identity.actor,
        role,
        request_id=request_id_of(request),
        source_ip=source_ip(request),
    )


# A route's caller: ``caller: AuthenticatedCaller``.
AuthenticatedCaller = Annotated[Caller, Depends(authenticated)]
