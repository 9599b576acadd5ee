"""A full disk or a crash in the middle of an append never leaves the audit trail broken.

A failed append leaves the log and its head exactly as they were, and the next append works
once the cause is gone. The disk is filled for real: a child process runs with a file size limit
(RLIMIT_FSIZE, SIGXFSZ ignored), so write() comes back short and then fails with EFBIG exactly
as on a full disk. A crash is a child that SIGKILLs itself at a chosen point of an append.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from audit_tools import CountingKey, records, sample_events, write_events
from heimdall.audit import JsonlAuditLog, head
from heimdall.audit.scan import UNVOUCHED_TAIL
from heimdall.errors import AuditError
from heimdall.kms.local import LocalKeyring
from heimdall.rbac import Role

_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from heimdall.audit import AuditEvent, EventType, JsonlAuditLog, Result
from heimdall.errors import AuditError

path, limit, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
events = [
    AuditEvent(EventType.DECRYPT, "test:child", Result.SUCCESS, f"req-{n}", reason="r" * 100)
    for n in range(count)
]
try:
    JsonlAuditLog(path, fsync=True).write(events)
except AuditError as exc:
    print("refused:", exc)
else:
    print("written")
"""

# Kills the process at the first write (write or pwrite) to the file whose name contains
# sys.argv[2]: after writing half of it ("torn") or before writing anything ("before").
_CRASH = """
import os, signal, sys
from pathlib import Path
from heimdall.audit import AuditEvent, EventType, JsonlAuditLog, Result

path, victim, how = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
real_write, real_pwrite = os.write, os.pwrite

def crash_if_victim(fd, data):
    if victim in os.readlink(f"/proc/self/fd/{fd}"):
        if how == "torn":
            real_write(fd, bytes(data)[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

def crashing_write(fd, data):
    crash_if_victim(fd, data)
    return real_write(fd, data)

def crashing_pwrite(fd, data, offset):
    crash_if_victim(fd, data)
    return real_pwrite(fd, data, offset)

os.write, os.pwrite = crashing_write, crashing_pwrite
events = [AuditEvent(EventType.DECRYPT, "test:child", Result.SUCCESS, f"req-{n}") for n in range(3)]
JsonlAuditLog(path, fsync=False).write(events)
print("not killed")
"""


