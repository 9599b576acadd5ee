"""AWS KMS provider settings: plain data, importable without the aws extra.

Settings come from ``HMD_AWS_*`` variables (or the config file; none of them is a secret):

=========================  ============================================================
``HMD_AWS_KEY``            the key: ``alias/<name>`` or its alias ARN, or the key ID or key
                           ARN of an existing KMS key that ``heimdall aws bootstrap`` adopts
                           as version 1; default ``alias/<HMD_KMS_KEY_NAME>``
``HMD_AWS_REGION``         region; default the SDK's (``AWS_REGION``, the profile), or the
                           region of an ARN in ``HMD_AWS_KEY``
``HMD_AWS_ROLE_ARN``       a role assumed through STS (cross-account access)
``HMD_AWS_ENDPOINT_URL``   the KMS endpoint (a VPC endpoint; a test server)
``HMD_AWS_CONCURRENCY``    items of a batch sent side by side, default 8
``HMD_AWS_TIMEOUT``        seconds to connect and to read, per request, default 5
``HMD_AWS_MAX_ATTEMPTS``   attempts of an idempotent call (first included), default 3
=========================  ============================================================

Credentials are never a heimdall setting: they come from the SDK's default chain (instance
profile, ECS/EKS roles, the environment, SSO), as the spec's Authentication Methods ask.

The key name becomes the aliases of every KMS key heimdall uses (see :mod:`heimdall.kms.aws`):
``alias/<name>-v<N>`` per version, ``alias/<name>`` for the latest, ``alias/<name>-audit``. KMS
alias names allow no ``.``, and a name ending in ``-v<N>`` or ``-audit`` would read as one of
another key's aliases, so those are refused here, before anything is created.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from heimdall.errors import ConfigurationError

__all__ = [
    "DEFAULT_CONCURRENCY",
    "FILE_KEYS",
    "AwsSettings",
    "aws_settings",
    "check_aws_key_name",
]

DEFAULT_CONCURRENCY: Final = 8

FILE_KEYS: Final = frozenset(
    {
        "aws_key",
        "aws_region",
        "aws_role_arn",
        "aws_endpoint_url",
        "aws_concurrency",
        "aws_timeout",
        "aws_max_attempts",
    }
)

_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z", re.ASCII)
_RESERVED_SUFFIX: Final = re.compile(r"-(?:v[0-9]+|audit)\Z")
_REGION: Final = re.compile(r"[a-z]{2}(?:-[a-z]+)+-[0-9]{1,2}\Z")
_ARN: Final = re.compile(
    r"arn:aws[a-z-]*:kms:(?P<region>[a-z0-9-]+):(?P<account>[0-9]{12}):"
    r"(?P<kind>alias|key)/(?P<rest>[A-Za-z0-9_/-]{1,256})\Z"
)
_KEY_ID: Final = re.compile(r"(?:mrk-[0-9a-f]{32}|[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})\Z")
_ROLE_ARN: Final = re.compile(r"arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}\Z")


@dataclass(frozen=True, slots=True)
class AwsSettings:
    """Where the key is and how to reach it. Holds no credential."""

    key_name: str = "heimdall-pii"
    region: str | None = None
    account: str | None = None  # from an ARN in HMD_AWS_KEY: the account the key must be in
    adopt_key: str | None = None  # key ID or ARN the bootstrap adopts as version 1
    role_arn: str | None = None
    endpoint_url: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    timeout: float = 5.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        check_aws_key_name(self.key_name)
        if self.region is not None and not _REGION.match(self.region):
            raise ConfigurationError(f"HMD_AWS_REGION {self.region!r} is not an AWS region name")
        if self.role_arn is not None and not _ROLE_ARN.match(self.role_arn):
            raise ConfigurationError("HMD_AWS_ROLE_ARN must be an IAM role ARN")
        if self.endpoint_url is not None:
            _check_endpoint(self.endpoint_url)
        if not 1 <= self.concurrency <= 64:
            raise ConfigurationError("HMD_AWS_CONCURRENCY must be between 1 and 64")
        if not 0.1 <= self.timeout <= 300:
            raise ConfigurationError("HMD_AWS_TIMEOUT must be between 0.1 and 300")
        if not 1 <= self.max_attempts <= 10:
            raise ConfigurationError("HMD_AWS_MAX_ATTEMPTS must be between 1 and 10")


def check_aws_key_name(name: str) -> None:
    """Refuse a key name that cannot name heimdall's KMS aliases (see the module docstring)."""
    if not _NAME.match(name):
        raise ConfigurationError(
            "on AWS the key name must be 1-128 letters, digits, '_' or '-' (KMS alias names "
            "allow no '.'), starting with a letter or digit"
        )
    if _RESERVED_SUFFIX.search(name):
        raise ConfigurationError(
            f"on AWS the key name {name!r} may not end in -v<number> or -audit: heimdall names "
            "each version's alias and the audit key's alias that way"
        )


