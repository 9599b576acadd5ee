"""Re-encryption rows: the background job (start_job + run_job) on PostgreSQL, timed.

:func:`postgres_cluster` starts a throwaway PostgreSQL cluster for the bench: ``initdb`` into a
temp dir, then the ``postgres`` server itself as a child of the bench (as the ``postgres``
account under root, which PostgreSQL refuses), listening on a free 127.0.0.1 port. fsync,
synchronous_commit and full_page_writes stay ON (the server's defaults, passed explicitly), so
every commit of a job's batch waits for the disk as it would in production. The server is
stopped by pid (SIGQUIT, immediate shutdown, to its process group; SIGKILL after a grace
period) when the rows are done, also on an exception, Ctrl-C or SIGTERM; on Linux the kernel
kills it if the bench itself is killed (PR_SET_PDEATHSIG). The Vault rows reuse the OpenBao dev
server of :mod:`bench.vault`.

Each row gets a database of its own and N fields loaded before anything is timed (untimed:
``ingest_lines`` of records with two encrypt fields, email and ssn, all values unique). Then

* rewrap rows: the master key is rotated (untimed), and a worker runs ``start_job`` +
  ``run_job`` over every field: the data keys are rewrapped inside the KMS, the ciphertexts stay;
* legacy rows: the fields were ingested in legacy mode (a random static master key), and a
  worker in hybrid mode runs the migration job: every field is decrypted with the legacy key
  and encrypted under a KMS data key.

The worker is a separate process (``python -m bench.reencrypt``, its configuration on stdin, its
figures as JSON on stdout), so its peak memory, ``VmHWM`` from ``/proc/self/status``, is the
job's own and nothing of the bench's. It builds the service with ``heimdall.app.build``, as the
application does, and times ``start_job`` + ``run_job`` only.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from bench import processes
from bench.report import Result, Row
from bench.timing import Run, measure
from heimdall.app import build
from heimdall.cipher import FieldCipher
from heimdall.errors import HeimdallError
from heimdall.ingest import ingest_lines
from heimdall.kms.base import DataKey, KeyDescription, KeyManagementService, WrappedKey
from heimdall.kms.vault_config import VaultSettings
from heimdall.modes import CipherRouter
from heimdall.rbac import Caller
from heimdall.rotation.batch import KMS_V1, LEGACY
from heimdall.rotation.job import JobKind, run_job, start_job
from heimdall.rotation.migration import set_mode
from heimdall.secret import SecretBytes
from heimdall.settings import Settings, StoreKind
from heimdall.store.jobs import Job, JobState
from heimdall.types import EncryptionMode

if TYPE_CHECKING:
    from bench.vault import DevServer
    from heimdall.service import Heimdall

__all__ = [
    "BATCH_SIZE",
    "ClusterStartError",
    "PostgresCluster",
    "ReencryptOutcome",
    "ReencryptResult",
    "ReencryptRun",
    "postgres_bindir",
    "postgres_cluster",
    "run_rows",
    "size_label",
]

BATCH_SIZE: Final = 5000
REWRAP_TARGET: Final = 16_667  # 1,000,000 fields in 60 s
LEGACY_TARGET: Final = 5_556  # 1,000,000 fields in 180 s
MEMORY_TARGET_MIB: Final = 200
ONE_MILLION: Final = 1_000_000
LOAD_BATCH_SIZE: Final = 2000  # records per ingest batch while loading (untimed)
ENCRYPT_FIELDS: Final = ("email", "ssn")

SUPERUSER: Final = "heimdall"
SERVER_OS_USER: Final = "postgres"
STARTUP_TIMEOUT: Final = 30.0
STOP_GRACE: Final = 10.0
PORT_ATTEMPTS: Final = 3
LOG_TAIL_LINES: Final = 20
_PROGRAMS: Final = ("initdb", "postgres")
_VERSION_DIR: Final = re.compile(r"\d+")
_REPO: Final = Path(__file__).resolve().parent.parent
# The server's durability settings: its defaults, spelled out so that the run says what it ran.
SERVER_SETTINGS: Final = ("fsync=on", "synchronous_commit=on", "full_page_writes=on")
_SAMPLE: Final = 200  # fields decrypted after each job, to check it (untimed)
_MIB: Final = 1024.0


def size_label(fields: int) -> str:
    """``100k``, ``1m``, ``2k``: the size suffix of a row id."""
    if fields % ONE_MILLION == 0:
        return f"{fields // ONE_MILLION}m"
    if fields % 1000 == 0:
        return f"{fields // 1000}k"
    return str(fields)


# -- the PostgreSQL cluster ---------------------------------------------------------------------


class ClusterStartError(RuntimeError):
    """The cluster did not come up (the message carries the tail of its log)."""


def postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` with initdb and postgres, else the
    directory ``pg_ctl`` on PATH resolves to."""
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


