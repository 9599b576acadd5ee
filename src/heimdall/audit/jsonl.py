"""The file sink: an append-only JSON Lines log, hash-chained, with keyed checkpoints.

Invariants, each kept under an exclusive ``flock`` on the log, which every writing process takes:

* An append is all or nothing. The lines are written, fsynced, then the head record is replaced
  (the commit). If anything before the commit fails (a full disk, a file size limit, the key
  provider refusing a checkpoint) the log is cut back to its size before the append and the
  operation is refused with :class:`AuditError`; the next append works once the cause is gone.
* A writer appends only to a log that matches its head: the line ending where the head says
  carries the head's hash. Complete lines past the head (a crash between the lines and the
  head) are checked link by link and taken over. A shorter log, a different last line or a torn
  final line (a crash in the middle of the write itself) refuses every append until an operator
  looks: ``heimdall audit verify`` (with ``--repair-torn-tail`` for the last case only).
* A checkpoint is due when the events since the last one reach the interval: this process's
  ``checkpoint_every``, or the last checkpoint's announced interval if that is smaller (so
  writers configured differently still keep every promise a checkpoint made). The counters
  live in the head record, so several processes share them. A busy writer seals sooner: once
  ``checkpoint_seconds`` have passed since this process's last checkpoint (or its start), the
  next append that leaves at least ``MIN_EVENTS_PER_CHECKPOINT`` events unsealed ends with a
  checkpoint. And a long-running process (``heimdall serve``, ``heimdall worker``) seals
  whatever it wrote once that time has passed, by a timer (:meth:`JsonlAuditLog.seal`), even
  when no more events come. So the events a checkpoint does not cover yet are at most the
  interval, and in those processes a few seconds' worth; the key provider is asked for about
  one MAC per ``checkpoint_seconds`` while events come (more only when over the interval's
  worth come in that time), and none while none do. Closing the log checkpoints the events
  this process wrote since its last checkpoint.
* The threads of one process that append at once share appends (:mod:`.group`) through
  :meth:`JsonlAuditLog.write`: one lock, two fsyncs and one head record for all of them.
* Every file is opened through :func:`heimdall.private_files.open_private`: never through a
  symlink, never a file of another user or one that group or others may write.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import orjson

from heimdall.audit.chain import ChainError, ChainState, advance, seal_checkpoint, seal_events
from heimdall.audit.events import AuditEvent, EventType, event_bodies, holds_checkpoints
from heimdall.audit.group import GroupCommit
from heimdall.audit.head import LegacyHead, head_path, read_head, write_head
from heimdall.audit.scan import (
    VerifiedPrefix,
    VerifyReport,
    check,
    end_of_last_line,
    hash_ending_at,
    last_lines,
    read_lines,
    recheck,
)
from heimdall.errors import AuditError, ConfigurationError, HeimdallError, KmsError
from heimdall.kms.base import AuditKey
from heimdall.private_files import ensure_private_dir, open_private, write_all
from heimdall.rbac import Caller

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_CHECKPOINT_SECONDS",
    "MIN_EVENTS_PER_CHECKPOINT",
    "JsonlAuditLog",
]

DEFAULT_CHECKPOINT_EVERY: Final = 20_000
DEFAULT_CHECKPOINT_SECONDS: Final = 5.0
MIN_EVENTS_PER_CHECKPOINT: Final = 1000  # below this many unsealed events, time alone seals none
_log = logging.getLogger("heimdall.audit")
_WHAT: Final = "audit log"
_UNBOUNDED: Final = 1 << 62  # no checkpoint is ever due (see _interval)


class JsonlAuditLog:
    """Append-only, hash-chained JSON Lines file (mode 0600). See the module docstring.

    *key* is the key provider's audit key (None: no checkpoints, as in legacy mode without a
    key provider); *read_keys* those of the providers only read (``HMD_KMS_READ_PROVIDERS``),
    which sign nothing and check the checkpoints they made before a move between key services;
    *checkpoint_every* the most events between two checkpoints (announced in
    each); *checkpoint_seconds* how long this process lets at least
    ``MIN_EVENTS_PER_CHECKPOINT`` events go unsealed (None: never, the interval alone).
    *monotonic* is the clock of that rule.
    """

    def __init__(
        self,
        path: Path,
        *,
        fsync: bool = True,
        key: AuditKey | None = None,
        read_keys: Sequence[AuditKey] = (),
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_seconds: float | None = DEFAULT_CHECKPOINT_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        if checkpoint_seconds is not None and not checkpoint_seconds > 0:
            raise ValueError("checkpoint_seconds must be positive")
        self.path = Path(path)
        self._fsync = fsync
        names = [k.key_identifier for k in (*read_keys, *(() if key is None else (key,)))]
        shared = sorted({name for name in names if names.count(name) > 1})
        if shared:
            # A checkpoint names the key that made it: one of two keys so named would be taken
            # for the other, and its genuine checkpoints reported forged.
            raise ConfigurationError(
                f"two configured key providers name their audit key {shared[0]}: a checkpoint "
                "could not say which made it; give their keys different names or mounts"
            )
        self._key = key
        self._read_keys = tuple(read_keys)  # only to check the checkpoints they made
        self._every = checkpoint_every
        self._seconds = checkpoint_seconds
        self._monotonic = monotonic
        self._sealed_at = monotonic()  # this process's last checkpoint, or its start
        self._unsealed = False  # this process wrote events that no checkpoint covers yet
        self._group = GroupCommit(self._append)
        # How far this process's last verify found the trail good (see scan.recheck).
        self._verified: VerifiedPrefix | None = None

    @property
    def head_path(self) -> Path:
        return head_path(self.path)

    # -- writing ----------------------------------------------------------------------------

    def write(self, events: Sequence[AuditEvent]) -> None:
        """Append *events* in the next append this process's threads share (:mod:`.group`,
        which refuses checkpoints among them)."""
        self._group.write(events)

    def append(self, events: Sequence[AuditEvent]) -> list[bytes]:
        """Append *events* now, and any checkpoint falling due among them; the lines written."""
        _refuse_checkpoints(events)
        return self._append(events)

    def _append(self, events: Sequence[AuditEvent]) -> list[bytes]:
        """:meth:`append` of events already checked (a group's: see GroupCommit.write)."""
        if not events:
            return []
        with self._exclusive() as fd:
            return self._append_locked(fd, events, closing=False)

    def close(self) -> None:
        self.checkpoint_on_close()

    def check_appendable(self) -> None:
        """AuditError if an append would be refused now: the log cannot be opened for writing,
        or does not end where its head record says (a readiness probe; writes nothing)."""
        if not os.path.lexists(self.path):
            return  # the first append creates it
        fd = self._open(os.O_RDWR | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # no append is half done while we look
            self._state(fd, os.fstat(fd).st_size, create=False)
        finally:
            os.close(fd)

    def seal(self) -> list[bytes]:
        """A checkpoint over the events this process wrote that none covers yet, once
        ``checkpoint_seconds`` have passed since its last checkpoint (or its start); the lines
        written. What a long-running process's timer calls (:class:`.group.Sealer`), so that
        its events are sealed within seconds even when no more come. Best effort, as closing."""
        if self._key is None or self._seconds is None or not self._unsealed:
            return []
        if self._monotonic() - self._sealed_at < self._seconds:
            return []
        return self.checkpoint_on_close()

    def vouch(self) -> tuple[list[bytes], tuple[str, ...]]:
        """Verify the whole trail with this log's keys and, where checkpoints of another key
        than the signing key are among those verified, append a checkpoint that vouches for
        them (``vouches_for``): the trail then verifies without those keys. What ``heimdall kms
        migrate`` does once the fields have moved, while the old provider can still be asked.

        The lines written and the keys vouched for (those checked now, and those an earlier
        vouching checkpoint stood for, which a verifier may not be able to check); nothing when
        no checkpoint of another key follows this key's last vouching checkpoint. AuditError
        when the trail does not verify; a KmsError when a provider cannot answer (and a
        ConfigurationError when one is misconfigured). One call to the providers per
        checkpoint in the trail, made before the log is locked: under the lock, only what
        was appended meanwhile is checked.
        """
        if self._key is None:
            raise AuditError("no audit key is configured to vouch for the audit trail with")
        # Unlocked first, as verify, which records how far the trail is good.
        self._refuse_unless_ok(self._check(first_checkpoint_due=False))
        with self._exclusive() as fd:
            size = os.fstat(fd).st_size
            state = self._state(fd, size)
            report = recheck(
                lambda: read_lines(fd, 0, size),
                state,
                self._key,
                self._verified,
                self._read_keys,
                first_checkpoint_due=False,
            )
            self._refuse_unless_ok(report)
            if (report.lines, report.events) != (state.lines, state.events):
                # The head's counters, which the checkpoint would sign, are not the log's.
                raise AuditError(
                    f"the audit log head record {self.head_path} counts {state.lines:,} lines "
                    f"and {state.events:,} events, the log {report.lines:,} and "
                    f"{report.events:,}; nothing was vouched for"
                )
            if not report.vouch_due:
                return [], ()  # no other key's checkpoint since this key last vouched
            named = dict.fromkeys((*report.vouched_keys, *report.key_identifiers))
            others = tuple(k for k in named if k != self._key.key_identifier)
            try:
                line, after = seal_checkpoint(state, self._every, self._key, vouches_for=others)
            except ConfigurationError as exc:
                raise AuditError(f"audit checkpoint could not be signed: {exc}") from None
            self._commit(fd, size, state, [line], after)
        return [line], others

    def _refuse_unless_ok(self, report: VerifyReport) -> None:
        if not report.ok:
            raise AuditError(
                f"audit log {self.path} does not verify (line {report.first_bad_line}: "
                f"{report.problem}); nothing was vouched for"
            )

    def checkpoint_on_close(self) -> list[bytes]:
        """A checkpoint over the events this process wrote, unless one covers them already.

        Best effort: those events are written and chained, and the next checkpoint any writer
        makes covers them (verify counts them until then). A checkpoint that cannot be made now
        (the provider unreachable, or a role that may only verify, as heimdall-audit on Vault)
        is logged, not raised: closing never fails a command that has done its work.
        """
        if self._key is None or not self._unsealed:
            return []
        try:
            with self._exclusive() as fd:
                return self._append_locked(fd, (), closing=True)
        except AuditError as exc:
            _log.warning("no closing audit checkpoint: %s", exc)
            return []

    def repair_torn_tail(self, *, actor: str, request_id: str) -> int:
        """Cut off the tail an interrupted append left; the bytes removed.

        That tail is what follows the last line the head record vouches for: a torn final line
        (a crash in the middle of the write), or complete lines whose append never committed
        its head (a crash just before). The operation that wrote them did not complete, so
        nothing it did is lost. Refused (AuditError) when there is no such tail, or anything
        the head vouches for does not verify (a trail with no checkpoint yet is repaired).
        Audited (``audit.repair``, with the bytes removed).
        """
        with self._exclusive() as fd:
            size = os.fstat(fd).st_size
            head = read_head(self.head_path)
            end = end_of_last_line(fd, size) if head is None else head.size
            if end >= size:
                raise AuditError(
                    f"audit log {self.path} ends where its head record says: nothing to repair"
                )
            # A trail that has no checkpoint yet (its writers were all killed before making
            # one) is repaired too, or it could never get one: every append is refused until
            # the repair. Refusing would protect nothing, for an append to a trail stripped of
            # its checkpoints is not refused either; verify reports that state until then.
            report = check(
                read_lines(fd, 0, end),
                head,
                self._key,
                read_keys=self._read_keys,
                first_checkpoint_due=False,
            )
            if not report.ok:
                raise AuditError(
                    f"audit log {self.path} is damaged within what its head record vouches for "
                    f"(line {report.first_bad_line}: {report.problem}); only the tail of an "
                    "interrupted append is repaired"
                )
            event = AuditEvent.of(
                EventType.AUDIT_REPAIR,
                Caller(actor, request_id=request_id),
                operation="repair_torn_tail",
                count=size - end,
            )
            # The event's lines (and any checkpoint due, the key provider's MAC) are made
            # before anything is cut: a refusal leaves the tail in place, never cut without the
            # event that says so.
            state = self._state(fd, end)
            lines, after = self._seal(state, [event], closing=False, timed=False)
            self._cut_back(fd, end)
            self._commit(fd, end, state, lines, after)
        return size - end

    @contextmanager
    def _exclusive(self) -> Iterator[int]:
        if not self.path.parent.exists():
            ensure_private_dir(self.path.parent, "audit log directory")
        fd = self._open(os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def _open(self, flags: int) -> int:
        """The log opened with *flags* (see private_files); AuditError if it cannot be."""
        try:
            return open_private(self.path, flags, what=_WHAT)
        except OSError as exc:
            raise AuditError(f"audit log {self.path} cannot be opened: {exc.strerror}") from None
        except ConfigurationError as exc:
            raise AuditError(str(exc)) from None

    def _append_locked(
        self, fd: int, events: Sequence[AuditEvent], *, closing: bool, timed: bool = True
    ) -> list[bytes]:
        size = os.fstat(fd).st_size
        state = self._state(fd, size)
        lines, after = self._seal(state, events, closing=closing, timed=timed)
        if not lines:
            if closing:  # nothing pending: another writer's checkpoint covers this one's events
                self._unsealed = False
            return []
        self._commit(fd, size, state, lines, after)
        return lines

    def _commit(
        self, fd: int, size: int, state: ChainState, lines: list[bytes], after: ChainState
    ) -> None:
        """Write *lines* at *size* (where *state* is), fsync, and replace the head with
        *after*: all or nothing, the log cut back to *size* on any failure."""
        try:
            write_all(fd, b"".join(lines))
            if self._fsync:
                os.fsync(fd)
            write_head(self.head_path, after, fsync=self._fsync)
        except BaseException as exc:
            # An interrupt (Ctrl-C) can land after the head record is replaced, when the lines
            # are committed: cutting them back then would leave a head past the log's end.
            if not self._head_is(after):
                self._cut_back(fd, size)
            if isinstance(exc, OSError):
                raise AuditError(
                    f"audit log {self.path} cannot be written ({exc.strerror}); "
                    "it was left as it was"
                ) from None
            if isinstance(exc, ConfigurationError):
                raise AuditError(str(exc)) from None
            raise
        self._unsealed = after.pending > 0
        if after.last_checkpoint_line != state.last_checkpoint_line:
            self._sealed_at = self._monotonic()

    def _head_is(self, state: ChainState) -> bool:
        try:
            return read_head(self.head_path) == state
        except (OSError, HeimdallError):
            return False

    def _cut_back(self, fd: int, size: int) -> None:
        try:
            os.ftruncate(fd, size)
            if self._fsync:
                os.fsync(fd)
        except OSError as exc:
            raise AuditError(
                f"audit log {self.path} could not be cut back after a failed append "
                f"({exc.strerror}); run `heimdall audit verify`"
            ) from None

    def _seal(
        self, state: ChainState, events: Sequence[AuditEvent], *, closing: bool, timed: bool
    ) -> tuple[list[bytes], ChainState]:
        lines: list[bytes] = []
        if self._due(state) or (closing and state.pending):
            state = self._checkpoint(lines, state)
        bodies = event_bodies(events)
        start = 0
        while start < len(bodies):
            # As many events as fit before the next checkpoint is due (at least one: a due one
            # was just made), sealed in one loop.
            chunk = bodies[start : start + self._room(state)]
            sealed, state = seal_events(state, chunk)
            lines.extend(sealed)
            start += len(chunk)
            if self._due(state):
                state = self._checkpoint(lines, state)
        if timed and self._overdue(state):
            state = self._checkpoint(lines, state)
        return lines, state

    def _interval(self, state: ChainState) -> int | None:
        """How many events may wait for a checkpoint after *state*: the shorter of this
        writer's interval and the one the last checkpoint announced. Without a key no
        checkpoint is made, but one a checkpoint promised is still due; None: none is."""
        if self._key is None:
            return state.every
        return min(self._every, state.every or self._every)

    def _due(self, state: ChainState) -> bool:
        interval = self._interval(state)
        return interval is not None and state.pending >= interval

    def _room(self, state: ChainState) -> int:
        """How many events may follow *state* before a checkpoint is due (at least one)."""
        interval = self._interval(state)
        return _UNBOUNDED if interval is None else max(interval - state.pending, 1)

    def _overdue(self, state: ChainState) -> bool:
        """Enough events have waited long enough: see the module docstring."""
        return (
            self._key is not None
            and self._seconds is not None
            and state.pending >= MIN_EVENTS_PER_CHECKPOINT
            and self._monotonic() - self._sealed_at >= self._seconds
        )

    def _checkpoint(self, lines: list[bytes], state: ChainState) -> ChainState:
        if self._key is None:
            raise AuditError(
                f"audit log {self.path} is due a keyed checkpoint but no audit key is "
                "configured; configure the key provider that wrote its checkpoints"
            )
        try:
            line, after = seal_checkpoint(state, self._every, self._key)
        except (KmsError, ConfigurationError) as exc:
            raise AuditError(f"audit checkpoint could not be signed: {exc}") from None
        lines.append(line)
        return after

    def _state(self, fd: int, size: int, *, create: bool = True) -> ChainState:
        """The chain position at the end of the log, after checking it against its head (which
        an empty log without one is given, unless not *create*)."""
        try:
            head = read_head(self.head_path)
            if head is None and size == 0:
                head = ChainState()
                if create:
                    write_head(self.head_path, head, fsync=self._fsync)  # before the first line
        except ConfigurationError as exc:
            raise AuditError(str(exc)) from None
        except OSError as exc:
            raise AuditError(
                f"audit log head record {self.head_path} cannot be written: {exc.strerror}"
            ) from None
        refuse = f"; run `heimdall audit verify` (audit log {self.path})"
        if head is None:
            raise AuditError(f"the audit log has no head record {self.head_path}{refuse}")
        if size < head.size:
            raise AuditError(f"the audit log is shorter than its head record says{refuse}")
        if size > head.size:
            # An append that never committed its head, or lines someone else added: never taken
            # over (the next checkpoint would vouch for them), only removed by the repair.
            raise AuditError(
                f"audit log {self.path} goes on past what its head record vouches for (an "
                "append that did not finish, or lines added by someone else); run `heimdall "
                "audit verify --repair-torn-tail`"
            )
        if isinstance(head, LegacyHead):
            return self._take_over(fd, head) if head.size else ChainState(hash=head.hash)
        if hash_ending_at(fd, head.size) != head.hash:
            raise AuditError(f"the audit log does not end where its head record says{refuse}")
        return head

    def _take_over(self, fd: int, legacy: LegacyHead) -> ChainState:
        """The chain position at the end of a log whose head predates the counters, from its
        lines, each checked link by link, up to where *legacy* says the log ends."""
        state = ChainState()
        for line in read_lines(fd, 0, legacy.size):
            try:
                state, _ = advance(state, line)
            except ChainError as exc:
                raise AuditError(
                    f"audit log {self.path} is damaged at line {state.lines + 1} "
                    f"({exc.problem}); run `heimdall audit verify`"
                ) from None
        if state.size != legacy.size or state.hash != legacy.hash:
            raise AuditError(
                f"the audit log does not end where its head record says; run "
                f"`heimdall audit verify` (audit log {self.path})"
            )
        return state

    # -- reading ----------------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Check the chain, every checkpoint's MAC and the head record (scan.check); the key
        provider is asked only about checkpoints this object has not found good before, as
        long as the trail still reaches them unchanged (scan.recheck)."""
        return self._check(first_checkpoint_due=True)

    def _check(self, *, first_checkpoint_due: bool) -> VerifyReport:
        fd = self._open_for_reading()
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_SH)  # no append is half done while we look
            try:
                size = os.fstat(fd).st_size if fd is not None else 0
                head = read_head(self.head_path)
            except AuditError:
                return VerifyReport(0, False, None, "chain head record is damaged")
            finally:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

            # Appends after this point only add lines past *size*.
            def lines() -> Iterator[bytes]:
                return read_lines(fd, 0, size) if fd is not None else iter(())

            report = recheck(
                lines,
                head,
                self._key,
                self._verified,
                self._read_keys,
                first_checkpoint_due=first_checkpoint_due,
            )
            if report.verified is not None:
                self._verified = report.verified
            return report
        finally:
            if fd is not None:
                os.close(fd)

    def _open_for_reading(self) -> int | None:
        try:
            return open_private(self.path, os.O_RDONLY, what=_WHAT)
        except FileNotFoundError:
            return None

    def tail(self, count: int) -> list[dict[str, Any]]:
        """The last *count* records, oldest first (a torn final line is left out)."""
        fd = self._open_for_reading() if count > 0 else None
        if fd is None:
            return []
        try:
            records = []
            for line in last_lines(fd, count):
                try:
                    records.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    raise AuditError(
                        f"audit log {self.path} holds a line that is not a JSON record; "
                        "run `heimdall audit verify`"
                    ) from None
            return records
        finally:
            os.close(fd)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        fd = self._open_for_reading()
        if fd is None:
            return
        try:
            for line in read_lines(fd, 0, os.fstat(fd).st_size):
                if line.endswith(b"\n"):
                    yield orjson.loads(line)
        finally:
            os.close(fd)


def _refuse_checkpoints(events: Sequence[AuditEvent]) -> None:
    if holds_checkpoints(events):
        raise ValueError("checkpoints are written by the audit log itself")
