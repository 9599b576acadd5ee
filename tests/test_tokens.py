"""Service tokens: their format, their checks, and their audited, admin-only management.

The store's part is tests/token_contract.py, run on both stores; the command line's is
tests/test_cli_tokens.py.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from heimdall.audit import AuditEvent, EventType, MemoryAuditSink, Result
from heimdall.errors import AuditError, InvalidInput, PermissionDenied
from heimdall.rbac import Caller, Role
from heimdall.store.base import GraphStore
from heimdall.store.sqlite import SqliteStore
from heimdall.tokens import (
    MAX_LIFETIME,
    REJECT_REASONS,
    ServiceTokens,
    TokenNameTaken,
    TokenNotFound,
    TokenRejected,
    issue_token,
    list_tokens,
    parse_lifetime,
    revoke_token,
    token_hash,
)

ADMIN = Caller(actor="cli:ops", role=Role.ADMIN)
OPERATOR = Caller(actor="cli:root")  # the local operator: no role, every permission


class Owner:
    """What token management runs on: a store and an audit sink."""

    def __init__(self, store: GraphStore, audit: MemoryAuditSink) -> None:
        self.store = store
        self.audit = audit

    def record(self, *events: AuditEvent) -> None:
        self.audit.write(events)

    @property
    def events(self) -> list[AuditEvent]:
        return self.audit.events


class BrokenSink(MemoryAuditSink):
    """An audit sink that refuses every write, as a full disk would."""

    def write(self, events: Sequence[AuditEvent]) -> None:
        raise AuditError("audit log cannot be written (No space left on device)")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "heimdall.db")
    yield store
    store.close()


@pytest.fixture
def owner(store: SqliteStore) -> Owner:
    return Owner(store, MemoryAuditSink())


# -- the token and its checks -------------------------------------------------------------------


def test_a_token_is_the_prefix_and_32_random_bytes_in_base64url(store: SqliteStore) -> None:
    token, _ = ServiceTokens(store).create("svc", Role.APP, expires_in=None, created_by="a")

    assert token.startswith("hmd_")
    body = token[4:]
    assert len(body) == 43
    assert len(base64.urlsafe_b64decode(body + "=")) == 32
    assert token_hash(token) == hashlib.sha256(token.encode()).hexdigest()


@pytest.mark.parametrize(
    "presented",
    [
        pytest.param("", id="empty"),
        pytest.param("hmd_", id="prefix-only"),
        pytest.param("hmd_" + "A" * 42, id="short"),
        pytest.param("hmd_" + "A" * 44, id="long"),
        pytest.param("HMD_" + "A" * 43, id="prefix-case"),
        pytest.param("xyz_" + "A" * 43, id="other-prefix"),
        pytest.param("hmd_" + "A" * 42 + "=", id="padding"),
        pytest.param("hmd_" + "A" * 42 + "+", id="standard-alphabet"),
        pytest.param("hmd_" + "A" * 42 + "B", id="non-canonical-last-character"),
        pytest.param(" hmd_" + "A" * 43, id="leading-space"),
        pytest.param("hmd_" + "A" * 43 + "\n", id="trailing-newline"),
        pytest.param("Bearer hmd_" + "A" * 43, id="with-scheme"),
    ],
)
def test_a_malformed_token_is_refused_without_a_store_read(
    store: SqliteStore, presented: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_read(token_hash: str) -> None:
        raise AssertionError("a malformed token must not reach the store")

    monkeypatch.setattr(store, "token_by_hash", no_read)

    with pytest.raises(TokenRejected) as refused:
        ServiceTokens(store).authenticate(presented)

    assert refused.value.reason == "malformed"
    if len(presented) > len("hmd_"):
        assert presented.strip() not in str(refused.value)


def test_every_refusal_names_its_reason_and_never_the_token(store: SqliteStore) -> None:
    tokens = ServiceTokens(store)
    revoked, _ = tokens.create("gone", Role.APP, expires_in=None, created_by="a")
    tokens.revoke("gone", revoked_by="a")
    seen: set[str] = set()
    for presented in ("not-a-token", "hmd_" + "Q" * 43, revoked):
        with pytest.raises(TokenRejected) as refused:
            tokens.authenticate(presented)
        seen.add(refused.value.reason)
        assert presented not in str(refused.value)
        assert presented not in repr(refused.value)
        assert str(refused.value).count("\n") == 0
    assert seen == {"malformed", "unknown", "revoked"}
    assert seen < set(REJECT_REASONS)


def test_authenticate_reads_the_store_once_per_call_and_caches_nothing(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = ServiceTokens(store)
    token, _ = tokens.create("svc", Role.APP, expires_in=None, created_by="a")
    reads: list[str] = []
    real = store.token_by_hash

    def counted(token_hash: str) -> object:
        reads.append(token_hash)
        return real(token_hash)

    monkeypatch.setattr(store, "token_by_hash", counted)

    tokens.authenticate(token)
    tokens.authenticate(token)

    assert reads == [token_hash(token)] * 2


# -- inputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "lifetime"),
    [("30d", timedelta(days=30)), ("12h", timedelta(hours=12)), ("90m", timedelta(minutes=90))],
)
def test_a_lifetime_is_days_hours_or_minutes(text: str, lifetime: timedelta) -> None:
    assert parse_lifetime(text) == lifetime


@pytest.mark.parametrize(
    "text", ["", "0d", "0m", "-1d", "30", "d", "30s", "1.5h", "30 d", " 30d", "30D", "9999999d"]
)
def test_a_lifetime_that_is_not_one_is_invalid_input(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_lifetime(text)


@pytest.mark.parametrize(
    "expires_in", [timedelta(0), timedelta(seconds=-1), MAX_LIFETIME + timedelta(seconds=1)]
)
def test_create_refuses_a_lifetime_that_is_not_positive_or_too_long(
    store: SqliteStore, expires_in: timedelta
) -> None:
    with pytest.raises(InvalidInput):
        ServiceTokens(store).create("svc", Role.APP, expires_in=expires_in, created_by="a")
    assert store.list_tokens() == []


@pytest.mark.parametrize(
    "name", ["", "-svc", "svc name", "svc/1", "s" * 65, "svc\x1b[2J", "hmd_svc", "HMD_x"]
)
def test_create_refuses_a_name_that_is_not_one(store: SqliteStore, name: str) -> None:
    with pytest.raises(InvalidInput):
        ServiceTokens(store).create(name, Role.APP, expires_in=None, created_by="a")
    assert store.list_tokens() == []


def test_create_refuses_a_role_heimdall_does_not_have(store: SqliteStore) -> None:
    with pytest.raises(InvalidInput, match="heimdall-worker"):
        ServiceTokens(store).create(
            "svc",
            "heimdall-root",  # type: ignore[arg-type]
            expires_in=None,
            created_by="a",
        )
    assert store.list_tokens() == []


def test_revoke_refuses_a_token_given_as_its_name_without_echoing_it(store: SqliteStore) -> None:
    tokens = ServiceTokens(store)
    token, _ = tokens.create("svc", Role.APP, expires_in=None, created_by="a")

    with pytest.raises(InvalidInput) as refused:
        tokens.revoke(token, revoked_by="a")

    assert token not in str(refused.value)
    assert tokens.authenticate(token).name == "svc"


# -- management: admin only, audited --------------------------------------------------------------


@pytest.mark.parametrize("caller", [ADMIN, OPERATOR], ids=["heimdall-admin", "local-operator"])
def test_issue_and_revoke_are_audited_by_name_and_role_never_the_token(
    owner: Owner, caller: Caller
) -> None:
    token, issued = issue_token(
        owner, "enrich-1", Role.WORKER, expires_in=timedelta(days=1), caller=caller
    )
    revoke_token(owner, "enrich-1", caller=caller)

    assert [e.to_dict() for e in owner.events] == [
        {
            "timestamp": owner.events[0].timestamp,
            "event_type": "token.create",
            "actor": caller.actor,
            "request_id": caller.request_id,
            "token_name": "enrich-1",
            "role": "heimdall-worker",
            "result": "success",
        },
        {
            "timestamp": owner.events[1].timestamp,
            "event_type": "token.revoke",
            "actor": caller.actor,
            "request_id": caller.request_id,
            "token_name": "enrich-1",
            "role": "heimdall-worker",
            "result": "success",
        },
    ]
    for event in owner.events:
        assert token not in repr(event)
        assert token_hash(token) not in repr(event)
    with pytest.raises(TokenRejected, match="revoked"):
        ServiceTokens(owner.store).authenticate(token)
    assert issued.created_by == caller.actor


@pytest.mark.parametrize("role", [Role.APP, Role.WORKER, Role.AUDIT])
def test_only_the_admin_role_may_manage_tokens_and_each_refusal_is_audited(
    owner: Owner, role: Role
) -> None:
    token, _ = issue_token(owner, "existing", Role.APP, expires_in=None, caller=ADMIN)
    caller = Caller(actor="svc:someone", role=role)
    owner.events.clear()

    with pytest.raises(PermissionDenied, match=f"role {role.value} may not manage service"):
        issue_token(owner, "mine", Role.ADMIN, expires_in=None, caller=caller)
    with pytest.raises(PermissionDenied):
        revoke_token(owner, "existing", caller=caller)
    with pytest.raises(PermissionDenied):
        list_tokens(owner, caller=caller)

    assert [(e.event_type, e.result, e.operation) for e in owner.events] == [
        (EventType.ACCESS_DENIED, Result.DENIED, "token.create"),
        (EventType.ACCESS_DENIED, Result.DENIED, "token.revoke"),
        (EventType.ACCESS_DENIED, Result.DENIED, "token.list"),
    ]
    assert [t.name for t in owner.store.list_tokens()] == ["existing"]
    assert ServiceTokens(owner.store).authenticate(token).name == "existing"


def test_a_failed_creation_or_revocation_is_audited_as_a_failure(owner: Owner) -> None:
    issue_token(owner, "enrich-1", Role.WORKER, expires_in=None, caller=ADMIN)
    owner.events.clear()

    with pytest.raises(TokenNameTaken):
        issue_token(owner, "enrich-1", Role.APP, expires_in=None, caller=ADMIN)
    with pytest.raises(TokenNotFound):
        revoke_token(owner, "nobody", caller=ADMIN)

    assert [(e.event_type, e.result, e.error, e.token_name) for e in owner.events] == [
        (EventType.TOKEN_CREATE, Result.FAILURE, "TokenNameTaken", "enrich-1"),
        (EventType.TOKEN_REVOKE, Result.FAILURE, "TokenNotFound", "nobody"),
    ]


def test_a_token_typed_as_a_name_reaches_neither_the_trail_nor_the_message(owner: Owner) -> None:
    token, _ = issue_token(owner, "enrich-1", Role.WORKER, expires_in=None, caller=ADMIN)

    for attempt in (
        lambda: revoke_token(owner, token, caller=ADMIN),
        lambda: issue_token(owner, token, Role.APP, expires_in=None, caller=ADMIN),
    ):
        with pytest.raises(InvalidInput) as refused:
            attempt()
        assert token not in str(refused.value)

    failures = owner.events[1:]
    assert [(e.result, e.error) for e in failures] == [(Result.FAILURE, "InvalidInput")] * 2
    assert all(e.token_name is None for e in failures)
    assert all(token not in repr(e) for e in owner.events)


def test_a_token_whose_creation_cannot_be_audited_is_revoked_and_never_returned(
    store: SqliteStore,
) -> None:
    owner = Owner(store, BrokenSink())

    with pytest.raises(AuditError):
        issue_token(owner, "enrich-1", Role.WORKER, expires_in=None, caller=ADMIN)

    [stored] = store.list_tokens()
    assert stored.name == "enrich-1"
    assert stored.revoked_at is not None
    assert stored.revoked_by == "cli:ops (creation not audited)"


def test_a_revocation_stands_even_when_its_event_cannot_be_written(store: SqliteStore) -> None:
    working = Owner(store, MemoryAuditSink())
    token, _ = issue_token(working, "enrich-1", Role.WORKER, expires_in=None, caller=ADMIN)

    with pytest.raises(AuditError):
        revoke_token(Owner(store, BrokenSink()), "enrich-1", caller=ADMIN)

    with pytest.raises(TokenRejected, match="revoked"):
        ServiceTokens(store).authenticate(token)


def test_list_tokens_shows_records_and_no_secret(owner: Owner) -> None:
    token, issued = issue_token(owner, "enrich-1", Role.WORKER, expires_in=None, caller=ADMIN)

    listed = list_tokens(owner, caller=ADMIN)

    assert listed == [issued]
    assert not hasattr(listed[0], "token_hash")
    assert token not in repr(listed) and token_hash(token) not in repr(listed)


def test_nothing_logged_while_tokens_are_made_checked_and_revoked_holds_one(
    owner: Owner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token, _ = issue_token(owner, "enrich-1", Role.WORKER, expires_in=None, caller=ADMIN)
    tokens = ServiceTokens(owner.store)
    tokens.authenticate(token)
    revoke_token(owner, "enrich-1", caller=ADMIN)
    with pytest.raises(TokenRejected):
        tokens.authenticate(token)
    with pytest.raises(InvalidInput):
        revoke_token(owner, token, caller=ADMIN)

    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert token not in logged
    assert token_hash(token) not in logged
