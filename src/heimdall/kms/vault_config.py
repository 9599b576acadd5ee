"""Vault provider settings: plain data, importable without the vault extra.

Settings come from ``HMD_VAULT_*`` variables (or the config file, without the secrets):

=============================  ==========================================================
``HMD_VAULT_ADDR``             comma-separated addresses of the cluster's nodes (failover order)
``HMD_VAULT_MOUNT``            Transit mount, default ``transit``
``HMD_VAULT_PATTERN``          ``datakey`` (pattern A, default) or ``transit`` (pattern B)
``HMD_VAULT_AUTH``             ``token`` (default), ``approle`` or ``kubernetes``
``HMD_VAULT_TOKEN``            token auth; ``VAULT_TOKEN`` also works (environment only)
``HMD_VAULT_ROLE_ID``          AppRole role id (environment only), or ``HMD_VAULT_ROLE_ID_FILE``
``HMD_VAULT_SECRET_ID``        AppRole secret id (environment only), or ``HMD_VAULT_SECRET_ID_FILE``
``HMD_VAULT_APPROLE_MOUNT``    default ``approle``
``HMD_VAULT_K8S_ROLE``         Kubernetes auth role
``HMD_VAULT_K8S_JWT_PATH``     service-account token, default the standard in-pod path
``HMD_VAULT_K8S_MOUNT``        default ``kubernetes``
``HMD_VAULT_NAMESPACE``        Vault Enterprise / OpenBao namespace
``HMD_VAULT_CACERT``           CA bundle for https addresses
``HMD_VAULT_TIMEOUT``          seconds per request, default 5
``HMD_VAULT_BATCH_SIZE``       items per Transit batch request, default and max 240
``HMD_VAULT_CONCURRENCY``      batch requests in flight at once per process, default 4
=============================  ==========================================================
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from heimdall.errors import ConfigurationError
from heimdall.kms.base import KEY_NAME_RULE, valid_key_name

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CONCURRENCY",
    "FILE_KEYS",
    "MAX_BATCH_SIZE",
    "SECRET_VARIABLES",
    "VaultAuthMethod",
    "VaultPattern",
    "VaultSettings",
    "vault_settings",
]

K8S_JWT_PATH = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")

# Each batch item carries 4 JSON strings (two names, two values) and OpenBao's listener refuses
# requests of over 1,000 (max_request_json_strings). The largest batch is also the fastest:
# fewer requests for the same items (bench row vault/rewrap-2000).
MAX_BATCH_SIZE: Final = 240
DEFAULT_BATCH_SIZE: Final = MAX_BATCH_SIZE
DEFAULT_CONCURRENCY: Final = 4


class VaultPattern(enum.StrEnum):
    DATAKEY = "datakey"  # pattern A: data key from Transit, data encrypted locally
    TRANSIT = "transit"  # pattern B: Transit encrypts each value itself


class VaultAuthMethod(enum.StrEnum):
    TOKEN = "token"  # noqa: S105 - the name of an auth method, not a secret
    APPROLE = "approle"
    KUBERNETES = "kubernetes"


@dataclass(frozen=True, slots=True)
class VaultSettings:
    """Connection settings. Secret values are kept out of the repr."""

    addresses: tuple[str, ...]
    mount: str = "transit"
    key_name: str = "heimdall-pii"
    auth: VaultAuthMethod = VaultAuthMethod.TOKEN
    token: str | None = field(default=None, repr=False)
    role_id: str | None = field(default=None, repr=False)
    secret_id: str | None = field(default=None, repr=False)
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    approle_mount: str = "approle"
    kubernetes_role: str | None = None
    kubernetes_jwt_path: Path = K8S_JWT_PATH
    kubernetes_mount: str = "kubernetes"
    namespace: str | None = None
    verify: bool | str = True
    timeout: float = 5.0
    attempts: int = 3
    backoff_seconds: float = 0.05
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int = DEFAULT_CONCURRENCY

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ConfigurationError("HMD_VAULT_ADDR is not set")
        for address in self.addresses:
            if not address.startswith(("http://", "https://")):
                raise ConfigurationError(
                    f"HMD_VAULT_ADDR entry {address!r} must start with http:// or https://"
                )
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ConfigurationError(f"HMD_VAULT_BATCH_SIZE must be between 1 and {MAX_BATCH_SIZE}")


FILE_KEYS: Final = frozenset(
    {
        "vault_addr",
        "vault_mount",
        "vault_key_name",
        "vault_pattern",
        "vault_auth",
        "vault_role_id_file",
        "vault_secret_id_file",
        "vault_approle_mount",
        "vault_k8s_role",
        "vault_k8s_jwt_path",
        "vault_k8s_mount",
        "vault_namespace",
        "vault_cacert",
        "vault_timeout",
        "vault_batch_size",
        "vault_concurrency",
    }
)
SECRET_VARIABLES: Final = ("HMD_VAULT_TOKEN", "HMD_VAULT_ROLE_ID", "HMD_VAULT_SECRET_ID")


def _number(name: str, value: str, low: float, high: float, kind: type[int] | type[float]) -> float:
    try:
        number = kind(value)
    except ValueError:
        raise ConfigurationError(f"HMD_{name.upper()} must be a number") from None
    if not low <= number <= high:
        raise ConfigurationError(f"HMD_{name.upper()} must be between {low:g} and {high:g}")
    return number


def _choice(name: str, value: str, kind: type[enum.StrEnum]) -> enum.StrEnum:
    try:
        return kind(value)
    except ValueError:
        allowed = "|".join(m.value for m in kind)
        raise ConfigurationError(f"HMD_{name.upper()}={value!r} is not one of {allowed}") from None


def vault_settings(
    values: Mapping[str, str], environ: Mapping[str, str], key_name: str
) -> tuple[VaultSettings, VaultPattern]:
    """Build the provider settings from ``vault_*`` values and the secret variables."""
    addresses = tuple(
        a.strip().rstrip("/") for a in values.get("vault_addr", "").split(",") if a.strip()
    )
    if not addresses and environ.get("VAULT_ADDR"):
        addresses = (environ["VAULT_ADDR"].rstrip("/"),)
    pattern = VaultPattern.DATAKEY
    if "vault_pattern" in values:
        pattern = VaultPattern(_choice("vault_pattern", values["vault_pattern"], VaultPattern))
    auth = VaultAuthMethod.TOKEN
    if "vault_auth" in values:
        auth = VaultAuthMethod(_choice("vault_auth", values["vault_auth"], VaultAuthMethod))
    paths = {
        name: Path(values[name])
        for name in ("vault_role_id_file", "vault_secret_id_file", "vault_k8s_jwt_path")
        if name in values
    }
    if values.get("vault_key_name"):
        # Vault's own key name: for a Vault that is only read while fields move to another
        # provider, whose key HMD_KMS_KEY_NAME names.
        key_name = values["vault_key_name"]
        if not valid_key_name(key_name):
            raise ConfigurationError(f"HMD_VAULT_KEY_NAME {KEY_NAME_RULE}")
    settings = VaultSettings(
        addresses=addresses,
        mount=values.get("vault_mount", "transit"),
        key_name=key_name,
        auth=auth,
        token=environ.get("HMD_VAULT_TOKEN") or environ.get("VAULT_TOKEN") or None,
        role_id=environ.get("HMD_VAULT_ROLE_ID") or None,
        secret_id=environ.get("HMD_VAULT_SECRET_ID") or None,
        role_id_file=paths.get("vault_role_id_file"),
        secret_id_file=paths.get("vault_secret_id_file"),
        approle_mount=values.get("vault_approle_mount", "approle"),
        kubernetes_role=values.get("vault_k8s_role"),
        kubernetes_jwt_path=paths.get("vault_k8s_jwt_path", K8S_JWT_PATH),
        kubernetes_mount=values.get("vault_k8s_mount", "kubernetes"),
        namespace=values.get("vault_namespace"),
        verify=values.get("vault_cacert", True),
        timeout=_number("vault_timeout", values.get("vault_timeout", "5"), 0.1, 300, float),
        batch_size=int(
            _number(
                "vault_batch_size",
                values.get("vault_batch_size", str(DEFAULT_BATCH_SIZE)),
                1,
                MAX_BATCH_SIZE,
                int,
            )
        ),
        concurrency=int(
            _number(
                "vault_concurrency",
                values.get("vault_concurrency", str(DEFAULT_CONCURRENCY)),
                1,
                32,
                int,
            )
        ),
    )
    return settings, pattern
