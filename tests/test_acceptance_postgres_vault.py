"""Re-encryption acceptance on PostgreSQL with the Vault provider against a real OpenBao."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cli_runner import repair_torn_audit_tail
from heimdall.app import build
from heimdall.envelope import EncryptionContext
from heimdall.ingest import ingest_lines
from heimdall.kms.vault import VaultTransit
from heimdall.kms.vault_config import VaultSettings
from heimdall.rbac import Caller
from heimdall.rotation.job import job_store, run_job, start_job
from heimdall.service import FIELD_LABEL, Heimdall
from heimdall.settings import Settings, StoreKind
from heimdall.store.base import FieldUpdate
from heimdall.store.jobs import JobState
from vault_server import BaoServer

CALLER = Caller(actor="test:acceptance")
BIN = Path(sys.executable).parent


def _service(tmp_path: Path, dsn: str, server: BaoServer, key: str, **options: Any) -> Heimdall:
    vault = VaultSettings(addresses=(server.addr,), token=server.root_token, key_name=key)
    return build(
        Settings(
            data_dir=tmp_path / "data",
            audit_fsync=False,
            store=StoreKind.POSTGRES,
            postgres_dsn=dsn,
            kms_provider="vault",
            kms_key_name=key,
            vault=vault,
            **options,
        )
    )


def _lines(count: int) -> list[str]:
    return [
        json.dumps({"id": f"r{i}", "email": f"user{i}@example.com", "ssn": f"900-{i:07d}"})
        for i in range(count)
    ]


def test_hundred_thousand_fields_rewrap_with_kms_calls_bounded_by_data_keys(
    tmp_path: Path, postgres_store_dsn: str, bao: BaoServer, transit_key: str
) -> None:
    # Audit checkpoints (an hmac call each) go through the same transport; this test counts
    # the calls on data keys, so it checkpoints rarely.
    service = _service(
        tmp_path,
        postgres_store_dsn,
        bao,
        transit_key,
        audit_checkpoint_every=1_000_000,
        audit_checkpoint_seconds=86_400,
    )
    ingest_lines(service, _lines(50_000), caller=CALLER, source_name="t", batch_size=2000)
    distinct_keys = {
        f.dek_id for batch in service.store.iter_fields(batch_size=5000) for f in batch
    }
    service.rotate_keys(caller=CALLER)
    provider = service.kms
    assert isinstance(provider, VaultTransit)
    job = start_job(service, caller=CALLER)
    assert job is not None and job.total == 100_000
    calls = provider.transport.calls
    done = run_job(service, job.job_id, caller=CALLER, batch_size=5000)
    kms_calls = provider.transport.calls - calls
    assert (done.state, done.completed, done.failed) == (JobState.DONE, 100_000, 0)
    # One rewrap per distinct data key, in batches; the blind-index key and a describe
    # are the small constant.
    bound = -(-len(distinct_keys) // provider.settings.batch_size) + 3
    assert kms_calls <= bound, (kms_calls, len(distinct_keys))
    assert service.store.count_fields(key_version_below=2) == 0
    sample = [
        f.canonical_key for batch in service.store.iter_fields(batch_size=997) for f in batch[:1]
    ]
    assert len(service.decrypt_many(sample, reason="test:acceptance", caller=CALLER)) == len(sample)
    service.close()


def test_a_writer_during_the_job_loses_no_update(
    tmp_path: Path, postgres_store_dsn: str, bao: BaoServer, transit_key: str
) -> None:
    service = _service(tmp_path, postgres_store_dsn, bao, transit_key)
    ingest_lines(service, _lines(2000), caller=CALLER, source_name="t")
    service.rotate_keys(caller=CALLER)
    job = start_job(service, caller=CALLER)
    assert job is not None
    keys = [f.canonical_key for batch in service.store.iter_fields() for f in batch][::20]
    writer = _service(tmp_path, postgres_store_dsn, bao, transit_key)
    written: dict[str, str] = {}

    def write() -> None:
        cipher = writer.router.writer
        for number, key in enumerate(keys):
            value = f"updated-{number}@example.com"
            while True:  # a writer reads, encrypts and compare-and-swaps, retrying on conflict
                field = writer.store.get_field(key)
                assert field is not None
                context = EncryptionContext(FIELD_LABEL, key, field.field_name)
                sealed = cipher.encrypt(value.encode(), context)
                update = FieldUpdate(
                    sealed.envelope, sealed.key_version, sealed.encryption_version, sealed.dek_id
                )
                if writer.store.compare_and_swap(key, field.encrypted_data, update):
                    written[key] = value
                    break
            time.sleep(0.002)

    thread = threading.Thread(target=write)
    thread.start()
    done = run_job(service, job.job_id, caller=CALLER, batch_size=50, interval_seconds=0.01)
    thread.join()
    assert done.state is JobState.DONE
    assert len(written) == len(keys)
    assert service.decrypt_many(list(written), reason="test:writer", caller=CALLER) == written
    assert service.store.count_fields(key_version_below=2) == 0
    assert job_store(service).count_pending(done) == 0
    writer.close()
    service.close()


def _cli_env(tmp_path: Path, dsn: str, server: BaoServer, key: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update(
        {
            "HMD_DATA_DIR": str(tmp_path / "data"),
            "HMD_AUDIT_FSYNC": "false",
            "HMD_REENCRYPT_INTERVAL_SECONDS": "0",  # every job command pauses so between batches
            "HMD_STORE": "postgres",
            "HMD_POSTGRES_DSN": dsn,
            "HMD_KMS_PROVIDER": "vault",
            "HMD_KMS_KEY_NAME": key,
            "HMD_VAULT_ADDR": server.addr,
            "HMD_VAULT_TOKEN": server.root_token,
            **extra,
        }
    )
    return env


def _rewraps(tmp_path: Path) -> list[dict[str, object]]:
    lines = (tmp_path / "data" / "audit.log").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    return [
        e
        for e in events
        if e["event_type"] == "crypto.rewrap"
        and e.get("field_identifier")
        and e["result"] == "success"
    ]


def test_worker_killed_at_five_random_points_finishes_exactly_on_postgres_and_vault(
    tmp_path: Path, postgres_store_dsn: str, bao: BaoServer, transit_key: str
) -> None:
    service = _service(
        tmp_path,
        postgres_store_dsn,
        bao,
        transit_key,
        dek_max_uses=1,  # a data key per field, so every batch calls Vault
    )
    ingest_lines(service, _lines(2000), caller=CALLER, source_name="t")
    expected = service.decrypt_many(
        [f.canonical_key for b in service.store.iter_fields() for f in b][::50],
        reason="test:before",
        caller=CALLER,
    )
    service.rotate_keys(caller=CALLER)
    job = start_job(service, caller=CALLER)
    assert job is not None and job.total == 4000
    env = _cli_env(tmp_path, postgres_store_dsn, bao, transit_key)
    worker = [str(BIN / "heimdall"), "reencrypt", "--batch-size", "50", "--interval", "0.05"]
    rng = random.Random(11)  # noqa: S311 - when to kill, not a secret
    for _ in range(5):
        process = subprocess.Popen(
            worker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.8, 1.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
        repair_torn_audit_tail(env)
    finish = subprocess.run(worker, env=env, capture_output=True, text=True, check=False)
    assert finish.returncode == 0, finish.stderr
    final = job_store(service).get_job(job.job_id)
    assert final is not None
    assert (final.state, final.completed, final.total, final.failed) == (
        JobState.DONE,
        4000,
        4000,
        0,
    )
    assert service.store.count_fields(key_version_below=2) == 0
    assert service.decrypt_many(list(expected), reason="test:after", caller=CALLER) == expected
    assert len({e["request_id"] for e in _rewraps(tmp_path)}) > 1  # the killed ones worked too
    service.close()


def test_two_worker_processes_on_postgres_never_do_the_same_field(
    tmp_path: Path, postgres_store_dsn: str, bao: BaoServer, transit_key: str
) -> None:
    service = _service(
        tmp_path,
        postgres_store_dsn,
        bao,
        transit_key,
        dek_max_uses=1,
    )
    ingest_lines(service, _lines(1000), caller=CALLER, source_name="t")
    service.rotate_keys(caller=CALLER)
    job = start_job(service, caller=CALLER)
    assert job is not None
    env = _cli_env(tmp_path, postgres_store_dsn, bao, transit_key)
    worker = [str(BIN / "heimdall"), "reencrypt", "run", "--batch-size", "40", "--interval", "0.05"]
    # Two processes of two threads each: four claimers side by side.
    worker += ["--workers", "2"]
    processes = [subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL) for _ in range(2)]
    for process in processes:
        assert process.wait(timeout=180) == 0
    rewraps = _rewraps(tmp_path)
    per_field = Counter(str(e["field_identifier"]) for e in rewraps)
    assert len(per_field) == 2000 and set(per_field.values()) == {1}
    assert len({e["request_id"] for e in rewraps}) == 2
    final = job_store(service).get_job(job.job_id)
    assert final is not None and (final.state, final.completed) == (JobState.DONE, 2000)
    service.close()


def test_migration_phases_on_ten_thousand_legacy_fields_on_postgres_and_vault(
    tmp_path: Path, postgres_store_dsn: str, bao: BaoServer, transit_key: str
) -> None:
    master = base64.b64encode(os.urandom(32)).decode()
    env = _cli_env(tmp_path, postgres_store_dsn, bao, transit_key, HMD_MASTER_KEY=master)
    people = tmp_path / "people.jsonl"
    people.write_text("".join(line + "\n" for line in _lines(5000)))

    def heimdall(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "heimdall"), *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=False,
        )

    assert heimdall("ingest", str(people), HMD_ENCRYPTION_MODE="legacy").returncode == 0
    status = json.loads(heimdall("migrate", "status", "--json").stdout)
    assert (status["legacy_fields"], status["kms_fields"]) == (10_000, 0)
    assert heimdall("migrate", "enforce").returncode == 1  # refused: legacy fields remain
    started = heimdall("migrate", "start")
    assert started.returncode == 0, started.stderr
    assert "10,000 of 10,000 fields done, 0 failed" in started.stdout
    assert heimdall("migrate", "verify").returncode == 0
    assert heimdall("migrate", "enforce").returncode == 0
    kms_only = {k: v for k, v in env.items() if k != "HMD_MASTER_KEY"}
    status = json.loads(
        subprocess.run(
            [str(BIN / "heimdall"), "migrate", "status", "--json"],
            env=kms_only,
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    )
    assert (status["mode"], status["legacy_fields"], status["kms_fields"]) == ("kms", 0, 10_000)
    assert heimdall("migrate", "rollback").returncode == 0
    found = json.loads(heimdall("lookup", "email", "user42@example.com", "--json").stdout)
    decrypted = heimdall("decrypt", found["canonical_key"], "--reason", "test:rollback")
    assert decrypted.stdout == "user42@example.com\n"
    assert json.loads(heimdall("migrate", "status", "--json").stdout)["mode"] == "legacy"
