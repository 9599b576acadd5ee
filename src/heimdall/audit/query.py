"""The audit query: which events of a kind, by whom, under which key version, in a time window.

spec: Runbook: Emergency Key Compromise Response, step 4 ("audit all decryption events during the
compromise window"); Audit Log Requirements (the fields filtered on). "Every decryption under key
version 3 between 02:00 and 06:00" is ``AuditFilter(since=..., until=...,
event_types=frozenset({"crypto.decrypt"}), key_version=3)``.

Invariants:

* The log is read in chunks, line by line (:func:`heimdall.audit.scan.read_lines`): memory does
  not grow with the log, only with the page asked for.
* It is opened as every audit file is (:func:`heimdall.private_files.open_private`): never
  through a symlink, never a file of another user or one that group or others may write.
* Only what the head record vouches for is read, so an append in progress or one that failed
  is not; without a readable head record, every complete line. The chain is not checked here:
  ``heimdall audit verify`` does that.
* Records come back as stored (``hash`` included). A checkpoint is a record like any other: a
  filter naming ``audit.checkpoint`` among its event types returns them, as does a filter on
  none of the fields a checkpoint lacks.
* A cursor is opaque and checked on use (:class:`InvalidCursor` otherwise): it holds the byte
  offset of the line the next page starts at, a digest of the bytes just before that line, and
  a digest of the filter. One that does not decode exactly, was made for another filter, points
  past what the log holds or no longer follows the same bytes (a log replaced, or cut back and
  written again) is refused, so no read ever starts in the middle of a line.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import os
import re
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from heimdall.audit.events import EventType, Result
from heimdall.audit.head import head_path, read_head
from heimdall.audit.scan import end_of_last_line, read_lines
from heimdall.errors import AuditError, AuditUnreadable, InvalidInput
from heimdall.private_files import open_private

__all__ = [
    "MAX_LIMIT",
    "AuditFilter",
    "AuditPage",
    "InvalidCursor",
    "iter_audit",
    "parse_time",
    "query_audit",
]

MAX_LIMIT: Final = 10_000
_EVENT_TYPES: Final = frozenset(t.value for t in EventType)
_RESULTS: Final = frozenset(r.value for r in Result)
# version, offset of the next page's first line, digest of the bytes before it, of the filter
_CURSOR: Final = struct.Struct(">BQ16s8s")
_CURSOR_VERSION: Final = 1
_CURSOR_TEXT: Final = re.compile(r"[A-Za-z0-9_-]{44}\Z")
_BEFORE: Final = 512  # bytes before the offset a cursor commits to: the line's end and its hash


class InvalidCursor(InvalidInput):
    """A cursor this log and filter did not issue, or one the log no longer matches."""

    def __init__(self) -> None:
        super().__init__(
            "the cursor does not continue this query on this audit log (garbled, made for "
            "another filter, or the log has changed since); run the query again without it"
        )


def parse_time(text: str) -> datetime:
    """An ISO-8601 time (``2025-12-09T02:00:00Z``; without an offset, UTC) as a UTC datetime."""
    try:
        return _utc(datetime.fromisoformat(text))
    except (TypeError, ValueError):
        raise InvalidInput("not an ISO-8601 time such as 2025-12-09T02:00:00Z") from None
    except OverflowError:  # 0001-01-01T00:00+01:00: before the first UTC moment there is
        raise InvalidInput("a time outside the years 1 to 9999 once in UTC") from None


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which records match: every field given must hold (empty *event_types*: any). The time
    window is half-open, [since, until); a naive datetime is UTC. InvalidInput for an event
    type or result heimdall does not write, a negative key version, or an empty window."""

    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    event_types: frozenset[str] = frozenset()
    actor: str | None = None
    key_version: int | None = None
    field_identifier: str | None = None
    result: str | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            moment = getattr(self, name)
            if moment is not None:
                object.__setattr__(self, name, _utc(moment))
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise InvalidInput("the time window is empty: since must be before until")
        if isinstance(self.event_types, str):
            raise InvalidInput("event_types is a set of event types, not one string")
        object.__setattr__(self, "event_types", frozenset(self.event_types))
        if not self.event_types <= _EVENT_TYPES:
            raise InvalidInput(f"unknown event type (expected {', '.join(sorted(_EVENT_TYPES))})")
        if self.result is not None and self.result not in _RESULTS:
            raise InvalidInput(f"unknown result (expected {', '.join(sorted(_RESULTS))})")
        if self.key_version is not None and (
            type(self.key_version) is not int or self.key_version < 0
        ):
            raise InvalidInput("a key version is a whole number, 0 or more")

    def matches(self, event: Mapping[str, Any]) -> bool:
        """Whether the stored record *event* is one this filter asks for."""
        if self.event_types and not _text_in(event.get("event_type"), self.event_types):
            return False
        for name in ("actor", "field_identifier", "result"):
            wanted = getattr(self, name)
            if wanted is not None and event.get(name) != wanted:
                return False
        if self.key_version is not None:
            version = event.get("key_version")
            if type(version) is not int or version != self.key_version:
                return False
        if self.since is None and self.until is None:
            return True
        moment = _timestamp(event.get("timestamp"))
        if moment is None:
            return False
        return (self.since is None or moment >= self.since) and (
            self.until is None or moment < self.until
        )

    def digest(self) -> bytes:
        """Eight bytes that differ between filters (a cursor is tied to its filter)."""
        parts = [
            self.since.isoformat() if self.since else None,
            self.until.isoformat() if self.until else None,
            sorted(self.event_types),
            self.actor,
            self.key_version,
            self.field_identifier,
            self.result,
        ]
        return hashlib.sha256(orjson.dumps(parts)).digest()[:8]


