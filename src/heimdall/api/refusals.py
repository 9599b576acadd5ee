"""How many refusals of one address the audit trail records one by one.

Every refusal at authentication (401, and the 403 of an identity with no heimdall role or with
several) is an ``access.denied`` event. Left at that, anyone who can reach the server could
append to the audit trail as fast as they can send requests, until the disk is full; and then
every audited operation is refused, for the trail fails closed. So, per source address, the
first ``HMD_API_REFUSALS_PER_MINUTE`` refusals of each minute are audited one by one and the
rest are counted: one ``access.denied`` event names the address and how many there were
(:data:`COUNTED`), written with the next refusal audited after that minute, from any address,
or when the server stops. The trail so holds every refusal, the ones past the limit as a
number. The addresses followed at once are bounded; the oldest minute is counted out first.
``0`` audits every refusal one by one.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["COUNTED", "RefusalBudget"]

COUNTED: Final = "refusals past the limit of one minute, counted"
WINDOW_SECONDS: Final = 60.0
MAX_SOURCES: Final = 10_000


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
        self._window = window_seconds
        self._max_sources = max_sources
        self._monotonic = monotonic
        self._lock = threading.Lock()
        # By the start of their minute, oldest first (all minutes are as long).
        self._minutes: OrderedDict[str, _Minute] = OrderedDict()

    def admit(self, source: str) -> tuple[bool, list[tuple[str, int]]]:
        """Whether a refusal from *source* now is audited one by one; and the counts of the
        minutes that ended (or that no longer fit), by address, to audit with it."""
        if self._per_minute <= 0:
            return True, []
        now = self._monotonic()
        with self._lock:
            ended = self._take_ended(now, room=source not in self._minutes)
            minute = self._minutes.get(source)
            if minute is None:
                minute = self._minutes[source] = _Minute(now)
            if minute.audited < self._per_minute:
                minute.audited += 1
                return True, ended
            minute.counted += 1
            return False, ended

    def drain(self) -> list[tuple[str, int]]:
        """Every count not audited yet (the server is stopping)."""
        with self._lock:
            counts = [(source, m.counted) for source, m in self._minutes.items() if m.counted]
            self._minutes.clear()
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
