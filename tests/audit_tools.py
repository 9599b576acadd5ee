"""Helpers for the audit trail's tests: sample events, and an attacker who rewrites the trail.

:func:`rewrite_trail` is what someone who can write the log and its head (but cannot use the
key provider's audit key) would do to hide events: drop lines, recompute every hash, renumber
the checkpoints that are left so they name their new place, and write a matching head record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from heimdall.audit import AuditEvent, EventType, JsonlAuditLog, Result
from heimdall.errors import KmsUnavailable
from heimdall.kms.base import AuditKey

GENESIS = "0" * 64
Record = dict[str, Any]


def sample_events(count: int, *, start: int = 0, padding: int = 0) -> list[AuditEvent]:
    return [
        AuditEvent(
            EventType.DECRYPT,
            f"test:actor-{n}",
            Result.SUCCESS,
            f"req-{n}",
            field_identifier=f"email:hash:{n:064x}",
            reason="r" * padding or None,
            count=n,
        )
        for n in range(start, start + count)
    ]


def write_events(
    path: Path,
    count: int,
    *,
    key: AuditKey | None = None,
    every: int = 1000,
    batch: int = 1,
) -> JsonlAuditLog:
    """A log at *path* holding *count* sample events, written *batch* at a time."""
    log = JsonlAuditLog(path, fsync=False, key=key, checkpoint_every=every)
    events = sample_events(count)
    for start in range(0, count, batch):
        log.write(events[start : start + batch])
    return log


def records(path: Path) -> list[Record]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def rewrite_trail(path: Path, keep: Callable[[Record], bool]) -> None:
    """Keep the records *keep* accepts, recompute the chain and counters, write the head."""
    previous, lines, events, pending = GENESIS, 0, 0, 0
    every: int | None = None
    last_checkpoint = 0
    out = []
    for record in records(path):
        if not keep(record):
            continue
        del record["hash"]
        if record["event_type"] == "audit.checkpoint":
            record.update(lines=lines, events=events, chain=previous)  # the MAC is kept
            pending, every, last_checkpoint = 0, record["every"], lines + 1
        else:
            events += 1
            pending += 1
        body = orjson.dumps(record)
        previous = hashlib.sha256(previous.encode() + body).hexdigest()
        out.append(body[:-1] + b',"hash":"' + previous.encode() + b'"}\n')
        lines += 1
    data = b"".join(out)
    path.write_bytes(data)
    head = {
        "format": "heimdall.audit.head.v2",
        "size": len(data),
        "lines": lines,
        "events": events,
        "hash": previous,
        "pending": pending,
        "every": every,
        "last_checkpoint_line": last_checkpoint,
    }
    path.with_name(path.name + ".head").write_bytes(orjson.dumps(head))


def without_decrypts(record: Record) -> bool:
    return bool(record["event_type"] != "crypto.decrypt")


class CountingKey:
    """An audit key that counts its calls and can be made to fail."""

    def __init__(self, key: AuditKey) -> None:
        self.key = key
        self.signed = 0
        self.verified = 0
        self.down = False

    @property
    def key_identifier(self) -> str:
        return self.key.key_identifier

    def sign(self, message: bytes) -> str:
        if self.down:
            raise KmsUnavailable("the key service is down", provider="test")
        self.signed += 1
        return self.key.sign(message)

    def verify(self, message: bytes, mac: str) -> bool:
        self.verified += 1
        return self.key.verify(message, mac)

    def exists(self) -> bool:
        return self.key.exists()


class NamedKey:
    """*key* under another name: the audit key of a second key provider (two local keyrings
    name their keys alike)."""

    def __init__(self, key: AuditKey, name: str) -> None:
        self.key = key
        self.name = name

    @property
    def key_identifier(self) -> str:
        return self.name

    def sign(self, message: bytes) -> str:
        return self.key.sign(message)

    def verify(self, message: bytes, mac: str) -> bool:
        return self.key.verify(message, mac)

    def exists(self) -> bool:
        return self.key.exists()
