"""Envelope parsing and decryption under seeded random mutation of valid envelopes.

Property: whatever the text, :meth:`FieldCipher.decrypt` and :meth:`FieldCipher.decrypt_many`
fail only with :class:`HeimdallError` subclasses (never TypeError, KeyError, ValueError,
UnicodeError, RecursionError...), agree with each other, and a successful decrypt returns exactly
the plaintext of the field whose context was given: never another value. The parser's own
properties are checked on the way: :func:`parse` raises only InvalidEnvelope (or a subclass),
parses what it accepts into the canonical form, and the fast path (:func:`canonical_header`,
:func:`canonical_body`) agrees with it.

A normal test run tries ``DEFAULT_CASES`` mutations; ``HMD_TEST_FUZZ_CASES=100000`` asks for
more and ``HMD_TEST_FUZZ_SEED`` picks another seed (a failure names the seed and case to replay).
"""

from __future__ import annotations

import base64
import json
import os
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from heimdall.cipher import CachePolicy, FieldCipher
from heimdall.envelope import (
    EncryptionContext,
    EncryptionVersion,
    Envelope,
    canonical_body,
    canonical_header,
    load,
    parse,
)
from heimdall.errors import HeimdallError, InvalidEnvelope
from heimdall.kms.legacy import LegacyMasterKey, parse_master_key
from heimdall.kms.local import LocalKeyring

DEFAULT_CASES = 5000
DEFAULT_SEED = 20261129
CASES = int(os.environ.get("HMD_TEST_FUZZ_CASES", DEFAULT_CASES))
SEED = int(os.environ.get("HMD_TEST_FUZZ_SEED", DEFAULT_SEED))

_B64 = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
# Characters a mutation inserts: JSON punctuation, base64 and number characters, escapes,
# whitespace, and a few outside ASCII (one of them a lone surrogate, which is not UTF-8).
_PALETTE = '{}[]:,"\\ \n\t=+/-_.eE0123456789AQgwaz\x00\x7f\u00e9\u2028\ufeff\ud800'
_B64_NAMES = ('"ciphertext"', '"encrypted_dek"')
_JSON_VALUES = (
    "{}",
    "[]",
    "null",
    "true",
    "false",
    "0",
    "1",
    "-1",
    "1.0",
    "1e0",
    "2147483648",
    "18446744073709551616",
    '""',
    '"x"',
    '{"a":1}',
    '["a"]',
    "[" * 600 + "]" * 600,
)


@dataclass(frozen=True, slots=True)
class Field:
    envelope: str
    context: EncryptionContext
    plaintext: bytes


Mutation = Callable[[random.Random, str, list[Field]], str]
Corpus = tuple[list[Field], FieldCipher, FieldCipher]


# -- mutations ---------------------------------------------------------------------------------


