"""Write synthetic people records as JSON Lines for the examples and demos.

Every value is fabricated and deliberately unusable as a real identifier:

* e-mail addresses use only the reserved domains example.com/.org/.net (RFC 2606);
* phone numbers use the fictional 555-0100..555-0199 range;
* SSNs use the never-issued 9xx area number;
* IP addresses come from the documentation ranges 192.0.2.0/24, 198.51.100.0/24,
  203.0.113.0/24 (RFC 5737) and 2001:db8::/32 (RFC 3849).

About 15% of the records reuse the e-mail or phone of an earlier record with different
capitalisation or formatting, so de-duplication after normalisation is visible, and about
5% omit a field or set it to null. Some records carry an extra "notes" field, which a
policy that lists its fields should drop.

Usage: python scripts/make_people.py OUT.jsonl [--count N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

DEFAULT_COUNT = 300
DEFAULT_SEED = 20240601

DUPLICATE_RATE = 0.15
MISSING_RATE = 0.05
NOTES_RATE = 0.10

SOURCES = ("crm", "web-signup", "support")
SIGNUP_CHANNELS = ("organic", "referral", "newsletter", "partner", "event", "paid-search")
COUNTRIES = ("US", "GB", "DE", "FR", "CA", "NL", "SE", "ES", "IT", "AU")
EMAIL_DOMAINS = ("example.com", "example.org", "example.net")
AREA_CODES = ("202", "206", "303", "312", "404", "415", "512", "617", "702", "808")

FIRST_NAMES = (
    "Alice", "Bram", "Carla", "Dorian", "Elsa", "Felix", "Greta", "Hugo",
    "Ines", "Jonas", "Kara", "Lionel", "Mira", "Nils", "Orla", "Pavel",
    "Quinn", "Rosa", "Silas", "Tilda", "Umar", "Vera", "Wendel", "Yara",
)  # fmt: skip
LAST_NAMES = (
    "Smith", "Ashdown", "Brennick", "Calloway", "Dunmore", "Ellery", "Fenwick",
    "Garrow", "Hollis", "Ingram", "Jessop", "Kettering", "Lindqvist", "Marlow",
    "Norberg", "Oakes", "Pemberton", "Quarles", "Rowntree", "Sutter", "Thorne",
)  # fmt: skip
STREETS = (
    "Maplewood Lane", "Quillfeather Road", "Harrowgate Street", "Bramblecourt Avenue",
    "Lanternfield Drive", "Mossbank Way", "Copperbeech Close", "Willowmere Boulevard",
)  # fmt: skip
CITIES = ("Springfield", "Riverton", "Fairview", "Lakewood", "Greenville", "Oakridge")
NOTES = (
    "prefers contact by e-mail",
    "asked about the annual plan",
    "migrated from legacy system",
    "do not call before 10am",
    "VIP - escalate tickets",
)
OPTIONAL_FIELDS = ("phone", "ssn", "date_of_birth", "address", "ip", "country", "signup_channel")

DOB_START = date(1950, 1, 1)
DOB_END = date(2005, 12, 31)

Record = dict[str, Any]


def make_email(rng: random.Random, first: str, last: str) -> str:
    """An address on a reserved domain derived from the name, in lower case."""
    style = rng.randrange(3)
    if style == 0:
        local = f"{first}.{last}"
    elif style == 1:
        local = f"{first[0]}{last}"
    else:
        local = f"{first}_{last}{rng.randrange(10, 100)}"
    return f"{local.lower()}@{rng.choice(EMAIL_DOMAINS)}"


def format_phone(rng: random.Random, area: str, line: str) -> str:
    """A fictional 555-01xx number in one of several common notations."""
    style = rng.randrange(5)
    if style == 0:
        return f"+1 ({area}) 555-{line}"
    if style == 1:
        return f"{area}.555.{line}"
    if style == 2:
        return f"({area}) 555-{line}"
    if style == 3:
        return f"+1{area}555{line}"
    return f"{area}-555-{line}"


def make_phone(rng: random.Random) -> str:
    area = rng.choice(AREA_CODES)
    line = f"01{rng.randrange(100):02d}"
    return format_phone(rng, area, line)


def phone_key(phone: str) -> str:
    """The last ten digits, which identify a number whatever its notation."""
    return "".join(ch for ch in phone if ch.isdigit())[-10:]


def reformat_phone(rng: random.Random, phone: str) -> str:
    """The same number as ``phone`` written in a different notation."""
    digits = phone_key(phone)
    area, line = digits[:3], digits[6:]
    for _ in range(10):
        candidate = format_phone(rng, area, line)
        if candidate != phone:
            return candidate
    return f"+1 {area} 555 {line}"


def recase_email(rng: random.Random, email: str) -> str:
    """The same address as ``email`` with different capitalisation."""
    local, domain = email.split("@", 1)
    style = rng.randrange(3)
    if style == 0:
        parts = [p.capitalize() for p in local.replace("_", ".").split(".")]
        sep = "_" if "_" in local else "."
        return f"{sep.join(parts)}@{domain.capitalize()}"
    if style == 1:
        return email.upper()
    return f"{local.capitalize()}@{domain.upper()}"


def make_ssn(rng: random.Random) -> str:
    return f"9{rng.randrange(100):02d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"


def make_dob(rng: random.Random) -> str:
    span = (DOB_END - DOB_START).days
    return (DOB_START + timedelta(days=rng.randrange(span + 1))).isoformat()


def make_address(rng: random.Random) -> str:
    return f"{rng.randrange(1, 9999)} {rng.choice(STREETS)}, {rng.choice(CITIES)}, USA"


def make_ip(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return f"2001:db8:{rng.randrange(0x10000):x}::{rng.randrange(1, 0x10000):x}"
    prefix = rng.choice(("192.0.2", "198.51.100", "203.0.113"))
    return f"{prefix}.{rng.randrange(1, 255)}"


def fresh(make: Callable[[], str], used: set[str], key: Callable[[str], str]) -> str:
    """A value from ``make`` whose ``key`` has not been used yet, so that only the
    deliberate duplicates share an e-mail or phone with an earlier record."""
    value = make()
    for _ in range(1000):
        if key(value) not in used:
            break
        value = make()
    # With a very large --count the fictional ranges run out; then repeats are allowed.
    used.add(key(value))
    return value


def make_record(
    rng: random.Random,
    index: int,
    earlier: list[Record],
    used_emails: set[str],
    used_phones: set[str],
) -> Record:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    record: Record = {
        "id": f"p-{index:04d}",
        "source": rng.choice(SOURCES),
        "name": f"{first} {last}",
        "email": fresh(lambda: make_email(rng, first, last), used_emails, str.lower),
        "phone": fresh(lambda: make_phone(rng), used_phones, phone_key),
        "ssn": make_ssn(rng),
        "date_of_birth": make_dob(rng),
        "address": make_address(rng),
        "ip": make_ip(rng),
        "country": rng.choice(COUNTRIES),
        "signup_channel": rng.choice(SIGNUP_CHANNELS),
    }

    if earlier and rng.random() < DUPLICATE_RATE:
        # The same person arriving through another source: same name, and the
        # e-mail and/or phone of the earlier record written differently.
        original = rng.choice(earlier)
        record["name"] = original["name"]
        what = rng.randrange(3)
        if what in (0, 2) and original.get("email"):
            record["email"] = recase_email(rng, original["email"])
        if what in (1, 2) and original.get("phone"):
            record["phone"] = reformat_phone(rng, original["phone"])
        if what == 0 and not original.get("email") and original.get("phone"):
            record["phone"] = reformat_phone(rng, original["phone"])
        if what == 1 and not original.get("phone") and original.get("email"):
            record["email"] = recase_email(rng, original["email"])

    if rng.random() < MISSING_RATE:
        field = rng.choice(OPTIONAL_FIELDS)
        if rng.random() < 0.5:
            del record[field]
        else:
            record[field] = None

    if rng.random() < NOTES_RATE:
        record["notes"] = rng.choice(NOTES)

    return record


def generate(count: int, seed: int) -> list[Record]:
    # Synthetic demo data, not cryptography: a seeded PRNG keeps the output reproducible.
    rng = random.Random(seed)  # noqa: S311
    records: list[Record] = []
    used_emails: set[str] = set()
    used_phones: set[str] = set()
    for index in range(1, count + 1):
        records.append(make_record(rng, index, records, used_emails, used_phones))
    return records


def write_jsonl(path: Path, records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write synthetic people records as JSON Lines.")
    parser.add_argument("out", type=Path, help="output file (JSON Lines)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="number of records")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    args = parser.parse_args(argv)
    if args.count < 0:
        parser.error("--count must not be negative")
    write_jsonl(args.out, generate(args.count, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
