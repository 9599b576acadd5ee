"""The PII policy: classification of records and validation of policy files."""

from __future__ import annotations

import json
import pathlib
import re
import tomllib

import pytest

from heimdall.errors import ConfigurationError, HeimdallError
from heimdall.normalize import Normalizer
from heimdall.policy import (
    ClassifiedRecord,
    FieldAction,
    FieldRule,
    Policy,
    RecordError,
    default_policy,
    load_policy,
)

SAMPLE_TOML = """\
# heimdall PII policy
default_action = "drop"
record_id_field = "id"
source_field = "source"

[fields.email]
action = "encrypt"
normalize = "email"

[fields.country]
action = "plain"
"""


def _write(tmp_path: pathlib.Path, name: str, text: str) -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_default_policy_classifies_encrypt_plain_and_drop_fields() -> None:
    record = {
        "id": "r-1",
        "source": "crm",
        "email": " Alice@Example.COM ",
        "phone": "+1 (555) 010-0199",
        "ssn": 123456789,
        "dob": "04.03.1990",
        "country": " DE ",
        "plan": "pro",
        "password": "hunter2",
        "favourite_colour": "teal",
    }

    classified = default_policy().classify(record)

    assert classified == ClassifiedRecord(
        record_id="r-1",
        source="crm",
        encrypt=(
            ("email", "Alice@Example.COM", Normalizer.EMAIL),
            ("phone", "+1 (555) 010-0199", Normalizer.PHONE),
            ("ssn", "123456789", Normalizer.DIGITS),
            ("dob", "04.03.1990", Normalizer.DATE),
        ),
        plain={"country": "DE", "plan": "pro"},
        dropped=("password", "favourite_colour"),
    )


def test_default_policy_drops_unknown_fields_and_names_every_bundled_rule() -> None:
    policy = default_policy()
    assert policy.default_action is FieldAction.DROP
    assert policy.rule_for("never_heard_of_it") == FieldRule(FieldAction.DROP)
    assert policy.rule_for("ip_address") == FieldRule(FieldAction.ENCRYPT, Normalizer.IP)
    assert policy.rule_for("first_name") == FieldRule(FieldAction.ENCRYPT, Normalizer.TEXT)
    assert policy.rule_for("date_of_birth") == FieldRule(FieldAction.ENCRYPT, Normalizer.DATE)
    assert {n for n, r in policy.rules.items() if r.action is FieldAction.PLAIN} == {
        "country",
        "signup_channel",
        "plan",
        "created_at",
    }
    assert len(policy.rules) == 15


def test_none_and_blank_values_are_skipped_entirely() -> None:
    classified = default_policy().classify(
        {"email": None, "name": "   ", "country": "", "password": None, "phone": "\t"}
    )
    assert classified.encrypt == ()
    assert dict(classified.plain) == {}
    assert classified.dropped == ()
    assert classified.record_id is None
    assert classified.source is None


def test_scalars_become_text_for_encrypt_fields_and_keep_their_type_when_plain() -> None:
    policy = Policy(
        {"flag": FieldRule(FieldAction.ENCRYPT), "score": FieldRule(FieldAction.ENCRYPT)},
        default_action=FieldAction.PLAIN,
    )
    classified = policy.classify({"flag": False, "score": 1.5, "count": 3, "active": True})
    assert classified.encrypt == (
        ("flag", "false", Normalizer.EXACT),
        ("score", "1.5", Normalizer.EXACT),
    )
    assert dict(classified.plain) == {"count": 3, "active": True}
    assert type(classified.plain["active"]) is bool


@pytest.mark.parametrize("value", [["alice@example.com"], {"home": "alice@example.com"}])
@pytest.mark.parametrize("field_name", ["email", "country"])
def test_container_value_raises_record_error_naming_the_field_not_the_value(
    field_name: str, value: object
) -> None:
    with pytest.raises(RecordError, match=field_name) as caught:
        default_policy().classify({field_name: value})
    assert "alice" not in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, HeimdallError)


def test_container_value_in_a_dropped_field_is_simply_dropped() -> None:
    classified = default_policy().classify({"tags": ["a", "b"], "meta": {"k": "v"}})
    assert classified.dropped == ("tags", "meta")


def test_id_and_source_are_structural_and_never_classified() -> None:
    policy = Policy(
        {}, default_action=FieldAction.PLAIN, record_id_field="uid", source_field="origin"
    )
    classified = policy.classify({"uid": 42, "origin": " import ", "id": "x"})
    assert (classified.record_id, classified.source) == ("42", "import")
    assert dict(classified.plain) == {"id": "x"}


@pytest.mark.parametrize("bad_id", [True, 1.5, ["r-1"], {"r": 1}])
def test_id_of_the_wrong_type_raises_record_error(bad_id: object) -> None:
    with pytest.raises(RecordError, match="'id'"):
        default_policy().classify({"id": bad_id})


