"""Blind-index normalisers: equal values normalise equal, bad values fail without leaking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from heimdall.normalize import Normalizer, normalize


@pytest.mark.parametrize(
    ("normalizer", "variants", "canonical"),
    [
        (Normalizer.EXACT, [" Alice "], " Alice "),
        (
            Normalizer.TEXT,
            ["  Jane   DOE ", "jane\tdoe", "\uff2a\uff41\uff4e\uff45 Doe", "JANE\n\u00a0 DOE"],
            "jane doe",
        ),
        (Normalizer.TEXT, ["Straße", "STRASSE", "strasse"], "strasse"),
        (
            Normalizer.EMAIL,
            [" Alice@Example.COM ", "alice@example.com", "ALICE\uff20example.com"],
            "alice@example.com",
        ),
        (
            Normalizer.PHONE,
            ["+1 (555) 010-0199", "+1.555.010.0199", " +15550100199 "],
            "+15550100199",
        ),
        (
            Normalizer.PHONE,
            [
                "(555) 010-0199",
                "555 010 0199",
                "\uff15\uff15\uff15\uff10\uff11\uff10\uff10\uff11\uff19\uff19",
            ],
            "5550100199",
        ),
        (Normalizer.DIGITS, ["123-45-6789", " 123 45 6789 ", "123456789"], "123456789"),
        (
            Normalizer.DATE,
            ["1990-03-04", "1990/03/04", "04.03.1990", "1990-3-4", " 4.3.1990 "],
            "1990-03-04",
        ),
        (
            Normalizer.IP,
            ["2001:DB8::0:1", "2001:0db8:0000:0000:0000:0000:0000:0001"],
            "2001:db8::1",
        ),
        (Normalizer.IP, ["192.0.2.1", " 192.0.2.1 "], "192.0.2.1"),
    ],
)
def test_equivalent_values_normalise_to_one_canonical_form(
    normalizer: Normalizer, variants: list[str], canonical: str
) -> None:
    assert [normalize(normalizer, variant) for variant in variants] == [canonical] * len(variants)


def test_exact_leaves_the_value_untouched() -> None:
    assert normalize(Normalizer.EXACT, "  MiXeD\tcase ") == "  MiXeD\tcase "


def test_phone_drops_a_plus_that_is_not_in_front() -> None:
    assert normalize(Normalizer.PHONE, "555+0100199") == "5550100199"


def test_normalizer_names_are_the_policy_file_spellings() -> None:
    assert [str(n) for n in Normalizer] == [
        "exact",
        "text",
        "email",
        "phone",
        "digits",
        "date",
        "ip",
    ]


@pytest.mark.parametrize(
    ("normalizer", "value", "words"),
    [
        (Normalizer.EMAIL, "alice.example.com", "email"),
        (Normalizer.EMAIL, "alice@@example.com", "email"),
        (Normalizer.EMAIL, "alice@bob@example.com", "email"),
        (Normalizer.EMAIL, "@example.com", "email"),
        (Normalizer.EMAIL, "alice@ ", "email"),
        (Normalizer.PHONE, "+1 55-0", "phone"),
        (Normalizer.PHONE, "call me", "phone"),
        (Normalizer.DIGITS, "abc-de-fghi", "digit"),
        (Normalizer.DIGITS, "   ", "digit"),
        (Normalizer.DATE, "1990-02-30", "date"),
        (Normalizer.DATE, "1990-13-01", "date"),
        (Normalizer.DATE, "03/04/1990", "date"),  # MM/DD vs DD/MM is ambiguous, so refused
        (Normalizer.DATE, "0000-01-01", "date"),
        (Normalizer.DATE, "1990-03-04T10:00", "date"),
        (Normalizer.DATE, "yesterday", "date"),
        (Normalizer.IP, "256.1.2.3", "IP"),
        (Normalizer.IP, "192.168.001.1", "IP"),
        (Normalizer.IP, "2001:db8:::1", "IP"),
        (Normalizer.IP, "example.com", "IP"),
    ],
)
def test_invalid_value_raises_without_echoing_the_value(
    normalizer: Normalizer, value: str, words: str
) -> None:
    with pytest.raises(ValueError, match=words) as caught:
        normalize(normalizer, value)
    if value.strip():
        assert value.strip() not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ or caught.value.__context__ is None


_PHONE_LIKE = st.text(alphabet=st.sampled_from("+0123456789 ()-.x\uff15\u0663"), max_size=30)
_EMAIL_LIKE = st.builds(
    lambda local, domain: f"{local}@{domain}",
    st.text(st.characters(exclude_characters="@\uff20\ufe6b"), min_size=1),
    st.text(st.characters(exclude_characters="@\uff20\ufe6b"), min_size=1),
)


@pytest.mark.parametrize(
    ("normalizer", "values"),
    [
        (Normalizer.TEXT, st.text()),
        (Normalizer.EMAIL, st.one_of(_EMAIL_LIKE, st.text())),
        (Normalizer.DIGITS, st.one_of(_PHONE_LIKE, st.text())),
        (Normalizer.PHONE, st.one_of(_PHONE_LIKE, st.text())),
    ],
)
def test_normalisation_is_idempotent(
    normalizer: Normalizer, values: st.SearchStrategy[str]
) -> None:
    @given(values)
    def check(value: str) -> None:
        try:
            once = normalize(normalizer, value)
        except ValueError:
            return
        assert normalize(normalizer, once) == once

    check()
