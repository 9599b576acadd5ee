"""The AWS SDK seam of the AWS KMS provider: clients, credentials, retries, error translation.

* **Credentials** come from the SDK's default chain (environment, SSO, shared config, ECS/EKS
  task and pod roles, the instance profile); heimdall never reads an AWS secret itself. With
  ``HMD_AWS_ROLE_ARN`` those credentials only assume that role through STS (cross-account
  access, spec: Authentication Methods), and botocore refreshes the role's temporary
  credentials before they expire. Nothing is fetched before the first call.
* **Retries**: botocore's ``standard`` mode, with ``HMD_AWS_MAX_ATTEMPTS`` attempts in all: it
  retries throttling (ThrottlingException and the like), 5xx answers and connection errors with
  full-jitter exponential backoff, and stops early when a client's retry quota (a token bucket
  every failure draws from) runs dry, so an outage is not met with a retry storm. Not
  ``adaptive``, which adds client-side rate limiting that blocks the calling threads and that
  botocore documents as experimental. Calls that a retry could repeat (CreateKey would make a
  second key; CreateAlias or UpdateAlias could undo another process's change) go through
  :attr:`AwsClients.once`, a client that never retries; their callers read the state again
  after a failure instead.
* **Errors** are translated in one place, :func:`aws_call`, with messages written here: an
  AWS message (which may name principals and resources) is never shown, and neither
  ``__cause__`` nor ``__context__`` leads back to the SDK's exception, so no credential, ARN or
  data key reaches a message or can be reached from the error.
* **Logs**: botocore logs request and response bodies, headers and signing steps at DEBUG: the
  Plaintext of every GenerateDataKey and Decrypt, the session token. :func:`connect` keeps
  those records from ever being made (:func:`quiet_sdk_logs`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from heimdall.errors import (
    AccessDenied,
    ConfigurationError,
    DecryptionFailed,
    HeimdallError,
    KeyNotFound,
    KeyVersionDisabled,
    KmsError,
    KmsUnavailable,
)
from heimdall.kms.aws_config import AwsSettings

try:
    import boto3
    import botocore.session
    from botocore.config import Config
    from botocore.credentials import (
        AssumeRoleCredentialFetcher,
        CredentialProvider,
        CredentialResolver,
        DeferredRefreshableCredentials,
    )
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        CredentialRetrievalError,
        HTTPClientError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        SSOError,
        TokenRetrievalError,
    )
    from botocore.exceptions import (
        ConnectionError as SdkConnectionError,
    )
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "the AWS KMS provider needs the aws extra: pip install 'heimdall[aws]'"
    ) from exc

__all__ = [
    "PROVIDER",
    "AliasTaken",
    "AwsClients",
    "RegionClients",
    "aws_call",
    "connect",
    "quiet_sdk_logs",
]

PROVIDER: Final = "aws"
_Result = TypeVar("_Result")
ROLE_SESSION_NAME: Final = "heimdall"
_CODE: Final = re.compile(r"[A-Za-z0-9.]{1,64}\Z")

_DENIED: Final = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "ExpiredToken",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
    }
)
_UNAVAILABLE: Final = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalError",
    }
)
_REFUSED: Final = frozenset(
    {
        "ValidationException",
        "MalformedPolicyDocumentException",
        "InvalidArnException",
        "InvalidAliasNameException",
        "InvalidKeyUsageException",
        "UnsupportedOperationException",
        "TagException",
        "LimitExceededException",
    }
)


class AliasTaken(KmsError):
    """CreateAlias found the alias already there (another process made it first), or
    ReplicateKey the replica."""


@dataclass(frozen=True, slots=True)
class RegionClients:
    """One region's KMS clients."""

    region: str
    kms: Any  # idempotent calls: retried (standard mode)
    once: Any  # KMS calls a retry could repeat: one attempt only


@dataclass(frozen=True, slots=True)
class AwsClients:
    """The provider's clients. Thread-safe; made once per process. ``kms`` and ``once`` are
    the first region's, where keys are made; ``replicas`` the other regions', in order of
    preference (``HMD_AWS_REGIONS``)."""

    kms: Any  # idempotent calls: retried (standard mode)
    once: Any  # KMS calls a retry could repeat: one attempt only
    sts: Any
    region: str = ""  # of kms and once
    replicas: tuple[RegionClients, ...] = ()

    @property
    def first(self) -> RegionClients:
        return RegionClients(self.region, self.kms, self.once)

    @property
    def regions(self) -> tuple[RegionClients, ...]:
        """Every region's clients, the first region first."""
        return (self.first, *self.replicas)


