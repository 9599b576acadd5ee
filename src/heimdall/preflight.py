"""Pre-flight checks of a key provider (runbook: Re-encryption After Migration, step 1).

Each check is one line, and a role is checked for what it may do, never for what it may not
(spec: Access Control Model, Role-Based Access; :data:`heimdall.rbac.ROLE_PERMISSIONS`). A check
the role has no use for is reported *skipped*, with the reason, and does not fail the run.
``role=None`` is the local operator, who may do everything and is checked for everything.

* A provider that enforces access per role itself (Vault's policies) has a
  ``preflight(role)`` method returning its own :class:`Check` items: connectivity,
  authentication, what the role may do there, and :func:`key_readable` where the role may read
  the key.
* Any other provider (the local keyring, which whoever can read its file holds whole, whatever
  the role) gets :func:`key_readable` for every role.
* The round trip (generate a data key, unwrap it again) runs on every provider, but only for a
  role that may both encrypt and decrypt: the others never generate a data key, so there is
  nothing of theirs it could show.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace

from heimdall.errors import HeimdallError
from heimdall.kms.base import KeyManagementService
from heimdall.kms.multi import MultiProvider
from heimdall.rbac import ROLE_PERMISSIONS, Permission, Role

__all__ = ["Check", "key_readable", "run_checks"]


@dataclass(frozen=True, slots=True)
class Check:
    """One line of ``heimdall kms check``. A skipped check is ``ok``: it never fails a run."""

    name: str
    ok: bool
    detail: str
    skipped: bool = False

    @classmethod
    def skip(cls, name: str, reason: str) -> Check:
        return cls(name, True, reason, skipped=True)


def _attempt(name: str, action: Callable[[], str]) -> Check:
    try:
        return Check(name, True, action())
    except HeimdallError as exc:
        return Check(name, False, str(exc))


def key_readable(kms: KeyManagementService) -> Check:
    """The key's metadata can be read: its name and latest version."""

    def readable() -> str:
        description = kms.describe()
        return f"{description.key_name}, latest version {description.latest_version}"

    return _attempt("key readable", readable)


def _round_trip(kms: KeyManagementService, role: Role | None) -> Check:
    permissions = ROLE_PERMISSIONS[role] if role is not None else frozenset(Permission)
    if Permission.ENCRYPT not in permissions:
        return Check.skip("round trip", f"{role} may not generate data keys")
    if Permission.DECRYPT not in permissions:
        return Check.skip("round trip", f"{role} may not unwrap data keys")

    def round_trip() -> str:
        context = b"heimdall.preflight." + secrets.token_hex(8).encode()
        data_key = kms.generate_data_key(context)
        with data_key.plaintext as plaintext, kms.unwrap(data_key.wrapped, context) as back:
            if not hmac.compare_digest(bytes(plaintext.view()), bytes(back.view())):
                raise HeimdallError("the unwrapped test key differs from the generated one")
        return f"generate, wrap and unwrap a test key under v{data_key.wrapped.key_version}"

    return _attempt("round trip", round_trip)


def run_checks(kms: KeyManagementService, role: Role | None = None) -> list[Check]:
    """The checks of *kms* for *role* (``None``: the local operator); see the module docstring.

    Behind a :class:`~heimdall.kms.multi.MultiProvider`, the provider written to is checked in
    full, and each provider that is only read with its own checks (no round trip: nothing is
    written under its key any more), each line naming it."""
    if isinstance(kms, MultiProvider):
        checks = run_checks(kms.primary, role)
        for reader in kms.readers:
            label = f"{reader.provider} (read only)"
            checks += [
                replace(check, name=f"{label}: {check.name}") for check in _own(reader, role)
            ]
        return checks
    return [*_own(kms, role), _round_trip(kms, role)]


def _own(kms: KeyManagementService, role: Role | None) -> list[Check]:
    own = getattr(kms, "preflight", None)
    return list(own(role)) if callable(own) else [key_readable(kms)]
