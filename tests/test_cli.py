"""The ``heimdall`` console script, run as a subprocess exactly as a user runs it.

Every test gets its own HMD_DATA_DIR under tmp_path and an environment without the caller's
HMD_* variables, so nothing here reads or writes a real keyring.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import re
import select
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cli_runner import (
    ANSI,
    HEIMDALL,
    PEOPLE_FILE,
    REPO,
    TIMEOUT,
    Cli,
    assert_one_line_error,
    clean_environ,
    nonempty_lines,
)

pytestmark = pytest.mark.skipif(HEIMDALL is None, reason="the heimdall console script is missing")

# Three people, nine encrypted fields (name, email, phone); country is kept in the clear.
RECORDS: list[dict[str, Any]] = [
    {
        "id": "p-1",
        "source": "crm",
        "name": "Ann Smith",
        "email": "Ann.Smith@Example.com",
        "phone": "+1 808 555 0130",
        "country": "US",
    },
    {
        "id": "p-2",
        "source": "crm",
        "name": "Bo Lind",
        "email": "bo@example.org",
        "phone": "404-555-0175",
        "country": "SE",
    },
    {
        "id": "p-3",
        "source": "web",
        "name": "Cy Dunmore",
        "email": "cy@example.net",
        "phone": "+15125550106",
        "country": "FR",
    },
]
RECORD_FIELDS = 9


def field_counts(status: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(encryption_version, key_version, count) rows of ``status --json``."""
    return [(c["encryption_version"], c["key_version"], c["count"]) for c in status["fields"]]


# -- the main job ---------------------------------------------------------------------------


def test_full_flow_ingest_lookup_decrypt_rotate_reencrypt_audit(cli: Cli) -> None:
    people = cli.write_records("people.jsonl", RECORDS)

    summary = cli.ok("ingest", str(people))
    assert "ingested 3 records" in summary
    assert "0 lines rejected" in summary

    status = cli.json("status")
    assert status["latest_version"] == 1
    assert status["total"] == RECORD_FIELDS
    assert field_counts(status) == [("kms_v1", 1, RECORD_FIELDS)]

    key = cli.canonical_key("email", "ann.smith@example.com")
    assert key.startswith("email:")
    assert cli.canonical_key("email", "  ANN.SMITH@example.COM ") == key  # normalised index
    human = cli.ok("lookup", "email", "ann.smith@example.com")
    assert key in human

    # The stored value is exactly what was ingested, not its normalised form.
    assert cli.ok("decrypt", key, "--reason", "support:ticket-1") == "Ann.Smith@Example.com\n"

    assert "version 2" in cli.ok("keys", "rotate")
    keys = cli.json("keys", "show")
    assert keys["latest_version"] == 2
    assert [v["version"] for v in keys["versions"]] == [1, 2]
    assert all(v["state"] == "active" for v in keys["versions"])
    assert "heimdall-pii-v2" in cli.ok("keys", "show")

    reencrypted = cli.ok("reencrypt")
    assert "reencrypt to version 2" in reencrypted
    assert "0 failed" in reencrypted
    assert field_counts(cli.json("status")) == [("kms_v1", 2, RECORD_FIELDS)]
    assert cli.ok("decrypt", key, "--reason", "support:ticket-2") == "Ann.Smith@Example.com\n"

    tail = nonempty_lines(cli.ok("audit", "tail", "-n", "3"))
    assert len(tail) == 3
    events = [json.loads(line) for line in tail]
    assert all({"event_type", "actor", "hash"} <= set(event) for event in events)
    # The command's closing audit checkpoint follows its events.
    assert events[-1]["event_type"] == "audit.checkpoint"
    assert events[-2]["event_type"] == "crypto.decrypt"
    assert events[-2]["reason"] == "support:ticket-2"
    assert "Ann.Smith" not in cli.data_dir.joinpath("audit.log").read_text(encoding="utf-8")

    assert "audit trail intact" in cli.ok("audit", "verify")


