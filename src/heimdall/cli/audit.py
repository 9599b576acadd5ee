"""``heimdall audit``: tail and verify the audit trail."""

from __future__ import annotations

from typing import Annotated

import orjson
import typer

from heimdall.audit import JsonlAuditLog
from heimdall.cli.common import (
    ActorOption,
    audit_app,
    caller_for,
    fail,
    load_settings,
    out,
)
from heimdall.rbac import Permission


def _audit_log(actor: str | None) -> JsonlAuditLog:
    settings = load_settings()
    caller = caller_for(settings, actor)
    if not caller.may(Permission.READ_AUDIT):
        fail(f"role {settings.role} may not read the audit trail")
    return JsonlAuditLog(settings.audit_file)


@audit_app.command("tail")
def audit_tail(
    lines: Annotated[int, typer.Option("-n", "--lines", min=1, max=100_000)] = 10,
    actor: ActorOption = None,
) -> None:
    """Print the last N audit events as JSON lines."""
    for event in _audit_log(actor).tail(lines):
        out.print(orjson.dumps(event).decode(), markup=False)


@audit_app.command("verify")
def audit_verify(actor: ActorOption = None) -> None:
    """Check the audit trail's hash chain: no line was edited, removed or reordered."""
    report = _audit_log(actor).verify()
    if not report.ok:
        fail(f"audit trail broken at line {report.first_bad_line}: {report.problem}")
    out.print(f"audit trail intact: {report.lines:,} events", markup=False)
