"""AWS KMS rows: heimdall's AWS provider against moto's KMS emulator on this machine.

The section (``--only aws``) starts a throwaway ``moto_server`` (:mod:`bench.aws_server`) and
points the AWS SDK at it with dummy credentials; the keys are made by heimdall's own bootstrap
(:func:`heimdall.kms.aws_bootstrap.bootstrap`, what ``heimdall aws bootstrap`` runs). Rows:

* ``aws/ingest``, ``aws/decrypt``, ``aws/rewrap`` (:mod:`bench.aws_rows`), in this process;
* ``kms-migrate/vault-to-aws`` (:mod:`bench.aws_migrate`): ``heimdall kms migrate`` from Vault
  to AWS on PostgreSQL, the job in a worker process, on a throwaway PostgreSQL cluster and the
  OpenBao dev server of the Vault rows.

Without ``moto_server`` (or the aws extra) the section is skipped with the reason printed;
without ``bao`` or the PostgreSQL server programs only the migration row is. A server that does
not start fails the run.

KMS calls are counted as the HTTP requests the provider's SDK clients sent to KMS inside the
timed block, by operation (:class:`bench.aws_server.RequestCounter`): GenerateDataKey, Decrypt,
ReEncrypt, Encrypt, the reads of the key versions (ListAliases, DescribeKey,
ListResourceTags) and the audit trail's checkpoints (GenerateMac) alike.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from bench import aws_server
from bench.report import Result, Row
from bench.timing import Run
from heimdall.kms.aws_config import DEFAULT_CONCURRENCY

if TYPE_CHECKING:
    from bench.vault import DevServer

__all__ = [
    "AWS_DECRYPT",
    "AWS_INGEST",
    "AWS_REWRAP",
    "CALLS_CEILING",
    "FULL",
    "KMS_MIGRATE",
    "QUICK",
    "AwsOutcome",
    "AwsResult",
    "AwsRun",
    "AwsSizes",
    "MigrateResult",
    "MigrateRun",
    "notes",
    "run_rows",
]

CALLS_CEILING: Final = 0.2  # aws/ingest: KMS calls per 1,000 fields, at most
MIGRATE_TARGET: Final = 20_000  # kms-migrate/vault-to-aws: fields/s, at least
AUDIT_OPERATION: Final = "GenerateMac"  # the audit trail's keyed checkpoints

AWS_INGEST = Row(
    "aws/ingest",
    "as ingest/sqlite (same synthetic records, fresh data dir per run) with build(Settings("
    "kms_provider='aws', ...)): data keys from KMS GenerateDataKey, values sealed locally, "
    "default cache (one data key per 10,000 fields), audit checkpoints by KMS GenerateMac",
)
AWS_DECRYPT = Row(
    "aws/decrypt",
    "FieldCipher.decrypt (default CachePolicy, fresh cipher per run) of envelopes sealed "
    "through AWS KMS with the default cache, new EncryptionContext per field: the fields share "
    "a data key, unwrapped once through KMS Decrypt",
)
AWS_REWRAP = Row(
    "aws/rewrap",
    "AwsKms.rewrap_many of wrapped data keys (each from GenerateDataKey with its own "
    "associated data, made before timing); a rotation (a new KMS key) before every run, "
    "untimed, and each run rewraps the previous run's keys: one ReEncrypt per key, "
    f"{DEFAULT_CONCURRENCY} in flight (HMD_AWS_CONCURRENCY). Figures are keys/s",
)
KMS_MIGRATE = Row(
    "kms-migrate/vault-to-aws",
    "start_job(kind=kms-migration) + run_job (what `heimdall kms migrate --to aws` runs) of "
    "fields loaded under Vault Transit on PostgreSQL (fresh database, loaded before timing), "
    "HMD_KMS_PROVIDER=aws, HMD_KMS_READ_PROVIDERS=vault: each distinct data key and the "
    "blind-index key unwrapped by Transit and wrapped by KMS Encrypt, ciphertexts unchanged; "
    "worker in its own process",
    MIGRATE_TARGET,
)


@dataclass(frozen=True, slots=True)
class AwsSizes:
    """How much each AWS row does. The ingest sizes are those of ingest/sqlite, the decrypt
    sizes those of the crypto rows."""

    ingest_records: int  # per run
    ingest_repetitions: int
    ingest_warmup_records: int  # one discarded run of this many records
    decrypt_fields: int
    decrypt_repetitions: int
    decrypt_warmups: int
    rewrap_keys: int
    rewrap_repetitions: int
    rewrap_warmups: int
    migrate_fields: int  # one timed run: a field moves once
    migrate_batch: int  # run_job's batch size


FULL: Final = AwsSizes(20_000, 3, 1_000, 20_000, 7, 1, 2_000, 3, 1, 100_000, 5_000)
QUICK: Final = AwsSizes(300, 1, 100, 2_000, 3, 1, 100, 1, 0, 2_000, 500)


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AwsRun(Run):
    """A :class:`Run` whose ``kms_calls`` are the HTTP requests sent to KMS; *requests* are the
    same by operation, *cipher_calls* ``FieldCipher.kms_calls`` where a cipher is involved, and
    *server_cpu_seconds* moto's CPU time during the run."""

    requests: tuple[tuple[str, int], ...] = ()
    cipher_calls: int | None = None
    server_cpu_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class AwsResult(Result):
    """An AWS row's result: its runs are :class:`AwsRun` s. *calls_ceiling*: the most KMS calls
    per 1,000 of *unit* the row may make (None: no ceiling)."""

    unit: str = "fields"
    calls_ceiling: float | None = None

    def runs(self) -> list[AwsRun]:
        return [run for run in self.measurement.runs if isinstance(run, AwsRun)]

    def _per_1000(self, calls: int) -> float:
        m = self.measurement
        return 1000 * calls / (m.fields_per_run * len(m.runs))

    @property
    def kms_calls_per_1000(self) -> float:
        """HTTP requests to KMS per 1,000 of *unit*, over all timed runs."""
        return self._per_1000(sum(run.kms_calls for run in self.measurement.runs))

    @property
    def audit_calls_per_1000(self) -> float:
        """The part of :attr:`kms_calls_per_1000` that signed audit checkpoints."""
        return self._per_1000(self.requests()[AUDIT_OPERATION])

    def requests(self) -> Counter[str]:
        """HTTP requests to KMS by operation, summed over the timed runs."""
        total: Counter[str] = Counter()
        for run in self.runs():
            total.update(dict(run.requests))
        return total

    @property
    def ceiling_met(self) -> bool | None:
        if self.calls_ceiling is None:
            return None
        return self.kms_calls_per_1000 <= self.calls_ceiling

    @property
    def server_cpu_share(self) -> float:
        """moto's CPU time over the wall time of the timed runs."""
        runs = self.runs()
        wall = sum(run.seconds for run in runs)
        return sum(run.server_cpu_seconds for run in runs) / wall if wall else 0.0

    def to_json(self) -> dict[str, Any]:
        # Zero-argument super() fails in a slots dataclass (the class is recreated).
        doc = Result.to_json(self)
        runs = self.runs()
        doc.update(
            {
                "unit": self.unit,
                "kms_calls_meaning": "HTTP requests the provider's SDK clients sent to AWS KMS "
                "(moto) inside the timed block, every attempt, audit checkpoints included",
                "kms_calls_per_1000_fields": round(self.kms_calls_per_1000, 3),
                "audit_checkpoint_calls_per_1000_fields": round(self.audit_calls_per_1000, 3),
                "kms_calls_by_operation_per_run": {
                    op: round(n / len(runs), 1) for op, n in sorted(self.requests().items())
                },
                "kms_calls_ceiling_per_1000_fields": self.calls_ceiling,
                "kms_calls_ceiling_met": self.ceiling_met,
                "cipher_kms_calls_per_run": runs[-1].cipher_calls if runs else None,
                "server_cpu_share": round(self.server_cpu_share, 3),
                "runs_server_cpu_seconds": [round(run.server_cpu_seconds, 3) for run in runs],
            }
        )
        return doc


