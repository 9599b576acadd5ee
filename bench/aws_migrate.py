"""kms-migrate/vault-to-aws: ``heimdall kms migrate --to aws`` from Vault Transit, on PostgreSQL.

Untimed setup: a throwaway PostgreSQL cluster (:func:`bench.reencrypt.postgres_cluster`: fsync
on), a fresh database, a fresh derived Transit key on the Vault rows' OpenBao dev server and a
fresh AWS key on the bench's moto server (heimdall's bootstrap). N fields are loaded under
Vault, as the re-encryption rows load theirs (``ingest_lines`` of N / 2 records with two encrypt
fields, batches of 2,000, the default data-key cache: one data key per 10,000 fields); then
``VACUUM (ANALYZE)`` and ``CHECKPOINT``.

Timed, in a worker process (``python -m bench.aws_migrate``: its configuration on stdin, the
AWS SDK pointed at moto by its environment, its figures as JSON on stdout): the service built
by :func:`heimdall.app.build` with ``HMD_KMS_PROVIDER=aws`` and ``HMD_KMS_READ_PROVIDERS=vault``
(audit log with fsync, the default), then ``start_job(kind=kms-migration)`` + ``run_job``, what
``heimdall kms migrate --to aws --interval 0`` runs, with the default ``HMD_REENCRYPT_WORKERS``
threads. The job unwraps each distinct data key and the blind-index key at Transit and wraps
them with KMS Encrypt; the data ciphertexts stay as they are.

Checked afterwards (untimed), in the worker; any failure fails the run: the job is done with
every field completed and none failed; ``migrate verify`` finds no field nor the blind-index key
under another key and a sample decrypts; the store's only key is the AWS key; every field's data
ciphertext is what it was (an order-independent digest taken after loading); and a service with
the AWS settings alone (no Vault reader, which ``build`` refuses while any field needs it) opens
the store and decrypts 200 fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from bench import processes, reencrypt
from bench.aws import KMS_MIGRATE, AwsSizes, MigrateResult, MigrateRun
from bench.aws_server import REGION, MotoServer
from bench.timing import measure
from heimdall.app import build
from heimdall.envelope import parse
from heimdall.ingest import ingest_lines
from heimdall.kms.aws_config import AwsSettings
from heimdall.kms.multi import MultiProvider
from heimdall.kms.vault_config import VaultSettings
from heimdall.rbac import Caller
from heimdall.rotation.batch import KMS_V1
from heimdall.rotation.job import run_job, start_job
from heimdall.rotation.migration import verify
from heimdall.settings import Settings, StoreKind
from heimdall.store.base import GraphStore
from heimdall.store.jobs import Job, JobKind, JobState

if TYPE_CHECKING:
    from bench.vault import DevServer
    from heimdall.service import Heimdall

__all__ = ["Skipped", "fields_digest", "run_row", "worker_main"]

WORKERS: Final = Settings().reencrypt_workers  # HMD_REENCRYPT_WORKERS' default
_SAMPLE: Final = 200  # fields decrypted with the AWS settings alone, afterwards
_REPO: Final = Path(__file__).resolve().parent.parent
_MODULUS: Final = 1 << 256


@dataclass(frozen=True, slots=True)
class Skipped:
    """Why the row did not run; *failed*: a server that did not start (not a missing program)."""

    reason: str
    failed: bool = False


@dataclass(frozen=True, slots=True)
class _Worker:
    """What the worker process needs; sent to it as JSON on stdin."""

    dsn: str
    data_dir: str
    aws_url: str
    aws_key: str
    vault_addr: str
    vault_token: str
    vault_key: str
    batch_size: int
    expected: int  # fields
    digest: str  # fields_digest after loading
    data_keys: int
    postmaster_pid: int
    openbao_pid: int
    moto_pid: int

    @property
    def target_key(self) -> str:
        return f"aws:alias/{self.aws_key}"


# -- the settings of each stage, as the application would be configured ----------------------


def _common(worker: _Worker) -> dict[str, Any]:
    return {
        "data_dir": Path(worker.data_dir),
        "store": StoreKind.POSTGRES,
        "postgres_dsn": worker.dsn,
    }


def _vault(worker: _Worker) -> VaultSettings:
    return VaultSettings(
        addresses=(worker.vault_addr,), token=worker.vault_token, key_name=worker.vault_key
    )


def _aws(worker: _Worker) -> AwsSettings:
    return AwsSettings(key_name=worker.aws_key, region=REGION, endpoint_url=worker.aws_url)


def _on_vault(worker: _Worker) -> Settings:
    """Before the move (loading, untimed: its audit log is not fsynced)."""
    return Settings(
        **_common(worker),
        kms_provider="vault",
        kms_key_name=worker.vault_key,
        vault=_vault(worker),
        audit_fsync=False,
    )


def _moving(worker: _Worker) -> Settings:
    """During the move: HMD_KMS_PROVIDER=aws, HMD_KMS_READ_PROVIDERS=vault."""
    return Settings(
        **_common(worker),
        kms_provider="aws",
        kms_read_providers=("vault",),
        kms_key_name=worker.aws_key,
        aws=_aws(worker),
        vault=_vault(worker),
    )


def _on_aws(worker: _Worker) -> Settings:
    """After the move: the AWS settings alone."""
    return Settings(
        **_common(worker), kms_provider="aws", kms_key_name=worker.aws_key, aws=_aws(worker)
    )


def fields_digest(store: GraphStore) -> tuple[str, int]:
    """An order-independent digest of every field's canonical key and data ciphertext, and the
    number of distinct data keys the fields are under."""
    total = 0
    data_keys: set[str] = set()
    for batch in store.iter_fields(batch_size=5000):
        for field in batch:
            ciphertext = parse(field.encrypted_data).ciphertext
            digest = hashlib.sha256(field.canonical_key.encode() + b"\0" + ciphertext).digest()
            total = (total + int.from_bytes(digest, "big")) % _MODULUS
            data_keys.add(field.dek_id)
    return f"{total:064x}", len(data_keys)


# -- the parent: setup, one worker, the result --------------------------------------------------


def _load(worker: _Worker, records: int) -> tuple[str, int]:
    """Ingest *records* records (2 fields each) under Vault (untimed); the fields' digest and
    distinct data keys."""
    service = build(_on_vault(worker))
    try:
        report = ingest_lines(
            service,
            reencrypt.record_lines(records),
            caller=Caller(actor="bench-load"),
            source_name="bench-kms-migrate",
            batch_size=reencrypt.LOAD_BATCH_SIZE,
        )
        digest = fields_digest(service.store)
    finally:
        service.close()
    expected = records * len(reencrypt.ENCRYPT_FIELDS)
    if report.errors or report.fields_encrypted != expected or report.fields_deduplicated:
        raise AssertionError(
            f"loading did not encrypt every field: {report.fields_encrypted}/{expected}, "
            f"{report.fields_deduplicated} deduplicated, {len(report.errors)} errors"
        )
    return digest


def _spawn_worker(worker: _Worker, server: MotoServer) -> dict[str, Any]:
    """Run the job in ``python -m bench.aws_migrate``; its JSON report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HMD_"))}
    env.update(server.environment())
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.aws_migrate"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=_REPO,
        env=env,
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
            f"the kms-migrate worker failed (exit {proc.returncode}):\n"
            + err.decode(errors="replace")[-4000:]
        )
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


