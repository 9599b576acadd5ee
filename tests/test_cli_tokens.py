"""``heimdall tokens``: create (the token printed once), list, revoke; admin only, audited.

Run as a user runs it: the console script in a subprocess with its own data dir.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

import pytest

from cli_runner import HEIMDALL, Cli, assert_one_line_error
from heimdall.audit import JsonlAuditLog
from heimdall.store.sqlite import SqliteStore
from heimdall.tokens import ServiceTokens, TokenRejected, token_hash

pytestmark = pytest.mark.skipif(HEIMDALL is None, reason="the heimdall console script is missing")

TOKEN_LINE = re.compile(r"hmd_[A-Za-z0-9_-]{43}\n")
ADMIN = {"HMD_ROLE": "heimdall-admin"}


def create(cli: Cli, name: str, *args: str) -> str:
    """The token `tokens create` prints for *name*."""
    result = cli.run("tokens", "create", "--role", "heimdall-worker", "--name", name, *args)
    assert result.returncode == 0, result
    assert TOKEN_LINE.fullmatch(result.stdout), result.stdout  # the token alone, on one line
    return result.stdout.strip()


def data_files(cli: Cli) -> bytes:
    """Every file in the data dir: database (and its log), keyring, audit trail."""
    return b"".join(p.read_bytes() for p in sorted(cli.data_dir.iterdir()) if p.is_file())


def audit_records(cli: Cli) -> list[dict[str, object]]:
    return list(JsonlAuditLog(cli.data_dir / "audit.log"))


def test_create_prints_the_token_once_and_keeps_only_its_hash(cli: Cli) -> None:
    result = cli.run(
        "tokens", "create", "--role", "heimdall-worker", "--name", "enrich-1", "--expires", "30d"
    )

    assert result.returncode == 0, result
    assert TOKEN_LINE.fullmatch(result.stdout)
    token = result.stdout.strip()
    assert token not in result.stderr
    assert "enrich-1" in result.stderr and "heimdall-worker" in result.stderr
    assert "shown only now" in result.stderr
    # Nowhere on disk: not in the database, its write-ahead log, the keyring or the trail.
    stored = data_files(cli)
    assert token.encode() not in stored
    assert token_hash(token).encode() in stored
    # Nor in what the other commands print.
    listed = cli.run("tokens", "list")
    as_json = cli.ok("tokens", "list", "--json")
    for shown in (listed.stdout + listed.stderr, as_json):
        assert token not in shown and token_hash(token) not in shown
    [entry] = json.loads(as_json)
    assert (entry["name"], entry["role"], entry["state"]) == (
        "enrich-1",
        "heimdall-worker",
        "active",
    )
    created = datetime.fromisoformat(entry["created_at"])
    assert datetime.fromisoformat(entry["expires_at"]) - created == timedelta(days=30)
    assert entry["revoked_at"] is None
    assert "enrich-1" in listed.stdout and "state=active" in listed.stdout

    [event] = [r for r in audit_records(cli) if r["event_type"] == "token.create"]
    assert (event["token_name"], event["role"], event["result"]) == (
        "enrich-1",
        "heimdall-worker",
        "success",
    )


def test_a_revocation_by_the_command_is_refused_at_once_by_a_store_already_open(
    cli: Cli,
) -> None:
    token = create(cli, "enrich-1")
    store = SqliteStore(cli.data_dir / "heimdall.db")  # another process's view, opened first
    try:
        tokens = ServiceTokens(store)
        assert tokens.authenticate(token).name == "enrich-1"

        output = cli.ok("tokens", "revoke", "enrich-1")

        with pytest.raises(TokenRejected) as refused:
            tokens.authenticate(token)
    finally:
        store.close()
    assert refused.value.reason == "revoked"
    assert "enrich-1" in output and "revoked" in output
    [entry] = json.loads(cli.ok("tokens", "list", "--json"))
    assert entry["state"] == "revoked" and entry["revoked_at"] is not None
    [event] = [r for r in audit_records(cli) if r["event_type"] == "token.revoke"]
    assert (event["token_name"], event["result"]) == ("enrich-1", "success")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ("create", "--role", "heimdall-root", "--name", "x"), "heimdall-worker", id="bad-role"
        ),
        pytest.param(
            ("create", "--role", "heimdall-app", "--name", "x", "--expires", "0d"),
            "positive",
            id="zero-lifetime",
        ),
        pytest.param(
            ("create", "--role", "heimdall-app", "--name", "x", "--expires", "30"),
            "30d, 12h or 90m",
            id="lifetime-without-unit",
        ),
        pytest.param(
            ("create", "--role", "heimdall-app", "--name", "x", "--expires", "-1h"),
            "positive",
            id="negative-lifetime",
        ),
        pytest.param(
            ("create", "--role", "heimdall-app", "--name", "bad name"), "token name", id="bad-name"
        ),
        pytest.param(("revoke", "nobody"), "no service token is named nobody", id="unknown"),
    ],
)
def test_bad_input_is_one_line_error_and_creates_nothing(
    cli: Cli, args: tuple[str, ...], expected: str
) -> None:
    line = assert_one_line_error(cli.run("tokens", *args))

    assert expected in line
    assert cli.run("tokens", "list", "--json").stdout.strip() == "[]"


def test_a_taken_name_or_a_token_typed_as_a_name_is_one_line_error(cli: Cli) -> None:
    token = create(cli, "enrich-1")

    taken = assert_one_line_error(
        cli.run("tokens", "create", "--role", "heimdall-admin", "--name", "enrich-1")
    )
    typed = cli.run("tokens", "revoke", token)
    pasted = cli.run("tokens", "create", "--role", "heimdall-app", "--name", token)

    assert "enrich-1 exists already" in taken
    for result in (typed, pasted):
        assert token not in assert_one_line_error(result)
        assert token not in result.stdout
    assert token.encode() not in data_files(cli)
    [entry] = json.loads(cli.ok("tokens", "list", "--json"))
    assert (entry["role"], entry["state"]) == ("heimdall-worker", "active")


@pytest.mark.parametrize("role", ["heimdall-worker", "heimdall-audit"])  # all three: test_tokens
def test_every_tokens_command_needs_the_admin_role_and_refusals_are_audited(
    cli: Cli, role: str
) -> None:
    create(cli, "existing")
    refused = {"HMD_ROLE": role}

    for args in (
        ("create", "--role", "heimdall-admin", "--name", "mine"),
        ("list",),
        ("revoke", "existing"),
    ):
        result = cli.run("tokens", *args, env=refused)
        line = assert_one_line_error(result)
        assert line == f"error: role {role} may not manage service tokens (heimdall-admin may)"
        assert result.stdout == ""

    denials = [r for r in audit_records(cli) if r["event_type"] == "access.denied"]
    assert [d["operation"] for d in denials] == ["token.create", "token.list", "token.revoke"]
    [entry] = json.loads(cli.ok("tokens", "list", "--json", env=ADMIN))
    assert (entry["name"], entry["state"]) == ("existing", "active")


def test_the_admin_role_may_create_list_and_revoke(cli: Cli) -> None:
    token = cli.ok(
        "tokens",
        "create",
        "--role",
        "heimdall-app",
        "--name",
        "api-1",
        "--expires",
        "90m",
        env=ADMIN,
    ).strip()
    cli.ok("tokens", "revoke", "api-1", env=ADMIN)

    [entry] = json.loads(cli.ok("tokens", "list", "--json", env=ADMIN))
    assert (entry["name"], entry["role"], entry["state"]) == ("api-1", "heimdall-app", "revoked")
    created = datetime.fromisoformat(entry["created_at"])
    assert datetime.fromisoformat(entry["expires_at"]) - created == timedelta(minutes=90)
    assert token.encode() not in data_files(cli)
