"""Stopping ``heimdall serve`` by signal, on a real server process: a second Ctrl-C (uvicorn's
"force quit") while a request is still open ends the process as one Ctrl-C does, with no
traceback; SIGHUP (a closed terminal) stops it gracefully as SIGTERM does; and a SIGTERM sent
the moment the server says it is starting is not lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from api_server import LOOPBACK, ApiServer, audit_records, free_port, start_server
from cli_runner import HEIMDALL, clean_environ

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


def test_sighup_stops_the_server_gracefully_and_seals_the_trail(tmp_path: Path) -> None:
    server = start_server(tmp_path, {})
    with server.client() as anonymous:
        assert anonymous.get("/readyz").status_code == 401  # one audited refusal
    os.kill(server.proc.pid, signal.SIGHUP)
    status = server.proc.wait(timeout=WAIT)
    server.stop()
    assert status == 0, server.logs()[-3000:]
    assert "heimdall serve stopped" in server.logs()
    assert audit_records(server.audit_log)[-1]["event_type"] == "audit.checkpoint"


def test_a_sigterm_sent_as_the_server_starts_is_not_lost(tmp_path: Path) -> None:
    assert HEIMDALL is not None
    for round_ in range(3):
        env = {
            **clean_environ(),
            "HMD_DATA_DIR": str(tmp_path / "data"),
            "HMD_AUDIT_FSYNC": "false",
            "HMD_API_LISTEN": f"{LOOPBACK}:{free_port()}",
        }
        proc = subprocess.Popen(
            [HEIMDALL, "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert b"serving the heimdall API" in line, line
            proc.send_signal(signal.SIGTERM)  # before uvicorn has its own handlers
            status = proc.wait(timeout=WAIT)
            rest = proc.stderr.read().decode(errors="replace")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=WAIT)
            if proc.stderr is not None:
                proc.stderr.close()
        assert status == 0, f"round {round_}: {rest}"
        assert "heimdall serve stopped" in rest


def test_an_address_that_cannot_be_bound_is_one_line_before_any_serving_line(
    tmp_path: Path,
) -> None:
    assert HEIMDALL is not None
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        listen = f"{LOOPBACK}:{taken.getsockname()[1]}"
        env = {**clean_environ(), "HMD_DATA_DIR": str(tmp_path / "data"), "HMD_API_LISTEN": listen}
        result = subprocess.run(
            [HEIMDALL, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: HMD_API_LISTEN {listen} cannot be bound: Address already in use"
    ]
