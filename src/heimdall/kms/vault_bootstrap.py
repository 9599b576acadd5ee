"""Idempotent Vault/OpenBao set-up for heimdall: the transit key, the role policies, AppRole.

spec: Access Control Model (Vault Policy Example, Role-Based Access) and Authentication Methods
(AppRole for VM-based deployments). :func:`bootstrap` makes a server ready for the Vault
provider and may be run again at any time: it changes only what differs from the wanted state
and reports every step, changed or not.

Security properties:

- The transit key is created ``aes256-gcm96``, ``derived``, not exportable and without plaintext
  backup. heimdall binds each field's encryption context through key derivation (every datakey,
  encrypt, decrypt and rewrap call passes ``context``). None of these can be changed on an
  existing key, so a key that differs is refused with :class:`ConfigurationError`, never used.
- Beside it, the audit key ``<key_name>-audit`` (:mod:`heimdall.kms.vault_audit`) is created of
  type ``hmac``, not exportable and without plaintext backup: it authenticates the audit trail's
  checkpoints through Transit's ``hmac`` and ``verify`` and can do nothing else. An existing one
  of another type, or exportable, is refused likewise.
- Each role gets exactly its policy (``vault_policies/<role>.hcl``, shipped in the package), and
  every policy denies export, backup and trim of both keys: a deny wins over any grant. The
  roles that write audit events (app, worker, admin) may ``hmac`` with the audit key, the roles
  that check the trail (admin, audit) may ``verify`` with it.
- No token, role-id or secret-id is returned, logged or put in a message. hvac's errors are
  translated at this boundary into :mod:`heimdall.errors` with messages written here.

Only :func:`bootstrap` needs hvac; :func:`policy_text` and :func:`credential_instructions` work
without it.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import re
import shlex
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from heimdall.errors import (
    AccessDenied,
    ConfigurationError,
    KmsError,
    KmsUnavailable,
)
from heimdall.kms.vault_audit import audit_key_name

if TYPE_CHECKING:
    import hvac

__all__ = ["ROLES", "BootstrapReport", "bootstrap", "credential_instructions", "policy_text"]

ROLES: tuple[str, ...] = ("heimdall-app", "heimdall-worker", "heimdall-admin", "heimdall-audit")

KEY_TYPE: Final = "aes256-gcm96"
_KEY_SUMMARY: Final = f"{KEY_TYPE}, derived, not exportable"
AUDIT_KEY_TYPE: Final = "hmac"
_AUDIT_KEY_SIZE: Final = 32
_AUDIT_KEY_SUMMARY: Final = f"{AUDIT_KEY_TYPE}, not exportable"
_PROVIDER: Final = "vault"

_HOUR: Final = 3600
# Sent as seconds, which is also how Vault reads them back, so "unchanged" is a plain equality.
_ROLE_SETTINGS: Final[dict[str, object]] = {
    "bind_secret_id": True,
    "token_type": "service",
    "token_ttl": 1 * _HOUR,
    "token_max_ttl": 4 * _HOUR,
    "secret_id_ttl": 24 * _HOUR,
}
_ROLE_SUMMARY: Final = "service tokens for 1h up to 4h, secret-ids valid 24h"

_ROLE_PURPOSE: Final = {
    "heimdall-app": "application instances: encrypt, decrypt, data keys, read key metadata",
    "heimdall-worker": "enrichment workers: decrypt only",
    "heimdall-admin": "key lifecycle: rotate, configure, rewrap, list audit devices",
    "heimdall-audit": "compliance review: list audit devices",
}

# The written defaults, replaced in one pass (so a mount named after the key, or the reverse,
# is not rewritten twice). The .hcl files use "transit/" only as the mount prefix and
# "heimdall-pii" only as the key name; deploy/vault/README.md states the rule.
_DEFAULT_NAMES: Final = re.compile(r"transit/|heimdall-pii")
# Vault's own rules, narrowed so a name can never be a policy glob (* or +) or break HCL quoting.
_SEGMENT: Final = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_MOUNT_PATH: Final = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
_KEY_NAME: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.@-]*[A-Za-z0-9_])?")


@dataclass(frozen=True, slots=True)
class BootstrapReport:
    """What :func:`bootstrap` found and did: one human-readable line per step, in order."""

    mount: str
    key_name: str
    approle_mount: str
    actions: tuple[str, ...]
    roles: tuple[str, ...]


def policy_text(role: str, *, mount: str = "transit", key_name: str = "heimdall-pii") -> str:
    """The policy of ``role`` for the key ``key_name`` on the transit mount ``mount``.

    Read from the package data ``heimdall/kms/vault_policies/<role>.hcl`` (deploy/vault holds
    byte-identical copies); with the defaults the text is returned unchanged.
    """
    if role not in ROLES:
        raise ConfigurationError(f"Vault role must be one of {', '.join(ROLES)}")
    mount = _mount_path(mount, "transit mount")
    _check_key_name(key_name)
    policies = importlib.resources.files("heimdall.kms").joinpath("vault_policies")
    text = policies.joinpath(f"{role}.hcl").read_text(encoding="utf-8")
    names = {"transit/": f"{mount}/", "heimdall-pii": key_name}
    return _DEFAULT_NAMES.sub(lambda match: names[match.group()], text)


def bootstrap(
    client: hvac.Client,
    *,
    mount: str = "transit",
    key_name: str = "heimdall-pii",
    approle_mount: str = "approle",
) -> BootstrapReport:
    """Bring the server to the wanted state: transit, the key and its audit key, four
    policies, AppRole roles.

    Idempotent: each step first reads, then writes only what is missing or differs (a second
    run reports every step as existing or unchanged). ``client`` needs a token that may manage
    mounts, policies and auth methods (root, or an operator policy). An existing key that is
    not derived, is exportable, allows plaintext backup, is convergent or of another type
    raises :class:`ConfigurationError`; Vault errors raise :class:`AccessDenied`,
    :class:`KmsUnavailable` (retryable) or another :class:`KmsError`.
    """
    mount = _mount_path(mount, "transit mount")
    approle_mount = _mount_path(approle_mount, "AppRole mount")
    policies = {role: policy_text(role, mount=mount, key_name=key_name) for role in ROLES}
    actions = [
        _ensure_mount(client, mount, "transit", auth=False),
        _ensure_key(client, mount, key_name),
        _ensure_audit_key(client, mount, audit_key_name(key_name)),
        *(_ensure_policy(client, role, policies[role]) for role in ROLES),
        _ensure_mount(client, approle_mount, "approle", auth=True),
        *(_ensure_role(client, role, approle_mount) for role in ROLES),
    ]
    return BootstrapReport(
        mount=mount,
        key_name=key_name,
        approle_mount=approle_mount,
        actions=tuple(actions),
        roles=ROLES,
    )


def credential_instructions(report: BootstrapReport, addr: str) -> list[str]:
    """Shell lines that fetch each role's role-id and secret-id into files, and the settings.

    ``addr`` is one address or, like ``HMD_VAULT_ADDR``, a comma-separated list (the CLI
    commands use the first). The lines only name commands and files: no token, role-id or
    secret-id is ever in them. The report's names are checked again, as they end up in shell
    commands.
    """
    addresses = [address.strip() for address in addr.split(",")]
    for address in addresses:
        _check_address(address)
    _mount_path(report.mount, "transit mount")
    _mount_path(report.approle_mount, "AppRole mount")
    _check_key_name(report.key_name)
    if not set(report.roles) <= set(ROLES):
        raise ConfigurationError(f"Vault roles must be among {', '.join(ROLES)}")
    role_path = f"auth/{report.approle_mount}/role"
    lines = [
        f"# Credentials for heimdall's Vault roles (AppRole at {report.approle_mount}/, "
        f"key {report.key_name} on {report.mount}/).",
        "# Run as an operator who may read role-ids and create secret-ids; the commands write",
        "# the credentials to files and print nothing secret. HashiCorp Vault: use vault for bao.",
        "# Secret-ids expire after 24h: issue one per deployment (-wrap-ttl=5m hands it over",
        "# response-wrapped; bao unwrap opens it where heimdall runs).",
        f"export VAULT_ADDR={shlex.quote(addresses[0])}",
    ]
    for role in report.roles:
        lines += [
            "",
            f"# {role} ({_ROLE_PURPOSE[role]})",
            f"bao read -field=role_id {role_path}/{role}/role-id > {role}.role_id",
            f"(umask 077 && bao write -f -field=secret_id {role_path}/{role}/secret-id"
            f" > {role}.secret_id)",
            f"# then, for heimdall running as {role} (both files readable by its user only):",
            "HMD_KMS_PROVIDER=vault",
            f"HMD_KMS_KEY_NAME={report.key_name}",
            f"HMD_VAULT_ADDR={shlex.quote(','.join(addresses))}",
            f"HMD_VAULT_MOUNT={report.mount}",
            "HMD_VAULT_AUTH=approle",
            f"HMD_VAULT_APPROLE_MOUNT={report.approle_mount}",
            f"HMD_VAULT_ROLE_ID_FILE=/path/to/{role}.role_id",
            f"HMD_VAULT_SECRET_ID_FILE=/path/to/{role}.secret_id",
            f'# the role (with HMD_ENV=production: role = "{role}" in the config file instead)',
            f"HMD_ROLE={role}",
        ]
    return lines


def _check_address(address: str) -> None:
    parsed = urllib.parse.urlsplit(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigurationError("the Vault address must be an http:// or https:// URL")
    if parsed.username is not None or parsed.password is not None:
        raise ConfigurationError("the Vault address must not carry credentials")


def _mount_path(path: str, what: str) -> str:
    path = path.strip("/")
    if not _MOUNT_PATH.fullmatch(path):
        raise ConfigurationError(
            f"the {what} must be a path of letters, digits, _ . - separated by /"
        )
    return path


def _check_key_name(key_name: str) -> None:
    if not _KEY_NAME.fullmatch(key_name):
        raise ConfigurationError(
            "the transit key name must be letters, digits, _ . - @, "
            "starting and ending with a letter, digit or _"
        )


def _ensure_mount(client: hvac.Client, path: str, engine: str, *, auth: bool) -> str:
    kind = "auth methods (sys/auth)" if auth else "secrets engines (sys/mounts)"
    with _vault_errors(f"list the {kind}"):
        if auth:
            listing = client.sys.list_auth_methods()
        else:
            listing = client.sys.list_mounted_secrets_engines()
        mounted = _data(listing).get(f"{path}/")
    if mounted is None:
        with _vault_errors(f"enable {engine} at {path}/"):
            if auth:
                client.sys.enable_auth_method(engine, path=path)
            else:
                client.sys.enable_secrets_engine(engine, path=path)
        return f"enabled {engine} at {path}/"
    found = mounted.get("type") if isinstance(mounted, dict) else None
    if found != engine:
        raise ConfigurationError(
            f"{path}/ is already mounted as {found}, not {engine}; "
            f"choose another path for heimdall's {engine} mount"
        )
    return f"{engine} at {path}/ exists"


def _ensure_key(client: hvac.Client, mount: str, key_name: str) -> str:
    transit = client.secrets.transit
    with _vault_errors(f"read the transit key {mount}/keys/{key_name}", key_name=key_name):
        key = _read_optional(lambda: transit.read_key(key_name, mount_point=mount))
    if key is None:
        with _vault_errors(f"create the transit key {mount}/keys/{key_name}", key_name=key_name):
            transit.create_key(
                key_name,
                key_type=KEY_TYPE,
                derived=True,
                exportable=False,
                allow_plaintext_backup=False,
                mount_point=mount,
            )
        return f"created key {key_name} ({_KEY_SUMMARY})"
    fault = _key_fault(key)
    if fault:
        raise ConfigurationError(
            f"transit key {key_name} on {mount}/ {fault}, and that cannot be changed on an "
            f"existing key; choose a new key name so the bootstrap creates it correctly"
        )
    return f"key {key_name} exists ({_KEY_SUMMARY})"


def _key_fault(key: dict[str, Any]) -> str | None:
    """Why an existing key must not be used, or None. spec: Key Hierarchy (never leaves KMS)."""
    if key.get("type") != KEY_TYPE:
        return f"is of type {key.get('type')}, not {KEY_TYPE}"
    if key.get("derived") is not True:
        return "is not derived, so it cannot bind heimdall's encryption context"
    if key.get("convergent_encryption"):
        return "uses convergent encryption, so equal plaintexts would give equal ciphertexts"
    if key.get("exportable"):
        return "is exportable, so its key material can leave Vault"
    if key.get("allow_plaintext_backup"):
        return "allows plaintext backup, so its key material can leave Vault"
    return None


def _ensure_audit_key(client: hvac.Client, mount: str, name: str) -> str:
    """The audit key: type hmac (hvac's create_key does not know the type, hence the raw write)."""
    with _vault_errors(f"read the transit key {mount}/keys/{name}", key_name=name):
        key = _read_optional(lambda: client.secrets.transit.read_key(name, mount_point=mount))
    if key is None:
        with _vault_errors(f"create the transit key {mount}/keys/{name}", key_name=name):
            client.adapter.post(
                f"/v1/{mount}/keys/{name}",
                json={
                    "type": AUDIT_KEY_TYPE,
                    "key_size": _AUDIT_KEY_SIZE,
                    "exportable": False,
                    "allow_plaintext_backup": False,
                },
            )
        return f"created audit key {name} ({_AUDIT_KEY_SUMMARY})"
    fault = _audit_key_fault(key)
    if fault:
        raise ConfigurationError(
            f"transit key {name} on {mount}/ {fault}, and that cannot be changed on an existing "
            "key; choose a new key name so the bootstrap creates both keys correctly"
        )
    return f"audit key {name} exists ({_AUDIT_KEY_SUMMARY})"


def _audit_key_fault(key: dict[str, Any]) -> str | None:
    if key.get("type") != AUDIT_KEY_TYPE:
        return f"is of type {key.get('type')}, not {AUDIT_KEY_TYPE}"
    if key.get("exportable"):
        return "is exportable, so its key material can leave Vault"
    if key.get("allow_plaintext_backup"):
        return "allows plaintext backup, so its key material can leave Vault"
    return None


def _ensure_policy(client: hvac.Client, role: str, text: str) -> str:
    with _vault_errors(f"read the policy {role} (sys/policy/{role})"):
        current = _read_optional(lambda: client.sys.read_policy(role))
    if current is not None and current.get("rules") == text:
        return f"policy {role} unchanged"
    with _vault_errors(f"write the policy {role} (sys/policy/{role})"):
        client.sys.create_or_update_policy(role, text)
    return f"wrote policy {role}"


def _ensure_role(client: hvac.Client, role: str, approle_mount: str) -> str:
    approle = client.auth.approle
    wanted = {**_ROLE_SETTINGS, "token_policies": [role]}
    where = f"auth/{approle_mount}/role/{role}"
    with _vault_errors(f"read the AppRole role {where}"):
        current = _read_optional(lambda: approle.read_role(role, mount_point=approle_mount))
    if current is not None and all(current.get(name) == wanted[name] for name in wanted):
        return f"role {role} unchanged"
    with _vault_errors(f"write the AppRole role {where}"):
        approle.create_or_update_approle(role, mount_point=approle_mount, **wanted)
    verb = "created" if current is None else "updated"
    return f"{verb} role {role} (policy {role}; {_ROLE_SUMMARY})"


def _read_optional(read: Callable[[], Any]) -> dict[str, Any] | None:
    """The data of a read, or None when Vault answers 404 (the thing does not exist yet)."""
    import hvac.exceptions  # noqa: PLC0415 - hvac is optional: only bootstrap needs it

    try:
        response = read()
    except hvac.exceptions.InvalidPath:
        return None
    return _data(response)


def _data(response: Any) -> dict[str, Any]:
    data = response.get("data") if isinstance(response, dict) else None
    if not isinstance(data, dict):
        raise KmsError("Vault answered without a data object", provider=_PROVIDER)
    return data


@contextlib.contextmanager
def _vault_errors(action: str, *, key_name: str = "") -> Iterator[None]:
    """Translate hvac and transport errors into heimdall's; ``action`` completes "may not ...".

    A 404 means a mount or path is missing, a configuration fault: the one thing bootstrap
    expects to be missing, a key or role, is read through :func:`_read_optional` instead.
    Messages are written here: none repeats the request, its headers or hvac's text (which
    names the URL), so a token can never reach a message, a log or a traceback's cause.
    """
    import hvac.exceptions as vault  # noqa: PLC0415 - hvac is optional

    ids: dict[str, str] = {"provider": _PROVIDER, "key_identifier": key_name}
    try:
        yield
    except (vault.Forbidden, vault.Unauthorized):
        raise AccessDenied(
            f"the Vault token may not {action}; run the bootstrap with an operator token", **ids
        ) from None
    except vault.InvalidPath:
        raise ConfigurationError(f"Vault has no path to {action}; is the mount there?") from None
    except (
        vault.VaultDown,
        vault.InternalServerError,
        vault.BadGateway,
        vault.RateLimitExceeded,
        vault.VaultNotInitialized,
    ):
        raise KmsUnavailable(f"Vault failed or is sealed; could not {action}", **ids) from None
    except vault.InvalidRequest as exc:
        reason = "; ".join(str(error) for error in exc.errors or ())[:200] or "no reason given"
        raise ConfigurationError(f"Vault refused to {action}: {reason}") from None
    except vault.VaultError:
        raise KmsError(f"Vault answered unexpectedly; could not {action}", **ids) from None
    except OSError as exc:  # requests' RequestException derives from OSError (IOError)
        if isinstance(exc, ValueError):  # requests' InvalidURL, MissingSchema, InvalidSchema
            raise ConfigurationError("the Vault address is not a valid URL") from None
        raise KmsUnavailable(f"Vault could not be reached to {action}", **ids) from None