def test_policy_and_classified_record_are_immutable_copies() -> None:
    rules = {"email": FieldRule(FieldAction.ENCRYPT, Normalizer.EMAIL)}
    policy = Policy(rules)
    rules["country"] = FieldRule(FieldAction.PLAIN)
    assert "country" not in policy.rules
    with pytest.raises(TypeError):
        policy.rules["country"] = FieldRule(FieldAction.PLAIN)  # type: ignore[index]
    classified = Policy({}, default_action=FieldAction.PLAIN).classify({"a": "1"})
    with pytest.raises(TypeError):
        classified.plain["b"] = "2"  # type: ignore[index]
    assert hash(policy) == hash(Policy(dict(policy.rules)))


def test_policy_built_in_code_rejects_a_rule_for_a_structural_field() -> None:
    with pytest.raises(ConfigurationError, match=r"field 'source'.*source field"):
        Policy({"source": FieldRule(FieldAction.PLAIN)})


def test_toml_and_json_files_load_to_equal_policies(tmp_path: pathlib.Path) -> None:
    toml_path = _write(tmp_path, "p.toml", SAMPLE_TOML)
    json_path = _write(tmp_path, "p.json", json.dumps(tomllib.loads(SAMPLE_TOML)))

    loaded = load_policy(toml_path)

    assert loaded == load_policy(json_path)
    assert loaded == Policy(
        {
            "email": FieldRule(FieldAction.ENCRYPT, Normalizer.EMAIL),
            "country": FieldRule(FieldAction.PLAIN),
        },
        default_action=FieldAction.DROP,
    )


def test_minimal_policy_file_defaults_to_dropping_everything(tmp_path: pathlib.Path) -> None:
    assert load_policy(_write(tmp_path, "empty.toml", "")) == Policy({})


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            '[fields.email]\naction = "encrpyt"\n',
            "field 'email': unknown action 'encrpyt' (expected encrypt, plain or drop)",
        ),
        (
            '[fields.email]\naction = "encrypt"\nnormalize = "mail"\n',
            "field 'email': unknown normalize 'mail'",
        ),
        ('default_action = "keep"\n', "default_action: unknown action 'keep'"),
        ('default_acton = "drop"\n', "unknown key 'default_acton'"),
        (
            '[fields.email]\naction = "encrypt"\nnormalise = "email"\n',
            "field 'email': unknown key 'normalise'",
        ),
        ('[fields.email]\nnormalize = "email"\n', "field 'email': missing action"),
        ('[fields."e mail"]\naction = "plain"\n', "field 'e mail': invalid field name"),
        ('[fields."9lives"]\naction = "plain"\n', "field '9lives': invalid field name"),
        (f'[fields.{"x" * 65}]\naction = "plain"\n', "invalid field name"),
        ('[fields.id]\naction = "encrypt"\n', "field 'id': is the record id field"),
        (
            'source_field = "origin"\n[fields.origin]\naction = "plain"\n',
            "field 'origin': is the source field",
        ),
        ('fields = "email"\n', "fields must be a table"),
        ("[fields.email]\naction = 1\n", "field 'email': must be a string"),
        ('[fields.email]\naction "encrypt"\n', "invalid TOML: "),
    ],
)
def test_invalid_policy_file_raises_one_sentence_configuration_error(
    tmp_path: pathlib.Path, text: str, words: str
) -> None:
    path = _write(tmp_path, "p.toml", text)
    with pytest.raises(ConfigurationError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert message.startswith(f"policy {path}: ")
    assert words in message
    assert "\n" not in message
    assert "Traceback" not in message


def test_invalid_toml_names_the_line(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "p.toml", 'default_action = "drop"\n\n[fields.email\n')
    with pytest.raises(ConfigurationError, match=r"invalid TOML: .*line 3"):
        load_policy(path)


def test_invalid_json_names_the_line(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "p.json", '{\n  "default_action": "drop",\n}\n')
    with pytest.raises(ConfigurationError, match=r"invalid JSON at line 3, column 1"):
        load_policy(path)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('["drop"]', "top level must be an object"),
        (
            '{"fields": {"email": {"action": "plain", "action": "encrypt"}}}',
            "duplicate key 'action'",
        ),
        ('{"fields": {"email": "encrypt"}}', "field 'email': must be a table"),
    ],
)
def test_invalid_json_policy_raises_configuration_error(
    tmp_path: pathlib.Path, text: str, words: str
) -> None:
    with pytest.raises(ConfigurationError, match=words):
        load_policy(_write(tmp_path, "p.json", text))


def test_missing_file_raises_configuration_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigurationError, match=re.escape(f"policy {path}: file not found")):
        load_policy(path)


def test_unreadable_file_raises_configuration_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "directory.toml"
    path.mkdir()
    with pytest.raises(ConfigurationError, match="file cannot be read"):
        load_policy(path)


def test_non_utf8_file_raises_configuration_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "p.toml"
    path.write_bytes(b'default_action = "\xff"\n')
    with pytest.raises(ConfigurationError, match="not UTF-8"):
        load_policy(path)


@pytest.mark.parametrize("name", ["p.yaml", "p", "p.toml.bak"])
def test_unsupported_suffix_raises_configuration_error(tmp_path: pathlib.Path, name: str) -> None:
    path = _write(tmp_path, name, SAMPLE_TOML)
    with pytest.raises(
        ConfigurationError, match=r"unsupported file type .*\(expected \.toml or \.json\)"
    ):
        load_policy(path)
