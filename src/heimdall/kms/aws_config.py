"""AWS KMS provider settings: plain data, importable without the aws extra.

Settings come from ``HMD_AWS_*`` variables (or the config file; none of them is a secret):

=========================  ============================================================
``HMD_AWS_KEY``            the key: ``alias/<name>`` or its alias ARN, or the key ID or key
                           ARN of an existing KMS key that ``heimdall aws bootstrap`` adopts
                           as version 1; default ``alias/<HMD_KMS_KEY_NAME>``
``HMD_AWS_REGION``         region; default the SDK's (``AWS_REGION``, the profile), or the
                           region of an ARN in ``HMD_AWS_KEY``
``HMD_AWS_REGIONS``        several regions, in order of preference (``us-west-2,eu-west-1``):
                           the first holds the primary of every multi-Region key, the others
                           replicas (:mod:`heimdall.kms.aws_regions`)
``HMD_AWS_ACCOUNT_ID``     the account every KMS key heimdall uses must be in; default the
                           account of an ARN in ``HMD_AWS_KEY`` or ``HMD_AWS_ROLE_ARN`` (which
                           must agree), else the credentials' own (STS GetCallerIdentity, asked
                           once per process)
``HMD_AWS_KEY_ORIGINS``    origins of key material heimdall accepts besides ``AWS_KMS``:
                           ``EXTERNAL`` (imported), ``AWS_CLOUDHSM``, ``EXTERNAL_KEY_STORE``;
                           default none (:mod:`heimdall.kms.aws_trust`)
``HMD_AWS_ROLE_ARN``       a role assumed through STS (cross-account access: a role in the
                           keys' account)
``HMD_AWS_ENDPOINT_URL``   the KMS endpoint (a VPC endpoint; a test server): ``https://``, or
                           ``http://`` to a loopback address only (data keys travel in it)
``HMD_AWS_ENDPOINT_URLS``  an endpoint per region, ``us-west-2=https://...,eu-west-1=https://...``
                           (a VPC endpoint serves its own region only); the regions it leaves
                           out use ``HMD_AWS_ENDPOINT_URL`` or the SDK's
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

import ipaddress
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from heimdall.errors import ConfigurationError

__all__ = [
    "DEFAULT_CONCURRENCY",
    "FILE_KEYS",
    "KEY_ORIGINS",
    "AwsSettings",
    "aws_settings",
    "check_aws_key_name",
    "key_id_of",
]

DEFAULT_CONCURRENCY: Final = 8

FILE_KEYS: Final = frozenset(
    {
        "aws_key",
        "aws_account_id",
        "aws_key_origins",
        "aws_region",
        "aws_role_arn",
        "aws_endpoint_url",
        "aws_regions",
        "aws_endpoint_urls",
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
_ROLE_ARN: Final = re.compile(
    r"arn:aws[a-z-]*:iam::(?P<account>[0-9]{12}):role/[A-Za-z0-9+=,.@_/-]{1,512}\Z"
)
_ACCOUNT: Final = re.compile(r"[0-9]{12}\Z")
# Where key material can come from (DescribeKey's Origin). AWS_KMS is always accepted: it is what
# heimdall's own rotations make.
AWS_KMS_ORIGIN: Final = "AWS_KMS"
KEY_ORIGINS: Final = frozenset({AWS_KMS_ORIGIN, "EXTERNAL", "AWS_CLOUDHSM", "EXTERNAL_KEY_STORE"})
_HOST: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?\Z")


@dataclass(frozen=True, slots=True)
class AwsSettings:
    """Where the key is and how to reach it. Holds no credential."""

    key_name: str = "heimdall-pii"
    region: str | None = None
    # HMD_AWS_ACCOUNT_ID, or the account of an ARN in HMD_AWS_KEY or HMD_AWS_ROLE_ARN: the
    # account every key must be in (None: the credentials' own, from STS).
    account: str | None = None
    key_origins: frozenset[str] = frozenset({AWS_KMS_ORIGIN})
    adopt_key: str | None = None  # key ID or ARN the bootstrap adopts as version 1
    role_arn: str | None = None
    endpoint_url: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    timeout: float = 5.0
    max_attempts: int = 3
    # HMD_AWS_REGIONS after its first region (which is *region*), in order of preference.
    replica_regions: tuple[str, ...] = ()
    # (region, URL) pairs of HMD_AWS_ENDPOINT_URLS.
    endpoint_urls: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        check_aws_key_name(self.key_name)
        if self.region is not None and not _REGION.match(self.region):
            raise ConfigurationError(f"HMD_AWS_REGION {self.region!r} is not an AWS region name")
        if self.role_arn is not None and not _ROLE_ARN.match(self.role_arn):
            raise ConfigurationError("HMD_AWS_ROLE_ARN must be an IAM role ARN")
        if self.account is not None and not _ACCOUNT.match(self.account):
            raise ConfigurationError("HMD_AWS_ACCOUNT_ID must be an AWS account ID (12 digits)")
        if AWS_KMS_ORIGIN not in self.key_origins or not self.key_origins <= KEY_ORIGINS:
            others = ", ".join(sorted(KEY_ORIGINS - {AWS_KMS_ORIGIN}))
            raise ConfigurationError(f"HMD_AWS_KEY_ORIGINS may add only {others} to AWS_KMS")
        if self.endpoint_url is not None:
            _check_endpoint(self.endpoint_url, "HMD_AWS_ENDPOINT_URL")
        self._check_regions()
        if not 1 <= self.concurrency <= 64:
            raise ConfigurationError("HMD_AWS_CONCURRENCY must be between 1 and 64")
        if not 0.1 <= self.timeout <= 300:
            raise ConfigurationError("HMD_AWS_TIMEOUT must be between 0.1 and 300")
        if not 1 <= self.max_attempts <= 10:
            raise ConfigurationError("HMD_AWS_MAX_ATTEMPTS must be between 1 and 10")

    def _check_regions(self) -> None:
        if self.replica_regions and self.region is None:
            raise ConfigurationError("replica regions need a first region (HMD_AWS_REGIONS)")
        names = self.regions
        for region in self.replica_regions:
            if not _REGION.match(region):
                raise ConfigurationError(f"HMD_AWS_REGIONS: {region!r} is not an AWS region name")
        if len(set(names)) != len(names):
            raise ConfigurationError("HMD_AWS_REGIONS names a region twice")
        mapped = [region for region, _ in self.endpoint_urls]
        if len(set(mapped)) != len(mapped):
            raise ConfigurationError("HMD_AWS_ENDPOINT_URLS names a region twice")
        for region, url in self.endpoint_urls:
            if region not in names:
                raise ConfigurationError(
                    f"HMD_AWS_ENDPOINT_URLS names {region}, which is not among the regions "
                    "(HMD_AWS_REGIONS or HMD_AWS_REGION)"
                )
            _check_endpoint(url, "HMD_AWS_ENDPOINT_URLS")
        adopted = self.adopt_key and key_id_of(self.adopt_key)
        if self.replica_regions and adopted and not adopted.startswith("mrk-"):
            raise ConfigurationError(
                "HMD_AWS_KEY names a single-Region KMS key; with several regions the key "
                "adopted as version 1 must be a multi-Region key (mrk-...)"
            )

    @property
    def regions(self) -> tuple[str | None, ...]:
        """Every region in order of preference: the first one holds the primary keys. ``None``
        is the SDK's region (no HMD_AWS_REGION, HMD_AWS_REGIONS or ARN named one)."""
        return (self.region, *self.replica_regions)

    def endpoint_for(self, region: str | None) -> str | None:
        """The KMS endpoint of *region*: its own, else HMD_AWS_ENDPOINT_URL, else the SDK's."""
        return dict(self.endpoint_urls).get(region or "", self.endpoint_url)


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


