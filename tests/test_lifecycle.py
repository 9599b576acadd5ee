"""Key version lifecycle: retire, disable after the grace period, emergency rotation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from heimdall.app import build
from heimdall.envelope import parse
from heimdall.errors import LifecycleError, PermissionDenied
from heimdall.ingest import ingest_lines
from heimdall.kms.base import KeyState
from heimdall.rbac import Caller, Role
from heimdall.reencrypt import reencrypt
from heimdall.rotation.emergency import emergency_rotate
from heimdall.rotation.job import run_job
from heimdall.rotation.lifecycle import dependents_below, disable_expired, retire
from heimdall.rotation.worker import Worker
from heimdall.service import Heimdall
from heimdall.settings import Settings
from heimdall.store.base import FieldUpdate
from heimdall.store.jobs import JobState

CALLER = Caller(actor="test:lifecycle")
DAY = 86_400.0


@pytest.fixture
def service(tmp_path: Path) -> Heimdall:
    heimdall = build(Settings(data_dir=tmp_path / "data", audit_fsync=False))
    lines = [json.dumps({"id": f"r{i}", "email": f"u{i}@example.com"}) for i in range(50)]
    ingest_lines(heimdall, lines, caller=CALLER, source_name="t")
    heimdall.rotate_keys(caller=CALLER)
    return heimdall


def _states(service: Heimdall) -> list[KeyState]:
    return [v.state for v in service.kms.describe().versions]


def _values(service: Heimdall) -> dict[str, str]:
    keys = [f.canonical_key for batch in service.store.iter_fields() for f in batch]
    return service.decrypt_many(keys, reason="test:lifecycle", caller=CALLER)


def test_retiring_a_version_fields_depend_on_is_refused_with_the_count(service: Heimdall) -> None:
    with pytest.raises(LifecycleError) as caught:
        retire(service, 1, caller=CALLER)
    assert caught.value.dependent_fields == 51  # 50 fields and the blind-index key
    assert _states(service) == [KeyState.ACTIVE, KeyState.ACTIVE]


def test_a_retired_version_still_decrypts_but_no_longer_encrypts(service: Heimdall) -> None:
    before = _values(service)
    retire(service, 1, caller=CALLER, force=True)
    assert _states(service) == [KeyState.RETIRED, KeyState.ACTIVE]
    assert _values(service) == before
    ingest_lines(
        service, [json.dumps({"email": "new@example.com"})], caller=CALLER, source_name="n"
    )
    newest = service.lookup("email", "new@example.com", caller=CALLER)
    field = service.store.get_field(newest.canonical_key)
    assert field is not None and field.key_version == 2


def test_the_latest_version_cannot_be_retired(service: Heimdall) -> None:
    with pytest.raises(LifecycleError, match="below the latest"):
        retire(service, 2, caller=CALLER, force=True)


def test_worker_disables_a_retired_version_only_after_the_grace_period(service: Heimdall) -> None:
    reencrypt(service, caller=CALLER)
    retire(service, 1, caller=CALLER, clock=lambda: 1_000_000.0)
    early = disable_expired(
        service, caller=CALLER, grace_period_days=30, clock=lambda: 1_000_000.0 + 29 * DAY
    )
    assert early is None and _states(service)[0] is KeyState.RETIRED
    late = disable_expired(
        service, caller=CALLER, grace_period_days=30, clock=lambda: 1_000_000.0 + 31 * DAY
    )
    assert late is not None and _states(service)[0] is KeyState.DISABLED
    assert len(_values(service)) == 50


def test_a_retired_version_with_dependents_is_not_disabled_by_the_worker(
    service: Heimdall,
) -> None:
    retire(service, 1, caller=CALLER, force=True, clock=lambda: 0.0)
    assert (
        disable_expired(service, caller=CALLER, grace_period_days=1, clock=lambda: 9 * DAY) is None
    )
    assert _states(service)[0] is KeyState.RETIRED


def test_emergency_rotation_reencrypts_under_new_data_keys_and_disables_old_versions(
    service: Heimdall,
) -> None:
    before = _values(service)
    fields = {
        f.canonical_key: parse(f.encrypted_data) for b in service.store.iter_fields() for f in b
    }
    result = emergency_rotate(service, caller=CALLER)
    assert result.description.latest_version == 3
    assert result.disabled_below == 3
    assert result.job is not None and result.job.completed == 50
    assert _states(service) == [KeyState.DISABLED, KeyState.DISABLED, KeyState.ACTIVE]
    for batch in service.store.iter_fields():
        for field in batch:
            after = parse(field.encrypted_data)
            assert after.key_version == 3
            assert after.dek_id != fields[field.canonical_key].dek_id  # a new data key
    assert _values(service) == before
    events = [json.loads(x) for x in service.audit.path.read_text().splitlines()]  # type: ignore[attr-defined]
    kinds = [e["event_type"] for e in events]
    assert "key.rotate" in kinds and kinds.count("key.config") >= 2
    assert sum(1 for e in events if e["event_type"] == "crypto.reencrypt") == 50


def test_an_admin_emergency_rotation_leaves_the_reencryption_to_a_role_that_may_decrypt(
    service: Heimdall, tmp_path: Path
) -> None:
    # heimdall-admin never sees plaintext (on AWS its policy denies Decrypt outright): it
    # rotates, retires and starts the job; heimdall-app runs it; the admin then disables.
    admin = Caller(actor="test:admin", role=Role.ADMIN)
    app = Caller(actor="test:app", role=Role.APP)
    before = _values(service)

    result = emergency_rotate(service, caller=admin)

    assert result.job is not None and result.job.completed == 0
    assert result.disabled_below is None
    assert service.kms.describe().min_encryption_version == 3  # the old versions are retired
    with pytest.raises(PermissionDenied, match="may not decrypt"):
        run_job(service, result.job.job_id, caller=admin)
    logged: list[str] = []
    settings = Settings(data_dir=tmp_path / "unused", reencrypt_interval_seconds=0)
    worker = Worker(
        service, settings, caller=Caller(actor="w", role=Role.WORKER), log=logged.append
    )
    assert worker.cycle().worked is None
    assert any("heimdall-app" in line for line in logged)
    done = run_job(service, result.job.job_id, caller=app)
    assert (done.state, done.completed, done.failed) == (JobState.DONE, 50, 0)
    service.set_min_decryption_version(3, caller=admin)  # nothing depends on 1 and 2 now
    assert _states(service) == [KeyState.DISABLED, KeyState.DISABLED, KeyState.ACTIVE]
    assert _values(service) == before


def test_a_field_in_another_envelope_layout_still_counts_as_a_dependent(
    service: Heimdall,
) -> None:
    # The stores name a field's key from heimdall's own layout; one stored otherwise (the
    # parser still reads it) has no key name, and must not let a floor past it.
    field = next(iter(service.store.iter_fields(batch_size=1)))[0]
    spaced = json.dumps(json.loads(field.encrypted_data))  # ", " and ": " separators
    update = FieldUpdate(spaced, field.key_version, field.encryption_version, field.dek_id)
    assert service.store.compare_and_swap(field.canonical_key, field.encrypted_data, update)
    assert service.decrypt(field.canonical_key, reason="test", caller=CALLER)

    fields, _ = dependents_below(service, 2)

    assert fields == 50
    with pytest.raises(LifecycleError, match="50 stored fields"):
        service.set_min_decryption_version(2, caller=CALLER)