def _server_account() -> pwd.struct_passwd | None:
    """``postgres`` under root (PostgreSQL refuses to run as root), else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise ClusterStartError(
            f"running as root, which PostgreSQL refuses, and there is no {SERVER_OS_USER!r} "
            "account to run it as"
        ) from None


@dataclass
class PostgresCluster:
    """One running cluster; ``base`` holds its data dir, socket dir and log."""

    bindir: Path
    base: Path
    account: pwd.struct_passwd | None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    version: str = "unknown"

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
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{processes.LOOPBACK}:{self.port}/{database}"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:]) or "(the server log is empty)"

    def _popen(self, args: list[str], log: Any) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        account = self.account
        return subprocess.Popen(  # noqa: S603 - our own argument list, no shell
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.base,
            env=env,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
            start_new_session=True,  # own process group: Ctrl-C reaches the bench only
            preexec_fn=processes.die_with_parent(),  # noqa: PLW1509 - the child only calls prctl
        )

    def initdb(self) -> None:
        args = [
            str(self.bindir / "initdb"),
            *("-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8"),
            # --no-sync: initdb's own final flush of a throwaway cluster; the server fsyncs.
            *("--no-locale", "--no-sync"),
        ]
        with (self.base / "initdb.log").open("wb") as log:
            proc = self._popen(args, log)
            try:
                code = proc.wait(timeout=STARTUP_TIMEOUT + 30)
            finally:
                if proc.returncode is None:
                    processes.signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
        if code != 0:
            text = (self.base / "initdb.log").read_text(errors="replace")
            raise ClusterStartError(f"initdb failed ({code}):\n{text[-2000:]}")

    def start(self) -> bool:
        """Start the server on a port that was free a moment ago; False if it was taken."""
        self.port = processes.free_port()
        args = [
            str(self.bindir / "postgres"),
            *("-D", str(self.data_dir), "-k", str(self.socket_dir), "-p", str(self.port)),
            *("-c", f"listen_addresses={processes.LOOPBACK}"),
            *(arg for setting in SERVER_SETTINGS for arg in ("-c", setting)),
        ]
        with self.log_path.open("ab") as log:
            self.proc = self._popen(args, log)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._accepts_connections():
            if processes.has_exited(self.proc):
                self.stop()
                if "already in use" in self.log_tail():
                    return False
                raise ClusterStartError(f"postgres exited during startup\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ClusterStartError(
                    f"postgres did not accept connections within {STARTUP_TIMEOUT:.0f} s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)
        return True

    def _accepts_connections(self) -> bool:
        import psycopg  # noqa: PLC0415 - the postgres extra

        try:
            with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                row = conn.execute("SHOW server_version").fetchone()
        except psycopg.OperationalError:
            return False
        self.version = str(row[0]) if row else "unknown"
        return True

    def settings(self) -> str:
        """The durability and memory settings in force, as the server reports them."""
        import psycopg  # noqa: PLC0415

        values = []
        with psycopg.connect(self.dsn()) as conn:
            for name in ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers"):
                row = conn.execute(f"SHOW {name}".encode()).fetchone()
                values.append(f"{name}={row[0] if row else 'unknown'}")
        return ", ".join(values)

    def execute(self, statement: str, database: str = "postgres") -> None:
        """One statement outside a transaction (CREATE/DROP DATABASE, VACUUM, CHECKPOINT)."""
        import psycopg  # noqa: PLC0415

        with psycopg.connect(self.dsn(database), autocommit=True) as conn:
            conn.execute(statement.encode())

    def stop(self) -> None:
        """SIGQUIT (immediate shutdown: the data is thrown away) to the server's process
        group, SIGKILL after a grace period, reap. Idempotent."""
        if self.proc is not None:
            processes.stop(self.proc, signal.SIGQUIT, STOP_GRACE)


@contextlib.contextmanager
def postgres_cluster(bindir: Path) -> Iterator[PostgresCluster]:
    """A running throwaway cluster (trust auth for ``heimdall`` on 127.0.0.1); stopped and
    removed on exit, also on an exception, Ctrl-C or SIGTERM."""
    with processes.sigterm_unwinds():
        account = _server_account()
        base = Path(tempfile.mkdtemp(prefix="heimdall-bench-pg-"))
        cluster = PostgresCluster(bindir=bindir, base=base, account=account)
        try:
            (base / "socket").mkdir(mode=0o700)
            if account is not None:
                for path in (base, base / "socket"):
                    os.chown(path, account.pw_uid, account.pw_gid)
            cluster.initdb()
            for _ in range(PORT_ATTEMPTS):
                if cluster.start():
                    break
            else:
                raise ClusterStartError(f"no free port after {PORT_ATTEMPTS} attempts")
            yield cluster
        finally:
            cluster.stop()
            shutil.rmtree(base, ignore_errors=True)


# -- the synthetic records ----------------------------------------------------------------------


def record_lines(records: int) -> Iterator[str]:
    """*records* JSON Lines records, each with two encrypt fields whose values are unique
    (example.com addresses; never-issued 9xx SSNs, unique below 100,000,000 records)."""
    for i in range(records):
        yield json.dumps(
            {
                "id": f"reencrypt-{i:08d}",
                "email": f"reencrypt.person.{i:08d}@example.com",
                "ssn": f"9{(i // 1_000_000) % 100:02d}-{(i // 10_000) % 100:02d}-{i % 10_000:04d}",
            }
        )


# -- the rows -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowKind:
    name: str  # "rewrap" or "legacy"
    provider: str  # "local" or "vault"
    workers: int = 1  # run_job's threads (HMD_REENCRYPT_WORKERS)

    def row(self, fields: int, batch_size: int) -> Row:
        label = size_label(fields) + ("" if self.workers == 1 else f"-{self.workers}threads")
        store = "PostgreSQL (fresh database, fields loaded before timing)"
        if self.name == "rewrap":
            what = (
                f"after a rotate (untimed), start_job + run_job(batch_size {batch_size:,}, "
                f"workers {self.workers}) of "
                f"{fields:,} kms_v1 fields on {store}, {self._provider_text()}: every data key "
                "rewrapped inside the KMS, ciphertexts unchanged; worker in its own process"
            )
            target = REWRAP_TARGET
        else:
            what = (
                f"{fields:,} fields ingested in legacy mode (static master key), then a hybrid-"
                f"mode service with {self._provider_text()} runs the migration job, start_job + "
                f"run_job(batch_size {batch_size:,}) on {store}: legacy decrypt + KMS encrypt "
                "per field; worker in its own process"
            )
            target = LEGACY_TARGET
        return Row(f"reencrypt/{self.name}-{self.provider}-{label}", what, target)

    def _provider_text(self) -> str:
        if self.provider == "local":
            return "the local keyring"
        return "the Vault provider (pattern A, Transit on the bench's OpenBao dev server)"


# The rewrap rows of one provider share a load: each run rotates again and rewraps everything.
KINDS: Final = (
    RowKind("rewrap", "local"),
    RowKind("rewrap", "local", 2),
    RowKind("rewrap", "vault"),
    RowKind("rewrap", "vault", 2),
    RowKind("legacy", "local"),
    RowKind("legacy", "vault"),
)


@dataclass(frozen=True, slots=True)
class ReencryptRun(Run):
    """One job run, as the worker measured it. ``kms_calls`` are calls to the key provider's
    methods (a batch method counts once) for the local keyring, HTTP requests for Vault."""

    start_seconds: float = 0.0  # start_job
    job_seconds: float = 0.0  # run_job
    batch_seconds: tuple[float, ...] = ()
    provider_calls: tuple[tuple[str, int, int], ...] = ()  # (method, calls, items)
    legacy_unwraps: int = 0  # data keys unwrapped with the legacy master key
    peak_rss_mib: float = 0.0  # VmHWM of the worker process
    setup_rss_mib: float = 0.0  # VmRSS just before start_job
    postgres_cpu_seconds: float = 0.0
    openbao_cpu_seconds: float = 0.0
    job_total: int = 0


@dataclass(frozen=True, slots=True)
class ReencryptResult(Result):
    kind: RowKind = RowKind("rewrap", "local")
    fields: int = 0
    batch_size: int = BATCH_SIZE

    def runs(self) -> list[ReencryptRun]:
        return [run for run in self.measurement.runs if isinstance(run, ReencryptRun)]

    @property
    def peak_rss_mib(self) -> float:
        return max(run.peak_rss_mib for run in self.runs())

    @property
    def setup_rss_mib(self) -> float:
        return max(run.setup_rss_mib for run in self.runs())

    @property
    def memory_met(self) -> bool:
        return self.peak_rss_mib <= MEMORY_TARGET_MIB

    @property
    def projected_million_seconds(self) -> float:
        return ONE_MILLION / self.fields_per_s

    def cpu_share_of(self, attr: str) -> float:
        runs = self.runs()
        wall = sum(run.seconds for run in runs)
        return sum(float(getattr(run, attr)) for run in runs) / wall if wall else 0.0

    def to_json(self) -> dict[str, Any]:
        # Zero-argument super() fails in a slots dataclass (the class is recreated).
        doc = Result.to_json(self)
        runs = self.runs()
        last = runs[-1]
        doc.update(
            {
                "fields": self.fields,
                "batch_size": self.batch_size,
                "median_run_seconds": round(
                    statistics.median(run.seconds for run in self.measurement.runs), 3
                ),
                "kms_calls_meaning": (
                    "HTTP requests sent to OpenBao by the worker inside the timed block"
                    if self.kind.provider == "vault"
                    else "calls to the local keyring's methods inside the timed block"
                ),
                "provider_calls_per_run": {m: c for m, c, _ in last.provider_calls},
                "provider_items_per_run": {m: n for m, _, n in last.provider_calls},
                "legacy_unwraps_per_run": last.legacy_unwraps,
                "runs_start_job_seconds": [round(r.start_seconds, 4) for r in runs],
                "runs_run_job_seconds": [round(r.job_seconds, 4) for r in runs],
                "runs_batch_seconds": [[round(s, 4) for s in r.batch_seconds] for r in runs],
                "peak_rss_mib": round(self.peak_rss_mib, 1),
                "runs_peak_rss_mib": [round(r.peak_rss_mib, 1) for r in runs],
                "setup_rss_mib": round(self.setup_rss_mib, 1),
                "memory_meaning": "VmHWM of the worker process (its whole life), in MiB",
                "memory_target_mib": MEMORY_TARGET_MIB,
                "memory_target_met": self.memory_met,
                "postgres_cpu_share": round(self.cpu_share_of("postgres_cpu_seconds"), 3),
                "openbao_cpu_share": round(self.cpu_share_of("openbao_cpu_seconds"), 3),
                "projected_seconds_for_1m_fields": round(self.projected_million_seconds, 1),
                "projection_meaning": "1,000,000 / the median fields/s: a projection, not measured",
            }
        )
        return doc


@dataclass
class ReencryptOutcome:
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    server: str = "not run"
    failed: bool = False


@dataclass(frozen=True, slots=True)
class _Worker:
    """What the worker process needs; sent to it as JSON on stdin."""

    dsn: str
    data_dir: str
    kind: str  # "rewrap" or "legacy"
    provider: str
    batch_size: int
    expected: int
    postmaster_pid: int
    workers: int = 1  # run_job's threads
    vault_addr: str | None = None
    vault_token: str | None = None
    vault_key: str | None = None
    openbao_pid: int = 0
    master_key: str | None = None
    store: str = StoreKind.POSTGRES.value  # or "age": the graph store (bench/age.py)


def _settings(worker: _Worker, *, legacy_mode: bool, load: bool) -> Settings:
    """The row's Settings, as the application would be configured: PostgreSQL, the row's key
    provider, legacy mode (*legacy_mode*, while loading a legacy row), hybrid for its job."""
    vault = None
    key_name = "heimdall-pii"
    if worker.provider == "vault":
        assert worker.vault_addr and worker.vault_token and worker.vault_key
        key_name = worker.vault_key
        vault = VaultSettings(
            addresses=(worker.vault_addr,), token=worker.vault_token, key_name=key_name
        )
    if worker.kind == "legacy":
        mode = EncryptionMode.LEGACY if legacy_mode else EncryptionMode.HYBRID
    else:
        mode = EncryptionMode.KMS
    return Settings(
        data_dir=Path(worker.data_dir),
        store=StoreKind(worker.store),
        postgres_dsn=worker.dsn,
        kms_provider=worker.provider,
        kms_key_name=key_name,
        vault=vault,
        encryption_mode=mode,
        master_key=worker.master_key,
        # Loading is not timed: its audit log is not fsynced. The job's is (the default).
        audit_fsync=not load,
    )


def _load(worker: _Worker, records: int) -> None:
    """Ingest *records* records (2 fields each) into the row's store; untimed."""
    service = build(_settings(worker, legacy_mode=True, load=True))
    try:
        report = ingest_lines(
            service,
            record_lines(records),
            caller=Caller(actor="bench-load"),
            source_name="bench-reencrypt",
            batch_size=LOAD_BATCH_SIZE,
        )
    finally:
        service.close()
    expected = records * len(ENCRYPT_FIELDS)
    if report.errors or report.fields_encrypted != expected or report.fields_deduplicated:
        raise AssertionError(
            f"loading did not encrypt every field: {report.fields_encrypted}/{expected}, "
            f"{report.fields_deduplicated} deduplicated, {len(report.errors)} errors"
        )


