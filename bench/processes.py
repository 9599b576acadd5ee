"""Child processes of the bench (the OpenBao dev server, the PostgreSQL cluster, the workers):
started so that they die with the bench, signalled by process group, measured from /proc.

Linux only where it says so; elsewhere each helper degrades to doing nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

__all__ = [
    "LOOPBACK",
    "cpu_seconds",
    "die_with_parent",
    "free_port",
    "has_exited",
    "signal_group",
    "sigterm_unwinds",
    "stop",
    "tree_cpu_seconds",
]

LOOPBACK = "127.0.0.1"


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when the bench dies (even by SIGKILL),
    so a killed bench never leaves it behind. It runs after the child's setuid (which would
    clear the setting), just before exec."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None  # the signal fires when the spawning *thread* exits, not the process
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)

    return preexec


def has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the process exited, without reaping it (a zombie keeps its pid reserved)."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def signal_group(pid: int, sig: signal.Signals) -> None:
    """*sig* to the process group led by *pid* (to *pid* alone if it has no group). Only while
    *pid* is not yet reaped, so neither it nor its group can have been reused."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals, grace: float) -> None:
    """*sig* to the process group, SIGKILL after *grace* seconds, reap the leader. Idempotent:
    once the leader is reaped nothing is signalled again (its pid may be reused)."""
    if proc.returncode is not None:
        return
    if not has_exited(proc):
        signal_group(proc.pid, sig)
        deadline = time.monotonic() + grace
        while not has_exited(proc) and time.monotonic() < deadline:
            time.sleep(0.02)
    # Before reaping, while the pid is still ours: whatever is left of the group dies too.
    signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime of *pid* (with *children*, plus those of its reaped children); 0.0 if
    unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    # utime, stime, cutime, cstime are fields 14-17 of the line, 12-15 after the name.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a server and its child processes, reaped ones included: for PostgreSQL,
    the postmaster, every backend, autovacuum, the checkpointer and the WAL writer."""
    total = cpu_seconds(pid, children=True)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii")
        except OSError:
            continue
        after = stat.rpartition(")")[2].split()
        if after and int(after[1]) == pid:  # field 4, the parent pid
            total += (int(after[11]) + int(after[12])) / os.sysconf("SC_CLK_TCK")
    return total


def free_port() -> int:
    """A loopback port free at the time of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


def _raise_system_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While a server runs, SIGTERM unwinds the stack (so the server is stopped) instead of
    killing the bench outright. Ctrl-C already does (KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
