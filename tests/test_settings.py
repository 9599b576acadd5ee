"""Settings.from_env: defaults, HMD_* variables, the HMD_CONFIG file and their precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from heimdall.errors import ConfigurationError
from heimdall.settings import Environment, Settings, StoreKind, unknown_variables
from heimdall.types import EncryptionMode

MASTER_KEY = "c2VjcmV0LWtleS1tYXRlcmlhbC0zMi1ieXRlcy0hISE="


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "heimdall.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _refusal(environ: dict[str, str]) -> str:
    """The message of the ConfigurationError that *environ* raises; checks it is one sentence."""
    with pytest.raises(ConfigurationError) as excinfo:
        Settings.from_env(environ)
    message = str(excinfo.value)
    assert message
    assert "\n" not in message
    assert message.count(". ") == 0, f"more than one sentence: {message}"
    return message


def test_from_env_without_variables_gives_the_embedded_defaults() -> None:
    settings = Settings.from_env({})

    assert settings == Settings()
    assert settings.data_dir == Path(".heimdall")
    assert settings.encryption_mode is EncryptionMode.KMS
    assert settings.kms_provider == "local"
    assert settings.kms_key_name == "heimdall-pii"
    assert settings.store is StoreKind.SQLITE
    assert settings.env is Environment.DEVELOPMENT
    assert settings.master_key is None
    assert settings.audit_fsync is True
    assert settings.policy is None
    assert settings.role is None
    assert settings.actor is None
    assert settings.dek_max_uses == 10_000
    assert settings.dek_max_age_seconds == 300.0
    assert settings.ingest_batch_size == 1000


def test_default_files_live_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings.from_env({"HMD_DATA_DIR": str(tmp_path)})

    assert settings.keyring_file == tmp_path / "keyring.json"
    assert settings.sqlite_file == tmp_path / "heimdall.db"
    assert settings.audit_file == tmp_path / "audit.log"


def test_explicit_paths_override_the_data_dir_files(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "HMD_DATA_DIR": str(tmp_path / "data"),
            "HMD_KEYRING_PATH": str(tmp_path / "k.json"),
            "HMD_SQLITE_PATH": str(tmp_path / "s.db"),
            "HMD_AUDIT_LOG": str(tmp_path / "a.log"),
        }
    )

    assert settings.keyring_file == tmp_path / "k.json"
    assert settings.sqlite_file == tmp_path / "s.db"
    assert settings.audit_file == tmp_path / "a.log"


def test_hmd_variables_override_every_default(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "HMD_DATA_DIR": str(tmp_path),
            "HMD_ENCRYPTION_MODE": "hybrid",
            "HMD_KMS_PROVIDER": "vault",
            "HMD_VAULT_ADDR": "http://127.0.0.1:8200",
            "HMD_VAULT_TOKEN": "t",
            "HMD_KMS_KEY_NAME": "pii-2",
            "HMD_STORE": "sqlite",
            "HMD_AUDIT_FSYNC": "off",
            "HMD_POLICY": str(tmp_path / "policy.toml"),
            "HMD_ROLE": "heimdall-admin",
            "HMD_ACTOR": "ops:bob",
            "HMD_DEK_MAX_USES": "7",
            "HMD_DEK_MAX_AGE_SECONDS": "1.5",
            "HMD_INGEST_BATCH_SIZE": "20",
            "HMD_MASTER_KEY": MASTER_KEY,
        }
    )

    assert settings.data_dir == tmp_path
    assert settings.encryption_mode is EncryptionMode.HYBRID
    assert settings.kms_provider == "vault"
    assert settings.kms_key_name == "pii-2"
    assert settings.store is StoreKind.SQLITE
    assert settings.audit_fsync is False
    assert settings.policy == tmp_path / "policy.toml"
    assert settings.role == "heimdall-admin"
    assert settings.actor == "ops:bob"
    assert settings.dek_max_uses == 7
    assert settings.dek_max_age_seconds == 1.5
    assert settings.ingest_batch_size == 20
    assert settings.master_key == MASTER_KEY


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_audit_fsync_accepts_the_usual_spellings(text: str, expected: bool) -> None:
    assert Settings.from_env({"HMD_AUDIT_FSYNC": text}).audit_fsync is expected


def test_empty_variables_count_as_unset() -> None:
    settings = Settings.from_env(
        {"HMD_ENCRYPTION_MODE": "", "HMD_MASTER_KEY": "", "HMD_CONFIG": ""}
    )

    assert settings.encryption_mode is EncryptionMode.KMS
    assert settings.master_key is None


def test_master_key_is_not_in_the_repr() -> None:
    settings = Settings.from_env({"HMD_MASTER_KEY": MASTER_KEY})

    assert MASTER_KEY not in repr(settings)


def test_config_file_sets_values(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        f"""
        data_dir = "{tmp_path / "from-file"}"
        encryption_mode = "hybrid"
        kms_key_name = "file-key"
        audit_fsync = false
        dek_max_uses = 42
        dek_max_age_seconds = 2.5
        ingest_batch_size = 9
        env = "production"
        role = "heimdall-app"
        audit_log = "{tmp_path / "trail" / "audit.log"}"
        """,
    )

    settings = Settings.from_env({"HMD_CONFIG": str(config)})

    assert settings.data_dir == tmp_path / "from-file"
    assert settings.encryption_mode is EncryptionMode.HYBRID
    assert settings.kms_key_name == "file-key"
    assert settings.audit_fsync is False
    assert settings.dek_max_uses == 42
    assert settings.dek_max_age_seconds == 2.5
    assert settings.ingest_batch_size == 9
    assert settings.env is Environment.PRODUCTION
    assert settings.role == "heimdall-app"


def test_environment_wins_over_the_file_and_the_file_over_defaults(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        """
        encryption_mode = "hybrid"
        kms_key_name = "file-key"
        ingest_batch_size = 9
        """,
    )

    settings = Settings.from_env(
        {"HMD_CONFIG": str(config), "HMD_ENCRYPTION_MODE": "legacy", "HMD_INGEST_BATCH_SIZE": "3"}
    )

    assert settings.encryption_mode is EncryptionMode.LEGACY  # env over file
    assert settings.ingest_batch_size == 3  # env over file
    assert settings.kms_key_name == "file-key"  # file over default
    assert settings.dek_max_uses == 10_000  # default: named nowhere


def test_config_file_holding_master_key_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, f'master_key = "{MASTER_KEY}"\n')

    message = _refusal({"HMD_CONFIG": str(config)})

    assert "master_key" in message
    assert MASTER_KEY not in message


def test_config_file_with_an_unknown_setting_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, 'encryption_mode = "kms"\nencrytion_mode = "kms"\n')

    message = _refusal({"HMD_CONFIG": str(config)})

    assert "'encrytion_mode'" in message


def test_config_file_setting_that_is_a_table_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, "[data_dir]\npath = '/srv'\n")

    message = _refusal({"HMD_CONFIG": str(config)})

    assert "data_dir" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b'encryption_mode = "kms', "not valid TOML"), (b"\xff\xfe = 1\n", "not UTF-8")],
)
def test_config_file_that_cannot_be_parsed_is_refused(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    config = tmp_path / "broken.toml"
    config.write_bytes(content)

    message = _refusal({"HMD_CONFIG": str(config)})

    assert expected in message
    assert str(config) in message


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    message = _refusal({"HMD_CONFIG": str(tmp_path / "absent.toml")})

    assert "cannot be read" in message


def test_bad_value_in_the_config_file_names_the_setting(tmp_path: Path) -> None:
    config = _config(tmp_path, "dek_max_uses = 0\n")

    message = _refusal({"HMD_CONFIG": str(config)})

    assert "DEK_MAX_USES" in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HMD_ENCRYPTION_MODE", "envelope"),
        ("HMD_STORE", "postgres-ish"),
        ("HMD_ENV", "prod"),
        ("HMD_KMS_PROVIDER", "hsm"),
        ("HMD_ROLE", "heimdall-root"),
        ("HMD_AUDIT_FSYNC", "sometimes"),
        ("HMD_DEK_MAX_USES", "many"),
        ("HMD_DEK_MAX_USES", "0"),
        ("HMD_DEK_MAX_USES", "1.5"),
        ("HMD_DEK_MAX_USES", str(2**24 + 1)),
        ("HMD_DEK_MAX_AGE_SECONDS", "soon"),
        ("HMD_DEK_MAX_AGE_SECONDS", "0"),
        ("HMD_DEK_MAX_AGE_SECONDS", "nan"),
        ("HMD_DEK_MAX_AGE_SECONDS", "inf"),
        ("HMD_INGEST_BATCH_SIZE", "-1"),
        ("HMD_INGEST_BATCH_SIZE", "100001"),
    ],
)
def test_bad_value_is_refused_naming_the_variable(variable: str, value: str) -> None:
    message = _refusal({variable: value})

    assert variable in message


def test_out_of_range_message_states_integer_bounds_exactly() -> None:
    message = _refusal({"HMD_DEK_MAX_USES": "0"})

    assert message == f"HMD_DEK_MAX_USES must be between 1 and {2**24}"


def test_unknown_hmd_variables_are_reported_as_likely_typos() -> None:
    environ = {
        "HMD_ENCRYPTON_MODE": "hybrid",
        "HMD_DATA_DIR": "data",
        "HMD_MASTER_KEY": "k",
        "HMD_TEST_POSTGRES_DSN": "postgresql://",
        "HOME": "/root",
    }
    assert unknown_variables(environ) == ["HMD_ENCRYPTON_MODE"]


def test_vault_settings_from_variables() -> None:
    settings = Settings.from_env(
        {
            "HMD_KMS_PROVIDER": "vault",
            "HMD_VAULT_ADDR": "http://127.0.0.1:8200, http://127.0.0.1:8202/",
            "HMD_VAULT_PATTERN": "transit",
            "HMD_VAULT_AUTH": "approle",
            "HMD_VAULT_ROLE_ID": "role-id-value",
            "HMD_VAULT_SECRET_ID_FILE": "/run/secrets/secret-id",
            "HMD_VAULT_BATCH_SIZE": "100",
        }
    )
    vault = settings.vault
    assert vault is not None
    assert vault.addresses == ("http://127.0.0.1:8200", "http://127.0.0.1:8202")
    assert settings.vault_pattern.value == "transit"
    assert vault.auth.value == "approle"
    assert vault.batch_size == 100
    assert vault.secret_id_file == Path("/run/secrets/secret-id")
    assert "role-id-value" not in repr(settings)


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, "HMD_VAULT_ADDR is not set"),
        ({"HMD_VAULT_ADDR": "127.0.0.1:8200"}, "must start with http"),
        ({"HMD_VAULT_ADDR": "http://a", "HMD_VAULT_PATTERN": "x"}, "HMD_VAULT_PATTERN"),
        ({"HMD_VAULT_ADDR": "http://a", "HMD_VAULT_BATCH_SIZE": "1000"}, "HMD_VAULT_BATCH_SIZE"),
    ],
)
def test_bad_vault_settings_are_refused(variables: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigurationError, match=expected):
        Settings.from_env({"HMD_KMS_PROVIDER": "vault", **variables})


def test_vault_secrets_are_refused_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "heimdall.toml"
    config.write_text('kms_provider = "vault"\nvault_token = "s.abc"\n', encoding="utf-8")
    with pytest.raises(ConfigurationError, match="vault_token") as caught:
        Settings.from_env({"HMD_CONFIG": str(config)})
    assert "s.abc" not in str(caught.value)


def test_key_rotation_table_sets_the_spec_settings(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        "[key_rotation]\nenabled = false\ncadence_days = 30\nauto_reencrypt = false\n"
        "reencrypt_batch_size = 500\nreencrypt_interval_seconds = 5\nreencrypt_workers = 3\n"
        "grace_period_days = 7\n",
    )

    settings = Settings.from_env({"HMD_CONFIG": str(config)})

    assert (settings.rotation_enabled, settings.rotation_cadence_days) == (False, 30)
    assert settings.auto_reencrypt is False
    assert (settings.reencrypt_batch_size, settings.reencrypt_interval_seconds) == (500, 5)
    assert (settings.reencrypt_workers, settings.grace_period_days) == (3, 7)


def test_key_rotation_defaults_and_the_environment() -> None:
    defaults = Settings.from_env({})
    assert (defaults.rotation_cadence_days, defaults.grace_period_days) == (90, 30)
    assert (defaults.reencrypt_batch_size, defaults.reencrypt_workers) == (1000, 2)

    assert Settings.from_env({"HMD_REENCRYPT_WORKERS": "4"}).reencrypt_workers == 4


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_reencrypt_workers_out_of_range_is_refused(value: str) -> None:
    message = _refusal({"HMD_REENCRYPT_WORKERS": value})

    assert "HMD_REENCRYPT_WORKERS" in message


def test_unknown_key_rotation_key_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, "[key_rotation]\ncadense_days = 30\n")

    assert "key_rotation.cadense_days" in _refusal({"HMD_CONFIG": str(config)})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"HMD_KMS_READ_PROVIDERS": "vault,elsewhere"}, "names 'elsewhere', not one of"),
        ({"HMD_KMS_PROVIDER": "local", "HMD_KMS_READ_PROVIDERS": "local"}, "already names"),
        ({"HMD_VAULT_KEY_NAME": "bad name", "HMD_KMS_READ_PROVIDERS": "vault"}, "VAULT_KEY_NAME"),
    ],
)
def test_read_providers_are_checked(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(environ)


def test_each_read_provider_gets_its_own_settings() -> None:
    settings = Settings.from_env(
        {
            "HMD_KMS_PROVIDER": "local",
            "HMD_KMS_READ_PROVIDERS": " vault , aws,vault",
            "HMD_VAULT_ADDR": "http://127.0.0.1:1",
            "HMD_VAULT_KEY_NAME": "old-pii",
            "HMD_AWS_REGION": "eu-west-1",
            "HMD_AWS_KEY": "alias/other-pii",
        }
    )

    assert settings.kms_read_providers == ("vault", "aws")
    assert settings.vault is not None and settings.vault.key_name == "old-pii"
    # A reader's alias may differ from HMD_KMS_KEY_NAME: it names the key the fields are under.
    assert settings.aws is not None and settings.aws.key_name == "other-pii"
    assert settings.kms_key_name == "heimdall-pii"
