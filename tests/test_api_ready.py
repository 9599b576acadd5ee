"""``/readyz`` of a real ``heimdall serve`` and its audit trail: while an append would be refused
(lines past what the head record vouches for, left by an append that did not finish), the
server is not ready; once the trail is repaired, it is again.
"""

from __future__ import annotations

from pathlib import Path

from api_server import start_server
from heimdall.rbac import Role


def test_readiness_turns_503_while_the_audit_trail_refuses_appends(tmp_path: Path) -> None:
    server = start_server(tmp_path, {})
    try:
        token = server.service_token(Role.AUDIT.value, "reader")
        with server.client(token) as client:
            assert client.get("/readyz").json()["checks"]["audit"] == "ok"
            with server.audit_log.open("ab") as log:
                log.write(b'{"event_type":"crypto.decrypt","torn')  # an append cut short
            refused = client.get("/readyz")
            assert refused.status_code == 503
            assert refused.json()["checks"] == {
                "store": "ok",
                "kms": "ok",
                "audit": "audit_unavailable",
            }
            repaired = server.cli("audit", "verify", "--repair-torn-tail")
            assert repaired.returncode == 0, repaired.stderr
            assert client.get("/readyz").status_code == 200
    finally:
        server.stop()