def _check_endpoint(url: str) -> None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigurationError("HMD_AWS_ENDPOINT_URL must be an http:// or https:// URL")
    if parsed.username is not None or parsed.password is not None:
        raise ConfigurationError("HMD_AWS_ENDPOINT_URL must not carry credentials")


def _number(name: str, value: str, kind: type[int] | type[float]) -> float:
    try:
        return kind(value)
    except ValueError:
        raise ConfigurationError(f"HMD_{name.upper()} must be a number") from None


def _key(value: str, key_name: str, named: bool) -> dict[str, str | None]:
    """key_name, region, account and adopt_key from HMD_AWS_KEY."""
    if value.startswith("alias/"):
        alias, region, account = value.removeprefix("alias/"), None, None
    elif (arn := _ARN.match(value)) is not None and arn["kind"] == "alias":
        alias, region, account = arn["rest"], arn["region"], arn["account"]
    elif arn is not None:
        if not _KEY_ID.match(arn["rest"]):
            raise ConfigurationError("HMD_AWS_KEY is a key ARN whose key ID is malformed")
        region, account = arn["region"], arn["account"]
        return {"key_name": key_name, "region": region, "account": account, "adopt_key": value}
    elif _KEY_ID.match(value):
        return {"key_name": key_name, "region": None, "account": None, "adopt_key": value}
    else:
        raise ConfigurationError(
            "HMD_AWS_KEY must be alias/<name>, an alias ARN, a key ARN or a key ID"
        )
    if named and alias != key_name:
        raise ConfigurationError(
            f"HMD_AWS_KEY names alias/{alias} but HMD_KMS_KEY_NAME is {key_name}; set one of them"
        )
    return {"key_name": alias, "region": region, "account": account, "adopt_key": None}


def aws_settings(values: Mapping[str, str], key_name: str, *, named: bool) -> AwsSettings:
    """Build the provider settings from ``aws_*`` values; *named*: whether HMD_KMS_KEY_NAME
    was set (an alias in HMD_AWS_KEY must then agree with it)."""
    key: dict[str, str | None] = {"key_name": key_name}
    if values.get("aws_key"):
        key = _key(values["aws_key"], key_name, named)
    region = values.get("aws_region") or None
    if region and key.get("region") and region != key["region"]:
        raise ConfigurationError(
            f"HMD_AWS_REGION is {region} but the ARN in HMD_AWS_KEY is in {key['region']}"
        )
    return AwsSettings(
        key_name=str(key["key_name"]),
        region=region or key.get("region"),
        account=key.get("account"),
        adopt_key=key.get("adopt_key"),
        role_arn=values.get("aws_role_arn") or None,
        endpoint_url=values.get("aws_endpoint_url") or None,
        concurrency=int(
            _number("aws_concurrency", values.get("aws_concurrency", str(DEFAULT_CONCURRENCY)), int)
        ),
        timeout=float(_number("aws_timeout", values.get("aws_timeout", "5"), float)),
        max_attempts=int(_number("aws_max_attempts", values.get("aws_max_attempts", "3"), int)),
    )
