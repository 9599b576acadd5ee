"""Adopting a graph's FieldValue nodes that heimdall did not write: ``heimdall age adopt``.

spec: Migration Strategy, Phases 3-4; Storage in Apache AGE. An application's graph may already
hold FieldValue nodes written by the old env-key code: an envelope in ``encrypted_data`` (the
legacy format, :class:`~heimdall.kms.legacy.LegacyMasterKey`'s), or a value in the clear
(``is_encrypted`` false, the value in ``value`` or, lacking that, in ``encrypted_data``), with
only the spec's properties. :func:`adopt` reads every node and sorts it into a
:class:`NodeKind`:

* an envelope heimdall reads gets the properties heimdall keeps beside it, each taken from the
  envelope itself (``encryption_version``, ``key_version``, ``dek_id``), its ``field_name`` from
  its canonical key, and ``created_at`` and ``updated_at`` if it has none. Its envelope is not
  touched: a legacy one is then a legacy field, which ``heimdall migrate start`` re-encrypts
  under the KMS;
* a value in the clear is encrypted as an ingest would (the mode's writer: the KMS, or in legacy
  mode the env key, which ``migrate start`` then leaves for the KMS), and its ``value``
  property removed, in the same update;
* a node lacking what heimdall needs (a canonical key of heimdall's form, a boolean
  ``is_encrypted``, an envelope heimdall can parse or one plaintext value, a ``field_name``
  matching its key) is reported with its id and a reason, and never changed; so is a node that
  keeps a ``value`` beside its envelope.

Each change is one compare-and-swap on every property the node had when read, so a node the
application changes meanwhile is left alone (counted, for the next run). A node already complete
is not written. Every change is audited, by canonical key, before it is written; ``dry_run``
writes nothing. Nothing here logs or reports a value or an envelope.
"""

from __future__ import annotations

import enum
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from heimdall.audit import AuditEvent, EventType
from heimdall.blind_index import is_canonical_key
from heimdall.envelope import MAX_PLAINTEXT_BYTES, EncryptionContext, Envelope, parse
from heimdall.errors import HeimdallError
from heimdall.rbac import Caller, Permission
from heimdall.service import FIELD_LABEL, Heimdall
from heimdall.store.base import utc_now
from heimdall.store.nodes import FieldNode, NodeStore

__all__ = ["MAX_LISTED", "AdoptReport", "NodeKind", "Unadoptable", "adopt"]

MAX_LISTED: Final = 10_000  # incomplete nodes listed by id; the rest are counted
_BATCH: Final = 500


class NodeKind(enum.StrEnum):
    """What a FieldValue node holds."""

    LEGACY = "legacy"  # an envelope under the static env key
    KMS = "kms"  # an envelope under a key management service's key
    PLAINTEXT = "plaintext"  # is_encrypted false: the value in the clear
    INCOMPLETE = "incomplete"  # lacks what heimdall needs: reported, never changed


@dataclass(frozen=True, slots=True)
class Unadoptable:
    """A node adoption leaves as it is, and why (the reason names properties, not values)."""

    node_id: int
    reason: str


@dataclass(slots=True)
class AdoptReport:
    """What :func:`adopt` found and did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    found: Counter[NodeKind] = field(default_factory=Counter)
    complete: int = 0  # nodes that had every property heimdall needs
    adopted: int = 0  # envelopes given heimdall's properties
    encrypted: int = 0  # plaintext values encrypted
    changed_meanwhile: int = 0  # changed by someone else between read and write: left alone
    incomplete: list[Unadoptable] = field(default_factory=list)  # the first MAX_LISTED

    @property
    def nodes(self) -> int:
        return sum(self.found.values())


@dataclass(frozen=True, slots=True)
class _Plan:
    kind: NodeKind
    changes: dict[str, object] = field(default_factory=dict)
    plaintext: str = field(default="", repr=False)
    reason: str = ""


def _incomplete(reason: str) -> _Plan:
    return _Plan(NodeKind.INCOMPLETE, reason=reason)


def _values(node: FieldNode) -> dict[str, object] | str:
    """The node's properties, decoded; or the reason one cannot be."""
    values: dict[str, object] = {}
    for name, text in node.texts.items():
        if text is None:
            continue
        try:
            value = json.loads(text)
        except ValueError:
            return f"its {name} is not a plain JSON value"
        if value is not None:
            values[name] = value
    return values


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b  # 1 is not True, nor "1"


def _plan(node: FieldNode, now: str) -> _Plan:
    values = _values(node)
    if isinstance(values, str):
        return _incomplete(values)
    field_name = _field_name(values)
    if field_name is None:
        return _incomplete(
            "no canonical_key of heimdall's form (<field>:hash:<64 hex digits>), or a "
            "field_name that is not the field it names"
        )
    is_encrypted = values.get("is_encrypted")
    if not isinstance(is_encrypted, bool):
        return _incomplete("is_encrypted is not true or false")
    stamps = {
        name: values[name] if isinstance(values.get(name), str) else now
        for name in ("created_at", "updated_at")
    }
    if not is_encrypted:
        # Encrypted now: written now, whatever the node said.
        return _plaintext(values, field_name, {**stamps, "updated_at": now})
    return _envelope(values, {"field_name": field_name, **stamps})


def _field_name(values: dict[str, object]) -> str | None:
    """The field the node's canonical key names, if the key has heimdall's form and the node
    names no other field."""
    key = values.get("canonical_key")
    if not isinstance(key, str) or not is_canonical_key(key):
        return None
    field_name = key.partition(":hash:")[0]
    return field_name if values.get("field_name", field_name) == field_name else None