def _run_from_report(report: dict[str, Any]) -> MigrateRun:
    requests = tuple((op, n) for op, n in report["requests"])
    return MigrateRun(
        seconds=report["seconds"],
        cpu_seconds=report["cpu_seconds"],
        kms_calls=sum(n for _, n in requests),
        requests=requests,
        server_cpu_seconds=report["moto_cpu_seconds"],
        vault_requests=report["vault_requests"],
        data_keys=report["data_keys"],
        start_seconds=report["start_seconds"],
        job_seconds=report["job_seconds"],
        postgres_cpu_seconds=report["postgres_cpu_seconds"],
        openbao_cpu_seconds=report["openbao_cpu_seconds"],
        peak_rss_mib=report["peak_rss_mib"],
    )


def _row(
    cluster: reencrypt.PostgresCluster, server: MotoServer, bao: DevServer, sizes: AwsSizes
) -> MigrateResult:
    from bench import aws_rows, vault  # noqa: PLC0415 - the aws and vault extras

    fields = sizes.migrate_fields
    database = f"bench_{uuid.uuid4().hex[:12]}"
    cluster.execute(f'CREATE DATABASE "{database}"')
    try:
        with tempfile.TemporaryDirectory(prefix="heimdall-bench-kms-migrate-") as tmp:
            vault_key = f"heimdall-bench-migrate-{secrets.token_hex(4)}"
            vault.create_key(bao, vault_key)
            worker = _Worker(
                dsn=cluster.dsn(database),
                data_dir=tmp,
                aws_url=server.url,
                aws_key=aws_rows.new_key(server),
                vault_addr=bao.addr,
                vault_token=bao.token,
                vault_key=vault_key,
                batch_size=sizes.migrate_batch,
                expected=fields,
                digest="",
                data_keys=0,
                postmaster_pid=cluster.pid,
                openbao_pid=bao.pid,
                moto_pid=server.pid,
            )
            print(f"  {KMS_MIGRATE.id}: loading {fields:,} fields under Vault (untimed) ...",
                  file=sys.stderr, flush=True)  # fmt: skip
            started = time.perf_counter()
            digest, data_keys = _load(worker, fields // len(reencrypt.ENCRYPT_FIELDS))
            loaded = time.perf_counter() - started
            print(f"  {KMS_MIGRATE.id}: loaded in {loaded:.1f} s ({fields / loaded:,.0f} fields/s)",
                  file=sys.stderr, flush=True)  # fmt: skip
            worker = dataclasses.replace(worker, digest=digest, data_keys=data_keys)
            # The same starting state as the re-encryption rows' runs (untimed).
            cluster.execute("VACUUM (ANALYZE)", database)
            cluster.execute("CHECKPOINT", database)
            # A field moves once: one run.
            m = measure(
                KMS_MIGRATE.id,
                lambda: _run_from_report(_spawn_worker(worker, server)),
                fields_per_run=fields,
                repetitions=1,
                warmups=0,
            )
    finally:
        cluster.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return MigrateResult(
        KMS_MIGRATE,
        m,
        fields=fields,
        batch_size=sizes.migrate_batch,
        workers=WORKERS,
        target_key=worker.target_key,
    )


def run_row(server: MotoServer, bao: DevServer, sizes: AwsSizes) -> MigrateResult | Skipped:
    """The row on a throwaway PostgreSQL cluster started and stopped here, *bao* (the Vault
    rows' OpenBao dev server) and *server* (the AWS rows' moto)."""
    try:
        import psycopg  # noqa: F401, PLC0415 - the postgres extra
    except ImportError as exc:
        return Skipped(f"cannot import psycopg ({exc})")
    bindir = reencrypt.postgres_bindir()
    if bindir is None:
        return Skipped(
            "PostgreSQL server programs (initdb, postgres) not found in "
            "/usr/lib/postgresql/*/bin or on PATH"
        )
    print(f"  starting a PostgreSQL cluster ({bindir}) ...", file=sys.stderr, flush=True)
    try:
        with reencrypt.postgres_cluster(bindir) as cluster:
            return _row(cluster, server, bao, sizes)
    except reencrypt.ClusterStartError as exc:
        return Skipped(f"the PostgreSQL cluster did not start: {exc}", failed=True)


# -- the worker process -------------------------------------------------------------------------


def _peak_rss_mib() -> float:
    """VmHWM of this process (its resident set's high-water mark), in MiB; 0.0 if unknown."""
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return 0.0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "VmHWM":
            return int(value.split()[0]) / 1024  # kB
    return 0.0


def _check(service: Heimdall, caller: Caller, worker: _Worker, job: Job, final: Job) -> None:
    """Untimed: the job did every field and left nothing under Vault (see the module
    docstring)."""
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
    verified = verify(service, caller=caller)
    if not verified.ok:
        raise AssertionError(
            f"after kms migrate, {verified.other_key_fields} fields are under another key than "
            f"{verified.key_name} (blind-index key elsewhere: {verified.index_key_elsewhere}), "
            f"and {verified.sample_failures} of {verified.sampled} sampled fields did not decrypt"
        )
    store = service.store
    names = store.key_names()
    moved = store.count_fields(encryption_version=KMS_V1, key_name=worker.target_key)
    if names != [worker.target_key] or moved != worker.expected:
        raise AssertionError(
            f"after kms migrate the store's keys are {names}, {moved} fields under "
            f"{worker.target_key}; expected {worker.expected} under it alone"
        )
    if fields_digest(store) != (worker.digest, worker.data_keys):
        raise AssertionError("kms migrate changed data ciphertexts (or data keys)")


def _check_aws_alone(worker: _Worker) -> None:
    """A service with the AWS settings alone opens the store and decrypts a sample."""
    service = build(_on_aws(worker))
    try:
        sample = next(service.store.iter_fields(batch_size=_SAMPLE), [])
        keys = [f.canonical_key for f in sample]
        caller = Caller(actor="bench-kms-migrate")
        decrypted = service.decrypt_many(keys, reason="bench:verify", caller=caller)
    finally:
        service.close()
    if len(keys) != min(_SAMPLE, worker.expected) or len(decrypted) != len(keys):
        raise AssertionError("fields did not decrypt with the AWS settings alone")


def _work(service: Heimdall, worker: _Worker) -> dict[str, Any]:
    """start_job + run_job, timed; then the checks (untimed)."""
    from bench.aws_rows import request_counter  # noqa: PLC0415 - the aws extra
    from heimdall.kms.aws import AwsKms  # noqa: PLC0415 - likewise
    from heimdall.kms.vault import VaultTransit  # noqa: PLC0415 - the vault extra

    caller = Caller(actor="bench-kms-migrate")
    cipher = service.router.kms
    assert cipher is not None and isinstance(cipher.kms, MultiProvider)
    aws, (transit,) = cipher.kms.primary, cipher.kms.readers
    assert isinstance(aws, AwsKms) and isinstance(transit, VaultTransit)
    counter = request_counter(aws)
    requests, vault_before = counter.snapshot(), transit.transport.calls
    pg_before = processes.tree_cpu_seconds(worker.postmaster_pid)
    bao_before = processes.cpu_seconds(worker.openbao_pid)
    moto_before = processes.cpu_seconds(worker.moto_pid)
    cpu_start = time.process_time()
    start = time.perf_counter()
    job = start_job(service, caller=caller, kind=JobKind.KMS_MIGRATION)
    started = time.perf_counter()
    assert job is not None, "no field needed to move"
    final = run_job(
        service, job.job_id, caller=caller, batch_size=worker.batch_size, workers=WORKERS
    )
    end = time.perf_counter()
    report = {
        "seconds": end - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "start_seconds": started - start,
        "job_seconds": end - started,
        "requests": counter.since(requests, counter.snapshot()),
        "vault_requests": transit.transport.calls - vault_before,
        "postgres_cpu_seconds": processes.tree_cpu_seconds(worker.postmaster_pid) - pg_before,
        "openbao_cpu_seconds": processes.cpu_seconds(worker.openbao_pid) - bao_before,
        "moto_cpu_seconds": processes.cpu_seconds(worker.moto_pid) - moto_before,
        "peak_rss_mib": _peak_rss_mib(),
        "data_keys": worker.data_keys,
    }
    _check(service, caller, worker, job, final)
    return report


def worker_main() -> int:
    """``python -m bench.aws_migrate``: one job, its configuration on stdin, its figures as
    one JSON line on stdout."""
    worker = _Worker(**json.loads(sys.stdin.read()))
    service = build(_moving(worker))
    try:
        report = _work(service, worker)
    finally:
        service.close()
    _check_aws_alone(worker)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
