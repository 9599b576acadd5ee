"""Shared fixtures: services built on a temporary data dir, callers and sample records.

``make_service`` builds a :class:`heimdall.service.Heimdall` the way the CLI does (local keyring,
SQLite, JSONL audit log) on one data dir per test, so a test can build a legacy service, then a
hybrid one, then a kms one on the same files, as a real migration does. Every service it builds
is closed at teardown.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from heimdall.app import build
from heimdall.audit import JsonlAuditLog
from heimdall.ingest import IngestReport, ingest_lines
from heimdall.rbac import Caller
from heimdall.service import Heimdall
from heimdall.settings import Settings
from heimdall.types import EncryptionMode

pytest_plugins = ["vault_server", "postgres_server", "age_server", "aws_server", "cli_runner"]
PEOPLE_FILE = Path(__file__).resolve().parent.parent / "examples" / "people.jsonl"
PEOPLE_SAMPLE_SIZE = 40

ServiceFactory = Callable[..., Heimdall]
Ingest = Callable[..., IngestReport]
AuditReader = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """The data dir every service of this test shares (keyring, database, audit log)."""
    return tmp_path / "data"


@pytest.fixture
def master_key() -> str:
    """A fresh HMD_MASTER_KEY: base64 of 32 random bytes."""
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def make_service(data_dir: Path) -> Iterator[ServiceFactory]:
    """``make_service(mode=..., master_key=..., data_dir=..., **settings)`` -> a wired Heimdall.

    Defaults: kms mode, no master key, the test's shared data dir, audit without fsync. Any
    other keyword is a :class:`heimdall.settings.Settings` field.
    """
    built: list[Heimdall] = []

    def make(
        mode: EncryptionMode = EncryptionMode.KMS,
        master_key: str | None = None,
        *,
        data_dir: Path = data_dir,
        **settings: Any,
    ) -> Heimdall:
        settings.setdefault("audit_fsync", False)
        service = build(
            Settings(data_dir=data_dir, encryption_mode=mode, master_key=master_key, **settings)
        )
        built.append(service)
        return service

    yield make
    for service in built:
        service.close()


@pytest.fixture
def caller() -> Caller:
    """The embedded default's operator (no role: every permission)."""
    return Caller(actor="test:alice")


def _load_people(limit: int | None = None) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    with PEOPLE_FILE.open("rb") as handle:
        for line in handle:
            if limit is not None and len(records) >= limit:
                break
            records.append(orjson.loads(line))
    return records


@pytest.fixture
def people_file() -> Path:
    """examples/people.jsonl: 300 synthetic people, some duplicated with other formatting."""
    return PEOPLE_FILE


@pytest.fixture
def people() -> list[dict[str, Any]]:
    """The first few dozen records of examples/people.jsonl (fresh dicts for each test)."""
    return _load_people(PEOPLE_SAMPLE_SIZE)


@pytest.fixture
def all_people() -> list[dict[str, Any]]:
    """All records of examples/people.jsonl."""
    return _load_people()


@pytest.fixture
def ingest(caller: Caller) -> Ingest:
    """``ingest(service, records_or_lines, caller=..., batch_size=...)`` -> IngestReport.

    Records (dicts) are serialised to JSON Lines; strings are passed through as lines.
    """

    def run(
        service: Heimdall,
        records: Sequence[dict[str, Any] | str],
        *,
        caller: Caller = caller,
        batch_size: int = 1000,
        source_name: str = "test",
    ) -> IngestReport:
        lines = [
            item if isinstance(item, str) else orjson.dumps(item).decode() + "\n"
            for item in records
        ]
        return ingest_lines(
            service, lines, caller=caller, source_name=source_name, batch_size=batch_size
        )

    return run


@pytest.fixture
def audit_events(data_dir: Path) -> AuditReader:
    """``audit_events()`` -> every event in the shared data dir's audit log, oldest first."""

    def read() -> list[dict[str, Any]]:
        return list(JsonlAuditLog(data_dir / "audit.log"))

    return read
