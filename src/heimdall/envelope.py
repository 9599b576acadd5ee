"""Envelope format v1: the stored form of one encrypted field. Pure: no I/O, no key provider.

spec: Envelope Encryption Architecture, Encrypted Field Storage Schema. The stored form is one
JSON object::

    {"encryption_version": "kms_v1", "algorithm": "AES-256-GCM",
     "key_identifier": "heimdall-pii-v1", "key_version": 1,
     "dek_id": "<32 hex>", "encrypted_dek": "<base64>",
     "ciphertext": "<base64 of nonce || ciphertext || tag>",
     "encryption_timestamp": "2026-11-29T11:06:20Z"}

Binding. Two AEAD layers bind every header value:

* the data layer's associated data is :func:`data_associated_data`: a length-prefixed encoding of
  encryption_version, algorithm, dek_id, encryption_timestamp and the encryption context
  (node label, canonical_key, field name). Moving a ciphertext to another node fails.
* the data key's wrapping binds :func:`wrap_associated_data` (encryption_version, algorithm,
  dek_id), and the key provider binds its own key_identifier and key_version to the wrapped key
  (the local keyring in its associated data, Vault and cloud KMSs in their ciphertext).

key_identifier and key_version therefore sit in the wrapping layer, not the data layer: a master
key rotation is a *rewrap* of the data key that leaves the data ciphertext, its context binding
and its original timestamp untouched. Editing any header value still fails decryption.

Parsing. :func:`parse` reads the envelope in any JSON layout: member order, whitespace and string
escapes are JSON's business (the frozen vectors hold a reordered, indented envelope as a jsonb
column prints it). Everything else is strict and checked before any work: hard size caps, exact
field set, no duplicate member (found by a parser that sees every member, never inferred from
the text), every value of its JSON type and then of its own rules, and canonical base64 (RFC 4648
section 3.5: padded, no extra padding, zero unused bits) so that one value has one text. Any
malformed input raises InvalidEnvelope or a subclass. It never guesses.

The canonical layout, what :meth:`Header.seal` and :meth:`Envelope.to_json` write (this key
order, no whitespace, no escapes), is also the fast path: :func:`canonical_header` and
:func:`canonical_body` split it into the header text and the per-field values without a JSON
parser. The header text is not validated there; :class:`~heimdall.cipher.EnvelopeCipher` trusts it
only when it equals the :meth:`Envelope.header_json` of an envelope that passed :func:`parse`.
"""

from __future__ import annotations

import binascii
import enum
import json
import re
import struct
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final

import orjson

from heimdall.aead import OVERHEAD, Aead
from heimdall.errors import EnvelopeTooLarge, InvalidEnvelope, UnsupportedEnvelope

__all__ = [
    "ALGORITHM",
    "KMS_DIRECT",
    "MAX_ENVELOPE_CHARS",
    "MAX_PLAINTEXT_BYTES",
    "MAX_WRAPPED_KEY_BYTES",
    "EncryptionContext",
    "EncryptionVersion",
    "Envelope",
    "Header",
    "canonical_body",
    "canonical_header",
    "context_of",
    "data_ad",
    "data_ad_prefix",
    "data_associated_data",
    "from_mapping",
    "load",
    "open_envelope",
    "parse",
    "seal",
    "wrap_associated_data",
]


class EncryptionVersion(enum.StrEnum):
    """How a field was encrypted. spec: Migration Strategy, Phase 3."""

    LEGACY = "legacy"  # data key wrapped by the static HMD_MASTER_KEY
    KMS_V1 = "kms_v1"  # data key wrapped by a key management service


ALGORITHM: Final = "AES-256-GCM"
# Pattern B: the key provider encrypted the value itself (Vault Transit ``encrypt``); the
# ciphertext field holds the provider's ciphertext and there is no data key.
KMS_DIRECT: Final = "KMS-DIRECT"
_ALGORITHMS: Final = frozenset({ALGORITHM, KMS_DIRECT})
# By value: a dict lookup is ten times cheaper than calling the enum.
_VERSIONS: Final = {v.value: v for v in EncryptionVersion}

