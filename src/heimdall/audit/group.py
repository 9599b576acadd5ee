"""Group commit: the threads of one process that write to one sink at once share its appends.

An append to the file sink costs two fsyncs under an exclusive lock (:mod:`.jsonl`), whatever
it holds; a server thread per request would each pay them in turn, and the requests queue
behind the lock. So, as databases commit transactions: while one append is being made, the
events of every other thread gather into the next group; when it ends, the first waiting
thread makes that group's append for all of them, and each returns when its own events are
committed. No thread waits for a timer: a lone writer appends at once, as before.

Nothing about fail-closed changes. Every event of a group is in one append of the file, so
they are all committed or none is (a full disk, an unreachable key provider); then every member
of the group gets :class:`AuditError` and refuses its operation, and the file is as it was. A
required forwarder that fails after the file append refuses every member's operation too (the
file then holds their events, as it would without grouping). A thread interrupted while it
waits (KeyboardInterrupt) takes its events back unless their append has begun; an interrupted
leader hands its role back (best effort: Python cannot make a ``finally`` block itself immune
to a second asynchronous exception).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final

from heimdall.audit.events import AuditEvent, Decryptions, Joined, holds_checkpoints
from heimdall.errors import AuditError, HeimdallError

__all__ = ["GroupCommit", "Sealer"]

_WHAT_FAILED: Final = "the audit trail could not be written"
_log = logging.getLogger("heimdall.audit")


class _Group:
    __slots__ = ("done", "error", "members")

    def __init__(self) -> None:
        self.members: list[Sequence[AuditEvent]] = []  # each writer's events, in arrival order
        self.done = False
        self.error: BaseException | None = None

    def events(self) -> Sequence[AuditEvent]:
        members = self.members
        return members[0] if len(members) == 1 else Joined(tuple(members))

    def withdraw(self, member: Sequence[AuditEvent]) -> None:
        for index, other in enumerate(self.members):
            if other is member:
                del self.members[index]
                return


class GroupCommit:
    """Calls *flush* with the events of every thread that wrote while the previous flush ran.

    *flush* must be all or nothing: it either commits every event it is given or raises and
    leaves the sink as it was.
    """

    def __init__(self, flush: Callable[[Sequence[AuditEvent]], object]) -> None:
        self._flush = flush
        # An RLock's condition: a signal cannot interrupt its re-acquire after a wait, so a
        # waiter interrupted there still holds the lock when it takes its events back.
        self._changed = threading.Condition()
        self._gathering: _Group | None = None  # the group new events join
        self._flushing: _Group | None = None  # the group whose append is being made

    def write(self, events: Sequence[AuditEvent]) -> None:
        """Return once *events* are committed; AuditError (or the flush's own exception, in
        the thread that ran it) when they are not."""
        if holds_checkpoints(events):
            raise ValueError("checkpoints are written by the audit log itself")
        if not events:
            return
        # The writer's own copy (a Decryptions holds its own tuples already), so that a list
        # the caller changes afterwards cannot change what is committed.
        member = events if type(events) is Decryptions else list(events)
        with self._changed:
            group = self._join(member)
            if group.done:
                if group.error is not None:
                    raise _refusal(group.error)
                return
            # This thread commits the group: it is the leader (the finally below hands the role
            # back whatever happens from here), and the group takes no more events.
            self._flushing = group
            if self._gathering is group:
                self._gathering = None
        committed = False
        try:
            self._flush(group.events())
            committed = True
        except BaseException as exc:
            group.error = exc
            raise
        finally:
            with self._changed:
                if not committed and group.error is None:
                    group.error = AuditError(f"{_WHAT_FAILED}: the append was interrupted")
                if self._gathering is group:
                    self._gathering = None
                group.done = True
                if self._flushing is group:
                    self._flushing = None
                self._changed.notify_all()

    def _join(self, member: Sequence[AuditEvent]) -> _Group:
        """The group *member* joined, once it is committed or this thread may commit it
        (nothing else being flushed); called with the lock held. Interrupted before the
        group's append began, the events are taken back."""
        group = self._gathering
        if group is None:
            group = self._gathering = _Group()
        try:
            group.members.append(member)
            while not group.done and (self._flushing is not None or self._gathering is not group):
                self._changed.wait()
        except BaseException:
            if self._gathering is group:
                group.withdraw(member)
                if not group.members:
                    self._gathering = None
            raise
        return group


def _refusal(error: BaseException) -> AuditError:
    """What a thread whose events another thread failed to commit raises: a fresh exception
    of its own (one exception object is never raised in two threads)."""
    if isinstance(error, AuditError):
        return AuditError(str(error))
    return AuditError(f"{_WHAT_FAILED} ({type(error).__name__}); the operation is refused")


class Sealer:
    """A timer thread that calls *sink*'s ``seal`` every *seconds* (a sink without one is left
    alone), for processes that run long: what they wrote is sealed by a keyed checkpoint
    within about that time even when no more events come. Used as a context manager."""

    def __init__(self, sink: object, seconds: float) -> None:
        self._seal: Callable[[], object] | None = getattr(sink, "seal", None)
        self._seconds = seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heimdall-audit-sealer", daemon=True)

    def __enter__(self) -> Sealer:
        if self._seal is not None:
            self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        assert self._seal is not None
        while not self._stop.wait(self._seconds):
            try:
                self._seal()
            except HeimdallError as exc:  # the key provider or a forwarder refusing: said
                _log.warning("audit trail not sealed: %s", exc)
            except Exception as exc:  # the timer outlives any one failure: said, by type only
                _log.warning("audit trail not sealed: %s", type(exc).__name__)
