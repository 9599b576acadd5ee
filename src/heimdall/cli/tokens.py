"""``heimdall tokens``: create, list and revoke the service tokens machines present to heimdall.

``create`` prints the token once, alone on its line on stdout (so a script can capture it), and
what it is on stderr; only its SHA-256 is stored. Every command needs heimdall-admin (or the
local operator); creations and revocations are audited by name and role, never the token.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from heimdall.cli.common import (
    ActorOption,
    JsonOption,
    app,
    caller_for,
    err,
    open_service,
    out,
)
from heimdall.cli.output import terminal_safe, write_json, write_value
from heimdall.rbac import Role
from heimdall.tokens import (
    ServiceToken,
    issue_token,
    list_tokens,
    parse_lifetime,
    revoke_token,
    token_role,
)

tokens_app = typer.Typer(
    help="Create, list and revoke the service tokens machines present (heimdall-admin).",
    no_args_is_help=True,
)
app.add_typer(tokens_app, name="tokens")

_ROLES = ", ".join(role.value for role in Role)


@tokens_app.command("create")
def tokens_create(
    role: Annotated[str, typer.Option("--role", help=f"The role it grants: {_ROLES}.")],
    name: Annotated[str, typer.Option("--name", help="Its name, unique for ever (e.g. enrich-1).")],
    expires: Annotated[
        str | None,
        typer.Option("--expires", help="Lifetime: 30d, 12h or 90m (default: until revoked)."),
    ] = None,
    actor: ActorOption = None,
) -> None:
    """Create a service token: the token alone on stdout (shown only this once), what it is
    on stderr."""
    lifetime = parse_lifetime(expires) if expires is not None else None
    granted = token_role(role)
    with open_service() as (service, settings):
        caller = caller_for(settings, actor)
        token, issued = issue_token(service, name, granted, expires_in=lifetime, caller=caller)
    write_value(token)
    until = f"expires {issued.expires_at}" if issued.expires_at else "valid until revoked"
    err.print(
        f"created service token {issued.name} (id {issued.token_id}, role {issued.role}, "
        f"{until}); the token above is shown only now: keep it in a secret store",
        markup=False,
    )


def _as_json(token: ServiceToken, now: datetime) -> dict[str, Any]:
    return {
        "name": token.name,
        "token_id": token.token_id,
        "role": token.role.value,
        "state": token.state(now),
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "revoked_at": token.revoked_at,
        "created_by": token.created_by,
    }


@tokens_app.command("list")
def tokens_list(as_json: JsonOption = False, actor: ActorOption = None) -> None:
    """List every service token, revoked and expired ones too (never a token or its hash)."""
    with open_service() as (service, settings):
        tokens = list_tokens(service, caller=caller_for(settings, actor))
    now = datetime.now(UTC)
    if as_json:
        write_json([_as_json(token, now) for token in tokens])
        return
    if not tokens:
        out.print("no service tokens", markup=False)
        return
    for token in tokens:
        revoked = f" revoked={token.revoked_at}" if token.revoked_at else ""
        out.print(
            f"{terminal_safe(token.name)} id={token.token_id} role={token.role.value} "
            f"state={token.state(now)} created={token.created_at} "
            f"expires={token.expires_at or 'never'}{revoked} "
            f"created_by={terminal_safe(token.created_by)}",
            markup=False,
        )


@tokens_app.command("revoke")
def tokens_revoke(
    name: Annotated[str, typer.Argument(help="The token's name (see `heimdall tokens list`).")],
    actor: ActorOption = None,
) -> None:
    """Revoke a service token: refused at its next use by every process."""
    with open_service() as (service, settings):
        revoked = revoke_token(service, name, caller=caller_for(settings, actor))
    out.print(
        f"service token {revoked.name} (id {revoked.token_id}, role {revoked.role}) is "
        f"revoked since {revoked.revoked_at}",
        markup=False,
    )
