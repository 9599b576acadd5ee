"""The PII policy: which fields of a record are encrypted, kept in the clear or dropped.

Invariants:

* A field the policy does not name gets ``default_action``; the bundled default policy uses
  ``drop``, so a field nobody classified is never stored in the clear.
* The record id and source fields are structural: they identify the record and are never
  classified, so no rule may name them.
* A :class:`Policy` is immutable and so is every :class:`ClassifiedRecord` it produces.
* No error raised here carries a field's value, only field names and types.
"""

from __future__ import annotations

import enum
import functools
import importlib.resources
import json
import pathlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeAlias

from heimdall.errors import ConfigurationError, HeimdallError
from heimdall.normalize import Normalizer

__all__ = [
    "ClassifiedRecord",
    "FieldAction",
    "FieldRule",
    "PlainValue",
    "Policy",
    "RecordError",
    "default_policy",
    "load_policy",
]

PlainValue: TypeAlias = str | int | float | bool | None

FIELD_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


class RecordError(HeimdallError, ValueError):
    """A record cannot be classified. The message names the field, never its value."""


class FieldAction(enum.StrEnum):
    """What happens to one field of an ingested record."""

    ENCRYPT = "encrypt"  # envelope-encrypted and given a blind index
    PLAIN = "plain"  # kept in the clear on the record
    DROP = "drop"  # discarded


@dataclass(frozen=True, slots=True)
class FieldRule:
    """The action for one field; ``normalizer`` shapes the blind index of encrypt fields only."""

    action: FieldAction
    normalizer: Normalizer = Normalizer.EXACT


@dataclass(frozen=True, slots=True)
class ClassifiedRecord:
    """One record split by its policy. None and blank values appear nowhere in it.

    ``encrypt`` holds (field name, value as str, normalizer) in record order; ``plain`` holds
    the values kept in the clear (strings stripped, numbers and booleans as given); ``dropped``
    holds the names of discarded fields only.
    """

    record_id: str | None
    source: str | None
    encrypt: tuple[tuple[str, str, Normalizer], ...]
    plain: Mapping[str, PlainValue] = field(hash=False)
    dropped: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain", MappingProxyType(dict(self.plain)))


@dataclass(frozen=True, slots=True)
class Policy:
    """Rules by field name plus the action for every other field. Immutable once built.

    Raises ConfigurationError if a field name is malformed or a rule names a structural field.
    """

    rules: Mapping[str, FieldRule] = field(hash=False)
    default_action: FieldAction = FieldAction.DROP
    record_id_field: str = "id"
    source_field: str = "source"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))
        problem = _structure_problem(self.rules, self.record_id_field, self.source_field)
        if problem is not None:
            raise ConfigurationError(f"policy: {problem}")

    def rule_for(self, field_name: str) -> FieldRule:
        """The rule for *field_name*, or the default action for a field the policy does not name."""
        rule = self.rules.get(field_name)
        return rule if rule is not None else FieldRule(self.default_action)

    def classify(self, record: Mapping[str, object]) -> ClassifiedRecord:
        """Split *record* into encrypt, plain and dropped fields.

        Raises RecordError for a list, dict or other non-scalar value in an encrypt or plain
        field, or an id or source that is not a string or integer.
        """
        encrypt: list[tuple[str, str, Normalizer]] = []
        plain: dict[str, PlainValue] = {}
        dropped: list[str] = []
        for name, value in record.items():
            if name in (self.record_id_field, self.source_field):
                continue
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            rule = self.rule_for(name)
            if rule.action is FieldAction.DROP:
                # Checked before the type so a dropped field's shape can never fail a record.
                dropped.append(name)
                continue
            if not isinstance(value, str | int | float):  # bool is an int
                raise RecordError(
                    f"field {name!r} holds a {type(value).__name__}, "
                    "expected a string, number or boolean"
                )
            if rule.action is FieldAction.PLAIN:
                _no_nul(name, name)
                if isinstance(value, str):
                    _no_nul(name, value)
                plain[name] = value.strip() if isinstance(value, str) else value
            else:
                encrypt.append((name, _as_text(value), rule.normalizer))
        return ClassifiedRecord(
            record_id=_structural(record, self.record_id_field, "record id"),
            source=_structural(record, self.source_field, "source"),
            encrypt=tuple(encrypt),
            plain=plain,
            dropped=tuple(dropped),
        )


def _as_text(value: str | int | float) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value.strip() if isinstance(value, str) else str(value)


def _structural(record: Mapping[str, object], name: str, role: str) -> str | None:
    value = record.get(name)
    if value is None:
        return None
    # bool is excluded explicitly: True is an int, but never a meaningful id.
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RecordError(f"field {name!r} (the {role}) must be a string or integer")
    text = str(value).strip()
    _no_nul(name, text)
    return text or None


def _no_nul(name: str, text: str) -> None:
    """Refuse a NUL character in text that is stored as it is (plain values, names, ids):
    PostgreSQL keeps none in text or jsonb, so one would fail the whole batch there, and the
    record must be refused the same way on every store."""
    if "\x00" in text:
        raise RecordError(f"field {name!r} holds a NUL character (\\u0000), which is not stored")


