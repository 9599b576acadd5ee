"""The audit query: the emergency runbook's "every decryption under key version 3 between 02:00
and 06:00", its pages and cursors, and ``heimdall audit query``.

spec: Runbook: Emergency Key Compromise Response (step 4), Audit Log Requirements.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import os
import tracemalloc
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from audit_tools import write_events
from cli_runner import HEIMDALL, Cli, assert_one_line_error
from heimdall.audit import AuditEvent, EventType, JsonlAuditLog, Result
from heimdall.audit.query import (
    _CURSOR,
    MAX_LIMIT,
    AuditFilter,
    InvalidCursor,
    iter_audit,
    parse_time,
    query_audit,
)
from heimdall.errors import AuditError, AuditUnreadable, ConfigurationError, InvalidInput
from heimdall.kms.local import LocalKeyring

SINCE = datetime(2025, 12, 9, 2, 0, tzinfo=UTC)
UNTIL = datetime(2025, 12, 9, 6, 0, tzinfo=UTC)
WINDOW = AuditFilter(
    since=SINCE, until=UNTIL, event_types=frozenset({"crypto.decrypt"}), key_version=3
)
MS = timedelta(milliseconds=1)


def stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event(
    request_id: str,
    at: datetime,
    *,
    key_version: int | None = 3,
    event_type: EventType = EventType.DECRYPT,
    result: Result = Result.SUCCESS,
    actor: str = "svc:enrich",
) -> AuditEvent:
    return AuditEvent(
        event_type,
        actor,
        result,
        request_id,
        field_identifier=f"email:hash:{request_id}",
        key_version=key_version,
        reason="enrichment:geoip",
        timestamp=stamp(at),
    )


# The compromise window's edges, with events on and around them.
WINDOW_EVENTS = [
    event("before-since", SINCE - MS),
    event("at-since", SINCE),
    event("other-version", SINCE + timedelta(hours=1), key_version=2),
    event("encrypt", SINCE + timedelta(hours=1), event_type=EventType.ENCRYPT),
    event("no-version", SINCE + timedelta(hours=1), key_version=None),
    event("failed", SINCE + timedelta(hours=1, minutes=30), result=Result.FAILURE),
    event("lookup", SINCE + timedelta(hours=2), event_type=EventType.LOOKUP, key_version=None),
    event("before-until", UNTIL - MS),
    event("at-until", UNTIL),
    event("after", UNTIL + timedelta(hours=1)),
]
IN_WINDOW = ["at-since", "failed", "before-until"]


def write_log(path: Path, events: list[AuditEvent]) -> JsonlAuditLog:
    log = JsonlAuditLog(path, fsync=False)
    log.write(events)
    return log


def request_ids(records: list[dict[str, Any]]) -> list[str]:
    return [str(r["request_id"]) for r in records]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "audit.log"


def many(count: int, *, start: int = 0) -> list[AuditEvent]:
    """*count* events, every other one a decrypt under version 3 in the window."""
    return [
        event(
            f"e{n:03d}",
            SINCE + n * timedelta(seconds=1),
            event_type=EventType.DECRYPT if n % 2 == 0 else EventType.LOOKUP,
        )
        for n in range(start, start + count)
    ]


def all_pages(path: Path, flt: AuditFilter, limit: int) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page = query_audit(path, flt, cursor=cursor, limit=limit)
        pages.append(request_ids(page.events))
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor
        assert len(pages) < 100, "the pages never end"


# -- the compromise-window query ----------------------------------------------------------------


def test_the_compromise_window_holds_exactly_the_decrypts_of_its_key_version(
    log_path: Path,
) -> None:
    write_log(log_path, WINDOW_EVENTS)

    page = query_audit(log_path, WINDOW)

    assert request_ids(page.events) == IN_WINDOW
    assert page.next_cursor is None
    assert request_ids(list(iter_audit(log_path, WINDOW))) == IN_WINDOW
    # The records are the stored JSON objects, as written.
    stored = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert page.events == [r for r in stored if r["request_id"] in IN_WINDOW]
    assert all("hash" in r for r in page.events)


def test_a_naive_window_is_utc(log_path: Path) -> None:
    write_log(log_path, WINDOW_EVENTS)
    naive = AuditFilter(
        since=SINCE.replace(tzinfo=None),
        until=UNTIL.replace(tzinfo=None),
        event_types=frozenset({"crypto.decrypt"}),
        key_version=3,
    )
    elsewhere = AuditFilter(
        since=SINCE.astimezone(timezone(timedelta(hours=-5))),
        until=UNTIL.astimezone(timezone(timedelta(hours=9))),
        event_types=frozenset({"crypto.decrypt"}),
        key_version=3,
    )

    assert naive == elsewhere == WINDOW
    assert request_ids(query_audit(log_path, naive).events) == IN_WINDOW


def test_each_field_of_the_filter_narrows_the_match() -> None:
    record = orjson.loads(orjson.dumps(event("r", SINCE, actor="svc:a").to_dict()))

    assert AuditFilter().matches(record)
    assert AuditFilter(actor="svc:a", result="success", field_identifier="email:hash:r").matches(
        record
    )
    assert not AuditFilter(actor="svc:b").matches(record)
    assert not AuditFilter(result="failure").matches(record)
    assert not AuditFilter(field_identifier="email:hash:other").matches(record)
    assert not AuditFilter(key_version=4).matches(record)
    assert not AuditFilter(event_types=frozenset({"crypto.encrypt"})).matches(record)
    assert AuditFilter(event_types=frozenset({"crypto.encrypt", "crypto.decrypt"})).matches(record)


def test_time_stamps_compare_as_times_whatever_their_offset() -> None:
    flt = AuditFilter(since=SINCE, until=UNTIL)

    assert flt.matches({"timestamp": "2025-12-09T04:00:00.000+02:00"})  # 02:00Z: the start
    assert not flt.matches({"timestamp": "2025-12-09T03:59:59.999+02:00"})
    assert not flt.matches({"timestamp": "2025-12-09T07:00:00.000+01:00"})  # 06:00Z: the end
    assert not flt.matches({"timestamp": "not a time"})
    assert not flt.matches({})
    assert AuditFilter().matches({"timestamp": "not a time"})  # no window: not looked at


def test_key_version_matches_whole_numbers_only() -> None:
    flt = AuditFilter(key_version=1)

    assert flt.matches({"key_version": 1})
    assert not flt.matches({"key_version": True})
    assert not flt.matches({"key_version": "1"})
    assert not flt.matches({"key_version": 1.0})


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: AuditFilter(event_types=frozenset({"crypto.decrpyt"})), id="typo"),
        pytest.param(lambda: AuditFilter(event_types="crypto.decrypt"), id="one-string"),  # type: ignore[arg-type]
        pytest.param(lambda: AuditFilter(result="ok"), id="result"),
        pytest.param(lambda: AuditFilter(key_version=-1), id="negative-version"),
        pytest.param(lambda: AuditFilter(since=UNTIL, until=SINCE), id="reversed-window"),
        pytest.param(lambda: AuditFilter(since=SINCE, until=SINCE), id="empty-window"),
    ],
)
def test_a_filter_that_could_only_miss_is_invalid_input(build: Any) -> None:
    with pytest.raises(InvalidInput):
        build()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-12-09T02:00:00Z", SINCE),
        ("2025-12-09T02:00:00.000Z", SINCE),
        ("2025-12-09T02:00", SINCE),
        ("2025-12-09T03:00:00+01:00", SINCE),
    ],
)
def test_parse_time_reads_iso_8601_as_utc(text: str, expected: datetime) -> None:
    assert parse_time(text) == expected


def test_parse_time_refuses_what_is_not_a_time() -> None:
    with pytest.raises(InvalidInput, match="ISO-8601"):
        parse_time("yesterday")


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_parse_time_refuses_a_time_utc_cannot_hold(text: str) -> None:
    with pytest.raises(InvalidInput, match="years 1 to 9999"):
        parse_time(text)


# -- checkpoints, torn and uncommitted lines ------------------------------------------------------


def test_checkpoints_are_records_a_filter_may_ask_for(tmp_path: Path, log_path: Path) -> None:
    key = LocalKeyring(tmp_path / "keys" / "keyring.json").audit_key()
    write_events(log_path, 7, key=key, every=3)

    checkpoints = list(
        iter_audit(log_path, AuditFilter(event_types=frozenset({"audit.checkpoint"})))
    )
    everything = list(iter_audit(log_path, AuditFilter()))
    decrypts = list(iter_audit(log_path, AuditFilter(event_types=frozenset({"crypto.decrypt"}))))

    assert [c["events"] for c in checkpoints] == [3, 6]
    assert all("mac" in c for c in checkpoints)
    assert len(decrypts) == 7
    assert len(everything) == 9
    assert [r["event_type"] for r in everything].count("audit.checkpoint") == 2


def test_only_what_the_head_record_vouches_for_is_read(log_path: Path) -> None:
    write_log(log_path, WINDOW_EVENTS)
    uncommitted = event("uncommitted", SINCE + timedelta(minutes=5))
    with log_path.open("ab") as handle:
        handle.write(orjson.dumps(uncommitted.to_dict()) + b"\n")  # an append that never committed
        handle.write(b'{"timestamp":"2025-12-09T02:10:00.000Z","event_type":"crypto.de')  # torn

    assert request_ids(query_audit(log_path, WINDOW).events) == IN_WINDOW

    # Without a head record, every complete line is read, and still no torn one.
    (log_path.parent / "audit.log.head").unlink()
    assert request_ids(list(iter_audit(log_path, WINDOW))) == [
        "at-since",
        "failed",
        "before-until",
        "uncommitted",
    ]


@pytest.mark.parametrize("line", [b"not json", b"[1, 2]", b'"text"'])
def test_a_line_that_is_not_a_json_record_is_an_audit_error(log_path: Path, line: bytes) -> None:
    log_path.parent.mkdir(mode=0o700)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, orjson.dumps(event("ok", SINCE).to_dict()) + b"\n" + line + b"\n")
    os.close(fd)

    with pytest.raises(AuditUnreadable, match="not a JSON record") as raised:
        query_audit(log_path, AuditFilter())
    with pytest.raises(AuditError):
        list(iter_audit(log_path, AuditFilter()))
    assert "\n" not in str(raised.value)


def test_no_log_is_an_empty_answer(log_path: Path) -> None:
    page = query_audit(log_path, WINDOW)

    assert (page.events, page.next_cursor) == ([], None)
    assert list(iter_audit(log_path, WINDOW)) == []


def test_a_log_others_may_write_or_a_symlink_is_refused(tmp_path: Path, log_path: Path) -> None:
    write_log(log_path, WINDOW_EVENTS)
    log_path.chmod(0o622)
    with pytest.raises(ConfigurationError, match="writable by group or others"):
        query_audit(log_path, WINDOW)
    with pytest.raises(ConfigurationError, match="writable by group or others"):
        list(iter_audit(log_path, WINDOW))

    log_path.chmod(0o600)
    link = log_path.with_name("link.log")
    link.symlink_to(log_path)
    with pytest.raises(ConfigurationError, match="symbolic link"):
        query_audit(link, WINDOW)


# -- pages and cursors ----------------------------------------------------------------------------


def test_small_pages_visit_every_match_once_in_order(log_path: Path) -> None:
    write_log(log_path, many(61))
    flt = AuditFilter(event_types=frozenset({"crypto.decrypt"}))
    expected = [f"e{n:03d}" for n in range(0, 61, 2)]  # 31 matches

    pages = all_pages(log_path, flt, limit=4)

    assert [len(page) for page in pages] == [4] * 7 + [3]
    assert [r for page in pages for r in page] == expected
    assert request_ids(list(iter_audit(log_path, flt))) == expected


def test_a_page_holding_the_last_match_has_no_cursor(log_path: Path) -> None:
    write_log(log_path, many(16))
    flt = AuditFilter(event_types=frozenset({"crypto.decrypt"}))  # 8 matches, then a lookup

    assert all_pages(log_path, flt, limit=8) == [[f"e{n:03d}" for n in range(0, 16, 2)]]
    assert [len(page) for page in all_pages(log_path, flt, limit=4)] == [4, 4]


def test_a_cursor_goes_on_into_events_appended_since(log_path: Path) -> None:
    log = write_log(log_path, many(12))
    flt = AuditFilter(event_types=frozenset({"crypto.decrypt"}))
    first = query_audit(log_path, flt, limit=4)
    assert first.next_cursor is not None

    log.write(many(6, start=12))
    rest = query_audit(log_path, flt, cursor=first.next_cursor, limit=100)

    assert request_ids(rest.events) == ["e008", "e010", "e012", "e014", "e016"]
    assert rest.next_cursor is None


@pytest.mark.parametrize("limit", [0, -1, MAX_LIMIT + 1])
def test_a_limit_out_of_bounds_is_invalid_input(log_path: Path, limit: int) -> None:
    write_log(log_path, WINDOW_EVENTS)
    with pytest.raises(InvalidInput, match="limit must be from 1 to 10,000"):
        query_audit(log_path, WINDOW, limit=limit)


def test_the_limits_bounds_are_allowed(log_path: Path) -> None:
    write_log(log_path, WINDOW_EVENTS)
    assert len(query_audit(log_path, WINDOW, limit=1).events) == 1
    assert len(query_audit(log_path, WINDOW, limit=MAX_LIMIT).events) == 3


def _first_cursor(log_path: Path, flt: AuditFilter) -> str:
    cursor = query_audit(log_path, flt, limit=2).next_cursor
    assert cursor is not None
    return cursor


def _flip(cursor: str, index: int) -> str:
    return cursor[:index] + ("A" if cursor[index] != "A" else "B") + cursor[index + 1 :]


@pytest.mark.parametrize(
    "garble",
    [
        pytest.param(lambda c: "", id="empty"),
        pytest.param(lambda c: "abc", id="short"),
        pytest.param(lambda c: c + "A", id="long"),
        pytest.param(lambda c: "!" * len(c), id="not-base64url"),
        pytest.param(lambda c: c[:-1] + "B", id="non-canonical"),
        pytest.param(lambda c: _flip(c, 0), id="version"),
        pytest.param(lambda c: _flip(c, 8), id="offset"),
        pytest.param(lambda c: _flip(c, 20), id="digest-of-the-log"),
        pytest.param(lambda c: _flip(c, 40), id="digest-of-the-filter"),
    ],
)
def test_a_garbled_cursor_is_refused(log_path: Path, garble: Any) -> None:
    write_log(log_path, many(20))
    flt = AuditFilter(event_types=frozenset({"crypto.decrypt"}))
    cursor = _first_cursor(log_path, flt)
    garbled = garble(cursor)
    assert garbled != cursor

    with pytest.raises(InvalidCursor) as refused:
        query_audit(log_path, flt, cursor=garbled)

    assert isinstance(refused.value, InvalidInput)
    assert "\n" not in str(refused.value)


def test_a_cursor_of_another_filter_is_refused(log_path: Path) -> None:
    write_log(log_path, many(20))
    cursor = _first_cursor(log_path, AuditFilter(event_types=frozenset({"crypto.decrypt"})))

    with pytest.raises(InvalidCursor):
        query_audit(log_path, AuditFilter(event_types=frozenset({"index.lookup"})), cursor=cursor)


def test_a_forged_cursor_into_the_middle_of_a_line_is_refused(log_path: Path) -> None:
    write_log(log_path, many(20))
    flt = AuditFilter()
    data = log_path.read_bytes()
    middle = data.index(b"\n") + 10
    before = hashlib.sha256(data[max(0, middle - 512) : middle]).digest()[:16]
    packed = _CURSOR.pack(1, middle, before, flt.digest())
    forged = base64.urlsafe_b64encode(packed).decode().rstrip("=")

    with pytest.raises(InvalidCursor):
        query_audit(log_path, flt, cursor=forged)


def test_a_cursor_of_a_log_since_replaced_or_cut_back_is_refused(log_path: Path) -> None:
    write_log(log_path, many(20))
    flt = AuditFilter(event_types=frozenset({"crypto.decrypt"}))
    cursor = _first_cursor(log_path, flt)

    for name in ("audit.log", "audit.log.head"):
        (log_path.parent / name).unlink()
    write_log(log_path, many(20, start=100))  # as long, other bytes
    with pytest.raises(InvalidCursor):
        query_audit(log_path, flt, cursor=cursor)

    for name in ("audit.log", "audit.log.head"):
        (log_path.parent / name).unlink()
    write_log(log_path, many(2))  # shorter than where the cursor points
    with pytest.raises(InvalidCursor):
        query_audit(log_path, flt, cursor=cursor)

    for name in ("audit.log", "audit.log.head"):
        (log_path.parent / name).unlink()
    with pytest.raises(InvalidCursor):  # gone
        query_audit(log_path, flt, cursor=cursor)


# -- streaming ------------------------------------------------------------------------------------

BIG_LINES = 10_000
LINE_PADDING = 4000  # bytes of reason per line: a 40 MB log


def _big_log(path: Path) -> int:
    """A log of BIG_LINES records without a head record (every complete line is read); one in
    a thousand by the actor ``needle``. Its size."""
    path.parent.mkdir(mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for start in range(0, BIG_LINES, 1000):
            lines = []
            for n in range(start, start + 1000):
                record = event(f"b{n}", SINCE, actor="needle" if n % 1000 == 7 else "hay")
                doc = record.to_dict() | {"reason": "r" * LINE_PADDING}
                lines.append(orjson.dumps(doc) + b"\n")
            os.write(fd, b"".join(lines))
    finally:
        os.close(fd)
    return path.stat().st_size


def test_a_large_log_is_streamed_in_constant_memory(log_path: Path) -> None:
    size = _big_log(log_path)
    flt = AuditFilter(actor="needle")
    assert inspect.isgenerator(iter_audit(log_path, flt))  # nothing read until iterated
    matches = iter_audit(log_path, flt)

    tracemalloc.start()
    try:
        found = request_ids(list(matches))
        _, streamed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        page = query_audit(log_path, AuditFilter(actor="nobody"), limit=MAX_LIMIT)
        _, paged_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert found == [f"b{n}" for n in range(7, BIG_LINES, 1000)]
    assert page.events == []
    assert size > 40_000_000
    # A few chunks of the file at most, however long the log: not the log.
    assert streamed_peak < size // 5, streamed_peak
    assert paged_peak < size // 5, paged_peak


# -- heimdall audit query -------------------------------------------------------------------------

cli_only = pytest.mark.skipif(HEIMDALL is None, reason="the heimdall console script is missing")
WINDOW_ARGS = (
    "--event",
    "crypto.decrypt",
    "--key-version",
    "3",
    "--since",
    "2025-12-09T02:00:00Z",
    "--until",
    "2025-12-09T06:00:00Z",
)


@cli_only
def test_the_command_answers_the_compromise_window_query(cli: Cli) -> None:
    write_log(cli.data_dir / "audit.log", WINDOW_EVENTS)

    as_json = json.loads(cli.ok("audit", "query", *WINDOW_ARGS, "--json"))
    text = cli.run("audit", "query", *WINDOW_ARGS)

    assert request_ids(as_json["events"]) == IN_WINDOW
    assert as_json["next_cursor"] is None
    assert text.returncode == 0, text
    lines = text.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["2025-12-09T02:00:00.000Z", "crypto.decrypt", "success"],
        ["2025-12-09T03:30:00.000Z", "crypto.decrypt", "failure"],
        ["2025-12-09T05:59:59.999Z", "crypto.decrypt", "success"],
    ]
    assert all("key_version=3" in line.split() for line in lines)
    assert not any(part.startswith("hash=") for line in lines for part in line.split())


@cli_only
def test_the_command_pages_with_a_cursor(cli: Cli) -> None:
    write_log(cli.data_dir / "audit.log", WINDOW_EVENTS)

    first = cli.run("audit", "query", *WINDOW_ARGS, "--limit", "2")
    assert first.returncode == 0, first
    [note] = first.stderr.splitlines()
    cursor = note.rsplit("--cursor ", 1)[1]
    rest = json.loads(cli.ok("audit", "query", *WINDOW_ARGS, "--cursor", cursor, "--json"))

    assert [line.split()[0] for line in first.stdout.splitlines()] == [
        "2025-12-09T02:00:00.000Z",
        "2025-12-09T03:30:00.000Z",
    ]
    assert request_ids(rest["events"]) == ["before-until"]


@cli_only
def test_the_command_escapes_control_characters_in_its_text(cli: Cli) -> None:
    write_log(cli.data_dir / "audit.log", [event("r1", SINCE, actor="evil\x1b]0;owned\x07\nx")])

    output = cli.ok("audit", "query", "--actor", "evil\x1b]0;owned\x07\nx")

    assert "\x1b" not in output and "\x07" not in output
    assert "actor=evil\\x1b]0;owned\\x07\\nx" in output
    assert len(output.splitlines()) == 1


@cli_only
def test_reading_the_trail_needs_read_audit_and_a_refusal_is_audited(cli: Cli) -> None:
    write_log(cli.data_dir / "audit.log", WINDOW_EVENTS)

    refused = cli.run("audit", "query", *WINDOW_ARGS, env={"HMD_ROLE": "heimdall-worker"})
    allowed = cli.run("audit", "query", *WINDOW_ARGS, "--json", env={"HMD_ROLE": "heimdall-audit"})

    line = assert_one_line_error(refused)
    assert line == "error: role heimdall-worker may not read the audit trail"
    assert refused.stdout == ""
    assert allowed.returncode == 0, allowed
    assert request_ids(json.loads(allowed.stdout)["events"]) == IN_WINDOW
    [denial] = [r for r in JsonlAuditLog(cli.data_dir / "audit.log") if r["result"] == "denied"]
    assert (denial["event_type"], denial["operation"]) == ("access.denied", "read_audit")


@cli_only
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(("--since", "yesterday"), "--since: not an ISO-8601 time", id="since"),
        pytest.param(
            ("--since", "2025-12-09T06:00Z", "--until", "2025-12-09T02:00Z"),
            "since must be before until",
            id="window",
        ),
        pytest.param(("--event", "crypto.decrpyt"), "unknown event type", id="event"),
        pytest.param(("--result", "ok"), "unknown result", id="result"),
        pytest.param(("--limit", "0"), "limit must be from 1 to 10,000", id="limit-low"),
        pytest.param(("--limit", "10001"), "limit must be from 1 to 10,000", id="limit-high"),
        pytest.param(("--cursor", "A" * 44), "the cursor does not continue", id="cursor"),
    ],
)
def test_bad_query_input_is_a_one_line_error(
    cli: Cli, args: tuple[str, ...], expected: str
) -> None:
    write_log(cli.data_dir / "audit.log", WINDOW_EVENTS)

    result = cli.run("audit", "query", *args)

    assert result.returncode == 1
    assert expected in assert_one_line_error(result)
    assert result.stdout == ""
