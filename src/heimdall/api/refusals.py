"""How many refusals of one address the audit trail records one by one.

Every refusal at authentication (401, and the 403 of an identity with no heimdall role or with
several) is an ``access.denied`` event. Left at that, anyone who can reach the server could
append to the audit trail as fast as they can send requests, until the disk is full; and then
every audited operation is refused, for the trail fails closed. So, per source address, the
first ``HMD_API_REFUSALS_PER_MINUTE`` refusals of each minute are audited one by one and the
rest are counted: one ``access.denied`` event names the address and how many there were
(:data:`COUNTED`), written with the next refusal audited after that minute, from any address,
or when the server stops. An IPv6 address counts by its /64, which one host may hold whole;
and from all addresses together at most ten addresses' worth are audited one by one in a
minute, the rest counted under :data:`ANY_ADDRESS`, so that many addresses at once grow the
trail no faster than ten. The trail so holds every refusal, the ones past the limits as
numbers. The addresses followed at once are bounded; the oldest minute is counted out first.
``0`` audits every refusal one by one.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["ANY_ADDRESS", "COUNTED", "RefusalBudget"]

COUNTED: Final = "refusals past the limit of one minute, counted"
ANY_ADDRESS: Final = "(many addresses)"
WINDOW_SECONDS: Final = 60.0
MAX_SOURCES: Final = 10_000
# Refusals audited one by one in a minute, from every address together: as many as this many
# addresses at their own limit.
ADDRESSES_AT_THE_LIMIT: Final = 10


@dataclass
class _Minute:
    started: float
    audited: int = 0
    counted: int = 0


class RefusalBudget:
    """Which refusals are audited one by one, and the counts of the others. Thread-safe."""

    def __init__(
        self,
        per_minute: int,
        *,
        window_seconds: float = WINDOW_SECONDS,
        max_sources: int = MAX_SOURCES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_minute = per_minute
        self._all_per_minute = per_minute * ADDRESSES_AT_THE_LIMIT
        self._window = window_seconds
        self._max_sources = max_sources
        self._monotonic = monotonic
        self._lock = threading.Lock()
        # By the start of their minute, oldest first (all minutes are as long).
        self._minutes: OrderedDict[str, _Minute] = OrderedDict()
        self._all = _Minute(-math.inf)  # every address's refusals together

    def admit(self, source: str) -> tuple[bool, list[tuple[str, int]]]:
        """Whether a refusal from *source* now is audited one by one; and the counts of the
        minutes that ended (or that no longer fit), by address, to audit with it."""
        if self._per_minute <= 0:
            return True, []
        now = self._monotonic()
        key = _source_key(source)
        with self._lock:
            ended = self._take_ended(now, room=key not in self._minutes)
            everyone = self._all
            if now - everyone.started >= self._window:
                if everyone.counted:
                    ended.append((ANY_ADDRESS, everyone.counted))
                everyone = self._all = _Minute(now)
            minute = self._minutes.get(key)
            if minute is not None and minute.audited >= self._per_minute:
                minute.counted += 1
                return False, ended
            if everyone.audited >= self._all_per_minute:
                # Many addresses at once (one caller with many, as IPv6 gives): counted
                # together, with no address followed for it.
                everyone.counted += 1
                return False, ended
            if minute is None:
                minute = self._minutes[key] = _Minute(now)
            minute.audited += 1
            everyone.audited += 1
            return True, ended

    def drain(self) -> list[tuple[str, int]]:
        """Every count not audited yet (the server is stopping)."""
        with self._lock:
            counts = [(source, m.counted) for source, m in self._minutes.items() if m.counted]
            if self._all.counted:
                counts.append((ANY_ADDRESS, self._all.counted))
            self._minutes.clear()
            self._all = _Minute(-math.inf)
        return counts

    def _take_ended(self, now: float, *, room: bool) -> list[tuple[str, int]]:
        """Take out the minutes that ended and, if *room* is needed for a new address, the
        oldest ones beyond the bound; their counts."""
        ended = []
        while self._minutes:
            source, minute = next(iter(self._minutes.items()))
            full = room and len(self._minutes) >= self._max_sources
            if now - minute.started < self._window and not full:
                break
            del self._minutes[source]
            if minute.counted:
                ended.append((source, minute.counted))
        return ended


def _source_key(source: str) -> str:
    """The address a refusal is counted under: an IPv6 address by its /64, which one host is
    commonly given whole, an IPv4 address as it is."""
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return source
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