def _members(text: str) -> list[tuple[str, str]] | None:
    """(JSON text of the name, JSON text of the value) of a flat JSON object, else None."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    return [(json.dumps(name), json.dumps(value)) for name, value in obj.items()]


def _compose(rng: random.Random, members: list[tuple[str, str]]) -> str:
    """An object of *members*, usually compact, sometimes with whitespace around the tokens."""
    if rng.random() < 0.7:
        return "{" + ",".join(f"{name}:{value}" for name, value in members) + "}"
    space = rng.choice([" ", "\n ", "\t", "\r\n"])
    body = f",{space}".join(f"{name}:{space}{value}" for name, value in members)
    return "{" + space + body + space + "}"


def _flip_char(rng: random.Random, text: str, _: list[Field]) -> str:
    if not text:
        return text
    at = rng.randrange(len(text))
    return text[:at] + chr(ord(text[at]) ^ (1 << rng.randrange(7))) + text[at + 1 :]


def _insert(rng: random.Random, text: str, _: list[Field]) -> str:
    at = rng.randrange(len(text) + 1)
    return text[:at] + "".join(rng.choices(_PALETTE, k=rng.randint(1, 3))) + text[at:]


def _delete(rng: random.Random, text: str, _: list[Field]) -> str:
    if not text:
        return text
    at = rng.randrange(len(text))
    return text[:at] + text[at + rng.randint(1, 4) :]


def _truncate(rng: random.Random, text: str, _: list[Field]) -> str:
    return text[: rng.randrange(len(text) + 1)]


def _replace_value(rng: random.Random, text: str, _: list[Field]) -> str:
    members = _members(text)
    if not members:
        return _flip_char(rng, text, _)
    at = rng.randrange(len(members))
    name, value = members[at]
    members[at] = (name, rng.choice([*_JSON_VALUES, f"{{{value}:1}}", f"[{value}]"]))
    return _compose(rng, members)


def _duplicate_member(rng: random.Random, text: str, fields: list[Field]) -> str:
    members = _members(text)
    if not members:
        return _insert(rng, text, fields)
    name, value = rng.choice(members)
    if rng.random() < 0.5:
        other = json.dumps(rng.choice(fields).context.field_name)
        value = rng.choice([value, other, *_JSON_VALUES[:6]])
    if rng.random() < 0.3:
        name = name.replace("_", "\\u005f", 1)  # the same name, spelt with an escape
    members.insert(rng.randrange(len(members) + 1), (name, value))
    return _compose(rng, members)


def _drop_or_add_member(rng: random.Random, text: str, fields: list[Field]) -> str:
    members = _members(text)
    if not members:
        return _delete(rng, text, fields)
    if rng.random() < 0.5:
        del members[rng.randrange(len(members))]
    else:
        members.insert(rng.randrange(len(members) + 1), ('"note"', '"x"'))
    return _compose(rng, members)


def _reorder(rng: random.Random, text: str, _: list[Field]) -> str:
    members = _members(text)
    if not members:
        return text
    rng.shuffle(members)
    return _compose(rng, members)


def _escape(rng: random.Random, text: str, _: list[Field]) -> str:
    """A JSON escape for one character of a name or value: the same JSON, another text."""
    members = _members(text)
    if not members:
        return text
    at = rng.randrange(len(members))
    name, value = members[at]
    if len(value) > 2 and value.startswith('"'):
        index = rng.randrange(1, len(value) - 1)
        value = value[:index] + f"\\u{ord(value[index]):04x}" + value[index + 1 :]
    members[at] = (name, value)
    return _compose(rng, members)


def _b64_member(rng: random.Random, text: str, edit: Callable[[random.Random, str], str]) -> str:
    members = _members(text)
    if not members:
        return text
    candidates = [i for i, (name, _) in enumerate(members) if name in _B64_NAMES]
    if not candidates:
        return text
    at = rng.choice(candidates)
    name, value = members[at]
    decoded = json.loads(value)
    if not isinstance(decoded, str):
        return text
    members[at] = (name, json.dumps(edit(rng, decoded)))
    return _compose(rng, members)


def _repad(rng: random.Random, value: str) -> str:
    stripped = value.rstrip("=")
    return stripped + "=" * rng.choice([n for n in range(5) if n != len(value) - len(stripped)])


def _set_unused_bits(rng: random.Random, value: str) -> str:
    data = value.rstrip("=")
    if not data or len(data) % 4 == 0 or data[-1] not in _B64:
        return value + "A"  # nothing unused: make it malformed instead
    digit = _B64.index(data[-1])
    unused = 0b1111 if len(data) % 4 == 2 else 0b11
    return data[:-1] + _B64[digit | rng.randint(1, unused)] + value[len(data) :]


def _alphabet(rng: random.Random, value: str) -> str:
    return value.translate(str.maketrans("+/", "-_")) if rng.random() < 0.5 else value + "\n"


def _repad_base64(rng: random.Random, text: str, _: list[Field]) -> str:
    return _b64_member(rng, text, _repad)


def _unused_bits(rng: random.Random, text: str, _: list[Field]) -> str:
    return _b64_member(rng, text, _set_unused_bits)


def _other_alphabet(rng: random.Random, text: str, _: list[Field]) -> str:
    return _b64_member(rng, text, _alphabet)


def _swap_values(rng: random.Random, text: str, fields: list[Field]) -> str:
    """Some values taken from another field's envelope (another node, data key or version)."""
    members = _members(text)
    if not members:
        return text
    donor = dict(_members(rng.choice(fields).envelope) or [])
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(members))
        name = members[at][0]
        if name in donor:
            members[at] = (name, donor[name])
    return _compose(rng, members)


def _whole_other(rng: random.Random, _text: str, fields: list[Field]) -> str:
    return rng.choice(fields).envelope


MUTATIONS: tuple[Mutation, ...] = (
    _flip_char,
    _insert,
    _delete,
    _truncate,
    _replace_value,
    _replace_value,
    _duplicate_member,
    _duplicate_member,
    _drop_or_add_member,
    _reorder,
    _escape,
    _repad_base64,
    _unused_bits,
    _unused_bits,
    _other_alphabet,
    _swap_values,
    _swap_values,
    _whole_other,
)


# -- fixtures ----------------------------------------------------------------------------------