def key_id_of(key: str) -> str:
    """The key ID of a key ARN (``arn:...:key/<id>``), or *key* itself."""
    return key.rpartition(":key/")[2] if ":key/" in key else key


def _check_endpoint(url: str, variable: str) -> None:
    """Refuse an endpoint URL heimdall should not send requests to; never echoes it (a URL may
    carry credentials by mistake). Requests hold data keys (Encrypt's plaintext, the answers of
    GenerateDataKey and Decrypt), so plain http:// may only reach this machine."""
    problem = _endpoint_problem(url)
    if problem:
        raise ConfigurationError(f"{variable}: {problem}")


def _endpoint_problem(url: str) -> str:
    parsed = _split(url)
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "an endpoint must be an http:// or https:// URL with a host name, and no spaces"
    host = parsed.hostname
    problems = (
        ("@" in parsed.netloc, "an endpoint URL must not carry credentials"),
        ("?" in url or "#" in url, "an endpoint URL takes no query or fragment"),
        (not (_HOST.match(host) or _is_ip(host)), "an endpoint's host must be a name or an IP"),
        (
            parsed.scheme == "http" and not _is_loopback(host),
            "an endpoint must be https:// (data keys travel in it); http:// is for loopback only",
        ),
    )
    return next((message for failed, message in problems if failed), "")


