"""The public API: everything exported exists, and every error is exported."""

from __future__ import annotations

import inspect

import heimdall
from heimdall import errors


def test_every_exported_name_exists() -> None:
    missing = [name for name in heimdall.__all__ if not hasattr(heimdall, name)]
    assert missing == []


def test_every_error_class_is_exported_from_the_package() -> None:
    classes = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, errors.HeimdallError)
    }
    assert classes <= set(heimdall.__all__)
    assert classes == set(errors.__all__)


def test_every_error_is_a_heimdall_error_and_retryable_only_when_unavailable() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.HeimdallError)
        assert cls.retryable is (cls is errors.KmsUnavailable)