def _rotate(worker: _Worker) -> int:
    """Rotate the master key (untimed); the new latest version."""
    service = build(_settings(worker, legacy_mode=False, load=True))
    try:
        return service.rotate_keys(caller=Caller(actor="bench-rotate")).latest_version
    finally:
        service.close()


def _spawn_worker(worker: _Worker) -> dict[str, Any]:
    """Run one job in ``python -m bench.reencrypt``; its JSON report."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.reencrypt"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=_REPO,
        preexec_fn=processes.die_with_parent(),  # noqa: PLW1509 - the child only calls prctl
    )
    try:
        out, err = proc.communicate(json.dumps(dataclasses.asdict(worker)).encode())
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(
            f"the re-encryption worker failed (exit {proc.returncode}):\n"
            + err.decode(errors="replace")[-4000:]
        )
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


def _new_transit_key(server: DevServer) -> str:
    """A fresh derived Transit key for one row, so no other row's rotations show in it."""
    from bench import vault  # noqa: PLC0415 - needs the optional vault extra

    name = f"heimdall-bench-reencrypt-{secrets.token_hex(4)}"
    vault.create_key(server, name)
    return name


def _run_from_report(report: dict[str, Any]) -> ReencryptRun:
    return ReencryptRun(
        seconds=report["seconds"],
        cpu_seconds=report["cpu_seconds"],
        kms_calls=report["kms_calls"],
        start_seconds=report["start_seconds"],
        job_seconds=report["job_seconds"],
        batch_seconds=tuple(report["batch_seconds"]),
        provider_calls=tuple((m, c, n) for m, c, n in report["provider_calls"]),
        legacy_unwraps=report["legacy_unwraps"],
        peak_rss_mib=report["peak_rss_mib"],
        setup_rss_mib=report["setup_rss_mib"],
        postgres_cpu_seconds=report["postgres_cpu_seconds"],
        openbao_cpu_seconds=report["openbao_cpu_seconds"],
        job_total=report["job_total"],
    )


