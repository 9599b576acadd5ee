"""Keyed audit checkpoints on a real OpenBao: the MAC key is a Transit key that never leaves it.

The roles that write audit events make the MACs (``hmac``), the roles that check the trail
verify them (``verify``). Policies are global to the server and the bootstrap rewrites them for
its key, so each test bootstraps first and uses its tokens right after (as in
test_vault_bootstrap.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from audit_tools import records, rewrite_trail, sample_events, without_decrypts
from heimdall.app import build, open_audit_log
from heimdall.audit import JsonlAuditLog
from heimdall.errors import AccessDenied, AuditError
from heimdall.ingest import ingest_lines
from heimdall.kms.vault_audit import VaultAuditKey
from heimdall.kms.vault_bootstrap import bootstrap
from heimdall.kms.vault_config import VaultSettings
from heimdall.kms.vault_transport import VaultTransport
from heimdall.rbac import Caller, Role
from heimdall.settings import Settings
from vault_server import BaoServer

CALLER = Caller(actor="test:vault-audit")
FORGED = "checkpoint MAC does not verify: forged, or made with another key"


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def key_name(bao: BaoServer) -> Iterator[str]:
    """A key bootstrapped with its audit key and the four role policies."""
    key, approle = _unique("audit"), _unique("approle")
    bootstrap(bao.client(), key_name=key, approle_mount=approle)
    yield key
    bao.client().sys.disable_auth_method(approle)


def _token(bao: BaoServer, role: Role) -> str:
    answer = bao.client().auth.token.create(policies=[role.value], ttl="5m")
    return str(answer["auth"]["client_token"])


def _settings(tmp_path: Path, bao: BaoServer, key: str, token: str, **options: Any) -> Settings:
    vault = VaultSettings(addresses=(bao.addr,), token=token, key_name=key)
    return Settings(
        data_dir=tmp_path / "data",
        kms_provider="vault",
        kms_key_name=key,
        audit_fsync=False,
        vault=vault,
        **options,
    )


def _audit_key(bao: BaoServer, key: str) -> VaultAuditKey:
    settings = VaultSettings(addresses=(bao.addr,), token=bao.root_token, key_name=key)
    return VaultAuditKey(VaultTransport(settings))


def _people(count: int) -> list[str]:
    return [f'{{"id": "p-{n}", "email": "person{n}@example.org"}}\n' for n in range(count)]


def test_the_app_checkpoints_the_trail_the_auditor_verifies_it_and_a_rewrite_fails(
    tmp_path: Path, bao: BaoServer, key_name: str
) -> None:
    app = _settings(tmp_path, bao, key_name, _token(bao, Role.APP), audit_checkpoint_every=7)
    service = build(app)
    ingest_lines(service, _people(6), caller=CALLER, source_name="test")
    for n in (1, 4):
        canonical_key = service.lookup("email", f"person{n}@example.org", caller=CALLER)
        service.decrypt(canonical_key.canonical_key, reason="support:ticket-7", caller=CALLER)
    service.audit.close()
    service.close()
    checkpoints = [record for record in records(app.audit_file) if "mac" in record]
    assert checkpoints and all(cp["mac"].startswith("vault:v1:") for cp in checkpoints)
    assert {cp["key_identifier"] for cp in checkpoints} == {f"transit/{key_name}-audit"}
    auditor = _settings(tmp_path, bao, key_name, _token(bao, Role.AUDIT))

    report = open_audit_log(auditor).verify()

    assert (report.ok, report.checkpoints) == (True, len(checkpoints))
    assert report.events_after_checkpoint == 0
    with pytest.raises(AccessDenied):  # the app makes MACs but may not check them
        open_audit_log(app).verify()

    rewrite_trail(app.audit_file, without_decrypts)

    report = open_audit_log(auditor).verify()
    assert (report.ok, report.problem) == (False, FORGED)


def test_a_vault_checkpoint_with_a_mac_from_another_audit_key_fails(
    tmp_path: Path, bao: BaoServer
) -> None:
    first, second = _unique("audit"), _unique("audit")
    for key in (first, second):
        bootstrap(bao.client(), key_name=key, approle_mount=_unique("approle"))
    ours = JsonlAuditLog(tmp_path / "a.log", fsync=False, key=_audit_key(bao, first))
    theirs = JsonlAuditLog(tmp_path / "b.log", fsync=False, key=_audit_key(bao, second))
    for log in (ours, theirs):
        log.write(sample_events(3))
        log.close()
    assert ours.verify().ok
    other_mac = records(theirs.path)[-1]["mac"]

    def swap_mac(record: dict[str, Any]) -> bool:
        if "mac" in record:
            record["mac"] = other_mac
        return True

    rewrite_trail(ours.path, swap_mac)

    report = ours.verify()
    assert (report.ok, report.first_bad_line, report.problem) == (False, 4, FORGED)


def test_without_the_audit_key_a_due_checkpoint_refuses_the_append(
    tmp_path: Path, bao: BaoServer
) -> None:
    never_bootstrapped = _unique("no-audit-key")
    log = JsonlAuditLog(
        tmp_path / "audit.log",
        fsync=False,
        key=_audit_key(bao, never_bootstrapped),
        checkpoint_every=2,
    )
    log.write(sample_events(1))
    before = log.path.read_bytes()

    with pytest.raises(AuditError, match="run `heimdall vault bootstrap`") as refused:
        log.write(sample_events(1, start=1))

    assert f"transit/{never_bootstrapped}-audit" in str(refused.value)
    assert bao.root_token not in str(refused.value)
    assert log.path.read_bytes() == before
