"""The behaviour every store must have for service tokens, as a reusable pytest base class.

A backend's test module subclasses :class:`TokenStoreContract` (as ``Test<Backend>TokenContract``)
and provides:

* a fixture ``store`` yielding a fresh, empty, open store, closed on teardown;
* ``open_again(store)``, a second open store over the same data (another connection, as another
  process has). The caller closes it. Required;
* ``stored_bytes(store)``, everything the backend keeps of the tokens as bytes (the database
  file, or the table's rows), to show what is and is not stored. Required.

The tokens are made and checked through :class:`heimdall.tokens.ServiceTokens` on the store, with
a clock the tests move, and through the store's own methods where the contract is the store's.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from heimdall.rbac import Role
from heimdall.store.base import GraphStore
from heimdall.store.tokens import StoredToken
from heimdall.tokens import (
    ServiceToken,
    ServiceTokens,
    TokenNameTaken,
    TokenNotFound,
    TokenRejected,
    token_hash,
)

__all__ = ["START", "Clock", "TokenStoreContract"]

START = datetime(2026, 3, 1, 2, 0, 0, tzinfo=UTC)
TOKEN_FORMAT = re.compile(r"hmd_[A-Za-z0-9_-]{43}")


class Clock:
    """A clock the test moves."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class TokenStoreContract:
    def open_again(self, store: GraphStore) -> GraphStore:
        raise NotImplementedError

    def stored_bytes(self, store: GraphStore) -> bytes:
        raise NotImplementedError

    def test_a_created_token_authenticates_as_its_record(self, store: GraphStore) -> None:
        tokens = ServiceTokens(store, clock=Clock())

        token, created = tokens.create(
            "enrich-1", Role.WORKER, expires_in=timedelta(days=30), created_by="cli:ops"
        )

        assert TOKEN_FORMAT.fullmatch(token)
        assert created == ServiceToken(
            token_id=created.token_id,
            name="enrich-1",
            role=Role.WORKER,
            created_at="2026-03-01T02:00:00Z",
            expires_at="2026-03-31T02:00:00Z",
            revoked_at=None,
            created_by="cli:ops",
        )
        assert re.fullmatch(r"[0-9a-f]{12}", created.token_id)
        assert tokens.authenticate(token) == created

    def test_the_store_keeps_the_tokens_hash_and_never_the_token(self, store: GraphStore) -> None:
        token, created = ServiceTokens(store).create(
            "enrich-1", Role.WORKER, expires_in=None, created_by="cli:ops"
        )

        stored = self.stored_bytes(store)
        assert token.encode() not in stored
        assert token[len("hmd_") :].encode() not in stored  # not even without its prefix
        assert token_hash(token).encode() in stored
        assert created.token_id.encode() in stored
        # Nor do the records handed out carry it, or its hash.
        for shown in (repr(created), repr(store.list_tokens()), repr(ServiceTokens(store).list())):
            assert token not in shown
            assert token_hash(token) not in shown

    def test_each_token_is_random_and_differs_from_its_hash(self, store: GraphStore) -> None:
        tokens = ServiceTokens(store)
        made = [
            tokens.create(f"svc-{n}", Role.APP, expires_in=None, created_by="cli:ops")
            for n in range(3)
        ]

        assert len({token for token, _ in made}) == 3
        assert len({record.token_id for _, record in made}) == 3
        for token, record in made:
            assert tokens.authenticate(token) == record

    def test_a_revocation_is_seen_at_once_through_another_connection(
        self, store: GraphStore
    ) -> None:
        token, _ = ServiceTokens(store).create(
            "enrich-1", Role.WORKER, expires_in=None, created_by="cli:ops"
        )
        other = self.open_again(store)
        try:
            checker = ServiceTokens(other)
            assert checker.authenticate(token).name == "enrich-1"  # read once: nothing cached

            ServiceTokens(store).revoke("enrich-1", revoked_by="cli:ops")

            with pytest.raises(TokenRejected) as refused:
                checker.authenticate(token)
        finally:
            other.close()
        assert refused.value.reason == "revoked"
        assert refused.value.token_name == "enrich-1"
        assert token not in str(refused.value)

    def test_a_token_is_refused_from_the_second_it_expires(self, store: GraphStore) -> None:
        clock = Clock()
        tokens = ServiceTokens(store, clock=clock)
        token, _ = tokens.create(
            "short", Role.APP, expires_in=timedelta(hours=12), created_by="cli:ops"
        )

        clock.now = START + timedelta(hours=12) - timedelta(milliseconds=1)
        assert tokens.authenticate(token).name == "short"
        clock.now = START + timedelta(hours=12)
        with pytest.raises(TokenRejected) as refused:
            tokens.authenticate(token)
        assert refused.value.reason == "expired"

        # Expiry is judged by the reader's clock: another process sees it expired too.
        other = self.open_again(store)
        try:
            with pytest.raises(TokenRejected, match="expired"):
                ServiceTokens(other, clock=Clock(START + timedelta(days=1))).authenticate(token)
        finally:
            other.close()

    def test_a_token_never_created_is_refused_as_unknown(self, store: GraphStore) -> None:
        tokens = ServiceTokens(store)
        real, _ = tokens.create("real", Role.APP, expires_in=None, created_by="cli:ops")
        forged = "hmd_" + ("A" if real[4] != "A" else "B") + real[5:]

        with pytest.raises(TokenRejected) as refused:
            tokens.authenticate(forged)

        assert refused.value.reason == "unknown"
        assert refused.value.token_name is None
        assert forged not in str(refused.value)

    def test_a_taken_name_is_refused_and_the_first_token_still_works(
        self, store: GraphStore
    ) -> None:
        tokens = ServiceTokens(store)
        first, record = tokens.create("enrich-1", Role.WORKER, expires_in=None, created_by="a")

        with pytest.raises(TokenNameTaken, match="enrich-1"):
            tokens.create("enrich-1", Role.ADMIN, expires_in=None, created_by="b")

        assert tokens.authenticate(first) == record
        assert [t.name for t in tokens.list()] == ["enrich-1"]

    def test_a_revoked_tokens_name_is_never_reused(self, store: GraphStore) -> None:
        tokens = ServiceTokens(store)
        tokens.create("enrich-1", Role.WORKER, expires_in=None, created_by="a")
        tokens.revoke("enrich-1", revoked_by="a")

        with pytest.raises(TokenNameTaken):
            tokens.create("enrich-1", Role.WORKER, expires_in=None, created_by="a")

    def test_insert_token_reports_a_taken_name_and_writes_nothing(self, store: GraphStore) -> None:
        first = StoredToken("a" * 12, "svc", "heimdall-app", "1" * 64, "t1", None, None, "x")
        second = StoredToken("b" * 12, "svc", "heimdall-admin", "2" * 64, "t2", None, None, "y")

        assert store.insert_token(first) is True
        assert store.insert_token(second) is False

        assert store.list_tokens() == [first]
        assert store.token_by_hash("2" * 64) is None
        assert store.token_by_hash("1" * 64) == first

    def test_revoking_again_keeps_the_first_revocation(self, store: GraphStore) -> None:
        clock = Clock()
        tokens = ServiceTokens(store, clock=clock)
        tokens.create("enrich-1", Role.WORKER, expires_in=None, created_by="a")

        first = tokens.revoke("enrich-1", revoked_by="cli:first")
        clock.now = START + timedelta(hours=1)
        again = tokens.revoke("enrich-1", revoked_by="cli:second")

        assert first.revoked_at == again.revoked_at == "2026-03-01T02:00:00Z"
        [stored] = store.list_tokens()
        assert stored.revoked_by == "cli:first"

    def test_revoking_a_name_no_token_has_is_token_not_found(self, store: GraphStore) -> None:
        with pytest.raises(TokenNotFound, match="nobody"):
            ServiceTokens(store).revoke("nobody", revoked_by="a")
        assert store.revoke_token("nobody", revoked_at="t", revoked_by="a") is None
        assert store.list_tokens() == []

    def test_list_holds_every_token_oldest_first_with_its_state(self, store: GraphStore) -> None:
        clock = Clock()
        tokens = ServiceTokens(store, clock=clock)
        tokens.create("b-svc", Role.APP, expires_in=timedelta(minutes=90), created_by="a")
        clock.now = START + timedelta(minutes=1)
        tokens.create("a-svc", Role.AUDIT, expires_in=None, created_by="a")
        tokens.create("c-svc", Role.ADMIN, expires_in=None, created_by="a")
        tokens.revoke("c-svc", revoked_by="a")

        listed = tokens.list()

        assert [(t.name, t.role) for t in listed] == [
            ("b-svc", Role.APP),
            ("a-svc", Role.AUDIT),
            ("c-svc", Role.ADMIN),
        ]
        later = START + timedelta(hours=2)
        assert [t.state(later) for t in listed] == ["expired", "active", "revoked"]
        assert listed[0].expires_at == "2026-03-01T03:30:00Z"

    def test_tokens_outlive_the_store_that_made_them(self, store: GraphStore) -> None:
        token, record = ServiceTokens(store).create(
            "enrich-1", Role.WORKER, expires_in=None, created_by="a"
        )
        store.close()
        other = self.open_again(store)
        try:
            assert ServiceTokens(other).authenticate(token) == record
        finally:
            other.close()
