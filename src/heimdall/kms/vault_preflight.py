"""What each heimdall role needs of Vault / OpenBao, and the pre-flight checks of it.

spec: Access Control Model (Vault Policy Example, Role-Based Access). :data:`ROLE_NEEDS` is the
one table of every (path, capability) heimdall uses in each role: the split of
:data:`heimdall.rbac.ROLE_PERMISSIONS`, as granted by the policies in ``vault_policies/``.
``{mount}`` and ``{key}`` stand for the configured Transit mount and key name; ``{key}-audit``
is the key that signs audit-trail checkpoints. To give a role a new Vault call, add its row here
and its grant to the role's policy.

Vault's ``sys/capabilities-self`` tells a token its capabilities on paths without using them, so
every role is checked for all it needs, even where a real call is impossible (a worker has
nothing to decrypt) or would change something (a rotation). Every role must also be refused
export and backup of the key (:data:`EXPORT_PATHS`). The local operator (``role=None``, a root
or operator token) is not checked this way but by doing: listing the audit devices, reading the
key and a round trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from heimdall.errors import HeimdallError
from heimdall.kms.vault_transport import VaultTransport
from heimdall.preflight import Check
from heimdall.rbac import Role

__all__ = [
    "AUDIT_DEVICES",
    "EXPORT_PATHS",
    "KEY_METADATA",
    "ROLE_NEEDS",
    "Need",
    "access_checks",
    "needs",
]


@dataclass(frozen=True, slots=True)
class Need:
    """A capability a role needs on a path (a template of ``{mount}`` and ``{key}``), and why."""

    path: str
    capability: str
    use: str

    def render(self, mount: str, key: str) -> str:
        return self.path.format(mount=mount, key=key)


KEY_METADATA: Final = "{mount}/keys/{key}"
AUDIT_DEVICES: Final = "sys/audit"

# Only what heimdall calls: the app policy's datakey/wrapped grant (for pre-provisioning outside
# heimdall) is not needed, and Transit has no read on keys/<key>/config.
ROLE_NEEDS: Final[Mapping[Role, tuple[Need, ...]]] = MappingProxyType(
    {
        Role.APP: (
            Need("{mount}/datakey/plaintext/{key}", "update", "generate data keys"),
            Need("{mount}/encrypt/{key}", "update", "wrap keys and values"),
            Need("{mount}/decrypt/{key}", "update", "unwrap data keys"),
            Need(KEY_METADATA, "read", "read key versions"),
            Need("{mount}/hmac/{key}-audit", "update", "sign audit checkpoints"),
        ),
        Role.WORKER: (
            Need("{mount}/decrypt/{key}", "update", "unwrap data keys"),
            Need("{mount}/hmac/{key}-audit", "update", "sign audit checkpoints"),
        ),
        Role.ADMIN: (
            Need(KEY_METADATA, "read", "read key versions"),
            Need("{mount}/keys/{key}/rotate", "update", "rotate the key"),
            Need("{mount}/keys/{key}/config", "update", "set the decryption floor"),
            Need("{mount}/rewrap/{key}", "update", "rewrap data keys"),
            Need(AUDIT_DEVICES, "read", "list audit devices"),
            Need(AUDIT_DEVICES, "sudo", "list audit devices"),
            Need("{mount}/hmac/{key}-audit", "update", "sign audit checkpoints"),
            Need("{mount}/verify/{key}-audit", "update", "verify audit checkpoints"),
        ),
        Role.AUDIT: (
            Need(AUDIT_DEVICES, "read", "list audit devices"),
            Need(AUDIT_DEVICES, "sudo", "list audit devices"),
            Need("{mount}/verify/{key}-audit", "update", "verify audit checkpoints"),
        ),
    }
)

# Reading any of these would take key material out of Vault; every role must be refused them.
EXPORT_PATHS: Final = (
    "{mount}/export/encryption-key/{key}",
    "{mount}/export/hmac-key/{key}",
    "{mount}/backup/{key}",
)
_READS: Final = frozenset({"read", "root"})


def needs(role: Role | None, path: str, capability: str) -> bool:
    """Whether *role* needs *capability* on the template *path* (the operator needs all)."""
    if role is None:
        return True
    return any(n.path == path and n.capability == capability for n in ROLE_NEEDS[role])


def access_checks(
    transport: VaultTransport, role: Role | None, mount: str, key: str
) -> list[Check]:
    """One line per path *role* needs, then "export denied"; none for the operator."""
    if role is None:
        return []
    wanted: dict[str, list[Need]] = {}
    for need in ROLE_NEEDS[role]:
        wanted.setdefault(need.render(mount, key), []).append(need)
    refused = [template.format(mount=mount, key=key) for template in EXPORT_PATHS]
    try:
        held = _capabilities(transport, [*wanted, *refused])
    except HeimdallError as exc:
        reason = f"cannot ask vault for the token's capabilities: {exc}"
        return [Check("capabilities", False, reason)]
    checks = [
        _capability_check(path, path_needs, held[path]) for path, path_needs in wanted.items()
    ]
    readable = [path for path in refused if _READS & held[path]]
    if readable:
        checks.append(Check("export denied", False, f"the token may read {', '.join(readable)}"))
    else:
        checks.append(
            Check("export denied", True, f"the token may not export or back up {mount}/{key}")
        )
    return checks


def _capabilities(transport: VaultTransport, paths: list[str]) -> dict[str, frozenset[str]]:
    answer = transport.call("POST", "sys/capabilities-self", {"paths": paths})
    data: Any = answer.get("data") or answer
    return {path: _strings(data.get(path) if isinstance(data, dict) else None) for path in paths}


def _strings(value: object) -> frozenset[str]:
    return frozenset(str(item) for item in value) if isinstance(value, list) else frozenset()


def _capability_check(path: str, path_needs: list[Need], held: frozenset[str]) -> Check:
    wanted = ", ".join(dict.fromkeys(n.capability for n in path_needs))
    uses = "; ".join(dict.fromkeys(n.use for n in path_needs))
    missing = [n.capability for n in path_needs if n.capability not in held and "root" not in held]
    name = f"capability {path}"
    if not missing:
        return Check(name, True, f"{wanted} ({uses})")
    has = ", ".join(sorted(held)) or "nothing"
    return Check(name, False, f"lacks {', '.join(missing)} ({uses}); the token has {has}")
