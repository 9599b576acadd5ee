"""What makes a KMS key heimdall's: checked before heimdall uses a key, and before the bootstrap
adopts one.

heimdall finds its keys through aliases (``alias/<name>-v<N>``, ``alias/<name>-audit``), and
whoever may create an alias or tag a key in the account could point one at a key heimdall never
made: one whose key policy lets them decrypt, or whose key material they imported and hold a
copy of. So a key is used, and adopted, only when DescribeKey and ListResourceTags show it to be:

* **customer managed** (``KeyManager`` ``CUSTOMER``): AWS managed keys belong to AWS services;
* **of the right kind**: ``SYMMETRIC_DEFAULT`` for ``ENCRYPT_DECRYPT`` (a version's key),
  ``HMAC_256`` for ``GENERATE_VERIFY_MAC`` (the audit key);
* **with key material made by KMS** (``Origin`` ``AWS_KMS``): imported material (``EXTERNAL``)
  is also held by whoever imported it, and expires when they say; a CloudHSM or external key
  store lives outside KMS. Each only where ``HMD_AWS_KEY_ORIGINS`` accepts it;
* **in the expected account** (:attr:`Ownership.account`: ``HMD_AWS_ACCOUNT_ID``, or the account
  of an ARN in ``HMD_AWS_KEY`` or ``HMD_AWS_ROLE_ARN``, else the credentials' own from STS);
* **tagged as heimdall's**: ``heimdall:key`` and ``heimdall:version`` for a version,
  ``heimdall:key`` = ``<name>-audit`` for the audit key;
* **with several regions** (``HMD_AWS_REGIONS``): a multi-Region key whose primary is in one of
  them and in the account, its key ID the primary's; or a single-Region key in the first region,
  where heimdall makes keys. A region where heimdall fails over to can therefore not hand it a key
  of its own under a version's alias.

What this cannot see is left to AWS and reported by ``heimdall kms check``: who a key policy or
a grant lets use a key (:mod:`heimdall.kms.aws_preflight`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from heimdall.errors import ConfigurationError
from heimdall.kms.aws_client import AwsClients, aws_call
from heimdall.kms.aws_config import AWS_KMS_ORIGIN, AwsSettings

__all__ = [
    "AUDIT_KEY",
    "VERSION_KEY",
    "KeyKind",
    "Ownership",
    "UntrustedKey",
    "arn_account",
    "caller_account",
    "check_key",
    "key_problem",
    "ownership_of",
]

_KEY_ARN: Final = re.compile(
    r"arn:aws[a-z-]*:kms:(?P<region>[a-z0-9-]+):(?P<account>[0-9]{12}):key/(?P<key_id>\S+)\Z"
)


class UntrustedKey(ConfigurationError):
    """An alias heimdall uses names a KMS key heimdall did not make or adopt; nothing is wrapped
    under it, nor unwrapped with it."""


@dataclass(frozen=True, slots=True)
class KeyKind:
    """What a key is for: its key spec and usage as DescribeKey reports them."""

    spec: str
    usage: str
    description: str  # completes "which is not ..."


VERSION_KEY: Final = KeyKind("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", "a symmetric encryption key")
AUDIT_KEY: Final = KeyKind("HMAC_256", "GENERATE_VERIFY_MAC", "an HMAC_256 MAC key")


@dataclass(frozen=True, slots=True)
class Ownership:
    """Where heimdall's keys are and what they may be (see the module docstring)."""

    account: str
    origins: frozenset[str] = frozenset({AWS_KMS_ORIGIN})
    # With several regions, all of them, the first (where keys are made) first; else empty.
    regions: tuple[str, ...] = ()


def caller_account(sts: Any) -> str:
    """The account of the credentials in use (STS GetCallerIdentity, allowed to everyone)."""
    identity = aws_call("ask STS which account the credentials are in", sts.get_caller_identity)
    return str(identity["Account"])