def _structure_problem(
    rules: Mapping[str, FieldRule], record_id_field: str, source_field: str
) -> str | None:
    """What is wrong with this shape of policy, as a sentence fragment, or None."""
    for role, name in (("record_id_field", record_id_field), ("source_field", source_field)):
        if not FIELD_NAME.fullmatch(name):
            return f"{role}: invalid field name {name!r} (expected {FIELD_NAME.pattern})"
    if record_id_field == source_field:
        return f"record_id_field and source_field are both {record_id_field!r}"
    for name in rules:
        if not FIELD_NAME.fullmatch(name):
            return f"field {name!r}: invalid field name (expected {FIELD_NAME.pattern})"
        if name == record_id_field:
            return f"field {name!r}: is the record id field, which is never classified"
        if name == source_field:
            return f"field {name!r}: is the source field, which is never classified"
    return None


_TOP_LEVEL_KEYS: Final = frozenset({"default_action", "record_id_field", "source_field", "fields"})
_FIELD_KEYS: Final = frozenset({"action", "normalize"})
_PARSERS: Final = {".toml": "TOML", ".json": "JSON"}


def load_policy(path: pathlib.Path) -> Policy:
    """The policy in the TOML (``.toml``) or JSON (``.json``) file at *path*.

    Raises ConfigurationError, as one sentence naming the file, the field and the broken rule,
    if the file is missing, unreadable, not valid TOML/JSON, or not a valid policy.
    """
    where = f"policy {path}"
    kind = _PARSERS.get(path.suffix.lower())
    if kind is None:
        raise ConfigurationError(
            f"{where}: unsupported file type {path.suffix or '(none)'!r} (expected .toml or .json)"
        )
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"{where}: file not found") from None
    except OSError as exc:
        raise ConfigurationError(f"{where}: file cannot be read ({exc.strerror})") from None
    return _from_document(_parse(raw, kind, where), where)


@functools.cache
def default_policy() -> Policy:
    """The bundled ``heimdall/policies/default.toml``, loaded once (a Policy is immutable)."""
    where = "policy heimdall/policies/default.toml"
    raw = importlib.resources.files("heimdall.policies").joinpath("default.toml").read_bytes()
    return _from_document(_parse(raw, "TOML", where), where)


def _parse(raw: bytes, kind: str, where: str) -> Mapping[str, object]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    if kind == "TOML":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # tomllib's message already ends with "(at line L, column C)".
            raise ConfigurationError(f"{where}: invalid TOML: {exc}") from None

    def unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
        # TOML rejects a repeated key; JSON would silently keep the last one.
        keys = [key for key, _ in pairs]
        for key in keys:
            if keys.count(key) > 1:
                raise ConfigurationError(f"{where}: invalid JSON: duplicate key {key!r}")
        return dict(pairs)

    try:
        document: object = json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"{where}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(document, dict):
        raise ConfigurationError(f"{where}: invalid JSON: the top level must be an object")
    return document


def _from_document(document: Mapping[str, object], where: str) -> Policy:
    for key in document:
        if key not in _TOP_LEVEL_KEYS:
            raise ConfigurationError(
                f"{where}: unknown key {key!r} (expected {', '.join(sorted(_TOP_LEVEL_KEYS))})"
            )
    default_action = _action(document.get("default_action", "drop"), f"{where}: default_action")
    record_id_field = _string(document.get("record_id_field", "id"), f"{where}: record_id_field")
    source_field = _string(document.get("source_field", "source"), f"{where}: source_field")
    fields = document.get("fields", {})
    if not isinstance(fields, dict):
        raise ConfigurationError(f"{where}: fields must be a table of field tables")
    rules = {name: _rule(table, f"{where}: field {name!r}") for name, table in fields.items()}
    problem = _structure_problem(rules, record_id_field, source_field)
    if problem is not None:
        raise ConfigurationError(f"{where}: {problem}")
    return Policy(rules, default_action, record_id_field, source_field)


def _rule(table: object, where: str) -> FieldRule:
    if not isinstance(table, dict):
        raise ConfigurationError(f"{where}: must be a table with an action")
    for key in table:
        if key not in _FIELD_KEYS:
            raise ConfigurationError(f"{where}: unknown key {key!r} (expected action or normalize)")
    if "action" not in table:
        raise ConfigurationError(f"{where}: missing action (expected encrypt, plain or drop)")
    action = _action(table["action"], where)
    name = _string(table.get("normalize", "exact"), f"{where}: normalize")
    try:
        normalizer = Normalizer(name)
    except ValueError:
        expected = ", ".join(Normalizer)
        raise ConfigurationError(
            f"{where}: unknown normalize {name!r} (expected one of {expected})"
        ) from None
    return FieldRule(action, normalizer)


def _action(value: object, where: str) -> FieldAction:
    name = _string(value, where)
    try:
        return FieldAction(name)
    except ValueError:
        raise ConfigurationError(
            f"{where}: unknown action {name!r} (expected encrypt, plain or drop)"
        ) from None


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"{where}: must be a string, not {type(value).__name__}")
    return value
