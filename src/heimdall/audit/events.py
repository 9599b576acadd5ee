"""What an audit record holds, and the interface every audit sink implements.

spec: Audit and Compliance, Audit Log Requirements (fields and JSON log format). An event carries
identifiers only: canonical keys (HMACs, not values), key identifiers and versions, actor,
reason, request id. It has no field for plaintext, data keys or envelopes, so none can reach
the trail.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol, overload

import orjson

if TYPE_CHECKING:
    from heimdall.rbac import Caller

__all__ = [
    "AuditEvent",
    "AuditSink",
    "DecryptionRow",
    "Decryptions",
    "EventType",
    "Joined",
    "MemoryAuditSink",
    "Result",
    "event_bodies",
    "holds_checkpoints",
    "utc_now_ms",
]


class EventType(enum.StrEnum):
    ENCRYPT = "crypto.encrypt"
    DECRYPT = "crypto.decrypt"
    REWRAP = "crypto.rewrap"
    REENCRYPT = "crypto.reencrypt"
    LOOKUP = "index.lookup"
    KEY_CREATE = "key.create"
    KEY_ROTATE = "key.rotate"
    KEY_CONFIG = "key.config"
    KEY_REENABLE = "key.reenable"  # a decryption floor lowered: disabled versions decrypt again
    KMS_CHECK = "kms.check"  # a pre-flight check of the key provider
    ACCESS_DENIED = "access.denied"
    REENCRYPT_JOB = "job.reencrypt"
    MODE_CHANGE = "config.mode"
    AUDIT_CHECKPOINT = "audit.checkpoint"  # written by the file sink itself (chain, jsonl)
    AUDIT_REPAIR = "audit.repair"
    NODE_ADOPT = "graph.adopt"  # a graph node heimdall did not write, given its properties
    # A service token issued or revoked: its name and role, never the token.
    TOKEN_CREATE = "token.create"  # noqa: S105 - an event name, not a secret
    TOKEN_REVOKE = "token.revoke"  # noqa: S105 - likewise


class Result(enum.StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"


def utc_now_ms() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_OPTIONAL_FIELDS = (
    "field_identifier",
    "key_identifier",
    "key_version",
    "request_id",
    "reason",
    "source_ip",
    "operation",
    "error",
    "count",
    "token_name",
    "role",
)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit record. Every field is an identifier or a short label; none is secret."""

    event_type: EventType
    actor: str
    result: Result
    request_id: str
    field_identifier: str | None = None
    key_identifier: str | None = None
    key_version: int | None = None
    reason: str | None = None
    source_ip: str | None = None
    operation: str | None = None
    error: str | None = None
    count: int | None = None
    token_name: str | None = None  # a service token's name (heimdall.tokens), never the token
    role: str | None = None  # the role a service token grants
    timestamp: str = field(default_factory=utc_now_ms)

    @classmethod
    def of(
        cls,
        event_type: EventType,
        caller: Caller,
        *,
        error: BaseException | None = None,
        denied: bool = False,
        failed: bool = False,
        **details: Any,
    ) -> AuditEvent:
        """The event *caller* caused: actor, request id and source address from the caller;
        the result from *denied*, *error* (whose type name, never its message, is recorded)
        and *failed*; *details* are the other fields. Every event heimdall records is built
        here (or, for a batch of decrypts, by :meth:`decryption`, which makes the same event)."""
        if denied:
            result = Result.DENIED
        else:
            result = Result.FAILURE if error is not None or failed else Result.SUCCESS
        return cls(
            event_type,
            caller.actor,
            result,
            caller.request_id,
            source_ip=caller.source_ip,
            error=type(error).__name__ if error is not None else None,
            **details,
        )

    @classmethod
    def decryption(
        cls,
        caller: Caller,
        *,
        field_identifier: str | None,
        key_identifier: str | None,
        key_version: int | None,
        reason: str,
        error: BaseException | None,
        timestamp: str,
    ) -> AuditEvent:
        """The ``crypto.decrypt`` event :meth:`of` builds from the same arguments, without its
        keyword plumbing: the one event of a :class:`Decryptions` of one row."""
        error_name = None if error is None else type(error).__name__
        row = (field_identifier, key_identifier, key_version, error_name)
        return Decryptions.of(caller, reason, timestamp, (row,))[0]

    @classmethod
    def denial(
        cls, caller: Caller, operation: str, reason: str, *, field: str | None = None
    ) -> AuditEvent:
        """An ``access.denied`` event: *caller* may not do *operation*, for *reason*."""
        return cls.of(
            EventType.ACCESS_DENIED,
            caller,
            denied=True,
            field_identifier=field,
            operation=operation,
            reason=reason,
        )

    def to_dict(self) -> dict[str, Any]:
        """The event's JSON object: the three members every event has, then the optional ones
        that are set (in _OPTIONAL_FIELDS order), then the result. Written out member by
        member: the audit log serialises one of these per decrypted field."""
        out: dict[str, Any] = {
            "timestamp": self.timestamp,
            "event_type": self.event_type._value_,
            "actor": self.actor,
        }
        if self.field_identifier is not None:
            out["field_identifier"] = self.field_identifier
        if self.key_identifier is not None:
            out["key_identifier"] = self.key_identifier
        if self.key_version is not None:
            out["key_version"] = self.key_version
        if self.request_id is not None:
            out["request_id"] = self.request_id
        if self.reason is not None:
            out["reason"] = self.reason
        if self.source_ip is not None:
            out["source_ip"] = self.source_ip
        if self.operation is not None:
            out["operation"] = self.operation
        if self.error is not None:
            out["error"] = self.error
        if self.count is not None:
            out["count"] = self.count
        if self.token_name is not None:
            out["token_name"] = self.token_name
        if self.role is not None:
            out["role"] = self.role
        out["result"] = self.result._value_
        return out


