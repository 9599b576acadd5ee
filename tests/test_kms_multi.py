"""One store under several key providers: every field read where it was wrapped, and the move
of every field from one provider to another (the local keyring and a real OpenBao here; AWS
KMS in test_kms_aws_move)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from heimdall.audit import JsonlAuditLog
from heimdall.blind_index import StoredIndexKey
from heimdall.cipher import FieldCipher
from heimdall.envelope import KMS_DIRECT, EncryptionVersion, parse
from heimdall.errors import KeyNotFound, KeyVersionDisabled, LifecycleError
from heimdall.ingest import ingest_lines
from heimdall.kms.base import KeyManagementService, WrappedKey
from heimdall.kms.local import LocalKeyring
from heimdall.kms.multi import MultiProvider
from heimdall.kms.vault import VaultTransit
from heimdall.kms.vault_config import VaultSettings
from heimdall.modes import CipherRouter
from heimdall.policy import default_policy
from heimdall.rbac import Caller
from heimdall.rotation.job import JobKind, plan, run_job, start_job
from heimdall.rotation.migration import require_verified, verify
from heimdall.rotation.worker import Worker
from heimdall.secret import SecretBytes
from heimdall.service import Heimdall
from heimdall.settings import Settings
from heimdall.store.base import FieldValue
from heimdall.store.jobs import JobState
from heimdall.store.sqlite import SqliteStore
from heimdall.types import EncryptionMode
from vault_server import BaoServer

CALLER = Caller(actor="test:move")


class OtherKeyring(LocalKeyring):
    """A keyring under another provider name: two keyrings stand for two key services."""

    provider = "other"


AD = b"heimdall-test-associated-data"


def _records(count: int, offset: int = 0) -> list[str]:
    return [
        json.dumps({"id": f"p-{i}", "email": f"person{i}@example.com", "name": f"Person {i}"})
        + "\n"
        for i in range(offset, offset + count)
    ]


class Deployment:
    """One data dir (database, keyring, audit log) opened with any key provider setup, as
    processes with different settings would open it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.opened: list[Heimdall] = []

    def open(self, kms: KeyManagementService, *, direct: bool = False) -> Heimdall:
        cipher = FieldCipher(kms, EncryptionVersion.KMS_V1, direct=direct)
        service = Heimdall(
            router=CipherRouter(EncryptionMode.KMS, kms=cipher, legacy=None),
            store=SqliteStore(self.data_dir / "heimdall.db"),
            audit=JsonlAuditLog(self.data_dir / "audit.log", fsync=False),
            policy=default_policy(),
        )
        self.opened.append(service)
        return service

    def close(self) -> None:
        for service in self.opened:
            service.close()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    opened = Deployment(tmp_path / "data")
    yield opened
    opened.close()


@pytest.fixture
def keyring(tmp_path: Path) -> LocalKeyring:
    return LocalKeyring(tmp_path / "keyring.json", create=True)


@pytest.fixture
def vault(bao: BaoServer, transit_key: str) -> VaultTransit:
    return VaultTransit(
        VaultSettings(addresses=(bao.addr,), token=bao.root_token, key_name=transit_key)
    )


def _ingest(service: Heimdall, count: int, offset: int = 0) -> None:
    ingest_lines(service, _records(count, offset), caller=CALLER, source_name="test")


def _fields(service: Heimdall) -> list[FieldValue]:
    return [f for batch in service.store.iter_fields() for f in batch]


def _values(service: Heimdall) -> dict[str, str]:
    keys = [f.canonical_key for f in _fields(service)]
    values = service.decrypt_many(keys, reason="test:verify", caller=CALLER)
    assert len(values) == len(keys)
    return values


def _keys_in_use(service: Heimdall) -> dict[str | None, int]:
    counts: dict[str | None, int] = {}
    for count in service.store.field_counts():
        counts[count.key_name] = counts.get(count.key_name, 0) + count.count
    return counts


# -- the provider ----------------------------------------------------------------------------


