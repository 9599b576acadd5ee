"""The behaviour every key provider must have, as reusable pytest base classes.

A provider's test module subclasses :class:`KmsContract` (as ``Test<Provider>Contract``) and
provides these fixtures:

* ``provider``: a fresh provider over a master key of its own (version 1), that may rotate and
  set its floors;
* ``unreachable``: the same provider where its service cannot be reached (a server that is not
  there; for the local keyring, a keyring file that vanished after the provider opened it);
* ``secrets``: the credentials (tokens, keys) a leak check must not find anywhere.

A provider with access control (a token or a role that may not do everything) also subclasses
:class:`AccessControlContract` and provides ``denied``: the provider under credentials that may
unwrap but not rotate, nor wrap.

Every check is behaviour a caller relies on: round trip, binding to the associated data,
rotation and rewrap, the decryption floor, per-item batch results, and the errors that tell
an operator what happened (unavailable, denied, not found), none of which may carry a data key
or a credential.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from heimdall.errors import (
    AccessDenied,
    DecryptionFailed,
    HeimdallError,
    KeyNotFound,
    KeyVersionDisabled,
    KmsUnavailable,
)
from heimdall.kms.base import KeyState, WrappedKey
from heimdall.kms.provider import KeyProvider
from heimdall.secret import SecretBytes

__all__ = ["AccessControlContract", "KmsContract"]

AD = b"heimdall.data-key.v1\x00contract"
OTHER_AD = b"heimdall.data-key.v1\x00another field"


def _plain(secret: SecretBytes) -> bytes:
    with secret:
        return bytes(secret.view())


class KmsContract:
    """Every provider: subclass it and provide ``provider``, ``unreachable`` and ``secrets``."""

    def test_a_data_key_round_trips(self, provider: KeyProvider) -> None:
        data_key = provider.generate_data_key(AD)
        expected = _plain(data_key.plaintext)
        assert len(expected) == 32
        assert _plain(provider.unwrap(data_key.wrapped, AD)) == expected
        assert provider.owns(data_key.wrapped.key_identifier)

    def test_other_associated_data_fails_as_an_opaque_decryption_failure(
        self, provider: KeyProvider
    ) -> None:
        data_key = provider.generate_data_key(AD)
        data_key.plaintext.wipe()
        with pytest.raises(DecryptionFailed):
            provider.unwrap(data_key.wrapped, OTHER_AD)

    def test_rotation_makes_a_new_latest_version_and_old_keys_still_unwrap(
        self, provider: KeyProvider
    ) -> None:
        before = provider.describe().latest_version
        old = provider.generate_data_key(AD)
        expected = _plain(old.plaintext)
        after = provider.rotate()
        assert after.latest_version == before + 1
        new = provider.generate_data_key(AD)
        new.plaintext.wipe()
        assert new.wrapped.key_version == after.latest_version
        assert _plain(provider.unwrap(old.wrapped, AD)) == expected

    def test_rewrap_moves_a_key_to_the_latest_version(self, provider: KeyProvider) -> None:
        old = provider.generate_data_key(AD)
        expected = _plain(old.plaintext)
        latest = provider.rotate().latest_version
        moved = provider.rewrap(old.wrapped, AD)
        assert moved.key_version == latest
        assert moved.key_identifier != old.wrapped.key_identifier
        assert _plain(provider.unwrap(moved, AD)) == expected

    def test_a_key_below_the_decryption_floor_fails_as_version_disabled(
        self, provider: KeyProvider
    ) -> None:
        old = provider.generate_data_key(AD)
        old.plaintext.wipe()
        latest = provider.rotate().latest_version
        provider.set_min_decryption_version(latest)
        with pytest.raises(KeyVersionDisabled) as info:
            provider.unwrap(old.wrapped, AD)
        assert info.value.key_version == old.wrapped.key_version

    def test_describe_reports_each_versions_state(self, provider: KeyProvider) -> None:
        provider.rotate()
        provider.rotate()
        provider.set_min_encryption_version(2)
        description = provider.set_min_decryption_version(2)
        assert description.latest_version == 3
        states = {v.version: v.state for v in description.versions}
        assert states[1] is KeyState.DISABLED
        assert states[3] is KeyState.ACTIVE
        assert description.min_decryption_version == 2

    def test_batch_calls_answer_each_item_on_its_own(self, provider: KeyProvider) -> None:
        keys = [provider.generate_data_key(AD) for _ in range(3)]
        expected = [_plain(k.plaintext) for k in keys]
        broken = WrappedKey(
            keys[1].wrapped.key_identifier,
            keys[1].wrapped.key_version,
            bytes(reversed(keys[1].wrapped.ciphertext)),
        )
        items = [
            (keys[0].wrapped, AD),
            (broken, AD),
            (keys[2].wrapped, OTHER_AD),
            (keys[2].wrapped, AD),
        ]
        results = provider.unwrap_many(items)
        assert len(results) == 4
        assert isinstance(results[0], SecretBytes) and _plain(results[0]) == expected[0]
        assert isinstance(results[1], HeimdallError)
        assert isinstance(results[2], DecryptionFailed)
        assert isinstance(results[3], SecretBytes) and _plain(results[3]) == expected[2]
        rewrapped = provider.rewrap_many([(keys[0].wrapped, AD), (keys[2].wrapped, OTHER_AD)])
        assert isinstance(rewrapped[0], WrappedKey)
        assert isinstance(rewrapped[1], DecryptionFailed)

    def test_a_key_of_another_provider_or_key_is_not_found(self, provider: KeyProvider) -> None:
        data_key = provider.generate_data_key(AD)
        data_key.plaintext.wipe()
        foreign = WrappedKey("someone-else/other-key-v1", 1, data_key.wrapped.ciphertext)
        with pytest.raises(KeyNotFound):
            provider.unwrap(foreign, AD)
        assert not provider.owns(foreign.key_identifier)

    def test_an_unreachable_service_is_unavailable(self, unreachable: KeyProvider) -> None:
        with pytest.raises(KmsUnavailable):
            unreachable.describe()
        with pytest.raises(KmsUnavailable):
            unreachable.generate_data_key(AD)

    def test_no_data_key_or_credential_in_reprs_errors_or_logs(
        self,
        provider: KeyProvider,
        unreachable: KeyProvider,
        secrets: list[str],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.DEBUG)
        data_key = provider.generate_data_key(AD)
        key = _plain(data_key.plaintext)
        texts = [repr(provider), repr(unreachable), repr(data_key), repr(data_key.wrapped)]
        failures: list[Callable[[], object]] = [
            lambda: provider.unwrap(data_key.wrapped, OTHER_AD),
            lambda: provider.unwrap(WrappedKey("x/y-v1", 1, b"\x00" * 40), AD),
            unreachable.describe,
        ]
        for failure in failures:
            with pytest.raises(HeimdallError) as info:
                failure()
            texts += [str(info.value), repr(info.value), repr(info.value.__cause__)]
        texts.append(caplog.text)
        joined = "\n".join(texts)
        assert key.hex() not in joined and repr(key) not in joined
        for secret in secrets:
            assert secret not in joined


class AccessControlContract:
    """Providers with access control: subclass it too and provide ``denied``."""

    def test_a_call_the_credentials_may_not_make_is_access_denied(
        self, denied: KeyProvider
    ) -> None:
        with pytest.raises(AccessDenied):
            denied.rotate()
