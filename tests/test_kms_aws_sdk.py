"""The AWS SDK seam: error translation, retries, logs, and the core running without boto3."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ReadTimeoutError,
)

from aws_server import ACCOUNT, DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, REGION, MotoServer
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
from heimdall.kms.aws import AwsKms
from heimdall.kms.aws_bootstrap import bootstrap
from heimdall.kms.aws_client import AliasTaken, AwsClients, aws_call, connect
from heimdall.kms.aws_config import AwsSettings
from heimdall.kms.aws_rotation import create_version_key
from heimdall.kms.aws_trust import UntrustedKey
from heimdall.kms.base import WrappedKey

AD = b"heimdall.data-key.v1\x00sdk"
# What AWS might put in a message: never to be shown.
AWS_MESSAGE = (
    "User: arn:aws:sts::123456789012:assumed-role/heimdall-app/i-0abc is not authorized "
    "to perform kms:Decrypt with ASIAIOSFODNN7EXAMPLE"
)


def _client_error(code: str, status: int = 400) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": AWS_MESSAGE},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "Decrypt")


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDeniedException", 400, AccessDenied),
        ("UnrecognizedClientException", 400, AccessDenied),
        ("ExpiredTokenException", 400, AccessDenied),
        ("NotFoundException", 400, KeyNotFound),
        ("DisabledException", 400, KeyVersionDisabled),
        ("KMSInvalidStateException", 400, KeyVersionDisabled),
        ("InvalidCiphertextException", 400, DecryptionFailed),
        ("IncorrectKeyException", 400, DecryptionFailed),
        ("ThrottlingException", 400, KmsUnavailable),
        ("KMSInternalException", 500, KmsUnavailable),
        ("DependencyTimeoutException", 503, KmsUnavailable),
        ("SomethingNew", 502, KmsUnavailable),
        ("SomethingNew", 429, KmsUnavailable),
        ("403", 403, AccessDenied),  # moto's answer for an IAM refusal
        ("AlreadyExistsException", 400, AliasTaken),
        ("ValidationException", 400, ConfigurationError),
        ("SomethingNew", 400, KmsError),
    ],
)
def test_aws_errors_become_heimdall_errors_without_aws_message_or_cause(
    code: str, status: int, expected: type[HeimdallError]
) -> None:
    def failing() -> None:
        raise _client_error(code, status)

    with pytest.raises(HeimdallError) as caught:
        aws_call("unwrap a data key", failing, key_identifier="aws:alias/k-v1")
    error = caught.value
    assert type(error) is expected
    # Nothing leads back to the SDK's exception: its answer, or the frames of its traceback
    # that built the request (a data key, a session token).
    assert (error.__cause__, error.__context__) == (None, None)
    assert "ASIA" not in str(error) and "arn:aws:sts" not in str(error)
    if isinstance(error, KmsError):
        assert error.provider == "aws" and error.key_identifier == "aws:alias/k-v1"
    if expected is DecryptionFailed:
        assert str(error) == "decryption failed"  # one fixed message: no oracle


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (EndpointConnectionError(endpoint_url="https://kms.example"), KmsUnavailable),
        (ReadTimeoutError(endpoint_url="https://kms.example"), KmsUnavailable),
        (NoCredentialsError(), ConfigurationError),
        (NoRegionError(), ConfigurationError),
    ],
)
def test_sdk_failures_become_heimdall_errors(
    raised: Exception, expected: type[HeimdallError]
) -> None:
    def failing() -> None:
        raise raised

    with pytest.raises(expected) as caught:
        aws_call("describe the key", failing)
    assert (caught.value.__cause__, caught.value.__context__) == (None, None)


# -- retries ----------------------------------------------------------------------------------


class _KmsStandIn:
    """A KMS endpoint on loopback that answers each operation from a script, and counts."""

    def __init__(self, script: dict[str, list[tuple[int, dict[str, Any]]]]) -> None:
        self.script = script
        self.calls: dict[str, int] = {}
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                operation = str(self.headers.get("X-Amz-Target", "")).rpartition(".")[2]
                count = stand_in.calls.get(operation, 0)
                stand_in.calls[operation] = count + 1
                answers = stand_in.script.get(operation) or [(400, {"__type": "Unknown"})]
                status, body = answers[min(count, len(answers) - 1)]
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _KmsStandIn:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


THROTTLED = (400, {"__type": "ThrottlingException", "message": "Rate exceeded"})
NO_ALIASES = (200, {"Aliases": [], "Truncated": False})


@pytest.fixture
def sdk_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[None]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # STS is never needed here (the settings name the account); were it asked, nothing listens.
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:9")
    yield


def _settings(url: str, **options: Any) -> AwsSettings:
    return AwsSettings(
        key_name="retried", region=REGION, endpoint_url=url, account=ACCOUNT, **options
    )


def test_throttling_is_retried_with_backoff(sdk_credentials: None) -> None:
    answered = pytest.raises(KeyNotFound, match="heimdall aws bootstrap")  # no alias: no key
    with _KmsStandIn({"ListAliases": [THROTTLED, THROTTLED, NO_ALIASES]}) as kms, answered:
        AwsKms(_settings(kms.url, max_attempts=3)).describe()
    assert kms.calls["ListAliases"] == 3


def test_throttling_that_lasts_is_unavailable_after_the_attempts(sdk_credentials: None) -> None:
    with _KmsStandIn({"ListAliases": [THROTTLED]}) as kms, pytest.raises(KmsUnavailable):
        AwsKms(_settings(kms.url, max_attempts=2)).describe()
    assert kms.calls["ListAliases"] == 2


def test_create_key_is_never_retried(sdk_credentials: None) -> None:
    """A CreateKey whose answer was lost may have made a key: a retry would make another."""
    failed = (500, {"__type": "KMSInternalException"})
    refused = pytest.raises(KmsUnavailable, match="not retried")
    with _KmsStandIn({"CreateKey": [failed, failed, failed]}) as kms, refused:
        create_version_key(connect(_settings(kms.url)), "retried", 2, None)
    assert kms.calls["CreateKey"] == 1


# -- logs -------------------------------------------------------------------------------------


def test_sdk_debug_logs_never_hold_a_data_key_or_credential(
    moto: MotoServer, aws_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """botocore logs bodies and headers at DEBUG; heimdall keeps those records from being
    made, even with botocore's loggers set to DEBUG by someone else."""
    caplog.set_level(logging.DEBUG)
    logging.getLogger("botocore").setLevel(logging.DEBUG)
    logging.getLogger("botocore.endpoint").setLevel(logging.DEBUG)
    try:
        provider = AwsKms(moto.settings(aws_key))  # the SDK's clients: the default chain
        data_key = provider.generate_data_key(AD)
        with data_key.plaintext as plaintext:
            key = bytes(plaintext.view())
        provider.unwrap(data_key.wrapped, AD).wipe()
        provider.rotate()
        provider.rewrap(data_key.wrapped, AD)
    finally:
        logging.getLogger("botocore").setLevel(logging.NOTSET)
        logging.getLogger("botocore.endpoint").setLevel(logging.NOTSET)
    text = caplog.text
    for secret in (base64.b64encode(key).decode(), key.hex(), repr(key), DUMMY_SECRET_KEY):
        assert secret not in text


