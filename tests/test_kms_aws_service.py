"""heimdall on AWS KMS (moto): the emergency runbook, the audit key, and no secret anywhere."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from audit_tools import records, rewrite_trail, sample_events, without_decrypts
from aws_server import DUMMY_SECRET_KEY, MotoServer, new_key_name
from heimdall.app import build
from heimdall.audit import JsonlAuditLog
from heimdall.envelope import ALGORITHM, EncryptionVersion, parse, wrap_associated_data
from heimdall.errors import AuditError, HeimdallError, KeyNotFound, KeyVersionDisabled
from heimdall.ingest import ingest_lines
from heimdall.kms.aws import AwsKms
from heimdall.kms.aws_audit import AwsAuditKey
from heimdall.kms.aws_versions import version_alias
from heimdall.kms.base import KeyState, WrappedKey
from heimdall.rbac import Caller
from heimdall.rotation.emergency import emergency_rotate
from heimdall.service import Heimdall
from heimdall.settings import Settings

CALLER = Caller(actor="test:aws")
FORGED = "checkpoint MAC does not verify: forged, or made with another key"


def _people(count: int) -> list[str]:
    return [f'{{"id": "p-{n}", "email": "person{n}@example.org"}}\n' for n in range(count)]


def _service(tmp_path: Path, moto: MotoServer, key: str, **options: Any) -> Heimdall:
    settings = Settings(
        data_dir=tmp_path / "data",
        kms_provider="aws",
        kms_key_name=key,
        aws=moto.settings(key),
        audit_fsync=False,
        dek_max_uses=3,
        **options,
    )
    return build(settings)


def _emails(service: Heimdall, count: int) -> list[str]:
    found = []
    for n in range(count):
        result = service.lookup("email", f"person{n}@example.org", caller=CALLER)
        found.append(service.decrypt(result.canonical_key, reason="test:read", caller=CALLER))
    return found


def test_emergency_rotation_disables_the_old_kms_key_and_every_field_reads_under_the_new_one(
    tmp_path: Path, moto: MotoServer, aws_key: str
) -> None:
    service = _service(tmp_path, moto, aws_key)
    try:
        ingest_lines(service, _people(8), caller=CALLER, source_name="test")
        old = [parse(f.encrypted_data) for b in service.store.iter_fields() for f in b]
        assert {envelope.key_version for envelope in old} == {1}

        result = emergency_rotate(service, caller=CALLER)

        assert result.disabled_below == 2
        state = moto.client("kms").describe_key(KeyId=version_alias(aws_key, 1))
        assert state["KeyMetadata"]["KeyState"] == "Disabled"
        described = service.kms.describe()
        assert {v.version: v.state for v in described.versions} == {
            1: KeyState.DISABLED,
            2: KeyState.ACTIVE,
        }
        new = [parse(f.encrypted_data) for b in service.store.iter_fields() for f in b]
        assert {envelope.key_version for envelope in new} == {2}
        # New data keys, not the old ones rewrapped: the old master key may have exposed them.
        assert not {e.dek_id for e in old} & {e.dek_id for e in new}
        assert _emails(service, 8) == [f"person{n}@example.org" for n in range(8)]
        # moto would still decrypt under the disabled key (AWS refuses it): heimdall refuses.
        stale = WrappedKey(old[0].key_identifier, 1, old[0].encrypted_dek)
        with pytest.raises(KeyVersionDisabled):
            service.kms.unwrap(stale, b"heimdall.any")
    finally:
        service.close()


def test_no_credential_or_data_key_in_logs_errors_or_the_audit_trail(
    tmp_path: Path, moto: MotoServer, aws_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    service = _service(tmp_path, moto, aws_key)
    errors: list[str] = []
    try:
        ingest_lines(service, _people(4), caller=CALLER, source_name="test")
        _emails(service, 4)
        service.rotate_keys(caller=CALLER)
        field = next(iter(service.store.iter_fields()))[0]
        envelope = parse(field.encrypted_data)
        wrapped = WrappedKey(envelope.key_identifier, envelope.key_version, envelope.encrypted_dek)
        ad = wrap_associated_data(EncryptionVersion.KMS_V1.value, ALGORITHM, envelope.dek_id)
        with service.kms.unwrap(wrapped, ad) as plaintext:
            data_key = bytes(plaintext.view())
        failures: list[Callable[[], object]] = [
            lambda: service.kms.unwrap(wrapped, b"heimdall.wrong"),
            lambda: service.kms.unwrap(WrappedKey(f"aws:alias/{aws_key}-v9", 9, b"x" * 64), b"a"),
        ]
        for failing in failures:
            with pytest.raises(HeimdallError) as caught:
                failing()
            errors += [str(caught.value), repr(caught.value)]
            assert (caught.value.__cause__, caught.value.__context__) == (None, None)
    finally:
        service.close()
    trail = (tmp_path / "data" / "audit.log").read_text()
    texts = "\n".join([trail, caplog.text, *errors, repr(service.kms)])
    for form in (base64.b64encode(data_key).decode(), data_key.hex(), repr(data_key)):
        assert form not in texts
    assert DUMMY_SECRET_KEY not in texts


# -- the audit key: a KMS HMAC key ------------------------------------------------------------


def test_kms_hmac_checkpoints_verify_and_a_rewritten_trail_fails(
    tmp_path: Path, moto: MotoServer, aws_key: str
) -> None:
    key = AwsAuditKey(moto.clients(), aws_key)
    assert key.exists()
    log = JsonlAuditLog(tmp_path / "audit.log", fsync=False, key=key, checkpoint_every=3)
    log.write(sample_events(7))
    log.close()
    checkpoints = [r for r in records(log.path) if "mac" in r]
    assert checkpoints and all(cp["mac"].startswith("aws-kms:v1:") for cp in checkpoints)
    assert {cp["key_identifier"] for cp in checkpoints} == {f"aws:alias/{aws_key}-audit"}
    report = log.verify()
    assert (report.ok, report.checkpoints) == (True, len(checkpoints))

    rewrite_trail(log.path, without_decrypts)

    assert (log.verify().ok, log.verify().problem) == (False, FORGED)


def test_a_mac_of_another_message_or_malformed_does_not_verify(
    moto: MotoServer, aws_key: str
) -> None:
    key = AwsAuditKey(moto.clients(), aws_key)
    mac = key.sign(b"checkpoint one")
    assert key.verify(b"checkpoint one", mac)
    assert not key.verify(b"checkpoint two", mac)
    assert not key.verify(b"checkpoint one", mac[:-4] + "AAA=")
    assert not key.verify(b"checkpoint one", "vault:v1:" + mac.rpartition(":")[2])
    other = new_key_name()
    AwsKms(moto.settings(other), moto.clients())  # no bootstrap: no audit key
    missing = AwsAuditKey(moto.clients(), other)
    assert not missing.exists()
    with pytest.raises(KeyNotFound, match="heimdall aws bootstrap"):
        missing.sign(b"checkpoint")


def test_without_the_audit_key_a_due_checkpoint_refuses_the_append(
    tmp_path: Path, moto: MotoServer
) -> None:
    key = AwsAuditKey(moto.clients(), new_key_name())
    log = JsonlAuditLog(tmp_path / "audit.log", fsync=False, key=key, checkpoint_every=2)
    log.write(sample_events(1))
    with pytest.raises(AuditError):
        log.write(sample_events(1, start=1))
