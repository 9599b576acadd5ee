"""How the envelope v1 vector files were made.

The vectors are frozen: every future version of heimdall must open the valid ones to the same
plaintext and reject the invalid ones with the same error. Existing cases are never changed or
removed; new ones go into a new file or are appended.

``envelope_v1.json`` was made once by :func:`main` with fresh random keys and nonces. It is kept
for the record and never rerun to replace it::

    python tests/vectors/generate.py > /tmp/new-vectors.json

``envelope_v1_strict.json`` holds the strict parser's cases: :func:`strict_vectors` derives them
from the frozen envelopes of ``envelope_v1.json`` (whose keys they use) without randomness, so it
writes the same bytes every time, which tests/test_envelope.py checks::

    python tests/vectors/generate.py strict > tests/vectors/envelope_v1_strict.json
"""

from __future__ import annotations

import base64
import json
import os
import string
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from heimdall.cipher import CachePolicy, FieldCipher
from heimdall.envelope import EncryptionContext, EncryptionVersion, parse
from heimdall.kms.legacy import LegacyMasterKey, parse_master_key
from heimdall.kms.local import FORMAT, LocalKeyring


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def ctx(canonical_key: str, field: str) -> dict[str, str]:
    return {"node_label": "FieldValue", "canonical_key": canonical_key, "field_name": field}


def context(spec: dict[str, str]) -> EncryptionContext:
    return EncryptionContext(spec["node_label"], spec["canonical_key"], spec["field_name"])


def edit(envelope: str, **changes: Any) -> str:
    obj = json.loads(envelope)
    obj.update(changes)
    return json.dumps(obj, separators=(",", ":"))


def flip(b64_text: str, index: int) -> str:
    raw = bytearray(base64.b64decode(b64_text))
    raw[index] ^= 0x01
    return b64(bytes(raw))