DecryptionRow = tuple[str | None, str | None, int | None, str | None]
"""One field's ``crypto.decrypt`` event in a :class:`Decryptions`: field_identifier,
key_identifier, key_version, and the type name of its error (None: it decrypted)."""

_DECRYPT: Final = EventType.DECRYPT._value_
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # the integers orjson writes


class _Events(Sequence[AuditEvent]):
    """A sequence of events made on demand: subclasses give its length and its item at a
    position from 0 to the length; indexing (negative positions, slices) is done here."""

    __slots__ = ()

    def _at(self, position: int) -> AuditEvent:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> AuditEvent: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[AuditEvent]: ...

    def __getitem__(self, index: int | slice) -> AuditEvent | Sequence[AuditEvent]:
        length = len(self)
        if isinstance(index, slice):
            return [self._at(position) for position in range(*index.indices(length))]
        position = index + length if index < 0 else index
        if not 0 <= position < length:
            raise IndexError(f"{type(self).__name__} index out of range")
        return self._at(position)


@dataclass(frozen=True, slots=True)
class Decryptions(_Events):
    """The ``crypto.decrypt`` events of one batch decrypt: one caller, one reason, one time,
    and a row per field. Read as a sequence, each item is the event :meth:`AuditEvent.decryption`
    makes of its row; the file sink writes their JSON from the rows (:func:`event_bodies`), so
    a batch of thousands of fields builds no event object per field on its way to the trail."""

    actor: str
    request_id: str
    source_ip: str | None
    reason: str
    timestamp: str
    rows: tuple[DecryptionRow, ...] = field(repr=False)

    def __post_init__(self) -> None:
        # Its own tuples, whatever it was given: what is committed cannot change after it is
        # handed over (the group commit keeps it uncopied). A tuple of tuples is kept as is.
        object.__setattr__(self, "rows", tuple(map(tuple, self.rows)))

    @classmethod
    def of(
        cls, caller: Caller, reason: str, timestamp: str, rows: Sequence[DecryptionRow]
    ) -> Decryptions:
        rows = tuple(rows)
        return cls(caller.actor, caller.request_id, caller.source_ip, reason, timestamp, rows)

    def __len__(self) -> int:
        return len(self.rows)

    def _at(self, position: int) -> AuditEvent:
        return self._event(self.rows[position])

    def __iter__(self) -> Iterator[AuditEvent]:
        return map(self._event, self.rows)

    def _event(self, row: DecryptionRow) -> AuditEvent:
        field_identifier, key_identifier, key_version, error = row
        return AuditEvent(
            EventType.DECRYPT,
            self.actor,
            Result.SUCCESS if error is None else Result.FAILURE,
            self.request_id,
            field_identifier,
            key_identifier,
            key_version,
            self.reason,
            self.source_ip,
            None,  # operation
            error,
            timestamp=self.timestamp,
        )

    def bodies(self) -> list[bytes]:
        """Each event's JSON, byte for byte what ``orjson.dumps(event.to_dict())`` writes."""
        dumps = orjson.dumps
        # The members every event of the batch shares: those before the per-field ones, and
        # those after them (to_dict's order).
        head = dumps({"timestamp": self.timestamp, "event_type": _DECRYPT, "actor": self.actor})
        shared = {
            name: value
            for name, value in (
                ("request_id", self.request_id),
                ("reason", self.reason),
                ("source_ip", self.source_ip),
            )
            if value is not None
        }
        before = head[:-1]
        after = b"," + dumps(shared)[1:-1] if shared else b""
        succeeded = after + b',"result":"success"}'
        out: list[bytes] = []
        for row in self.rows:
            field_identifier, key_identifier, key_version, error = row
            if (
                field_identifier is None
                or key_identifier is None
                or type(key_version) is not int
                or not _INT_MIN <= key_version <= _INT_MAX
            ):
                # A row that names no key, or a version orjson would refuse: as to_dict has it.
                out.append(dumps(self._event(row).to_dict()))
                continue
            if error is None:
                ending = succeeded
            else:
                ending = b'%s,"error":%s,"result":"failure"}' % (after, dumps(error))
            out.append(
                b'%s,"field_identifier":%s,"key_identifier":%s,"key_version":%d%s'
                % (before, dumps(field_identifier), dumps(key_identifier), key_version, ending)
            )
        return out


