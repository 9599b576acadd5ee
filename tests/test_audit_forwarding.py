"""Forwarding the audit trail: syslog (RFC 5424) and stdout carry the file's lines, no more.

spec: Audit and Compliance (forward audit logs to centralized logging). A receiver in the test
takes the syslog messages over UDP, a Unix datagram socket or TCP.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from heimdall.app import build
from heimdall.audit import ForwardSink, SyslogForwarder
from heimdall.errors import AuditError, ConfigurationError
from heimdall.ingest import IngestReport
from heimdall.rbac import Caller
from heimdall.service import Heimdall
from heimdall.settings import Settings

ServiceFactory = Callable[..., Heimdall]
Ingest = Callable[..., IngestReport]

# RFC 5424, section 6: HEADER SP STRUCTURED-DATA SP MSG, with a UTF-8 MSG (BOM first).
RFC5424 = re.compile(
    rb"<(?P<pri>\d{1,3})>1 "
    rb"(?P<timestamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{1,6}Z) "
    rb"(?P<hostname>[\x21-\x7e]{1,255}) "
    rb"heimdall "
    rb"(?P<procid>\d{1,128}) "
    rb"(?P<msgid>[\x21-\x7e]{1,32}) "
    rb"- "
    rb"\xef\xbb\xbf(?P<msg>\{.*\})\Z",
    re.DOTALL,
)
REASON = "support:ticket-77"
PII = ("name", "email", "phone", "ssn", "date_of_birth", "address", "ip")


class Receiver:
    """A syslog collector in the test: a thread reads all that heimdall sends to ``address``
    (as a daemon does: a Unix datagram socket's queue is short)."""

    def __init__(self, address: str, sock: socket.socket, *, stream: bool = False) -> None:
        self.address = address
        self._sock = sock
        self._stream = stream
        self._received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def messages(self, count: int) -> list[bytes]:
        deadline = time.monotonic() + 10
        while len(self._received) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self._received)

    def _run(self) -> None:
        if not self._stream:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    self._received.append(self._sock.recv(65536))
            return
        with contextlib.suppress(TimeoutError):
            connection, _ = self._sock.accept()
            with connection:
                self._read_frames(connection)

    def _read_frames(self, connection: socket.socket) -> None:
        buffer = b""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                chunk = connection.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            while b" " in buffer:  # RFC 6587 octet counting: LENGTH SP MESSAGE
                length, _, rest = buffer.partition(b" ")
                if len(rest) < int(length):
                    break
                self._received.append(rest[: int(length)])
                buffer = rest[int(length) :]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture(params=["udp", "unix", "tcp"])
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    if request.param == "unix":
        # A short directory of its own: a socket path may not exceed 107 bytes.
        with tempfile.TemporaryDirectory(prefix="hmd-") as directory:
            path = str(Path(directory) / "log.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(path)
            sock.settimeout(0.1)
            unix = Receiver(path, sock)
            yield unix
            unix.close()
        return
    kind = socket.SOCK_DGRAM if request.param == "udp" else socket.SOCK_STREAM
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(1)
    sock.settimeout(0.1 if kind == socket.SOCK_DGRAM else 5)
    address = f"{request.param}://127.0.0.1:{sock.getsockname()[1]}"
    found = Receiver(address, sock, stream=kind == socket.SOCK_STREAM)
    yield found
    found.close()


def _plaintexts(people: list[dict[str, Any]]) -> list[bytes]:
    return [str(person[name]).encode() for person in people for name in PII if name in person]


def test_syslog_and_stdout_carry_the_same_lines_as_the_file_and_no_plaintext(  # noqa: PLR0917
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    data_dir: Path,
    receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    service = make_service(
        audit_sinks=(ForwardSink.SYSLOG, ForwardSink.STDOUT),
        audit_syslog_address=receiver.address,
        audit_checkpoint_every=10,
    )
    try:
        ingest(service, people[:4])
        canonical_key = service.lookup("email", people[2]["email"], caller=caller).canonical_key
        assert service.decrypt(canonical_key, reason=REASON, caller=caller) == people[2]["email"]
    finally:
        service.audit.close()
    file_lines = (data_dir / "audit.log").read_bytes().splitlines()
    assert b'"event_type":"audit.checkpoint"' in file_lines[-1]  # closing forwards it too

    messages = receiver.messages(len(file_lines))
    stdout_lines = capsys.readouterr().out.encode().splitlines()

    parsed = [RFC5424.match(message) for message in messages]
    assert all(parsed), messages
    assert [match["msg"] for match in parsed if match] == file_lines
    assert stdout_lines == file_lines
    for match in parsed:
        assert match is not None
        record = orjson.loads(match["msg"])
        assert match["msgid"].decode() == record["event_type"]
        assert match["timestamp"].decode() == record["timestamp"]
        severity = 5 if record["result"] in ("denied", "failure") else 6
        assert int(match["pri"]) == 10 * 8 + severity  # authpriv
    decrypts = [r for r in map(orjson.loads, stdout_lines) if r["event_type"] == "crypto.decrypt"]
    assert [(r["field_identifier"], r["reason"]) for r in decrypts] == [(canonical_key, REASON)]
    everything = b"\n".join(messages + stdout_lines)
    for plaintext in _plaintexts(people[:4]):
        assert plaintext not in everything


def _missing_socket(tmp_path: Path) -> str:
    return str(tmp_path / "nobody-listens.sock")


def test_a_sink_that_cannot_deliver_refuses_the_operation(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    tmp_path: Path,
) -> None:
    service = make_service()
    ingest(service, people[:2])
    canonical_key = service.lookup("email", people[0]["email"], caller=caller).canonical_key
    forwarding = make_service(
        audit_sinks=(ForwardSink.SYSLOG,), audit_syslog_address=_missing_socket(tmp_path)
    )
    returned: list[str] = []

    with pytest.raises(AuditError, match=r"audit sink syslog .* failed") as refused:
        returned.append(forwarding.decrypt(canonical_key, reason=REASON, caller=caller))

    assert returned == []
    assert "operation is refused" in str(refused.value)
    assert people[0]["email"] not in str(refused.value)
    with pytest.raises(AuditError):  # its checkpoint cannot be delivered either
        forwarding.audit.close()


def test_a_sink_marked_not_required_only_logs_its_failure(  # noqa: PLR0917
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = make_service(
        audit_sinks=(ForwardSink.SYSLOG,),
        audit_syslog_address=_missing_socket(tmp_path),
        audit_sinks_required=False,
    )
    ingest(service, people[:2])
    canonical_key = service.lookup("email", people[0]["email"], caller=caller).canonical_key

    with caplog.at_level(logging.WARNING, logger="heimdall.audit"):
        value = service.decrypt(canonical_key, reason=REASON, caller=caller)

    assert value == people[0]["email"]
    assert "HMD_AUDIT_SINKS_REQUIRED=false" in caplog.text
    assert people[0]["email"] not in caplog.text
    service.audit.close()


@pytest.mark.parametrize(
    "address", ["syslog.example:514", "udp://host", "tcp://host:99999", "ftp://host:21"]
)
def test_a_syslog_address_heimdall_cannot_use_is_refused(address: str) -> None:
    with pytest.raises(ConfigurationError, match="HMD_AUDIT_SYSLOG_ADDRESS"):
        SyslogForwarder(address)


def test_audit_sinks_are_read_from_the_environment_and_checked() -> None:
    settings = Settings.from_env(
        {
            "HMD_AUDIT_SINKS": "syslog, stdout",
            "HMD_AUDIT_SYSLOG_ADDRESS": "udp://127.0.0.1:514",
            "HMD_AUDIT_SINKS_REQUIRED": "false",
            "HMD_AUDIT_CHECKPOINT_EVERY": "250",
            "HMD_AUDIT_CHECKPOINT_SECONDS": "0.5",
        }
    )
    assert settings.audit_sinks == (ForwardSink.SYSLOG, ForwardSink.STDOUT)
    assert (settings.audit_syslog_address, settings.audit_sinks_required) == (
        "udp://127.0.0.1:514",
        False,
    )
    assert (settings.audit_checkpoint_every, settings.audit_checkpoint_seconds) == (250, 0.5)
    assert Settings().audit_sinks == ()
    defaults = Settings()
    assert (defaults.audit_sinks_required, defaults.audit_checkpoint_every) == (True, 20_000)
    assert defaults.audit_checkpoint_seconds == 5.0
    with pytest.raises(ConfigurationError, match="HMD_AUDIT_SINKS='kafka' is not one of"):
        Settings.from_env({"HMD_AUDIT_SINKS": "syslog,kafka"})
    with pytest.raises(ConfigurationError, match="HMD_AUDIT_CHECKPOINT_EVERY must be between"):
        Settings.from_env({"HMD_AUDIT_CHECKPOINT_EVERY": "0"})
    with pytest.raises(ConfigurationError, match="HMD_AUDIT_CHECKPOINT_SECONDS must be between"):
        Settings.from_env({"HMD_AUDIT_CHECKPOINT_SECONDS": "0"})


def test_a_bad_syslog_address_fails_the_build_not_the_first_operation(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        audit_sinks=(ForwardSink.SYSLOG,),
        audit_syslog_address="loghost",
    )
    with pytest.raises(ConfigurationError, match="HMD_AUDIT_SYSLOG_ADDRESS"):
        build(settings)


def test_in_production_the_sinks_come_from_the_config_file_only(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    config = etc / "heimdall.toml"
    config.write_text(
        'env = "production"\nrole = "heimdall-app"\naudit_sinks = "syslog"\n'
        'audit_syslog_address = "udp://127.0.0.1:514"\naudit_checkpoint_every = 500\n'
        f'audit_log = "{tmp_path / "audit.log"}"\n',
        encoding="utf-8",
    )
    config.chmod(0o644)

    settings = Settings.from_env({"HMD_CONFIG": str(config)})

    assert settings.audit_sinks == (ForwardSink.SYSLOG,)
    assert settings.audit_checkpoint_every == 500
    for variable, value in (
        ("HMD_AUDIT_SINKS", "stdout"),
        ("HMD_AUDIT_SINKS_REQUIRED", "false"),
        ("HMD_AUDIT_CHECKPOINT_EVERY", "1000000"),
    ):
        with pytest.raises(ConfigurationError, match=f"{variable} is set in the environment"):
            Settings.from_env({"HMD_CONFIG": str(config), variable: value})
