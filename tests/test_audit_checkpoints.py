"""Keyed checkpoints: the trail cannot be rewritten by someone who cannot use the audit key.

spec: Audit and Compliance, Audit Log Requirements. The local keyring holds the audit MAC key;
the same checks run on Vault in test_audit_vault.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from api_server import start_server
from audit_tools import (
    CountingKey,
    NamedKey,
    Record,
    records,
    rewrite_trail,
    sample_events,
    without_decrypts,
    write_events,
)
from cli_runner import Cli, assert_one_line_error
from heimdall.audit import MIN_EVENTS_PER_CHECKPOINT, JsonlAuditLog
from heimdall.audit.group import Sealer
from heimdall.audit.head import read_head
from heimdall.audit.scan import recheck
from heimdall.cli.audit import _summary
from heimdall.cli.kms import _vouch_for_the_old_checkpoints
from heimdall.errors import AuditError, ConfigurationError, KmsUnavailable
from heimdall.ingest import IngestReport
from heimdall.kms.base import AuditKey
from heimdall.kms.local import LocalKeyring
from heimdall.rbac import Caller
from heimdall.service import Heimdall

ServiceFactory = Callable[..., Heimdall]
Ingest = Callable[..., IngestReport]


@pytest.fixture
def key(tmp_path: Path) -> AuditKey:
    return LocalKeyring(tmp_path / "keys" / "keyring.json").audit_key()


def _kinds(path: Path) -> list[str]:
    return [record["event_type"] for record in records(path)]


@pytest.mark.parametrize("batch", [3, 25], ids=["small-writes", "one-write-of-all"])
def test_a_checkpoint_follows_every_n_events_and_the_close(
    tmp_path: Path, key: AuditKey, batch: int
) -> None:
    log = write_events(tmp_path / "audit.log", 25, key=key, every=10, batch=batch)

    kinds = _kinds(log.path)
    assert [n for n, kind in enumerate(kinds) if kind == "audit.checkpoint"] == [10, 21]
    report = log.verify()
    assert (report.ok, report.events, report.checkpoints) == (True, 25, 2)
    assert (report.events_after_checkpoint, report.key_identifier) == (5, "local/audit")

    log.close()

    report = log.verify()
    assert (report.ok, report.checkpoints, report.events_after_checkpoint) == (True, 3, 0)
    checkpoint = records(log.path)[-1]
    assert (checkpoint["lines"], checkpoint["events"], checkpoint["every"]) == (27, 25, 10)
    assert checkpoint["mac"].startswith("hmac-sha256:v1:")


@pytest.mark.parametrize(
    ("first", "second_every", "expected"),
    [
        pytest.param((5, 6), 10, [5, 11], id="the-announced-interval-is-shorter"),
        pytest.param((20, 21), 5, [20, 26, 32], id="the-writers-own-interval-is-shorter"),
    ],
)
def test_one_write_of_many_events_keeps_the_shorter_of_both_intervals(
    tmp_path: Path, key: AuditKey, first: tuple[int, int], second_every: int, expected: list[int]
) -> None:
    """A first writer (interval, events written) announces its interval; a second writer with
    another interval then appends twelve events in one write."""
    first_every, first_count = first
    path = tmp_path / "audit.log"
    write_events(path, first_count, key=key, every=first_every, batch=first_count)
    second = JsonlAuditLog(path, fsync=False, key=key, checkpoint_every=second_every)

    second.write(sample_events(12))

    kinds = _kinds(path)
    assert [n for n, kind in enumerate(kinds) if kind == "audit.checkpoint"] == expected
    assert second.verify().ok


def test_verifying_again_asks_the_key_provider_only_about_new_checkpoints(
    tmp_path: Path, key: AuditKey
) -> None:
    counting = CountingKey(key)
    log = JsonlAuditLog(tmp_path / "audit.log", fsync=False, key=counting, checkpoint_every=10)
    log.write(sample_events(55))  # five checkpoints

    assert (log.verify().ok, log.verify().checkpoints, counting.verified) == (True, 5, 5)
    log.write(sample_events(20, start=55))  # two more
    report = log.verify()
    assert (report.ok, report.checkpoints, counting.verified) == (True, 7, 7)
    # Another process (or object) that has not verified the trail asks about every one.
    assert JsonlAuditLog(log.path, fsync=False, key=counting).verify().ok
    assert counting.verified == 14


@pytest.mark.parametrize(
    "rewrite",
    [
        pytest.param(lambda record: record.get("count") != 3, id="an-event-removed"),
        pytest.param(
            lambda record: record.update(actor="test:someone-else") or True,
            id="an-event-changed",
        ),
    ],
)
def test_a_trail_rewritten_after_a_verify_is_checked_from_scratch(
    tmp_path: Path, key: AuditKey, rewrite: Callable[[dict[str, Any]], bool]
) -> None:
    """Whoever can write the file rewrites the chain and the head after a verify: the
    checkpoints already found good are asked about again, and the first one fails."""
    log = write_events(tmp_path / "audit.log", 35, key=key, every=10, batch=35)
    assert log.verify().ok

    rewrite_trail(log.path, rewrite)

    report = log.verify()
    assert report.ok is False
    assert report.problem == "checkpoint MAC does not verify: forged, or made with another key"
    assert report.first_bad_line in {10, 11}  # the first checkpoint after the rewritten event
    # Exactly what a check that never saw the trail before reports.
    assert report == JsonlAuditLog(log.path, fsync=False, key=key).verify()


def test_the_key_provider_is_called_once_per_checkpoint(tmp_path: Path, key: AuditKey) -> None:
    counting = CountingKey(key)
    log = JsonlAuditLog(tmp_path / "audit.log", fsync=False, key=counting, checkpoint_every=25)

    for start in range(0, 100, 10):
        log.write(sample_events(10, start=start))
    log.close()  # nothing left to cover: the 100th event was just checkpointed

    assert counting.signed == 4
    assert log.verify().checkpoints == 4


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _log_on(tmp_path: Path, key: AuditKey, clock: Clock, *, every: int) -> JsonlAuditLog:
    """A log sealed every *every* events, or after five seconds of *clock* (enough waiting)."""
    return JsonlAuditLog(
        tmp_path / "audit.log",
        fsync=False,
        key=key,
        checkpoint_every=every,
        checkpoint_seconds=5,
        monotonic=clock,
    )


def test_a_busy_writer_seals_its_events_after_the_configured_seconds(
    tmp_path: Path, key: AuditKey
) -> None:
    """Below the interval, time seals too: once the seconds have passed, the next append that
    leaves at least MIN_EVENTS_PER_CHECKPOINT events unsealed ends with a checkpoint; fewer
    events, or less time, make none (at most one MAC per that many events)."""
    clock = Clock()
    counting = CountingKey(key)
    log = _log_on(tmp_path, counting, clock, every=1_000_000)
    log.write(sample_events(MIN_EVENTS_PER_CHECKPOINT - 1))
    clock.now += 60
    log.write(sample_events(0))  # nothing to write: no append at all
    assert counting.signed == 0
    log.write(sample_events(1, start=MIN_EVENTS_PER_CHECKPOINT - 1))  # enough, and late enough
    assert counting.signed == 1
    assert _kinds(log.path)[-1] == "audit.checkpoint"

    log.write(sample_events(2 * MIN_EVENTS_PER_CHECKPOINT, start=MIN_EVENTS_PER_CHECKPOINT))
    clock.now += 4.9
    log.write(sample_events(10, start=3 * MIN_EVENTS_PER_CHECKPOINT))
    assert counting.signed == 1  # many events, but not five seconds since the last checkpoint
    clock.now += 0.1
    log.write(sample_events(1, start=3 * MIN_EVENTS_PER_CHECKPOINT + 10))
    assert counting.signed == 2
    report = log.verify()
    assert report.ok and report.events_after_checkpoint == 0


def test_the_interval_still_bounds_the_events_between_checkpoints(
    tmp_path: Path, key: AuditKey
) -> None:
    """However little time passes, a checkpoint follows every interval's worth of events."""
    log = _log_on(tmp_path, key, Clock(), every=10)
    log.write(sample_events(25))
    kinds = _kinds(log.path)
    assert [n for n, kind in enumerate(kinds) if kind == "audit.checkpoint"] == [10, 21]


