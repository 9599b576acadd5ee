"""PostgresStore keeps service tokens: the token contract on a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from heimdall.store.base import GraphStore
from heimdall.store.postgres import PostgresStore
from postgres_server import connect
from token_contract import TokenStoreContract


class TestPostgresTokenContract(TokenStoreContract):
    dsn = ""

    @pytest.fixture
    def store(self, postgres_store_dsn: str) -> Iterator[GraphStore]:
        # pytest binds class fixtures to the test's own instance, so the hooks below see it.
        self.dsn = postgres_store_dsn
        store = PostgresStore(postgres_store_dsn, pool_size=2)
        yield store
        store.close()

    def open_again(self, store: GraphStore) -> GraphStore:
        return PostgresStore(self.dsn, pool_size=1)

    def stored_bytes(self, store: GraphStore) -> bytes:
        """Every row of every table heimdall keeps, as PostgreSQL prints it."""
        with connect(self.dsn) as conn:
            tables = [
                name
                for (name,) in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            ]
            rows = [
                str(row[0])
                for table in tables
                for row in conn.execute(f"SELECT t::text FROM {table} AS t")  # noqa: S608
            ]
        return "\n".join(rows).encode()