MAX_PLAINTEXT_BYTES: Final = 64 * 1024
MAX_WRAPPED_KEY_BYTES: Final = 2048
MAX_KEY_IDENTIFIER_CHARS: Final = 512
MAX_CONTEXT_VALUE_CHARS: Final = 1024
# Base64 of the largest ciphertext and wrapped key, plus room for the header.
MAX_ENVELOPE_CHARS: Final = (MAX_PLAINTEXT_BYTES + OVERHEAD) * 4 // 3 + MAX_WRAPPED_KEY_BYTES * 2

_FIELDS: Final = (
    "encryption_version",
    "algorithm",
    "key_identifier",
    "key_version",
    "dek_id",
    "encrypted_dek",
    "ciphertext",
    "encryption_timestamp",
)
_FIELD_SET: Final = frozenset(_FIELDS)
_STRING_FIELDS: Final = tuple(name for name in _FIELDS if name != "key_version")

_KEY_IDENTIFIER_RE: Final = re.compile(r"[A-Za-z0-9._:/@+=,\-]{1,512}\Z", re.ASCII)
_DEK_ID_RE: Final = re.compile(r"[0-9a-f]{32}\Z", re.ASCII)
_TIMESTAMP: Final = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?Z"
_TIMESTAMP_RE: Final = re.compile(_TIMESTAMP + r"\Z", re.ASCII)
_MAX_KEY_VERSION: Final = 2**31 - 1

# The canonical layout ends with these two per-field members; everything before the first
# _CIPHERTEXT_MEMBER is the header, which no valid value can contain (none holds a quote).
_CIPHERTEXT_MEMBER: Final = ',"ciphertext":"'
_CANONICAL_TAIL: Final = re.compile(
    r',"ciphertext":"([A-Za-z0-9+/]*={0,2})","encryption_timestamp":"(' + _TIMESTAMP + r')"\}\Z',
    re.ASCII,
)

_AD_MAGIC: Final = b"heimdall.envelope.v1\x00"
_WRAP_MAGIC: Final = b"heimdall.data-key.v1\x00"


