"""The audit trail's MAC key on AWS KMS: an HMAC key that never leaves KMS.

spec: Audit and Compliance, Audit Log Requirements. ``heimdall aws bootstrap`` creates it beside
the master key: key spec ``HMAC_256``, usage ``GENERATE_VERIFY_MAC``, alias ``alias/<name>-audit``,
tagged ``heimdall:key`` = ``<name>-audit``. heimdall only calls GenerateMac to sign a checkpoint
and VerifyMac to check one (HMAC-SHA-256), so the key never leaves KMS; the role policies let
every role whose commands write audit events sign and the roles that read the trail verify
(:mod:`heimdall.kms.aws_access`). KMS cannot rotate HMAC keys, so the MAC's text names only its
format (``aws-kms:v1:<base64>``). With several regions it is a multi-Region key like the
version keys, and signing and verifying go to the first region that answers
(:mod:`heimdall.kms.aws_regions`): a checkpoint signed in one region verifies in any other.
"""

from __future__ import annotations

import binascii
import re
from typing import Any, Final

from heimdall.errors import DecryptionFailed, KeyNotFound, KmsError
from heimdall.kms.aws_client import PROVIDER, AwsClients, RegionClients, aws_errors
from heimdall.kms.aws_regions import Regions

__all__ = ["AUDIT_KEY_SPEC", "AwsAuditKey", "audit_alias", "audit_key_name"]

AUDIT_KEY_SPEC: Final = "HMAC_256"
_ALGORITHM: Final = "HMAC_SHA_256"
_PREFIX: Final = "aws-kms:v1:"
_MAC: Final = re.compile(r"aws-kms:v1:[A-Za-z0-9+/]{43}=\Z")  # 32 bytes
_PROBE: Final = b"heimdall.audit-key.probe"


def audit_key_name(name: str) -> str:
    """The ``heimdall:key`` tag of the audit key that belongs to the master key *name*."""
    return f"{name}-audit"


def audit_alias(name: str) -> str:
    return f"alias/{audit_key_name(name)}"


class AwsAuditKey:
    """An :class:`heimdall.kms.base.AuditKey` over a KMS HMAC key. See the module docstring."""

    def __init__(self, clients: AwsClients, key_name: str, regions: Regions | None = None) -> None:
        self._regions = regions or Regions(clients)
        self._alias = audit_alias(key_name)

    @property
    def key_identifier(self) -> str:
        return f"{PROVIDER}:{self._alias}"

    def sign(self, message: bytes) -> str:
        def sign(region: RegionClients) -> dict[str, Any]:
            with aws_errors("sign an audit checkpoint", key_identifier=self.key_identifier):
                answer: dict[str, Any] = region.kms.generate_mac(
                    KeyId=self._alias, Message=message, MacAlgorithm=_ALGORITHM
                )
            return answer

        try:
            answer = self._regions.call(sign)
        except KeyNotFound:
            raise KeyNotFound(
                f"AWS KMS has no audit key {self._alias}; run `heimdall aws bootstrap`",
                provider=PROVIDER,
                key_identifier=self.key_identifier,
            ) from None
        mac = answer.get("Mac")
        if not isinstance(mac, bytes) or len(mac) != 32:
            raise KmsError("AWS KMS answered GenerateMac without a MAC", provider=PROVIDER)
        return _PREFIX + binascii.b2a_base64(mac, newline=False).decode()

    def verify(self, message: bytes, mac: str) -> bool:
        if not _MAC.match(mac):
            return False
        raw = binascii.a2b_base64(mac.removeprefix(_PREFIX))

        def verify(region: RegionClients) -> dict[str, Any]:
            with aws_errors("verify an audit checkpoint", key_identifier=self.key_identifier):
                answer: dict[str, Any] = region.kms.verify_mac(
                    KeyId=self._alias, Message=message, MacAlgorithm=_ALGORITHM, Mac=raw
                )
            return answer

        try:
            answer = self._regions.call(verify)
        except DecryptionFailed:
            return False  # KMSInvalidMacException: not this key's MAC of this message
        return answer.get("MacValid") is True

    def exists(self) -> bool:
        try:
            self.verify(_PROBE, _PREFIX + "A" * 43 + "=")
        except KeyNotFound:
            return False
        return True

    def __repr__(self) -> str:
        return f"AwsAuditKey(key={self.key_identifier!r})"
