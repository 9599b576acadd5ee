"""Apache AGE on the throwaway PostgreSQL cluster, for the AGE graph store's tests.

Loaded as a pytest plugin from ``conftest.py``. Fixtures:

``age_dsn`` (session)
    ``postgres_dsn`` (see :mod:`postgres_server`) once the server is known to offer the ``age``
    extension. Checked once per session, by asking the server itself
    (``pg_available_extensions``), so it holds for ``HMD_TEST_POSTGRES_DSN`` too.
``age_store_dsn`` (function)
    A DSN of a new database on ``age_dsn``, dropped after the test: a copy of a template
    made once per session, where an :class:`~heimdall.store.age.AgeStore` has created the
    extension, the graph ``heimdall`` and the tables, and holds nothing. (A test of that setup
    itself takes an empty database from ``postgres_store_dsn``.)

AGE is in no package registry this project's machines reach, so no CI machine has it: without
it every test that asks for these fixtures skips with a one-line reason, under ``CI=true`` too.
PostgreSQL itself missing still fails under ``CI=true`` (``postgres_dsn`` decides that).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from heimdall.store.age import AgeStore
from postgres_server import connect, postgres_bindir, temporary_database

AGE_MISSING = (
    "the PostgreSQL server has no `age` extension (Apache AGE is not packaged; build the"
    " apache/age release for this PostgreSQL major and `make install` it, see README)"
)


def age_installed() -> bool:
    """Whether the newest local PostgreSQL's share dir holds ``age.control`` (for a check
    without a server: the bench smoke test's)."""
    bindir = postgres_bindir()
    if bindir is None or not (bindir / "pg_config").exists():
        return False
    found = subprocess.run(
        [str(bindir / "pg_config"), "--sharedir"], capture_output=True, text=True, check=False
    )
    return (Path(found.stdout.strip()) / "extension" / "age.control").exists()


def age_available(dsn: str) -> bool:
    """Whether the server of *dsn* offers the ``age`` extension (installed files, not whether
    any database has created it)."""
    with connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'age'")
        found = row.fetchone()
    return found is not None and found[0] == 1


@pytest.fixture(scope="session")
def age_dsn(postgres_dsn: str) -> str:
    """``postgres_dsn``, or a skip (also under CI=true) when the server has no AGE."""
    if not age_available(postgres_dsn):
        pytest.skip(AGE_MISSING)
    return postgres_dsn


@pytest.fixture(scope="session")
def age_template(age_dsn: str) -> Iterator[str]:
    """The name of a database set up by an AgeStore and left empty, to copy."""
    with temporary_database(age_dsn) as dsn:
        AgeStore(dsn, pool_size=1).close()
        with connect(dsn) as conn:
            row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        yield str(row[0])


@pytest.fixture
def age_store_dsn(age_dsn: str, age_template: str) -> Iterator[str]:
    """The DSN of a new database copied from ``age_template``, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    with connect(age_dsn) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(age_template)
            )
        )
    try:
        yield make_conninfo(age_dsn, dbname=name)
    finally:
        with connect(age_dsn) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
