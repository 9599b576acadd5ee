"""Advice and errors that would lead an operator astray, and floors that move the wrong way.

The env key is never called removable while a legacy field needs it; an error names the cause
an operator can act on (which provider wrote the fields, which env key they need); a
decryption floor raised by anyone (an emergency rotation, another deployment sharing the key)
is lowered only with --force, and that is audited as an event of its own.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cli_runner import Cli, assert_one_line_error
from heimdall.app import build
from heimdall.audit import JsonlAuditLog
from heimdall.errors import ConfigurationError, KeyNotFound, LifecycleError, ModeViolation
from heimdall.ingest import IngestReport
from heimdall.kms.local import LocalKeyring
from heimdall.kms.vault import VaultTransit
from heimdall.kms.vault_config import VaultSettings
from heimdall.rbac import Caller
from heimdall.rotation.lifecycle import retire
from heimdall.service import Heimdall
from heimdall.settings import Settings
from heimdall.types import EncryptionMode
from vault_server import BaoServer

ServiceFactory = Callable[..., Heimdall]
Ingest = Callable[..., IngestReport]
RECORD = {"id": "r-1", "email": "ann@example.com"}


# -- the env key in kms mode ----------------------------------------------------------------


def test_kms_mode_never_advises_removing_the_env_key_while_legacy_fields_need_it(
    make_service: ServiceFactory, ingest: Ingest, master_key: str, data_dir: Path
) -> None:
    ingest(make_service(EncryptionMode.LEGACY, master_key), [RECORD])
    warnings: list[str] = []
    build(
        Settings(data_dir=data_dir, master_key=master_key, audit_fsync=False),
        warn=warnings.append,
    ).close()
    assert len(warnings) == 1
    assert "remove it" not in warnings[0]
    assert "1 legacy fields and the blind-index key" in warnings[0]
    assert "`heimdall migrate start`" in warnings[0]


def test_kms_mode_advises_removing_an_env_key_nothing_needs(
    make_service: ServiceFactory, ingest: Ingest, master_key: str, data_dir: Path
) -> None:
    ingest(make_service(), [RECORD])
    warnings: list[str] = []
    build(
        Settings(data_dir=data_dir, master_key=master_key, audit_fsync=False),
        warn=warnings.append,
    ).close()
    assert warnings == [
        "warning: HMD_MASTER_KEY is set but no legacy field is stored and kms mode never "
        "uses it; remove it"
    ]


def test_a_legacy_field_refused_in_kms_mode_points_to_the_migration(
    make_service: ServiceFactory, ingest: Ingest, master_key: str, caller: Caller
) -> None:
    legacy = make_service(EncryptionMode.LEGACY, master_key)
    ingest(legacy, [RECORD])
    key = legacy.lookup("email", RECORD["email"], caller=caller).canonical_key
    with pytest.raises(ModeViolation) as info:
        make_service(EncryptionMode.KMS).decrypt(key, reason="test:hint", caller=caller)
    assert "`heimdall migrate start`" in str(info.value)
    assert "HMD_ENCRYPTION_MODE=hybrid" not in str(info.value)


# -- errors that name the cause -------------------------------------------------------------


def test_a_wrong_env_key_is_named_as_such(
    make_service: ServiceFactory, ingest: Ingest, master_key: str, caller: Caller
) -> None:
    first = make_service(EncryptionMode.LEGACY, master_key)
    ingest(first, [RECORD])
    key = first.lookup("email", RECORD["email"], caller=caller).canonical_key
    first.close()
    other = base64.b64encode(os.urandom(32)).decode()
    second = make_service(EncryptionMode.LEGACY, other)
    with pytest.raises(KeyNotFound) as info:
        second.decrypt(key, reason="test:wrong-key", caller=caller)
    message = str(info.value)
    assert "another HMD_MASTER_KEY" in message
    assert "no such key version" not in message
    assert other not in message and master_key not in message


def test_a_missing_local_key_version_is_named_as_such(tmp_path: Path) -> None:
    keyring = LocalKeyring(tmp_path / "keyring.json")
    keyring.rotate()
    data_key = keyring.generate_data_key(b"ad")
    data_key.plaintext.wipe()
    fresh = LocalKeyring(tmp_path / "other.json")
    with pytest.raises(KeyNotFound, match=r"key version 2 is not in this local keyring"):
        fresh.unwrap(data_key.wrapped, b"ad")


def test_a_vault_store_opened_with_the_local_provider_names_vault(
    tmp_path: Path, bao: BaoServer, transit_key: str, caller: Caller
) -> None:
    data_dir = tmp_path / "data"
    vault = VaultSettings(addresses=(bao.addr,), token=bao.root_token, key_name=transit_key)
    settings = Settings(
        data_dir=data_dir, kms_provider="vault", kms_key_name=transit_key, vault=vault
    )
    service = build(settings)
    service.blind_index(caller)
    service.close()
    with pytest.raises(ConfigurationError) as info:
        build(Settings(data_dir=data_dir))
    message = str(info.value)
    assert "wrapped by Vault Transit" in message
    assert "HMD_KMS_PROVIDER=vault" in message
    assert "restore the keyring" not in message
    assert not (data_dir / "keyring.json").exists()


# -- floors ---------------------------------------------------------------------------------


def _events(data_dir: Path, event_type: str) -> list[dict[str, Any]]:
    return [e for e in JsonlAuditLog(data_dir / "audit.log") if e["event_type"] == event_type]


def test_lowering_the_decryption_floor_needs_force_and_is_its_own_audited_event(
    make_service: ServiceFactory, ingest: Ingest, caller: Caller, data_dir: Path
) -> None:
    service = make_service()
    service.rotate_keys(caller=caller)
    service.rotate_keys(caller=caller)
    service.set_min_decryption_version(3, caller=caller, force=True)  # an emergency, say
    with pytest.raises(LifecycleError, match="re-enables versions that were disabled"):
        service.set_min_decryption_version(1, caller=caller)
    assert service.kms.describe().min_decryption_version == 3
    refused = _events(data_dir, "key.reenable")
    assert [(e["result"], e["operation"]) for e in refused] == [
        ("failure", "min_decryption_version 3 -> 1")
    ]
    service.set_min_decryption_version(1, caller=caller, force=True)
    assert service.kms.describe().min_decryption_version == 1
    done = _events(data_dir, "key.reenable")
    assert [(e["result"], e["operation"]) for e in done][-1] == (
        "success",
        "min_decryption_version 3 -> 1",
    )


def test_a_floor_raised_by_another_deployment_on_a_shared_vault_key_stays_up(
    tmp_path: Path, bao: BaoServer, transit_key: str, caller: Caller
) -> None:
    vault = VaultSettings(addresses=(bao.addr,), token=bao.root_token, key_name=transit_key)

    def deployment(name: str) -> Heimdall:
        return build(
            Settings(
                data_dir=tmp_path / name,
                kms_provider="vault",
                kms_key_name=transit_key,
                vault=vault,
                audit_fsync=False,
            )
        )

    first, second = deployment("first"), deployment("second")
    first.rotate_keys(caller=caller)
    first.set_min_decryption_version(2, caller=caller, force=True)  # emergency in the first
    with pytest.raises(LifecycleError):
        second.set_min_decryption_version(1, caller=caller)  # no fields here: used to pass
    assert VaultTransit(vault).describe().min_decryption_version == 2
    first.close()
    second.close()


def test_retiring_never_lowers_the_encryption_floor(
    make_service: ServiceFactory, caller: Caller
) -> None:
    service = make_service()
    for _ in range(3):
        service.rotate_keys(caller=caller)
    retire(service, 3, caller=caller)
    assert service.kms.describe().min_encryption_version == 4
    retire(service, 1, caller=caller)
    assert service.kms.describe().min_encryption_version == 4


def test_the_cli_refuses_to_lower_a_floor_without_force(cli: Cli) -> None:
    cli.ok("keys", "rotate")
    cli.ok("keys", "set-min-decryption-version", "2")
    line = assert_one_line_error(cli.run("keys", "set-min-decryption-version", "1"))
    assert "pass --force" in line
    cli.ok("keys", "set-min-decryption-version", "1", "--force")
