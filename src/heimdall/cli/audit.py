"""``heimdall audit``: tail and verify the audit trail, and repair a torn final line."""

from __future__ import annotations

from typing import Annotated

import typer

from heimdall.app import check_environment, open_audit_log
from heimdall.audit import AuditEvent, JsonlAuditLog, VerifyReport
from heimdall.cli.common import (
    ActorOption,
    audit_app,
    caller_for,
    fail,
    load_settings,
    out,
)
from heimdall.cli.output import write_json_lines
from heimdall.errors import AuditError, HeimdallError
from heimdall.rbac import Caller, Permission, Role
from heimdall.settings import Settings

RepairOption = Annotated[
    bool,
    typer.Option(
        "--repair-torn-tail",
        help="First cut off a torn final line left by an interrupted append (audited); "
        "refused for any other damage.",
    ),
]


def _reader(actor: str | None) -> tuple[Settings, Caller]:
    settings = load_settings()
    check_environment(settings)  # a production store's trail is read in production only
    caller = caller_for(settings, actor)
    if not caller.may(Permission.READ_AUDIT):
        unaudited = _record_denial(settings, caller, Permission.READ_AUDIT)
        fail(f"role {settings.role} may not read the audit trail{unaudited}")
    return settings, caller


def _record_denial(settings: Settings, caller: Caller, permission: Permission) -> str:
    """An access.denied event, as every other command records its refusals; "" when it was
    written, else the end of the refusal's message saying why it was not (the refusal stands:
    on a damaged trail it is the damage an operator must see first)."""
    role = caller.role.value if caller.role else "none"
    try:
        log = open_audit_log(settings)
    except HeimdallError as exc:
        return f" (the refusal could not be audited: {exc})"
    try:
        log.write(
            [AuditEvent.denial(caller, permission.value, f"role {role} lacks {permission.value}")]
        )
    except AuditError as exc:
        return f" (the refusal could not be audited: {exc})"
    finally:
        log.close()
    return ""


@audit_app.command("tail")
def audit_tail(
    lines: Annotated[int, typer.Option("-n", "--lines", min=1, max=100_000)] = 10,
    actor: ActorOption = None,
) -> None:
    """Print the last N audit records as JSON lines (ASCII-escaped on a terminal)."""
    settings, _ = _reader(actor)
    write_json_lines(JsonlAuditLog(settings.audit_file).tail(lines))


@audit_app.command("verify")
def audit_verify(actor: ActorOption = None, repair_torn_tail: RepairOption = False) -> None:
    """Check the hash chain, the head record and every keyed checkpoint (with the key
    provider): no line was edited, removed or reordered."""
    settings, caller = _reader(actor)
    log = open_audit_log(settings)
    if repair_torn_tail:
        if caller.role not in (None, Role.ADMIN):
            unaudited = _record_denial(settings, caller, Permission.CONFIGURE_KEYS)
            fail(
                f"role {caller.role} may not repair the audit trail (heimdall-admin may)"
                + unaudited
            )
        try:
            removed = log.repair_torn_tail(actor=caller.actor, request_id=caller.request_id)
        finally:
            log.close()  # a checkpoint over the repair event
        out.print(
            f"removed a torn final line ({removed:,} bytes) left by an interrupted append; "
            "the repair is audited (audit.repair)",
            markup=False,
        )
    report = log.verify()
    if not report.ok:
        where = f" at line {report.first_bad_line}" if report.first_bad_line else ""
        fail(f"audit trail broken{where}: {report.problem}")
    for line in _summary(report):
        out.print(line, markup=False)


def _summary(report: VerifyReport) -> list[str]:
    intact = f"audit trail intact: {report.events:,} events"
    if not report.checkpoints:
        return [
            intact,
            "it has no keyed checkpoints (written before them, or without a key provider): "
            "only the keyless hash chain and the head record protect it, and whoever can "
            "write the file can rewrite both",
        ]
    lines = [
        f"{intact}, {report.checkpoints:,} keyed checkpoints verified with {report.key_identifier}"
    ]
    if report.events_after_checkpoint:
        lines.append(
            f"{report.events_after_checkpoint:,} events follow the last checkpoint: only the "
            "keyless hash chain and the head record protect those"
        )
    return lines