@dataclass(frozen=True, slots=True)
class MigrateRun(AwsRun):
    """One ``kms migrate`` job, as the worker measured it; ``kms_calls`` are its requests to
    AWS KMS, *vault_requests* its HTTP requests to OpenBao."""

    vault_requests: int = 0
    data_keys: int = 0  # distinct data keys of the fields moved
    start_seconds: float = 0.0  # start_job
    job_seconds: float = 0.0  # run_job
    postgres_cpu_seconds: float = 0.0
    openbao_cpu_seconds: float = 0.0
    peak_rss_mib: float = 0.0  # VmHWM of the worker process


@dataclass(frozen=True, slots=True)
class MigrateResult(AwsResult):
    fields: int = 0
    batch_size: int = 0
    workers: int = 0
    target_key: str = ""

    def migrate_runs(self) -> list[MigrateRun]:
        return [run for run in self.measurement.runs if isinstance(run, MigrateRun)]

    def cpu_share_of(self, attr: str) -> float:
        runs = self.migrate_runs()
        wall = sum(run.seconds for run in runs)
        return sum(float(getattr(run, attr)) for run in runs) / wall if wall else 0.0

    def to_json(self) -> dict[str, Any]:
        doc = AwsResult.to_json(self)
        last = self.migrate_runs()[-1]
        doc.update(
            {
                "fields": self.fields,
                "batch_size": self.batch_size,
                "workers": self.workers,
                "target_key": self.target_key,
                "distinct_data_keys": last.data_keys,
                "vault_http_requests_per_run": last.vault_requests,
                "runs_start_job_seconds": [round(r.start_seconds, 4) for r in self.migrate_runs()],
                "runs_run_job_seconds": [round(r.job_seconds, 4) for r in self.migrate_runs()],
                "peak_rss_mib": round(max(r.peak_rss_mib for r in self.migrate_runs()), 1),
                "postgres_cpu_share": round(self.cpu_share_of("postgres_cpu_seconds"), 3),
                "openbao_cpu_share": round(self.cpu_share_of("openbao_cpu_seconds"), 3),
            }
        )
        return doc


