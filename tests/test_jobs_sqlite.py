"""SqliteStore as a JobStore: the job contract."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from heimdall.store.sqlite import SqliteStore
from job_contract import JobGraphStore, JobStoreContract


class TestSqliteJobContract(JobStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[JobGraphStore]:
        store = SqliteStore(tmp_path / "heimdall.db")
        yield store
        store.close()

    def open_again(self, store: JobGraphStore) -> JobGraphStore:
        assert isinstance(store, SqliteStore)
        return SqliteStore(store.path)
