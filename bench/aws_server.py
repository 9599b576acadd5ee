"""A throwaway AWS KMS emulator for the AWS rows: moto's ``moto_server`` on this machine.

:func:`moto_server` starts ``moto_server`` (moto's AWS emulator: KMS, STS and the rest in one
process, all in memory, any credentials accepted) on a free 127.0.0.1 port, its output in a log
file in a temp dir, and waits up to 20 s for it to answer. It is stopped by pid (SIGTERM to its
process group, SIGKILL after a grace period) when the rows are done, also on an exception,
Ctrl-C or SIGTERM; on Linux the kernel kills it if the bench itself is killed.

:func:`sdk_environment` points the AWS SDK of the bench process (and, through
:meth:`MotoServer.environment`, of its workers) at that server with dummy credentials: every
service's endpoint is the server's, no profile or instance metadata is read, so nothing leaves
the machine. heimdall itself takes no credential from its settings; the SDK's default chain
finds these.

:class:`RequestCounter` counts the HTTP requests a provider's SDK clients send to KMS, by
operation (botocore's ``before-send`` event: every attempt, retries included). That is the
"KMS calls" figure of the AWS rows.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench import processes

__all__ = [
    "REGION",
    "MotoServer",
    "RequestCounter",
    "ServerStartError",
    "moto_binary",
    "moto_server",
    "sdk_environment",
]

REGION: Final = "eu-west-1"
STARTUP_TIMEOUT: Final = 20.0
STOP_GRACE: Final = 5.0
PORT_ATTEMPTS: Final = 3
LOG_TAIL_LINES: Final = 20
_REPO: Final = Path(__file__).resolve().parent.parent
# Loopback only: no proxy from the environment, for the readiness probe.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerStartError(RuntimeError):
    """moto_server did not come up (the message carries the tail of its log)."""


def moto_binary() -> Path | None:
    """``moto_server`` next to the running interpreter (the venv's), in the repo's .venv, or on
    PATH."""
    for candidate in (
        Path(sys.executable).parent / "moto_server",
        _REPO / ".venv" / "bin" / "moto_server",
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("moto_server")
    return Path(found) if found else None


@dataclass
class MotoServer:
    """One running ``moto_server``; *workdir* holds its log and the SDK's (absent) files."""

    url: str
    workdir: Path
    proc: subprocess.Popen[bytes] = field(repr=False)
    # Dummy credentials, made per server: moto accepts any.
    access_key: str = field(default_factory=lambda: "AKIABENCH" + secrets.token_hex(6).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30), repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "moto.log"

    @property
    def running(self) -> bool:
        return not processes.has_exited(self.proc)

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (0.0 if unreadable)."""
        return processes.cpu_seconds(self.pid)

    def answers(self) -> bool:
        """Whether the server answers HTTP (a 4xx from its API counts: it answered)."""
        try:
            with _OPENER.open(f"{self.url}/moto-api/reset-auth", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:]) or "(the server log is empty)"

    def environment(self) -> dict[str, str]:
        """The AWS_* variables that point an SDK at this server (see the module docstring)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.url,  # every service, STS included
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def stop(self) -> None:
        processes.stop(self.proc, signal.SIGTERM, STOP_GRACE)


def version() -> str:
    """The installed moto's version (the server runs from the same environment)."""
    try:
        return importlib.metadata.version("moto")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _spawn(binary: Path, workdir: Path, port: int) -> MotoServer:
    # The server needs no credential: none of the bench's AWS_* or HMD_* variables reach it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HMD_"))}
    log_path = workdir / "moto.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - our own argument list, no shell
            [str(binary), "-H", processes.LOOPBACK, "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,  # own process group: Ctrl-C reaches the bench, not moto
            preexec_fn=processes.die_with_parent(),  # noqa: PLW1509 - the child only calls prctl
        )
    return MotoServer(f"http://{processes.LOOPBACK}:{port}", workdir, proc)


def _wait_until_serving(server: MotoServer, deadline: float) -> None:
    while not server.answers():
        if not server.running:
            raise ServerStartError("moto_server exited before it answered")
        if time.monotonic() > deadline:
            raise ServerStartError(f"moto_server did not answer within {STARTUP_TIMEOUT:.0f} s")
        time.sleep(0.05)


@contextlib.contextmanager
def moto_server(binary: Path) -> Iterator[MotoServer]:
    """A running, answering ``moto_server``; stopped on exit (see the module docstring)."""
    with (
        processes.sigterm_unwinds(),
        tempfile.TemporaryDirectory(prefix="heimdall-bench-moto-") as tmp,
    ):
        workdir = Path(tmp)
        server: MotoServer | None = None
        try:
            for attempt in range(1, PORT_ATTEMPTS + 1):
                server = _spawn(binary, workdir, processes.free_port())
                try:
                    _wait_until_serving(server, time.monotonic() + STARTUP_TIMEOUT)
                    break
                except ServerStartError as exc:
                    server.stop()
                    # Someone took the port between our probe and the server's bind.
                    if attempt < PORT_ATTEMPTS and "already in use" in server.log_tail():
                        continue
                    raise ServerStartError(
                        f"{exc}\n--- last lines of the moto_server log ---\n{server.log_tail()}"
                    ) from None
            assert server is not None
            yield server
        finally:
            if server is not None:
                server.stop()


@contextlib.contextmanager
def sdk_environment(server: MotoServer) -> Iterator[None]:
    """This process's AWS_* variables are :meth:`MotoServer.environment` while the block runs
    (every other AWS_* variable removed); the previous ones are back afterwards."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(server.environment())
    try:
        yield
    finally:
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(saved)


class RequestCounter:
    """The HTTP requests *clients* (boto3 KMS clients) send, by operation: every attempt,
    retries included. Thread-safe: a provider sends a batch's items from several threads."""

    def __init__(self, clients: Iterable[Any]) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        seen: set[int] = set()
        for client in clients:
            if id(client) not in seen:  # one client may serve as two (retried and once)
                seen.add(id(client))
                client.meta.events.register("before-send.kms", self._sent)

    def _sent(self, event_name: str = "", **_: Any) -> None:
        operation = event_name.rpartition(".")[2] or "unknown"
        with self._lock:
            self._counts[operation] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    @staticmethod
    def since(before: Counter[str], after: Counter[str]) -> tuple[tuple[str, int], ...]:
        """The requests sent between two snapshots, by operation (sorted by name)."""
        sent = after - before
        return tuple(sorted(sent.items()))
