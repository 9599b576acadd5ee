"""Reading the audit log back: its lines, and the check behind ``heimdall audit verify``.

:func:`check` walks the chain from the first line, and fails at the first line that does not
continue it, at a checkpoint whose MAC the key provider does not confirm, where a checkpoint
was due and is missing, and where the log does not reach the size and hash of its head record.

Each checkpoint is checked with the key it names: the configured provider's audit key, or the
audit key of a provider that is only read (``HMD_KMS_READ_PROVIDERS``): a trail written before a
move from one key service to another holds the old service's checkpoints, and they are checked
there. A checkpoint made with a key no configured provider holds, or whose MAC the key of its
name does not confirm, is a problem unless a later checkpoint that verifies vouches for the trail
before it (``vouches_for``: see :mod:`heimdall.audit.chain`): that one was made only once the
whole trail before it had verified, and its MAC covers the chain up to it. (A key name can come
back for another key: a new local keyring is ``local/audit`` again.) No other checkpoint stands
in for them: the key that signs new checkpoints signs whatever chain it finds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from heimdall.audit.chain import GENESIS, ChainError, ChainState, advance, checkpoint_message
from heimdall.audit.head import LegacyHead
from heimdall.errors import KmsError
from heimdall.kms.base import AuditKey

__all__ = [
    "TORN_TAIL",
    "UNVOUCHED_TAIL",
    "VerifiedPrefix",
    "VerifyReport",
    "check",
    "end_of_last_line",
    "hash_ending_at",
    "last_lines",
    "read_lines",
    "recheck",
]

_CHUNK: Final = 1 << 20
_LAST_LINE_WINDOW: Final = 1 << 16
UNVOUCHED_TAIL: Final = (
    "lines follow what the head record vouches for (an append that did not finish, or lines "
    "added by someone else); `heimdall audit verify --repair-torn-tail` removes them"
)
TORN_TAIL: Final = (
    "the final line is torn (an append was interrupted); "
    "`heimdall audit verify --repair-torn-tail` removes it"
)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`check` found. ``lines`` counts every line read, checkpoints included."""

    lines: int
    ok: bool
    first_bad_line: int | None = None
    problem: str | None = None
    events: int = 0
    checkpoints: int = 0
    events_after_checkpoint: int = 0  # all events, when there is no checkpoint
    key_identifier: str | None = None  # of the key that checked the last checkpoint
    # Of every key that checked a checkpoint, in the order the trail first names them.
    key_identifiers: tuple[str, ...] = ()
    # Checkpoints not checked here (their key not configured, its provider not answering, or
    # their MAC not the key's now of that name) that a later checkpoint vouches for, and the
    # keys they name.
    vouched: int = 0
    vouched_keys: tuple[str, ...] = ()
    # Configured keys whose provider did not answer, their checkpoints vouched for.
    unanswered_keys: tuple[str, ...] = ()
    torn_tail: bool = False
    # Where the trail was found good up to, when it was (see recheck); never shown.
    verified: VerifiedPrefix | None = field(default=None, repr=False, compare=False)
    # Checkpoints of other keys than the signing one follow its last vouching checkpoint (or
    # there is none): what JsonlAuditLog.vouch has to vouch for.
    vouch_due: bool = field(default=False, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class _Tally:
    """What a walk has counted of the checkpoints: the report's figures."""

    checkpoints: int = 0
    used: tuple[str, ...] = ()
    last_used: str | None = None
    vouched: tuple[tuple[str, int], ...] = ()
    vouch_due: bool = False
    unanswered: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VerifiedPrefix:
    """The chain's position just after a checkpoint whose MAC, and every earlier one's, the
    keys named *keys* confirmed. The chain hash there commits to every byte before it: a log
    that reaches the same hash at the same line holds those same checkpoints, confirmed."""

    keys: frozenset[str]
    signer: str | None  # which of them signs: what the tally's vouch_due is relative to
    lines: int
    size: int
    hash: str
    tally: _Tally = _Tally()  # what the walk had counted there


_FORGED: Final = "checkpoint MAC does not verify: forged, or made with another key"


class _PrefixChanged(Exception):
    """The log does not reach the verified prefix unchanged: check it from scratch."""


def read_lines(fd: int, start: int, end: int) -> Iterator[bytes]:
    """The lines of bytes [start, end) of *fd*, newlines included; a last piece without a
    newline (a torn line) comes last, as it is."""
    rest = b""
    position = start
    while position < end:
        chunk = os.pread(fd, min(_CHUNK, end - position), position)
        if not chunk:
            break
        position += len(chunk)
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def end_of_last_line(fd: int, size: int) -> int:
    """The offset just past the last newline in the first *size* bytes (0 if none)."""
    position = size
    while position > 0:
        start = max(0, position - _LAST_LINE_WINDOW)
        found = os.pread(fd, position - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        position = start
    return 0


def last_lines(fd: int, count: int) -> list[bytes]:
    """The last *count* complete lines, oldest first, read backwards from the end."""
    position = end_of_last_line(fd, os.fstat(fd).st_size)
    data = b""
    while position > 0 and data.count(b"\n") <= count:
        step = min(_LAST_LINE_WINDOW, position)
        position -= step
        data = os.pread(fd, step, position) + data
    lines = data.splitlines()
    if position > 0:
        lines = lines[1:]  # the first line of the window may be partial
    return lines[-count:]


def hash_ending_at(fd: int, end: int) -> str | None:
    """The stored hash of the line that ends at byte *end*; GENESIS at 0; None if no line
    with a hash ends there."""
    if end == 0:
        return GENESIS
    start = max(0, end - _LAST_LINE_WINDOW)
    window = os.pread(fd, end - start, start)
    if not window.endswith(b"\n"):
        return None
    line = window[:-1].rsplit(b"\n", 1)[-1]
    stored = line[-66:-2]
    if not line.endswith(b'"}') or line[-75:-66] != b',"hash":"':
        return None
    return stored.decode(errors="replace")


def check(
    lines: Iterable[bytes],
    head: ChainState | LegacyHead | None,
    key: AuditKey | None,
    *,
    read_keys: Sequence[AuditKey] = (),
    first_checkpoint_due: bool = True,
) -> VerifyReport:
    """Verify the log's *lines* (from :func:`read_lines`) against its *head* record and *key*
    (with *read_keys*, the audit keys of the providers only read, for the checkpoints they
    made). Without *first_checkpoint_due*, a trail that has no checkpoint yet while the
    provider holds the key is not a problem (the torn-tail repair: see
    JsonlAuditLog.repair_torn_tail)."""
    walk = _Walk(head, key, read_keys, None, first_checkpoint_due=first_checkpoint_due)
    return walk.run(lines)


def recheck(
    read: Callable[[], Iterable[bytes]],
    head: ChainState | LegacyHead | None,
    key: AuditKey | None,
    trusted: VerifiedPrefix | None,
    read_keys: Sequence[AuditKey] = (),
    *,
    first_checkpoint_due: bool = True,
) -> VerifyReport:
    """:func:`check` of the lines *read* returns, asking the keys only about the checkpoints
    past *trusted* (the ``verified`` of an earlier report, made with the same keys) when the
    log still reaches it unchanged; otherwise (the log was rewritten, cut, or fails before that
    point) the full check. A server asked to verify again and again so asks its key provider
    only about new checkpoints."""
    due = first_checkpoint_due
    if trusted is not None:
        walk = _Walk(head, key, read_keys, trusted, first_checkpoint_due=due)
        if (trusted.keys, trusted.signer) == (walk.key_names, walk.signer):
            try:
                return walk.run(read())
            except _PrefixChanged:
                pass
    return _Walk(head, key, read_keys, None, first_checkpoint_due=due).run(read())


class _Walk:
    def __init__(
        self,
        head: ChainState | LegacyHead | None,
        key: AuditKey | None,
        read_keys: Sequence[AuditKey],
        trusted: VerifiedPrefix | None,
        *,
        first_checkpoint_due: bool = True,
    ) -> None:
        self.head = head
        self.key = key
        # Each key a checkpoint may name (JsonlAuditLog refuses two keys of one name).
        self.keys = {k.key_identifier: k for k in (*read_keys, *(() if key is None else (key,)))}
        self.key_names = frozenset(self.keys)  # what a prefix found good was found with
        self.signer = None if key is None else key.key_identifier
        self.used: dict[str, None] = {}  # the keys that checked checkpoints, in order
        self.last_used: str | None = None
        # Checkpoints not checked here that no checkpoint has vouched for yet: (line, key,
        # the problem if its MAC failed, None if its key is not configured); and those a
        # later checkpoint vouched for, by key.
        self.unchecked: list[tuple[int, str, str | None]] = []
        self.vouched: dict[str, int] = {}
        self.vouch_due = False
        # Keys whose provider failed to answer, and its first error: their checkpoints are held
        # back too, and the error stands if nothing later vouches for them.
        self.down: dict[str, KmsError] = {}
        self.unanswered: dict[str, None] = {}  # the same keys, found in the prefix trusted too
        self.trusted = trusted  # None once the walk is past it (or there is none)
        self.state = ChainState()
        self.checkpoints = 0
        self.verified: VerifiedPrefix | None = None
        self.head_matched = head is None or head.size == 0
        self.lines_at_head = 0  # lines up to the end the head vouches for
        self.first_checkpoint_due = first_checkpoint_due

    def run(self, lines: Iterable[bytes]) -> VerifyReport:
        for line in lines:
            if not line.endswith(b"\n"):
                self.confirm_trusted()
                return self.torn()
            problem = self.step(line)
            if problem:
                self.confirm_trusted()
                # A forgery held back before this point is found first.
                return self.report(*(self._forged() or (problem, self.state.lines + 1)))
        self.confirm_trusted()
        return self.finish()

    def step(self, line: bytes) -> str | None:
        try:
            after, doc = advance(self.state, line)
        except ChainError as exc:
            return exc.problem
        trusted = self.trusted
        if trusted is not None and after.lines >= trusted.lines:
            if (after.lines, after.size, after.hash) != (trusted.lines, trusted.size, trusted.hash):
                raise _PrefixChanged
            self.trusted = None  # the prefix holds, and with it every checkpoint in it
            self._restore(trusted)
        if after.last_checkpoint_line == after.lines:
            if trusted is None:  # not within a prefix that holds
                problem = self._checkpoint(after.lines, doc)
                if problem:
                    return problem
                if not self.unchecked:
                    self.verified = VerifiedPrefix(
                        self.key_names,
                        self.signer,
                        after.lines,
                        after.size,
                        after.hash,
                        self._tally(),
                    )
        elif after.every is not None and after.pending > after.every:
            return self._missing(after)
        self.state = after
        if self.head is not None and after.size == self.head.size:
            self.head_matched = after.hash == self.head.hash
            self.lines_at_head = after.lines
        return None

    def _tally(self) -> _Tally:
        return _Tally(
            self.checkpoints,
            tuple(self.used),
            self.last_used,
            tuple(self.vouched.items()),
            self.vouch_due,
            tuple(self.unanswered),
        )

    def _restore(self, prefix: VerifiedPrefix) -> None:
        tally = prefix.tally
        self.checkpoints = tally.checkpoints
        self.used = dict.fromkeys(tally.used)
        self.last_used = tally.last_used
        self.vouched = dict(tally.vouched)
        self.vouch_due = tally.vouch_due
        self.unanswered = dict.fromkeys(tally.unanswered)
        self.verified = prefix

    def confirm_trusted(self) -> None:
        """The walk stops here: if it has not reached the trusted prefix, the checkpoints it
        did not ask about may be what is wrong, so it starts again without it."""
        if self.trusted is not None:
            raise _PrefixChanged

    def _checkpoint(self, line: int, doc: dict[str, Any]) -> str | None:
        """Check the checkpoint *doc* at *line*: a problem that ends the walk, or None (it
        verified, or waits for a later checkpoint to vouch for it)."""
        named = str(doc["key_identifier"])
        key = self.keys.get(named)
        if key is None and not self.keys:
            return (
                "the trail has keyed checkpoints but no audit key is configured to check them "
                "(configure the key provider that wrote it)"
            )
        if named != self.signer:
            self.vouch_due = True
        vouching = "vouches_for" in doc
        if key is None or named in self.down or (self._forged() and not vouching):
            # Not checked: only a later vouching checkpoint can stand for it (after a forged
            # one, only such a checkpoint is worth a call to the provider).
            self.unchecked.append((line, named, None))
            return None
        try:
            good = key.verify(checkpoint_message(doc), str(doc["mac"]))
        except KmsError as exc:
            forged = self._forged()
            if forged:  # the forgery found, not the provider's trouble, is what to report
                return forged[0]
            if vouching:  # nothing later could stand in for the one that would vouch
                raise
            # An old provider gone, though still configured: a later vouching checkpoint
            # may stand for its checkpoints.
            self.down.setdefault(named, exc)
            self.unanswered[named] = None
            self.unchecked.append((line, named, None))
            return None
        if not good:
            self.unchecked.append((line, named, _FORGED))
            return None
        if vouching:
            # Made once the whole trail before it had verified; its MAC covers that chain.
            for _, vouched, _ in self.unchecked:
                self.vouched[vouched] = self.vouched.get(vouched, 0) + 1
            self.unchecked = []
            if named == self.signer:
                self.vouch_due = False
        self.checkpoints += 1
        self.used[named] = None
        self.last_used = named
        return None

    def _forged(self) -> tuple[str, int] | None:
        """The first held-back checkpoint whose MAC failed: (problem, line)."""
        for line, _, forged in self.unchecked:
            if forged:
                return forged, line
        return None

    @staticmethod
    def _missing(state: ChainState) -> str:
        return (
            f"a checkpoint is missing: the one at line {state.last_checkpoint_line} announced "
            f"the next within {state.every} events"
        )

    def torn(self) -> VerifyReport:
        unchecked = self._unchecked_problem()  # not something the repair could mend
        if unchecked:
            return self.report(*unchecked)
        if self.head is not None and self.state.size < self.head.size:
            return self.report("log ends before its recorded head", self.state.lines + 1)
        if not self.head_matched:
            return self.report("log does not match its head record", self.state.lines)
        return self.report(TORN_TAIL, self.state.lines + 1, torn_tail=True)

    def finish(self) -> VerifyReport:
        problem = self._unchecked_problem() or self._head_problem() or self._checkpoint_problem()
        return self.report(*problem) if problem else self.report(None, None)

    def _unchecked_problem(self) -> tuple[str, int] | None:
        """The first checkpoint held back that nothing vouched for: (problem, line). Raises
        the error of a provider that could not answer about it."""
        if not self.unchecked:
            return None
        line, named, forged = self.unchecked[0]
        head = self.head
        past_head = head is not None and self.state.size > head.size and self.head_matched
        if past_head and line > self.lines_at_head:
            return None  # past what the head vouches for: that tail is the problem to show
        if forged:
            return forged, line
        later = self._forged()
        if named in self.down:
            if later:  # a forgery found later is the finding, not the provider's trouble
                return later
            raise self.down[named]
        return (
            f"checkpoint made with the key {named}, which no configured key provider holds "
            f"(the configured: {', '.join(self.keys)}), and no later checkpoint vouches for "
            "it; to check it, name the provider that made it in HMD_KMS_READ_PROVIDERS with "
            "its settings (`heimdall kms migrate` then adds a checkpoint that vouches for it)"
            + (f"; and the checkpoint at line {later[1]} does not verify" if later else ""),
            line,
        )

    def _head_problem(self) -> tuple[str, int] | None:
        """Where the log's end disagrees with its head record: (problem, first bad line)."""
        state, head = self.state, self.head
        if head is None:
            return ("chain head record is missing", state.lines) if state.lines else None
        if state.size < head.size:
            return "log ends before its recorded head", state.lines + 1
        if not self.head_matched:
            return "log does not match its head record", state.lines
        if state.size > head.size:
            forged = self._forged()
            if forged:  # a crash leaves no checkpoint that fails its MAC
                return (
                    f"{UNVOUCHED_TAIL}; the checkpoint at line {forged[1]} in them does not verify",
                    self.lines_at_head + 1,
                )
            return UNVOUCHED_TAIL, self.lines_at_head + 1
        return None

    def _checkpoint_problem(self) -> tuple[str, int] | None:
        state = self.state
        if state.every is not None and state.pending >= state.every:
            return self._missing(state), state.lines
        if (
            self.first_checkpoint_due
            and not self.checkpoints
            and state.events
            and self.key is not None
            and self.key.exists()
        ):
            # Otherwise removing every checkpoint, then rewriting the chain, would pass as a
            # trail written before checkpoints existed.
            return (
                f"the trail has no keyed checkpoint, but the key provider holds its audit key "
                f"{self.key.key_identifier}: checkpoints were removed, or the trail was written "
                "before they existed and nothing was written since (any command adds one)",
                state.lines,
            )
        return None

    def report(
        self, problem: str | None, first_bad_line: int | None, *, torn_tail: bool = False
    ) -> VerifyReport:
        state = self.state
        return VerifyReport(
            lines=state.lines,
            ok=problem is None,
            first_bad_line=first_bad_line,
            problem=problem,
            events=state.events,
            checkpoints=self.checkpoints,
            events_after_checkpoint=state.pending,
            key_identifier=self.last_used,
            key_identifiers=tuple(self.used),
            vouched=sum(self.vouched.values()),
            vouched_keys=tuple(self.vouched),
            unanswered_keys=tuple(self.unanswered),
            vouch_due=self.vouch_due,
            torn_tail=torn_tail,
            verified=self.verified if problem is None else None,
        )