def main() -> None:
    keks = {1: os.urandom(32), 2: os.urandom(32)}
    master = os.urandom(32)
    directory = Path(tempfile.mkdtemp())
    path = directory / "keyring.json"
    doc: dict[str, Any] = {
        "format": FORMAT,
        "key_name": "heimdall-pii",
        "min_decryption_version": 1,
        "min_encryption_version": 1,
        "versions": [
            {
                "version": v,
                "state": "active",
                "created_at": "2026-11-29T00:00:00Z",
                "material": b64(k),
            }
            for v, k in keks.items()
        ],
    }
    # Write a keyring with only v1 first so new data keys are wrapped under v1.
    v1_only = dict(doc, versions=doc["versions"][:1])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps(v1_only).encode())
    os.close(fd)
    cache = CachePolicy(max_uses=2)
    v1 = FieldCipher(LocalKeyring(path, create=False), EncryptionVersion.KMS_V1, cache)
    legacy = FieldCipher(
        LegacyMasterKey(parse_master_key(b64(master))), EncryptionVersion.LEGACY, cache
    )

    email_ctx = ctx("email:hash:" + "ab" * 32, "email")
    other_ctx = ctx("email:hash:" + "cd" * 32, "email")
    name_ctx = ctx("name:hash:" + "ef" * 32, "name")
    email = v1.encrypt(b"alice@example.com", context(email_ctx)).envelope
    shared = v1.encrypt(b"bob@example.org", context(other_ctx)).envelope  # same data key
    legacy_env = legacy.encrypt(b"+15550100199", context(ctx("phone:hash:" + "01" * 32, "phone")))

    os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps(doc).encode())
    os.close(fd)
    v2 = FieldCipher(LocalKeyring(path, create=False), EncryptionVersion.KMS_V1, cache)
    name = v2.encrypt("Zoë Ångström".encode(), context(name_ctx)).envelope
    empty = v2.encrypt(b"", context(ctx("notes:hash:" + "02" * 32, "notes"))).envelope
    rewrapped = v2.rewrap_many([(parse(email), context(email_ctx))])[0]
    assert not isinstance(rewrapped, Exception)
    spaced = json.dumps(dict(reversed(list(json.loads(email).items()))), indent=1)

    e = json.loads(email)
    assert json.loads(shared)["dek_id"] == e["dek_id"]
    valid = [
        {
            "name": "kms_v1 under key version 1",
            "context": email_ctx,
            "envelope": email,
            "plaintext": "alice@example.com",
        },
        {
            "name": "kms_v1 sharing a data key with the previous case",
            "context": other_ctx,
            "envelope": shared,
            "plaintext": "bob@example.org",
        },
        {
            "name": "kms_v1 under key version 2, non-ASCII",
            "context": name_ctx,
            "envelope": name,
            "plaintext": "Zoë Ångström",
        },
        {
            "name": "kms_v1 empty plaintext",
            "context": ctx("notes:hash:" + "02" * 32, "notes"),
            "envelope": empty,
            "plaintext": "",
        },
        {
            "name": "rewrapped from version 1 to 2, original timestamp kept",
            "context": email_ctx,
            "envelope": rewrapped.to_json(),
            "plaintext": "alice@example.com",
        },
        {
            "name": "reordered keys and whitespace (as a JSONB column returns it)",
            "context": email_ctx,
            "envelope": spaced,
            "plaintext": "alice@example.com",
        },
        {
            "name": "legacy (static master key)",
            "context": ctx("phone:hash:" + "01" * 32, "phone"),
            "envelope": legacy_env.envelope,
            "plaintext": "+15550100199",
        },
    ]
    ct = e["ciphertext"]
    n = len(base64.b64decode(ct))
    invalid = [
        ("flipped byte in the nonce", edit(email, ciphertext=flip(ct, 0)), "DecryptionFailed"),
        (
            "flipped byte in the ciphertext",
            edit(email, ciphertext=flip(ct, 14)),
            "DecryptionFailed",
        ),
        ("flipped byte in the tag", edit(email, ciphertext=flip(ct, n - 1)), "DecryptionFailed"),
        (
            "flipped byte in encrypted_dek",
            edit(email, encrypted_dek=flip(e["encrypted_dek"], 20)),
            "DecryptionFailed",
        ),
        (
            "encrypted_dek of another data key",
            edit(email, encrypted_dek=json.loads(name)["encrypted_dek"]),
            "DecryptionFailed",
        ),
        (
            "key_identifier and key_version moved to version 2",
            edit(email, key_identifier="heimdall-pii-v2", key_version=2),
            "DecryptionFailed",
        ),
        (
            "key_identifier names a version that does not exist",
            edit(email, key_identifier="heimdall-pii-v9", key_version=9),
            "KeyNotFound",
        ),
        ("key_version edited alone", edit(email, key_version=2), "KeyNotFound"),
        (
            "key_identifier of another key",
            edit(email, key_identifier="other-key-v1"),
            "KeyNotFound",
        ),
        ("dek_id edited", edit(email, dek_id="0" * 32), "DecryptionFailed"),
        (
            "dek_id of another data key",
            edit(email, dek_id=json.loads(name)["dek_id"]),
            "DecryptionFailed",
        ),
        (
            "encryption_timestamp edited",
            edit(email, encryption_timestamp="2020-01-01T00:00:00Z"),
            "DecryptionFailed",
        ),
        (
            "encryption_version edited to legacy",
            edit(email, encryption_version="legacy"),
            "KeyNotFound",
        ),
        ("algorithm unknown", edit(email, algorithm="AES-128-GCM"), "UnsupportedEnvelope"),
        (
            "encryption_version unknown",
            edit(email, encryption_version="kms_v2"),
            "UnsupportedEnvelope",
        ),
        (
            "ciphertext truncated below nonce and tag",
            edit(email, ciphertext=b64(base64.b64decode(ct)[:20])),
            "InvalidEnvelope",
        ),
        (
            "ciphertext missing its last byte",
            edit(email, ciphertext=b64(base64.b64decode(ct)[:-1])),
            "DecryptionFailed",
        ),
        ("envelope JSON truncated", email[: len(email) // 2], "InvalidEnvelope"),
        ("ciphertext not base64", edit(email, ciphertext="not*base64"), "InvalidEnvelope"),
        ("encrypted_dek not base64", edit(email, encrypted_dek="%%%"), "InvalidEnvelope"),
        (
            "ciphertext base64 without padding",
            edit(email, ciphertext=ct.rstrip("=") + "A"),
            "InvalidEnvelope",
        ),
        ("encrypted_dek empty", edit(email, encrypted_dek=""), "InvalidEnvelope"),
        (
            "field missing",
            json.dumps({k: v for k, v in e.items() if k != "dek_id"}),
            "InvalidEnvelope",
        ),
        ("unknown field", edit(email, note="x"), "InvalidEnvelope"),
        (
            "duplicate field",
            email[:-1] + ',"dek_id":"' + json.loads(name)["dek_id"] + '"}',
            "InvalidEnvelope",
        ),
        ("key_version as a string", edit(email, key_version="1"), "InvalidEnvelope"),
        ("key_version as a boolean", edit(email, key_version=True), "InvalidEnvelope"),
        ("key_version zero", edit(email, key_version=0), "InvalidEnvelope"),
        ("dek_id upper case", edit(email, dek_id=e["dek_id"].upper()), "InvalidEnvelope"),
        (
            "timestamp not UTC",
            edit(email, encryption_timestamp="2026-11-29T00:00:00+01:00"),
            "InvalidEnvelope",
        ),
        ("not a JSON object", "[]", "InvalidEnvelope"),
        ("not JSON", "vault:v1:abcdef", "InvalidEnvelope"),
        ("empty string", "", "InvalidEnvelope"),
    ]
    out = {
        "description": (
            "Frozen envelope v1 vectors. Valid cases must decrypt to plaintext with their "
            "context; invalid cases must raise the named heimdall.errors class. Never edit or "
            "regenerate existing cases."
        ),
        "keyring": doc,
        "legacy_master_key": b64(master),
        "valid": valid,
        "invalid": [
            {"name": n_, "context": email_ctx, "envelope": env, "error": err}
            for n_, env, err in invalid
        ]
        + [
            {
                "name": "envelope moved to another node",
                "context": other_ctx,
                "envelope": email,
                "error": "DecryptionFailed",
            },
            {
                "name": "envelope moved to another field name",
                "context": dict(email_ctx, field_name="phone"),
                "envelope": email,
                "error": "DecryptionFailed",
            },
            {
                "name": "envelope moved to another node label",
                "context": dict(email_ctx, node_label="Sighting"),
                "envelope": email,
                "error": "DecryptionFailed",
            },
        ],
    }
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


# -- envelope_v1_strict.json ------------------------------------------------------------------

FROZEN = Path(__file__).resolve().parent / "envelope_v1.json"
_B64_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"


def members(envelope: str) -> list[tuple[str, str]]:
    """The members of an envelope as (name, JSON text of the value), in order."""
    return [(name, json.dumps(value)) for name, value in json.loads(envelope).items()]


def compose(pairs: Iterable[tuple[str, str]], separator: str = ",") -> str:
    """An object from (raw JSON text of the name without its quotes, JSON text of the value)."""
    return "{" + separator.join(f'"{name}":{value}' for name, value in pairs) + "}"


def with_raw(envelope: str, **values: str) -> str:
    """The envelope, compact, with some values replaced by raw JSON text."""
    return compose((name, values.pop(name, value)) for name, value in members(envelope))


def set_unused_bit(b64_text: str) -> str:
    """The same bytes in non-canonical base64: the lowest unused bit of the last digit set."""
    data = b64_text.rstrip("=")
    digit = _B64_ALPHABET.index(data[-1])
    assert len(data) % 4 and not digit & 1, "no unused bits, or one already set"
    changed = data[:-1] + _B64_ALPHABET[digit | 1] + b64_text[len(data) :]
    assert base64.b64decode(changed) == base64.b64decode(b64_text)
    return changed


def strict_vectors(frozen: dict[str, Any]) -> dict[str, Any]:
    """The strict parser's cases, derived from the frozen valid envelopes of *frozen*."""
    valid = {case["name"]: case for case in frozen["valid"]}
    first = valid["kms_v1 under key version 1"]
    shared = valid["kms_v1 sharing a data key with the previous case"]
    email, email_ctx = first["envelope"], first["context"]
    other, other_ctx = shared["envelope"], shared["context"]
    e, o = json.loads(email), json.loads(other)
    ct = e["ciphertext"]
    invalid: list[dict[str, Any]] = []

    def bad(name: str, envelope: str, error: str = "InvalidEnvelope", context: Any = None) -> None:
        invalid.append(
            {"name": name, "context": context or email_ctx, "envelope": envelope, "error": error}
        )

    # A header value replaced by an object or an array with as many quote characters as the
    # string it replaces.
    for field in ("encryption_version", "algorithm", "key_identifier", "dek_id", "encrypted_dek"):
        quoted = json.dumps(e[field])
        for kind, value in (("an object", f"{{{quoted}:1}}"), ("an array", f"[{quoted}]")):
            envelope = with_raw(email, **{field: value})
            assert envelope.count('"') == email.count('"')
            bad(f"{field} as {kind} with as many quotes as its string", envelope)
    for field in ("ciphertext", "encryption_timestamp"):
        bad(f"{field} as an array", with_raw(email, **{field: f"[{json.dumps(e[field])}]"}))
    for name, value in (
        ("as an object", "{}"),
        ("as an array", "[1]"),
        ("null", "null"),
        ("as a float", "1.0"),
        ("with an exponent", "1e0"),
        ("negative", "-1"),
        ("over 2**31-1", "2147483648"),
        ("over 2**64", "18446744073709551616"),
        ("with a leading zero", "01"),
        ("NaN", "NaN"),
    ):
        bad(f"key_version {name}", with_raw(email, key_version=value))
    bad("dek_id null", with_raw(email, dek_id="null"))
    bad("key_identifier as a number", with_raw(email, key_identifier="1"))
    bad("encrypted_dek as a boolean", with_raw(email, encrypted_dek="true"))
    bad("key_identifier empty", with_raw(email, key_identifier='""'))
    bad("dek_id one hex digit short", with_raw(email, dek_id=json.dumps(e["dek_id"][:-1])))

    # Duplicate members, which orjson alone would silently resolve to the last one.
    pairs = members(email)
    bad("key_version twice with the same value", compose([*pairs, ("key_version", "1")]))
    bad("dek_id twice, the first an object", compose([("dek_id", '{"a":1}'), *pairs]))
    bad(
        "dek_id twice, the second spelt with a JSON escape",
        compose([*pairs, ("dek\\u005fid", json.dumps(e["dek_id"]))]),
    )
    bad(
        "key_identifier twice in an indented layout",
        compose([("key_identifier", '"other-key-v1"'), *pairs], ",\n ").replace('":', '": '),
    )
    bad(
        "ciphertext twice, the first an array nested 1000 deep",
        compose([("ciphertext", "[" * 1000 + "]" * 1000), *pairs]),
    )
    bad("an array nested 2000 deep", "[" * 2000 + "]" * 2000)

    # Base64 that is not the one canonical text of its bytes (RFC 4648 section 3.5).
    bad("ciphertext with extra padding", with_raw(email, ciphertext=json.dumps(ct + "==")))
    bad(
        "encrypted_dek with extra padding",
        with_raw(email, encrypted_dek=json.dumps(e["encrypted_dek"] + "=")),
    )
    bad(
        "ciphertext with a padding character too many",
        with_raw(other, ciphertext=json.dumps(o["ciphertext"] + "=")),
        context=other_ctx,
    )
    bad(
        "ciphertext without its padding",
        with_raw(other, ciphertext=json.dumps(o["ciphertext"].rstrip("="))),
        context=other_ctx,
    )
    bad(
        "ciphertext with non-zero unused bits before two padding characters",
        with_raw(other, ciphertext=json.dumps(set_unused_bit(o["ciphertext"]))),
        context=other_ctx,
    )
    short = b64(base64.b64decode(ct)[:-1])
    bad(
        "ciphertext a byte short, with non-zero unused bits before one padding character",
        with_raw(email, ciphertext=json.dumps(set_unused_bit(short))),
    )
    url_safe = ct.replace("+", "-").replace("/", "_")
    assert url_safe != ct
    bad("ciphertext in the URL-safe alphabet", with_raw(email, ciphertext=json.dumps(url_safe)))
    bad(
        "ciphertext with a line break",
        with_raw(email, ciphertext=json.dumps(ct[:40] + "\n" + ct[40:])),
    )
    bad("ciphertext with a space", with_raw(email, ciphertext=json.dumps(ct[:40] + " " + ct[40:])))

    # Values moved between fields, and text around the object.
    bad(
        "ciphertext of another field under the same data key",
        with_raw(email, ciphertext=json.dumps(o["ciphertext"])),
        "DecryptionFailed",
    )
    bad("the envelope inside a JSON string", json.dumps(email))
    bad("content after the object", email + " {}")
    bad("a byte order mark before the object", "\ufeff" + email)
    bad("a NUL character in the ciphertext", with_raw(email, ciphertext=json.dumps(ct + "\0")))

    return {
        "description": (
            "Frozen envelope v1 vectors of the strict parser, derived from envelope_v1.json by "
            "tests/vectors/generate.py and decrypted with its keyring. Valid cases must decrypt "
            "to plaintext with their context; invalid cases must raise the named "
            "heimdall.errors class. Never edit or remove existing cases."
        ),
        "valid": [
            {
                "name": "members in reverse order, compact",
                "context": email_ctx,
                "envelope": compose(reversed(pairs)),
                "plaintext": first["plaintext"],
            },
            {
                "name": "canonical order with a space after every separator",
                "context": email_ctx,
                "envelope": compose(pairs, ", ").replace('":', '": '),
                "plaintext": first["plaintext"],
            },
        ],
        "invalid": invalid,
    }


def write_strict() -> None:
    json.dump(strict_vectors(json.loads(FROZEN.read_text())), sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["strict"]:
        write_strict()
    else:
        main()
