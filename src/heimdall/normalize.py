"""Normalisers that put a PII value into the canonical form its blind index is computed over.

Invariants:

* Values that mean the same thing normalise to the same string (``" Alice@Example.COM "`` and
  ``"alice@example.com"``), so equal values share one blind index and one stored field.
* Every normaliser is idempotent: ``normalize(n, normalize(n, v)) == normalize(n, v)``.
* Normalisation only feeds the blind index; the value that is encrypted and stored is never
  changed by it.
* A value that cannot be normalised raises :class:`ValueError` whose message describes what was
  expected and never contains the value itself, because the value is PII.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import unicodedata
from collections.abc import Callable
from datetime import date
from typing import Final

__all__ = ["Normalizer", "normalize"]

MIN_PHONE_DIGITS: Final = 5


class Normalizer(enum.StrEnum):
    """How a field's value is canonicalised before its blind index is computed."""

    EXACT = "exact"  # byte-for-byte as given
    TEXT = "text"  # NFKC, casefold, whitespace runs collapsed to one space, stripped
    EMAIL = "email"  # NFKC, stripped, lowercased; exactly one "@" between non-empty parts
    PHONE = "phone"  # a leading "+" and the digits; at least MIN_PHONE_DIGITS digits
    DIGITS = "digits"  # the digits only (SSN "123-45-6789" -> "123456789"); at least one
    DATE = "date"  # YYYY-MM-DD, YYYY/MM/DD or DD.MM.YYYY -> ISO 8601 YYYY-MM-DD
    IP = "ip"  # ipaddress canonical form: IPv4 dotted quad, IPv6 compressed lowercase


def _nfkc(value: str) -> str:
    return unicodedata.normalize("NFKC", value)


def _exact(value: str) -> str:
    return value


def _text(value: str) -> str:
    # NFKC again after casefold: casefolding can produce sequences NFKC would rewrite, and
    # without the second pass the result would not be idempotent.
    folded = _nfkc(_nfkc(value).casefold())
    # str.split() with no argument splits on every Unicode whitespace run and drops the ends.
    return " ".join(folded.split())


def _email(value: str) -> str:
    # Same double NFKC as _text, for the same reason (lower() can denormalise).
    canonical = _nfkc(_nfkc(value).lower()).strip()
    local, at, domain = canonical.partition("@")
    if not at or not local or not domain or "@" in domain:
        raise ValueError("not a valid email address (expected exactly one '@' between two parts)")
    return canonical


def _ascii_digits(value: str) -> str:
    # Any script's decimal digits (full-width, Arabic-Indic, ...) count, mapped to ASCII, so the
    # same number typed on different keyboards indexes equal. Superscripts are not decimal.
    return "".join(str(unicodedata.decimal(char)) for char in value if char.isdecimal())


def _phone(value: str) -> str:
    stripped = value.strip()
    digits = _ascii_digits(stripped)
    if len(digits) < MIN_PHONE_DIGITS:
        raise ValueError(f"not a valid phone number (expected at least {MIN_PHONE_DIGITS} digits)")
    # Only a "+" in front marks an international number; one anywhere else is punctuation.
    return f"+{digits}" if stripped.startswith(("+", "\uff0b")) else digits


def _digits(value: str) -> str:
    digits = _ascii_digits(value)
    if not digits:
        raise ValueError("not a valid digit string (expected at least one digit)")
    return digits


# Deliberately no MM/DD/YYYY: "03/04/2001" would be ambiguous with DD/MM/YYYY, and guessing
# wrong would silently split one person's date of birth across two blind indexes.
_DATE_FORMS: Final = (
    re.compile(r"(?P<year>\d{4})-(?P<month>\d{1,2})-(?P<day>\d{1,2})", re.ASCII),
    re.compile(r"(?P<year>\d{4})/(?P<month>\d{1,2})/(?P<day>\d{1,2})", re.ASCII),
    re.compile(r"(?P<day>\d{1,2})\.(?P<month>\d{1,2})\.(?P<year>\d{4})", re.ASCII),
)
_DATE_EXPECTED: Final = "expected a real calendar date as YYYY-MM-DD, YYYY/MM/DD or DD.MM.YYYY"


def _date(value: str) -> str:
    stripped = value.strip()
    for form in _DATE_FORMS:
        match = form.fullmatch(stripped)
        if match is None:
            continue
        try:
            parsed = date(int(match["year"]), int(match["month"]), int(match["day"]))
        except ValueError:
            # date()'s own message is value-free today, but ours is guaranteed to be.
            raise ValueError(f"not a valid date ({_DATE_EXPECTED})") from None
        return parsed.isoformat()
    raise ValueError(f"not a valid date ({_DATE_EXPECTED})")


def _ip(value: str) -> str:
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        # ipaddress quotes the input in its message; "from None" keeps it out of tracebacks.
        raise ValueError("not a valid IP address (expected IPv4 or IPv6)") from None
    return str(address)


_NORMALIZERS: Final[dict[Normalizer, Callable[[str], str]]] = {
    Normalizer.EXACT: _exact,
    Normalizer.TEXT: _text,
    Normalizer.EMAIL: _email,
    Normalizer.PHONE: _phone,
    Normalizer.DIGITS: _digits,
    Normalizer.DATE: _date,
    Normalizer.IP: _ip,
}


def normalize(normalizer: Normalizer, value: str) -> str:
    """*value* in the canonical form of *normalizer*.

    Raises ValueError (whose message never contains *value*) if *value* is not valid for it.
    """
    return _NORMALIZERS[normalizer](value)
