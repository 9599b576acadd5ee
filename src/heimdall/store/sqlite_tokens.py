"""Service tokens on SQLite (see :mod:`heimdall.store.tokens`)."""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from typing import Final

from heimdall.store.tokens import StoredToken, TokenStatements, token_from_row

__all__ = ["SqliteTokens"]

_SQL: Final = TokenStatements("?")


class SqliteTokens:
    """Mixed into SqliteStore, whose connection plumbing it uses."""

    def _session(self, operation: str) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _transaction(self, operation: str) -> AbstractContextManager[sqlite3.Connection]:
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
        with self._session("insert_token") as conn:
            return conn.execute(_SQL.insert, row).rowcount == 1

    def token_by_hash(self, token_hash: str) -> StoredToken | None:
        with self._session("token_by_hash") as conn:
            row = conn.execute(_SQL.by_hash, (token_hash,)).fetchone()
        return None if row is None else token_from_row(row)

    def list_tokens(self) -> list[StoredToken]:
        with self._session("list_tokens") as conn:
            rows = conn.execute(_SQL.all).fetchall()
        return [token_from_row(row) for row in rows]

    def revoke_token(self, name: str, *, revoked_at: str, revoked_by: str) -> StoredToken | None:
        with self._transaction("revoke_token") as conn:
            conn.execute(_SQL.revoke, (revoked_at, revoked_by, name))
            row = conn.execute(_SQL.by_name, (name,)).fetchone()
        return None if row is None else token_from_row(row)
