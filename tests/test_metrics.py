"""Prometheus metrics: counted per batch, exact, and never holding a secret.

The registry lives as long as the test process, so counters are read as their rise during the
operation under test (:class:`Rise`); gauges are set outright and read as they are.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from heimdall import metrics
from heimdall.app import build
from heimdall.errors import FieldNotFound, KeyNotFound, KmsUnavailable
from heimdall.ingest import IngestReport
from heimdall.kms.vault import VaultTransit
from heimdall.kms.vault_config import VaultSettings
from heimdall.rbac import Caller
from heimdall.rotation.job import run_job, start_job
from heimdall.rotation.worker import Worker
from heimdall.service import Heimdall
from heimdall.settings import Settings
from heimdall.store.base import FieldCount, FieldUpdate
from vault_server import BaoServer

BATCH = 7

ServiceFactory = Callable[..., Heimdall]
Ingest = Callable[..., IngestReport]


def _registry() -> CollectorRegistry:
    registry = metrics.REGISTRY
    assert registry is not None, "prometheus-client is installed in the dev environment"
    return registry


def _key(name: str, labels: dict[str, str]) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def _all_samples() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        _key(sample.name, sample.labels): sample.value
        for family in _registry().collect()
        for sample in family.samples
    }


def value(name: str, **labels: str) -> float:
    return _all_samples().get(_key(name, labels), 0.0)


def series(name: str) -> dict[tuple[str, ...], float]:
    """The samples of *name*, keyed by their label values (in label order)."""
    return {
        tuple(sample.labels.values()): sample.value
        for family in _registry().collect()
        for sample in family.samples
        if sample.name == name
    }


class Rise:
    """How much each sample rose since this object was made."""

    def __init__(self) -> None:
        self._before = _all_samples()

    def __call__(self, name: str, **labels: str) -> float:
        return value(name, **labels) - self._before.get(_key(name, labels), 0.0)


def crypto_ops(rise: Rise, operation: str, provider: str, result: str) -> float:
    return rise(
        "heimdall_crypto_operations_total", operation=operation, provider=provider, result=result
    )


def crypto_batches(rise: Rise, operation: str, provider: str) -> float:
    return rise("heimdall_crypto_operation_seconds_count", operation=operation, provider=provider)


def kms_calls(rise: Rise, provider: str, operation: str, result: str) -> float:
    return rise("heimdall_kms_calls_total", provider=provider, operation=operation, result=result)


def _ingest_and_rotate(
    make_service: ServiceFactory, ingest: Ingest, caller: Caller, people: list[dict[str, Any]]
) -> tuple[Heimdall, int]:
    service = make_service(dek_max_uses=1)  # one data key per field
    fields = ingest(service, people).fields_encrypted
    assert fields > 100
    service.rotate_keys(caller=caller)
    return service, fields


def test_ingest_counts_fields_encrypted_and_data_keys_generated(
    make_service: ServiceFactory, ingest: Ingest, people: list[dict[str, Any]]
) -> None:
    service = make_service(dek_max_uses=1)
    rise = Rise()
    fields = ingest(service, people, batch_size=10).fields_encrypted
    assert crypto_ops(rise, "encrypt", "local", "success") == fields
    assert crypto_ops(rise, "encrypt", "local", "failure") == 0
    assert crypto_batches(rise, "encrypt", "local") == math.ceil(len(people) / 10)
    # dek_max_uses=1: every field had a data key of its own from the keyring, and the store
    # its blind-index key.
    assert kms_calls(rise, "local", "generate_data_key", "success") == fields + 1


@pytest.mark.parametrize("workers", [1, 3])
def test_a_job_run_shows_progress_and_counts_every_field_once(
    make_service: ServiceFactory,
    ingest: Ingest,
    caller: Caller,
    people: list[dict[str, Any]],
    workers: int,
) -> None:
    service, fields = _ingest_and_rotate(make_service, ingest, caller, people)
    rise = Rise()
    job = start_job(service, caller=caller)
    assert job is not None and job.total == fields
    done = run_job(service, job.job_id, caller=caller, batch_size=BATCH, workers=workers)
    assert done.completed == fields

    assert value("heimdall_reencryption_progress", status="total") == fields
    assert value("heimdall_reencryption_progress", status="completed") == fields
    assert value("heimdall_reencryption_progress", status="failed") == 0
    assert rise("heimdall_reencrypted_fields_total") == fields
    assert crypto_ops(rise, "rewrap", "local", "success") == fields
    assert crypto_ops(rise, "rewrap", "local", "failure") == 0
    assert crypto_batches(rise, "rewrap", "local") == math.ceil(fields / BATCH)
    # Every data key was rewrapped up front in one batch call to the keyring, and the
    # blind-index key at the end; the job's batches then needed none.
    assert kms_calls(rise, "local", "rewrap", "success") == 2


def test_a_field_that_fails_in_a_job_batch_is_counted_as_a_failure(
    make_service: ServiceFactory, ingest: Ingest, caller: Caller, people: list[dict[str, Any]]
) -> None:
    service, fields = _ingest_and_rotate(make_service, ingest, caller, people)
    broken = next(iter(service.store.iter_fields()))[0]
    update = FieldUpdate("{}", broken.key_version, broken.encryption_version, broken.dek_id)
    assert service.store.compare_and_swap(broken.canonical_key, broken.encrypted_data, update)
    rise = Rise()
    job = start_job(service, caller=caller)
    assert job is not None
    run_job(service, job.job_id, caller=caller, batch_size=fields)  # one batch

    assert crypto_ops(rise, "rewrap", "local", "success") == fields - 1
    assert crypto_ops(rise, "rewrap", "local", "failure") == 1
    assert crypto_batches(rise, "rewrap", "local") == 1  # one duration per batch
    assert rise("heimdall_reencrypted_fields_total") == fields - 1
    assert value("heimdall_reencryption_progress", status="completed") == fields - 1
    assert value("heimdall_reencryption_progress", status="failed") == 1


MISSING_KEY = "email:hash:" + "0" * 64


def test_decrypt_counts_fields_and_an_all_or_nothing_failure(
    make_service: ServiceFactory, ingest: Ingest, caller: Caller, people: list[dict[str, Any]]
) -> None:
    service = make_service()
    ingest(service, people)
    keys = [field.canonical_key for batch in service.store.iter_fields() for field in batch][:25]
    rise = Rise()
    service.decrypt_many(keys, reason="test:metrics", caller=caller)
    assert crypto_ops(rise, "decrypt", "local", "success") == 25
    assert crypto_batches(rise, "decrypt", "local") == 1
    with pytest.raises(FieldNotFound):
        service.decrypt_many([*keys[:3], MISSING_KEY], reason="test:metrics", caller=caller)
    assert crypto_ops(rise, "decrypt", "local", "failure") == 4
    assert crypto_ops(rise, "decrypt", "local", "success") == 25


def test_decrypt_each_counts_each_field_by_its_own_outcome(
    make_service: ServiceFactory, ingest: Ingest, caller: Caller, people: list[dict[str, Any]]
) -> None:
    service = make_service()
    ingest(service, people)
    keys = [field.canonical_key for batch in service.store.iter_fields() for field in batch][:5]
    rise = Rise()
    outcomes = service.decrypt_each(
        [*keys, MISSING_KEY, "not a key"], reason="test:metrics", caller=caller
    )
    assert isinstance(outcomes[MISSING_KEY], FieldNotFound)
    assert crypto_ops(rise, "decrypt", "local", "success") == 5
    assert crypto_ops(rise, "decrypt", "local", "failure") == 1  # text that is no key: not a field
    assert crypto_batches(rise, "decrypt", "local") == 1


def test_a_batch_that_raises_counts_all_its_fields_as_failed() -> None:
    rise = Rise()
    with pytest.raises(KmsUnavailable), metrics.CryptoBatch("encrypt", 12):
        raise KmsUnavailable("down", provider="local")
    assert crypto_ops(rise, "encrypt", "none", "failure") == 12
    assert crypto_ops(rise, "encrypt", "none", "success") == 0


def test_an_unknown_operation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown crypto operation"):
        metrics.record_crypto("email:hash:ab", "local", "success", 1, 0.1)


def test_fields_under_two_keys_at_one_version_are_counted_together() -> None:
    # As while a deployment moves between key providers: both keys have a version 1.
    metrics.set_field_counts(
        [
            FieldCount("kms_v1", 1, 3, "transit/heimdall-pii"),
            FieldCount("kms_v1", 1, 4, "aws:alias/heimdall-pii"),
            FieldCount("kms_v1", 2, 5, "aws:alias/heimdall-pii"),
        ]
    )
    try:
        assert series("heimdall_fields_by_key_version") == {("kms_v1", "1"): 7, ("kms_v1", "2"): 5}
    finally:
        metrics.set_field_counts([])


def test_fields_by_key_version_follows_the_store_through_a_rotation(
    tmp_path: Path, ingest: Ingest, caller: Caller, people: list[dict[str, Any]]
) -> None:
    settings = Settings(data_dir=tmp_path / "data", audit_fsync=False, reencrypt_interval_seconds=0)
    service = build(settings)
    try:
        fields = ingest(service, people).fields_encrypted
        worker = Worker(service, settings, caller=caller)
        worker.cycle()
        assert series("heimdall_fields_by_key_version") == {("kms_v1", "1"): fields}
        service.rotate_keys(caller=caller)
        worker.cycle()  # auto_reencrypt: the job starts and runs
        status = service.status(caller=caller)
        expected = {(c.encryption_version, str(c.key_version)): c.count for c in status.counts}
        assert expected == {("kms_v1", "2"): fields}
        # Version 1's series is gone, not left at its old value.
        assert series("heimdall_fields_by_key_version") == expected
    finally:
        service.close()


def test_the_exposition_holds_no_plaintext_canonical_key_or_envelope(
    make_service: ServiceFactory, ingest: Ingest, caller: Caller, people: list[dict[str, Any]]
) -> None:
    service, _ = _ingest_and_rotate(make_service, ingest, caller, people)
    job = start_job(service, caller=caller)
    assert job is not None
    run_job(service, job.job_id, caller=caller, batch_size=BATCH)
    stored = [field for batch in service.store.iter_fields() for field in batch]
    plaintexts = service.decrypt_many(
        [f.canonical_key for f in stored], reason="test:metrics", caller=caller
    )
    metrics.set_field_counts(service.store.field_counts())
    text = generate_latest(_registry()).decode()

    assert "heimdall_reencryption_progress" in text
    assert "email:hash:" not in text
    assert ":hash:" not in text
    assert "heimdall-pii" not in text  # not even the key's name
    for field in stored:
        assert field.canonical_key not in text
        assert field.encrypted_data not in text
        assert field.dek_id not in text
    for plaintext in plaintexts.values():
        assert plaintext not in text
    for person in people:
        for name in ("email", "name", "phone", "ssn"):
            if person.get(name):
                assert str(person[name]) not in text


def test_every_vault_call_is_counted_once_by_operation_and_result(
    bao: BaoServer, transit_key: str
) -> None:
    provider = VaultTransit(
        VaultSettings(addresses=(bao.addr,), token=bao.root_token, key_name=transit_key),
        observer=metrics.record_kms_call,  # as the composition root wires it
    )
    rise = Rise()
    provider.describe()
    data_key = provider.generate_data_key(b"associated data")
    provider.unwrap(data_key.wrapped, b"associated data").wipe()
    data_key.plaintext.wipe()
    assert kms_calls(rise, "vault", "describe", "success") == 1
    assert kms_calls(rise, "vault", "generate_data_key", "success") == 1
    assert kms_calls(rise, "vault", "unwrap", "success") == 1
    assert rise("heimdall_kms_call_seconds_count", provider="vault", operation="unwrap") == 1
    missing = VaultTransit(
        VaultSettings(addresses=(bao.addr,), token=bao.root_token, key_name="no-such-key"),
        observer=metrics.record_kms_call,
    )
    with pytest.raises(KeyNotFound):
        missing.describe()
    assert kms_calls(rise, "vault", "describe", "not_found") == 1
    assert all(transit_key not in labels for labels in series("heimdall_kms_calls_total"))


def test_an_unreachable_vault_is_one_unavailable_call() -> None:
    settings = VaultSettings(
        addresses=("http://127.0.0.1:9", "http://127.0.0.1:1"),
        token="t",
        key_name="heimdall-pii",
        attempts=2,
        backoff_seconds=0.01,
        timeout=1,
    )
    rise = Rise()
    with pytest.raises(KmsUnavailable):
        VaultTransit(settings, observer=metrics.record_kms_call).describe()
    # Counted once, whatever the transport tried underneath (2 attempts x 2 addresses).
    assert kms_calls(rise, "vault", "describe", "unavailable") == 1


def test_without_prometheus_client_every_function_is_a_no_op(tmp_path: Path) -> None:
    script = """
import sys
sys.modules["prometheus_client"] = None  # as if the server extra were not installed
from heimdall import metrics
from heimdall.app import build
from heimdall.errors import ConfigurationError
assert metrics.REGISTRY is None
metrics.record_crypto("encrypt", "local", "success", 3, 0.1)
metrics.record_kms_call("local", "unwrap", "success", 0.001)
metrics.add_reencrypted(3)
metrics.set_job_progress(None)
metrics.set_field_counts([])
with metrics.CryptoBatch("decrypt", 2):
    pass
try:
    metrics.serve(0)
except ConfigurationError as exc:
    print(exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'heimdall[server]'" in result.stdout