# -- the core without boto3 ---------------------------------------------------------------------

_WITHOUT_BOTO3 = """
import sys
sys.modules["boto3"] = None  # an import of boto3 now raises ImportError
sys.modules["botocore"] = None
import heimdall, heimdall.app, heimdall.cli, heimdall.settings
from heimdall.errors import ConfigurationError
from heimdall.settings import Settings
settings = Settings.from_env({"HMD_KMS_PROVIDER": "aws", "HMD_AWS_REGION": "eu-west-1",
                              "HMD_DATA_DIR": sys.argv[1]})
try:
    heimdall.app.build(settings)
except ConfigurationError as exc:
    print("build:", exc)
try:
    import heimdall.kms.aws
except ImportError as exc:
    print("import:", exc)
"""


def test_the_core_never_imports_boto3_and_the_provider_names_the_extra(tmp_path: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_BOTO3, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "build: HMD_KMS_PROVIDER=aws needs the aws extra: pip install 'heimdall[aws]'" in lines
    assert any(line.startswith("import:") and "heimdall[aws]" in line for line in lines)


# -- what KMS answers is checked ------------------------------------------------------------

KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"


def _one_version(
    described: dict[str, Any] | None = None,
    **answers: tuple[int, dict[str, Any]],
) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """A stand-in KMS holding version 1 of the key ``retried`` (KEY_ID), described with
    *described* over the defaults, and *answers*."""
    described = described or {}
    tags = {"heimdall:key": "retried", "heimdall:version": "1", "heimdall:state": "active"}
    metadata = {
        "KeyId": KEY_ID,
        "Arn": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{KEY_ID}",
        "AWSAccountId": ACCOUNT,
        "KeyState": "Enabled",
        "KeySpec": "SYMMETRIC_DEFAULT",
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeyManager": "CUSTOMER",
        "Origin": "AWS_KMS",
        **described,
    }
    script: dict[str, list[tuple[int, dict[str, Any]]]] = {
        "ListAliases": [
            (200, {"Aliases": [{"AliasName": "alias/retried-v1", "TargetKeyId": KEY_ID}]})
        ],
        "DescribeKey": [(200, {"KeyMetadata": metadata})],
        "ListResourceTags": [
            (200, {"Tags": [{"TagKey": k, "TagValue": v} for k, v in tags.items()]})
        ],
    }
    for operation, answer in answers.items():
        script[operation] = [answer]
    return script


def _blob(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_data_key_kms_made_under_another_key_is_refused(sdk_credentials: None) -> None:
    answer = {
        "KeyId": "arn:aws:kms:eu-west-1:123456789012:key/ffffffff-12ab-34cd-56ef-1234567890ab",
        "Plaintext": _blob(b"k" * 32),
        "CiphertextBlob": _blob(b"c" * 64),
    }
    refused = pytest.raises(KmsError, match="another key")
    with _KmsStandIn(_one_version(GenerateDataKey=(200, answer))) as kms, refused:
        AwsKms(_settings(kms.url)).generate_data_key(AD)


def test_an_unwrapped_data_key_of_the_wrong_size_is_refused(sdk_credentials: None) -> None:
    answer = {
        "KeyId": f"arn:aws:kms:eu-west-1:123456789012:key/{KEY_ID}",
        "Plaintext": _blob(b"k" * 16),
    }
    wrapped = WrappedKey("aws:alias/retried-v1", 1, b"c" * 64)
    refused = pytest.raises(KmsError, match="wrong size")
    with _KmsStandIn(_one_version(Decrypt=(200, answer))) as kms, refused:
        AwsKms(_settings(kms.url)).unwrap(wrapped, AD)


def test_an_aws_managed_key_behind_a_version_alias_is_refused_before_any_call(
    sdk_credentials: None,
) -> None:
    """moto calls its own AWS managed keys customer managed: a stand-in says what AWS says."""
    generated = (200, {"KeyId": KEY_ID, "Plaintext": _blob(b"k" * 32)})
    script = _one_version({"KeyManager": "AWS"}, GenerateDataKey=generated)
    refused = pytest.raises(UntrustedKey, match="not a customer managed key")
    with _KmsStandIn(script) as kms, refused:
        AwsKms(_settings(kms.url)).generate_data_key(AD)
    assert "GenerateDataKey" not in kms.calls


def test_a_data_key_kms_made_in_another_account_is_refused(sdk_credentials: None) -> None:
    answer = {
        "KeyId": f"arn:aws:kms:eu-west-1:111111111111:key/{KEY_ID}",
        "Plaintext": _blob(b"k" * 32),
        "CiphertextBlob": _blob(b"c" * 64),
    }
    refused = pytest.raises(KmsError, match="another key")
    with _KmsStandIn(_one_version(GenerateDataKey=(200, answer))) as kms, refused:
        AwsKms(_settings(kms.url)).generate_data_key(AD)


def test_a_translated_error_leads_nowhere_near_the_request(moto: MotoServer, aws_key: str) -> None:
    """An error from KMS while wrapping a data key: nothing chained to it holds the request."""
    provider = AwsKms(moto.settings(aws_key), moto.clients())
    data_key = provider.generate_data_key(AD)
    with pytest.raises(DecryptionFailed) as caught:
        provider.unwrap(data_key.wrapped, b"another context")
    assert (caught.value.__cause__, caught.value.__context__) == (None, None)
    data_key.plaintext.wipe()


class _OneAccount:
    """STS as far as the bootstrap asks it."""

    def get_caller_identity(self) -> dict[str, str]:
        return {"Account": ACCOUNT, "Arn": f"arn:aws:iam::{ACCOUNT}:user/operator"}


def test_a_key_policy_refused_at_creation_is_explained(sdk_credentials: None) -> None:
    """AWS's lockout safety check (moto runs none): CreateKey with a key policy that would not
    let the creator call PutKeyPolicy answers MalformedPolicyDocumentException."""
    refused = (400, {"__type": "MalformedPolicyDocumentException", "message": AWS_MESSAGE})
    script: dict[str, list[tuple[int, dict[str, Any]]]] = {
        "ListAliases": [NO_ALIASES],
        "DescribeKey": [(400, {"__type": "NotFoundException"})],
        "CreateKey": [refused],
    }
    with _KmsStandIn(script) as kms, pytest.raises(ConfigurationError) as caught:
        made = connect(_settings(kms.url))
        clients = AwsClients(kms=made.kms, once=made.once, sts=_OneAccount())
        bootstrap(clients, _settings(kms.url), {})
    message = str(caught.value)
    assert "(MalformedPolicyDocumentException)" in message
    assert "kms:PutKeyPolicy" in message and "ASIA" not in message
    assert kms.calls["CreateKey"] == 1
