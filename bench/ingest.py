"""Ingest of synthetic people records into SQLite through heimdall.ingest.ingest_lines.

Each run gets a fresh temporary data directory and the default Settings (local keyring, SQLite,
hash-chained audit log with fsync on), so nothing is deduplicated against an earlier run. Every
record has seven encrypt fields whose values are unique per record, so fields encrypted is
exactly records x 7; the run fails loudly if the report says otherwise.

Synthetic values are unusable as real identifiers: example.com e-mail addresses, the fictional
555-01xx phone range, never-issued 9xx SSNs, and the 2001:db8::/32 documentation IPv6 range.
"""

from __future__ import annotations

import ipaddress
import json
import tempfile
from datetime import date, timedelta
from pathlib import Path

from bench.timing import Run, Stopwatch
from heimdall.app import build
from heimdall.ingest import ingest_lines
from heimdall.rbac import Caller
from heimdall.settings import Settings

__all__ = ["BATCH_SIZE", "ENCRYPT_FIELDS", "MAX_RECORDS", "ingest_run", "synthetic_lines"]

ENCRYPT_FIELDS = ("email", "phone", "ssn", "name", "address", "date_of_birth", "ip")
BATCH_SIZE = 1000
# Bounded by the unique phone numbers (800 area codes x 100 fictional lines) and birth dates.
MAX_RECORDS = 40_000

_FIRST = (
    "Alice", "Bram", "Carla", "Dorian", "Elsa", "Felix", "Greta", "Hugo",
    "Ines", "Jonas", "Kara", "Lionel", "Mira", "Nils", "Orla", "Pavel",
)  # fmt: skip
_LAST = (
    "Ashdown", "Brennick", "Calloway", "Dunmore", "Ellery", "Fenwick", "Garrow", "Hollis",
    "Ingram", "Jessop", "Kettering", "Lindqvist", "Marlow", "Norberg", "Oakes", "Pemberton",
)  # fmt: skip
# Two-letter syllables with distinct spellings: five of them spell any i below 12**5 uniquely.
_SYLLABLES = ("ba", "ke", "lo", "mi", "nu", "ra", "se", "ti", "vo", "za", "do", "fe")
_STREETS = ("Maplewood Lane", "Quillfeather Road", "Harrowgate Street", "Mossbank Way")
_CITIES = ("Springfield", "Riverton", "Fairview", "Lakewood", "Oakridge")
_COUNTRIES = ("US", "GB", "DE", "FR", "CA", "NL")
_DOB_START = date(1920, 1, 1)
_IPV6_DOC = int(ipaddress.IPv6Address("2001:db8::"))


def _middle_name(i: int) -> str:
    base = len(_SYLLABLES)
    parts = []
    for _ in range(5):
        i, digit = divmod(i, base)
        parts.append(_SYLLABLES[digit])
    return "".join(parts).capitalize()


def synthetic_record(i: int) -> dict[str, str]:
    first = _FIRST[i % len(_FIRST)]
    last = _LAST[(i // len(_FIRST)) % len(_LAST)]
    return {
        "id": f"bench-{i:07d}",
        "source": "bench",
        "email": f"{first}.{last}.{i:06d}@example.com".lower(),
        "phone": f"+1 {200 + i // 100:03d}-555-01{i % 100:02d}",
        "ssn": f"9{(i // 1_000_000) % 100:02d}-{(i // 10_000) % 100:02d}-{i % 10_000:04d}",
        "name": f"{first} {_middle_name(i)} {last}",
        "address": f"{1 + i} {_STREETS[i % len(_STREETS)]}, {_CITIES[i % len(_CITIES)]}, USA",
        "date_of_birth": (_DOB_START + timedelta(days=i)).isoformat(),
        "ip": str(ipaddress.IPv6Address(_IPV6_DOC + i)),
        "country": _COUNTRIES[i % len(_COUNTRIES)],
    }


def synthetic_lines(count: int, *, start: int = 0) -> tuple[str, ...]:
    """*count* JSON Lines records, all values unique per record across [start, start+count)."""
    if start < 0 or start + count > MAX_RECORDS:
        raise ValueError(f"synthetic records are unique only for indexes below {MAX_RECORDS}")
    return tuple(json.dumps(synthetic_record(i)) for i in range(start, start + count))


def ingest_run(lines: tuple[str, ...]) -> Run:
    """Ingest *lines* into a fresh store. Times the ingest_lines call only."""
    with tempfile.TemporaryDirectory(prefix="heimdall-bench-") as tmp:
        heimdall = build(Settings(data_dir=Path(tmp)))
        try:
            caller = Caller(actor="bench")
            # Created once per store, so made before the clock starts.
            heimdall.blind_index(caller)
            kms_before = heimdall.router.writer.kms_calls
            with Stopwatch() as clock:
                report = ingest_lines(
                    heimdall, lines, caller=caller, source_name="bench", batch_size=BATCH_SIZE
                )
            kms_calls = heimdall.router.writer.kms_calls - kms_before
        finally:
            heimdall.close()
    expected = len(lines) * len(ENCRYPT_FIELDS)
    if (
        report.errors
        or report.records != len(lines)
        or report.fields_encrypted != expected
        or report.fields_deduplicated
    ):
        raise AssertionError(
            f"ingest did not encrypt every field: {report.records} records, "
            f"{report.fields_encrypted}/{expected} fields encrypted, "
            f"{report.fields_deduplicated} deduplicated, {len(report.errors)} errors"
        )
    return clock.run(kms_calls)
