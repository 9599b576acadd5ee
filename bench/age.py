"""Apache AGE rows: ingest and rewrap on the AGE graph store beside plain PostgreSQL, same run.

On one throwaway PostgreSQL cluster (:func:`bench.reencrypt.postgres_cluster`, durability
settings on), two fresh databases per size: one for ``HMD_STORE=postgres``, one for
``HMD_STORE=age`` (graph ``heimdall``). In each:

* ingest: a worker process (``python -m bench.age``, its configuration on stdin, its figures as
  JSON on stdout) runs ``ingest_lines`` over N/2 synthetic records of two encrypt fields each
  (:func:`bench.reencrypt.record_lines`, batches of 2,000 records), timed, with its peak memory
  (``VmHWM``). These are the fields the rewrap rows then work on; at the ``--large`` size the
  ingest is the load and is reported under the table, not as a row;
* rewrap: the master key is rotated (untimed), ``VACUUM (ANALYZE)`` and ``CHECKPOINT`` run
  (untimed), and the re-encryption rows' worker (``python -m bench.reencrypt``) times
  ``start_job`` + ``run_job`` of every field, then checks each field moved and a sample
  decrypts.

The target: rewrap of 1,000,000 fields on AGE within 1.5x of plain PostgreSQL, printed as each
AGE rewrap row's target (the PostgreSQL row's rate / 1.5) and under the table. The rows are
skipped, with the reason, when the server has no ``age`` extension (Apache AGE is in no package
registry; see README) or PostgreSQL is missing.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.reencrypt import (
    BATCH_SIZE,
    ClusterStartError,
    PostgresCluster,
    ReencryptResult,
    RowKind,
    _rotate,
    _run_from_report,
    _spawn_worker,
    _status_mib,
    _Worker,
    postgres_bindir,
    postgres_cluster,
    record_lines,
    size_label,
)
from bench.report import Result, Row
from bench.timing import Measurement, Run, measure
from heimdall.app import build
from heimdall.ingest import ingest_lines
from heimdall.rbac import Caller
from heimdall.settings import Settings, StoreKind

__all__ = ["RATIO_TARGET", "AgeOutcome", "IngestResult", "run_rows"]

RATIO_TARGET: Final = 1.5  # rewrap on AGE within 1.5x of plain PostgreSQL's time
STORES: Final = ("postgres", "age")
_BATCH_RECORDS: Final = 2000
_REPO: Final = Path(__file__).resolve().parent.parent
_NO_AGE: Final = (
    "the PostgreSQL server has no age extension (Apache AGE is not packaged: build the "
    "apache/age release for this PostgreSQL major and `make install` it, see README)"
)


@dataclass(frozen=True, slots=True)
class IngestResult(Result):
    store: str = "postgres"
    fields: int = 0
    peak_rss_mib: float = 0.0

    def to_json(self) -> dict[str, Any]:
        doc = Result.to_json(self)  # zero-argument super() fails in a slots dataclass
        doc.update({"store": self.store, "fields": self.fields, "peak_rss_mib": self.peak_rss_mib})
        return doc


@dataclass
class AgeOutcome:
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    server: str = "not run"
    failed: bool = False


def _skipped(outcome: AgeOutcome, reason: str, *, failed: bool = False) -> AgeOutcome:
    message = f"age rows {'failed' if failed else 'skipped'}: {reason}"
    print(message, file=sys.stderr, flush=True)
    outcome.notes.append(message)
    outcome.failed = failed
    return outcome


def _age_available(cluster: PostgresCluster) -> bool:
    import psycopg  # noqa: PLC0415 - the postgres extra

    with psycopg.connect(cluster.dsn()) as conn:
        row = conn.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'age'")
        found = row.fetchone()
    return found is not None and found[0] == 1


def run_rows(sizes: Sequence[tuple[int, int]], *, batch_size: int = BATCH_SIZE) -> AgeOutcome:
    """The AGE rows for each (fields, rewrap runs) in *sizes*; the ingest rows at the first
    size only. On a throwaway cluster started and stopped here."""
    outcome = AgeOutcome()
    try:
        import psycopg  # noqa: F401, PLC0415 - the postgres extra
    except ImportError as exc:
        return _skipped(outcome, f"cannot import psycopg ({exc})")
    bindir = postgres_bindir()
    if bindir is None:
        return _skipped(outcome, "PostgreSQL server programs (initdb, postgres) not found")
    print(f"  starting a PostgreSQL cluster for the age rows ({bindir}) ...", file=sys.stderr)
    try:
        with postgres_cluster(bindir) as cluster:
            if not _age_available(cluster):
                return _skipped(outcome, _NO_AGE)
            outcome.server = f"PostgreSQL {cluster.version} ({cluster.settings()})"
            loads: list[str] = []
            for index, (fields, runs) in enumerate(sizes):
                results, load = _size(cluster, fields, runs, batch_size, rows=index == 0)
                outcome.results.extend(results)
                loads.extend(load)
    except ClusterStartError as exc:
        return _skipped(outcome, f"the PostgreSQL cluster did not start: {exc}", failed=True)
    outcome.notes = notes(outcome.results, outcome.server, loads)
    return outcome


@contextmanager
def _database(cluster: PostgresCluster) -> Iterator[str]:
    name = f"bench_{uuid.uuid4().hex[:12]}"
    cluster.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        cluster.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _size(
    cluster: PostgresCluster, fields: int, runs: int, batch_size: int, *, rows: bool
) -> tuple[list[Result], list[str]]:
    """Both stores at one size: the ingest rows (when *rows*) or the load's figures, then the
    rewrap rows, PostgreSQL's first (the AGE row's target is relative to it)."""
    label = size_label(fields)
    results: list[Result] = []
    loads: list[str] = []
    rewrap: dict[str, Measurement] = {}
    with (
        _database(cluster) as pg_db,
        _database(cluster) as age_db,
        tempfile.TemporaryDirectory(prefix="heimdall-bench-age-") as tmp,
    ):
        for store, database in zip(STORES, (pg_db, age_db), strict=True):
            data_dir = Path(tmp) / store
            data_dir.mkdir()
            worker = _Worker(
                dsn=cluster.dsn(database),
                data_dir=str(data_dir),
                kind="rewrap",
                provider="local",
                batch_size=batch_size,
                expected=fields,
                postmaster_pid=cluster.pid,
                store=store,
            )
            print(f"  age/{store}-{label}: ingesting {fields:,} fields ...", file=sys.stderr)
            ingested = _ingest(worker, fields)
            if rows:
                results.append(_ingest_result(store, fields, ingested))
            else:
                loads.append(
                    f"{store} {label}: {fields:,} fields loaded in {ingested.seconds:.0f} s "
                    f"({fields / ingested.seconds:,.0f} fields/s), worker peak memory "
                    f"{ingested.peak_rss_mib:.0f} MiB"
                )

            def one_run(worker: _Worker = worker, database: str = database) -> Run:
                _rotate(worker)
                cluster.execute("VACUUM (ANALYZE)", database)
                cluster.execute("CHECKPOINT", database)
                return _run_from_report(_spawn_worker(worker))

            row_id = f"age/rewrap-{store}-{label}"
            m = measure(row_id, one_run, fields_per_run=fields, repetitions=runs, warmups=0)
            rewrap[store] = m
            row = _rewrap_row(store, fields, batch_size, rewrap.get("postgres"))
            kind = RowKind("rewrap", "local")
            results.append(ReencryptResult(row, m, kind=kind, fields=fields, batch_size=batch_size))
    return results, loads


def _rewrap_row(store: str, fields: int, batch_size: int, postgres: Measurement | None) -> Row:
    what = (
        f"after a rotate (untimed), start_job + run_job(batch_size {batch_size:,}) of "
        f"{fields:,} kms_v1 fields with HMD_STORE={store}, the local keyring: every data key "
        "rewrapped, ciphertexts unchanged; worker in its own process"
    )
    target = None
    if store == "age" and postgres is not None:
        what += f"; target: within {RATIO_TARGET}x of age/rewrap-postgres's time"
        target = int(postgres.median / RATIO_TARGET)
    return Row(f"age/rewrap-{store}-{size_label(fields)}", what, target)


@dataclass(frozen=True, slots=True)
class _Ingested:
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float


def _ingest(worker: _Worker, fields: int) -> _Ingested:
    """ingest_lines of *fields* fields into the worker's store, in a process of its own."""
    config = {"dsn": worker.dsn, "data_dir": worker.data_dir, "store": worker.store}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.age"],
        input=json.dumps({**config, "records": fields // 2}),
        capture_output=True,
        text=True,
        cwd=_REPO,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the age ingest worker failed:\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return _Ingested(report["seconds"], report["cpu_seconds"], report["peak_rss_mib"])


def _ingest_result(store: str, fields: int, ingested: _Ingested) -> IngestResult:
    row = Row(
        f"age/ingest-{store}-{size_label(fields)}",
        f"ingest_lines of {fields // 2:,} records (2 encrypt fields each, unique values, "
        f"batches of {_BATCH_RECORDS:,}) into a fresh HMD_STORE={store} database, local "
        "keyring, audit without fsync; worker in its own process",
    )
    m = Measurement(fields, 0, (Run(ingested.seconds, ingested.cpu_seconds),))
    return IngestResult(row, m, store=store, fields=fields, peak_rss_mib=ingested.peak_rss_mib)


def notes(results: Sequence[Result], server: str, loads: Sequence[str]) -> list[str]:
    """Lines for under the table: what ran, memory, and AGE against PostgreSQL."""
    if not results:
        return []
    lines = [
        f"Apache AGE rows: {server}, a fresh database per store and size; AGE's graph "
        "'heimdall' beside plain PostgreSQL tables, the same records, keyring and batch size. "
        f"Target: rewrap on AGE within {RATIO_TARGET}x of PostgreSQL (1,000,000 fields, "
        "--large).",
        "",
    ]
    by_id = {r.row.id: r for r in results}
    for r in results:
        memory = r.peak_rss_mib if isinstance(r, IngestResult | ReencryptResult) else 0.0
        seconds = statistics.median(run.seconds for run in r.measurement.runs)
        lines.append(f"- {r.row.id}: {seconds:.1f} s, worker peak memory {memory:.0f} MiB")
    for r in results:
        if not r.row.id.startswith("age/rewrap-age-"):
            continue
        label = r.row.id.removeprefix("age/rewrap-age-")
        postgres = by_id.get(f"age/rewrap-postgres-{label}")
        if postgres is None:
            continue
        ratio = postgres.fields_per_s / r.fields_per_s
        met = "met" if ratio <= RATIO_TARGET else "MISSED"
        lines.append(
            f"age rewrap {label}: {ratio:.2f}x PostgreSQL's time (<= {RATIO_TARGET}x {met})"
        )
    for r in results:
        if r.row.id.startswith("age/ingest-age-"):
            label = r.row.id.removeprefix("age/ingest-age-")
            postgres = by_id.get(f"age/ingest-postgres-{label}")
            if postgres is not None:
                ratio = postgres.fields_per_s / r.fields_per_s
                lines.append(f"age ingest {label}: {ratio:.2f}x PostgreSQL's time")
    lines += [f"load {line}" for line in loads]
    return lines


# -- the ingest worker process --------------------------------------------------------------------


def worker_main() -> int:
    """``python -m bench.age``: one timed ingest, its configuration on stdin, its figures as
    one JSON line on stdout."""
    config = json.loads(sys.stdin.read())
    service = build(
        Settings(
            data_dir=Path(config["data_dir"]),
            store=StoreKind(config["store"]),
            postgres_dsn=config["dsn"],
            audit_fsync=False,
        )
    )
    try:
        caller = Caller(actor="bench-age")
        service.blind_index(caller)  # the store's one-time key, made before the clock starts
        cpu = time.process_time()
        start = time.perf_counter()
        report = ingest_lines(
            service,
            record_lines(config["records"]),
            caller=caller,
            source_name="bench-age",
            batch_size=_BATCH_RECORDS,
        )
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu
    finally:
        service.close()
    expected = config["records"] * 2
    if report.errors or report.fields_encrypted != expected:
        raise AssertionError(f"ingest encrypted {report.fields_encrypted}/{expected} fields")
    figures = {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mib": _status_mib("VmHWM")}
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
