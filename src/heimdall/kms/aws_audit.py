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

The alias is resolved before the key is used, in each region that answers, and the key it names
must be heimdall's audit key (:mod:`heimdall.kms.aws_trust`: customer managed, ``HMAC_256`` for
``GENERATE_VERIFY_MAC``, key material made by KMS, in the expected account, tagged
``heimdall:key`` = ``<name>-audit``); MACs are then made and checked under that key ID, so an
alias pointed at another key afterwards is not followed.
"""

from __future__ import annotations

import binascii
import re
import threading
from collections.abc import Callable
from typing import Any, Final

from heimdall.errors import DecryptionFailed, KeyNotFound, KmsError
from heimdall.kms.aws_client import PROVIDER, AwsClients, RegionClients, aws_call
from heimdall.kms.aws_regions import Regions
from heimdall.kms.aws_trust import AUDIT_KEY, Ownership, caller_account, check_key
from heimdall.kms.aws_versions import TAG_KEY, describe_key, tags_of

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
    """An :class:`heimdall.kms.base.AuditKey` over a KMS HMAC key. See the module docstring.
    *ownership*: what the key is checked against (default: the credentials' account, from
    STS)."""

    def __init__(
        self,
        clients: AwsClients,
        key_name: str,
        regions: Regions | None = None,
        *,
        ownership: Callable[[], Ownership] | None = None,
    ) -> None:
        self._regions = regions or Regions(clients)
        self._name = key_name
        self._alias = audit_alias(key_name)
        self._ownership = ownership or (lambda: Ownership(account=caller_account(clients.sts)))
        self._lock = threading.Lock()
        self._key_ids: dict[str, str] = {}  # region: the key ID checked there

    @property
    def key_identifier(self) -> str:
        return f"{PROVIDER}:{self._alias}"

    def _key_id(self, region: RegionClients) -> str:
        """The audit key's ID in *region*, once checked to be heimdall's audit key."""
        with self._lock:
            known = self._key_ids.get(region.region)
        if known is not None:
            return known
        metadata = describe_key(region.kms, self._alias, self.key_identifier)
        key_id = str(metadata.get("KeyId") or "")
        check_key(
            metadata,
            tags_of(region.kms, key_id),
            self._ownership(),
            AUDIT_KEY,
            {TAG_KEY: audit_key_name(self._name)},
            what=self._alias,
            fix=(
                "point it back at heimdall's audit key, or delete it and run `heimdall aws "
                "bootstrap`; heimdall signs checkpoints only with the audit key it made"
            ),
        )
        with self._lock:
            self._key_ids[region.region] = key_id
        return key_id

    def _call(self, action: str, request: Callable[[Any, str], dict[str, Any]]) -> dict[str, Any]:
        """*request* (a region's client, the key ID) in the first region that answers."""

        def attempt(region: RegionClients) -> dict[str, Any]:
            key_id = self._key_id(region)
            try:
                answer: dict[str, Any] = aws_call(
                    action, lambda: request(region.kms, key_id), key_identifier=self.key_identifier
                )
            except KeyNotFound:
                with self._lock:
                    self._key_ids.pop(region.region, None)
                raise
            return answer

        return self._regions.call(attempt)

    def sign(self, message: bytes) -> str:
        try:
            answer = self._call(
                "sign an audit checkpoint",
                lambda kms, key_id: kms.generate_mac(
                    KeyId=key_id, Message=message, MacAlgorithm=_ALGORITHM
                ),
            )
        except KeyNotFound:
            answer = None
        if answer is None:
            raise KeyNotFound(
                f"AWS KMS has no audit key {self._alias}; run `heimdall aws bootstrap`",
                provider=PROVIDER,
                key_identifier=self.key_identifier,
            )
        mac = answer.get("Mac")
        if not isinstance(mac, bytes) or len(mac) != 32:
            raise KmsError("AWS KMS answered GenerateMac without a MAC", provider=PROVIDER)
        return _PREFIX + binascii.b2a_base64(mac, newline=False).decode()

    def verify(self, message: bytes, mac: str) -> bool:
        if not _MAC.match(mac):
            return False
        raw = binascii.a2b_base64(mac.removeprefix(_PREFIX))
        try:
            answer = self._call(
                "verify an audit checkpoint",
                lambda kms, key_id: kms.verify_mac(
                    KeyId=key_id, Message=message, MacAlgorithm=_ALGORITHM, Mac=raw
                ),
            )
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
