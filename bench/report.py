"""The printed markdown table and the JSON results file."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.timing import Measurement

__all__ = ["REFERENCE_LABEL", "Result", "Row", "format_report", "write_json"]

REFERENCE_LABEL = "reference (Tink KMS envelope AEAD on this machine)"


@dataclass(frozen=True, slots=True)
class Row:
    """One benchmark: its id (first table column), what it measures, target and reference."""

    id: str
    description: str
    target: int | None = None
    reference: int | None = None


@dataclass(frozen=True, slots=True)
class Result:
    row: Row
    measurement: Measurement

    @property
    def fields_per_s(self) -> float:
        return self.measurement.median

    @property
    def us_per_field(self) -> float:
        return 1e6 / self.measurement.median

    @property
    def target_met(self) -> bool | None:
        return None if self.row.target is None else self.fields_per_s >= self.row.target

    def to_json(self) -> dict[str, Any]:
        m = self.measurement
        return {
            "id": self.row.id,
            "description": self.row.description,
            "fields_per_s": round(self.fields_per_s),
            "us_per_field": round(self.us_per_field, 3),
            "statistic": "median",
            "best_fields_per_s": round(m.best),
            "worst_fields_per_s": round(m.worst),
            "runs_fields_per_s": [round(rate) for rate in m.rates],
            "runs_seconds": [round(run.seconds, 6) for run in m.runs],
            "runs_cpu_seconds": [round(run.cpu_seconds, 6) for run in m.runs],
            "cpu_share": round(m.cpu_share, 3),
            "fields_per_cpu_s": round(m.median_per_cpu_second),
            "fields_per_run": m.fields_per_run,
            "warmup_runs": m.warmups,
            "timed_runs": len(m.runs),
            "kms_calls_per_run": m.kms_calls_per_run,
            "target_fields_per_s": self.row.target,
            "target_met": self.target_met,
            "reference_fields_per_s": self.row.reference,
        }


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _target(result: Result) -> str:
    if result.row.target is None:
        return "—"
    return f">= {_n(result.row.target)} {'met' if result.target_met else 'MISSED'}"


def _table(results: Sequence[Result]) -> list[str]:
    header = (
        "benchmark",
        "fields/s",
        "µs/field",
        "target",
        REFERENCE_LABEL,
        "runs: slowest to fastest",
    )
    rows = [
        (
            r.row.id,
            _n(r.fields_per_s),
            f"{r.us_per_field:.2f}",
            _target(r),
            _n(r.row.reference) if r.row.reference is not None else "—",
            f"{_n(r.measurement.worst)} to {_n(r.measurement.best)}",
        )
        for r in results
    ]
    widths = [max(len(cells[i]) for cells in (header, *rows)) for i in range(len(header))]
    right = (False, True, True, False, True, True)

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        )
        return "| " + " | ".join(padded) + " |"

    dashes = (
        "-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right, strict=True)
    )
    rule = "|" + "|".join(dashes) + "|"
    return [line(header), rule, *(line(cells) for cells in rows)]


def format_report(
    results: Sequence[Result],
    machine: Mapping[str, object],
    contention: Mapping[str, Mapping[str, object]],
    *,
    quick: bool,
    duration_s: float,
    json_path: Path,
) -> str:
    lines = ["## heimdall bench" + (" (--quick: small runs, indicative only)" if quick else "")]
    lines.append("")
    for key, value in machine.items():
        lines.append(f"- {key}: {value}")
    for when, snapshot in contention.items():
        for key, value in snapshot.items():
            lines.append(f"- {key} ({when}): {value}")
    lines.append("")
    lines.extend(_table(results))
    lines.append("")
    lines.append(
        "fields/s = median of the timed runs; µs/field = 10^6 / median. Each run is a fixed "
        "number of fields; warm-up runs are discarded. What each row measures: bench/README.md."
    )
    lines.append(
        "CPU time / wall time well below 1 means the runs waited: for fsync (ingest) or for a "
        "CPU busy with other work (see the pressure figures above)."
    )
    lines.append("")
    for r in results:
        m = r.measurement
        lines.append(
            f"- {r.row.id}: {len(m.runs)} timed runs of {m.fields_per_run:,} fields after "
            f"{m.warmups} warm-up; key provider calls per run: {m.kms_calls_per_run:,}; "
            f"CPU time / wall time: {m.cpu_share:.2f}"
        )
    missed = [r.row.id for r in results if r.target_met is False]
    lines.append("")
    lines.append(f"targets missed: {', '.join(missed)}" if missed else "all targets met")
    lines.append(f"total bench time {duration_s:.1f} s; results in {json_path}")
    return "\n".join(lines)


def write_json(
    path: Path,
    results: Sequence[Result],
    machine: Mapping[str, object],
    contention: Mapping[str, Mapping[str, object]],
    *,
    quick: bool,
    started_at: str,
    duration_s: float,
) -> None:
    doc = {
        "format": "heimdall.bench.v1",
        "started_at": started_at,
        "quick": quick,
        "duration_s": round(duration_s, 2),
        "statistic": "median of timed runs",
        "reference_label": REFERENCE_LABEL,
        "machine": dict(machine),
        "contention": {when: dict(snapshot) for when, snapshot in contention.items()},
        "results": [r.to_json() for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
