"""Pre-flight checks of a key provider (runbook: Re-encryption After Migration, step 1).

Each check is one line: connectivity, authentication, the key readable, a round trip on a test
value, and the provider's audit device. A provider adds its own checks by having a
``preflight()`` method returning :class:`Check` items; the generic ones run for every provider.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from heimdall.errors import HeimdallError
from heimdall.kms.base import KeyManagementService

__all__ = ["Check", "run_checks"]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def _attempt(name: str, action: Callable[[], str]) -> Check:
    try:
        return Check(name, True, action())
    except HeimdallError as exc:
        return Check(name, False, str(exc))


def run_checks(kms: KeyManagementService) -> list[Check]:
    """Provider-specific checks first, then key readable and a round trip."""
    checks: list[Check] = []
    own = getattr(kms, "preflight", None)
    if callable(own):
        checks.extend(own())

    def readable() -> str:
        description = kms.describe()
        return f"{description.key_name}, latest version {description.latest_version}"

    def round_trip() -> str:
        context = b"heimdall.preflight." + secrets.token_hex(8).encode()
        data_key = kms.generate_data_key(context)
        with data_key.plaintext as plaintext, kms.unwrap(data_key.wrapped, context) as back:
            if not hmac.compare_digest(bytes(plaintext.view()), bytes(back.view())):
                raise HeimdallError("the unwrapped test key differs from the generated one")
        return f"generate, wrap and unwrap a test key under v{data_key.wrapped.key_version}"

    checks.append(_attempt("key readable", readable))
    checks.append(_attempt("round trip", round_trip))
    return checks