@dataclass
class AwsOutcome:
    """What the AWS rows produced: results, lines for under the table, what they ran against,
    and whether a server failed to start (a missing program is a skip, not a failure)."""

    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    server: str = "not run"
    failed: bool = False


# -- running the section ------------------------------------------------------------------------


def _skip(outcome: AwsOutcome, what: str, reason: str, *, failed: bool = False) -> None:
    message = f"{what} {'failed' if failed else 'skipped'}: {reason}"
    print(message, file=sys.stderr, flush=True)
    outcome.notes.append(message)
    outcome.failed = outcome.failed or failed


def run_rows(
    *, quick: bool, vault_server: DevServer | None, vault_unavailable: str | None
) -> AwsOutcome:
    """The AWS rows against a throwaway moto server started and stopped here; the migration
    row also on *vault_server* (skipped, with *vault_unavailable* as the reason, when it is
    None) and a throwaway PostgreSQL cluster."""
    outcome = AwsOutcome()
    try:
        from bench import aws_migrate, aws_rows  # noqa: PLC0415 - need the optional aws extra
    except ImportError as exc:
        _skip(outcome, "aws rows", f"cannot import the AWS provider ({exc})")
        return outcome
    binary = aws_server.moto_binary()
    if binary is None:
        _skip(outcome, "aws rows", "moto_server not found")
        return outcome
    sizes = QUICK if quick else FULL
    print(f"  starting moto_server ({binary}) ...", file=sys.stderr, flush=True)
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(aws_server.moto_server(binary))
        except aws_server.ServerStartError as exc:
            _skip(outcome, "aws rows", f"moto_server did not start: {exc}", failed=True)
            return outcome
        stack.enter_context(aws_server.sdk_environment(server))
        outcome.server = f"moto {aws_server.version()} (moto_server, in memory)"
        outcome.results.extend(aws_rows.run(server, sizes))
        if vault_server is None:
            _skip(outcome, "kms-migrate row", vault_unavailable or "no OpenBao dev server")
        else:
            migrated = aws_migrate.run_row(server, vault_server, sizes)
            if isinstance(migrated, aws_migrate.Skipped):
                _skip(outcome, "kms-migrate row", migrated.reason, failed=migrated.failed)
            else:
                outcome.results.append(migrated)
    skips = outcome.notes
    outcome.notes = [*notes(outcome.results, outcome.server), *skips]
    return outcome


