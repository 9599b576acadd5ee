"""How tests/vectors/envelope_v1.json was made. Kept for the record; never rerun to replace it.

The vectors are frozen: every future version of heimdall must open the valid ones to the same
plaintext and reject the invalid ones with the same error. New cases are appended by hand (or
by a new script writing a new file); existing ones are never regenerated.

    python tests/vectors/generate.py > /tmp/new-vectors.json
"""

from __future__ import annotations

import base64
import json
import os
import sys
import tempfile
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


if __name__ == "__main__":
    main()
