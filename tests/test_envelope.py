"""Envelope v1: frozen vectors, the tamper battery and the strict parser."""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import os
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heimdall import errors
from heimdall.cipher import CachePolicy, FieldCipher
from heimdall.envelope import (
    MAX_ENVELOPE_CHARS,
    MAX_PLAINTEXT_BYTES,
    EncryptionContext,
    EncryptionVersion,
    Envelope,
    context_of,
    parse,
)
from heimdall.ingest import IngestReport
from heimdall.kms.legacy import LegacyMasterKey, parse_master_key
from heimdall.kms.local import LocalKeyring
from heimdall.rbac import Caller
from heimdall.service import Heimdall
from heimdall.store.sqlite import SqliteStore

VECTOR_DIR = Path(__file__).parent / "vectors"
VECTORS = json.loads((VECTOR_DIR / "envelope_v1.json").read_text())
# The strict parser's cases, derived from VECTORS by vectors/generate.py and opened with its keys.
STRICT = json.loads((VECTOR_DIR / "envelope_v1_strict.json").read_text())
CTX = EncryptionContext("FieldValue", "email:hash:" + "ab" * 32, "email")
OTHER = EncryptionContext("FieldValue", "email:hash:" + "cd" * 32, "email")


def _context(spec: dict[str, str]) -> EncryptionContext:
    return EncryptionContext(spec["node_label"], spec["canonical_key"], spec["field_name"])


@pytest.fixture(scope="module")
def vector_ciphers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FieldCipher]:
    path = tmp_path_factory.mktemp("vectors") / "keyring.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps(VECTORS["keyring"]).encode())
    os.close(fd)
    legacy = LegacyMasterKey(parse_master_key(VECTORS["legacy_master_key"]))
    return {
        "kms_v1": FieldCipher(LocalKeyring(path, create=False), EncryptionVersion.KMS_V1),
        "legacy": FieldCipher(legacy, EncryptionVersion.LEGACY),
    }


def _route(ciphers: dict[str, FieldCipher], envelope: str) -> FieldCipher:
    """The cipher for an envelope's encryption_version, as the service's store column picks it."""
    try:
        version = json.loads(envelope).get("encryption_version")
    except (ValueError, AttributeError, RecursionError):
        version = None
    cipher = ciphers.get(version) if isinstance(version, str) else None
    return cipher or ciphers["kms_v1"]


def _open(ciphers: dict[str, FieldCipher], envelope: str, context: EncryptionContext) -> bytes:
    """Route by encryption_version the way the service does, then decrypt."""
    return _route(ciphers, envelope).decrypt(envelope, context)


VALID = VECTORS["valid"] + STRICT["valid"]
INVALID = VECTORS["invalid"] + STRICT["invalid"]


@pytest.mark.parametrize("case", VALID, ids=lambda c: c["name"])
def test_valid_vector_decrypts_to_its_plaintext(
    case: dict[str, Any], vector_ciphers: dict[str, FieldCipher]
) -> None:
    plaintext = _open(vector_ciphers, case["envelope"], _context(case["context"]))
    assert plaintext == case["plaintext"].encode()


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c["name"])
def test_invalid_vector_raises_its_named_error(
    case: dict[str, Any], vector_ciphers: dict[str, FieldCipher]
) -> None:
    expected: type[Exception] = getattr(errors, case["error"])
    with pytest.raises(errors.HeimdallError) as caught:
        _open(vector_ciphers, case["envelope"], _context(case["context"]))
    assert type(caught.value) is expected


@pytest.mark.parametrize("case", VALID + INVALID, ids=lambda c: c["name"])
def test_decrypt_many_gives_each_vector_its_plaintext_or_named_error(
    case: dict[str, Any], vector_ciphers: dict[str, FieldCipher]
) -> None:
    envelope, context = case["envelope"], _context(case["context"])
    [result] = _route(vector_ciphers, envelope).decrypt_many([(envelope, context)])
    if "error" in case:
        assert type(result) is getattr(errors, case["error"])
    else:
        assert result == case["plaintext"].encode()