@dataclass(frozen=True, slots=True)
class Joined(_Events):
    """Several writers' events, one after the other, as one sequence (a group commit's)."""

    parts: tuple[Sequence[AuditEvent], ...] = field(repr=False)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def _at(self, position: int) -> AuditEvent:
        for part in self.parts:
            if position < len(part):
                return part[position]
            position -= len(part)
        raise IndexError("Joined index out of range")  # a part shrank: not of heimdall's making

    def __iter__(self) -> Iterator[AuditEvent]:
        return itertools.chain.from_iterable(self.parts)


def event_bodies(events: Sequence[AuditEvent]) -> list[bytes]:
    """Each event's JSON object (:meth:`AuditEvent.to_dict`), as the file sink writes it."""
    if isinstance(events, Decryptions):
        return events.bodies()
    if isinstance(events, Joined):
        return [body for part in events.parts for body in event_bodies(part)]
    return [orjson.dumps(event.to_dict()) for event in events]


def holds_checkpoints(events: Sequence[AuditEvent]) -> bool:
    """Whether *events* hold an ``audit.checkpoint`` (which only the file sink writes)."""
    if isinstance(events, Decryptions):
        return False
    if isinstance(events, Joined):
        return any(holds_checkpoints(part) for part in events.parts)
    return any(event.event_type is EventType.AUDIT_CHECKPOINT for event in events)


class AuditSink(Protocol):
    def write(self, events: Sequence[AuditEvent]) -> None:
        """Persist all *events* or raise AuditError (the audited operation is then refused)."""
        ...

    def close(self) -> None:
        """Finish this process's part of the trail (the file sink writes a checkpoint)."""
        ...


class MemoryAuditSink:
    """Keeps events in a list; for tests and embedding."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def write(self, events: Sequence[AuditEvent]) -> None:
        self.events.extend(events)

    def close(self) -> None:
        pass