def test_each_wrapped_key_is_unwrapped_by_the_provider_that_owns_it(tmp_path: Path) -> None:
    old = OtherKeyring(tmp_path / "old.json", key_name="old-key", create=True)
    new = LocalKeyring(tmp_path / "new.json", key_name="new-key", create=True)
    under_old, under_new = old.generate_data_key(AD), new.generate_data_key(AD)
    both = MultiProvider(new, [old])

    got = both.unwrap_many([(under_old.wrapped, AD), (under_new.wrapped, AD)])

    assert [bytes(g.view()) for g in got if isinstance(g, SecretBytes)] == [
        bytes(under_old.plaintext.view()),
        bytes(under_new.plaintext.view()),
    ]
    # New data keys are the primary's.
    assert both.generate_data_key(AD).wrapped.key_identifier == "new-key-v1"


def test_a_rewrap_moves_a_readers_key_to_the_primary_with_the_same_plaintext(
    tmp_path: Path,
) -> None:
    old = OtherKeyring(tmp_path / "old.json", key_name="old-key", create=True)
    new = LocalKeyring(tmp_path / "new.json", key_name="new-key", create=True)
    new.rotate()
    data_key = old.generate_data_key(AD)
    both = MultiProvider(new, [old])

    moved = both.rewrap(data_key.wrapped, AD)

    assert (moved.key_identifier, moved.key_version) == ("new-key-v2", 2)
    # The new provider alone now opens it, bound to the same associated data.
    with new.unwrap(moved, AD) as plaintext:
        assert bytes(plaintext.view()) == bytes(data_key.plaintext.view())
    with pytest.raises(Exception):  # noqa: B017 - any refusal: other associated data
        new.unwrap(moved, AD + b"-other")


def test_a_key_no_provider_owns_is_refused_by_the_primary(tmp_path: Path) -> None:
    old = OtherKeyring(tmp_path / "old.json", key_name="old-key", create=True)
    new = LocalKeyring(tmp_path / "new.json", key_name="new-key", create=True)
    stranger = LocalKeyring(tmp_path / "x.json", key_name="stranger", create=True)
    both = MultiProvider(new, [old])
    foreign = stranger.generate_data_key(AD).wrapped
    fine = old.generate_data_key(AD).wrapped

    results = both.unwrap_many([(foreign, AD), (fine, AD)])

    assert isinstance(results[0], KeyNotFound)
    assert "stranger" in str(results[0])
    assert isinstance(results[1], SecretBytes)  # one bad item does not fail the other


def test_a_readers_own_floor_still_refuses_its_old_versions(tmp_path: Path) -> None:
    old = OtherKeyring(tmp_path / "old.json", key_name="old-key", create=True)
    new = LocalKeyring(tmp_path / "new.json", key_name="new-key", create=True)
    first = old.generate_data_key(AD).wrapped
    old.rotate()
    old.set_min_decryption_version(2)
    both = MultiProvider(new, [old])

    with pytest.raises(KeyVersionDisabled):
        both.unwrap(first, AD)
    with pytest.raises(KeyVersionDisabled):
        both.rewrap(first, AD)


def test_two_members_with_one_provider_name_are_refused(tmp_path: Path) -> None:
    old = LocalKeyring(tmp_path / "old.json", key_name="old-key", create=True)  # local too
    new = LocalKeyring(tmp_path / "new.json", key_name="new-key", create=True)

    with pytest.raises(ValueError, match="once"):
        MultiProvider(new, [old])


# -- one store, fields under two providers ---------------------------------------------------


def test_a_store_holding_local_and_vault_fields_decrypts_them_all(
    deployment: Deployment, keyring: LocalKeyring, vault: VaultTransit
) -> None:
    before = deployment.open(keyring)
    _ingest(before, 20)
    written_locally = _values(before)

    moving = deployment.open(MultiProvider(vault, [keyring]))
    _ingest(moving, 20, offset=20)  # new fields go under Vault

    values = _values(moving)
    assert len(values) == 2 * len(written_locally)
    assert written_locally.items() <= values.items()
    assert _keys_in_use(moving) == {
        keyring.describe().key_name: len(written_locally),
        vault.describe().key_name: len(written_locally),
    }
    # Lookup still finds a value written under the old provider (its blind index is there).
    assert moving.lookup("email", "person3@example.com", caller=CALLER).found


