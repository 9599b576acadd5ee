"""``heimdall audit``: tail, query and verify the audit trail, and repair a torn final line."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import orjson
import typer

from heimdall.app import check_environment, open_audit_log
from heimdall.audit import AuditEvent, JsonlAuditLog, VerifyReport
from heimdall.audit.query import MAX_LIMIT, AuditFilter, parse_time, query_audit
from heimdall.cli.common import (
    ActorOption,
    JsonOption,
    audit_app,
    caller_for,
    err,
    fail,
    load_settings,
    out,
)
from heimdall.cli.output import terminal_safe, write_json, write_json_lines
from heimdall.errors import AuditError, HeimdallError, InvalidInput
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


def _time_option(value: str | None, option: str) -> datetime | None:
    try:
        return None if value is None else parse_time(value)
    except InvalidInput as exc:
        raise InvalidInput(f"{option}: {exc}") from None


# The members every line of the text form starts with; the others follow as name=value.
_LEADING = ("timestamp", "event_type", "result")


def _text_line(record: dict[str, Any]) -> str:
    """A record as one line for a reader: each value terminal-safe (a newline in a value is
    shown as \\n, so a line is always one record)."""

    def shown(value: Any) -> str:
        return terminal_safe(value if isinstance(value, str) else orjson.dumps(value).decode())

    leading = [shown(record.get(name, "-")) for name in _LEADING]
    rest = [
        f"{terminal_safe(str(name))}={shown(value)}"
        for name, value in record.items()
        if name not in _LEADING and name != "hash"
    ]
    return " ".join(leading + rest)


@audit_app.command("query")
def audit_query(  # keyword-only: one per option
    *,
    since: Annotated[
        str | None, typer.Option(help="From this ISO-8601 time, inclusive (no offset: UTC).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Up to this time, exclusive.")] = None,
    event: Annotated[
        list[str] | None,
        typer.Option("--event", help="Only this event type (e.g. crypto.decrypt); repeatable."),
    ] = None,
    actor: Annotated[str | None, typer.Option("--actor", help="Only this actor's events.")] = None,
    key_version: Annotated[
        int | None, typer.Option("--key-version", help="Only events under this key version.")
    ] = None,
    field: Annotated[
        str | None, typer.Option("--field", help="Only events on this field identifier.")
    ] = None,
    result: Annotated[
        str | None, typer.Option("--result", help="Only this result: success, failure, denied.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", help=f"At most this many events (1 to {MAX_LIMIT:,}).")
    ] = 1000,
    cursor: Annotated[
        str | None, typer.Option("--cursor", help="Continue where a previous query stopped.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Print the events that match every filter given, oldest first: e.g. every decryption
    under key version 3 in a compromise window (--event crypto.decrypt --key-version 3
    --since ... --until ...)."""
    settings, _ = _reader(None)  # --actor filters here; the reader is HMD_ACTOR or the user
    flt = AuditFilter(
        since=_time_option(since, "--since"),
        until=_time_option(until, "--until"),
        event_types=frozenset(event or ()),
        actor=actor,
        key_version=key_version,
        field_identifier=field,
        result=result,
    )
    page = query_audit(settings.audit_file, flt, cursor=cursor, limit=limit)
    if as_json:
        write_json({"events": page.events, "next_cursor": page.next_cursor})
        return
    for record in page.events:
        out.print(_text_line(record), markup=False)
    if page.next_cursor is not None:
        err.print(
            f"more events match: run the same query with --cursor {page.next_cursor}",
            markup=False,
        )
    elif not page.events:
        err.print("no event matches", markup=False)


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
            f"removed the tail of an interrupted append ({removed:,} bytes the head record never "
            "vouched for: a torn line or lines whose append did not finish); the repair is "
            "audited (audit.repair)",
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
        f"{intact}, {report.checkpoints:,} keyed checkpoints verified with "
        + " and ".join(report.key_identifiers)
    ]
    if report.vouched:
        lines.append(
            (
                f"{report.vouched:,} checkpoints made with {' and '.join(report.vouched_keys)} "
                "were not checked here"
                if report.vouched != 1
                else f"1 checkpoint made with {report.vouched_keys[0]} was not checked here"
            )
            + " (a key not configured, a provider that did not answer, or a name now another "
            "key's): a later checkpoint vouches for the trail before it, made once that had "
            "verified"
        )
    if report.unanswered_keys:
        lines.append(
            f"the provider of {' and '.join(report.unanswered_keys)} did not answer: a later "
            "checkpoint vouches for its checkpoints"
        )
    if report.events_after_checkpoint:
        lines.append(
            f"{report.events_after_checkpoint:,} events follow the last checkpoint: only the "
            "keyless hash chain and the head record protect those"
        )
    return lines
