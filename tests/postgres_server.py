"""A throwaway PostgreSQL cluster on loopback for the PostgreSQL store's tests.

Loaded as a pytest plugin from ``conftest.py`` (``pytest_plugins = [..., "postgres_server"]``).
Fixtures:

``postgres_dsn`` (session)
    A DSN with the right to create databases. ``HMD_TEST_POSTGRES_DSN`` when set, used as it
    is; otherwise a fresh cluster (``initdb``, trust auth for user ``heimdall``, fsync off) that
    listens on 127.0.0.1 on a free port and on a unix socket in its own tmp dir, one per xdist
    worker, stopped at the end of the session.
``postgres_store_dsn`` (function)
    A DSN of a new empty database (``t_<8 hex>``) on ``postgres_dsn``, dropped after the test,
    so every store test starts on an empty schema. :func:`temporary_database` does the same
    for fixtures of a wider scope.

The cluster is started and stopped with ``pg_ctl`` (``stop -m immediate``: the data is
thrown away anyway). PostgreSQL refuses to run as root, so under root ``initdb`` and ``pg_ctl``
run through ``runuser -u postgres --`` in a tmp dir owned by that user. An ``atexit`` hook
SIGKILLs, by pid, any postmaster whose teardown never ran. Without PostgreSQL binaries the
fixtures skip, except under ``CI=true`` where they fail: a skipped backend is a failed one there.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

ENV_DSN = "HMD_TEST_POSTGRES_DSN"
SUPERUSER = "heimdall"
SERVER_OS_USER = "postgres"
STARTUP_TIMEOUT = 30
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 40
_LOOPBACK = "127.0.0.1"
_PROGRAMS = ("initdb", "pg_ctl", "postgres")
_VERSION_DIR = re.compile(r"\d+")

# Postmaster pids started by this process and not yet stopped, with their data dirs.
_LIVE: dict[int, Path] = {}
_LIVE_LOCK = threading.Lock()


def connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A plain autocommit connection, standing in for another process or an operator."""
    return psycopg.connect(dsn, autocommit=True)


def postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` with the server programs, else the
    directory ``pg_ctl`` on PATH resolves to (Debian links it from ``/usr/local/bin``)."""
    root = Path("/usr/lib/postgresql")
    majors = (
        sorted(
            (int(d.name), d / "bin")
            for d in root.iterdir()
            if _VERSION_DIR.fullmatch(d.name) and _has_programs(d / "bin")
        )
        if root.is_dir()
        else []
    )
    if majors:
        return majors[-1][1]
    found = shutil.which("pg_ctl")
    if found is not None and _has_programs(Path(found).resolve().parent):
        return Path(found).resolve().parent
    return None


def _has_programs(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _PROGRAMS)


def _skip_or_fail(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def require_postgres_bindir() -> Path:
    """:func:`postgres_bindir`, or skip the test (fail it under ``CI=true``)."""
    bindir = postgres_bindir()
    if bindir is None:
        _skip_or_fail(
            "the PostgreSQL server programs (initdb, pg_ctl, postgres) were not found in"
            " /usr/lib/postgresql/*/bin or on PATH (apt-get install postgresql, or point"
            f" {ENV_DSN} at a server where this user may create databases)"
        )
    return bindir


def _server_account() -> pwd.struct_passwd | None:
    """The account to run the server as: ``postgres`` under root, None (ourselves) otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        _skip_or_fail(
            f"running as root, and PostgreSQL refuses root, but there is no {SERVER_OS_USER!r}"
            " account to run the server as"
        )


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


def _log_tail(log_path: Path) -> str:
    if not log_path.exists():
        return "(no server log)"
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])


@dataclass
class PostgresCluster:
    """One cluster made by :func:`start_cluster`; ``base`` holds its data, socket and log."""

    bindir: Path
    base: Path
    account: pwd.struct_passwd | None
    port: int = 0
    pid: int = 0

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "socket"

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@{_LOOPBACK}:{self.port}/postgres"

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one of the cluster's programs as the server account, output captured."""
        command = [str(self.bindir / program), *args]
        if self.account is not None:
            command = ["runuser", "-u", self.account.pw_name, "--", *command]
        return subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=self.base,
            check=False,
            timeout=STARTUP_TIMEOUT + 30,
        )

    def fail(self, message: str, output: str = "") -> NoReturn:
        pytest.fail(
            f"postgres ({self.base}): {message}\n{output}\n"
            f"--- last lines of {self.log_path} ---\n{_log_tail(self.log_path)}",
            pytrace=False,
        )

    def stop(self) -> None:
        """``pg_ctl stop -m immediate``, then SIGKILL by pid if the postmaster outlived it,
        then remove the tmp dir. Idempotent."""
        try:
            if self.pid:
                self.run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
                _kill_postmaster(self.pid, self.data_dir)
                self.pid = 0
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def _postmaster_alive(pid: int, data_dir: Path) -> bool:
    """Whether *pid* is still the postmaster of *data_dir* (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(data_dir).encode() in cmdline


def _kill_postmaster(pid: int, data_dir: Path) -> None:
    deadline = time.monotonic() + 10
    while _postmaster_alive(pid, data_dir) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    with _LIVE_LOCK:
        _LIVE.pop(pid, None)


@atexit.register
def _kill_leftovers() -> None:
    """Backup for teardowns that never ran: SIGKILL every postmaster this process started."""
    with _LIVE_LOCK:
        live = list(_LIVE.items())
    for pid, data_dir in live:
        _kill_postmaster(pid, data_dir)


def _make_base(account: pwd.struct_passwd | None) -> Path:
    # Not under pytest's tmp dir: under root that is 0700 root, which the server account
    # cannot enter. mkdtemp makes the dir 0700; it is handed to the server account.
    base = Path(tempfile.mkdtemp(prefix="heimdall-pg-"))
    (base / "socket").mkdir(mode=0o700)
    if account is not None:
        for path in (base, base / "socket"):
            os.chown(path, account.pw_uid, account.pw_gid)
    return base


def start_cluster(bindir: Path) -> PostgresCluster:
    """initdb and start a cluster on 127.0.0.1 (free port) and a unix socket in its tmp dir."""
    account = _server_account()
    cluster = PostgresCluster(bindir=bindir, base=_make_base(account), account=account)
    try:
        made = cluster.run(
            "initdb",
            *("-D", str(cluster.data_dir), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8"),
            *("--no-locale", "--no-sync"),
        )
        if made.returncode != 0:
            cluster.fail("initdb failed", made.stdout + made.stderr)
        for _ in range(PORT_ATTEMPTS):
            if _start_on_free_port(cluster):
                return cluster
        cluster.fail(f"no free port after {PORT_ATTEMPTS} attempts")
    except BaseException:
        cluster.stop()
        raise


def _start_on_free_port(cluster: PostgresCluster) -> bool:
    """Start the server on a port that was free a moment ago; False if it was taken since."""
    cluster.port = free_port()
    options = " ".join(
        [
            f"-k {cluster.socket_dir}",
            f"-c listen_addresses={_LOOPBACK}",
            f"-p {cluster.port}",
            # Throwaway data: durability buys nothing and costs seconds per test run.
            "-c fsync=off",
            "-c full_page_writes=off",
            "-c synchronous_commit=off",
        ]
    )
    started = cluster.run(
        "pg_ctl",
        *("-D", str(cluster.data_dir), "-o", options, "-l", str(cluster.log_path)),
        *("-w", "-t", str(STARTUP_TIMEOUT), "start"),
    )
    pid_file = cluster.data_dir / "postmaster.pid"
    if pid_file.exists():
        # Recorded even when pg_ctl gave up waiting, so the backup kill can find it.
        cluster.pid = int(pid_file.read_text().split("\n", 1)[0])
        with _LIVE_LOCK:
            _LIVE[cluster.pid] = cluster.data_dir
    if started.returncode == 0:
        return True
    if "already in use" in _log_tail(cluster.log_path):
        _kill_postmaster(cluster.pid, cluster.data_dir)
        cluster.pid = 0
        return False
    cluster.fail("pg_ctl start failed", started.stdout + started.stderr)


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A DSN whose user may create databases: ``HMD_TEST_POSTGRES_DSN``, or a throwaway cluster."""
    configured = os.environ.get(ENV_DSN)
    if configured:
        yield configured
        return
    cluster = start_cluster(require_postgres_bindir())
    try:
        yield cluster.dsn
    finally:
        cluster.stop()


@contextlib.contextmanager
def temporary_database(dsn: str) -> Iterator[str]:
    """Create a database ``t_<8 hex>`` on the server of *dsn*; yield its DSN; drop it."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(dsn, dbname=name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            # FORCE: a store the test leaked open must not keep its database alive.
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def postgres_store_dsn(postgres_dsn: str) -> Iterator[str]:
    """The DSN of a new, empty database on ``postgres_dsn``, dropped after the test."""
    with temporary_database(postgres_dsn) as dsn:
        yield dsn