@dataclass(frozen=True, slots=True)
class EncryptionContext:
    """Where a value lives. Bound to its ciphertext: decrypting it anywhere else fails."""

    node_label: str
    canonical_key: str
    field_name: str

    def __post_init__(self) -> None:
        # One expression for the usual case (a batch decrypt builds one context per field);
        # anything else is checked value by value, for the message. context_of makes this
        # same check and no other: a check added here belongs there too.
        if not _plain_context_values(self.node_label, self.canonical_key, self.field_name):
            self._check_each()

    def _check_each(self) -> None:
        for name in ("node_label", "canonical_key", "field_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > MAX_CONTEXT_VALUE_CHARS:
                raise ValueError(f"encryption context {name} must be 1-1024 characters")

    def encode(self) -> bytes:
        label = self.node_label.encode()
        key = self.canonical_key.encode()
        name = self.field_name.encode()
        return b"".join((_U32(len(label)), label, _U32(len(key)), key, _U32(len(name)), name))


def _plain_context_values(label: object, key: object, name: object) -> bool:
    """Whether the three values are plain strings of 1-1024 characters: what EncryptionContext
    accepts, save str subclasses (checked value by value)."""
    limit = MAX_CONTEXT_VALUE_CHARS
    return (
        type(label) is str
        and type(key) is str
        and type(name) is str
        and 0 < len(label) <= limit
        and 0 < len(key) <= limit
        and 0 < len(name) <= limit
    )


# A batch builds one context per field. EncryptionContext(...) runs the frozen dataclass's
# __init__ (object.__setattr__ per slot), then __post_init__; context_of makes the same check
# and stores the values through the slots' own setters instead, in about half the time. A
# field added to EncryptionContext fails this unpacking at import.
_NEW_CONTEXT = object.__new__
_SET_NODE_LABEL, _SET_CANONICAL_KEY, _SET_FIELD_NAME = (
    EncryptionContext.__dict__[f.name].__set__ for f in fields(EncryptionContext)
)


def context_of(node_label: str, canonical_key: str, field_name: str) -> EncryptionContext:
    """``EncryptionContext(node_label, canonical_key, field_name)``, built sooner."""
    if not _plain_context_values(node_label, canonical_key, field_name):
        return EncryptionContext(node_label, canonical_key, field_name)  # checked, as ever
    context: EncryptionContext = _NEW_CONTEXT(EncryptionContext)
    _SET_NODE_LABEL(context, node_label)
    _SET_CANONICAL_KEY(context, canonical_key)
    _SET_FIELD_NAME(context, field_name)
    return context


@dataclass(frozen=True, slots=True)
class Envelope:
    """One parsed envelope. Its repr shows the header only, never the ciphertexts."""

    encryption_version: EncryptionVersion
    algorithm: str
    key_identifier: str
    key_version: int
    dek_id: str
    encrypted_dek: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)
    encryption_timestamp: str = ""

    def to_json(self) -> str:
        # Every value is ASCII (the parser's rules), so orjson's bytes equal json.dumps's with
        # compact separators; the frozen vectors pin them.
        return orjson.dumps(
            {
                "encryption_version": self.encryption_version.value,
                "algorithm": self.algorithm,
                "key_identifier": self.key_identifier,
                "key_version": self.key_version,
                "dek_id": self.dek_id,
                "encrypted_dek": binascii.b2a_base64(self.encrypted_dek, newline=False).decode(),
                "ciphertext": binascii.b2a_base64(self.ciphertext, newline=False).decode(),
                "encryption_timestamp": self.encryption_timestamp,
            }
        ).decode()

    def header_json(self) -> str:
        """The canonical JSON text before the ciphertext member: the same for every field sealed
        under one data key and one wrapping of it (see :func:`canonical_header`)."""
        return _header_json(
            encryption_version=self.encryption_version.value,
            algorithm=self.algorithm,
            key_identifier=self.key_identifier,
            key_version=self.key_version,
            dek_id=self.dek_id,
            encrypted_dek=self.encrypted_dek,
        )

    def rewrapped(self, key_identifier: str, key_version: int, encrypted_dek: bytes) -> Envelope:
        """This envelope with its data key wrapped anew (same data key, same ciphertext)."""
        return Envelope(
            self.encryption_version,
            self.algorithm,
            key_identifier,
            key_version,
            self.dek_id,
            encrypted_dek,
            self.ciphertext,
            self.encryption_timestamp,
        )

    def reencrypted_by_provider(
        self, key_identifier: str, key_version: int, ciphertext: bytes
    ) -> Envelope:
        """This KMS-DIRECT envelope with the value the provider re-encrypted under another key
        version (same dek_id, context binding and timestamp; still no data key)."""
        if self.algorithm != KMS_DIRECT:
            raise ValueError("only a KMS-DIRECT envelope is re-encrypted by its provider")
        return replace(
            self, key_identifier=key_identifier, key_version=key_version, ciphertext=ciphertext
        )


_U32 = struct.Struct(">I").pack


def _header_json(
    *,
    encryption_version: str,
    algorithm: str,
    key_identifier: str,
    key_version: int,
    dek_id: str,
    encrypted_dek: bytes,
) -> str:
    # The values obey the parser's character rules (no quote, backslash or control character),
    # so this is the text orjson writes for them: Envelope.to_json's prefix.
    dek_b64 = binascii.b2a_base64(encrypted_dek, newline=False).decode()
    return (
        f'{{"encryption_version":"{encryption_version}","algorithm":"{algorithm}",'
        f'"key_identifier":"{key_identifier}","key_version":{key_version},'
        f'"dek_id":"{dek_id}","encrypted_dek":"{dek_b64}"'
    )


def _lp(value: str) -> bytes:
    raw = value.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


def wrap_associated_data(encryption_version: str, algorithm: str, dek_id: str) -> bytes:
    """What a data key's wrapping is bound to."""
    return _WRAP_MAGIC + _lp(encryption_version) + _lp(algorithm) + _lp(dek_id)


