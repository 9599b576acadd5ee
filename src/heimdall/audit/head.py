"""The head record beside the audit log (``<log>.head``): where the chain ends, and its counters.

The chain alone cannot show that lines were cut off the end of the log; the head can, since it
holds the size and last hash the log must reach. It also holds what the writers share: the
line and event counts, the events since the last checkpoint and the interval that checkpoint
announced. Writers read and replace it under the log's exclusive lock.

It is replaced atomically: written to a fresh file (``O_EXCL``, random name) in the same
directory, fsynced, then renamed over the old one, so a crash or a full disk leaves either the
old record or the new one, never a torn one. With fsync on, the directory is fsynced after the
rename too, before the append returns: a power loss cannot then bring back an older head, which
would leave committed lines past it that no writer takes over and the repair cuts off (lines
past the head are only ever an append that never returned). A head from before the counters
(``size`` and ``hash`` only) is read as :class:`LegacyHead`; the next append rewrites it in full.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson

from heimdall.audit.chain import ChainState
from heimdall.errors import AuditError
from heimdall.private_files import fsync_directory, open_private, write_all

__all__ = ["HEAD_FORMAT", "LegacyHead", "head_path", "read_head", "write_head"]

HEAD_FORMAT: Final = "heimdall.audit.head.v2"
_MAX_HEAD: Final = 4096
_FIELDS: Final = ("size", "lines", "events", "hash", "pending", "every", "last_checkpoint_line")


@dataclass(frozen=True, slots=True)
class LegacyHead:
    """A head written before checkpoints existed: no counters."""

    size: int
    hash: str


def head_path(log: Path) -> Path:
    return log.with_name(log.name + ".head")


def read_head(path: Path) -> ChainState | LegacyHead | None:
    """The head record at *path*, or None if there is none. AuditError if it is damaged;
    ConfigurationError if the file is not one heimdall may trust (see private_files)."""
    try:
        fd = open_private(path, os.O_RDONLY, what="audit log head record")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"audit log head record {path} cannot be read: {exc.strerror}") from None
    try:
        raw = os.read(fd, _MAX_HEAD + 1)
    finally:
        os.close(fd)
    try:
        doc = orjson.loads(raw)
        if "format" not in doc:
            return LegacyHead(_count(doc["size"]), _text(doc["hash"]))
        if doc["format"] != HEAD_FORMAT:
            raise ValueError(doc["format"])
        every = doc["every"]
        return ChainState(
            size=_count(doc["size"]),
            lines=_count(doc["lines"]),
            events=_count(doc["events"]),
            hash=_text(doc["hash"]),
            pending=_count(doc["pending"]),
            every=None if every is None else _count(every),
            last_checkpoint_line=_count(doc["last_checkpoint_line"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise AuditError(f"audit log head record {path} is damaged") from None


def _count(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(value)
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def write_head(path: Path, state: ChainState, *, fsync: bool) -> None:
    """Replace the head record at *path* with *state*, atomically. OSError if it could not be
    written; then the old record (or none) is still in place."""
    doc = {"format": HEAD_FORMAT, **{name: getattr(state, name) for name in _FIELDS}}
    record = orjson.dumps(doc)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, what="audit log head record")
    try:
        try:
            write_all(fd, record)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # the commit: nothing after it may fail the append
        if fsync:
            with contextlib.suppress(OSError):
                # Durable too; if this fails the rename is made and stays: the head is valid.
                fsync_directory(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