def test_moving_every_field_keeps_its_ciphertext_and_needs_the_old_provider_no_more(
    deployment: Deployment, keyring: LocalKeyring, vault: VaultTransit
) -> None:
    before = deployment.open(keyring)
    _ingest(before, 30)
    expected = _values(before)
    ciphertexts = {f.canonical_key: parse(f.encrypted_data).ciphertext for f in _fields(before)}
    moving = deployment.open(MultiProvider(vault, [keyring]))

    would = plan(moving, caller=CALLER)
    assert (would.rewrap_fields, would.moved_fields) == (len(expected), len(expected))
    job = start_job(moving, caller=CALLER, kind=JobKind.KMS_MIGRATION)
    assert job is not None and job.kind is JobKind.KMS_MIGRATION
    assert job.target_key == vault.describe().key_name
    done = run_job(moving, job.job_id, caller=CALLER, batch_size=7)

    assert (done.state, done.completed, done.failed) == (JobState.DONE, len(expected), 0)
    assert _keys_in_use(moving) == {vault.describe().key_name: len(expected)}
    fields = _fields(moving)
    assert {f.canonical_key: parse(f.encrypted_data).ciphertext for f in fields} == ciphertexts
    stored = StoredIndexKey.stored_in(moving.store)
    assert stored is not None and vault.owns(stored.wrapped.key_identifier)
    # Vault alone, without the keyring, now reads every field and finds them by value.
    after = deployment.open(vault)
    assert _values(after) == expected
    assert after.lookup("email", "person3@example.com", caller=CALLER).found


def test_verify_counts_the_fields_still_under_another_key_until_the_move_is_done(
    deployment: Deployment, keyring: LocalKeyring, vault: VaultTransit
) -> None:
    first = deployment.open(keyring)
    _ingest(first, 10)
    written = len(_fields(first))
    moving = deployment.open(MultiProvider(vault, [keyring]))

    before = verify(moving, caller=CALLER, sample=5)
    with pytest.raises(LifecycleError, match=f"{written} fields are under another key"):
        require_verified(before)
    require_verified(before, one_key=False)  # the env key is not what is missing here
    job = start_job(moving, caller=CALLER, kind=JobKind.KMS_MIGRATION)
    assert job is not None
    run_job(moving, job.job_id, caller=CALLER)
    after = verify(moving, caller=CALLER, sample=5)

    assert (before.other_key_fields, before.index_key_elsewhere) == (written, True)
    assert (after.other_key_fields, after.index_key_elsewhere, after.ok) == (0, False, True)
    assert after.key_name == vault.describe().key_name


def test_a_process_still_writing_under_the_old_key_does_not_undo_the_move(
    deployment: Deployment, keyring: LocalKeyring, vault: VaultTransit, tmp_path: Path
) -> None:
    first = deployment.open(keyring)
    _ingest(first, 10)
    written = len(_fields(first))
    moving = deployment.open(MultiProvider(vault, [keyring]))
    job = start_job(moving, caller=CALLER, kind=JobKind.KMS_MIGRATION)
    assert job is not None
    stale = deployment.open(keyring)  # a process whose settings still name the keyring

    with pytest.raises(LifecycleError, match="moves fields to the key"):
        run_job(stale, job.job_id, caller=CALLER)
    with pytest.raises(LifecycleError, match="moves fields to the key"):
        start_job(stale, caller=CALLER)
    logged: list[str] = []
    settings = Settings(data_dir=tmp_path / "unused", reencrypt_interval_seconds=0)
    report = Worker(stale, settings, caller=CALLER, log=logged.append).cycle()

    assert report.worked is None
    assert any("not working it" in line for line in logged)
    current = moving.store.get_job(job.job_id)  # type: ignore[attr-defined]
    assert current is not None and (current.state, current.completed) == (JobState.RUNNING, 0)
    assert _keys_in_use(moving) == {keyring.describe().key_name: written}


