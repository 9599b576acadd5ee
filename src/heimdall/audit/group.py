"""Group commit: the threads of one process that write to one sink at once share its appends.

An append to the file sink costs two fsyncs under an exclusive lock (:mod:`.jsonl`), whatever
it holds; a server thread per request would each pay them in turn, and the requests queue
behind the lock. So, as databases commit transactions: while one append is being made, the
events of every other thread gather into the next group; when it ends, the first waiting
thread makes that group's append for all of them, and each returns when its own events are
committed. No thread waits for a timer: a lone writer appends at once, as before.

Nothing about fail-closed changes. Every event of a group is in one append, so they are all
committed or none is (a full disk, an unreachable key provider, a required forwarder that
fails); then every member of the group gets :class:`AuditError` and refuses its operation, and
the trail is as it was. The append that a group makes is the sink's own, so the order of
lines, checkpoints and forwarded copies is the order of the file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Final

from heimdall.audit.events import AuditEvent
from heimdall.errors import AuditError

__all__ = ["GroupCommit"]

_WHAT_FAILED: Final = "the audit trail could not be written"


class _Group:
    __slots__ = ("done", "error", "events")

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.done = False
        self.error: BaseException | None = None


class GroupCommit:
    """Calls *flush* with the events of every thread that wrote while the previous flush ran.

    *flush* must be all or nothing: it either commits every event it is given or raises and
    leaves the sink as it was.
    """

    def __init__(self, flush: Callable[[Sequence[AuditEvent]], object]) -> None:
        self._flush = flush
        self._changed = threading.Condition(threading.Lock())
        self._gathering: _Group | None = None  # the group new events join
        self._flushing = False

    def write(self, events: Sequence[AuditEvent]) -> None:
        """Return once *events* are committed; AuditError (or the flush's own exception, in
        the thread that ran it) when they are not."""
        if not events:
            return
        with self._changed:
            group = self._gathering
            if group is None:
                group = self._gathering = _Group()
            group.events.extend(events)
            while not group.done and (self._flushing or self._gathering is not group):
                self._changed.wait()
            if not group.done:  # this thread commits the group
                self._flushing = True
                self._gathering = None
        if group.done:
            if group.error is not None:
                raise _refusal(group.error)
            return
        try:
            self._flush(group.events)
        except BaseException as exc:
            group.error = exc
            raise
        finally:
            with self._changed:
                group.done = True
                self._flushing = False
                self._changed.notify_all()


def _refusal(error: BaseException) -> AuditError:
    """What a thread whose events another thread failed to commit raises: a fresh exception
    of its own (one exception object is never raised in two threads)."""
    if isinstance(error, AuditError):
        return AuditError(str(error))
    return AuditError(f"{_WHAT_FAILED} ({type(error).__name__}); the operation is refused")
