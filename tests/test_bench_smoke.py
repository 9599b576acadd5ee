"""The benchmark still runs: ``python -m bench --quick`` exits 0 and prints every row.

Only that it runs and reports; the figures themselves are not checked (a missed target is not a
failure, and a quick run on a busy CI machine says little about throughput). The Vault rows run
against a throwaway OpenBao dev server the bench starts itself; they must be there whenever
``.venv/bin/bao`` exists, and may only be skipped, with the reason printed, when it does not.
The re-encryption rows run on a throwaway PostgreSQL cluster the bench starts itself; they must
be there whenever the PostgreSQL server programs exist (their Vault rows whenever the Vault rows
ran), and may only be skipped, with the reason printed, when they do not. The AWS KMS rows run
against a throwaway moto server the bench starts itself; they must be there whenever
``moto_server`` exists (the Vault-to-AWS migration row whenever the Vault and PostgreSQL rows
can run too), and may only be skipped, with the reason printed, when it does not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from age_server import age_installed
from aws_server import moto_binary
from postgres_server import postgres_bindir

ROOT = Path(__file__).resolve().parent.parent
BAO = ROOT / ".venv" / "bin" / "bao"

ROWS = (
    "encrypt/default-cache",
    "encrypt/dek-per-field",
    "decrypt/default-cache",
    "decrypt/dek-per-field",
    "floor/aes-gcm-encrypt",
    "floor/aes-gcm-decrypt",
    "ingest/sqlite",
)
VAULT_ROWS = (
    "vault/ingest-datakey",
    "vault/ingest-transit",
    "vault/decrypt-datakey",
    "vault/decrypt-transit",
    "vault/rewrap-2000",
)
AWS_ROWS = ("aws/ingest", "aws/decrypt", "aws/rewrap")
MIGRATE_ROW = "kms-migrate/vault-to-aws"
# --quick runs them on 2,000 fields.
REENCRYPT_ROWS = (
    "reencrypt/rewrap-local-2k",
    "reencrypt/rewrap-local-2k-2threads",
    "reencrypt/rewrap-vault-2k",
    "reencrypt/rewrap-vault-2k-2threads",
    "reencrypt/legacy-local-2k",
    "reencrypt/legacy-vault-2k",
)

# Apache AGE beside plain PostgreSQL (bench/age.py), --quick on 2,000 fields.
AGE_ROWS = (
    "age/ingest-postgres-2k",
    "age/rewrap-postgres-2k",
    "age/ingest-age-2k",
    "age/rewrap-age-2k",
)

API_ROWS = (
    "api/ingest-local",
    "api/decrypt-local",
    "api/decrypt-1-16-clients",
    "api/floor-empty-route-16-clients",
    "api/decrypt-vault",
)


def test_quick_bench_exits_0_and_prints_every_row(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(results)],
        cwd=ROOT,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        capture_output=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr

    vault_ran = "vault rows skipped" not in proc.stdout
    if BAO.exists():
        assert vault_ran, proc.stdout
    else:
        assert vault_ran or "vault rows skipped: bao not found" in proc.stdout, proc.stdout
    expected: tuple[str, ...] = ROWS + VAULT_ROWS if vault_ran else ROWS
    aws_rows = _aws_rows(proc.stdout, vault_ran=vault_ran)
    expected += aws_rows

    reencrypt_ran = "reencrypt rows skipped" not in proc.stdout
    if postgres_bindir() is not None:
        assert reencrypt_ran, proc.stdout
    else:
        assert reencrypt_ran or "reencrypt rows skipped: PostgreSQL server programs" in (
            proc.stdout
        ), proc.stdout
    reencrypt_rows = tuple(
        row for row in REENCRYPT_ROWS if reencrypt_ran and (vault_ran or "-vault-" not in row)
    )
    expected += reencrypt_rows
    expected += _age_rows(proc.stdout)
    # heimdall serve on loopback (bench/api.py); its Vault row wherever the Vault rows ran.
    expected += tuple(row for row in API_ROWS if vault_ran or not row.endswith("-vault"))

    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:4] == ["benchmark", "fields/s", "µs/field", "target"]
    assert "reference (Tink KMS envelope AEAD on this machine)" in header
    printed = {line.strip("|").split("|")[0].strip(): line for line in table[2:]}
    assert sorted(printed) == sorted(expected)
    for row in expected:
        fields_per_s = printed[row].strip("|").split("|")[1].strip()
        assert int(fields_per_s.replace(",", "")) > 0, printed[row]

    # The latency rows' percentiles, the target's verdict on heimdall's own.
    assert re.search(
        r"- api/decrypt-1-16-clients: latency p50 [0-9.]+ ms, p99 [0-9.]+ ms "
        r"\(target p99 <= 10 ms: (met|MISSED)\)",
        proc.stdout,
    ), proc.stdout
    assert re.search(
        r"- api/floor-empty-route-16-clients: latency p50 [0-9.]+ ms, p99 [0-9.]+ ms over",
        proc.stdout,
    ), proc.stdout

    doc = json.loads(results.read_text(encoding="utf-8"))
    assert doc["quick"] is True
    assert [result["id"] for result in doc["results"]] == list(expected)
    assert all(result["fields_per_s"] > 0 for result in doc["results"])

    if vault_ran:
        # Every Vault row talked to the server, and its KMS calls are reported under the table.
        by_id = {result["id"]: result for result in doc["results"]}
        for row in VAULT_ROWS:
            assert by_id[row]["kms_calls_per_1000_fields"] > 0, by_id[row]
            assert any(
                line.startswith(f"- {row}: KMS calls per 1,000 ")
                for line in proc.stdout.splitlines()
            ), proc.stdout

    by_id = {result["id"]: result for result in doc["results"]}
    for row in reencrypt_rows:
        # The worker process measured its peak memory, and the notes report it with the KMS
        # calls and the projection to 1,000,000 fields.
        assert by_id[row]["peak_rss_mib"] > 0, by_id[row]
        assert by_id[row]["projected_seconds_for_1m_fields"] > 0, by_id[row]
        assert any(
            line.startswith(f"- {row}: peak memory ") and "KMS calls per run" in line
            for line in proc.stdout.splitlines()
        ), proc.stdout

    _check_aws_rows(aws_rows, by_id, proc.stdout)


def _age_rows(stdout: str) -> tuple[str, ...]:
    """The Apache AGE rows the run must show: all of them where PostgreSQL has the age
    extension installed; only where it does not may they be skipped, saying why."""
    age_ran = "age rows skipped" not in stdout
    if age_installed():
        assert age_ran, stdout
    else:
        assert age_ran or "age rows skipped: " in stdout, stdout
    return AGE_ROWS if age_ran else ()


def _aws_rows(stdout: str, *, vault_ran: bool) -> tuple[str, ...]:
    """The AWS rows the run must show: all of them where moto_server, bao and PostgreSQL are
    there; only where a program is missing may one be skipped, saying why."""
    aws_ran = "aws rows skipped" not in stdout
    if moto_binary() is not None:
        assert aws_ran, stdout
    else:
        assert aws_ran or "aws rows skipped: moto_server not found" in stdout, stdout
    if not aws_ran:
        return ()
    migrate_ran = "kms-migrate row skipped" not in stdout
    if vault_ran and postgres_bindir() is not None:
        assert migrate_ran, stdout
    else:
        assert migrate_ran or "kms-migrate row skipped: " in stdout, stdout
    return (*AWS_ROWS, MIGRATE_ROW) if migrate_ran else AWS_ROWS


def _check_aws_rows(
    aws_rows: tuple[str, ...], by_id: dict[str, dict[str, Any]], stdout: str
) -> None:
    """Every AWS row that ran talked to moto, and its KMS calls are reported under the table;
    the ingest row's ceiling is checked; the migration row moved its fields to the AWS key."""
    lines = stdout.splitlines()
    for row in aws_rows:
        assert by_id[row]["kms_calls_per_1000_fields"] > 0, by_id[row]
        if row != MIGRATE_ROW:
            assert any(line.startswith(f"- {row}: KMS calls per 1,000 ") for line in lines), stdout
    if "aws/ingest" in aws_rows:
        assert by_id["aws/ingest"]["kms_calls_ceiling_per_1000_fields"] == 0.2, by_id["aws/ingest"]
        assert "aws KMS calls ceiling (<= 0.2 per 1,000 fields, aws/ingest) " in stdout
    if MIGRATE_ROW in aws_rows:
        # The worker checked that every field is under the AWS key (or the run would fail).
        migrated = by_id[MIGRATE_ROW]
        assert migrated["target_key"].startswith("aws:alias/"), migrated
        assert migrated["distinct_data_keys"] >= 1, migrated
        # Each distinct data key and the blind-index key wrapped by KMS Encrypt.
        encrypts = migrated["kms_calls_by_operation_per_run"]["Encrypt"]
        assert encrypts >= migrated["distinct_data_keys"] + 1, migrated
        assert any(line.startswith(f"- {MIGRATE_ROW}: 2,000 fields, ") for line in lines), stdout
