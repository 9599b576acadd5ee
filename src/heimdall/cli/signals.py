"""How a command that works the re-encryption job stops on SIGTERM and SIGINT.

:func:`stop_signals` is how every command that works the re-encryption job (``heimdall
worker``, ``heimdall reencrypt``, ``reencrypt run``, ``migrate start``) stops: the first SIGTERM or
SIGINT ends it after the batch in flight, which commits, with the job still running for the next
worker; the second ends the process at once (``timeout``, systemd, Kubernetes and a double
Ctrl-C all send two). An immediate exit is safe: an uncommitted batch rolls back and is done
again (see :mod:`heimdall.store.jobs`). Python runs a signal handler in the main thread between
bytecodes, so a handler that logged or set a ``threading.Event`` could be entered again, by the
second signal, while it held that non-reentrant lock, and hang the process. So the handler does
nothing: Python's C-level handler writes the signal's number to a wakeup fd, and a watcher
thread reads it there and does the logging and the stopping outside any handler.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["stop_signals"]

_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def _leave_it_to_the_watcher(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler. The C-level one has written *signum* to the wakeup fd already;
    anything more here could block on a lock the interrupted code holds."""


def _watch(
    wakeup: socket.socket, stop: Callable[[], None], announce: Callable[[signal.Signals], None]
) -> None:
    received = 0
    while data := wakeup.recv(64):  # b"" once stop_signals closes the other end
        for signum in data:
            if signum not in _STOP_SIGNALS:
                continue  # another signal Python handles: none of ours
            received += 1
            if received == 1:
                # Said before stopping (once stopped, the process may end before saying it),
                # and apart: saying so may fail, stopping must not. Rich even raises
                # SystemExit when stderr's reader has gone (its broken-pipe policy).
                with contextlib.suppress(BaseException):
                    announce(signal.Signals(signum))
                stop()
                continue
            line = f"{signal.Signals(signum).name} received again: exiting now\n"
            # os.write, not the console: a thread the exit ends may hold the console's lock.
            with contextlib.suppress(OSError):
                os.write(2, line.encode())
            os._exit(128 + signum)  # as a shell reports a process the signal ended


@contextmanager
def stop_signals(
    stop: Callable[[], None], announce: Callable[[signal.Signals], None]
) -> Iterator[None]:
    """SIGTERM and SIGINT in the body: the first calls *announce* with the signal, then *stop*
    (both from a watcher thread, so they may take locks; a failing *announce* is ignored), the
    second exits at once with status 128 + the signal's number. Must be entered in the main
    thread; the handlers before it are restored on leaving."""
    wakeup, wakeup_writer = socket.socketpair()
    wakeup_writer.setblocking(False)  # the C-level handler must never block on it
    previous_fd = signal.set_wakeup_fd(wakeup_writer.fileno(), warn_on_full_buffer=False)
    previous = {
        sig: signal.signal(sig, _leave_it_to_the_watcher)
        for sig in _STOP_SIGNALS
        # One ignored stays ignored (a shell script ignores SIGINT in what it starts with `&`).
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    watcher = threading.Thread(
        target=_watch, args=(wakeup, stop, announce), name="heimdall-stop-signals", daemon=True
    )
    watcher.start()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_fd)
        wakeup_writer.close()
        watcher.join()
        wakeup.close()