def _child(script: str, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _files(log: JsonlAuditLog) -> tuple[bytes, bytes]:
    return log.path.read_bytes(), log.head_path.read_bytes()


@pytest.mark.parametrize("room", [0, 100, 500], ids=["no-room", "part-of-a-line", "some-lines"])
def test_an_append_that_runs_out_of_space_leaves_the_trail_as_it_was(
    tmp_path: Path, room: int
) -> None:
    log = write_events(tmp_path / "audit.log", 5)
    before = _files(log)

    done = _child(_FULL_DISK, log.path, len(before[0]) + room, 3)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused: "), done.stdout
    assert "File too large" in done.stdout
    assert "left as it was" in done.stdout
    assert _files(log) == before
    assert log.verify().ok


def test_the_next_append_works_once_space_is_back(tmp_path: Path) -> None:
    log = write_events(tmp_path / "audit.log", 5)
    size = log.path.stat().st_size
    assert _child(_FULL_DISK, log.path, size + 100, 3).stdout.startswith("refused: ")

    log.write(sample_events(2, start=5))

    report = log.verify()
    assert (report.ok, report.events) == (True, 7)
    assert [record["count"] for record in records(log.path)] == list(range(7))


def test_a_crash_while_the_head_is_written_leaves_a_complete_head(tmp_path: Path) -> None:
    log = write_events(tmp_path / "audit.log", 5)
    head_before = log.head_path.read_bytes()
    vouched = log.path.read_bytes()

    done = _child(_CRASH, log.path, "audit.log.head", "before")

    assert done.returncode == -9, done.stdout + done.stderr
    assert log.head_path.read_bytes() == head_before
    # The three lines of the append that never committed its head are not vouched for: the
    # operation they record never completed. Nothing takes them over (a checkpoint would then
    # vouch for lines anyone could have added); the repair removes them.
    report = log.verify()
    assert (report.ok, report.problem, report.first_bad_line) == (False, UNVOUCHED_TAIL, 6)
    with pytest.raises(AuditError, match="goes on past what its head record vouches for"):
        log.write(sample_events(1, start=8))
    unvouched = len(log.path.read_bytes()) - len(vouched)
    assert log.repair_torn_tail(actor="test:operator", request_id="req-repair") == unvouched
    assert log.path.read_bytes().startswith(vouched)
    log.write(sample_events(1, start=8))
    report = log.verify()
    assert (report.ok, report.events) == (True, 7)  # five, the repair event, and the new one


def test_a_crash_in_the_middle_of_an_append_leaves_a_torn_tail_that_only_repair_clears(
    tmp_path: Path,
) -> None:
    log = write_events(tmp_path / "audit.log", 5)
    vouched = log.path.read_bytes()

    done = _child(_CRASH, log.path, "audit.log", "torn")

    assert done.returncode == -9, done.stdout + done.stderr
    torn = log.path.read_bytes()
    assert torn.startswith(vouched) and not torn.endswith(b"\n")
    with pytest.raises(AuditError, match="goes on past what its head record vouches for"):
        log.write(sample_events(1))
    assert log.path.read_bytes() == torn
    report = log.verify()
    assert (report.ok, report.torn_tail, report.first_bad_line) == (False, True, 7)

    removed = log.repair_torn_tail(actor="test:operator", request_id="req-repair")

    # Half of three lines: the whole first one goes too (its append never committed).
    assert removed == len(torn) - len(vouched)
    assert log.verify().ok
    repair = records(log.path)[-1]
    assert (repair["event_type"], repair["count"]) == ("audit.repair", removed)
    assert (repair["actor"], repair["request_id"]) == ("test:operator", "req-repair")
    log.write(sample_events(1, start=5))
    assert log.verify().ok


def test_a_torn_tail_on_a_trail_with_no_checkpoint_yet_is_repaired(tmp_path: Path) -> None:
    """Every writer killed before its first checkpoint, the last one inside an append: the
    repair must not refuse for want of a checkpoint, or the trail could never get one."""
    key = LocalKeyring(tmp_path / "keys" / "keyring.json").audit_key()
    key.sign(b"the provider holds the key")
    assert key.exists()
    log = JsonlAuditLog(
        tmp_path / "audit.log", fsync=False, key=key, checkpoint_every=1000, checkpoint_seconds=None
    )
    log.write(sample_events(5))
    assert "no keyed checkpoint" in (log.verify().problem or "")
    with log.path.open("ab") as trail:
        trail.write(b'{"event_type":"crypto.decrypt","torn')

    removed = log.repair_torn_tail(actor="test:operator", request_id="req-repair")

    assert removed == len(b'{"event_type":"crypto.decrypt","torn')
    log.close()  # the closing checkpoint covers the trail
    report = log.verify()
    assert (report.ok, report.checkpoints, report.events) == (True, 1, 6)


def _torn(lines: list[bytes]) -> list[bytes]:
    return [*lines, lines[-1][:40]]


def _damaged_middle_line(lines: list[bytes]) -> list[bytes]:
    return _torn([*lines[:2], lines[2][:30] + b"\x00" + lines[2][31:], *lines[3:]])


def _removed_line(lines: list[bytes]) -> list[bytes]:
    return _torn([*lines[:2], *lines[3:]])


def _edited_line(lines: list[bytes]) -> list[bytes]:
    return _torn([*lines[:2], lines[2].replace(b'"success"', b'"failure"'), *lines[3:]])


def _cut_inside_the_head(lines: list[bytes]) -> list[bytes]:
    return [*lines[:-1], lines[-1][:40]]


def _no_torn_line(lines: list[bytes]) -> list[bytes]:
    return lines


@pytest.mark.parametrize(
    "damage",
    [_damaged_middle_line, _removed_line, _edited_line, _cut_inside_the_head, _no_torn_line],
    ids=["damaged-line", "removed-line", "edited-line", "cut-inside-the-head", "not-torn"],
)
def test_repair_refuses_anything_but_a_torn_final_line(tmp_path: Path, damage: object) -> None:
    log = write_events(tmp_path / "audit.log", 6)
    lines = log.path.read_bytes().splitlines(keepends=True)
    assert callable(damage)
    log.path.write_bytes(b"".join(damage(lines)))
    before = _files(log)

    with pytest.raises(AuditError, match=r"damaged within what its head|nothing to repair"):
        log.repair_torn_tail(actor="test:operator", request_id="req-repair")

    assert _files(log) == before


def test_cli_repairs_a_torn_tail_as_admin_and_refuses_the_audit_role(cli: object) -> None:
    from cli_runner import Cli, assert_one_line_error  # noqa: PLC0415 - the plugin's types

    assert isinstance(cli, Cli)
    cli.ok("ingest", str(cli.write_records("people.jsonl", [{"id": "1", "email": "a@b.example"}])))
    with (cli.data_dir / "audit.log").open("ab") as handle:
        handle.write(b'{"timestamp":"2025-')

    line = assert_one_line_error(cli.run("audit", "verify"))
    assert "--repair-torn-tail" in line
    auditor = {"HMD_ROLE": Role.AUDIT.value}
    refused = assert_one_line_error(cli.run("audit", "verify", "--repair-torn-tail", env=auditor))
    assert "may not repair" in refused

    output = cli.ok("audit", "verify", "--repair-torn-tail", env={"HMD_ROLE": Role.ADMIN.value})

    assert "removed the tail of an interrupted append (19 bytes" in output
    assert "audit trail intact" in output
    kinds = [record["event_type"] for record in records(cli.data_dir / "audit.log")]
    assert kinds[-2:] == ["audit.repair", "audit.checkpoint"]  # closing checkpoints the repair


def test_a_repair_whose_checkpoint_cannot_be_signed_leaves_the_tail_in_place(
    tmp_path: Path,
) -> None:
    """The repair's own event makes a checkpoint due and the key provider refuses it: the
    tail is still there (the repair can be run again), never cut without its audit.repair."""
    key = LocalKeyring(tmp_path / "keys" / "keyring.json").audit_key()
    log = JsonlAuditLog(tmp_path / "audit.log", fsync=False, key=key, checkpoint_every=5)
    log.write(sample_events(4))  # the fifth event makes a checkpoint due
    with log.path.open("ab") as out:
        out.write(b'{"torn": ')
    before = log.path.read_bytes()
    down = CountingKey(key)
    down.down = True
    refusing = JsonlAuditLog(log.path, fsync=False, key=down, checkpoint_every=5)

    with pytest.raises(AuditError, match="could not be signed"):
        refusing.repair_torn_tail(actor="ops", request_id="req-1")

    assert log.path.read_bytes() == before
    assert log.repair_torn_tail(actor="ops", request_id="req-2") == len(b'{"torn": ')
    assert records(log.path)[-2]["event_type"] == "audit.repair"
    assert log.verify().ok


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_an_append_returns_only_once_its_head_rename_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    """A power loss must not bring an older head back under committed lines (the repair would
    then cut them): with fsync on, the directory is fsynced after the head's rename."""
    log = JsonlAuditLog(tmp_path / "audit.log", fsync=fsync)
    log.write(sample_events(1))
    steps: list[str] = []
    real_replace = os.replace

    def replace(source: object, target: object) -> None:
        steps.append(f"replace {Path(str(target)).name}")
        real_replace(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(head, "fsync_directory", lambda path: steps.append(f"fsync {path}"))

    log.write(sample_events(2))

    expected = ["replace audit.log.head"]
    if fsync:
        expected.append(f"fsync {tmp_path}")
    assert steps == expected
    assert log.verify().ok


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_once_the_head_is_replaced_keeps_the_append_it_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt: type[BaseException]
) -> None:
    """Ctrl-C just after the head record's rename: the lines stay, with the head that counts
    them, and the trail goes on (cut back, they would leave a head past the log's end)."""
    log = write_events(tmp_path / "audit.log", 3)
    rename = os.replace

    def rename_then_interrupt(source: str | Path, target: str | Path) -> None:
        rename(source, target)
        raise interrupt

    monkeypatch.setattr(os, "replace", rename_then_interrupt)  # as head.write_head calls it
    with pytest.raises(interrupt):
        log.write(sample_events(2, start=3))
    monkeypatch.undo()

    assert len(records(log.path)) == 5
    log.write(sample_events(1, start=5))
    report = log.verify()
    assert (report.ok, report.events) == (True, 6)
