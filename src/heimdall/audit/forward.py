"""Forwarding the audit trail off the host: syslog (RFC 5424) and stdout (JSON lines).

spec: Audit and Compliance (Vault Audit Backend Configuration: forward the audit logs to
centralized logging). ``HMD_AUDIT_SINKS`` adds these beside the file, which always stays. Each
line the file commits, checkpoints included, is then sent as it is (same JSON, same ``hash``),
so the copy can be checked against the file, and a rewrite of the file on the host shows as a
difference from the copy. Shipping the copy to an append-only store (as Vault's audit devices
and CloudTrail's digests do) is the operator's part: heimdall cannot make a collector keep it.

Delivery is as mandatory as the file (``HMD_AUDIT_SINKS_REQUIRED=true``, the default): if a
sink cannot take a line, the operation is refused with :class:`AuditError`. The file has the
line by then (it is written first, so the copy never holds an event the file lacks), so the
file may hold the events of a refused operation, with their results as they were. With
``HMD_AUDIT_SINKS_REQUIRED=false`` a failed delivery is logged (``heimdall.audit`` logger) and
the operation goes on. UDP cannot tell a lost datagram: where delivery must be certain, use a
Unix socket or TCP. Each process sends its lines in the order it commits them; the lines of
several processes may reach a collector interleaved out of chain order, and their ``hash``
links put them back in order.

A syslog message is ``<PRI>1 TIMESTAMP HOSTNAME heimdall PROCID MSGID - BOM JSON``: facility
authpriv, severity notice for denials and failures and informational otherwise, the event's
own timestamp, its ``event_type`` as MSGID. Unix and UDP sockets take one message per datagram,
TCP octet-counting framing (RFC 6587).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Final, Protocol, TextIO

import orjson

from heimdall.audit.events import AuditEvent, Result
from heimdall.audit.group import GroupCommit
from heimdall.audit.jsonl import JsonlAuditLog
from heimdall.errors import AuditError, ConfigurationError

__all__ = [
    "ForwardSink",
    "ForwardedAuditLog",
    "Forwarder",
    "StdoutForwarder",
    "SyslogForwarder",
    "rfc5424",
]

_log = logging.getLogger("heimdall.audit")
_FACILITY_AUTHPRIV: Final = 10
_SEVERITY_NOTICE: Final = 5
_SEVERITY_INFO: Final = 6
_TIMEOUT: Final = 5.0
_BOM: Final = b"\xef\xbb\xbf"
_TIMESTAMP: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z\Z")
_NET_ADDRESS: Final = re.compile(r"(udp|tcp)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})\Z")


class ForwardSink(enum.StrEnum):
    SYSLOG = "syslog"
    STDOUT = "stdout"


class Forwarder(Protocol):
    def send(self, lines: Sequence[bytes]) -> None:
        """Deliver every line (newline included) or raise AuditError."""
        ...

    def close(self) -> None: ...


class StdoutForwarder:
    """One JSON object per line on standard output (for collectors that read it)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()  # one batch of lines at a time, never interleaved

    def send(self, lines: Sequence[bytes]) -> None:
        stream = self._stream or sys.stdout
        try:
            if stream.isatty():
                # A terminal gets every character outside ASCII escaped (valid JSON still), so
                # no control character in an actor or reason can drive it.
                text = "".join(
                    json.dumps(orjson.loads(line), ensure_ascii=True, separators=(",", ":")) + "\n"
                    for line in lines
                )
            else:
                text = b"".join(lines).decode()
            with self._lock:
                stream.write(text)
                stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            raise AuditError(f"audit sink stdout cannot be written: {exc}") from None

    def close(self) -> None:
        pass


def rfc5424(line: bytes, *, hostname: str, procid: int) -> bytes:
    """The RFC 5424 message carrying one audit line."""
    doc = orjson.loads(line)
    failed = doc.get("result") in (Result.DENIED.value, Result.FAILURE.value)
    pri = _FACILITY_AUTHPRIV * 8 + (_SEVERITY_NOTICE if failed else _SEVERITY_INFO)
    stamp = str(doc.get("timestamp", ""))
    header = " ".join(
        (
            f"<{pri}>1",
            stamp if _TIMESTAMP.match(stamp) else "-",
            _header_word(hostname, 255),
            "heimdall",
            str(procid),
            _header_word(str(doc.get("event_type", "")), 32),
            "-",
        )
    )
    return header.encode("ascii") + b" " + _BOM + line.rstrip(b"\n")


