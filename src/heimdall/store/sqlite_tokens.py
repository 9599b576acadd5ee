"""Service tokens on SQLite (see :mod:`heimdall.store.tokens`)."""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager

from heimdall.store.tokens import SqlTokens, TokenStatements

__all__ = ["SqliteTokens"]


class SqliteTokens(SqlTokens):
    """Mixed into SqliteStore, whose connection plumbing it uses."""

    _token_sql = TokenStatements("?")

    def _session(self, operation: str) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _transaction(self, operation: str) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _token_read(self, operation: str) -> AbstractContextManager[sqlite3.Connection]:
        return self._session(operation)

    def _token_write(self, operation: str) -> AbstractContextManager[sqlite3.Connection]:
        return self._transaction(operation)