def test_once_the_move_is_done_a_process_on_the_old_key_does_not_move_fields_back(
    deployment: Deployment, keyring: LocalKeyring, vault: VaultTransit, tmp_path: Path
) -> None:
    _ingest(deployment.open(keyring), 6)
    moving = deployment.open(MultiProvider(vault, [keyring]))
    job = start_job(moving, caller=CALLER, kind=JobKind.KMS_MIGRATION)
    assert job is not None
    run_job(moving, job.job_id, caller=CALLER)
    # Its settings name the keyring again, with Vault to read: it could move every field back.
    stale = deployment.open(MultiProvider(keyring, [vault]))

    with pytest.raises(LifecycleError, match="brought fields to the key"):
        start_job(stale, caller=CALLER)
    logged: list[str] = []
    settings = Settings(data_dir=tmp_path / "unused", reencrypt_interval_seconds=0)
    report = Worker(stale, settings, caller=CALLER, log=logged.append).cycle()

    assert (report.started, report.worked) == (None, None)
    assert any("not working it" in line for line in logged)
    assert _keys_in_use(moving) == {vault.describe().key_name: len(_fields(moving))}
    # An explicit move back is the operator's to make.
    back = start_job(stale, caller=CALLER, kind=JobKind.KMS_MIGRATION)
    assert back is not None and back.target_key == keyring.describe().key_name


def test_values_the_old_provider_encrypted_itself_are_sealed_anew_under_the_new_one(
    deployment: Deployment, keyring: LocalKeyring, vault: VaultTransit
) -> None:
    before = deployment.open(vault, direct=True)  # pattern B: Transit encrypts each value
    _ingest(before, 12)
    expected = _values(before)
    assert {parse(f.encrypted_data).algorithm for f in _fields(before)} == {KMS_DIRECT}
    moving = deployment.open(MultiProvider(keyring, [vault]))

    job = start_job(moving, caller=CALLER, kind=JobKind.KMS_MIGRATION)
    assert job is not None
    done = run_job(moving, job.job_id, caller=CALLER)

    assert (done.completed, done.failed) == (len(expected), 0)
    assert {parse(f.encrypted_data).algorithm for f in _fields(moving)} == {"AES-256-GCM"}
    assert _values(deployment.open(keyring)) == expected


def test_a_rotation_job_of_the_new_key_takes_the_fields_still_under_the_old_one(
    deployment: Deployment, keyring: LocalKeyring, vault: VaultTransit
) -> None:
    # A worker started with the new settings and auto_reencrypt moves the rest too.
    first = deployment.open(keyring)
    _ingest(first, 8)
    written = len(_fields(first))
    moving = deployment.open(MultiProvider(vault, [keyring]))
    _ingest(moving, 8, offset=8)

    job = start_job(moving, caller=CALLER)
    assert job is not None and job.kind is JobKind.ROTATION
    assert job.total == written  # the keyring's fields; Vault's are done already
    run_job(moving, job.job_id, caller=CALLER)

    assert _keys_in_use(moving) == {vault.describe().key_name: 2 * written}


def test_no_plaintext_or_data_key_in_the_providers_repr(
    keyring: LocalKeyring, vault: VaultTransit
) -> None:
    both = MultiProvider(vault, [keyring])
    data_key = both.generate_data_key(AD)

    text = repr(both) + repr(data_key) + repr(WrappedKey("k-v1", 1, b"\x01" * 40))
    assert bytes(data_key.plaintext.view()).hex() not in text
    assert repr(bytes(data_key.plaintext.view()))[2:-1] not in text
    assert "\\x01" not in text
    assert text.startswith("MultiProvider(primary='vault', readers=['local'])")