def data_associated_data(
    encryption_version: str,
    algorithm: str,
    dek_id: str,
    encryption_timestamp: str,
    context: EncryptionContext,
) -> bytes:
    """What a field's ciphertext is bound to: the data-layer header and the context."""
    return data_ad(
        data_ad_prefix(encryption_version, algorithm, dek_id), encryption_timestamp, context
    )


def seal(
    aead: Aead,
    *,
    encryption_version: EncryptionVersion,
    key_identifier: str,
    key_version: int,
    dek_id: str,
    encrypted_dek: bytes,
    encryption_timestamp: str,
    context: EncryptionContext,
    plaintext: bytes,
) -> Envelope:
    """Encrypt *plaintext* under the data key in *aead* and build its envelope."""
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise ValueError(f"plaintext is over the {MAX_PLAINTEXT_BYTES}-byte limit")
    ad = data_associated_data(
        encryption_version.value, ALGORITHM, dek_id, encryption_timestamp, context
    )
    return Envelope(
        encryption_version=encryption_version,
        algorithm=ALGORITHM,
        key_identifier=key_identifier,
        key_version=key_version,
        dek_id=dek_id,
        encrypted_dek=encrypted_dek,
        ciphertext=aead.encrypt(plaintext, ad),
        encryption_timestamp=encryption_timestamp,
    )


def open_envelope(aead: Aead, envelope: Envelope, context: EncryptionContext) -> bytes:
    """Decrypt a parsed envelope with its (already unwrapped) data key."""
    ad = data_associated_data(
        envelope.encryption_version.value,
        envelope.algorithm,
        envelope.dek_id,
        envelope.encryption_timestamp,
        context,
    )
    return aead.decrypt(envelope.ciphertext, ad)


class Header:
    """The header shared by every field sealed under one data key, pre-encoded once.

    Sealing many small values under a cached data key is dominated by serialisation, so the JSON
    prefix and the data-layer associated data prefix are built once per data key.
    """

    __slots__ = ("_ad_prefix", "_json_prefix", "dek_id", "encryption_version", "key_version")

    def __init__(
        self,
        *,
        encryption_version: EncryptionVersion,
        key_identifier: str,
        key_version: int,
        dek_id: str,
        encrypted_dek: bytes,
    ) -> None:
        if not _KEY_IDENTIFIER_RE.match(key_identifier):
            raise ValueError("key identifier has characters outside [A-Za-z0-9._:/@+=,-]")
        if not _DEK_ID_RE.match(dek_id) or not 0 < len(encrypted_dek) <= MAX_WRAPPED_KEY_BYTES:
            raise ValueError("data key id or wrapped data key is malformed")
        self.encryption_version = encryption_version
        self.key_version = key_version
        self.dek_id = dek_id
        self._json_prefix = (
            _header_json(
                encryption_version=encryption_version.value,
                algorithm=ALGORITHM,
                key_identifier=key_identifier,
                key_version=key_version,
                dek_id=dek_id,
                encrypted_dek=encrypted_dek,
            )
            + _CIPHERTEXT_MEMBER
        )
        self._ad_prefix = data_ad_prefix(encryption_version.value, ALGORITHM, dek_id)

    def seal(self, aead: Aead, plaintext: bytes, context: EncryptionContext, timestamp: str) -> str:
        """Encrypt *plaintext* and return the envelope JSON (same bytes as Envelope.to_json)."""
        if len(plaintext) > MAX_PLAINTEXT_BYTES:
            raise ValueError(f"plaintext is over the {MAX_PLAINTEXT_BYTES}-byte limit")
        ad = data_ad(self._ad_prefix, timestamp, context)
        ciphertext = binascii.b2a_base64(aead.encrypt(plaintext, ad), newline=False).decode()
        return f'{self._json_prefix}{ciphertext}","encryption_timestamp":"{timestamp}"}}'

    def __repr__(self) -> str:
        return f"Header(dek_id={self.dek_id!r}, key_version={self.key_version})"


