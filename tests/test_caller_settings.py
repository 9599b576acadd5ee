"""Who the CLI caller is and where its audit trail goes, and what the caller may not choose.

With HMD_ENV=production the role and every audit setting come from the config file the service
owns; the caller's environment cannot set them, unset production, or point the trail elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli_runner import Cli, assert_one_line_error
from heimdall.app import build
from heimdall.audit import JsonlAuditLog
from heimdall.errors import ConfigurationError
from heimdall.settings import Environment, Settings

OTHER_UID = 65534


def _production_config(
    tmp_path: Path, extra: str = "", *, role: str | None = "heimdall-app"
) -> Path:
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755, exist_ok=True)
    path = directory / "heimdall.toml"
    lines = [
        'env = "production"',
        f'data_dir = "{tmp_path / "data"}"',
        f'audit_log = "{tmp_path / "data" / "audit.log"}"',
    ]
    if role is not None:
        lines.append(f'role = "{role}"')
    path.write_text("\n".join([*lines, extra]) + "\n", encoding="utf-8")
    path.chmod(0o644)
    return path


def _refused(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigurationError) as excinfo:
        Settings.from_env(environ)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_an_empty_role_is_an_error_not_the_operator() -> None:
    message = _refused({"HMD_ROLE": ""})
    assert "HMD_ROLE is set but empty" in message


def test_an_unset_role_is_the_local_operator_in_development() -> None:
    assert Settings.from_env({}).role is None


def test_production_takes_the_role_from_the_config_file(tmp_path: Path) -> None:
    config = _production_config(tmp_path)
    settings = Settings.from_env({"HMD_CONFIG": str(config)})
    assert settings.env is Environment.PRODUCTION
    assert settings.role == "heimdall-app"


@pytest.mark.parametrize(
    "variable", ["HMD_ROLE", "HMD_AUDIT_LOG", "HMD_AUDIT_FSYNC"], ids=str.lower
)
def test_production_refuses_the_role_and_audit_settings_from_the_environment(
    tmp_path: Path, variable: str
) -> None:
    config = _production_config(tmp_path)
    value = {"HMD_ROLE": "heimdall-admin", "HMD_AUDIT_FSYNC": "false"}.get(
        variable, str(tmp_path / "elsewhere.log")
    )
    message = _refused({"HMD_CONFIG": str(config), variable: value})
    assert message.startswith(f"{variable} is set in the environment")


def test_production_set_in_the_environment_also_needs_the_config_file() -> None:
    message = _refused({"HMD_ENV": "production"})
    assert "HMD_ENV=production needs HMD_CONFIG" in message


def test_production_in_the_config_file_cannot_be_unset_by_the_environment(
    tmp_path: Path,
) -> None:
    config = _production_config(tmp_path)
    settings = Settings.from_env({"HMD_CONFIG": str(config), "HMD_ENV": "development"})
    assert settings.env is Environment.PRODUCTION
    message = _refused(
        {"HMD_CONFIG": str(config), "HMD_ENV": "development", "HMD_ROLE": "heimdall-admin"}
    )
    assert message.startswith("HMD_ROLE is set in the environment")


def test_production_needs_the_audit_log_named_in_the_config_file(tmp_path: Path) -> None:
    """Else HMD_DATA_DIR, which the environment may set, would move the trail."""
    config = _production_config(tmp_path)
    config.write_text(
        "\n".join(line for line in config.read_text().splitlines() if "audit_log" not in line),
        encoding="utf-8",
    )
    message = _refused({"HMD_CONFIG": str(config), "HMD_DATA_DIR": str(tmp_path / "evil")})
    assert "names no audit_log" in message


def test_production_reads_and_checks_the_same_config_file(tmp_path: Path) -> None:
    """A config reached through a symlink is checked on what was read, not looked up again."""
    real = _production_config(tmp_path)
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    assert Settings.from_env({"HMD_CONFIG": str(link)}).role == "heimdall-app"
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    planted = loose / "heimdall.toml"
    planted.write_text(real.read_text(), encoding="utf-8")
    link.unlink()
    link.symlink_to(planted)
    message = _refused({"HMD_CONFIG": str(link)})
    assert f"directory {loose}" in message and "writable by group or others" in message


def test_production_needs_a_role_in_the_config_file(tmp_path: Path) -> None:
    config = _production_config(tmp_path, role=None)
    message = _refused({"HMD_CONFIG": str(config)})
    assert "names no role" in message


@pytest.mark.parametrize("target", ["file", "directory"])
def test_production_refuses_a_config_file_others_can_change(tmp_path: Path, target: str) -> None:
    config = _production_config(tmp_path)
    (config if target == "file" else config.parent).chmod(0o777 if target == "directory" else 0o666)
    message = _refused({"HMD_CONFIG": str(config)})
    assert "writable by group or others" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_production_refuses_a_config_file_of_another_user(tmp_path: Path) -> None:
    config = _production_config(tmp_path)
    os.chown(config, OTHER_UID, OTHER_UID)
    message = _refused({"HMD_CONFIG": str(config)})
    assert f"belongs to uid {OTHER_UID}" in message


def test_a_store_opened_in_production_stays_production(tmp_path: Path) -> None:
    config = _production_config(tmp_path)
    production = Settings.from_env({"HMD_CONFIG": str(config)})
    build(production).close()
    development = Settings(data_dir=production.data_dir)
    with pytest.raises(ConfigurationError, match="marked production"):
        build(development)


# -- every command checks its permission and audits ------------------------------------------


@pytest.mark.parametrize(
    "command",
    [("reencrypt", "status"), ("migrate", "status"), ("status",)],
    ids=["reencrypt-status", "migrate-status", "status"],
)
def test_status_commands_check_the_role_and_audit_a_refusal(
    cli: Cli, command: tuple[str, ...]
) -> None:
    cli.ok("status")  # creates the store
    line = assert_one_line_error(cli.run(*command, env={"HMD_ROLE": "heimdall-audit"}))
    assert "role heimdall-audit may not read status" in line
    events = [
        e
        for e in JsonlAuditLog(cli.data_dir / "audit.log")
        if e["event_type"] != "audit.checkpoint"
    ]
    assert [(e["event_type"], e["operation"]) for e in events] == [("access.denied", "read_status")]


def test_kms_check_is_audited(cli: Cli) -> None:
    cli.ok("kms", "check")
    events = list(JsonlAuditLog(cli.data_dir / "audit.log"))
    checks = [e for e in events if e["event_type"] == "kms.check"]
    assert [(e["result"], e["operation"]) for e in checks] == [("success", "kms check local")]
    assert checks[0]["actor"].startswith("cli:")


def test_the_audit_commands_of_a_production_store_need_production_too(
    cli: Cli, tmp_path: Path
) -> None:
    config = _production_config(tmp_path, 'audit_fsync = false\nrole = "heimdall-audit"', role=None)
    env = {"HMD_CONFIG": str(config), "HMD_AUDIT_FSYNC": "", "HMD_DATA_DIR": ""}
    assert cli.run("audit", "verify", env=env).returncode == 0
    line = assert_one_line_error(
        cli.run("audit", "tail", env={"HMD_DATA_DIR": str(tmp_path / "data")})
    )
    assert "this store is marked production" in line