def _rows(
    cluster: PostgresCluster,
    server: DevServer | None,
    kinds: Sequence[RowKind],
    fields: int,
    *,
    runs: int,
    batch_size: int,
) -> list[ReencryptResult]:
    """The rows of *kinds* (one name and provider; several only for rewrap, which can run
    again after another rotation) on one database loaded once."""
    if fields % len(ENCRYPT_FIELDS):
        raise ValueError(f"fields must be a multiple of {len(ENCRYPT_FIELDS)}")
    kind = kinds[0]
    if len({(k.name, k.provider) for k in kinds}) != 1 or (
        len(kinds) > 1 and kind.name != "rewrap"
    ):
        raise ValueError("only rewrap rows of one provider can share a database")
    row = kind.row(fields, batch_size)
    results: list[ReencryptResult] = []
    database = f"bench_{uuid.uuid4().hex[:12]}"
    cluster.execute(f'CREATE DATABASE "{database}"')
    try:
        with tempfile.TemporaryDirectory(prefix="heimdall-bench-reencrypt-") as tmp:
            vault_args: dict[str, Any] = {}
            if kind.provider == "vault":
                assert server is not None
                vault_args = {
                    "vault_addr": server.addr,
                    "vault_token": server.token,
                    "vault_key": _new_transit_key(server),
                    "openbao_pid": server.pid,
                }
            worker = _Worker(
                dsn=cluster.dsn(database),
                data_dir=tmp,
                kind=kind.name,
                provider=kind.provider,
                batch_size=batch_size,
                expected=fields,
                postmaster_pid=cluster.pid,
                master_key=(
                    base64.b64encode(secrets.token_bytes(32)).decode()
                    if kind.name == "legacy"
                    else None
                ),
                **vault_args,
            )
            print(
                f"  {row.id}: loading {fields:,} fields (untimed) ...", file=sys.stderr, flush=True
            )
            started = time.perf_counter()
            _load(worker, fields // len(ENCRYPT_FIELDS))
            loaded = time.perf_counter() - started
            print(
                f"  {row.id}: loaded in {loaded:.1f} s ({fields / loaded:,.0f} fields/s)",
                file=sys.stderr,
                flush=True,
            )

            for each in kinds:
                job_worker = dataclasses.replace(worker, workers=each.workers)

                def one_run(job_worker: _Worker = job_worker) -> ReencryptRun:
                    if kind.name == "rewrap":
                        _rotate(job_worker)
                    # Every run starts from the same state: a vacuumed, analysed table and no
                    # dirty buffers left over from the load or the previous run (untimed).
                    cluster.execute("VACUUM (ANALYZE)", database)
                    cluster.execute("CHECKPOINT", database)
                    return _run_from_report(_spawn_worker(job_worker))

                # A legacy field migrates once: one run. A rewrap run can be repeated after
                # another rotation, each moving every field to the new version.
                row = each.row(fields, batch_size)
                m = measure(
                    row.id,
                    one_run,
                    fields_per_run=fields,
                    repetitions=runs if kind.name == "rewrap" else 1,
                    warmups=0,
                )
                results.append(
                    ReencryptResult(row, m, kind=each, fields=fields, batch_size=batch_size)
                )
    finally:
        cluster.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return results


def _groups(kinds: Iterable[RowKind]) -> list[list[RowKind]]:
    """Rewrap rows of one provider together (they share a load); every legacy row alone."""
    groups: dict[tuple[str, str, int], list[RowKind]] = {}
    for kind in kinds:
        key = (kind.name, kind.provider, 0 if kind.name == "rewrap" else kind.workers)
        groups.setdefault(key, []).append(kind)
    return list(groups.values())


def _skipped(outcome: ReencryptOutcome, reason: str, *, failed: bool = False) -> ReencryptOutcome:
    message = f"reencrypt rows {'failed' if failed else 'skipped'}: {reason}"
    print(message, file=sys.stderr, flush=True)
    outcome.notes.append(message)
    outcome.failed = failed
    return outcome


def run_rows(
    sizes: Sequence[tuple[int, int]],
    *,
    batch_size: int,
    server: DevServer | None,
    vault_unavailable: str | None,
) -> ReencryptOutcome:
    """The re-encryption rows for each (fields, rewrap runs) in *sizes*, on a throwaway
    PostgreSQL cluster started and stopped here; the Vault rows on *server* (skipped, with
    *vault_unavailable* as the reason, when it is None)."""
    outcome = ReencryptOutcome()
    try:
        import psycopg  # noqa: F401, PLC0415 - the postgres extra
    except ImportError as exc:
        return _skipped(outcome, f"cannot import psycopg ({exc})")
    bindir = postgres_bindir()
    if bindir is None:
        return _skipped(
            outcome,
            "PostgreSQL server programs (initdb, postgres) not found in "
            "/usr/lib/postgresql/*/bin or on PATH",
        )
    print(f"  starting a PostgreSQL cluster ({bindir}) ...", file=sys.stderr, flush=True)
    try:
        with postgres_cluster(bindir) as cluster:
            settings = cluster.settings()
            outcome.server = (
                f"PostgreSQL {cluster.version} (throwaway cluster, 127.0.0.1 over TCP; {settings})"
            )
            for fields, runs in sizes:
                for group in _groups(kind for kind in KINDS if server or kind.provider != "vault"):
                    outcome.results.extend(
                        _rows(cluster, server, group, fields, runs=runs, batch_size=batch_size)
                    )
    except ClusterStartError as exc:
        return _skipped(outcome, f"the PostgreSQL cluster did not start: {exc}", failed=True)
    outcome.notes = notes(outcome.results, outcome.server, batch_size)
    if server is None:
        outcome.notes.append(f"reencrypt vault rows skipped: {vault_unavailable or 'no server'}")
    return outcome


# -- reporting ----------------------------------------------------------------------------------


def _calls_text(run: ReencryptRun, provider: str) -> str:
    parts = [
        f"{method} {calls:,}" + (f" [{items:,} items]" if items != calls else "")
        for method, calls, items in run.provider_calls
    ]
    calls = "; ".join(parts) or "none"
    if provider == "vault":
        return f"{run.kms_calls:,} HTTP requests to OpenBao (provider calls: {calls})"
    return f"{run.kms_calls:,} ({calls})"


def notes(results: Sequence[Result], server: str, batch_size: int) -> list[str]:
    """Lines for under the table: what the rows ran on, and per row the worker's peak memory,
    the job's phases, the KMS calls and the projection to 1,000,000 fields."""
    rows = [r for r in results if isinstance(r, ReencryptResult)]
    if not rows:
        return []
    lines = [
        f"Re-encryption rows: {server}, a fresh database per row, VACUUM (ANALYZE) and "
        "CHECKPOINT before each run (untimed). Each run is one worker process (python -m "
        f"bench.reencrypt) timing start_job + run_job(batch_size {batch_size:,}), with one "
        "thread claiming batches or, in the -Nthreads rows, N (HMD_REENCRYPT_WORKERS); the "
        "rewrap rows of one provider share one loaded database; memory = the "
        "worker's peak RSS (VmHWM). Targets: rewrap >= 16,667 fields/s (1,000,000 in 60 s), "
        "legacy >= 5,556 fields/s (1,000,000 in 180 s), peak memory <= 200 MiB. 'projected' "
        "figures are 1,000,000 / the measured median rate, not measurements.",
        "",
    ]
    for r in rows:
        runs = r.runs()
        last = runs[-1]
        batches = [s for run in runs for s in run.batch_seconds[1:]]
        firsts = [run.batch_seconds[0] for run in runs if run.batch_seconds]
        batch_text = (
            f"batches after the first: median {statistics.median(batches):.2f} s, slowest "
            f"{max(batches):.2f} s"
            if batches
            else "one batch"
        )
        m = r.measurement
        seconds = statistics.median(run.seconds for run in m.runs)
        if r.fields >= ONE_MILLION:
            million = f"measured: {r.fields:,} fields in {seconds:.1f} s (median run)"
        else:
            million = f"projected for 1,000,000 fields: {r.projected_million_seconds:.0f} s"
        limit = 60 if r.kind.name == "rewrap" else 180
        lines.append(
            f"- {r.row.id}: peak memory {r.peak_rss_mib:.0f} MiB ({r.setup_rss_mib:.0f} MiB "
            f"before start_job; <= {MEMORY_TARGET_MIB} MiB "
            f"{'met' if r.memory_met else 'MISSED'}); {million} (target <= {limit} s); "
            f"start_job {statistics.median(run.start_seconds for run in runs):.2f} s + run_job "
            f"{statistics.median(run.job_seconds for run in runs):.2f} s (medians); first batch "
            f"(with the data-key prefetch) {statistics.median(firsts) if firsts else 0:.2f} s, "
            f"{batch_text}; KMS calls per run: {_calls_text(last, r.kind.provider)}"
            + (
                f"; legacy data keys unwrapped: {last.legacy_unwraps:,}"
                if r.kind.name == "legacy"
                else ""
            )
            + f"; CPU time / wall time: worker {m.cpu_share:.2f}, PostgreSQL "
            f"{r.cpu_share_of('postgres_cpu_seconds'):.2f}"
            + (
                f", OpenBao {r.cpu_share_of('openbao_cpu_seconds'):.2f}"
                if r.kind.provider == "vault"
                else ""
            )
        )
    sizes = sorted({r.fields for r in rows})
    if len(sizes) > 1:
        lines.append("")
        lines.append(
            "Peak worker memory by number of fields (max VmHWM over the runs), side by side: "
            + "; ".join(
                f"{kind.name}-{kind.provider}"
                + ("" if kind.workers == 1 else f"-{kind.workers}threads")
                + ": "
                + ", ".join(
                    f"{size_label(r.fields)} {r.peak_rss_mib:.1f} MiB"
                    for r in rows
                    if r.kind == kind
                )
                for kind in KINDS
                if any(r.kind == kind for r in rows)
            )
        )
    missed = [r.row.id for r in rows if not r.memory_met]
    lines.append(
        f"re-encryption memory target (<= {MEMORY_TARGET_MIB} MiB) MISSED: {', '.join(missed)}"
        if missed
        else f"re-encryption memory target (<= {MEMORY_TARGET_MIB} MiB) met by every row"
    )
    return lines


# -- the worker process -------------------------------------------------------------------------


class CountingKms:
    """A key provider that counts the calls made to the one it wraps (a batch method counts
    once, its items separately)."""

    def __init__(self, inner: KeyManagementService) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.items: Counter[str] = Counter()

    def _count(self, method: str, items: int = 1) -> None:
        self.calls[method] += 1
        self.items[method] += items

    @property
    def provider(self) -> str:
        return self.inner.provider

    def owns(self, key_identifier: str) -> bool:
        return self.inner.owns(key_identifier)

    def generate_data_key(self, associated_data: bytes) -> DataKey:
        self._count("generate_data_key")
        return self.inner.generate_data_key(associated_data)

    def wrap(self, plaintext: SecretBytes, associated_data: bytes) -> WrappedKey:
        self._count("wrap")
        return self.inner.wrap(plaintext, associated_data)

    def wrap_many(
        self, items: Sequence[tuple[SecretBytes, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        self._count("wrap_many", len(items))
        return self.inner.wrap_many(items)

    def unwrap(self, wrapped: WrappedKey, associated_data: bytes) -> SecretBytes:
        self._count("unwrap")
        return self.inner.unwrap(wrapped, associated_data)

    def unwrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[SecretBytes | HeimdallError]:
        self._count("unwrap_many", len(items))
        return self.inner.unwrap_many(items)

    def rewrap(self, wrapped: WrappedKey, associated_data: bytes) -> WrappedKey:
        self._count("rewrap")
        return self.inner.rewrap(wrapped, associated_data)

    def rewrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        self._count("rewrap_many", len(items))
        return self.inner.rewrap_many(items)

    def rotate(self) -> KeyDescription:
        self._count("rotate")
        return self.inner.rotate()

    def set_min_decryption_version(self, version: int) -> KeyDescription:
        self._count("set_min_decryption_version")
        return self.inner.set_min_decryption_version(version)

    def set_min_encryption_version(self, version: int) -> KeyDescription:
        self._count("set_min_encryption_version")
        return self.inner.set_min_encryption_version(version)

    def describe(self) -> KeyDescription:
        self._count("describe")
        return self.inner.describe()


def _status_mib(name: str) -> float:
    """A ``Vm*`` line of /proc/self/status, in MiB (0.0 where there is none)."""
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return 0.0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.split()[0]) / _MIB  # kB
    return 0.0


def _check(service: Heimdall, caller: Caller, worker: _Worker, job: Job, final: Job) -> None:
    """Untimed: the job did every field, none is left behind, and fields decrypt."""
    if (final.state, final.completed, final.failed, job.total) != (
        JobState.DONE,
        worker.expected,
        0,
        worker.expected,
    ):
        raise AssertionError(
            f"job ended {final.state.value} with {final.completed}/{job.total} done, "
            f"{final.failed} failed; expected {worker.expected}"
        )
    store = service.store
    left = store.count_fields(encryption_version=KMS_V1, key_version_below=job.target_version)
    left += store.count_fields(encryption_version=LEGACY)
    if left:
        raise AssertionError(f"{left} fields were not re-encrypted")
    sample = next(store.iter_fields(batch_size=_SAMPLE), [])
    keys = [f.canonical_key for f in sample]
    if len(service.decrypt_many(keys, reason="bench:verify", caller=caller)) != len(keys):
        raise AssertionError("re-encrypted fields did not decrypt")


def _work(service: Heimdall, worker: _Worker) -> dict[str, Any]:
    """start_job + run_job, timed; then checks that every field was done (untimed)."""
    caller = Caller(actor="bench-reencrypt")
    cipher = service.router.kms
    assert cipher is not None
    counting = CountingKms(cipher.kms)
    # The job's cipher again, over the counting provider.
    service.router = CipherRouter(
        service.router.mode,
        kms=FieldCipher(counting, cipher.encryption_version, cipher.cache),
        legacy=service.router.legacy,
    )
    http: Callable[[], int] = lambda: 0  # noqa: E731
    if worker.provider == "vault":
        from heimdall.kms.vault import VaultTransit  # noqa: PLC0415

        transit = counting.inner
        assert isinstance(transit, VaultTransit)
        http = lambda: transit.transport.calls  # noqa: E731
    legacy = service.router.legacy
    kind = JobKind.ROTATION
    if worker.kind == "legacy":
        # As `heimdall migrate start` does, before its job starts.
        set_mode(service, EncryptionMode.HYBRID, caller=caller, reason="bench migrate start")
        kind = JobKind.MIGRATION
    legacy_before = legacy.kms_calls if legacy is not None else 0
    marks: list[float] = []
    setup_rss = _status_mib("VmRSS")
    pg_before = processes.tree_cpu_seconds(worker.postmaster_pid)
    bao_before = processes.cpu_seconds(worker.openbao_pid) if worker.openbao_pid else 0.0
    http_before = http()
    cpu_start = time.process_time()
    start = time.perf_counter()
    job = start_job(service, caller=caller, kind=kind)
    started = time.perf_counter()
    assert job is not None, "no field needed re-encryption"
    final = run_job(
        service,
        job.job_id,
        caller=caller,
        batch_size=worker.batch_size,
        workers=worker.workers,
        progress=lambda _: marks.append(time.perf_counter()),
    )
    end = time.perf_counter()
    cpu_seconds = time.process_time() - cpu_start
    http_requests = http() - http_before
    pg_cpu = processes.tree_cpu_seconds(worker.postmaster_pid) - pg_before
    bao_cpu = (
        (processes.cpu_seconds(worker.openbao_pid) - bao_before) if worker.openbao_pid else 0.0
    )
    peak_rss = _status_mib("VmHWM")
    provider_calls = [(m, counting.calls[m], counting.items[m]) for m in sorted(counting.calls)]
    kms_calls = http_requests if worker.provider == "vault" else sum(counting.calls.values())
    legacy_unwraps = (legacy.kms_calls if legacy is not None else 0) - legacy_before

    _check(service, caller, worker, job, final)
    edges = [started, *marks]
    return {
        "seconds": end - start,
        "cpu_seconds": cpu_seconds,
        "kms_calls": kms_calls,
        "start_seconds": started - start,
        "job_seconds": end - started,
        "batch_seconds": [b - a for a, b in itertools.pairwise(edges)],
        "provider_calls": provider_calls,
        "legacy_unwraps": legacy_unwraps,
        "peak_rss_mib": peak_rss,
        "setup_rss_mib": setup_rss,
        "postgres_cpu_seconds": pg_cpu,
        "openbao_cpu_seconds": bao_cpu,
        "job_total": job.total,
    }


def worker_main() -> int:
    """``python -m bench.reencrypt``: one job, its configuration on stdin, its figures as one
    JSON line on stdout."""
    worker = _Worker(**json.loads(sys.stdin.read()))
    service = build(_settings(worker, legacy_mode=False, load=False))
    try:
        report = _work(service, worker)
    finally:
        service.close()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