def ownership_of(settings: AwsSettings, clients: AwsClients) -> Ownership:
    """The ownership *settings* describe; the account from STS when no setting names one."""
    regions = tuple(r for r in settings.regions if r) if settings.replica_regions else ()
    return Ownership(
        account=settings.account or caller_account(clients.sts),
        origins=settings.key_origins,
        regions=regions,
    )


def arn_account(arn: str) -> str | None:
    """The account of a KMS key ARN; None for anything else (a bare key ID)."""
    match = _KEY_ARN.match(arn)
    return match["account"] if match else None


def check_key(
    metadata: Mapping[str, Any],
    tags: Mapping[str, str],
    ownership: Ownership,
    kind: KeyKind,
    wanted: Mapping[str, str],
    *,
    what: str,
    fix: str,
) -> None:
    """Refuse the key DescribeKey's *metadata* and *tags* describe unless it is heimdall's, of
    *kind*, tagged *wanted*: UntrustedKey, "*what* points at KMS key K, which ...: *fix*"."""
    problem = key_problem(metadata, ownership, kind) or _tag_problem(tags, wanted)
    if problem:
        key_id = str(metadata.get("KeyId") or "?")
        raise UntrustedKey(f"{what} points at KMS key {key_id}, which {problem}: {fix}")


def key_problem(metadata: Mapping[str, Any], ownership: Ownership, kind: KeyKind) -> str:
    """Why the key *metadata* describes is not one heimdall may use as *kind* ("" if none),
    its tags aside."""
    # AWS always reports KeyUsage; an emulator may leave out ENCRYPT_DECRYPT, the default.
    usage = metadata.get("KeyUsage") or ("ENCRYPT_DECRYPT" if kind is VERSION_KEY else "")
    origin = str(metadata.get("Origin") or "unknown")
    arn = _KEY_ARN.match(str(metadata.get("Arn") or ""))
    if metadata.get("KeyManager") != "CUSTOMER":
        return "is not a customer managed key"
    if metadata.get("KeySpec") != kind.spec or usage != kind.usage:
        return f"is not {kind.description}"
    if origin not in ownership.origins:
        return (
            f"has key material of origin {origin}, not made by KMS (HMD_AWS_KEY_ORIGINS lists "
            "the other origins heimdall may accept)"
        )
    if arn is None or arn["key_id"] != metadata.get("KeyId"):
        return "has no key ARN heimdall can read"
    account = str(metadata.get("AWSAccountId") or arn["account"])
    if arn["account"] != ownership.account or account != ownership.account:
        return f"is in account {arn['account']}, not {ownership.account}"
    return _region_problem(metadata, ownership, arn["region"])


def _region_problem(metadata: Mapping[str, Any], ownership: Ownership, region: str) -> str:
    if not metadata.get("MultiRegion"):
        first = ownership.regions[0] if ownership.regions else region
        if region != first:
            return (
                f"is a single-Region key in {region}: in the other regions heimdall uses only "
                f"the replicas of multi-Region keys made in {first}"
            )
        return ""
    primary = (metadata.get("MultiRegionConfiguration") or {}).get("PrimaryKey") or {}
    primary_arn = _KEY_ARN.match(str(primary.get("Arn") or ""))
    if primary_arn is None or primary_arn["key_id"] != metadata.get("KeyId"):
        return "is a multi-Region key whose primary is another key"
    if primary_arn["account"] != ownership.account:
        return f"is a replica of a key in account {primary_arn['account']}"
    if ownership.regions and primary_arn["region"] not in ownership.regions:
        return (
            f"is a replica of a key in {primary_arn['region']}, which is not among HMD_AWS_REGIONS"
        )
    return ""


def _tag_problem(tags: Mapping[str, str], wanted: Mapping[str, str]) -> str:
    if all(tags.get(name) == value for name, value in wanted.items()):
        return ""
    return "is not tagged " + ", ".join(f"{name}={value}" for name, value in wanted.items())