def test_seal_covers_a_quiet_processs_events_once_the_seconds_have_passed(
    tmp_path: Path, key: AuditKey
) -> None:
    """What the timer of a long-running process calls: however few events wait, they are
    sealed once the seconds have passed, and a seal with nothing to cover makes no MAC."""
    clock = Clock()
    counting = CountingKey(key)
    log = _log_on(tmp_path, counting, clock, every=1_000_000)
    assert log.seal() == []  # nothing written yet
    log.write(sample_events(3))
    clock.now += 4.9
    assert log.seal() == []
    clock.now += 0.1
    assert len(log.seal()) == 1 and counting.signed == 1
    report = log.verify()
    assert report.ok and report.events_after_checkpoint == 0
    clock.now += 60
    assert log.seal() == [] and counting.signed == 1  # nothing new to cover


def test_the_sealer_calls_seal_until_it_stops_and_survives_a_refusal() -> None:
    calls: list[float] = []

    class Sink:
        def seal(self) -> None:
            calls.append(time.monotonic())
            if len(calls) == 2:
                raise AuditError("the forwarder refused")

    with Sealer(Sink(), 0.02):
        deadline = time.monotonic() + 10
        while len(calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    stopped = len(calls)
    time.sleep(0.1)
    assert stopped >= 4 and len(calls) == stopped  # went on after the refusal; then stopped


def test_heimdall_serve_seals_its_events_within_the_seconds_with_no_more_requests(
    tmp_path: Path,
) -> None:
    """A burst, then silence: the server's own timer seals the burst with a checkpoint, so
    cutting it off the trail (and rewriting the head) would fail verification."""
    server = start_server(tmp_path, {"HMD_AUDIT_CHECKPOINT_SECONDS": "0.5"})
    try:
        with server.client("hmd_not-a-token") as client:
            for _ in range(3):
                assert client.get("/admin/crypto/reencrypt/status").status_code == 401
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            kinds = [record["event_type"] for record in records(server.audit_log)]
            if kinds and kinds[-1] == "audit.checkpoint" and kinds.count("access.denied") == 3:
                break
            time.sleep(0.1)
        assert kinds[-1] == "audit.checkpoint" and kinds.count("access.denied") == 3
        assert server.running  # sealed while it serves, not by closing
    finally:
        server.stop()


def test_removing_every_decrypt_and_recomputing_the_chain_and_head_fails_verify(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    data_dir: Path,
) -> None:
    service = make_service(audit_checkpoint_every=50)
    ingest(service, people[:20])
    keys = [service.lookup("email", p["email"], caller=caller).canonical_key for p in people[:5]]
    for canonical_key in keys:
        service.decrypt(canonical_key, reason="support:ticket-1", caller=caller)
    service.audit.close()
    path = data_dir / "audit.log"
    assert service.audit.verify().ok  # type: ignore[attr-defined]
    assert "crypto.decrypt" in _kinds(path)

    rewrite_trail(path, without_decrypts)

    assert "crypto.decrypt" not in _kinds(path)
    report = make_service().audit.verify()  # type: ignore[attr-defined]
    assert not report.ok
    assert report.problem == "checkpoint MAC does not verify: forged, or made with another key"


def test_removing_every_checkpoint_too_fails_verify_while_the_provider_holds_the_key(
    make_service: ServiceFactory,
    ingest: Ingest,
    people: list[dict[str, Any]],
    caller: Caller,
    data_dir: Path,
) -> None:
    service = make_service(audit_checkpoint_every=50)
    ingest(service, people[:20])
    key = service.lookup("email", people[0]["email"], caller=caller).canonical_key
    service.decrypt(key, reason="support:ticket-1", caller=caller)
    service.audit.close()

    # Without its checkpoints the trail would look written before checkpoints existed.
    rewrite_trail(
        data_dir / "audit.log",
        lambda record: record["event_type"] not in {"crypto.decrypt", "audit.checkpoint"},
    )

    report = make_service().audit.verify()  # type: ignore[attr-defined]
    assert (report.ok, report.checkpoints) == (False, 0)
    assert report.problem is not None
    assert "no keyed checkpoint, but the key provider holds its audit key" in report.problem


def test_the_same_rewrite_of_a_trail_without_checkpoints_goes_unnoticed(tmp_path: Path) -> None:
    """Why the checkpoints exist: the keyless chain and head alone can be recomputed."""
    log = write_events(tmp_path / "audit.log", 10)
    rewrite_trail(log.path, lambda record: record["count"] % 2 == 0)

    report = log.verify()

    assert (report.ok, report.events, report.checkpoints) == (True, 5, 0)


def test_a_checkpoint_with_a_mac_from_another_key_fails(tmp_path: Path, key: AuditKey) -> None:
    log = write_events(tmp_path / "audit.log", 12, key=key, every=5)
    other = LocalKeyring(tmp_path / "other" / "keyring.json").audit_key()
    with pytest.raises(ConfigurationError, match="holds no audit key"):
        JsonlAuditLog(log.path, key=other).verify()  # that keyring never made one
    other.sign(b"now it has one")

    report = JsonlAuditLog(log.path, key=other).verify()

    assert not report.ok
    assert report.first_bad_line == 6
    assert report.problem == "checkpoint MAC does not verify: forged, or made with another key"


def test_a_checkpoint_signed_by_the_attacker_with_their_own_key_fails(
    tmp_path: Path, key: AuditKey
) -> None:
    log = write_events(tmp_path / "audit.log", 12, key=key, every=5)
    forged = write_events(
        tmp_path / "forged" / "audit.log",
        12,
        every=5,
        key=LocalKeyring(tmp_path / "forged" / "keyring.json").audit_key(),
    )
    log.path.write_bytes(forged.path.read_bytes())
    log.head_path.write_bytes(forged.head_path.read_bytes())

    report = log.verify()

    assert (report.ok, report.first_bad_line) == (False, 6)


def test_removing_the_last_checkpoint_is_a_missing_checkpoint(
    tmp_path: Path, key: AuditKey
) -> None:
    log = write_events(tmp_path / "audit.log", 23, key=key, every=5)
    checkpoints = [record for record in records(log.path) if "mac" in record]
    assert len(checkpoints) == 4
    rewrite_trail(log.path, lambda record: record != checkpoints[-1])

    report = log.verify()

    assert not report.ok
    assert report.first_bad_line == 24  # the 6th event after the checkpoint at line 18
    assert report.problem == (
        "a checkpoint is missing: the one at line 18 announced the next within 5 events"
    )


def test_verify_without_the_key_fails_on_a_trail_with_checkpoints(
    tmp_path: Path, key: AuditKey
) -> None:
    log = write_events(tmp_path / "audit.log", 6, key=key, every=5)

    report = JsonlAuditLog(log.path).verify()

    assert not report.ok
    assert report.problem is not None
    assert "no audit key is configured" in report.problem


def test_a_writer_without_the_key_is_refused_once_a_checkpoint_is_due(
    tmp_path: Path, key: AuditKey
) -> None:
    write_events(tmp_path / "audit.log", 6, key=key, every=5)
    keyless = JsonlAuditLog(tmp_path / "audit.log", fsync=False)
    keyless.write(sample_events(3))  # 4 events since the checkpoint: none due yet
    before = keyless.path.read_bytes()

    with pytest.raises(AuditError, match="no audit key is configured"):
        keyless.write(sample_events(1))

    assert keyless.path.read_bytes() == before


def test_an_append_whose_checkpoint_cannot_be_signed_is_refused_and_undone(
    tmp_path: Path, key: AuditKey
) -> None:
    counting = CountingKey(key)
    log = JsonlAuditLog(tmp_path / "audit.log", fsync=False, key=counting, checkpoint_every=5)
    log.write(sample_events(4))
    before = log.path.read_bytes(), log.head_path.read_bytes()
    counting.down = True

    with pytest.raises(AuditError, match="checkpoint could not be signed: the key service is"):
        log.write(sample_events(2, start=4))

    assert (log.path.read_bytes(), log.head_path.read_bytes()) == before
    counting.down = False
    log.write(sample_events(2, start=4))
    assert log.verify().checkpoints == 1


def test_a_closing_checkpoint_that_cannot_be_made_is_logged_and_left_to_the_next_one(
    tmp_path: Path, key: AuditKey, caplog: pytest.LogCaptureFixture
) -> None:
    counting = CountingKey(key)
    log = JsonlAuditLog(tmp_path / "audit.log", fsync=False, key=counting, checkpoint_every=5)
    log.write(sample_events(3))
    counting.down = True

    with caplog.at_level(logging.WARNING, logger="heimdall.audit"):
        log.close()

    assert "no closing audit checkpoint: audit checkpoint could not be signed" in caplog.text
    report = log.verify()
    assert (report.ok, report.checkpoints, report.events_after_checkpoint) == (True, 0, 3)
    counting.down = False
    log.write(sample_events(2, start=3))
    assert log.verify().checkpoints == 1


def test_the_audit_key_is_kept_in_the_keyring_file_and_made_once(tmp_path: Path) -> None:
    keyring = LocalKeyring(tmp_path / "keys" / "keyring.json")
    before = json.loads(keyring.path.read_text())
    assert "audit_key" not in before

    first = keyring.audit_key().sign(b"message")
    after = json.loads(keyring.path.read_text())

    assert after["versions"] == before["versions"]
    assert sorted(after["audit_key"]) == ["created_at", "material"]
    assert keyring.path.stat().st_mode & 0o777 == 0o600
    assert LocalKeyring(keyring.path).audit_key().sign(b"message") == first
    assert json.loads(keyring.path.read_text()) == after
    keyring.rotate()
    assert json.loads(keyring.path.read_text())["audit_key"] == after["audit_key"]


def test_a_trail_from_before_checkpoints_is_taken_over_and_checkpointed(
    tmp_path: Path, key: AuditKey
) -> None:
    legacy = write_events(tmp_path / "audit.log", 7)
    head = json.loads(legacy.head_path.read_text())
    legacy.head_path.write_text(json.dumps({"size": head["size"], "hash": head["hash"]}))

    log = JsonlAuditLog(legacy.path, fsync=False, key=key, checkpoint_every=5)
    log.write(sample_events(1, start=7))

    # The first keyed append checkpoints the whole older trail at once, before its own event.
    assert _kinds(log.path)[7] == "audit.checkpoint"
    report = log.verify()
    assert (report.ok, report.events, report.checkpoints) == (True, 8, 1)


_WRITER = """
import random, sys
from pathlib import Path
from heimdall.audit import AuditEvent, EventType, JsonlAuditLog, Result
from heimdall.kms.local import LocalKeyring

log_path, keyring, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
log = JsonlAuditLog(log_path, fsync=False, key=LocalKeyring(keyring).audit_key(),
                    checkpoint_every=7)
written = 0
for batch in range(40):
    events = [AuditEvent(EventType.DECRYPT, name, Result.SUCCESS, f"{name}-{batch}-{n}")
              for n in range(random.randint(1, 3))]
    log.write(events)
    written += len(events)
log.close()
print(written)
"""


def test_several_processes_appending_at_once_keep_a_verifiable_trail(tmp_path: Path) -> None:
    keyring = LocalKeyring(tmp_path / "keys" / "keyring.json")
    path = tmp_path / "data" / "audit.log"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(keyring.path), f"writer-{n}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    written = []
    for writer in writers:
        out, _ = writer.communicate(timeout=120)
        assert writer.returncode == 0
        written.append(int(out))

    report = JsonlAuditLog(path, key=keyring.audit_key()).verify()

    assert report.ok, report
    assert report.events == sum(written)
    assert report.checkpoints >= sum(written) // 7
    assert report.events_after_checkpoint == 0  # the last writer to close covered the rest
    assert len(json.loads(keyring.path.read_text())["audit_key"]["material"]) == 44


# -- the command line ---------------------------------------------------------------------


def test_cli_verify_counts_checkpoints_and_names_what_follows_the_last_one(cli: Cli) -> None:
    keyring = LocalKeyring(cli.data_dir / "keyring.json")
    write_events(cli.data_dir / "audit.log", 11, key=keyring.audit_key(), every=4)

    lines = cli.ok("audit", "verify").splitlines()

    assert lines == [
        "audit trail intact: 11 events, 2 keyed checkpoints verified with local/audit",
        "3 events follow the last checkpoint: only the keyless hash chain and the head record "
        "protect those",
    ]


def test_closing_the_service_checkpoints_the_events_it_wrote(
    make_service: ServiceFactory, ingest: Ingest, people: list[dict[str, Any]], data_dir: Path
) -> None:
    service = make_service()
    ingest(service, people[:3])

    service.close()

    assert _kinds(data_dir / "audit.log")[-1] == "audit.checkpoint"


def test_cli_verify_fails_in_one_line_on_a_rewritten_trail(cli: Cli) -> None:
    env = {"HMD_AUDIT_CHECKPOINT_EVERY": "2"}
    people = [{"id": str(n), "email": f"person{n}@example.org"} for n in range(3)]
    cli.ok("ingest", str(cli.write_records("people.jsonl", people)), env=env)
    key = cli.canonical_key("email", "person1@example.org")
    cli.ok("decrypt", key, "--reason", "support:ticket-1", env=env)
    assert "keyed checkpoints verified" in cli.ok("audit", "verify", env=env)

    rewrite_trail(cli.data_dir / "audit.log", without_decrypts)

    line = assert_one_line_error(cli.run("audit", "verify", env=env))
    assert "checkpoint MAC does not verify" in line


def test_cli_verify_of_a_trail_without_checkpoints_says_so(cli: Cli, master_key: str) -> None:
    legacy = {"HMD_ENCRYPTION_MODE": "legacy", "HMD_MASTER_KEY": master_key}
    people = [{"id": "1", "email": "person1@example.org"}]
    cli.ok("ingest", str(cli.write_records("people.jsonl", people)), env=legacy)

    output = cli.ok("audit", "verify", env=legacy)

    assert "audit trail intact" in output
    assert "it has no keyed checkpoints" in output
    assert "only the keyless hash chain and the head record protect it" in output


def test_lines_appended_past_the_head_are_never_vouched_for_by_a_later_checkpoint(
    tmp_path: Path, key: AuditKey
) -> None:
    """An attacker who cannot use the key appends a well-chained forged event and leaves the
    head alone: verify names it, and no writer takes it over into its checkpoint."""
    log = write_events(tmp_path / "audit.log", 6, key=key, every=4)
    before = log.path.read_bytes()
    last = records(log.path)[-1]
    forged = {**last, "event_type": "crypto.decrypt", "actor": "cli:alice", "count": 99}
    del forged["hash"]
    body = json.dumps(forged, separators=(",", ":")).encode()
    digest = hashlib.sha256(last["hash"].encode() + body).hexdigest()
    log.path.write_bytes(before + body[:-1] + b',"hash":"' + digest.encode() + b'"}\n')

    report = log.verify()
    assert not report.ok and report.problem is not None
    assert "lines follow what the head record vouches for" in report.problem
    with pytest.raises(AuditError, match="goes on past what its head record vouches for"):
        log.write(sample_events(1))

    log.repair_torn_tail(actor="test:operator", request_id="req-repair")
    assert "cli:alice" not in log.path.read_text()
    assert log.verify().ok


# -- a trail kept across a move from one key provider to another ------------------------------


def _moved_trail(tmp_path: Path) -> tuple[JsonlAuditLog, NamedKey, NamedKey]:
    """12 events checkpointed under the old provider's key, then 12 under the new one's."""
    old = NamedKey(LocalKeyring(tmp_path / "old" / "keyring.json").audit_key(), "transit/old")
    new = NamedKey(LocalKeyring(tmp_path / "new" / "keyring.json").audit_key(), "aws:new")
    log = write_events(tmp_path / "audit.log", 12, key=old, every=5)
    log.close()
    moved = JsonlAuditLog(log.path, fsync=False, key=new, read_keys=[old], checkpoint_every=5)
    moved.write(sample_events(12, start=12))
    moved.close()
    return moved, old, new


def test_a_trail_kept_across_a_provider_move_is_checked_with_each_providers_key(
    tmp_path: Path,
) -> None:
    moved, _, _ = _moved_trail(tmp_path)
    made_with = [record["key_identifier"] for record in records(moved.path) if "mac" in record]
    assert made_with[0] == "transit/old" and made_with[-1] == "aws:new"

    report = moved.verify()

    assert report.ok, report.problem
    assert report.checkpoints == len(made_with)
    assert (report.key_identifier, report.key_identifiers) == (
        "aws:new",
        ("transit/old", "aws:new"),
    )


def test_a_checkpoint_of_a_provider_no_longer_configured_is_a_problem_a_later_one_cannot_hide(
    tmp_path: Path,
) -> None:
    """The new key signs whatever chain it finds: its checkpoints cannot vouch for the ones
    before them that it never checked."""
    moved, _, new = _moved_trail(tmp_path)

    report = JsonlAuditLog(moved.path, key=new).verify()

    assert not report.ok and report.problem is not None
    assert report.first_bad_line == 6
    assert "checkpoint made with the key transit/old, which no configured key provider holds" in (
        report.problem
    )
    assert "HMD_KMS_READ_PROVIDERS" in report.problem


def test_a_rewritten_trail_whose_checkpoints_name_an_unknown_key_fails_after_a_new_checkpoint(
    tmp_path: Path, key: AuditKey
) -> None:
    """An attacker rewrites the trail and renames its checkpoints' key, so that no MAC is
    checked; the writer then appends and signs over the rewritten chain. Verify still fails."""
    log = write_events(tmp_path / "audit.log", 12, key=key, every=5)
    log.close()
    rewrite_trail(log.path, lambda record: record.get("count") != 3)
    text = log.path.read_text().replace('"key_identifier":"local/audit"', '"key_identifier":"x/y"')
    log.path.write_text(text)
    rewrite_trail(log.path, lambda record: True)  # the chain and head over the renamed keys
    writer = JsonlAuditLog(log.path, fsync=False, key=key, checkpoint_every=5)
    writer.write(sample_events(6, start=100))
    writer.close()

    report = writer.verify()

    assert not report.ok and report.problem is not None
    assert report.first_bad_line == 5  # the first checkpoint, one event fewer before it
    assert "the key x/y, which no configured key provider holds" in report.problem


def test_a_read_providers_key_checks_only_the_checkpoints_it_made(tmp_path: Path) -> None:
    """A checkpoint forged under the old key's name fails its MAC, as any forged one does."""
    moved, old, new = _moved_trail(tmp_path)
    forged = NamedKey(LocalKeyring(tmp_path / "forged" / "keyring.json").audit_key(), old.name)
    moved.path.write_bytes(b"")
    moved.head_path.unlink()
    write_events(moved.path, 12, key=forged, every=5).close()
    again = JsonlAuditLog(moved.path, fsync=False, key=new, read_keys=[old], checkpoint_every=5)
    again.write(sample_events(12, start=12))
    again.close()

    report = again.verify()

    assert (report.ok, report.first_bad_line) == (False, 6)
    assert report.problem == "checkpoint MAC does not verify: forged, or made with another key"


def test_a_torn_tail_after_a_provider_move_is_repaired_with_the_old_key_configured(
    tmp_path: Path,
) -> None:
    moved, _, new = _moved_trail(tmp_path)
    with moved.path.open("ab") as file:
        file.write(b'{"event_type":"crypto.decrypt","act')
    without_old = JsonlAuditLog(moved.path, fsync=False, key=new, checkpoint_every=5)
    with pytest.raises(AuditError, match="damaged within what its head record vouches for"):
        without_old.repair_torn_tail(actor="test:operator", request_id="req-repair")

    removed = moved.repair_torn_tail(actor="test:operator", request_id="req-repair")

    assert removed == len(b'{"event_type":"crypto.decrypt","act')
    assert moved.verify().ok


def test_two_configured_audit_keys_of_one_name_are_refused(tmp_path: Path) -> None:
    """Which of the two made a checkpoint could not be told: genuine ones would read forged."""
    one = NamedKey(LocalKeyring(tmp_path / "one" / "keyring.json").audit_key(), "shared/audit")
    two = NamedKey(LocalKeyring(tmp_path / "two" / "keyring.json").audit_key(), "shared/audit")

    with pytest.raises(ConfigurationError, match="name their audit key shared/audit"):
        JsonlAuditLog(tmp_path / "audit.log", key=one, read_keys=[two])
    with pytest.raises(ConfigurationError, match="name their audit key shared/audit"):
        JsonlAuditLog(tmp_path / "audit.log", read_keys=[one, two])


def test_a_trail_of_a_read_providers_checkpoints_verifies_without_a_key_of_its_own(
    tmp_path: Path,
) -> None:
    """Moving to a local keyring that does not exist yet: the old provider's key checks all."""
    moved, old, _ = _moved_trail(tmp_path)
    only_old = write_events(tmp_path / "only-old" / "audit.log", 12, key=old, every=5)
    only_old.close()

    report = JsonlAuditLog(only_old.path, read_keys=[old]).verify()
    mixed = JsonlAuditLog(moved.path, read_keys=[old]).verify()

    assert (report.ok, report.checkpoints, report.key_identifiers) == (True, 3, ("transit/old",))
    assert not mixed.ok and mixed.problem is not None
    assert "the key aws:new, which no configured key provider holds" in mixed.problem


def test_verifying_again_asks_a_read_providers_key_only_about_new_checkpoints(
    tmp_path: Path,
) -> None:
    moved, old, new = _moved_trail(tmp_path)
    counting_old, counting_new = CountingKey(old), CountingKey(new)
    log = JsonlAuditLog(
        moved.path, fsync=False, key=counting_new, read_keys=[counting_old], checkpoint_every=5
    )
    first = log.verify()
    asked = (counting_old.verified, counting_new.verified)
    log.write(sample_events(5, start=24))

    again = log.verify()

    assert first.ok and again.ok and again.checkpoints == first.checkpoints + 1
    assert asked[0] > 0 and asked[1] > 0
    assert (counting_old.verified, counting_new.verified) == (asked[0], asked[1] + 1)
    other = JsonlAuditLog(moved.path, fsync=False, key=counting_new).verify()  # no read key
    assert not other.ok


def test_a_checkpoint_naming_its_key_with_a_line_break_is_malformed(
    tmp_path: Path, key: AuditKey
) -> None:
    """A key name is shown in verify's one-line message and is part of the MAC's message."""
    log = write_events(tmp_path / "audit.log", 6, key=key, every=5)
    log.close()
    forged = '"key_identifier":"x\\nerror: all good"'
    log.path.write_text(log.path.read_text().replace('"key_identifier":"local/audit"', forged))
    rewrite_trail(log.path, lambda record: True)

    report = log.verify()

    assert (report.ok, report.first_bad_line, report.problem) == (
        False,
        6,
        "checkpoint is malformed",
    )


def test_cli_verify_refuses_a_read_provider_it_cannot_use_in_one_line(cli: Cli) -> None:
    write_events(
        cli.data_dir / "audit.log", 6, key=LocalKeyring(cli.data_dir / "k.json").audit_key()
    )
    missing = cli.data_dir / "no-such-keyring.json"
    vault = {
        "HMD_KMS_PROVIDER": "vault",
        "HMD_VAULT_ADDR": "http://127.0.0.1:1",
        "HMD_VAULT_TOKEN": "hmd-test-token-not-used",
    }

    no_keyring = assert_one_line_error(
        cli.run(
            "audit",
            "verify",
            env={**vault, "HMD_KMS_READ_PROVIDERS": "local", "HMD_KEYRING_PATH": str(missing)},
        )
    )
    unknown = assert_one_line_error(
        cli.run("audit", "verify", env={"HMD_KMS_READ_PROVIDERS": "gcp"})
    )

    assert f"the keyring file {missing} does not exist" in no_keyring
    assert "HMD_KMS_READ_PROVIDERS names gcp, which is not available" in unknown


def test_a_prefix_found_good_with_other_keys_is_checked_again(tmp_path: Path) -> None:
    """What one set of keys confirmed is not taken as confirmed by another."""
    moved, old, new = _moved_trail(tmp_path)
    head = read_head(moved.head_path)

    def lines() -> list[bytes]:
        return moved.path.read_bytes().splitlines(keepends=True)

    both = recheck(lines, head, new, None, [old])
    alone = recheck(lines, head, new, both.verified)

    assert both.ok and both.verified is not None
    assert not alone.ok and alone.first_bad_line == 6


# -- vouching for the old provider's checkpoints, so the trail verifies once it is gone --------


def test_a_vouching_checkpoint_lets_the_trail_verify_without_the_old_key(tmp_path: Path) -> None:
    moved, old, new = _moved_trail(tmp_path)
    old_checkpoints = sum(
        1 for record in records(moved.path) if record.get("key_identifier") == old.name
    )

    lines, keys = moved.vouch()

    assert keys == ("transit/old",) and len(lines) == 1
    assert records(moved.path)[-1]["vouches_for"] == ["transit/old"]
    report = JsonlAuditLog(moved.path, key=new).verify()
    assert report.ok, report.problem
    assert (report.vouched, report.vouched_keys) == (old_checkpoints, ("transit/old",))
    assert report.key_identifiers == ("aws:new",)
    with_both = moved.verify()
    assert with_both.ok and with_both.vouched == 0  # checked with the old key itself


def test_vouching_without_the_old_key_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    moved, _, new = _moved_trail(tmp_path)
    only_new = JsonlAuditLog(moved.path, fsync=False, key=new, checkpoint_every=5)
    before = moved.path.read_bytes()

    with pytest.raises(AuditError, match="line 6: checkpoint made with the key transit/old"):
        only_new.vouch()

    assert moved.path.read_bytes() == before


def test_a_trail_of_one_key_has_nothing_to_vouch_for(tmp_path: Path, key: AuditKey) -> None:
    log = write_events(tmp_path / "audit.log", 12, key=key, every=5)
    before = log.path.read_bytes()

    assert log.vouch() == ([], ())
    assert log.path.read_bytes() == before


def test_a_trail_that_does_not_verify_is_not_vouched_for(tmp_path: Path) -> None:
    """Tampered with before the move: the vouching check finds it, and writes nothing."""
    moved, _, _ = _moved_trail(tmp_path)
    rewrite_trail(moved.path, lambda record: record.get("count") != 2)
    before = moved.path.read_bytes()

    with pytest.raises(AuditError, match=r"does not verify \(line 5: checkpoint MAC does not"):
        moved.vouch()

    assert moved.path.read_bytes() == before


def test_a_checkpoint_forged_under_the_old_key_after_the_vouching_one_fails(
    tmp_path: Path,
) -> None:
    moved, old, new = _moved_trail(tmp_path)
    moved.vouch()
    forger = JsonlAuditLog(moved.path, fsync=False, key=NamedKey(new.key, old.name))
    forger.write(sample_events(2, start=90))
    forger.close()  # a checkpoint naming the old key, with a MAC it did not make

    report = JsonlAuditLog(moved.path, key=new).verify()

    assert not report.ok and report.problem is not None
    assert report.first_bad_line == len(records(moved.path))
    assert "the key transit/old, which no configured key provider holds" in report.problem
    assert "no later checkpoint vouches for it" in report.problem


def _edit_checkpoint(path: Path, mac: str, change: Callable[[Record], object]) -> int:
    """Change the checkpoint whose MAC is *mac* (keeping the MAC) and rechain; its line."""
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        record = json.loads(line)
        if record.get("mac") == mac:
            change(record)
            lines[number] = json.dumps(record, separators=(",", ":"))
            path.write_text("\n".join(lines) + "\n")
            rewrite_trail(path, lambda _: True)
            return number + 1
    raise AssertionError("no such checkpoint")


@pytest.mark.parametrize(
    ("which", "change"),
    [
        pytest.param("plain", lambda doc: doc.update(vouches_for=["transit/old"]), id="added"),
        pytest.param("vouching", lambda doc: doc.pop("vouches_for"), id="removed"),
        pytest.param(
            "vouching", lambda doc: doc.update(vouches_for=["transit/old", "x/y"]), id="widened"
        ),
    ],
)
def test_what_a_checkpoint_vouches_for_is_under_its_mac(
    tmp_path: Path, which: str, change: Callable[[Record], object]
) -> None:
    moved, _, _ = _moved_trail(tmp_path)
    moved.vouch()
    ours = [r for r in records(moved.path) if r.get("key_identifier") == "aws:new"]
    target = ours[-1] if which == "vouching" else ours[0]
    assert ("vouches_for" in target) == (which == "vouching")

    line = _edit_checkpoint(moved.path, target["mac"], change)

    report = moved.verify()
    assert (report.ok, report.first_bad_line, report.problem) == (
        False,
        line,
        "checkpoint MAC does not verify: forged, or made with another key",
    )


@pytest.mark.parametrize(
    "vouches_for",
    [[], "transit/old", [7], ["a\nb"], [""]],
    ids=["empty", "text", "number", "line-break", "empty-name"],
)
def test_a_malformed_vouches_for_is_a_malformed_checkpoint(
    tmp_path: Path, vouches_for: object
) -> None:
    moved, _, _ = _moved_trail(tmp_path)
    moved.vouch()
    vouching = records(moved.path)[-1]

    line = _edit_checkpoint(
        moved.path, vouching["mac"], lambda doc: doc.update(vouches_for=vouches_for)
    )

    report = moved.verify()
    assert (report.ok, report.first_bad_line, report.problem) == (
        False,
        line,
        "checkpoint is malformed",
    )


def test_verifying_a_vouched_trail_again_counts_the_same(tmp_path: Path) -> None:
    moved, _, new = _moved_trail(tmp_path)
    moved.vouch()
    counting = CountingKey(new)
    log = JsonlAuditLog(moved.path, fsync=False, key=counting, checkpoint_every=5)

    first = log.verify()
    asked = counting.verified
    again = log.verify()

    assert first.ok and first == again
    assert counting.verified == asked  # the prefix found good is not asked about again


def test_after_two_moves_the_trail_verifies_with_the_last_providers_key_alone(
    tmp_path: Path,
) -> None:
    """The second vouching checkpoint stands for the first provider too, which the second
    vouch took on the first vouching checkpoint's word."""
    first, second, third = (
        NamedKey(LocalKeyring(tmp_path / name / "keyring.json").audit_key(), f"{name}/audit")
        for name in ("first", "second", "third")
    )
    path = tmp_path / "audit.log"
    write_events(path, 12, key=first, every=5).close()
    for n, (key, before) in enumerate(((second, first), (third, second)), start=1):
        log = JsonlAuditLog(path, fsync=False, key=key, read_keys=[before], checkpoint_every=5)
        log.write(sample_events(12, start=12 * n))
        log.close()
        log.vouch()

    report = JsonlAuditLog(path, key=third).verify()

    assert records(path)[-1]["vouches_for"] == ["first/audit", "second/audit"]
    assert report.ok, report.problem
    assert set(report.vouched_keys) == {"first/audit", "second/audit"}


def test_a_vouching_checkpoint_the_new_key_cannot_sign_is_a_provider_error_and_not_written(
    tmp_path: Path,
) -> None:
    moved, old, new = _moved_trail(tmp_path)
    down = CountingKey(new)
    down.down = True
    log = JsonlAuditLog(moved.path, fsync=False, key=down, read_keys=[old], checkpoint_every=5)
    before = moved.path.read_bytes()

    with pytest.raises(KmsUnavailable):
        log.vouch()

    assert moved.path.read_bytes() == before


class _LockWatchingKey(NamedKey):
    """Records, at each verify, whether another open file holds the log's lock."""

    def __init__(self, key: NamedKey, log_path: Path) -> None:
        super().__init__(key.key, key.name)
        self.log_path = log_path
        self.locked: list[bool] = []

    def verify(self, message: bytes, mac: str) -> bool:
        with self.log_path.open("rb") as file:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.locked.append(True)
            else:
                self.locked.append(False)
                fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        return super().verify(message, mac)


def test_vouching_asks_the_providers_before_it_locks_the_log(tmp_path: Path) -> None:
    """A long trail's check (a provider call per checkpoint) does not hold up every writer."""
    moved, old, new = _moved_trail(tmp_path)
    watching = _LockWatchingKey(old, moved.path)
    log = JsonlAuditLog(moved.path, fsync=False, key=new, read_keys=[watching])

    lines, _ = log.vouch()

    assert lines and watching.locked and not any(watching.locked)


def test_a_torn_tail_does_not_hide_a_checkpoint_nothing_vouches_for(tmp_path: Path) -> None:
    moved, _, new = _moved_trail(tmp_path)
    with moved.path.open("ab") as file:
        file.write(b'{"event_type":"crypto.decrypt","act')

    report = JsonlAuditLog(moved.path, key=new).verify()

    assert (report.ok, report.first_bad_line, report.torn_tail) == (False, 6, False)
    assert report.problem is not None and "no later checkpoint vouches for it" in report.problem


def _keyring_key(tmp_path: Path, directory: str, name: str) -> NamedKey:
    return NamedKey(LocalKeyring(tmp_path / directory / "keyring.json").audit_key(), name)


def test_a_key_name_that_comes_back_for_another_key_is_vouched_for_not_forged(
    tmp_path: Path,
) -> None:
    """A local keyring, then Vault, then a new local keyring: both keyrings' audit keys are
    local/audit. The first one's checkpoints fail the second one's MAC, and the vouching
    checkpoint Vault made when it could still check them stands for them."""
    first = _keyring_key(tmp_path, "first", "local/audit")
    vault = _keyring_key(tmp_path, "vault", "transit/heimdall-pii-audit")
    again = _keyring_key(tmp_path, "again", "local/audit")
    path = tmp_path / "audit.log"
    write_events(path, 12, key=first, every=5).close()
    moved = JsonlAuditLog(path, fsync=False, key=vault, read_keys=[first], checkpoint_every=5)
    moved.write(sample_events(12, start=12))
    moved.close()
    assert moved.vouch()[1] == ("local/audit",)
    back = JsonlAuditLog(path, fsync=False, key=again, read_keys=[vault], checkpoint_every=5)
    back.write(sample_events(12, start=24))
    back.close()
    before = JsonlAuditLog(path, key=again).verify()

    _, keys = back.vouch()

    assert (before.ok, before.first_bad_line, before.problem) == (False, 6, _FORGED)
    assert keys == ("transit/heimdall-pii-audit",)
    alone = JsonlAuditLog(path, key=again)
    report = alone.verify()
    assert report.ok, report.problem
    assert set(report.vouched_keys) == {"local/audit", "transit/heimdall-pii-audit"}
    assert alone.verify() == report  # counted alike from the prefix found good


_FORGED = "checkpoint MAC does not verify: forged, or made with another key"


def test_a_checkpoint_forged_after_the_vouching_one_is_not_vouched_for(tmp_path: Path) -> None:
    moved, _, new = _moved_trail(tmp_path)
    moved.vouch()
    moved.write(sample_events(6, start=50))
    moved.close()
    ours = [r for r in records(moved.path) if r.get("key_identifier") == "aws:new"]
    vouching = next(n for n, r in enumerate(ours) if "vouches_for" in r)
    after = ours[vouching + 1]

    line = _edit_checkpoint(moved.path, after["mac"], lambda doc: doc.update(mac=ours[0]["mac"]))

    report = JsonlAuditLog(moved.path, key=new).verify()
    assert (report.ok, report.first_bad_line, report.problem) == (False, line, _FORGED)


def test_vouching_again_writes_only_when_another_keys_checkpoint_came_since(
    tmp_path: Path,
) -> None:
    moved, old, new = _moved_trail(tmp_path)
    assert moved.vouch()[0]
    size = moved.path.stat().st_size

    assert moved.vouch() == ([], ())  # nothing of the old key since
    assert moved.path.stat().st_size == size
    straggler = JsonlAuditLog(moved.path, fsync=False, key=old, checkpoint_every=5)
    straggler.write(sample_events(2, start=80))
    straggler.close()  # a process still configured with the old provider
    assert not JsonlAuditLog(moved.path, key=new).verify().ok

    lines, keys = moved.vouch()

    assert lines and keys == ("transit/old",)
    assert JsonlAuditLog(moved.path, key=new).verify().ok


def test_an_old_keys_checkpoint_past_the_head_is_shown_as_the_tail_to_repair(
    tmp_path: Path,
) -> None:
    """An append of a process still on the old provider, cut off before its head record: the
    repair removes it, with the new key alone."""
    moved, old, new = _moved_trail(tmp_path)
    moved.vouch()
    head = moved.head_path.read_bytes()
    straggler = JsonlAuditLog(moved.path, fsync=False, key=old, checkpoint_every=5)
    straggler.write(sample_events(2, start=80))
    straggler.close()
    moved.head_path.write_bytes(head)  # as if killed before writing it
    alone = JsonlAuditLog(moved.path, fsync=False, key=new, checkpoint_every=5)

    report = alone.verify()

    assert not report.ok and report.problem is not None
    assert "lines follow what the head record vouches for" in report.problem
    alone.repair_torn_tail(actor="test:operator", request_id="req-repair")
    assert alone.verify().ok


def _swap_mac(path: Path, nth: int) -> int:
    """Give the *nth* checkpoint another checkpoint's MAC (rechained): a forgery; its line."""
    checkpoints = [r for r in records(path) if "mac" in r]
    other = checkpoints[nth + 1]["mac"]
    return _edit_checkpoint(path, checkpoints[nth]["mac"], lambda doc: doc.update(mac=other))


def test_after_a_forged_checkpoint_only_a_vouching_one_is_worth_a_provider_call(
    tmp_path: Path, key: AuditKey
) -> None:
    """A forged trail costs one call, not one per checkpoint that follows."""
    log = write_events(tmp_path / "audit.log", 40, key=key, every=5)
    log.close()
    line = _swap_mac(log.path, 0)
    counting = CountingKey(key)

    report = JsonlAuditLog(log.path, key=counting).verify()

    assert (report.ok, report.first_bad_line, report.problem) == (False, line, _FORGED)
    assert counting.verified == 1


class _DownForVouching(NamedKey):
    """Verifies plain checkpoints; unreachable when asked about a vouching one."""

    def verify(self, message: bytes, mac: str) -> bool:
        if b"vouches_for" in message:
            raise KmsUnavailable("the key service is down", provider="test")
        return super().verify(message, mac)


def test_a_forgery_is_reported_even_when_the_provider_then_fails(tmp_path: Path) -> None:
    """Not hidden behind the provider's trouble (which kms migrate only warns about)."""
    moved, old, new = _moved_trail(tmp_path)
    moved.vouch()
    line = _swap_mac(moved.path, 0)
    flaky = _DownForVouching(new.key, new.name)

    report = JsonlAuditLog(moved.path, key=flaky, read_keys=[old]).verify()

    assert (report.ok, report.first_bad_line, report.problem) == (False, line, _FORGED)
    clean, clean_old, clean_new = _moved_trail(tmp_path / "clean")
    clean.vouch()
    unreachable = _DownForVouching(clean_new.key, clean_new.name)
    with pytest.raises(KmsUnavailable):  # with nothing forged, the provider's error stands
        JsonlAuditLog(clean.path, key=unreachable, read_keys=[clean_old]).verify()


def test_a_forged_checkpoint_is_reported_before_a_later_broken_link(
    tmp_path: Path, key: AuditKey
) -> None:
    log = write_events(tmp_path / "audit.log", 20, key=key, every=5)
    log.close()
    line = _swap_mac(log.path, 0)
    lines = log.path.read_bytes().splitlines(keepends=True)
    lines[-2] = lines[-2].replace(b'"actor":"test:actor-', b'"actor":"test:actor-x')
    log.path.write_bytes(b"".join(lines))

    report = log.verify()

    assert (report.ok, report.first_bad_line, report.problem) == (False, line, _FORGED)


def test_vouching_refuses_a_head_whose_counts_are_not_the_logs(tmp_path: Path) -> None:
    """Else the vouching checkpoint would sign those counts, and break the trail for good."""
    moved, _, _ = _moved_trail(tmp_path)
    head = json.loads(moved.head_path.read_text())
    head.update(lines=head["lines"] + 1, events=head["events"] + 1)
    moved.head_path.write_text(json.dumps(head))
    before = moved.path.read_bytes()

    with pytest.raises(AuditError, match=r"counts .* lines and .* events, the log"):
        moved.vouch()

    assert moved.path.read_bytes() == before


def test_a_forgery_is_found_though_the_head_no_longer_matches_the_log(
    tmp_path: Path, key: AuditKey
) -> None:
    """An event rewritten longer and the chain recomputed, the old head put back: the forged
    checkpoint is the finding, not only the head's mismatch."""
    log = write_events(tmp_path / "audit.log", 20, key=key, every=5)
    log.close()
    head = log.head_path.read_bytes()
    rewrite_trail(log.path, lambda record: record.update(reason="x" * 40) is None)
    log.head_path.write_bytes(head)
    first = next(n for n, r in enumerate(records(log.path), start=1) if "mac" in r)

    report = log.verify()

    assert (report.ok, report.first_bad_line, report.problem) == (False, first, _FORGED)


def test_the_first_checkpoint_nothing_vouches_for_is_named_with_a_later_forgery(
    tmp_path: Path,
) -> None:
    moved, _, new = _moved_trail(tmp_path)
    ours = [r for r in records(moved.path) if r.get("key_identifier") == "aws:new"]
    forged = _edit_checkpoint(
        moved.path, ours[0]["mac"], lambda doc: doc.update(mac=ours[1]["mac"])
    )

    report = JsonlAuditLog(moved.path, key=new).verify()

    assert not report.ok and report.first_bad_line == 6 and report.problem is not None
    assert "the key transit/old, which no configured key provider holds" in report.problem
    assert report.problem.endswith(f"; and the checkpoint at line {forged} does not verify")


def test_a_forged_checkpoint_past_the_head_is_named_in_the_tail_to_repair(
    tmp_path: Path, key: AuditKey
) -> None:
    """A crash leaves no checkpoint that fails its MAC: such a tail is not only unfinished."""
    log = write_events(tmp_path / "audit.log", 6, key=key, every=5)
    log.close()
    head = log.head_path.read_bytes()
    log.write(sample_events(6, start=6))
    log.close()
    log.head_path.write_bytes(head)
    macs = [r["mac"] for r in records(log.path) if "mac" in r]
    line = _edit_checkpoint(log.path, macs[-1], lambda doc: doc.update(mac=macs[0]))
    log.head_path.write_bytes(head)  # the head of before the second write

    report = log.verify()

    assert not report.ok and report.problem is not None
    assert report.problem.startswith("lines follow what the head record vouches for")
    assert report.problem.endswith(f"; the checkpoint at line {line} in them does not verify")


class _DownKey(NamedKey):
    """A provider that no longer answers, though still configured; counts the calls."""

    calls = 0

    def verify(self, message: bytes, mac: str) -> bool:
        self.calls += 1
        raise KmsUnavailable("the key service is gone", provider="test")


def test_an_old_provider_gone_but_still_configured_is_not_needed_once_vouched_for(
    tmp_path: Path,
) -> None:
    moved, old, new = _moved_trail(tmp_path)
    gone = _DownKey(old.key, old.name)
    unvouched = JsonlAuditLog(moved.path, key=new, read_keys=[gone])
    with pytest.raises(KmsUnavailable):  # nothing stands for its checkpoints yet
        unvouched.verify()
    moved.vouch()
    gone.calls = 0

    report = JsonlAuditLog(moved.path, key=new, read_keys=[gone]).verify()

    assert report.ok, report.problem
    assert report.vouched == 3 and gone.calls == 1  # asked once, not per checkpoint


def test_kms_migrate_warns_in_one_line_when_the_old_provider_cannot_vouch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fields have moved: a provider that cannot answer leaves the trail unvouched for,
    and says so, without failing the command."""
    moved, old, new = _moved_trail(tmp_path)
    gone = JsonlAuditLog(moved.path, fsync=False, key=new, read_keys=[_DownKey(old.key, old.name)])
    before = moved.path.read_bytes()

    _vouch_for_the_old_checkpoints(cast(Heimdall, SimpleNamespace(audit=gone)))

    captured = capsys.readouterr()
    assert captured.out == "" and moved.path.read_bytes() == before
    assert captured.err.startswith("warning: the audit trail's checkpoints of the old provider")
    assert captured.err.count("\n") == 1 and "the key service is gone" in captured.err


def test_a_forgery_after_an_old_providers_checkpoints_is_named_while_it_is_down(
    tmp_path: Path,
) -> None:
    """Not the provider's error: the forgery is the finding."""
    moved, old, new = _moved_trail(tmp_path)
    ours = [r for r in records(moved.path) if r.get("key_identifier") == "aws:new"]
    line = _edit_checkpoint(moved.path, ours[0]["mac"], lambda doc: doc.update(mac=ours[1]["mac"]))

    report = JsonlAuditLog(moved.path, key=new, read_keys=[_DownKey(old.key, old.name)]).verify()

    assert (report.ok, report.first_bad_line, report.problem) == (False, line, _FORGED)


def test_verify_names_a_provider_that_did_not_answer_though_vouched_for(tmp_path: Path) -> None:
    moved, old, new = _moved_trail(tmp_path)
    moved.vouch()
    log = JsonlAuditLog(moved.path, key=new, read_keys=[_DownKey(old.key, old.name)])

    first = log.verify()
    again = log.verify()

    assert first.ok and first.unanswered_keys == ("transit/old",)
    assert again == first  # from the prefix found good, the same report
    assert (
        "the provider of transit/old did not answer: a later checkpoint vouches for its checkpoints"
    ) in _summary(first)


def test_cli_verify_refuses_a_keyring_path_it_cannot_look_at_in_one_line(cli: Cli) -> None:
    path = cli.data_dir / ("k" * 300 + ".json")  # a name longer than the file system takes

    line = assert_one_line_error(cli.run("audit", "verify", env={"HMD_KEYRING_PATH": str(path)}))

    assert "cannot be opened" in line
