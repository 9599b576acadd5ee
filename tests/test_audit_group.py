"""Group commit: threads of one process writing to one audit sink at once share its appends.

Each thread returns only once its own events are committed; a group whose append fails refuses
every member's operation and leaves the trail as it was.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from audit_tools import records, sample_events
from heimdall.audit import AuditEvent, EventType, JsonlAuditLog, Result
from heimdall.audit.events import Joined
from heimdall.audit.group import GroupCommit
from heimdall.errors import AuditError
from heimdall.kms.base import AuditKey
from heimdall.kms.local import LocalKeyring

WRITERS = 16


class GatedFlush:
    """A flush that records each group and holds the first one until released."""

    def __init__(self, fail_after_first: BaseException | None = None) -> None:
        self.groups: list[list[int]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()
        self.fail_after_first = fail_after_first

    def __call__(self, events: Sequence[AuditEvent]) -> None:
        self.groups.append([event.count or 0 for event in events])
        if len(self.groups) == 1:
            self.first_started.set()
            assert self.release.wait(10)
        elif self.fail_after_first is not None:
            raise self.fail_after_first


def _gathered(commit: GroupCommit, count: int) -> None:
    """Wait until *count* events wait for the next append."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        group = commit._gathering
        if group is not None and len(group.events()) == count:
            return
        time.sleep(0.001)
    raise AssertionError(f"{count} events never gathered")


def _writers(
    commit: GroupCommit, first: int, count: int
) -> tuple[list[threading.Thread], dict[int, BaseException | None]]:
    outcomes: dict[int, BaseException | None] = {}

    def write(n: int) -> None:
        try:
            commit.write(sample_events(1, start=n))
        except BaseException as exc:
            outcomes[n] = exc
        else:
            outcomes[n] = None

    threads = [threading.Thread(target=write, args=(n,)) for n in range(first, first + count)]
    for thread in threads:
        thread.start()
    return threads, outcomes


def test_writers_that_arrive_during_an_append_share_the_next_one() -> None:
    flush = GatedFlush()
    commit = GroupCommit(flush)
    leader, led = _writers(commit, 0, 1)
    assert flush.first_started.wait(10)
    followers, outcomes = _writers(commit, 1, 5)
    _gathered(commit, 5)
    assert all(thread.is_alive() for thread in followers)  # not committed yet: still waiting
    flush.release.set()
    for thread in leader + followers:
        thread.join(10)

    assert led == {0: None} and outcomes == dict.fromkeys(range(1, 6))
    assert flush.groups[0] == [0]
    assert sorted(flush.groups[1]) == [1, 2, 3, 4, 5] and len(flush.groups) == 2


def test_a_list_its_writer_changes_while_it_waits_is_committed_as_it_was_written() -> None:
    flush = GatedFlush()
    commit = GroupCommit(flush)
    leader, _ = _writers(commit, 0, 1)
    assert flush.first_started.wait(10)
    mine = sample_events(2, start=10)
    writer = threading.Thread(target=commit.write, args=(mine,))
    writer.start()
    _gathered(commit, 2)

    mine[:] = sample_events(3, start=20)  # the caller reuses its list before write returns
    flush.release.set()
    for thread in [*leader, writer]:
        thread.join(10)

    assert flush.groups == [[0], [10, 11]]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (AuditError("audit log x cannot be written (No space left on device)"), "No space left"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
    ],
)
def test_a_failed_group_append_refuses_every_member_with_an_error_of_its_own(
    error: BaseException, expected: str
) -> None:
    flush = GatedFlush(fail_after_first=error)
    commit = GroupCommit(flush)
    leader, led = _writers(commit, 0, 1)
    assert flush.first_started.wait(10)
    followers, outcomes = _writers(commit, 1, 4)
    _gathered(commit, 4)
    flush.release.set()
    for thread in leader + followers:
        thread.join(10)

    assert led == {0: None}
    assert len(flush.groups) == 2
    raised = list(outcomes.values())
    the_leader = [exc for exc in raised if exc is error]
    assert len(the_leader) == 1  # the thread that ran the append has the flush's own exception
    others = [exc for exc in raised if exc is not error]
    assert len(others) == 3 and all(isinstance(exc, AuditError) for exc in others)
    assert all(expected in str(exc) for exc in others)
    assert len({id(exc) for exc in others}) == 3  # never one exception object in two threads
    # The next writer is not stuck behind the failed group.
    flush.fail_after_first = None
    commit.write(sample_events(1, start=9))
    assert flush.groups[-1] == [9]