def load(text: str | bytes) -> dict[str, Any]:
    """Decode envelope text into its JSON object. Checks size, JSON syntax, shape, version, the
    exact field set without duplicate members, and the JSON type of every value (seven strings
    and the integer key_version); :func:`from_mapping` then checks the values themselves."""
    text = _text(text)
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise InvalidEnvelope("envelope is not valid JSON") from None
    if not isinstance(obj, dict):
        raise InvalidEnvelope("envelope must be a JSON object")
    version = obj.get("encryption_version")
    if not isinstance(version, str):
        raise InvalidEnvelope("envelope lacks a string encryption_version")
    if version not in _VERSIONS:
        raise UnsupportedEnvelope("envelope has an unsupported encryption_version")
    if obj.keys() != _FIELD_SET:
        missing = sorted(_FIELD_SET - obj.keys())
        if missing:
            raise InvalidEnvelope(f"envelope lacks field {missing[0]!r}")
        raise InvalidEnvelope("envelope has an unknown field")
    for name in _STRING_FIELDS:
        if type(obj[name]) is not str:
            raise InvalidEnvelope(f"envelope {name} must be a string")
    if type(obj["key_version"]) is not int:  # bool is an int subclass and True == 1
        raise InvalidEnvelope("envelope key_version must be a positive integer")
    _reject_duplicate_members(obj, text)
    return obj


def _text(text: object) -> str:
    """The envelope as text, within the size cap."""
    if isinstance(text, bytes | bytearray):
        if len(text) > MAX_ENVELOPE_CHARS:
            raise EnvelopeTooLarge("envelope is over the size limit")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidEnvelope("envelope is not UTF-8 text") from None
    if not isinstance(text, str):
        raise InvalidEnvelope("envelope must be a JSON string")
    if len(text) > MAX_ENVELOPE_CHARS:
        raise EnvelopeTooLarge("envelope is over the size limit")
    return text


def _reject_duplicate_members(obj: dict[str, Any], text: str) -> None:
    """Raise InvalidEnvelope if *text*, which orjson read as *obj*, repeats a member.

    orjson keeps the last of repeated members without a word. A text that is exactly orjson's
    serialisation of *obj* has one member per key (a repeated one would be in the text but not in
    *obj*), which settles every envelope heimdall writes at orjson's speed; any other text is
    read again by the json module, whose object_pairs_hook sees every member.
    """
    if orjson.dumps(obj) == text.encode():
        return
    try:
        json.loads(text, object_pairs_hook=_unique_members)
    except (ValueError, RecursionError):  # orjson read it, so only nesting depth can get here
        raise InvalidEnvelope("envelope is not valid JSON") from None


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise InvalidEnvelope("envelope has a duplicate field")
    return members


def canonical_header(text: str) -> str | None:
    """The header text of an envelope that may be in the canonical layout, else None.

    The fast path of decryption reads an envelope in two steps, without a JSON parser: this
    header (every member before the ciphertext), then :func:`canonical_body`. The header is
    not validated here: it may be trusted only by exact comparison with the
    :meth:`Envelope.header_json` of an envelope that passed :func:`parse`. Never raises.
    """
    if not isinstance(text, str) or len(text) > MAX_ENVELOPE_CHARS:
        return None
    split = text.find(_CIPHERTEXT_MEMBER)
    return text[:split] if split > 0 else None


def canonical_body(text: str, header: str) -> tuple[bytes, str] | None:
    """Ciphertext and encryption_timestamp of *text*, whose header is *header*, if the rest of
    *text* is their canonical form with valid values, else None. Never raises.

    With a header that is :meth:`Envelope.header_json` of an envelope that passed :func:`parse`,
    a result means *text* is the canonical form of an envelope that :func:`parse` accepts with
    these values; None means "parse it", so every error comes from :func:`parse`.
    """
    tail = _CANONICAL_TAIL.match(text, len(header))
    if tail is None:
        return None
    ciphertext = _canonical_b64(tail.group(1))
    if ciphertext is None or not OVERHEAD <= len(ciphertext) <= MAX_PLAINTEXT_BYTES + OVERHEAD:
        return None
    return ciphertext, tail.group(2)


