"""Broken input is refused where it enters, the same way on every store, before anything is
written: a NUL in stored text, a key name no key may have, a policy that stores everything in
the clear without saying so."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cli_runner import Cli, assert_one_line_error
from heimdall.app import build
from heimdall.errors import ConfigurationError
from heimdall.ingest import IngestReport
from heimdall.rbac import Caller
from heimdall.service import Heimdall
from heimdall.settings import Settings, StoreKind

ServiceFactory = Callable[..., Heimdall]
Ingest = Callable[..., IngestReport]

NUL_RECORDS: list[dict[str, Any]] = [
    {"id": "ok-1", "email": "a@example.com", "country": "SE"},
    {"id": "nul\u0000id", "email": "b@example.com"},
    {"id": "ok-2", "email": "c@example.com", "country": "S\u0000E"},
    {"id": "ok-3", "source": "cr\u0000m", "email": "d@example.com"},
    {"id": "ok-4", "email": "e\u0000@example.com", "country": "NO"},  # encrypted: kept
]


@pytest.fixture(params=["sqlite", "postgres"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    if request.param == "sqlite":
        yield {}
        return
    dsn = request.getfixturevalue("postgres_store_dsn")
    yield {"store": StoreKind.POSTGRES, "postgres_dsn": dsn}


def test_a_nul_in_stored_text_rejects_its_line_by_number_on_every_store(
    make_service: ServiceFactory,
    ingest: Ingest,
    caller: Caller,
    store_settings: dict[str, Any],
) -> None:
    service = make_service(**store_settings)
    report = ingest(service, NUL_RECORDS)
    assert [(e.line, e.message) for e in report.errors] == [
        (2, "field 'id' holds a NUL character (\\u0000), which is not stored"),
        (3, "field 'country' holds a NUL character (\\u0000), which is not stored"),
        (4, "field 'source' holds a NUL character (\\u0000), which is not stored"),
    ]
    assert report.records == 2
    found = service.lookup("email", "e\u0000@example.com", caller=caller)
    assert found.found
    assert service.decrypt(found.canonical_key, reason="test:nul", caller=caller) == (
        "e\u0000@example.com"
    )


def test_a_plain_field_named_with_a_nul_is_rejected(
    make_service: ServiceFactory, ingest: Ingest, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('default_action = "plain"\n', encoding="utf-8")
    service = make_service(policy=policy)
    report = ingest(service, [{"id": "1", "na\u0000me": "x"}])
    assert [e.line for e in report.errors] == [1]
    assert "NUL" in report.errors[0].message


@pytest.mark.parametrize(
    "name",
    ["pii key", 'pii"key', "x" * 600, "", "-leading", "pii/key", "é"],
    ids=["space", "quote", "600-chars", "empty", "dash-first", "slash", "non-ascii"],
)
def test_an_invalid_key_name_is_refused_before_anything_is_written(cli: Cli, name: str) -> None:
    result = cli.run("status", env={"HMD_KMS_KEY_NAME": name})
    if name == "":
        assert result.returncode == 0  # empty means unset: the default name
        return
    line = assert_one_line_error(result)
    assert line.startswith("error: HMD_KMS_KEY_NAME must be 1-128 letters")
    assert not (cli.data_dir / "keyring.json").exists()
    # Nothing was saved: the next command, without the bad name, works.
    cli.ok("status")


def test_a_keyring_naming_its_key_badly_is_a_clear_error(cli: Cli) -> None:
    cli.ok("status")
    keyring = cli.data_dir / "keyring.json"
    doc = orjson.loads(keyring.read_bytes())
    doc["key_name"] = "pii key"
    keyring.write_bytes(orjson.dumps(doc))
    line = assert_one_line_error(cli.run("status"))
    assert "names its key with characters a key name may not hold" in line


def test_a_policy_that_keeps_unknown_fields_in_the_clear_is_warned_about(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('default_action = "plain"\n', encoding="utf-8")
    warnings: list[str] = []
    build(Settings(data_dir=tmp_path / "data", policy=policy), warn=warnings.append).close()
    assert len(warnings) == 1
    assert "default_action is plain" in warnings[0]
    warnings.clear()
    build(Settings(data_dir=tmp_path / "data"), warn=warnings.append).close()
    assert warnings == []


def test_config_file_key_name_is_checked_too(tmp_path: Path) -> None:
    config = tmp_path / "heimdall.toml"
    config.write_text('kms_key_name = "pii key"\n', encoding="utf-8")
    with pytest.raises(ConfigurationError, match="HMD_KMS_KEY_NAME must be"):
        Settings.from_env({"HMD_CONFIG": str(config)})
