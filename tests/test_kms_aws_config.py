"""HMD_AWS_* settings: the key by alias, ARN or ID; regions, role, endpoints, limits."""

from __future__ import annotations

import pytest

from heimdall.errors import ConfigurationError
from heimdall.kms.aws_config import AwsSettings
from heimdall.settings import Settings, unknown_variables

KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
ALL_VARIABLES = {
    "HMD_KMS_PROVIDER": "aws",
    "HMD_AWS_KEY": "alias/heimdall-pii",
    "HMD_AWS_REGION": "eu-west-1",
    "HMD_AWS_ROLE_ARN": "arn:aws:iam::111122223333:role/heimdall-app",
    "HMD_AWS_ENDPOINT_URL": "https://vpce-1.kms.eu-west-1.vpce.amazonaws.com",
    "HMD_AWS_CONCURRENCY": "16",
    "HMD_AWS_TIMEOUT": "2.5",
    "HMD_AWS_MAX_ATTEMPTS": "5",
}


def _aws(environ: dict[str, str]) -> AwsSettings:
    settings = Settings.from_env({"HMD_KMS_PROVIDER": "aws", **environ})
    assert settings.aws is not None
    assert settings.kms_key_name == settings.aws.key_name
    return settings.aws


def test_every_aws_variable_is_a_known_setting() -> None:
    assert unknown_variables(ALL_VARIABLES) == []
    aws = _aws(ALL_VARIABLES)
    assert (aws.region, aws.concurrency, aws.timeout, aws.max_attempts) == (
        "eu-west-1",
        16,
        2.5,
        5,
    )
    assert aws.role_arn == ALL_VARIABLES["HMD_AWS_ROLE_ARN"]
    assert unknown_variables({"HMD_AWS_REGON": "eu-west-1"}) == ["HMD_AWS_REGON"]


def test_defaults_name_the_alias_after_the_key_name_and_leave_the_region_to_the_sdk() -> None:
    aws = _aws({"HMD_KMS_KEY_NAME": "customer-pii"})
    assert (aws.key_name, aws.region, aws.role_arn, aws.endpoint_url) == (
        "customer-pii",
        None,
        None,
        None,
    )
    assert aws.concurrency == 8


def test_the_key_by_alias_or_alias_arn_names_the_key_and_its_region() -> None:
    assert _aws({"HMD_AWS_KEY": "alias/customer-pii"}).key_name == "customer-pii"
    arn = _aws({"HMD_AWS_KEY": "arn:aws:kms:us-west-2:111122223333:alias/customer-pii"})
    assert (arn.key_name, arn.region, arn.account) == ("customer-pii", "us-west-2", "111122223333")


