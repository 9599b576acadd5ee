"""Settings from ``HMD_*`` environment variables and an optional TOML file.

spec: Integration Points, ``src/config/mod.rs``. Precedence: environment, then the file named by
``HMD_CONFIG`` (keys are the variable names without the prefix, in lower case, e.g.
``encryption_mode = "hybrid"``), then defaults. The master key is never read from the file: a
secret in a config file is exactly what this product exists to remove.
"""

from __future__ import annotations

import enum
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from heimdall.api import config as api_config
from heimdall.api.config import ApiSettings
from heimdall.audit import DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_SECONDS, ForwardSink
from heimdall.errors import ConfigurationError
from heimdall.kms import aws_config, vault_config
from heimdall.kms.aws_config import AwsSettings
from heimdall.kms.base import KEY_NAME_RULE, valid_key_name
from heimdall.kms.vault_config import VaultPattern, VaultSettings
from heimdall.private_files import ConfigFile, read_config
from heimdall.rbac import Role
from heimdall.secret import SecretBytes, take_environment_variable
from heimdall.store.age_names import DEFAULT_GRAPH, GRAPH_NAME_RULE, valid_graph_name
from heimdall.types import EncryptionMode

__all__ = ["Environment", "Settings", "StoreKind", "unknown_variables"]


