"""Reading and checking the audit trail. spec: Audit and Compliance; Runbook: Emergency Key
Compromise Response, step 4 ("audit all decryption events during the compromise window").

``GET /admin/audit`` answers one page of the records that match every filter given, oldest
first, as a JSON object ``{"events": [...], "next_cursor": ...}``; the next page is the same
query with ``cursor=<next_cursor>``, until it is null. The log is read line by line by
:func:`heimdall.audit.query.query_audit` (never whole into memory, nor the page's matches beyond
``limit``, at most 10,000). Records are as stored, ``hash`` included, so a page can be checked
against the chain. ``GET /admin/audit/verify`` checks the chain, the head record and every keyed
checkpoint, as ``heimdall audit verify`` does, and answers 200 with ``"ok": false`` and the
first bad line when the trail is broken. Both need read_audit; a refusal is audited, as
``heimdall audit tail`` and ``query`` audit theirs.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from heimdall.api.auth import AuthenticatedCaller
from heimdall.api.deps import audit_log_of, service_of, settings_of
from heimdall.audit import JsonlAuditLog
from heimdall.audit.query import MAX_LIMIT, AuditFilter, parse_time, query_audit
from heimdall.errors import InvalidInput
from heimdall.rbac import Permission
from heimdall.service import Heimdall

__all__ = ["router"]

router = APIRouter(prefix="/admin/audit", tags=["audit"])


class AuditPageBody(BaseModel):
    events: list[dict[str, Any]]
    next_cursor: str | None


class VerifyBody(BaseModel):
    ok: bool
    lines: int
    events: int
    checkpoints: int
    events_after_checkpoint: int
    key_identifier: str | None  # the key that checked the last checkpoint
    key_identifiers: list[str]  # every key that checked one (more after a provider move)
    vouched: int  # checkpoints not checked here (see README), vouched for by a later one
    vouched_keys: list[str]
    unanswered_keys: list[str]  # configured, their provider down: vouched for all the same
    first_bad_line: int | None
    problem: str | None
    torn_tail: bool


def _time(value: str | None, name: str) -> Any:
    try:
        return None if value is None else parse_time(value)
    except InvalidInput as exc:
        raise InvalidInput(f"{name}: {exc}") from None


@router.get("", response_model=AuditPageBody)
def query_trail(
    request: Request,
    caller: AuthenticatedCaller,
    *,
    since: Annotated[str | None, Query(description="ISO-8601, inclusive; no offset: UTC")] = None,
    until: Annotated[str | None, Query(description="ISO-8601, exclusive")] = None,
    event_type: Annotated[
        list[str] | None, Query(description="e.g. crypto.decrypt; repeatable")
    ] = None,
    actor: str | None = None,
    key_version: Annotated[int | None, Query(ge=0)] = None,
    field: Annotated[str | None, Query(description="a field identifier (canonical key)")] = None,
    result: Annotated[str | None, Query(description="success, failure or denied")] = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 1000,
) -> AuditPageBody:
    """One page of the audit records matching every filter given (permission: read_audit)."""
    service_of(request).require(caller, Permission.READ_AUDIT)
    _check_parameters(request)
    flt = AuditFilter(
        since=_time(since, "since"),
        until=_time(until, "until"),
        event_types=frozenset(event_type or ()),
        actor=actor,
        key_version=key_version,
        field_identifier=field,
        result=result,
    )
    page = query_audit(settings_of(request).audit_file, flt, cursor=cursor, limit=limit)
    return AuditPageBody(events=page.events, next_cursor=page.next_cursor)


_PARAMETERS: Final = (
    "since",
    "until",
    "event_type",
    "actor",
    "key_version",
    "field",
    "result",
    "cursor",
    "limit",
)
_REPEATABLE: Final = frozenset({"event_type"})


def _check_parameters(request: Request) -> None:
    """InvalidInput for a parameter the query does not have, or one given twice: a misspelt
    filter (``keyversion=3``) would otherwise be ignored and the page hold every event, and
    of a parameter given twice one value would be silently dropped."""
    names = [name for name, _ in request.query_params.multi_items()]
    if any(name not in _PARAMETERS for name in names):
        raise InvalidInput(
            "an unknown query parameter (its name is not repeated); the parameters are "
            + ", ".join(_PARAMETERS)
        )
    twice = sorted({name for name in names if name not in _REPEATABLE and names.count(name) > 1})
    if twice:
        raise InvalidInput(f"query parameter {twice[0]} is given more than once")


def _log_of(service: Heimdall) -> JsonlAuditLog:
    log = audit_log_of(service)
    assert log is not None  # what heimdall.app builds
    return log


@router.get("/verify", response_model=VerifyBody)
def verify_trail(request: Request, caller: AuthenticatedCaller) -> VerifyBody:
    """Check the hash chain, the head record and every keyed checkpoint (permission:
    read_audit)."""
    service = service_of(request)
    service.require(caller, Permission.READ_AUDIT)
    report = _log_of(service).verify()
    return VerifyBody(
        ok=report.ok,
        lines=report.lines,
        events=report.events,
        checkpoints=report.checkpoints,
        events_after_checkpoint=report.events_after_checkpoint,
        key_identifier=report.key_identifier,
        key_identifiers=list(report.key_identifiers),
        vouched=report.vouched,
        vouched_keys=list(report.vouched_keys),
        unanswered_keys=list(report.unanswered_keys),
        first_bad_line=report.first_bad_line,
        problem=report.problem,
        torn_tail=report.torn_tail,
    )