def test_ingest_reports_bad_lines_by_number_and_stores_the_rest(cli: Cli) -> None:
    people = cli.write_jsonl(
        "mixed.jsonl",
        [
            '{"id": "r1", "email": "a@example.com"}',
            '{"id": "r2", "email": "b@example.com"}',
            '{"id": "r3", "email": ',
            '{"id": "r4", "email": "d@example.com"}',
            '{"id": "r5", "email": "no-at-sign.example.com"}',
            '{"id": "r6", "email": "f@example.com"}',
        ],
    )

    result = cli.run("ingest", str(people))

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "line 3" in result.stderr
    assert "line 5" in result.stderr
    assert "no-at-sign" not in result.stderr  # the rejected value is PII: never echoed
    assert "ingested 4 records" in result.stdout
    assert "2 lines rejected" in result.stdout
    assert field_counts(cli.json("status")) == [("kms_v1", 1, 4)]
    assert cli.json("lookup", "email", "f@example.com")["found"] is True
    assert cli.json("lookup", "email", "d@example.com")["found"] is True


def test_data_dir_holds_a_private_keyring_database_and_audit_log(cli: Cli) -> None:
    cli.ok("ingest", str(cli.write_records("people.jsonl", RECORDS[:1])))

    names = {path.name for path in cli.data_dir.iterdir()}
    assert {"keyring.json", "heimdall.db", "audit.log"} <= names
    for name in ("keyring.json", "heimdall.db", "audit.log"):
        mode = stat.S_IMODE(cli.data_dir.joinpath(name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {mode:04o}"
    assert stat.S_IMODE(cli.data_dir.stat().st_mode) & 0o077 == 0
    # Nothing is written outside the data dir.
    assert {path.name for path in cli.cwd.iterdir()} == {"data", "people.jsonl"}


def test_group_readable_keyring_is_refused_with_the_chmod_fix(cli: Cli) -> None:
    cli.ok("keys", "show")
    keyring = cli.data_dir / "keyring.json"
    keyring.chmod(0o644)

    message = assert_one_line_error(cli.run("status"))

    assert "chmod 600" in message
    assert str(keyring) in message


def test_set_min_decryption_version_is_refused_while_fields_depend_on_older_versions(
    cli: Cli,
) -> None:
    cli.ok("ingest", str(cli.write_records("people.jsonl", RECORDS[:1])))
    fields = cli.json("status")["total"]
    key = cli.canonical_key("email", "ann.smith@example.com")
    cli.ok("keys", "rotate")

    message = assert_one_line_error(cli.run("keys", "set-min-decryption-version", "2"))

    # The wrapped blind-index key depends on version 1 too, and is named beside the fields.
    assert re.search(rf"\b{fields} stored fields and the blind-index key\b", message), message
    assert "--force" in message

    forced = cli.ok("keys", "set-min-decryption-version", "2", "--force")
    assert "min_decryption_version is now 2" in forced
    assert cli.json("keys", "show")["min_decryption_version"] == 2

    message = assert_one_line_error(cli.run("decrypt", key, "--reason", "support:ticket-3"))
    assert "key version 1" in message
    assert "disabled" in message
    assert "Ann" not in message


@pytest.mark.parametrize(
    "command",
    [["status"], ["keys", "show"], ["ingest", "people.jsonl"]],
    ids=["status", "keys-show", "ingest"],
)
def test_production_on_the_local_keyring_warns_once(cli: Cli, command: list[str]) -> None:
    cli.write_records("people.jsonl", RECORDS)
    config = cli.cwd / "heimdall.toml"
    config.write_text(
        'env = "production"\nrole = "heimdall-app"\naudit_fsync = false\n'
        f'audit_log = "{cli.data_dir / "audit.log"}"\n',
        encoding="utf-8",
    )

    # In production the audit settings come from the config file only (empty = unset).
    result = cli.run(*command, env={"HMD_CONFIG": str(config), "HMD_AUDIT_FSYNC": ""})

    assert result.returncode == 0, result
    lines = nonempty_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "local keyring" in lines[0]
    assert lines[0].startswith("warning:")


def test_development_prints_no_warning(cli: Cli) -> None:
    result = cli.run("status")

    assert result.returncode == 0
    assert result.stderr == ""


# -- the progress bar -----------------------------------------------------------------------


def _many_records(count: int) -> list[dict[str, Any]]:
    return [{"id": f"m-{n}", "email": f"user{n}@example.com"} for n in range(count)]


def test_progress_bar_is_not_drawn_when_stderr_is_not_a_terminal(cli: Cli) -> None:
    people = cli.write_records("many.jsonl", _many_records(40))

    result = cli.run("ingest", str(people), "--batch-size", "5")

    assert result.returncode == 0, result
    assert result.stderr == ""
    assert not ANSI.search(result.stdout)
    assert nonempty_lines(result.stdout) == [nonempty_lines(result.stdout)[0]]
    assert result.stdout.startswith("ingested 40 records")


def _run_with_terminal_stderr(cli: Cli, *args: str) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal; (exit status, stdout, terminal output)."""
    assert HEIMDALL is not None
    main_fd, terminal_fd = pty.openpty()
    try:
        process = subprocess.Popen(
            [HEIMDALL, *args],
            cwd=cli.cwd,
            env=cli.env,
            stdout=subprocess.PIPE,
            stderr=terminal_fd,
            stdin=subprocess.DEVNULL,
        )
        os.close(terminal_fd)
        chunks: list[bytes] = []
        while True:
            ready, _, _ = select.select([main_fd], [], [], TIMEOUT)
            if not ready:
                process.kill()
                raise AssertionError("no output from the terminal for too long")
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.stdout is not None
        stdout = process.stdout.read().decode()
        process.stdout.close()
        status = process.wait(timeout=TIMEOUT)
    finally:
        os.close(main_fd)
    return status, stdout, b"".join(chunks).decode(errors="replace")


def test_progress_bar_is_drawn_when_stderr_is_a_terminal(cli: Cli) -> None:
    people = cli.write_records("many.jsonl", _many_records(40))

    status, stdout, terminal = _run_with_terminal_stderr(
        cli, "ingest", str(people), "--batch-size", "5"
    )

    assert status == 0
    assert "ingest" in terminal
    assert "40/40" in terminal
    assert stdout.startswith("ingested 40 records")


# -- bad input: one line, "error:", non-zero, no traceback, no secret ------------------------

SECRET_NOT_BASE64 = "hunter2-is-my-master-key!"
SECRET_WRONG_SIZE = base64.b64encode(b"sixteen-byte-key").decode()
SECRET_IN_CONFIG = base64.b64encode(b"k" * 32).decode()


@dataclass(frozen=True)
class BadInput:
    args: tuple[str, ...]
    env: Mapping[str, str]
    expected: str  # a fragment the error line must contain
    secret: str | None = None  # a value the error line must not contain


Setup = Callable[[Cli], BadInput]


def _unknown_policy_action(cli: Cli) -> BadInput:
    policy = cli.cwd / "policy.toml"
    policy.write_text('[fields.email]\naction = "scramble"\n', encoding="utf-8")
    return BadInput(("status",), {"HMD_POLICY": str(policy)}, "unknown action 'scramble'")


def _missing_policy_file(cli: Cli) -> BadInput:
    return BadInput(("status",), {"HMD_POLICY": str(cli.cwd / "absent.toml")}, "not found")


def _missing_keyring_with_stored_fields(cli: Cli) -> BadInput:
    cli.ok("ingest", str(cli.write_records("people.jsonl", RECORDS[:1])))
    (cli.data_dir / "keyring.json").unlink()
    return BadInput(("status",), {}, "does not exist")


def _damaged_keyring(cli: Cli) -> BadInput:
    keyring = cli.cwd / "keyring.json"
    keyring.write_text("{not json", encoding="utf-8")
    keyring.chmod(0o600)
    return BadInput(("status",), {"HMD_KEYRING_PATH": str(keyring)}, "not valid JSON")


def _unreadable_keyring(cli: Cli) -> BadInput:
    keyring = cli.cwd / "keyring-dir"
    keyring.mkdir(mode=0o700)
    return BadInput(("status",), {"HMD_KEYRING_PATH": str(keyring)}, "is a directory")


def _keyring_under_a_file(cli: Cli) -> BadInput:
    blocker = cli.cwd / "a-file"
    blocker.write_text("", encoding="utf-8")
    return BadInput(("status",), {"HMD_KEYRING_PATH": str(blocker / "keyring.json")}, "keyring")


def _group_readable_keyring(cli: Cli) -> BadInput:
    cli.ok("keys", "show")
    (cli.data_dir / "keyring.json").chmod(0o640)
    return BadInput(("status",), {}, "chmod 600")


def _master_key_not_base64(cli: Cli) -> BadInput:
    env = {"HMD_MASTER_KEY": SECRET_NOT_BASE64, "HMD_ENCRYPTION_MODE": "hybrid"}
    return BadInput(("status",), env, "HMD_MASTER_KEY", SECRET_NOT_BASE64)


def _master_key_wrong_size(cli: Cli) -> BadInput:
    env = {"HMD_MASTER_KEY": SECRET_WRONG_SIZE, "HMD_ENCRYPTION_MODE": "legacy"}
    return BadInput(("status",), env, "32 bytes", SECRET_WRONG_SIZE)


def _master_key_in_config_file(cli: Cli) -> BadInput:
    config = cli.cwd / "heimdall.toml"
    config.write_text(f'master_key = "{SECRET_IN_CONFIG}"\n', encoding="utf-8")
    return BadInput(("status",), {"HMD_CONFIG": str(config)}, "master_key", SECRET_IN_CONFIG)


def _hybrid_without_master_key(cli: Cli) -> BadInput:
    return BadInput(("status",), {"HMD_ENCRYPTION_MODE": "hybrid"}, "HMD_MASTER_KEY")


def _unknown_canonical_key(cli: Cli) -> BadInput:
    cli.ok("ingest", str(cli.write_records("people.jsonl", RECORDS[:1])))
    key = "email:hash:" + "0" * 64
    return BadInput(("decrypt", key, "--reason", "support:ticket-9"), {}, "no field")


def _unknown_encryption_mode(cli: Cli) -> BadInput:
    return BadInput(("status",), {"HMD_ENCRYPTION_MODE": "rot13"}, "HMD_ENCRYPTION_MODE")


def _unknown_role(cli: Cli) -> BadInput:
    return BadInput(("status",), {"HMD_ROLE": "heimdall-root"}, "HMD_ROLE")


def _unavailable_kms_provider(cli: Cli) -> BadInput:
    return BadInput(("status",), {"HMD_KMS_PROVIDER": "gcp"}, "HMD_KMS_PROVIDER")


def _vault_without_address(cli: Cli) -> BadInput:
    return BadInput(("status",), {"HMD_KMS_PROVIDER": "vault"}, "HMD_VAULT_ADDR")


def _missing_reason(cli: Cli) -> BadInput:
    return BadInput(("decrypt", "email:hash:00"), {}, "--reason")


def _blank_reason(cli: Cli) -> BadInput:
    return BadInput(("decrypt", "email:hash:00", "--reason", " "), {}, "reason")


def _unknown_option(cli: Cli) -> BadInput:
    return BadInput(("status", "--jsn"), {}, "--jsn")


def _nonexistent_input_file(cli: Cli) -> BadInput:
    return BadInput(("ingest", str(cli.cwd / "absent.jsonl")), {}, "absent.jsonl")


def _directory_as_input_file(cli: Cli) -> BadInput:
    folder = cli.cwd / "folder.jsonl"
    folder.mkdir()
    return BadInput(("ingest", str(folder)), {}, "folder.jsonl")


BAD_INPUTS: dict[str, Setup] = {
    "unknown-policy-action": _unknown_policy_action,
    "missing-policy-file": _missing_policy_file,
    "missing-keyring-with-stored-fields": _missing_keyring_with_stored_fields,
    "damaged-keyring": _damaged_keyring,
    "unreadable-keyring": _unreadable_keyring,
    "keyring-under-a-file": _keyring_under_a_file,
    "group-readable-keyring": _group_readable_keyring,
    "master-key-not-base64": _master_key_not_base64,
    "master-key-wrong-size": _master_key_wrong_size,
    "master-key-in-config-file": _master_key_in_config_file,
    "hybrid-without-master-key": _hybrid_without_master_key,
    "unknown-canonical-key": _unknown_canonical_key,
    "unknown-encryption-mode": _unknown_encryption_mode,
    "unknown-role": _unknown_role,
    "unavailable-kms-provider": _unavailable_kms_provider,
    "vault-without-address": _vault_without_address,
    "missing-reason": _missing_reason,
    "blank-reason": _blank_reason,
    "unknown-option": _unknown_option,
    "nonexistent-input-file": _nonexistent_input_file,
    "directory-as-input-file": _directory_as_input_file,
}


@pytest.mark.parametrize("setup", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_error_line_without_traceback_or_secret(cli: Cli, setup: Setup) -> None:
    case = setup(cli)

    message = assert_one_line_error(cli.run(*case.args, env=case.env))

    assert case.expected in message
    if case.secret is not None:
        assert case.secret not in message


def test_keyring_path_that_is_a_directory_is_reported_as_one(cli: Cli) -> None:
    keyring = cli.cwd / "keyring-dir"
    keyring.mkdir(mode=0o755)
    keyring.chmod(0o755)

    message = assert_one_line_error(cli.run("status", env={"HMD_KEYRING_PATH": str(keyring)}))

    assert "directory" in message
    assert "chmod" not in message


def test_missing_keyring_is_not_silently_replaced(cli: Cli) -> None:
    cli.ok("ingest", str(cli.write_records("people.jsonl", RECORDS[:1])))
    keyring = cli.data_dir / "keyring.json"
    keyring.unlink()

    assert_one_line_error(cli.run("ingest", str(cli.cwd / "people.jsonl")))

    assert not keyring.exists()


def test_help_is_printed_for_no_command_and_for_help(cli: Cli) -> None:
    assert "ingest" in cli.ok("--help")
    no_command = cli.run("keys")
    assert "rotate" in no_command.stdout
    assert "Traceback" not in no_command.stderr


# -- make demo --------------------------------------------------------------------------------


def _demo_env(data_dir: Path) -> dict[str, str]:
    env = clean_environ()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HMD_DATA_DIR"] = str(data_dir)
    env["HMD_AUDIT_FSYNC"] = "false"
    return env


def test_demo_script_runs_the_tour_in_its_own_data_dir(tmp_path: Path) -> None:
    first_email = json.loads(PEOPLE_FILE.read_text(encoding="utf-8").splitlines()[0])["email"]
    data_dir = tmp_path / "demo"
    outside_keyring = tmp_path / "outside" / "keyring.json"
    env = _demo_env(data_dir)
    # Settings a caller may have exported; the tour must not follow them to real data.
    env["HMD_KEYRING_PATH"] = str(outside_keyring)
    env["HMD_ROLE"] = "heimdall-audit"

    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert first_email in result.stdout.splitlines()  # the decrypted value, on its own line
    assert "audit trail intact" in result.stdout
    assert (data_dir / "keyring.json").exists()
    assert not outside_keyring.exists()


def test_demo_script_refuses_to_wipe_a_data_dir_it_did_not_make(tmp_path: Path) -> None:
    data_dir = tmp_path / "real"
    data_dir.mkdir()
    keyring = data_dir / "keyring.json"
    keyring.write_text("precious", encoding="utf-8")

    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        env=_demo_env(data_dir),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )

    assert result.returncode != 0
    assert nonempty_lines(result.stderr)[0].startswith("error:")
    assert keyring.read_text(encoding="utf-8") == "precious"