def test_a_writer_interrupted_while_it_waits_takes_its_events_back() -> None:
    """Interrupted (KeyboardInterrupt) before its group's append began, a writer's events are
    not committed later on behalf of an operation that was refused."""
    main = threading.main_thread()
    assert threading.current_thread() is main  # where Python raises KeyboardInterrupt
    flush = GatedFlush()
    commit = GroupCommit(flush)
    leader, _ = _writers(commit, 0, 1)
    assert flush.first_started.wait(10)

    def interrupt() -> None:
        _gathered(commit, 1)
        assert main.ident is not None
        signal.pthread_kill(main.ident, signal.SIGINT)  # a real signal: it interrupts the wait

    interrupter = threading.Thread(target=interrupt)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        commit.write(sample_events(1, start=1))
    interrupter.join(10)
    later, outcomes = _writers(commit, 2, 1)
    _gathered(commit, 1)
    flush.release.set()
    for thread in leader + later:
        thread.join(10)
    assert outcomes == {2: None}
    assert flush.groups == [[0], [2]]


def test_a_checkpoint_event_is_refused_before_it_joins_a_group() -> None:
    flush = GatedFlush()
    commit = GroupCommit(flush)
    checkpoint = AuditEvent(EventType.AUDIT_CHECKPOINT, "heimdall", Result.SUCCESS, "req-1")
    with pytest.raises(ValueError, match="written by the audit log itself"):
        commit.write([*sample_events(1), checkpoint])
    assert flush.groups == [] and commit._gathering is None


def test_a_checkpoint_among_joined_events_is_refused_by_the_log(tmp_path: Path) -> None:
    log = JsonlAuditLog(tmp_path / "audit.log", fsync=False)
    checkpoint = AuditEvent(EventType.AUDIT_CHECKPOINT, "heimdall", Result.SUCCESS, "req-1")
    joined = Joined((sample_events(2), Joined((sample_events(1, start=5), [checkpoint]))))

    with pytest.raises(ValueError, match="written by the audit log itself"):
        log.append(joined)
    assert not (tmp_path / "audit.log").exists()


@pytest.fixture
def key(tmp_path: Path) -> AuditKey:
    return LocalKeyring(tmp_path / "keys" / "keyring.json").audit_key()


def test_many_threads_writing_at_once_commit_every_event_once_in_fewer_appends(
    tmp_path: Path, key: AuditKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = JsonlAuditLog(tmp_path / "audit.log", key=key, checkpoint_every=7)
    appends = 0
    real_append = log.append

    def counted(events: Sequence[AuditEvent]) -> list[bytes]:
        nonlocal appends
        appends += 1
        return real_append(events)

    monkeypatch.setattr(log, "append", counted)
    log._group = GroupCommit(log.append)
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # a disk slow enough that writers pile up
        time.sleep(0.01)
        real_fsync(fd)

    monkeypatch.setattr("heimdall.audit.jsonl.os.fsync", slow_fsync)
    per_writer = 5
    start = threading.Barrier(WRITERS)

    def write(n: int) -> None:
        start.wait()
        for k in range(per_writer):
            log.write(sample_events(1, start=n * per_writer + k))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    log.close()

    written = [r["count"] for r in records(log.path) if r["event_type"] == "crypto.decrypt"]
    assert sorted(written) == list(range(WRITERS * per_writer))
    assert appends < WRITERS * per_writer / 2
    report = log.verify()
    assert report.ok and report.events == WRITERS * per_writer
    assert report.events_after_checkpoint == 0
