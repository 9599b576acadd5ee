"""Re-encryption acceptance on PostgreSQL with the Vault provider against a real OpenBao."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from heimdall.app import build
from heimdall.envelope import EncryptionContext
from heimdall.ingest import ingest_lines
from heimdall.kms.vault import VaultTransit
from heimdall.kms.vault_config import VaultSettings
from heimdall.rbac import Caller
from heimdall.reencrypt_job import job_store, run_job, start_job
from heimdall.service import FIELD_LABEL, Heimdall
from heimdall.settings import Settings, StoreKind
from heimdall.store.base import FieldUpdate
from heimdall.store.jobs import JobState
from vault_server import BaoServer

CALLER = Caller(actor="test:acceptance")


def _service(tmp_path: Path, dsn: str, server: BaoServer, key: str) -> Heimdall:
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
    service = _service(tmp_path, postgres_store_dsn, bao, transit_key)
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
    # One rewrap per distinct data key, in batches of 200; the blind-index key and a describe
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
