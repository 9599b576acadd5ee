"""The command line on PostgreSQL (HMD_STORE=postgres)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def _run(tmp_path: Path, dsn: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update({"HMD_DATA_DIR": str(tmp_path / "data"), "HMD_AUDIT_FSYNC": "false"})
    env["HMD_STORE"] = "postgres"
    if dsn is not None:
        env["HMD_POSTGRES_DSN"] = dsn
    return subprocess.run(
        [str(BIN / "heimdall"), *args], env=env, capture_output=True, text=True, check=False
    )


def test_ingest_rotate_reencrypt_and_decrypt_on_postgres(
    tmp_path: Path, postgres_store_dsn: str
) -> None:
    people = tmp_path / "people.jsonl"
    people.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "email": f"p{i}@example.com"}) + "\n" for i in range(300)
        )
    )
    assert _run(tmp_path, postgres_store_dsn, "ingest", str(people)).returncode == 0
    assert _run(tmp_path, postgres_store_dsn, "keys", "rotate").returncode == 0
    reencrypted = _run(tmp_path, postgres_store_dsn, "reencrypt")
    assert reencrypted.returncode == 0, reencrypted.stderr
    status = json.loads(_run(tmp_path, postgres_store_dsn, "status", "--json").stdout)
    assert status["fields"] == [
        {"encryption_version": "kms_v1", "key_name": "heimdall-pii", "key_version": 2, "count": 300}
    ]
    found = json.loads(
        _run(tmp_path, postgres_store_dsn, "lookup", "email", "p7@example.com", "--json").stdout
    )
    decrypted = _run(
        tmp_path, postgres_store_dsn, "decrypt", found["canonical_key"], "--reason", "test:pg"
    )
    assert decrypted.stdout == "p7@example.com\n"
    # The password-bearing DSN never shows in output or the audit trail.
    audit = (tmp_path / "data" / "audit.log").read_text()
    assert postgres_store_dsn not in audit


def test_postgres_without_a_dsn_is_a_one_line_error(tmp_path: Path) -> None:
    result = _run(tmp_path, None, "status")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: HMD_STORE=postgres needs HMD_POSTGRES_DSN"