class _AssumedRole(CredentialProvider):  # type: ignore[misc]  # botocore is untyped
    """The role's temporary credentials, fetched with the default chain's at first use and
    refreshed by botocore before they expire."""

    METHOD = "assume-role"

    def __init__(self, source: Any, role_arn: str) -> None:
        super().__init__()
        self._source = source
        self._role_arn = role_arn

    def load(self) -> Any:
        return DeferredRefreshableCredentials(refresh_using=self._fetch, method=self.METHOD)

    def _fetch(self) -> Any:
        credentials = self._source.get_credentials()
        if credentials is None:
            raise NoCredentialsError
        fetcher = AssumeRoleCredentialFetcher(
            client_creator=self._source.create_client,
            source_credentials=credentials,
            role_arn=self._role_arn,
            extra_args={"RoleSessionName": ROLE_SESSION_NAME},
        )
        return fetcher.fetch_credentials()


def _sdk_session(settings: AwsSettings) -> Any:
    """A botocore session: the default chain, or the role it assumes."""
    session = botocore.session.Session()
    if settings.region:
        session.set_config_variable("region", settings.region)
    if settings.role_arn:
        source = botocore.session.Session()
        if settings.region:
            source.set_config_variable("region", settings.region)
        resolver = CredentialResolver([_AssumedRole(source, settings.role_arn)])
        session.register_component("credential_provider", resolver)
    return session


def _config(settings: AwsSettings, attempts: int) -> Any:
    return Config(
        retries={"mode": "standard", "total_max_attempts": attempts},
        connect_timeout=settings.timeout,
        read_timeout=settings.timeout,
        max_pool_connections=max(10, settings.concurrency + 2),
        user_agent_extra="heimdall",
    )


def connect(settings: AwsSettings) -> AwsClients:
    """The clients of *settings*, for every region. Makes no request: credentials resolve at
    the first call."""
    quiet_sdk_logs()

    def clients() -> AwsClients:
        session = boto3.Session(botocore_session=_sdk_session(settings))
        retried = _config(settings, settings.max_attempts)
        first, *replicas = (
            _region_clients(session, settings, region) for region in settings.regions
        )
        return AwsClients(
            kms=first.kms,
            once=first.once,
            sts=session.client("sts", config=retried),
            region=first.region,
            replicas=tuple(replicas),
        )

    # botocore's ValueError quotes the URL, which could carry a secret by mistake; the settings
    # refuse such URLs before this (heimdall.kms.aws_config).
    with contextlib.suppress(ValueError):
        return aws_call("set up the AWS SDK", clients)
    raise ConfigurationError("the AWS SDK refused an endpoint URL (HMD_AWS_ENDPOINT_URL[S])")


def _region_clients(session: Any, settings: AwsSettings, region: str | None) -> RegionClients:
    """*region*'s clients (``None``: the SDK's region), at its own endpoint if it has one."""
    url = settings.endpoint_for(region)
    retried, single = _config(settings, settings.max_attempts), _config(settings, 1)
    kms = session.client("kms", region_name=region, endpoint_url=url, config=retried)
    once = session.client("kms", region_name=region, endpoint_url=url, config=single)
    return RegionClients(str(kms.meta.region_name), kms, once)


class _NoDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


# The loggers that write request and response bodies, headers or signing material at DEBUG.
_BODY_LOGGERS: Final = (
    "botocore.endpoint",
    "botocore.parsers",
    "botocore.auth",
    "botocore.hooks",
    "botocore.retryhandler",
    "botocore.httpsession",
    "botocore.credentials",
)


def quiet_sdk_logs() -> None:
    """Keep the SDK from logging at DEBUG: its DEBUG records hold data keys and tokens.

    The ``botocore`` and ``boto3`` loggers are raised to INFO unless set higher, and the loggers
    known to write bodies drop DEBUG records even where someone set them to DEBUG themselves.
    """
    for name in ("botocore", "boto3"):
        logger = logging.getLogger(name)
        if logger.level < logging.INFO:
            logger.setLevel(logging.INFO)
    for name in _BODY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoDebug) for f in logger.filters):
            logger.addFilter(_NoDebug())