class Environment(enum.StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class StoreKind(enum.StrEnum):
    SQLITE = "sqlite"
    POSTGRES = "postgres"
    AGE = "age"  # PostgreSQL with Apache AGE: the fields as graph nodes (HMD_AGE_GRAPH)


KMS_PROVIDERS: Final = ("local", "vault", "aws", "gcp", "azure")

# The config file may also group these in a [key_rotation] table, as the spec does.
_ROTATION_KEYS: Final = frozenset(
    {
        "rotation_enabled",
        "rotation_cadence_days",
        "auto_reencrypt",
        "reencrypt_batch_size",
        "reencrypt_interval_seconds",
        "reencrypt_workers",
        "grace_period_days",
    }
)
_FILE_KEYS: Final = (
    frozenset(
        {
            "data_dir",
            "encryption_mode",
            "kms_provider",
            "kms_read_providers",
            "kms_key_name",
            "keyring_path",
            "store",
            "sqlite_path",
            "audit_log",
            "audit_fsync",
            "audit_checkpoint_every",
            "audit_checkpoint_seconds",
            "audit_sinks",
            "audit_sinks_required",
            "audit_syslog_address",
            "policy",
            "env",
            "role",
            "actor",
            "dek_max_uses",
            "dek_max_age_seconds",
            "ingest_batch_size",
            "postgres_pool_size",
            "age_graph",
        }
    )
    | vault_config.FILE_KEYS
    | aws_config.FILE_KEYS
    | api_config.FILE_KEYS
    | _ROTATION_KEYS
)
_PATH_SETTINGS: Final = ("data_dir", "keyring_path", "sqlite_path", "audit_log", "policy")
_FILE_SECRETS: Final = (
    "master_key",
    "vault_token",
    "vault_role_id",
    "vault_secret_id",
    "postgres_dsn",
)


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path(".heimdall")
    encryption_mode: EncryptionMode = EncryptionMode.KMS
    kms_provider: str = "local"
    # Providers that are only read: fields still under their keys decrypt, and move to
    # kms_provider's key (heimdall kms migrate). Each needs its own settings (HMD_VAULT_*, ...).
    kms_read_providers: tuple[str, ...] = ()
    kms_key_name: str = "heimdall-pii"
    keyring_path: Path | None = None
    # From the environment (Settings.from_env with os.environ): the key's base64 text in a
    # wipeable buffer, taken out of the environment. From code: the text itself.
    master_key: str | SecretBytes | None = field(default=None, repr=False)
    store: StoreKind = StoreKind.SQLITE
    sqlite_path: Path | None = None
    audit_log: Path | None = None
    audit_fsync: bool = True
    # spec: Audit Log Requirements. Keyed checkpoints and forwarding, see heimdall.audit.
    audit_checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    audit_checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS
    audit_sinks: tuple[ForwardSink, ...] = ()  # besides the file, which always stays
    audit_sinks_required: bool = True  # a sink that cannot deliver refuses the operation
    audit_syslog_address: str = "/dev/log"
    policy: Path | None = None
    env: Environment = Environment.DEVELOPMENT
    role: str | None = None
    actor: str | None = None
    dek_max_uses: int = 10_000
    dek_max_age_seconds: float = 300.0
    ingest_batch_size: int = 1000
    # spec: Key Rotation Strategy, Configuration Example (the key_rotation table).
    rotation_enabled: bool = True
    rotation_cadence_days: float = 90
    auto_reencrypt: bool = True
    reencrypt_batch_size: int = 1000
    reencrypt_interval_seconds: float = 60
    reencrypt_workers: int = 2  # threads claiming batches side by side in one process
    grace_period_days: float = 30
    postgres_dsn: str | None = field(default=None, repr=False)  # may hold a password
    postgres_pool_size: int = 8
    age_graph: str = DEFAULT_GRAPH  # HMD_STORE=age: the graph, in HMD_POSTGRES_DSN's database
    vault: VaultSettings | None = None
    aws: AwsSettings | None = None
    vault_pattern: VaultPattern = VaultPattern.DATAKEY
    api: ApiSettings = field(default_factory=ApiSettings)  # heimdall serve (HMD_API_*, HMD_OIDC_*)

    @property
    def keyring_file(self) -> Path:
        return self.keyring_path or self.data_dir / "keyring.json"

    @property
    def sqlite_file(self) -> Path:
        return self.sqlite_path or self.data_dir / "heimdall.db"

    @property
    def audit_file(self) -> Path:
        return self.audit_log or self.data_dir / "audit.log"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        config = environ.get("HMD_CONFIG")
        config_file = read_config(Path(config)) if config else None
        from_file = _parse_file(config_file) if config_file else {}
        from_env: dict[str, str] = {}
        for name in _FILE_KEYS:
            env_value = environ.get(f"HMD_{name.upper()}")
            if env_value is not None and env_value != "":
                from_env[name] = env_value
        if environ.get("HMD_ROLE") == "":
            # Unset means the local operator, who may do everything: an empty value (a
            # variable cleared by mistake, a failed substitution) must not mean the same.
            raise ConfigurationError(
                "HMD_ROLE is set but empty; name a role "
                f"({', '.join(role.value for role in Role)}) or unset it"
            )
        values = {**from_file, **from_env}
        if Environment.PRODUCTION.value in (from_file.get("env"), from_env.get("env")):
            # Production is sticky: the environment cannot take back what the file says.
            values["env"] = Environment.PRODUCTION.value
            _production_rules(config_file, from_file, from_env)
        master_key: str | SecretBytes | None
        if environ is os.environ:
            # Read once and never again: see take_environment_variable.
            master_key = take_environment_variable("HMD_MASTER_KEY")
        else:
            master_key = environ.get("HMD_MASTER_KEY") or None
        if environ.get("HMD_POSTGRES_DSN"):
            values["postgres_dsn"] = environ["HMD_POSTGRES_DSN"]
        vault_values = {k: values.pop(k) for k in list(values) if k in vault_config.FILE_KEYS}
        aws_values = {k: values.pop(k) for k in list(values) if k in aws_config.FILE_KEYS}
        api_values = {k: values.pop(k) for k in list(values) if k in api_config.FILE_KEYS}
        settings = _build(values, master_key)
        settings = replace(settings, api=api_config.api_settings(api_values))
        if settings.kms_provider in settings.kms_read_providers:
            raise ConfigurationError(
                f"HMD_KMS_READ_PROVIDERS names {settings.kms_provider}, which HMD_KMS_PROVIDER "
                "already names: list only the providers fields are moving away from"
            )
        providers = (settings.kms_provider, *settings.kms_read_providers)
        if "aws" in providers:
            # A reader's alias (HMD_AWS_KEY) may name another key than the one written under.
            named = "kms_key_name" in values and settings.kms_provider == "aws"
            aws = aws_config.aws_settings(aws_values, settings.kms_key_name, named=named)
            settings = replace(settings, aws=aws)
            if settings.kms_provider == "aws":
                settings = replace(settings, kms_key_name=aws.key_name)
        if "vault" in providers:
            vault, pattern = vault_config.vault_settings(
                vault_values, environ, settings.kms_key_name
            )
            settings = replace(settings, vault=vault)
            if settings.kms_provider == "vault":
                settings = replace(settings, vault_pattern=pattern)
        return settings


# Variables heimdall reads outside Settings, or that its test suite reads.
_OTHER_VARIABLES: Final = frozenset(
    {
        "HMD_CONFIG",
        "HMD_MASTER_KEY",
        "HMD_DEBUG",
        "HMD_POSTGRES_DSN",
        *vault_config.SECRET_VARIABLES,
    }
)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """HMD_* variables that no setting reads: most likely typos, which would go unnoticed."""
    known = {f"HMD_{name.upper()}" for name in _FILE_KEYS} | _OTHER_VARIABLES
    return sorted(
        name
        for name in environ
        if name.startswith("HMD_") and name not in known and not name.startswith("HMD_TEST_")
    )


# What decides who the caller is and where its audit trail goes. In production only the config
# file the service owns sets these, never the caller's environment. spec: Access Control Model,
# Audit Log Requirements.
def _caller_proof(name: str) -> bool:
    return name == "role" or name.startswith("audit_")


def _production_rules(
    config: ConfigFile | None, from_file: Mapping[str, str], from_env: Mapping[str, str]
) -> None:
    """With HMD_ENV=production: the role and every audit setting come from a config file that
    only its owner (root or the user running heimdall) can change; the environment may not set
    them. The file must name the audit log itself: else the data dir, which the environment
    may set, would decide where the trail goes."""
    for name in sorted(from_env):
        if _caller_proof(name):
            raise ConfigurationError(
                f"HMD_{name.upper()} is set in the environment, but with HMD_ENV=production "
                "the role and the audit settings come only from the config file the service "
                "owns (HMD_CONFIG); unset it"
            )
    if not config:
        raise ConfigurationError(
            "HMD_ENV=production needs HMD_CONFIG: the role and the audit settings come from "
            "a config file the service owns"
        )
    config.require_owned()
    if "role" not in from_file:
        raise ConfigurationError(
            f"config file {config.path} names no role; with HMD_ENV=production every caller "
            f"has one (role = one of {', '.join(role.value for role in Role)})"
        )
    if "audit_log" not in from_file:
        raise ConfigurationError(
            f"config file {config.path} names no audit_log; with HMD_ENV=production the "
            'trail\'s place comes from it (audit_log = "/var/log/heimdall/audit.log")'
        )


def _parse_file(config: ConfigFile) -> dict[str, str]:
    path = config.path
    try:
        doc = tomllib.loads(config.data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigurationError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {path} is not valid TOML: {exc}") from None
    rotation = doc.pop("key_rotation", None)
    if rotation is not None:
        if not isinstance(rotation, dict):
            raise ConfigurationError(f"config file {path}: key_rotation must be a table")
        for key, value in rotation.items():
            name = {"enabled": "rotation_enabled", "cadence_days": "rotation_cadence_days"}.get(
                key, key
            )
            if name not in _ROTATION_KEYS:
                raise ConfigurationError(f"config file {path}: unknown key_rotation.{key}")
            doc[name] = value
    for secret in _FILE_SECRETS:
        if secret in doc:
            raise ConfigurationError(
                f"config file {path} holds {secret}; secrets belong in the environment "
                f"(HMD_{secret.upper()}) or a KMS, never in a file"
            )
    unknown = sorted(set(doc) - _FILE_KEYS)
    if unknown:
        raise ConfigurationError(f"config file {path} has unknown setting {unknown[0]!r}")
    for key, value in doc.items():
        # A table or array would otherwise become its repr, e.g. a data_dir named "{'a': 1}".
        if not isinstance(value, str | int | float):
            raise ConfigurationError(
                f"config file {path}: {key} must be a string, number or boolean, "
                f"not a {type(value).__name__}"
            )
    return {
        key: str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in doc.items()
    }


def _choice(name: str, value: str, enum_type: type[enum.StrEnum]) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        allowed = "|".join(member.value for member in enum_type)
        raise ConfigurationError(f"HMD_{name.upper()}={value!r} is not one of {allowed}") from None


def _number(name: str, value: str, kind: type[int] | type[float], low: float, high: float) -> Any:
    try:
        number = kind(value)
    except ValueError:
        raise ConfigurationError(f"HMD_{name.upper()} must be a number, not {value!r}") from None
    if not low <= number <= high:
        # int bounds as ints: "{:g}" would print 2**24 as 1.67772e+07.
        bounds = (f"{low:g}", f"{high:g}") if kind is float else (f"{low:.0f}", f"{high:.0f}")
        raise ConfigurationError(f"HMD_{name.upper()} must be between {bounds[0]} and {bounds[1]}")
    return number


def _flag(name: str, value: str) -> bool:
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"HMD_{name.upper()} must be true or false, not {value!r}")


# Settings whose value is one of a closed set. A role stays a str on Settings (Role is a StrEnum).
_CHOICES: Final[dict[str, type[enum.StrEnum]]] = {
    "encryption_mode": EncryptionMode,
    "store": StoreKind,
    "env": Environment,
    "role": Role,
}


def _kms_provider(name: str, value: str) -> str:
    if value not in KMS_PROVIDERS:
        raise ConfigurationError(
            f"HMD_KMS_PROVIDER={value!r} is not one of {'|'.join(KMS_PROVIDERS)}"
        )
    return value


def _kms_read_providers(name: str, value: str) -> tuple[str, ...]:
    words = [word.strip() for word in value.split(",") if word.strip()]
    for word in words:
        if word not in KMS_PROVIDERS:
            raise ConfigurationError(
                f"HMD_KMS_READ_PROVIDERS names {word!r}, not one of {'|'.join(KMS_PROVIDERS)}"
            )
    return tuple(dict.fromkeys(words))


def _key_name(name: str, value: str) -> str:
    # Checked before anything is created under the name (a keyring, a Transit key).
    if not valid_key_name(value):
        raise ConfigurationError(f"HMD_{name.upper()} {KEY_NAME_RULE}")
    return value


def _graph_name(name: str, value: str) -> str:
    # AGE takes it only as a literal in the SQL text: checked before anything connects.
    if not valid_graph_name(value):
        raise ConfigurationError(f"HMD_{name.upper()}={value!r} {GRAPH_NAME_RULE}")
    return value


def _audit_sinks(name: str, value: str) -> tuple[ForwardSink, ...]:
    words = [word.strip() for word in value.split(",") if word.strip()]
    return tuple(dict.fromkeys(_choice(name, word, ForwardSink) for word in words))


def _bounded(kind: type[int] | type[float], low: float, high: float) -> Callable[[str, str], Any]:
    return lambda name, value: _number(name, value, kind, low, high)


# How each non-text setting is read from its string form.
_PARSERS: Final[dict[str, Callable[[str, str], Any]]] = {
    **{name: lambda _, value: Path(value) for name in _PATH_SETTINGS},
    "kms_provider": _kms_provider,
    "kms_read_providers": _kms_read_providers,
    "kms_key_name": _key_name,
    "dek_max_uses": _bounded(int, 1, 2**24),
    "dek_max_age_seconds": _bounded(float, 0.001, 86_400),
    "ingest_batch_size": _bounded(int, 1, 100_000),
    "postgres_pool_size": _bounded(int, 1, 256),
    "age_graph": _graph_name,
    "reencrypt_batch_size": _bounded(int, 1, 100_000),
    "reencrypt_interval_seconds": _bounded(float, 0, 86_400),
    "reencrypt_workers": _bounded(int, 1, 64),
    "rotation_cadence_days": _bounded(float, 0, 36_500),
    "grace_period_days": _bounded(float, 0, 36_500),
    "audit_fsync": _flag,
    "audit_checkpoint_every": _bounded(int, 1, 1_000_000),
    "audit_checkpoint_seconds": _bounded(float, 0.001, 86_400),
    "audit_sinks": _audit_sinks,
    "audit_sinks_required": _flag,
    "rotation_enabled": _flag,
    "auto_reencrypt": _flag,
}


def _build(values: dict[str, str], master_key: str | SecretBytes | None) -> Settings:
    kwargs: dict[str, Any] = {"master_key": master_key}
    for name, value in values.items():
        if name in _CHOICES:
            kwargs[name] = _choice(name, value, _CHOICES[name])
        elif name in _PARSERS:
            kwargs[name] = _PARSERS[name](name, value)
        else:
            kwargs[name] = value
    return Settings(**kwargs)
