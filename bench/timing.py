"""Repeat a fixed-size run, discard the warm-up runs, and summarise the timed ones.

A run does its own setup, times only its hot loop with a :class:`Stopwatch` (time.perf_counter,
plus time.process_time as a diagnostic), and returns a :class:`Run`. The headline figure is the
median of the timed runs; best and worst are kept so the spread (noise from other work on the
machine) is visible next to it.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Measurement", "Run", "Stopwatch", "measure"]


@dataclass(frozen=True, slots=True)
class Run:
    """One timed run: its wall time, the CPU time this process got meanwhile, and how many key
    provider calls it made. cpu_seconds well below seconds means the run waited: for I/O
    (fsync) or for a CPU that other processes were using."""

    seconds: float
    cpu_seconds: float
    kms_calls: int = 0


class Stopwatch:
    """``with Stopwatch() as clock: ...`` then ``clock.seconds`` (perf_counter) and
    ``clock.cpu_seconds`` (process_time) of the block."""

    __slots__ = ("_cpu_start", "_start", "cpu_seconds", "seconds")

    def __init__(self) -> None:
        self._start = self._cpu_start = self.seconds = self.cpu_seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._cpu_start = time.process_time()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu_start

    def run(self, kms_calls: int = 0) -> Run:
        return Run(self.seconds, self.cpu_seconds, kms_calls)


@dataclass(frozen=True, slots=True)
class Measurement:
    fields_per_run: int
    warmups: int
    runs: tuple[Run, ...]

    @property
    def rates(self) -> tuple[float, ...]:
        """fields/s of each timed run, in the order they ran."""
        return tuple(self.fields_per_run / run.seconds for run in self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def best(self) -> float:
        return max(self.rates)

    @property
    def worst(self) -> float:
        return min(self.rates)

    @property
    def median_per_cpu_second(self) -> float:
        """Median of fields per CPU-second: less sensitive to other processes taking the CPU,
        blind to time spent waiting for I/O."""
        return statistics.median(
            self.fields_per_run / max(run.cpu_seconds, 1e-9) for run in self.runs
        )

    @property
    def cpu_share(self) -> float:
        """CPU time over wall time, summed over the timed runs."""
        return sum(run.cpu_seconds for run in self.runs) / sum(run.seconds for run in self.runs)

    @property
    def kms_calls_per_run(self) -> int:
        return self.runs[-1].kms_calls


def measure(
    name: str,
    run: Callable[[], Run],
    *,
    fields_per_run: int,
    repetitions: int,
    warmups: int,
    warmup: Callable[[], Run] | None = None,
) -> Measurement:
    """Call *warmup* (default: *run*) ``warmups`` times, discarded; then *run* ``repetitions``
    times, kept."""
    if repetitions < 1 or warmups < 0:
        raise ValueError("need at least one timed run and no negative warm-up count")
    print(f"  {name}: {warmups} warm-up + {repetitions} timed runs", file=sys.stderr, flush=True)
    for _ in range(warmups):
        (warmup or run)()
    return Measurement(fields_per_run, warmups, tuple(run() for _ in range(repetitions)))