def test_a_key_id_or_key_arn_is_the_key_the_bootstrap_adopts_as_version_1() -> None:
    by_id = _aws({"HMD_AWS_KEY": KEY_ID, "HMD_KMS_KEY_NAME": "customer-pii"})
    assert (by_id.key_name, by_id.adopt_key) == ("customer-pii", KEY_ID)
    key_arn = f"arn:aws:kms:eu-central-1:111122223333:key/{KEY_ID}"
    by_arn = _aws({"HMD_AWS_KEY": key_arn})
    assert (by_arn.adopt_key, by_arn.region, by_arn.account) == (
        key_arn,
        "eu-central-1",
        "111122223333",
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"HMD_AWS_KEY": "alias/a", "HMD_KMS_KEY_NAME": "b"}, "set one of them"),
        ({"HMD_AWS_KEY": "heimdall-pii"}, "must be alias/<name>"),
        ({"HMD_AWS_KEY": "alias/aws/ebs"}, "letters, digits"),
        ({"HMD_KMS_KEY_NAME": "pii.v2"}, "no '.'"),
        ({"HMD_KMS_KEY_NAME": "pii-v2"}, "-v<number> or -audit"),
        ({"HMD_KMS_KEY_NAME": "pii-audit"}, "-v<number> or -audit"),
        (
            {
                "HMD_AWS_KEY": "arn:aws:kms:us-west-2:111122223333:alias/pii",
                "HMD_AWS_REGION": "eu-west-1",
            },
            "HMD_AWS_REGION is eu-west-1",
        ),
        ({"HMD_AWS_REGION": "Europe"}, "not an AWS region"),
        ({"HMD_AWS_ROLE_ARN": "heimdall-app"}, "IAM role ARN"),
        ({"HMD_AWS_ENDPOINT_URL": "kms.local:4566"}, "http://"),
        ({"HMD_AWS_ENDPOINT_URL": "https://key:secret@kms.local"}, "credentials"),
        ({"HMD_AWS_ENDPOINT_URL": "http://[::1"}, "http://"),
        ({"HMD_AWS_ENDPOINT_URL": "https://kms.local:abc"}, "http://"),
        ({"HMD_AWS_ENDPOINT_URL": "https://kms.local:99999"}, "http://"),
        ({"HMD_AWS_ENDPOINT_URL": "https://kms .local"}, "no spaces"),
        ({"HMD_AWS_ENDPOINT_URL": "https://kms.local/?x=1"}, "no query"),
        ({"HMD_AWS_ENDPOINT_URL": "https://kms_local!"}, "a name or an IP"),
        ({"HMD_AWS_ENDPOINT_URL": "http://kms.example.com"}, "must be https://"),
        ({"HMD_AWS_ENDPOINT_URL": "http://10.0.0.5:4566"}, "must be https://"),
        ({"HMD_AWS_ACCOUNT_ID": "12345"}, "12 digits"),
        (
            {
                "HMD_AWS_ACCOUNT_ID": "111122223333",
                "HMD_AWS_KEY": "arn:aws:kms:us-west-2:444455556666:alias/pii",
            },
            "HMD_AWS_KEY is in account 444455556666 but HMD_AWS_ACCOUNT_ID names 111122223333",
        ),
        (
            {
                "HMD_AWS_KEY": "arn:aws:kms:us-west-2:444455556666:alias/pii",
                "HMD_AWS_ROLE_ARN": "arn:aws:iam::111122223333:role/heimdall-app",
            },
            "HMD_AWS_ROLE_ARN is in account 111122223333",
        ),
        ({"HMD_AWS_KEY_ORIGINS": "EXTERNAL,IMPORTED"}, "origins of KMS key material"),
        ({"HMD_AWS_CONCURRENCY": "0"}, "between 1 and 64"),
        ({"HMD_AWS_MAX_ATTEMPTS": "many"}, "a number"),
    ],
)
def test_bad_settings_are_refused_with_the_rule(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _aws(environ)


def test_a_secret_in_an_endpoint_is_never_echoed() -> None:
    with pytest.raises(ConfigurationError) as caught:
        _aws({"HMD_AWS_ENDPOINT_URL": "https://key:hunter2@kms.local"})
    assert "hunter2" not in str(caught.value)


def test_regions_in_order_of_preference_the_first_holding_the_primaries() -> None:
    aws = _aws({"HMD_AWS_REGIONS": "us-west-2, eu-west-1,ap-south-1"})
    assert (aws.region, aws.replica_regions) == ("us-west-2", ("eu-west-1", "ap-south-1"))
    assert aws.regions == ("us-west-2", "eu-west-1", "ap-south-1")
    assert unknown_variables({"HMD_AWS_REGIONS": "x", "HMD_AWS_ENDPOINT_URLS": "y"}) == []
    same = _aws({"HMD_AWS_REGIONS": "us-west-2,eu-west-1", "HMD_AWS_REGION": "us-west-2"})
    assert same.regions == aws.regions[:2]
    assert _aws({"HMD_AWS_REGION": "eu-west-1"}).regions == ("eu-west-1",)
    assert _aws({}).regions == (None,)


def test_each_region_has_its_endpoint_or_else_the_common_one() -> None:
    aws = _aws(
        {
            "HMD_AWS_REGIONS": "us-west-2,eu-west-1,ap-south-1",
            "HMD_AWS_ENDPOINT_URLS": "us-west-2=http://127.0.0.1:1234, eu-west-1=https://vpce-2",
            "HMD_AWS_ENDPOINT_URL": "http://127.0.0.1:9999",
        }
    )
    assert aws.endpoint_for("us-west-2") == "http://127.0.0.1:1234"
    assert aws.endpoint_for("eu-west-1") == "https://vpce-2"
    assert aws.endpoint_for("ap-south-1") == "http://127.0.0.1:9999"
    assert _aws({"HMD_AWS_REGIONS": "us-west-2,eu-west-1"}).endpoint_for("eu-west-1") is None


def test_a_multi_region_key_id_is_adopted_across_regions() -> None:
    key = "mrk-1234abcd12ab34cd56ef1234567890ab"
    aws = _aws({"HMD_AWS_REGIONS": "us-west-2,eu-west-1", "HMD_AWS_KEY": key})
    assert aws.adopt_key == key


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"HMD_AWS_REGIONS": "us-west-2,,eu-west-1"}, "'' is not one"),
        ({"HMD_AWS_REGIONS": "us-west-2,Europe"}, "'Europe' is not one"),
        ({"HMD_AWS_REGIONS": "us-west-2,eu-west-1,us-west-2"}, "names a region twice"),
        (
            {"HMD_AWS_REGIONS": "us-west-2,eu-west-1", "HMD_AWS_REGION": "eu-west-1"},
            "HMD_AWS_REGION names eu-west-1 but HMD_AWS_REGIONS starts with us-west-2",
        ),
        (
            {
                "HMD_AWS_REGIONS": "us-west-2,eu-west-1",
                "HMD_AWS_KEY": "arn:aws:kms:eu-west-1:111122223333:alias/pii",
            },
            "HMD_AWS_KEY names eu-west-1 but HMD_AWS_REGIONS starts with us-west-2",
        ),
        (
            {"HMD_AWS_REGIONS": "us-west-2,eu-west-1", "HMD_AWS_KEY": KEY_ID},
            "must be a multi-Region key",
        ),
        (
            {"HMD_AWS_REGION": "eu-west-1", "HMD_AWS_ENDPOINT_URLS": "us-west-2=http://a"},
            "names us-west-2, which is not among the regions",
        ),
        ({"HMD_AWS_ENDPOINT_URLS": "http://127.0.0.1:1234"}, "region=URL pairs"),
        (
            {
                "HMD_AWS_REGIONS": "us-west-2,eu-west-1",
                "HMD_AWS_ENDPOINT_URLS": "us-west-2=http://a,us-west-2=http://b",
            },
            "names a region twice",
        ),
        (
            {"HMD_AWS_REGION": "eu-west-1", "HMD_AWS_ENDPOINT_URLS": "eu-west-1=kms.local:4566"},
            "http://",
        ),
    ],
)
def test_bad_region_settings_are_refused_with_the_rule(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        _aws(environ)


@pytest.mark.parametrize(
    "value",
    ["eu-west-1=https://key:hunter2@kms.local", "eu-west-1:https://key:hunter2@kms.local"],
)
def test_a_secret_in_an_endpoint_of_a_region_is_never_echoed(value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        _aws({"HMD_AWS_REGION": "eu-west-1", "HMD_AWS_ENDPOINT_URLS": value})
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:4566", "http://localhost:4566", "http://[::1]:4566", "https://kms.example"],
)
def test_plain_http_reaches_only_this_machine(url: str) -> None:
    assert _aws({"HMD_AWS_ENDPOINT_URL": url}).endpoint_url == url


def test_the_account_comes_from_the_setting_or_an_arn_and_they_must_agree() -> None:
    assert _aws({}).account is None  # the credentials' own, asked of STS
    assert _aws({"HMD_AWS_ACCOUNT_ID": "111122223333"}).account == "111122223333"
    role = "arn:aws:iam::111122223333:role/heimdall-app"
    assert _aws({"HMD_AWS_ROLE_ARN": role}).account == "111122223333"
    key = "arn:aws:kms:us-west-2:111122223333:alias/pii"
    same = {"HMD_AWS_ACCOUNT_ID": "111122223333", "HMD_AWS_KEY": key, "HMD_AWS_ROLE_ARN": role}
    assert _aws(same).account == "111122223333"


def test_key_origins_add_to_aws_kms_which_is_always_accepted() -> None:
    assert _aws({}).key_origins == {"AWS_KMS"}
    origins = _aws({"HMD_AWS_KEY_ORIGINS": " EXTERNAL, AWS_CLOUDHSM "}).key_origins
    assert origins == {"AWS_KMS", "EXTERNAL", "AWS_CLOUDHSM"}
    with pytest.raises(ConfigurationError, match="may add only"):
        AwsSettings(key_origins=frozenset({"EXTERNAL"}))


@pytest.mark.parametrize(
    "url", ["https://key:hunter2@[::1", "https://key:hunter2@kms.local:port", "http://hunter2 x"]
)
def test_a_malformed_endpoint_is_refused_without_echoing_it(url: str) -> None:
    for variable, value in (
        ("HMD_AWS_ENDPOINT_URL", url),
        ("HMD_AWS_ENDPOINT_URLS", f"eu-west-1={url}"),
    ):
        with pytest.raises(ConfigurationError) as caught:
            _aws({"HMD_AWS_REGION": "eu-west-1", variable: value})
        assert "hunter2" not in str(caught.value)
        assert (caught.value.__cause__, caught.value.__context__) == (None, None)
