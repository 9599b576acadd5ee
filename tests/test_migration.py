"""legacy -> hybrid -> migrate -> verify -> enforce -> rollback, end to end on the CLI."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
MASTER_KEY = base64.b64encode(os.urandom(32)).decode()


def _run(data_dir: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update(
        {
            "HMD_DATA_DIR": str(data_dir),
            "HMD_AUDIT_FSYNC": "false",
            "HMD_REENCRYPT_INTERVAL_SECONDS": "0",  # migrate start pauses so between batches
            **extra,
        }
    )
    return subprocess.run(
        [str(BIN / "heimdall"), *args], env=env, capture_output=True, text=True, check=False
    )


def test_migration_phases_end_to_end_on_ten_thousand_legacy_fields(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    people = tmp_path / "people.jsonl"
    people.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "email": f"p{i}@example.com", "ssn": f"900-{i:06d}"}) + "\n"
            for i in range(5000)
        )
    )
    legacy = {"HMD_ENCRYPTION_MODE": "legacy", "HMD_MASTER_KEY": MASTER_KEY}
    assert _run(data_dir, "ingest", str(people), **legacy).returncode == 0
    status = json.loads(_run(data_dir, "migrate", "status", "--json", **legacy).stdout)
    assert (status["legacy_fields"], status["kms_fields"]) == (10_000, 0)

    refused = _run(data_dir, "migrate", "enforce", **legacy)
    assert refused.returncode == 1 and "10000 legacy fields remain" in refused.stderr
    assert _run(data_dir, "migrate", "verify", **legacy).returncode == 1

    started = _run(data_dir, "migrate", "start", HMD_MASTER_KEY=MASTER_KEY)
    assert started.returncode == 0, started.stderr
    assert "10,000 of 10,000 fields done, 0 failed" in started.stdout

    verified = _run(data_dir, "migrate", "verify", HMD_MASTER_KEY=MASTER_KEY)
    assert verified.returncode == 0, verified.stderr
    assert "0 legacy fields, blind-index key under the KMS, 50/50" in verified.stdout
    assert _run(data_dir, "migrate", "enforce", HMD_MASTER_KEY=MASTER_KEY).returncode == 0

    # Every process now sees kms mode, whatever its environment says, and needs no env key.
    status = json.loads(_run(data_dir, "migrate", "status", "--json").stdout)
    assert (status["mode"], status["recorded_mode"]) == ("kms", "kms")
    lookup = json.loads(_run(data_dir, "lookup", "email", "p42@example.com", "--json").stdout)
    decrypted = _run(data_dir, "decrypt", lookup["canonical_key"], "--reason", "test:migrate")
    assert decrypted.stdout == "p42@example.com\n"
    other = _run(data_dir, "status", HMD_ENCRYPTION_MODE="legacy")
    assert "overrides HMD_ENCRYPTION_MODE=legacy" in other.stderr

    # spec: Rollback Plan. New writes go under the env key again; KMS fields still read.
    rolled = _run(data_dir, "migrate", "rollback", HMD_MASTER_KEY=MASTER_KEY)
    assert rolled.returncode == 0, rolled.stderr
    status = json.loads(
        _run(data_dir, "migrate", "status", "--json", HMD_MASTER_KEY=MASTER_KEY).stdout
    )
    assert status["mode"] == "legacy"
    late = tmp_path / "late.jsonl"
    late.write_text(json.dumps({"id": "late", "email": "late@example.com"}) + "\n")
    assert _run(data_dir, "ingest", str(late), HMD_MASTER_KEY=MASTER_KEY).returncode == 0
    status = json.loads(
        _run(data_dir, "migrate", "status", "--json", HMD_MASTER_KEY=MASTER_KEY).stdout
    )
    assert (status["legacy_fields"], status["kms_fields"]) == (1, 10_000)
    again = _run(
        data_dir,
        "decrypt",
        lookup["canonical_key"],
        "--reason",
        "test:rollback",
        HMD_MASTER_KEY=MASTER_KEY,
    )
    assert again.stdout == "p42@example.com\n"
    hybrid = _run(data_dir, "migrate", "rollback", "--to", "hybrid", HMD_MASTER_KEY=MASTER_KEY)
    assert hybrid.returncode == 0, hybrid.stderr
    resumed = _run(data_dir, "migrate", "start", HMD_MASTER_KEY=MASTER_KEY)
    assert resumed.returncode == 0, resumed.stderr
    assert "1 of 1 fields done, 0 failed" in resumed.stdout
    events = [json.loads(x) for x in (data_dir / "audit.log").read_text().splitlines()]
    modes = [e["operation"] for e in events if e["event_type"] == "config.mode"]
    assert modes == [
        "unset -> hybrid",
        "hybrid -> kms",
        "kms -> legacy",
        "legacy -> hybrid",
        "hybrid -> hybrid",
    ]
