"""The audit trail: one JSON line per encrypt, decrypt, key lifecycle event and denial.

spec: Audit and Compliance, Audit Log Requirements (fields and JSON log format); PCI DSS 10.

An event carries identifiers only: canonical keys (HMACs, not values), key identifiers and
versions, actor, reason, request id. It has no field for plaintext, data keys or envelopes, so
none can reach the trail. Writing is fail-closed: if an event cannot be written the operation it
records is refused (:class:`heimdall.errors.AuditError`).

The file sink chains its lines: each line's ``hash`` is SHA-256 over the previous line's hash and
this line's content, and a head record beside the log (``audit.log.head``) holds the size and
last hash, so :meth:`JsonlAuditLog.verify` detects an edited, reordered or deleted line, the
last one included. The chain is keyless: it shows accidental damage and naive edits; against
an attacker who can rewrite the host's files, forward the log to a write-once sink.
Appends from several processes are serialised with an exclusive lock on the file.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from heimdall.errors import AuditError

__all__ = [
    "AuditEvent",
    "AuditSink",
    "EventType",
    "JsonlAuditLog",
    "MemoryAuditSink",
    "Result",
    "VerifyReport",
]

GENESIS = "0" * 64
_HASH_SUFFIX_LEN = len(',"hash":""}') + 64


class EventType(enum.StrEnum):
    ENCRYPT = "crypto.encrypt"
    DECRYPT = "crypto.decrypt"
    REWRAP = "crypto.rewrap"
    REENCRYPT = "crypto.reencrypt"
    LOOKUP = "index.lookup"
    KEY_CREATE = "key.create"
    KEY_ROTATE = "key.rotate"
    KEY_CONFIG = "key.config"
    ACCESS_DENIED = "access.denied"
    REENCRYPT_JOB = "job.reencrypt"
    MODE_CHANGE = "config.mode"


class Result(enum.StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"


def utc_now_ms() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    timestamp: str = field(default_factory=utc_now_ms)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "timestamp": self.timestamp,
            "event_type": self.event_type.value,
            "actor": self.actor,
        }
        for name in (
            "field_identifier",
            "key_identifier",
            "key_version",
            "request_id",
            "reason",
            "source_ip",
            "operation",
            "error",
            "count",
        ):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out["result"] = self.result.value
        return out


class AuditSink(Protocol):
    def write(self, events: Sequence[AuditEvent]) -> None:
        """Persist all *events* or raise AuditError."""
        ...


class MemoryAuditSink:
    """Keeps events in a list; for tests and embedding."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def write(self, events: Sequence[AuditEvent]) -> None:
        self.events.extend(events)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    lines: int
    ok: bool
    first_bad_line: int | None = None
    problem: str | None = None


class JsonlAuditLog:
    """Append-only, hash-chained JSON Lines file (mode 0600)."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self._fsync = fsync

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditError(f"audit log {self.path} cannot be opened: {exc.strerror}") from None

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    def write(self, events: Sequence[AuditEvent]) -> None:
        if not events:
            return
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            previous = _last_hash(fd)
            lines = []
            for event in events:
                body = orjson.dumps(event.to_dict())
                digest = hashlib.sha256(previous.encode() + body).hexdigest()
                lines.append(body[:-1] + b',"hash":"' + digest.encode() + b'"}\n')
                previous = digest
            data = b"".join(lines)
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(0, "short write")
            if self._fsync:
                os.fsync(fd)
            self._write_head(os.fstat(fd).st_size, previous)
        except OSError as exc:
            raise AuditError(f"audit log {self.path} cannot be written: {exc.strerror}") from None
        finally:
            os.close(fd)

    def _write_head(self, size: int, last_hash: str) -> None:
        """Record where the chain ends, so truncating the log is detected too.

        Called with the log's lock held. The head lives beside the log; a copy shipped off the
        host (or the log itself, forwarded to a write-once sink) is what resists an attacker
        who can write both files.
        """
        fd = os.open(self.head_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            record = orjson.dumps({"size": size, "hash": last_hash})
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def tail(self, count: int) -> list[dict[str, Any]]:
        """The last *count* events, oldest first."""
        if count <= 0 or not self.path.exists():
            return []
        with self.path.open("rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            data = b""
            position = end
            # Read backwards in blocks until the block holds count complete lines.
            while position > 0 and data.count(b"\n") <= count:
                step = min(65536, position)
                position -= step
                handle.seek(position)
                data = handle.read(step) + data
        lines = data.splitlines()
        if position > 0:
            lines = lines[1:]  # the first line of the window may be partial
        return [orjson.loads(line) for line in lines[-count:]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            for line in handle:
                yield orjson.loads(line)

    def verify(self) -> VerifyReport:
        """Recompute the hash chain over the whole file and check it ends at the head."""
        previous = GENESIS
        number = 0
        size = 0
        if self.path.exists():
            with self.path.open("rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    size += len(raw)
                    line = raw.rstrip(b"\n")
                    stored = line[-_HASH_SUFFIX_LEN:]
                    if not (stored.startswith(b',"hash":"') and stored.endswith(b'"}')):
                        return VerifyReport(number, False, number, "line has no hash")
                    body = line[:-_HASH_SUFFIX_LEN] + b"}"
                    digest = hashlib.sha256(previous.encode() + body).hexdigest()
                    if stored[9:-2].decode() != digest:
                        return VerifyReport(number, False, number, "hash chain broken")
                    previous = digest
        head = self._read_head()
        if head is None:
            if number:
                return VerifyReport(number, False, number, "chain head record is missing")
            return VerifyReport(0, True)
        if head != (size, previous):
            return VerifyReport(number, False, number + 1, "log ends before its recorded head")
        return VerifyReport(number, True)

    def _read_head(self) -> tuple[int, str] | None:
        try:
            doc = orjson.loads(self.head_path.read_bytes())
            return int(doc["size"]), str(doc["hash"])
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return (-1, "")


def _last_hash(fd: int) -> str:
    size = os.fstat(fd).st_size
    if size == 0:
        return GENESIS
    start = max(0, size - 8192)
    chunk = os.pread(fd, size - start, start)
    last = chunk.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    suffix = last[-_HASH_SUFFIX_LEN:]
    if not suffix.startswith(b',"hash":"'):
        raise AuditError("audit log tail is damaged; run `heimdall audit verify`")
    return suffix[9:-2].decode()