# -- reporting ----------------------------------------------------------------------------------


def _per_1000(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _requests_text(result: AwsResult) -> str:
    runs = len(result.runs())
    return ", ".join(f"{op} {n / runs:,.0f}" for op, n in sorted(result.requests().items()))


def _migrate_line(r: MigrateResult) -> str:
    runs = r.migrate_runs()
    last = runs[-1]
    return (
        f"- {r.row.id}: {r.fields:,} fields, {last.data_keys:,} distinct data keys and the "
        f"blind-index key moved to {r.target_key} (every field checked under it afterwards); "
        f"start_job {statistics.median(x.start_seconds for x in runs):.2f} s + run_job "
        f"{statistics.median(x.job_seconds for x in runs):.2f} s (batch {r.batch_size:,}, "
        f"{r.workers} threads); AWS KMS requests per run: {_requests_text(r) or 'none'}; "
        f"OpenBao HTTP requests per run: {last.vault_requests:,}; worker peak memory "
        f"{max(x.peak_rss_mib for x in runs):.0f} MiB; CPU time / wall time: worker "
        f"{r.measurement.cpu_share:.2f}, PostgreSQL {r.cpu_share_of('postgres_cpu_seconds'):.2f}, "
        f"moto {r.server_cpu_share:.2f}, OpenBao {r.cpu_share_of('openbao_cpu_seconds'):.2f}"
    )


def notes(results: Sequence[Result], server: str) -> list[str]:
    """Lines for under the table: what the AWS rows ran against, their KMS calls by operation,
    moto's CPU share, and the KMS-calls ceiling of aws/ingest."""
    rows = [r for r in results if isinstance(r, AwsResult)]
    if not rows:
        return []
    lines = [
        f"AWS KMS rows: {server} on 127.0.0.1 and the same CPUs as the bench, keys made by "
        "heimdall's AWS bootstrap; the provider as the application builds it (AwsSettings "
        f"defaults: {DEFAULT_CONCURRENCY} requests in flight, standard retries). moto answers "
        "in about a millisecond and models no network: real AWS KMS adds a round trip to every "
        "request. KMS calls = HTTP requests the provider's SDK clients sent to KMS inside the "
        "timed block, every attempt, by operation.",
        "",
    ]
    for r in rows:
        if isinstance(r, MigrateResult):
            lines.append(_migrate_line(r))
            continue
        m = r.measurement
        per_run = sum(run.kms_calls for run in m.runs) / len(m.runs)
        cipher = r.runs()[-1].cipher_calls
        lines.append(
            f"- {r.row.id}: KMS calls per 1,000 {r.unit}: {_per_1000(r.kms_calls_per_1000)} "
            f"({per_run:,.0f} per run of {m.fields_per_run:,} {r.unit}: "
            f"{_requests_text(r) or 'none'}"
            + (f"; FieldCipher.kms_calls {cipher:,}" if cipher is not None else "")
            + f"); moto CPU time / wall time: {r.server_cpu_share:.2f}"
        )
    for r in rows:
        if r.calls_ceiling is None:
            continue
        without_audit = r.kms_calls_per_1000 - r.audit_calls_per_1000
        lines.append(
            f"aws KMS calls ceiling (<= {r.calls_ceiling} per 1,000 {r.unit}, {r.row.id}) "
            f"{'met' if r.ceiling_met else 'MISSED'}: {_per_1000(r.kms_calls_per_1000)} per "
            f"1,000, of which the audit checkpoints' {AUDIT_OPERATION} (one event per field; "
            f"see HMD_AUDIT_CHECKPOINT_EVERY and _SECONDS) "
            f"{_per_1000(r.audit_calls_per_1000)} and the data keys and key reads "
            f"{_per_1000(without_audit)}"
        )
    return lines
