"""Service tokens on PostgreSQL (see :mod:`heimdall.store.tokens`)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Final

import psycopg

from heimdall.store.tokens import StoredToken, TokenStatements, token_from_row

__all__ = ["PostgresTokens"]

Cursor = psycopg.Cursor[tuple[Any, ...]]

_SQL: Final = TokenStatements("%s")


class PostgresTokens:
    """Mixed into PostgresStore, whose connection plumbing (and error translation) it uses."""

    def _connection(self, operation: str) -> AbstractContextManager[psycopg.Connection[Any]]:
        raise NotImplementedError

    def _transaction(self, operation: str) -> AbstractContextManager[Cursor]:
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
        with self._connection("insert_token") as conn:
            return conn.execute(_SQL.insert, row).rowcount == 1

    def token_by_hash(self, token_hash: str) -> StoredToken | None:
        with self._connection("token_by_hash") as conn:
            row = conn.execute(_SQL.by_hash, (token_hash,)).fetchone()
        return None if row is None else token_from_row(row)

    def list_tokens(self) -> list[StoredToken]:
        with self._connection("list_tokens") as conn:
            rows = conn.execute(_SQL.all).fetchall()
        return [token_from_row(row) for row in rows]

    def revoke_token(self, name: str, *, revoked_at: str, revoked_by: str) -> StoredToken | None:
        with self._transaction("revoke_token") as cursor:
            cursor.execute(_SQL.revoke, (revoked_at, revoked_by, name))
            row = cursor.execute(_SQL.by_name, (name,)).fetchone()
        return None if row is None else token_from_row(row)
