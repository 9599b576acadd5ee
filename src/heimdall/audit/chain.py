"""The line format of the audit log: hash-chained JSON lines, and keyed checkpoints among them.

Every line is a JSON object whose last member is ``"hash"``: SHA-256 over the previous line's
hash (``GENESIS`` for the first line) and this line's JSON without that member. A checkpoint is
a line of its own (``event_type`` ``audit.checkpoint``) that names the chain position it
authenticates: the number of lines and of events before it, the hash of the line just before it,
the interval until the next one is due (``every`` events) and a MAC over all of these made by
the key provider's audit key (:class:`heimdall.kms.base.AuditKey`). Since the hash of the line
before it commits to every line before that, one MAC covers the whole trail up to it.

A checkpoint may also say, under its MAC, that the trail before it was verified in full when it
was made, with the keys it lists (``vouches_for``): written after a move between key services
(``heimdall kms migrate``) while the old service could still be asked, it lets the trail be
checked once the old service is gone. See :mod:`heimdall.audit.scan`.

:class:`ChainState` is a position in the chain; :func:`advance` moves it over one line and is
used alike by the writer (to pick up lines it did not write itself) and by the verifier.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import orjson

from heimdall.audit.events import EventType, Result, utc_now_ms
from heimdall.kms.base import AuditKey

__all__ = [
    "CHECKPOINT_ACTOR",
    "GENESIS",
    "ChainError",
    "ChainState",
    "advance",
    "checkpoint_message",
    "seal",
    "seal_checkpoint",
    "seal_events",
]

GENESIS: Final = "0" * 64
CHECKPOINT_ACTOR: Final = "heimdall"
_PREFIX: Final = b',"hash":"'
_SUFFIX_LEN: Final = len(_PREFIX) + 64 + len(b'"}')
_HEX64: Final = re.compile(r"[0-9a-f]{64}\Z")
_MESSAGE_DOMAIN: Final = "heimdall.audit.checkpoint.v1"


class ChainError(Exception):
    """A line does not continue the chain; ``problem`` says how (one short phrase)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass(frozen=True, slots=True)
class ChainState:
    """A position in the chain: what the first *size* bytes of the log hold."""

    size: int = 0
    lines: int = 0  # every line: events and checkpoints
    events: int = 0  # lines that are not checkpoints
    hash: str = GENESIS  # of the last line
    pending: int = 0  # events since the last checkpoint (all of them while there is none)
    every: int | None = None  # announced by the last checkpoint; None while there is none
    last_checkpoint_line: int = 0  # 1-based line number; 0 while there is none


def seal(body: bytes, previous: str) -> tuple[bytes, str]:
    """The line (newline included) that chains the JSON object *body* after *previous*."""
    digest = hashlib.sha256(previous.encode() + body).hexdigest()
    return body[:-1] + _PREFIX + digest.encode() + b'"}\n', digest


def advance(state: ChainState, line: bytes) -> tuple[ChainState, dict[str, Any]]:
    """The position after *line* (newline included) and its JSON object; ChainError if the
    line is not the next link of the chain, or is a checkpoint naming another position."""
    raw = line.rstrip(b"\n")
    stored = raw[-_SUFFIX_LEN:]
    if not (stored.startswith(_PREFIX) and stored.endswith(b'"}')):
        raise ChainError("line has no hash")
    body = raw[:-_SUFFIX_LEN] + b"}"
    digest = hashlib.sha256(state.hash.encode() + body).hexdigest()
    if stored[len(_PREFIX) : -2].decode(errors="replace") != digest:
        raise ChainError("hash chain broken")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ChainError("line is not a JSON object") from None
    if not isinstance(doc, dict):
        raise ChainError("line is not a JSON object")
    after = replace(state, size=state.size + len(line), lines=state.lines + 1, hash=digest)
    if doc.get("event_type") != EventType.AUDIT_CHECKPOINT.value:
        return replace(after, events=state.events + 1, pending=state.pending + 1), doc
    every = _checkpoint_every(doc)
    if (doc["lines"], doc["events"], doc["chain"]) != (state.lines, state.events, state.hash):
        raise ChainError("checkpoint does not name its own place in the chain")
    return replace(after, pending=0, every=every, last_checkpoint_line=after.lines), doc


