"""Stopping ``heimdall serve`` by signal, on a real server process: a second Ctrl-C (uvicorn's
"force quit") while a request is still open ends the process as one Ctrl-C does, with no
traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

from api_server import LOOPBACK, ApiServer, start_server

WAIT = 15.0


def _wait_for(server: ApiServer, text: str) -> None:
    deadline = time.monotonic() + WAIT
    while text not in server.logs():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.logs()[-3000:]}"
        time.sleep(0.05)


def test_a_second_ctrl_c_during_a_request_stops_the_server_without_a_traceback(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path, {})
    port = int(server.url.rsplit(":", 1)[1])
    try:
        with socket.create_connection((LOOPBACK, port), timeout=WAIT) as open_request:
            # A request whose body never completes: the graceful shutdown waits for it.
            open_request.sendall(
                b"POST /v1/decrypt HTTP/1.1\r\nHost: heimdall\r\n"
                b"Content-Type: application/json\r\nContent-Length: 64\r\n\r\n{"
            )
            time.sleep(0.3)
            os.kill(server.proc.pid, signal.SIGINT)
            _wait_for(server, "Waiting for connections to close")
            os.kill(server.proc.pid, signal.SIGINT)  # the second Ctrl-C: force quit
            status = server.proc.wait(timeout=WAIT)
            with contextlib.suppress(OSError):
                answer = open_request.recv(4096)
                # Whatever reached the client is a JSON answer, never a plain-text error.
                assert not answer or b"application/json" in answer
    finally:
        server.stop()
    logs = server.logs()
    assert "Traceback" not in logs
    assert "CancelledError" not in logs
    assert status == 128 + signal.SIGINT, logs[-3000:]  # as every heimdall command on Ctrl-C