def _envelope(values: dict[str, object], wanted: dict[str, object]) -> _Plan:
    if "value" in values:
        return _incomplete("it keeps a value property beside its envelope")
    data = values.get("encrypted_data")
    if not isinstance(data, str):
        return _incomplete("is_encrypted is true but encrypted_data is not a string")
    try:
        envelope = parse(data)
    except HeimdallError:
        return _incomplete("its encrypted_data is not an envelope heimdall reads")
    kind = NodeKind.LEGACY if envelope.encryption_version == "legacy" else NodeKind.KMS
    wanted = {**_envelope_properties(envelope), **wanted}
    return _Plan(kind, {k: v for k, v in wanted.items() if not _same(values.get(k), v)})


def _envelope_properties(envelope: Envelope) -> dict[str, object]:
    return {
        "encryption_version": str(envelope.encryption_version),  # the text, not the enum
        "key_version": envelope.key_version,
        "dek_id": envelope.dek_id,
    }


def _plaintext(values: dict[str, object], field_name: str, stamps: dict[str, object]) -> _Plan:
    held = [values[name] for name in ("value", "encrypted_data") if name in values]
    if len(held) != 1 or not isinstance(held[0], str):
        return _incomplete(
            "is_encrypted is false but it holds no text value, or two (value and encrypted_data)"
        )
    try:
        size = len(held[0].encode("utf-8"))
    except UnicodeEncodeError:
        return _incomplete("its value is not valid Unicode text")
    if size > MAX_PLAINTEXT_BYTES:
        return _incomplete(f"its value is over the {MAX_PLAINTEXT_BYTES}-byte limit")
    return _Plan(NodeKind.PLAINTEXT, {"field_name": field_name, **stamps}, plaintext=held[0])


def adopt(
    heimdall: Heimdall,
    nodes: NodeStore,
    *,
    caller: Caller,
    dry_run: bool = False,
    batch_size: int = _BATCH,
) -> AdoptReport:
    """Read every FieldValue node of *nodes* and adopt what heimdall can (see the module
    docstring). Needs the reencrypt permission (read_status for a dry run)."""
    heimdall.require(caller, Permission.READ_STATUS if dry_run else Permission.REENCRYPT)
    report = AdoptReport(dry_run=dry_run)
    after = -1
    while batch := nodes.field_nodes(after, batch_size):
        after = batch[-1].node_id
        plans = [(node, _plan(node, utc_now())) for node in batch]
        for node, plan in plans:
            report.found[plan.kind] += 1
            if plan.kind is NodeKind.INCOMPLETE:
                if len(report.incomplete) < MAX_LISTED:
                    report.incomplete.append(Unadoptable(node.node_id, plan.reason))
            elif plan.kind is not NodeKind.PLAINTEXT and not plan.changes:
                report.complete += 1
        if dry_run:
            report.adopted += sum(1 for _, p in plans if p.kind in _ENVELOPES and p.changes)
            report.encrypted += sum(1 for _, p in plans if p.kind is NodeKind.PLAINTEXT)
            continue
        _write_envelopes(heimdall, nodes, caller, plans, report)
        _encrypt_plaintexts(heimdall, nodes, caller, plans, report)
    return report


_ENVELOPES: Final = (NodeKind.LEGACY, NodeKind.KMS)


def _key(node: FieldNode) -> str:
    return str(json.loads(node.texts["canonical_key"] or '""'))


def _write_envelopes(
    heimdall: Heimdall,
    nodes: NodeStore,
    caller: Caller,
    plans: list[tuple[FieldNode, _Plan]],
    report: AdoptReport,
) -> None:
    todo = [(node, plan) for node, plan in plans if plan.kind in _ENVELOPES and plan.changes]
    heimdall.record(
        *(
            AuditEvent.of(
                EventType.NODE_ADOPT,
                caller,
                field_identifier=_key(node),
                operation=f"age adopt {plan.kind.value} envelope",
            )
            for node, plan in todo
        )
    )
    for node, plan in todo:
        if nodes.change_node(node, plan.changes):
            report.adopted += 1
        else:
            report.changed_meanwhile += 1


def _encrypt_plaintexts(
    heimdall: Heimdall,
    nodes: NodeStore,
    caller: Caller,
    plans: list[tuple[FieldNode, _Plan]],
    report: AdoptReport,
) -> None:
    todo = [(node, plan) for node, plan in plans if plan.kind is NodeKind.PLAINTEXT]
    if not todo:
        return
    cipher = heimdall.router.writer
    sealed = cipher.encrypt_many(
        [
            (
                plan.plaintext.encode("utf-8"),
                EncryptionContext(FIELD_LABEL, _key(node), str(plan.changes["field_name"])),
            )
            for node, plan in todo
        ]
    )
    # Audited before the write, as ingest does: a stored envelope always has its event.
    heimdall.record(
        *(
            AuditEvent.of(
                EventType.ENCRYPT,
                caller,
                field_identifier=_key(node),
                key_identifier=result.key_identifier,
                key_version=result.key_version,
                operation="age adopt plaintext",
            )
            for (node, _), result in zip(todo, sealed, strict=True)
        )
    )
    for (node, plan), result in zip(todo, sealed, strict=True):
        changes = {
            **plan.changes,
            "encrypted_data": result.envelope,
            "is_encrypted": True,
            "key_version": result.key_version,
            "encryption_version": result.encryption_version,
            "dek_id": result.dek_id,
        }
        if nodes.change_node(node, changes, remove=("value",)):
            report.encrypted += 1
        else:
            report.changed_meanwhile += 1