_MESSAGES: Final[dict[type[HeimdallError], str]] = {
    AliasTaken: "AWS KMS could not {action}: it exists already{code}",
    AccessDenied: "AWS denied the credentials in use to {action}{code}",
    KeyNotFound: "AWS KMS could not {action}: no such key or alias{code}",
    KeyVersionDisabled: "AWS KMS could not {action}: the KMS key is disabled or pending "
    "deletion{code}",
    KmsUnavailable: "AWS KMS failed or throttled; could not {action}{code}",
    ConfigurationError: "AWS KMS refused to {action}{code}",
    KmsError: "AWS KMS answered unexpectedly; could not {action}{code}",
}
_BY_CODE: Final[dict[str, type[HeimdallError]]] = {
    "InvalidCiphertextException": DecryptionFailed,
    "IncorrectKeyException": DecryptionFailed,
    "KMSInvalidMacException": DecryptionFailed,
    "AlreadyExistsException": AliasTaken,
    "NotFoundException": KeyNotFound,
    "DisabledException": KeyVersionDisabled,
    "KMSInvalidStateException": KeyVersionDisabled,
    **dict.fromkeys(_DENIED, AccessDenied),
    **dict.fromkeys(_UNAVAILABLE, KmsUnavailable),
    **dict.fromkeys(_REFUSED, ConfigurationError),
}


def _kind(code: str, status: int) -> type[HeimdallError]:
    """By the answer's error code, else (a proxy, an emulator) by its HTTP status."""
    if code in _BY_CODE:
        return _BY_CODE[code]
    if status == 429 or status >= 500:
        return KmsUnavailable
    if status in (401, 403):
        return AccessDenied
    return KmsError


def _client_error(exc: ClientError, action: str, key_identifier: str) -> HeimdallError:
    """The heimdall error for an error answer; its message is written here, never AWS's."""
    response = exc.response if isinstance(exc.response, dict) else {}
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    kind = _kind(code, status if isinstance(status, int) else 0)
    if kind is DecryptionFailed:
        return DecryptionFailed()
    message = _MESSAGES[kind].format(action=action, code=f" ({code})" if _CODE.match(code) else "")
    if kind is ConfigurationError:
        return ConfigurationError(message)
    assert issubclass(kind, KmsError)
    return kind(message, provider=PROVIDER, key_identifier=key_identifier)


def aws_call(action: str, call: Callable[[], _Result], *, key_identifier: str = "") -> _Result:
    """*call*'s result; whatever the SDK raises becomes one of :mod:`heimdall.errors`, with a
    message written here (*action* completes "could not ..."). The error is raised after the
    ``except`` block has ended, so neither its ``__cause__`` nor its ``__context__`` holds the
    SDK's exception: that one carries AWS's answer, and its traceback the frames that built the
    request (a data key being wrapped, the session token that signed it)."""
    try:
        return call()
    except (ClientError, BotoCoreError) as exc:
        error = _translate(exc, action, key_identifier)
    raise error


def _translate(exc: Exception, action: str, key_identifier: str) -> HeimdallError:
    ids = {"provider": PROVIDER, "key_identifier": key_identifier}
    if isinstance(exc, ClientError):
        return _client_error(exc, action, key_identifier)
    if isinstance(exc, NoRegionError):
        return ConfigurationError("no AWS region: set HMD_AWS_REGION (or the SDK's AWS_REGION)")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return ConfigurationError(
            f"no AWS credentials were found to {action}; heimdall uses the SDK's default chain "
            "(instance profile, ECS/EKS role, environment, SSO)"
        )
    if isinstance(exc, CredentialRetrievalError | TokenRetrievalError | SSOError):
        return AccessDenied(f"the AWS credentials could not be obtained to {action}", **ids)
    if isinstance(exc, SdkConnectionError | HTTPClientError):
        return KmsUnavailable(f"AWS KMS could not be reached to {action}", **ids)
    return KmsError(f"the AWS SDK failed to {action}", **ids)
