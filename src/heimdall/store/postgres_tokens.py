"""Service tokens on PostgreSQL (see :mod:`heimdall.store.tokens`)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import psycopg

from heimdall.store.tokens import SqlTokens, TokenStatements

__all__ = ["PostgresTokens"]

Cursor = psycopg.Cursor[tuple[Any, ...]]


class PostgresTokens(SqlTokens):
    """Mixed into PostgresStore, whose connection plumbing (and error translation) it uses."""

    _token_sql = TokenStatements("%s")

    def _connection(self, operation: str) -> AbstractContextManager[psycopg.Connection[Any]]:
        raise NotImplementedError

    def _transaction(self, operation: str) -> AbstractContextManager[Cursor]:
        raise NotImplementedError

    def _token_read(self, operation: str) -> AbstractContextManager[psycopg.Connection[Any]]:
        return self._connection(operation)

    def _token_write(self, operation: str) -> AbstractContextManager[Cursor]:
        return self._transaction(operation)
