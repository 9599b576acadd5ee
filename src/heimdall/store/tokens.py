"""Service tokens as the store keeps them: a name, a role and the SHA-256 of the token.

spec: Access Control Model, Authentication Methods. :mod:`heimdall.tokens` makes and checks the
tokens; the store only keeps their records, in the table ``service_tokens`` (migration 5 of both
stores). Invariants every backend keeps:

* the token itself is never given to the store, only its hash (64 lowercase hex digits), so the
  database, its backups and its logs hold nothing a caller could present;
* a token is found by its hash through a unique index: one indexed read, nothing cached, so a
  revocation committed by any process is seen by the next read of every other;
* names are unique among all tokens ever created, revoked ones included (an audit event naming a
  token names one token forever); ``insert_token`` reports a taken name instead of raising;
* a revocation is written once: revoking again keeps the first ``revoked_at`` and
  ``revoked_by``.

Both stores run the statements below; only the placeholder differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Protocol

__all__ = [
    "ROW_COLUMNS",
    "SqlTokens",
    "StoredToken",
    "TokenStatements",
    "TokenStore",
    "token_from_row",
]

# The service_tokens columns both stores select and insert, in token_from_row's order.
ROW_COLUMNS: Final = (
    "token_id, name, role, token_hash, created_at, expires_at, revoked_at, created_by, revoked_by"
)


@dataclass(frozen=True, slots=True)
class StoredToken:
    """One row of ``service_tokens``. Its repr leaves out the hash."""

    token_id: str
    name: str
    role: str
    token_hash: str = field(repr=False)
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    created_by: str
    revoked_by: str | None = None


def token_from_row(row: Sequence[Any]) -> StoredToken:
    """A StoredToken from a row of :data:`ROW_COLUMNS`."""
    token_id, name, role, token_hash, created, expires, revoked, created_by, revoked_by = row
    return StoredToken(
        token_id=token_id,
        name=name,
        role=role,
        token_hash=token_hash,
        created_at=created,
        expires_at=expires,
        revoked_at=revoked,
        created_by=created_by,
        revoked_by=revoked_by,
    )


class TokenStatements:
    """The statements on ``service_tokens``, with *placeholder* for a bound parameter."""

    def __init__(self, placeholder: str) -> None:
        def sql(template: str) -> str:
            return template.format(p=placeholder, columns=ROW_COLUMNS)

        # ON CONFLICT (name): a taken name inserts nothing (rowcount 0). A repeated token_id
        # or hash (2^-48 and 2^-256 chances) still fails the statement instead of passing.
        self.insert: Final = sql(
            "INSERT INTO service_tokens (token_id, name, role, token_hash, created_at,"
            " expires_at, created_by) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})"
            " ON CONFLICT (name) DO NOTHING"
        )
        self.by_hash: Final = sql("SELECT {columns} FROM service_tokens WHERE token_hash = {p}")
        self.by_name: Final = sql("SELECT {columns} FROM service_tokens WHERE name = {p}")
        self.all: Final = sql("SELECT {columns} FROM service_tokens ORDER BY created_at, name")
        self.revoke: Final = sql(
            "UPDATE service_tokens SET revoked_at = {p}, revoked_by = {p}"
            " WHERE name = {p} AND revoked_at IS NULL"
        )


class TokenStore(Protocol):
    """What a store keeps of service tokens (see the module docstring)."""

    def insert_token(self, token: StoredToken) -> bool:
        """Store *token*; False (and nothing written) if its name is taken."""
        ...

    def token_by_hash(self, token_hash: str) -> StoredToken | None:
        """The token whose SHA-256 is *token_hash* (hex), by one indexed read; None if none."""
        ...

    def list_tokens(self) -> list[StoredToken]:
        """Every token, revoked and expired ones included, oldest first."""
        ...

    def revoke_token(self, name: str, *, revoked_at: str, revoked_by: str) -> StoredToken | None:
        """Mark the token *name* revoked unless it is already; the token as stored afterwards,
        or None if no token has that name."""
        ...


class _Executes(Protocol):
    """A DB-API connection or cursor, as far as these statements need one."""

    def execute(self, query: str, params: Any = ..., /) -> Any: ...


class SqlTokens:
    """:class:`TokenStore` over the statements above, mixed into a SQL store: the store gives
    its placeholder and how it lends a connection for one read, and for one transaction."""

    _token_sql: ClassVar[TokenStatements]

    def _token_read(self, operation: str) -> AbstractContextManager[_Executes]:
        raise NotImplementedError

    def _token_write(self, operation: str) -> AbstractContextManager[_Executes]:
        raise NotImplementedError

    def insert_token(self, token: StoredToken) -> bool:
        row = (
            token.token_id,
            token.name,
            token.role,
            token.token_hash,
            token.created_at,
            token.expires_at,
            token.created_by,
        )
        with self._token_read("insert_token") as conn:
            return bool(conn.execute(self._token_sql.insert, row).rowcount == 1)

    def token_by_hash(self, token_hash: str) -> StoredToken | None:
        with self._token_read("token_by_hash") as conn:
            row = conn.execute(self._token_sql.by_hash, (token_hash,)).fetchone()
        return None if row is None else token_from_row(row)

    def list_tokens(self) -> list[StoredToken]:
        with self._token_read("list_tokens") as conn:
            rows = conn.execute(self._token_sql.all).fetchall()
        return [token_from_row(row) for row in rows]

    def revoke_token(self, name: str, *, revoked_at: str, revoked_by: str) -> StoredToken | None:
        with self._token_write("revoke_token") as conn:
            conn.execute(self._token_sql.revoke, (revoked_at, revoked_by, name))
            row = conn.execute(self._token_sql.by_name, (name,)).fetchone()
        return None if row is None else token_from_row(row)
