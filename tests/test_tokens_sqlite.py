"""SqliteStore keeps service tokens: the token contract on one database file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from heimdall.store.base import GraphStore
from heimdall.store.sqlite import SqliteStore
from token_contract import TokenStoreContract


class TestSqliteTokenContract(TokenStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[GraphStore]:
        store = SqliteStore(tmp_path / "heimdall.db")
        yield store
        store.close()

    def open_again(self, store: GraphStore) -> GraphStore:
        assert isinstance(store, SqliteStore)
        return SqliteStore(store.path)

    def stored_bytes(self, store: GraphStore) -> bytes:
        """The database file and its write-ahead log, where a new row is first written."""
        assert isinstance(store, SqliteStore)
        files = [store.path, store.path.with_name(store.path.name + "-wal")]
        return b"".join(path.read_bytes() for path in files if path.exists())
