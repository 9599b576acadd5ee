"""Roles and permissions. spec: Access Control Model, Role-Based Access.

These checks are heimdall's own; the key provider enforces the same split with its own policies
(Vault policies, IAM). With the local keyring anyone who can read the keyring file holds every
key, so there the roles guard against mistakes, not against an attacker on the host.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Final

from heimdall.errors import ConfigurationError

__all__ = ["ROLE_PERMISSIONS", "Caller", "Permission", "Role"]


class Permission(enum.StrEnum):
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    LOOKUP = "lookup"
    READ_KEYS = "read_keys"
    ROTATE = "rotate"
    CONFIGURE_KEYS = "configure_keys"
    REENCRYPT = "reencrypt"
    READ_STATUS = "read_status"
    READ_AUDIT = "read_audit"


class Role(enum.StrEnum):
    APP = "heimdall-app"
    WORKER = "heimdall-worker"
    ADMIN = "heimdall-admin"
    AUDIT = "heimdall-audit"


ROLE_PERMISSIONS: Final[dict[Role, frozenset[Permission]]] = {
    # Normal application operations: encrypt, decrypt, read key metadata.
    Role.APP: frozenset(
        {
            Permission.ENCRYPT,
            Permission.DECRYPT,
            Permission.LOOKUP,
            Permission.READ_KEYS,
            Permission.READ_STATUS,
        }
    ),
    # Enrichment workers: decrypt only.
    Role.WORKER: frozenset({Permission.DECRYPT}),
    # Key lifecycle management and audit log access; no access to plaintext.
    Role.ADMIN: frozenset(
        {
            Permission.READ_KEYS,
            Permission.ROTATE,
            Permission.CONFIGURE_KEYS,
            Permission.REENCRYPT,
            Permission.READ_STATUS,
            Permission.READ_AUDIT,
        }
    ),
    # Compliance review: the audit trail only.
    Role.AUDIT: frozenset({Permission.READ_AUDIT}),
}


def parse_role(value: str | None) -> Role | None:
    if value is None or value == "":
        return None
    try:
        return Role(value)
    except ValueError:
        names = ", ".join(r.value for r in Role)
        raise ConfigurationError(f"unknown role {value!r} (expected one of {names})") from None


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks, for the audit trail and the permission check.

    ``role=None`` is the embedded default's local operator, who may do everything.
    """

    actor: str
    role: Role | None = None
    request_id: str = field(default_factory=lambda: f"req-{uuid.uuid4()}")
    source_ip: str | None = None

    def may(self, permission: Permission) -> bool:
        return self.role is None or permission in ROLE_PERMISSIONS[self.role]