def _split(url: str) -> urllib.parse.SplitResult | None:
    """*url* split, or None when it cannot be (spaces, control characters, a bad port)."""
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return None
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018 - raises ValueError unless the port is a number 0-65535
    except ValueError:
        return None
    return parsed


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def _regions(value: str) -> list[str]:
    regions = [part.strip() for part in value.split(",")]
    for region in regions:
        if not _REGION.match(region):
            raise ConfigurationError(
                f"HMD_AWS_REGIONS must be AWS region names separated by commas; {region!r} "
                "is not one"
            )
    return regions


def _endpoint_map(value: str) -> tuple[tuple[str, str], ...]:
    """``region=URL`` pairs separated by commas. A malformed pair is never echoed: a URL may
    carry credentials by mistake."""
    pairs = []
    for part in filter(None, (part.strip() for part in value.split(","))):
        region, equals, url = part.partition("=")
        if not equals or not _REGION.match(region.strip()) or not url.strip():
            raise ConfigurationError(
                "HMD_AWS_ENDPOINT_URLS must be region=URL pairs separated by commas"
            )
        pairs.append((region.strip(), url.strip()))
    return tuple(pairs)


def _account(values: Mapping[str, str], from_key: str | None) -> str | None:
    """The account the keys must be in: HMD_AWS_ACCOUNT_ID, and the accounts of the ARNs in
    HMD_AWS_KEY and HMD_AWS_ROLE_ARN, which must all agree (heimdall finds its keys through
    aliases, which name keys of the caller's own account only)."""
    given = values.get("aws_account_id") or ""
    if given and not _ACCOUNT.match(given):
        raise ConfigurationError("HMD_AWS_ACCOUNT_ID must be an AWS account ID (12 digits)")
    named = [
        (where, account)
        for where, account in (
            ("HMD_AWS_ACCOUNT_ID", values.get("aws_account_id") or None),
            ("HMD_AWS_KEY", from_key),
            ("HMD_AWS_ROLE_ARN", _role_account(values.get("aws_role_arn") or "")),
        )
        if account
    ]
    for where, account in named[1:]:
        if account != named[0][1]:
            raise ConfigurationError(
                f"{where} is in account {account} but {named[0][0]} names {named[0][1]}: "
                "heimdall's keys, and the role that uses them, are in one account"
            )
    return named[0][1] if named else None


def _role_account(role_arn: str) -> str | None:
    match = _ROLE_ARN.match(role_arn)
    return match["account"] if match else None


def _origins(value: str) -> frozenset[str]:
    origins = {part.strip() for part in value.split(",") if part.strip()}
    unknown = origins - KEY_ORIGINS
    if unknown:
        raise ConfigurationError(
            "HMD_AWS_KEY_ORIGINS must be origins of KMS key material separated by commas: "
            f"{', '.join(sorted(KEY_ORIGINS - {AWS_KMS_ORIGIN}))}"
        )
    return frozenset(origins | {AWS_KMS_ORIGIN})


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
    replicas: tuple[str, ...] = ()
    if values.get("aws_regions"):
        first, *rest = _regions(values["aws_regions"])
        for given, where in ((region, "HMD_AWS_REGION"), (key.get("region"), "HMD_AWS_KEY")):
            if given and given != first:
                raise ConfigurationError(
                    f"{where} names {given} but HMD_AWS_REGIONS starts with {first}: the "
                    "first region holds the keys' primaries; set one of them"
                )
        region, replicas = first, tuple(rest)
    return AwsSettings(
        key_name=str(key["key_name"]),
        region=region or key.get("region"),
        replica_regions=replicas,
        endpoint_urls=_endpoint_map(values.get("aws_endpoint_urls", "")),
        account=_account(values, key.get("account")),
        key_origins=_origins(values.get("aws_key_origins", "")),
        adopt_key=key.get("adopt_key"),
        role_arn=values.get("aws_role_arn") or None,
        endpoint_url=values.get("aws_endpoint_url") or None,
        concurrency=int(
            _number("aws_concurrency", values.get("aws_concurrency", str(DEFAULT_CONCURRENCY)), int)
        ),
        timeout=float(_number("aws_timeout", values.get("aws_timeout", "5"), float)),
        max_attempts=int(_number("aws_max_attempts", values.get("aws_max_attempts", "3"), int)),
    )
