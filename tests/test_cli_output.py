"""What the CLI prints: stored values exactly to a program, and nothing that drives a terminal.

A decrypted value goes to a pipe as its exact bytes (no emoji codes replaced, no tabs expanded,
no control character dropped); on a terminal every control character is shown escaped unless
``--raw``. The same for the other commands that print stored or user-supplied text.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess

import pytest

from cli_runner import HEIMDALL, TIMEOUT, Cli, assert_one_line_error
from heimdall.cli.output import SafeConsole, terminal_safe, write_json, write_value

pytestmark = pytest.mark.skipif(HEIMDALL is None, reason="the heimdall console script is missing")

# Everything a value can hold that Rich or a terminal would change: an emoji code, a tab, BEL,
# a CSI colour, an OSC title change, a C1 CSI, a right-to-left override, a backslash, inner
# spaces and text that is not ASCII (ingest strips surrounding whitespace).
NASTY = "Ann :smile: \t\x07\x1b[31mred\x1b]0;owned\x07\x9b2J \u202eevil\\path  é\u4e2d"
ESCAPED = "Ann :smile: \\t\\x07\\x1b[31mred\\x1b]0;owned\\x07\\x9b2J \\u202eevil\\\\path  é\u4e2d"


def _store_nasty(cli: Cli) -> str:
    people = cli.write_records("nasty.jsonl", [{"id": "n-1", "name": NASTY}])
    cli.ok("ingest", str(people))
    result = cli.run("lookup", "name", "-", "--json", input_text=NASTY)
    assert result.returncode == 0, result
    key = json.loads(result.stdout)["canonical_key"]
    assert isinstance(key, str)
    return key


def _run_on_terminal(cli: Cli, *args: str) -> tuple[int, bytes]:
    """Run with stdout on a pseudo-terminal; (exit status, what the terminal received)."""
    assert HEIMDALL is not None
    main_fd, terminal_fd = pty.openpty()
    try:
        process = subprocess.Popen(
            [HEIMDALL, *args],
            cwd=cli.cwd,
            env=cli.env,
            stdout=terminal_fd,
            stderr=subprocess.DEVNULL,
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
        status = process.wait(timeout=TIMEOUT)
    finally:
        os.close(main_fd)
    # The terminal turns "\n" into "\r\n" on output.
    return status, b"".join(chunks).replace(b"\r\n", b"\n")


def test_decrypt_writes_the_exact_bytes_to_a_program(cli: Cli) -> None:
    key = _store_nasty(cli)
    result = subprocess.run(
        [str(HEIMDALL), "decrypt", key, "--reason", "test:exact"],
        cwd=cli.cwd,
        env=cli.env,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result
    assert result.stdout == NASTY.encode() + b"\n"


def test_decrypt_on_a_terminal_shows_control_characters_escaped(cli: Cli) -> None:
    key = _store_nasty(cli)
    status, shown = _run_on_terminal(cli, "decrypt", key, "--reason", "test:terminal")
    assert status == 0
    assert shown == ESCAPED.encode() + b"\n"
    assert b"\x1b" not in shown and b"\x07" not in shown and "\x9b".encode() not in shown


def test_decrypt_raw_on_a_terminal_prints_the_value_as_it_is(cli: Cli) -> None:
    key = _store_nasty(cli)
    status, shown = _run_on_terminal(cli, "decrypt", key, "--reason", "test:raw", "--raw")
    assert status == 0
    # The terminal driver expands nothing and drops nothing on output: the bytes arrive.
    assert shown == NASTY.encode() + b"\n"


def test_lookup_reads_the_value_from_standard_input(cli: Cli) -> None:
    key = _store_nasty(cli)
    by_argument = json.loads(cli.ok("lookup", "name", NASTY, "--json"))["canonical_key"]
    assert by_argument == key
    # One trailing newline (as `echo` adds) is not part of the value.
    piped = cli.run("lookup", "name", "-", "--json", input_text=NASTY + "\n")
    assert json.loads(piped.stdout)["canonical_key"] == key


def test_lookup_refuses_a_value_on_standard_input_that_is_not_utf8(cli: Cli) -> None:
    cli.ok("ingest", str(cli.write_records("p.jsonl", [{"id": "1", "name": "x"}])))
    result = cli.run("lookup", "name", "-", input_bytes=b"\xff\xfe")
    assert assert_one_line_error(result) == "error: the value on standard input is not UTF-8 text"


def test_json_output_on_a_terminal_has_no_raw_control_character(cli: Cli) -> None:
    key = _store_nasty(cli)
    status, shown = _run_on_terminal(cli, "lookup", "name", NASTY, "--json")
    assert status == 0
    assert json.loads(shown)["canonical_key"] == key
    assert all(byte < 0x80 and (byte >= 0x20 or byte == 0x0A) for byte in shown)


def test_messages_never_turn_emoji_codes_or_markup_into_something_else(cli: Cli) -> None:
    result = cli.run("lookup", ":smile:[bold]x[/bold]\x1b]0;t\x07", "v")
    line = assert_one_line_error(result)
    assert ":smile:[bold]x[/bold]" in line
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr


def test_terminal_safe_escapes_every_control_character_and_nothing_else() -> None:
    controls = "".join(chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)])
    escaped = terminal_safe(controls + "\u2066\u2028")
    assert all(0x20 <= ord(char) < 0x7F for char in escaped)
    assert terminal_safe("plain é 中 :smile: [b]") == "plain é 中 :smile: [b]"
    assert terminal_safe("a\\x1b") == "a\\\\x1b"  # a backslash stays unambiguous


def test_safe_console_and_writers_on_text_streams() -> None:
    stream = io.StringIO()
    SafeConsole(file=stream).print("x :smile: \x1b[2J [red]y[/red]")
    assert stream.getvalue() == "x :smile: \\x1b[2J [red]y[/red]\n"
    stream = io.StringIO()
    write_value(NASTY, stream=stream)
    assert stream.getvalue() == NASTY + "\n"
    stream = io.StringIO()
    write_json({"v": NASTY}, stream=stream)
    assert json.loads(stream.getvalue()) == {"v": NASTY}


def test_audit_tail_is_exact_json_for_a_program_and_ascii_json_on_a_terminal(cli: Cli) -> None:
    actor = 'ops:"eve"\\x \x9b2J \u202e :smile: é'
    cli.ok("status", "--actor", actor)
    cli.ok("keys", "rotate", "--actor", actor)
    piped = cli.run("audit", "tail", "-n", "5")
    records = [json.loads(line) for line in piped.stdout.splitlines()]
    rotations = [r for r in records if r["event_type"] == "key.rotate"]
    assert [r["actor"] for r in rotations] == [actor]
    stored = (cli.data_dir / "audit.log").read_bytes().splitlines()
    assert piped.stdout.encode().splitlines() == stored[-len(records) :]

    status, shown = _run_on_terminal(cli, "audit", "tail", "-n", "5")
    assert status == 0
    assert all(byte < 0x80 and (byte >= 0x20 or byte == 0x0A) for byte in shown)
    assert [json.loads(line) for line in shown.splitlines()] == records


def test_a_role_refused_the_audit_trail_is_audited(cli: Cli) -> None:
    cli.ok("keys", "rotate")
    line = assert_one_line_error(cli.run("audit", "tail", env={"HMD_ROLE": "heimdall-worker"}))
    assert "may not read the audit trail" in line
    events = [json.loads(x) for x in (cli.data_dir / "audit.log").read_text().splitlines()]
    denied = [e for e in events if e["event_type"] == "access.denied"]
    assert [(e["operation"], e["result"]) for e in denied] == [("read_audit", "denied")]


def test_the_stdout_audit_sink_never_mixes_into_a_commands_own_output(cli: Cli) -> None:
    key = _store_nasty(cli)
    sinks = {"HMD_AUDIT_SINKS": "stdout"}
    result = subprocess.run(
        [str(HEIMDALL), "decrypt", key, "--reason", "test:sink"],
        cwd=cli.cwd,
        env={**cli.env, **sinks},
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result
    assert result.stdout == NASTY.encode() + b"\n"
    forwarded = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["event_type"] for e in forwarded][:1] == ["crypto.decrypt"]


def test_audit_tail_reports_a_line_that_is_not_json_in_one_line(cli: Cli) -> None:
    cli.ok("keys", "rotate")
    with (cli.data_dir / "audit.log").open("ab") as handle:
        handle.write(b"not json\n")
    line = assert_one_line_error(cli.run("audit", "tail"))
    assert "holds a line that is not a JSON record" in line


def test_a_message_shows_a_reprs_escape_once(cli: Cli) -> None:
    line = assert_one_line_error(cli.run("lookup", "na\x1bme", "v"))
    assert "'na\\x1bme'" in line  # the repr's own escape, not doubled


def test_tables_show_text_from_the_keyring_escaped(cli: Cli) -> None:
    cli.ok("status")
    keyring = cli.data_dir / "keyring.json"
    doc = json.loads(keyring.read_text())
    doc["versions"][0]["created_at"] = "2026\x1b]0;owned\x07 :smile: [bold]x"
    keyring.write_text(json.dumps(doc))
    keyring.chmod(0o600)
    shown = cli.ok("keys", "show")
    assert "\x1b" not in shown and "\x07" not in shown
    assert "2026\\x1b]0;owned\\x07 :smile: [bold]x" in shown


def test_an_actor_that_is_not_utf8_is_one_line_error(cli: Cli) -> None:
    for run in (
        cli.run("status", "--actor", "ops:a\udcffb"),  # the bytes a\xffb on the command line
        cli.run("status", env={"HMD_ACTOR": "ops:a\udcffb"}),
    ):
        line = assert_one_line_error(run)
        assert "actor" in line and "not valid UTF-8" in line
