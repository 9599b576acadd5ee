"""The audit trail's MAC key on Vault / OpenBao: a Transit key of type ``hmac``.

spec: Audit and Compliance, Audit Log Requirements. ``heimdall vault bootstrap`` creates
``<key_name>-audit`` on the Transit mount beside the master key: type ``hmac``, not exportable,
no plaintext backup. heimdall only calls Transit's ``hmac/<key>`` to sign a checkpoint and
``verify/<key>`` with ``hmac=`` to check one, so the key never leaves Vault. The role policies
let the roles that write audit events (heimdall-app, heimdall-worker, heimdall-admin) ``hmac``
and the roles that check the trail (heimdall-admin, heimdall-audit) ``verify``; every role is
denied its export and backup.
"""

from __future__ import annotations

import binascii
import re
from typing import TYPE_CHECKING, Final

from heimdall.errors import DecryptionFailed, KeyNotFound, KmsError

if TYPE_CHECKING:  # the vault extra (urllib3): the bootstrap needs only the key's name
    from heimdall.kms.vault_transport import VaultTransport

__all__ = ["AUDIT_KEY_SUFFIX", "VaultAuditKey", "audit_key_name"]

AUDIT_KEY_SUFFIX: Final = "-audit"
_PROVIDER: Final = "vault"
_ALGORITHM: Final = "sha2-256"
_MAC: Final = re.compile(r"vault:v[1-9][0-9]{0,9}:[A-Za-z0-9+/]+={0,2}\Z")


def audit_key_name(key_name: str) -> str:
    """The name of the audit key that belongs to the master key *key_name*."""
    return key_name + AUDIT_KEY_SUFFIX


class VaultAuditKey:
    """An :class:`heimdall.kms.base.AuditKey` over a Transit hmac key. See the module docstring.

    Shares the provider's :class:`VaultTransport` (its login, failover and error translation).
    """

    def __init__(self, transport: VaultTransport) -> None:
        self._transport = transport
        self._mount = transport.settings.mount
        self._key = audit_key_name(transport.settings.key_name)

    @property
    def key_identifier(self) -> str:
        return f"{self._mount}/{self._key}"

    def sign(self, message: bytes) -> str:
        body = {"input": _b64(message), "algorithm": _ALGORITHM}
        try:
            answer = self._transport.call(
                "POST", f"{self._mount}/hmac/{self._key}", body, key_identifier=self.key_identifier
            )
        except KeyNotFound:
            raise KeyNotFound(
                f"vault has no audit key {self.key_identifier}; run `heimdall vault bootstrap`",
                provider=_PROVIDER,
                key_identifier=self.key_identifier,
            ) from None
        mac = (answer.get("data") or {}).get("hmac")
        if not isinstance(mac, str) or not _MAC.match(mac):
            raise KmsError("vault answered an hmac request without a MAC", provider=_PROVIDER)
        return mac

    def exists(self) -> bool:
        try:
            self.verify(b"heimdall.audit-key.probe", "vault:v1:AAAA")
        except KeyNotFound:
            return False
        return True

    def verify(self, message: bytes, mac: str) -> bool:
        if not _MAC.match(mac):
            return False
        body = {"input": _b64(message), "hmac": mac, "algorithm": _ALGORITHM}
        try:
            answer = self._transport.call(
                "POST",
                f"{self._mount}/verify/{self._key}",
                body,
                key_identifier=self.key_identifier,
            )
        except DecryptionFailed:
            return False  # Transit could not decode the MAC
        except KmsError as exc:
            if type(exc) is KmsError:
                return False  # Transit refused this MAC, e.g. one naming a version it never had
            raise  # unavailable, denied, no such key: the question was not answered
        return (answer.get("data") or {}).get("valid") is True

    def __repr__(self) -> str:
        return f"VaultAuditKey(key={self.key_identifier!r})"


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode()
