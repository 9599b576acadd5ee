"""The benchmark still runs: ``python -m bench --quick`` exits 0 and prints every row.

Only that it runs and reports; the figures themselves are not checked (a missed target is not a
failure, and a quick run on a busy CI machine says little about throughput). The Vault rows run
against a throwaway OpenBao dev server the bench starts itself; they must be there whenever
``.venv/bin/bao`` exists, and may only be skipped, with the reason printed, when it does not.
The re-encryption rows run on a throwaway PostgreSQL cluster the bench starts itself; they must
be there whenever the PostgreSQL server programs exist (their Vault rows whenever the Vault rows
ran), and may only be skipped, with the reason printed, when they do not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
# --quick runs them on 2,000 fields.
REENCRYPT_ROWS = (
    "reencrypt/rewrap-local-2k",
    "reencrypt/rewrap-local-2k-2threads",
    "reencrypt/rewrap-vault-2k",
    "reencrypt/rewrap-vault-2k-2threads",
    "reencrypt/legacy-local-2k",
    "reencrypt/legacy-vault-2k",
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

    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:4] == ["benchmark", "fields/s", "µs/field", "target"]
    assert "reference (Tink KMS envelope AEAD on this machine)" in header
    printed = {line.strip("|").split("|")[0].strip(): line for line in table[2:]}
    assert sorted(printed) == sorted(expected)
    for row in expected:
        fields_per_s = printed[row].strip("|").split("|")[1].strip()
        assert int(fields_per_s.replace(",", "")) > 0, printed[row]

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