@dataclass(frozen=True, slots=True)
class AuditPage:
    events: list[dict[str, Any]]  # the stored JSON objects, as written
    next_cursor: str | None  # opaque; None at the end


def query_audit(
    path: Path, flt: AuditFilter, *, cursor: str | None = None, limit: int = 1000
) -> AuditPage:
    """Up to *limit* (1 to :data:`MAX_LIMIT`) records of the log at *path* matching *flt*,
    oldest first, from *cursor* (a previous page's ``next_cursor``) or the start. The page's
    ``next_cursor`` is None when no later record matches."""
    if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be from 1 to {MAX_LIMIT:,}")
    start = _decode_cursor(cursor, flt) if cursor is not None else None
    with _reading(path) as log:
        if log is None:
            if start is not None:
                raise InvalidCursor()
            return AuditPage([], None)
        offset = 0 if start is None else log.resume_at(*start)
        events: list[dict[str, Any]] = []
        for at, record in log.records(offset):
            if not flt.matches(record):
                continue
            if len(events) == limit:
                return AuditPage(events, log.cursor(at, flt))
            events.append(record)
    return AuditPage(events, None)


def iter_audit(path: Path, flt: AuditFilter) -> Iterator[dict[str, Any]]:
    """Every record of the log at *path* matching *flt*, oldest first, read as it is consumed
    (constant memory however long the log)."""
    with _reading(path) as log:
        if log is None:
            return
        for _, record in log.records(0):
            if flt.matches(record):
                yield record


# -- reading -----------------------------------------------------------------------------------


class _Log:
    """An audit log open for reading, up to *end* (what its head record vouches for)."""

    def __init__(self, path: Path, fd: int, end: int) -> None:
        self.path = path
        self.fd = fd
        self.end = end

    def records(self, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(offset, record) of every complete line from byte *start*."""
        offset = start
        for line in read_lines(self.fd, start, self.end):
            if not line.endswith(b"\n"):
                return  # a torn final line: not a record
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                raise AuditUnreadable(
                    f"audit log {self.path} holds a line that is not a JSON record (at byte "
                    f"{offset:,}); run `heimdall audit verify`"
                )
            yield offset, record
            offset += len(line)

    def cursor(self, offset: int, flt: AuditFilter) -> str:
        packed = _CURSOR.pack(_CURSOR_VERSION, offset, self._before(offset), flt.digest())
        return base64.urlsafe_b64encode(packed).decode().rstrip("=")

    def resume_at(self, offset: int, before: bytes) -> int:
        """*offset* if a cursor holding it and *before* continues this log; else InvalidCursor."""
        if not 0 < offset < self.end:
            raise InvalidCursor()
        if os.pread(self.fd, 1, offset - 1) != b"\n" or self._before(offset) != before:
            raise InvalidCursor()
        return offset

    def _before(self, offset: int) -> bytes:
        start = max(0, offset - _BEFORE)
        return hashlib.sha256(os.pread(self.fd, offset - start, start)).digest()[:16]


@contextmanager
def _reading(path: Path) -> Iterator[_Log | None]:
    """The log at *path* open for reading (None if there is none), closed on exit."""
    if not os.path.lexists(Path(path).parent):
        yield None  # no data dir yet: nothing was ever written
        return
    try:
        fd = open_private(Path(path), os.O_RDONLY, what="audit log")
    except FileNotFoundError:
        yield None
        return
    except OSError as exc:
        raise AuditUnreadable(f"audit log {path} cannot be read: {exc.strerror}") from None
    try:
        yield _Log(Path(path), fd, _readable_end(Path(path), fd))
    finally:
        os.close(fd)


def _readable_end(path: Path, fd: int) -> int:
    """Where what the head record vouches for ends; without a readable head, the last line's."""
    fcntl.flock(fd, fcntl.LOCK_SH)  # no append is half done while the size and head are read
    try:
        size = os.fstat(fd).st_size
        try:
            head = read_head(head_path(path))
        except AuditError:
            head = None
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
    if head is not None and head.size <= size:
        return head.size
    return end_of_last_line(fd, size)


def _decode_cursor(cursor: str, flt: AuditFilter) -> tuple[int, bytes]:
    if not isinstance(cursor, str) or _CURSOR_TEXT.match(cursor) is None:
        raise InvalidCursor()
    try:
        packed = base64.urlsafe_b64decode(cursor + "=")
    except (binascii.Error, ValueError):
        raise InvalidCursor() from None
    if base64.urlsafe_b64encode(packed).decode().rstrip("=") != cursor:
        raise InvalidCursor()  # not the canonical encoding: not one this module wrote
    version, offset, before, digest = _CURSOR.unpack(packed)
    if version != _CURSOR_VERSION or digest != flt.digest():
        raise InvalidCursor()
    return offset, before


def _text_in(value: object, wanted: frozenset[str]) -> bool:
    return isinstance(value, str) and value in wanted


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _timestamp(value: object) -> datetime | None:
    """A record's time stamp (``2025-12-09T01:23:45.678Z``), or None if it has none."""
    if not isinstance(value, str):
        return None
    try:
        return _utc(datetime.fromisoformat(value))
    except ValueError:
        return None
