"""Refusals at authentication past a limit per address and minute are counted, not audited one
by one (heimdall.api.refusals): in process with a clock of the test's, and on a real server,
where an anonymous flood of refusals cannot grow the audit trail without bound and the counts
still reach it (at the latest when the server stops).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from api_server import audit_records, start_server
from heimdall.api.refusals import ANY_ADDRESS, COUNTED, RefusalBudget


def test_past_the_limit_refusals_are_counted_and_the_count_comes_with_a_later_one() -> None:
    clock = [0.0]
    budget = RefusalBudget(3, monotonic=lambda: clock[0])
    assert [budget.admit("10.0.0.1") for _ in range(5)] == [(True, [])] * 3 + [(False, [])] * 2
    assert budget.admit("10.0.0.2") == (True, [])  # another address has its own limit
    clock[0] = 61.0
    assert budget.admit("10.0.0.3") == (True, [("10.0.0.1", 2)])
    assert budget.admit("10.0.0.1") == (True, [])  # a new minute
    assert budget.drain() == []


def test_counts_not_yet_audited_are_drained_and_the_addresses_followed_are_bounded() -> None:
    budget = RefusalBudget(1, max_sources=2, monotonic=lambda: 0.0)
    for address in ("a", "a", "a", "b", "b"):
        budget.admit(address)
    assert budget.admit("c") == (True, [("a", 2)])  # the oldest minute is counted out
    assert budget.drain() == [("b", 1)]


def test_an_ipv6_slash_64_is_one_address() -> None:
    budget = RefusalBudget(2, monotonic=lambda: 0.0)
    admitted = [budget.admit(f"2001:db8:0:1::{n:x}")[0] for n in range(5)]
    assert admitted == [True, True, False, False, False]
    assert budget.admit("2001:db8:0:2::1")[0] is True  # another /64
    assert budget.drain() == [("2001:db8:0:1::/64", 3)]


def test_many_addresses_at_once_are_audited_as_ten_at_their_limit_then_counted() -> None:
    clock = [0.0]
    budget = RefusalBudget(2, monotonic=lambda: clock[0])
    admitted = [budget.admit(f"10.1.{n // 250}.{n % 250}")[0] for n in range(25)]
    assert admitted == [True] * 20 + [False] * 5
    clock[0] = 61.0
    assert budget.admit("10.9.9.9") == (True, [(ANY_ADDRESS, 5)])


def test_no_limit_audits_every_refusal() -> None:
    budget = RefusalBudget(0)
    assert all(budget.admit("a") == (True, []) for _ in range(1000))


def test_an_anonymous_flood_is_audited_up_to_the_limit_then_counted(tmp_path: Path) -> None:
    server = start_server(tmp_path, {"HMD_API_REFUSALS_PER_MINUTE": "5"})
    try:
        with server.client("hmd_" + "A" * 43) as anonymous:
            for _ in range(12):
                assert anonymous.get("/readyz").status_code == 401
        one_by_one = [
            e
            for e in audit_records(server.audit_log)
            if e["event_type"] == "access.denied" and e.get("operation") == "GET /readyz"
        ]
        assert len(one_by_one) == 5
        os.kill(server.proc.pid, signal.SIGTERM)
        assert server.proc.wait(timeout=15) == 0
    finally:
        server.stop()
    (counted,) = [e for e in audit_records(server.audit_log) if e.get("operation") == COUNTED]
    assert (counted["event_type"], counted["count"], counted["source_ip"]) == (
        "access.denied",
        7,
        "127.0.0.1",
    )
    assert counted["result"] == "denied"