def parse(text: str | bytes) -> Envelope:
    """Parse and validate a stored envelope. Raises InvalidEnvelope or one of its subclasses."""
    return from_mapping(load(text))


def from_mapping(obj: dict[str, Any]) -> Envelope:
    """Validate every value of a loaded envelope (see :func:`load`)."""
    algorithm = obj["algorithm"]
    if not isinstance(algorithm, str):
        raise InvalidEnvelope("envelope algorithm must be a string")
    if algorithm not in _ALGORITHMS:
        raise UnsupportedEnvelope("envelope has an unsupported algorithm")
    key_identifier = obj["key_identifier"]
    if not isinstance(key_identifier, str) or not _KEY_IDENTIFIER_RE.match(key_identifier):
        raise InvalidEnvelope("envelope key_identifier is malformed")
    key_version = obj["key_version"]
    if type(key_version) is not int or not 1 <= key_version <= _MAX_KEY_VERSION:
        raise InvalidEnvelope("envelope key_version must be a positive integer")
    dek_id = obj["dek_id"]
    if not isinstance(dek_id, str) or not _DEK_ID_RE.match(dek_id):
        raise InvalidEnvelope("envelope dek_id must be 32 lowercase hex digits")
    encrypted_dek = _b64(obj["encrypted_dek"], "encrypted_dek")
    if algorithm == KMS_DIRECT:
        if encrypted_dek:
            raise InvalidEnvelope("a KMS-DIRECT envelope carries no encrypted_dek")
    elif not encrypted_dek:
        raise InvalidEnvelope("envelope encrypted_dek is empty")
    if len(encrypted_dek) > MAX_WRAPPED_KEY_BYTES:
        raise EnvelopeTooLarge("envelope encrypted_dek is over the size limit")
    ciphertext, timestamp = _body(obj)
    return Envelope(
        encryption_version=_VERSIONS[obj["encryption_version"]],
        algorithm=algorithm,
        key_identifier=key_identifier,
        key_version=key_version,
        dek_id=dek_id,
        encrypted_dek=encrypted_dek,
        ciphertext=ciphertext,
        encryption_timestamp=timestamp,
    )


def _body(obj: dict[str, Any]) -> tuple[bytes, str]:
    """The validated per-field values of a loaded envelope: ciphertext and timestamp."""
    timestamp = obj["encryption_timestamp"]
    if not isinstance(timestamp, str) or not _TIMESTAMP_RE.match(timestamp):
        raise InvalidEnvelope("envelope encryption_timestamp is not an RFC 3339 UTC time")
    ciphertext = _b64(obj["ciphertext"], "ciphertext")
    if len(ciphertext) < OVERHEAD:
        raise InvalidEnvelope("envelope ciphertext is truncated")
    if len(ciphertext) > MAX_PLAINTEXT_BYTES + OVERHEAD:
        raise EnvelopeTooLarge("envelope ciphertext is over the size limit")
    return ciphertext, timestamp


def data_ad_prefix(encryption_version: str, algorithm: str, dek_id: str) -> bytes:
    """The part of :func:`data_associated_data` shared by every field under one data key."""
    return _AD_MAGIC + _lp(encryption_version) + _lp(algorithm) + _lp(dek_id)


def data_ad(prefix: bytes, encryption_timestamp: str, context: EncryptionContext) -> bytes:
    return prefix + _lp(encryption_timestamp) + context.encode()


def _b64(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidEnvelope(f"envelope {name} must be a base64 string")
    raw = _canonical_b64(value)
    if raw is None:
        raise InvalidEnvelope(f"envelope {name} is not canonical base64")
    return raw


def _canonical_b64(value: str) -> bytes | None:
    """The bytes of *value* if it is their one base64 text (RFC 4648 section 3.5), else None."""
    try:
        raw = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: a character outside ASCII
        return None
    # strict_mode still takes extra padding ("QUJD==") and non-zero unused bits ("QR=="), so
    # the bytes are encoded again: a value has one text.
    if binascii.b2a_base64(raw, newline=False) != value.encode():
        return None
    return raw