def _checkpoint_every(doc: dict[str, Any]) -> int:
    """The checkpoint's interval, after checking every member the MAC covers has its type."""
    counts = [doc.get(name) for name in ("lines", "events", "every")]
    texts = [doc.get(name) for name in ("timestamp", "key_identifier", "chain", "mac")]
    vouches_for = doc.get("vouches_for", ["-"])
    if isinstance(vouches_for, list) and vouches_for:
        texts.extend(vouches_for)
    well_formed = (
        all(type(value) is int and value >= 0 for value in counts)
        # Printable: they are named in messages, and a newline would blur the MAC's message.
        and all(isinstance(value, str) and value and value.isprintable() for value in texts)
        and isinstance(vouches_for, list)
        and bool(vouches_for)
        and _HEX64.match(str(doc.get("chain"))) is not None
        and int(doc["every"]) >= 1
    )
    if not well_formed:
        raise ChainError("checkpoint is malformed")
    return int(doc["every"])


def checkpoint_message(doc: dict[str, Any]) -> bytes:
    """What a checkpoint's MAC is computed over: its position, interval, key and time, and the
    keys it vouches for when it names any."""
    parts = [
        _MESSAGE_DOMAIN,
        str(doc["timestamp"]),
        str(doc["key_identifier"]),
        str(doc["lines"]),
        str(doc["events"]),
        str(doc["chain"]),
        str(doc["every"]),
    ]
    if "vouches_for" in doc:
        parts.append("vouches_for " + orjson.dumps(doc["vouches_for"]).decode())
    return "\n".join(parts).encode()


def seal_events(state: ChainState, bodies: Sequence[bytes]) -> tuple[list[bytes], ChainState]:
    """The lines of the events *bodies* (each one's JSON) after *state*, and the position after
    them. One loop of the hash over the batch: the position is built once, at its end."""
    previous = state.hash.encode()
    size = state.size
    lines: list[bytes] = []
    sha256 = hashlib.sha256
    for body in bodies:
        previous = sha256(previous + body).hexdigest().encode()
        line = b'%s%s%s"}\n' % (body[:-1], _PREFIX, previous)  # as seal() writes it
        size += len(line)
        lines.append(line)
    count = len(lines)
    after = ChainState(
        size,
        state.lines + count,
        state.events + count,
        previous.decode(),
        state.pending + count,
        state.every,
        state.last_checkpoint_line,
    )
    return lines, after


def seal_checkpoint(
    state: ChainState, every: int, key: AuditKey, *, vouches_for: Sequence[str] = ()
) -> tuple[bytes, ChainState]:
    """A checkpoint authenticating *state*, signed with *key* (one call to the provider), that
    announces the next one within *every* events; and the position after it. With
    *vouches_for*, it says the trail before it was verified in full with those keys."""
    doc: dict[str, Any] = {
        "timestamp": utc_now_ms(),
        "event_type": EventType.AUDIT_CHECKPOINT.value,
        "actor": CHECKPOINT_ACTOR,
        "key_identifier": key.key_identifier,
        "lines": state.lines,
        "events": state.events,
        "chain": state.hash,
        "every": every,
    }
    if vouches_for:
        doc["vouches_for"] = list(vouches_for)
    doc["mac"] = key.sign(checkpoint_message(doc))
    doc["result"] = Result.SUCCESS.value
    line, digest = seal(orjson.dumps(doc), state.hash)
    after = replace(
        state,
        size=state.size + len(line),
        lines=state.lines + 1,
        hash=digest,
        pending=0,
        every=every,
        last_checkpoint_line=state.lines + 1,
    )
    return line, after