def _context(index: int) -> EncryptionContext:
    label = "FieldValue" if index % 5 else "Sighting"
    return EncryptionContext(label, f"email:hash:{index:064x}", "email" if index % 3 else "phone")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Fields under several data keys, two key versions, pattern B and the legacy key, and two
    readers: one whose cache holds every data key, one whose cache holds a single key."""
    path = tmp_path_factory.mktemp("fuzz") / "keyring.json"
    writer = FieldCipher(LocalKeyring(path), EncryptionVersion.KMS_V1, CachePolicy(max_uses=3))
    direct = FieldCipher(LocalKeyring(path), EncryptionVersion.KMS_V1, direct=True)
    legacy = FieldCipher(
        LegacyMasterKey(parse_master_key(base64.b64encode(os.urandom(32)).decode())),
        EncryptionVersion.LEGACY,
    )
    fields: list[Field] = []
    for index in range(24):
        if index == 12:
            writer.kms.rotate()
            writer.forget_keys()
        context = _context(index)
        plaintext = f"value {index} é".encode() * (index % 4) + bytes([index])
        cipher = direct if index % 8 == 7 else legacy if index == 23 else writer
        fields.append(Field(cipher.encrypt(plaintext, context).envelope, context, plaintext))
    warm = FieldCipher(LocalKeyring(path), EncryptionVersion.KMS_V1)
    cold = FieldCipher(
        LocalKeyring(path), EncryptionVersion.KMS_V1, CachePolicy(max_unwrapped_keys=1)
    )
    return fields, warm, cold


# -- the property ------------------------------------------------------------------------------


def _mutate(rng: random.Random, fields: list[Field]) -> tuple[Field, str, list[str]]:
    """A field, its envelope after one to three mutations, and the mutations' names."""
    field = rng.choice(fields)
    text, applied = field.envelope, []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        mutation = rng.choice(MUTATIONS)
        applied.append(mutation.__name__)
        text = mutation(rng, text, fields)
    return field, text, applied


def _check_parser(text: str, headers: set[str]) -> None:
    """parse and load fail alike and only with InvalidEnvelope; what parses is a JSON object of
    exactly the envelope's members, each once, and has one canonical form; the fast path reads
    that form as parse does, and nothing parse rejects under a header that a FieldCipher may
    have cached (*headers*: those of every envelope parsed so far)."""
    try:
        envelope: Envelope | None = parse(text)
    except InvalidEnvelope:
        envelope = None
    try:
        load(text)
    except InvalidEnvelope:
        assert envelope is None
    fast_header = canonical_header(text)
    fast_body = None if fast_header is None else canonical_body(text, fast_header)
    if envelope is None:
        assert fast_body is None or fast_header not in headers, "fast path takes what parse rejects"
        return
    header = envelope.header_json()
    headers.add(header)
    canonical = envelope.to_json()
    assert parse(canonical) == envelope
    # Another reader of the same JSON sees exactly these members, each once.
    members = json.loads(text, object_pairs_hook=list)
    assert len(members) == len(dict(members)) == 8, "a duplicate member was accepted"
    assert dict(members) == json.loads(canonical)
    if text == canonical:
        assert fast_header == header
        assert fast_body == (envelope.ciphertext, envelope.encryption_timestamp)
    elif fast_body is not None:
        assert fast_header != header, "fast path takes a second byte form"


def _check_decrypt(
    rng: random.Random,
    field: Field,
    text: str,
    fields: list[Field],
    readers: tuple[FieldCipher, FieldCipher],
) -> bool:
    """Decrypt *text* with its own context and another field's, through decrypt and
    decrypt_many of a reader with a warm or a cold cache. True if any of it succeeded."""
    plaintexts = {f.context: f.plaintext for f in fields}
    succeeded = False
    for context in (field.context, rng.choice(fields).context):
        cipher = rng.choice(readers)
        try:
            single: bytes | HeimdallError = cipher.decrypt(text, context)
        except HeimdallError as exc:
            single = exc
        [batch] = cipher.decrypt_many([(text, context)])
        if isinstance(single, bytes):
            assert single == plaintexts[context], "wrong plaintext"
            assert batch == single
            succeeded = True
        else:
            assert type(batch) is type(single)
    return succeeded


def test_mutated_envelopes_fail_only_with_heimdall_errors_and_never_decrypt_wrongly(
    corpus: Corpus,
) -> None:
    fields, warm, cold = corpus
    headers = {parse(f.envelope).header_json() for f in fields}
    rng = random.Random(SEED)  # noqa: S311 - reproducible test input, not a secret
    successes = 0
    for case in range(CASES):
        field, text, applied = _mutate(rng, fields)
        try:
            _check_parser(text, headers)
            successes += _check_decrypt(rng, field, text, fields, (warm, cold))
        except Exception as exc:  # any escape is a finding: say how to replay it
            pytest.fail(f"seed {SEED}, case {case} ({', '.join(applied)}): {exc!r}\n{text!r}")
    # Not vacuous: mutations that keep the envelope (reordering, whitespace, escapes, another
    # whole envelope) decrypt, and most others do not.
    assert 0 < successes < CASES * 0.6


def test_unmutated_corpus_decrypts(corpus: Corpus) -> None:
    fields, warm, cold = corpus
    for field in fields:
        for cipher in (warm, cold):
            if '"legacy"' not in field.envelope:
                assert cipher.decrypt(field.envelope, field.context) == field.plaintext
                assert cipher.decrypt_many([(field.envelope, field.context)]) == [field.plaintext]