def test_strict_vectors_are_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("vector_generator", VECTOR_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.strict_vectors(VECTORS) == STRICT


def test_vectors_cover_every_tamper_class() -> None:
    names = " ".join(c["name"] for c in VECTORS["invalid"])
    for needed in (
        "ciphertext",
        "encrypted_dek",
        "key_identifier",
        "key_version",
        "dek_id",
        "algorithm",
        "encryption_version",
        "encryption_timestamp",
        "truncated",
        "another node",
    ):
        assert needed in names


@pytest.fixture
def cipher(tmp_path: Path) -> FieldCipher:
    return FieldCipher(LocalKeyring(tmp_path / "keyring.json"), EncryptionVersion.KMS_V1)


def test_round_trip(cipher: FieldCipher) -> None:
    sealed = cipher.encrypt(b"alice@example.com", CTX)
    assert cipher.decrypt(sealed.envelope, CTX) == b"alice@example.com"


@pytest.fixture(scope="module")
def module_cipher(tmp_path_factory: pytest.TempPathFactory) -> FieldCipher:
    path = tmp_path_factory.mktemp("keyring") / "keyring.json"
    return FieldCipher(LocalKeyring(path), EncryptionVersion.KMS_V1)


@settings(max_examples=60, deadline=None)
@given(plaintext=st.binary(max_size=512), field=st.text(min_size=1, max_size=40))
def test_round_trip_any_value_and_context(
    module_cipher: FieldCipher, plaintext: bytes, field: str
) -> None:
    context = EncryptionContext("FieldValue", f"{field}:hash:00", field)
    sealed = module_cipher.encrypt(plaintext, context)
    assert module_cipher.decrypt(sealed.envelope, context) == plaintext


def test_fast_writer_and_envelope_to_json_agree(cipher: FieldCipher) -> None:
    sealed = cipher.encrypt(b"value", CTX)
    assert parse(sealed.envelope).to_json() == sealed.envelope


def test_each_encryption_uses_a_fresh_nonce(cipher: FieldCipher) -> None:
    first = parse(cipher.encrypt(b"same", CTX).envelope)
    second = parse(cipher.encrypt(b"same", CTX).envelope)
    assert first.dek_id == second.dek_id  # the cached data key is shared
    assert first.ciphertext[:12] != second.ciphertext[:12]
    assert first.ciphertext != second.ciphertext


def _edit(envelope: str, **changes: object) -> str:
    obj = json.loads(envelope)
    obj.update(changes)
    return json.dumps(obj)


def _flip(text: str, index: int) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[index] ^= 0x80
    return base64.b64encode(bytes(raw)).decode()


def test_flipping_any_ciphertext_byte_fails(cipher: FieldCipher) -> None:
    envelope = cipher.encrypt(b"x" * 40, CTX).envelope
    length = len(base64.b64decode(json.loads(envelope)["ciphertext"]))
    for index in range(length):
        tampered = _edit(envelope, ciphertext=_flip(json.loads(envelope)["ciphertext"], index))
        with pytest.raises(errors.DecryptionFailed):
            cipher.decrypt(tampered, CTX)


def test_flipping_any_wrapped_key_byte_fails(tmp_path: Path) -> None:
    for index in range(60):
        # A new cipher each time: a cached unwrapped key must not mask the tampering.
        fresh = FieldCipher(LocalKeyring(tmp_path / "keyring.json"), EncryptionVersion.KMS_V1)
        envelope = fresh.encrypt(b"x", CTX).envelope
        reader = FieldCipher(LocalKeyring(tmp_path / "keyring.json"), EncryptionVersion.KMS_V1)
        wrapped = json.loads(envelope)["encrypted_dek"]
        with pytest.raises(errors.DecryptionFailed):
            reader.decrypt(_edit(envelope, encrypted_dek=_flip(wrapped, index)), CTX)


def test_header_edit_fails_even_with_the_data_key_cached(cipher: FieldCipher) -> None:
    envelope = cipher.encrypt(b"secret", CTX).envelope
    assert cipher.decrypt(envelope, CTX) == b"secret"  # the data key is now cached
    for change in (
        {"dek_id": "0" * 32},
        {"encryption_timestamp": "2001-01-01T00:00:00Z"},
        {"key_version": True},
        {"algorithm": "AES-256-gcm"},
    ):
        with pytest.raises(errors.HeimdallError) as caught:
            cipher.decrypt(_edit(envelope, **change), CTX)
        assert isinstance(caught.value, errors.DecryptionFailed | errors.InvalidEnvelope)


def _with_raw(envelope: str, name: str, raw: str) -> str:
    """The envelope, compact, with the value of *name* replaced by the raw JSON text *raw*."""
    members = json.loads(envelope).items()
    return "{" + ",".join(f'"{k}":{raw if k == name else json.dumps(v)}' for k, v in members) + "}"


@pytest.mark.parametrize(
    "field", ["algorithm", "key_identifier", "key_version", "dek_id", "encrypted_dek"]
)
def test_header_value_of_another_json_type_is_invalid_with_the_data_key_cached(
    cipher: FieldCipher, field: str
) -> None:
    envelope = cipher.encrypt(b"secret", CTX).envelope
    assert cipher.decrypt(envelope, CTX) == b"secret"  # the data key is now cached
    quoted = json.dumps(json.loads(envelope)[field])
    for raw in (f"{{{quoted}:1}}", f"[{quoted}]", "{}", "[]", "null", "true"):
        tampered = _with_raw(envelope, field, raw)
        with pytest.raises(errors.InvalidEnvelope):
            cipher.decrypt(tampered, CTX)
        assert type(cipher.decrypt_many([(tampered, CTX)])[0]) is errors.InvalidEnvelope


def test_members_are_read_in_any_json_layout(cipher: FieldCipher) -> None:
    envelope = cipher.encrypt(b"secret", CTX).envelope
    obj = json.loads(envelope)
    assert obj["key_identifier"].startswith("heimdall")
    for text in (
        json.dumps(obj, indent=2),
        json.dumps(dict(reversed(obj.items())), separators=(",", ":")),
        envelope.replace('"heimdall', '"\\u0068eimdall'),  # a JSON escape in a value
    ):
        assert text != envelope
        assert cipher.decrypt(text, CTX) == b"secret"
        assert parse(text).to_json() == envelope


def test_service_audits_a_malformed_envelope_as_a_failed_decrypt(
    make_service: Callable[..., Heimdall],
    ingest: Callable[..., IngestReport],
    people: list[dict[str, Any]],
    caller: Caller,
    audit_events: Callable[[], list[dict[str, Any]]],
) -> None:
    service = make_service()
    ingest(service, people[:3])
    key = service.lookup("email", people[1]["email"], caller=caller).canonical_key
    service.decrypt(key, reason="support:ticket-1234", caller=caller)  # its data key is cached
    stored = service.store.get_field(key)
    assert stored is not None
    quoted = json.dumps(json.loads(stored.encrypted_data)["key_identifier"])
    # An object with as many quote characters as the string it replaces.
    tampered = _with_raw(stored.encrypted_data, "key_identifier", f"{{{quoted}:1}}")
    assert tampered.count('"') == stored.encrypted_data.count('"')
    assert isinstance(service.store, SqliteStore)
    with closing(sqlite3.connect(service.store.path)) as db, db:
        db.execute(
            "UPDATE field_values SET encrypted_data = ? WHERE canonical_key = ?", (tampered, key)
        )

    with pytest.raises(errors.InvalidEnvelope):
        service.decrypt(key, reason="support:ticket-1234", caller=caller)

    event = audit_events()[-1]
    assert event["event_type"] == "crypto.decrypt"
    assert event["field_identifier"] == key
    assert event["result"] == "failure"
    assert event["error"] == "InvalidEnvelope"


def test_envelopes_swapped_between_two_nodes_fail(cipher: FieldCipher) -> None:
    a = cipher.encrypt(b"alice@example.com", CTX).envelope
    b = cipher.encrypt(b"bob@example.org", OTHER).envelope
    with pytest.raises(errors.DecryptionFailed):
        cipher.decrypt(a, OTHER)
    with pytest.raises(errors.DecryptionFailed):
        cipher.decrypt(b, CTX)


def test_oversize_envelope_is_rejected_before_parsing(cipher: FieldCipher) -> None:
    with pytest.raises(errors.EnvelopeTooLarge):
        cipher.decrypt("{" + " " * MAX_ENVELOPE_CHARS + "}", CTX)
    with pytest.raises(errors.EnvelopeTooLarge):
        parse(b"x" * (MAX_ENVELOPE_CHARS + 1))


def test_oversize_ciphertext_inside_the_envelope_cap_is_rejected(cipher: FieldCipher) -> None:
    envelope = cipher.encrypt(b"x", CTX).envelope
    big = base64.b64encode(b"\0" * (MAX_PLAINTEXT_BYTES + 29)).decode()
    with pytest.raises(errors.EnvelopeTooLarge):
        cipher.decrypt(_edit(envelope, ciphertext=big), CTX)


def test_oversize_wrapped_key_is_rejected(cipher: FieldCipher) -> None:
    envelope = cipher.encrypt(b"x", CTX).envelope
    big = base64.b64encode(b"\0" * 2049).decode()
    with pytest.raises(errors.EnvelopeTooLarge):
        cipher.decrypt(_edit(envelope, encrypted_dek=big), CTX)


def test_plaintext_over_the_limit_is_refused(cipher: FieldCipher) -> None:
    with pytest.raises(ValueError, match="limit"):
        cipher.encrypt(b"x" * (MAX_PLAINTEXT_BYTES + 1), CTX)


def test_decryption_failure_is_opaque(cipher: FieldCipher) -> None:
    envelope = cipher.encrypt(b"alice@example.com", CTX).envelope
    messages = set()
    for tampered in (
        _edit(envelope, ciphertext=_flip(json.loads(envelope)["ciphertext"], 20)),
        _edit(envelope, dek_id="1" * 32),
    ):
        with pytest.raises(errors.DecryptionFailed) as caught:
            cipher.decrypt(tampered, CTX)
        messages.add(str(caught.value))
    assert messages == {"decryption failed"}


def test_envelope_repr_hides_ciphertext_and_wrapped_key(cipher: FieldCipher) -> None:
    envelope = parse(cipher.encrypt(b"alice@example.com", CTX).envelope)
    text = repr(envelope)
    assert base64.b64encode(envelope.ciphertext).decode() not in text
    assert base64.b64encode(envelope.encrypted_dek).decode() not in text
    assert "ciphertext" not in text
    assert isinstance(envelope, Envelope)


def test_error_messages_never_carry_envelope_content(cipher: FieldCipher) -> None:
    envelope = cipher.encrypt(b"alice@example.com", CTX).envelope
    obj = json.loads(envelope)
    for bad in (envelope[:-3], _edit(envelope, ciphertext="!!" + obj["ciphertext"])):
        with pytest.raises(errors.InvalidEnvelope) as caught:
            cipher.decrypt(bad, CTX)
        assert obj["ciphertext"][:16] not in str(caught.value)
        assert obj["encrypted_dek"][:16] not in str(caught.value)


def test_legacy_envelope_is_labelled_legacy(tmp_path: Path) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    legacy = FieldCipher(
        LegacyMasterKey(parse_master_key(key)), EncryptionVersion.LEGACY, CachePolicy()
    )
    sealed = legacy.encrypt(b"x", CTX)
    assert sealed.encryption_version == "legacy"
    assert parse(sealed.envelope).encryption_version is EncryptionVersion.LEGACY
    assert legacy.decrypt(sealed.envelope, CTX) == b"x"


def test_a_kms_cipher_refuses_a_legacy_envelope(cipher: FieldCipher) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    legacy = FieldCipher(LegacyMasterKey(parse_master_key(key)), EncryptionVersion.LEGACY)
    with pytest.raises(errors.InvalidEnvelope):
        cipher.decrypt(legacy.encrypt(b"x", CTX).envelope, CTX)


class _Text(str):
    pass


@pytest.mark.parametrize(
    "values",
    [
        ("FieldValue", "email:hash:" + "ab" * 32, "email"),
        ("F", "k" * 1024, "n"),
        (_Text("FieldValue"), "k", "n"),  # a str subclass: checked value by value, accepted
        ("", "k", "n"),
        ("F", "k" * 1025, "n"),
        ("F", "k", ""),
        ("F", b"k", "n"),
        (None, "k", "n"),
    ],
)
def test_context_of_builds_what_the_constructor_builds_and_refuses_what_it_refuses(
    values: tuple[Any, Any, Any],
) -> None:
    try:
        expected: EncryptionContext | str = EncryptionContext(*values)
    except ValueError as exc:
        expected = str(exc)
    try:
        built: EncryptionContext | str = context_of(*values)
    except ValueError as exc:
        built = str(exc)

    assert built == expected
    if isinstance(built, EncryptionContext):
        assert built.encode() == EncryptionContext(*values).encode()
        with pytest.raises(dataclasses.FrozenInstanceError):
            built.field_name = "other"  # type: ignore[misc]