def _header_word(text: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, or the NILVALUE."""
    word = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return word or "-"


class SyslogForwarder:
    """RFC 5424 messages to a syslog daemon: a Unix socket path, udp://host:port or
    tcp://host:port (``HMD_AUDIT_SYSLOG_ADDRESS``, default ``/dev/log``)."""

    def __init__(self, address: str, *, hostname: str | None = None) -> None:
        self.address = address
        match = _NET_ADDRESS.match(address)
        if match:
            scheme, host, port = match.groups()
            if not 0 < int(port) < 65536:
                raise ConfigurationError(f"HMD_AUDIT_SYSLOG_ADDRESS port {port} is not valid")
            self._stream = scheme == "tcp"
            self._where: tuple[str, int] | str = (host.strip("[]"), int(port))
        elif address.startswith(("/", "unix://")):
            self._stream = False
            self._where = address.removeprefix("unix://")
        else:
            raise ConfigurationError(
                "HMD_AUDIT_SYSLOG_ADDRESS must be a Unix socket path, udp://host:port or "
                "tcp://host:port"
            )
        self._hostname = hostname or socket.gethostname()
        self._socket: socket.socket | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()  # a TCP stream carries one message at a time

    def send(self, lines: Sequence[bytes]) -> None:
        messages = [rfc5424(line, hostname=self._hostname, procid=os.getpid()) for line in lines]
        with self._lock:
            if self._pid != os.getpid():  # a forked child opens its own connection
                self.close()  # its copy only: the parent's connection stays open
                self._pid = os.getpid()
            for message in messages:
                try:
                    self._deliver(
                        f"{len(message)} ".encode() + message if self._stream else message
                    )
                except OSError as exc:
                    reason = exc.strerror or type(exc).__name__
                    raise AuditError(f"audit sink syslog {self.address} failed: {reason}") from None

    def _deliver(self, message: bytes) -> None:
        for attempt in range(2):  # a collector restarted since the last message: reconnect once
            try:
                self._connected().sendall(message)
                return
            except OSError:
                self.close()
                if attempt:
                    raise

    def _connected(self) -> socket.socket:
        if self._socket is not None:
            return self._socket
        if isinstance(self._where, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            target: object = self._where
        else:
            kind = socket.SOCK_STREAM if self._stream else socket.SOCK_DGRAM
            family, _, _, _, target = socket.getaddrinfo(*self._where, type=kind)[0]
            sock = socket.socket(family, kind)
        try:
            sock.settimeout(_TIMEOUT)
            sock.connect(target)  # type: ignore[arg-type]
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        return sock

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class ForwardedAuditLog:
    """The file sink, then every forwarder: see the module docstring for what a failed
    delivery does. ``required`` is ``HMD_AUDIT_SINKS_REQUIRED``."""

    def __init__(
        self, log: JsonlAuditLog, forwarders: Sequence[Forwarder], *, required: bool = True
    ) -> None:
        self.log = log
        self._forwarders = tuple(forwarders)
        self._required = required
        # Threads share appends as on the file alone. Each append (and a closing or timed
        # checkpoint) is forwarded whole, by the thread that made it, under one lock: this
        # process's lines reach every sink in the order of the file.
        self._group = GroupCommit(self._append)
        self._in_order = threading.Lock()

    def write(self, events: Sequence[AuditEvent]) -> None:
        self._group.write(events)

    def _append(self, events: Sequence[AuditEvent]) -> None:
        with self._in_order:
            self._forward(self.log.append(events), "the operation is refused")

    def seal(self) -> None:
        """:meth:`JsonlAuditLog.seal`, forwarded."""
        with self._in_order:
            self._forward(self.log.seal(), "its checkpoint is not there")

    def vouch(self) -> tuple[list[bytes], tuple[str, ...]]:
        """:meth:`JsonlAuditLog.vouch`, forwarded."""
        with self._in_order:
            lines, keys = self.log.vouch()
            self._forward(lines, "its vouching checkpoint is not there")
        return lines, keys

    def close(self) -> None:
        try:
            with self._in_order:
                lines = self.log.checkpoint_on_close()
                self._forward(lines, "its closing checkpoint is not there")
        finally:
            for forwarder in self._forwarders:
                forwarder.close()

    def _forward(self, lines: Sequence[bytes], consequence: str) -> None:
        if not lines:
            return
        failures = []
        for forwarder in self._forwarders:  # every sink gets its copy, even after a failure
            try:
                forwarder.send(lines)
            except AuditError as exc:
                failures.append(str(exc))
        if not failures:
            return
        if self._required:
            raise AuditError(f"{failures[0]}; {consequence}")
        for failure in failures:
            _log.warning("%s; going on (HMD_AUDIT_SINKS_REQUIRED=false)", failure)
