"""The local keyring and the legacy master key providers."""

from __future__ import annotations

import base64
import json
import os
import pickle
import stat
from pathlib import Path

import pytest

from heimdall.errors import (
    ConfigurationError,
    DecryptionFailed,
    KeyNotFound,
    KeyVersionDisabled,
    LifecycleError,
)
from heimdall.kms.base import KeyManagementService, KeyState, WrappedKey
from heimdall.kms.legacy import LegacyMasterKey, parse_master_key
from heimdall.kms.local import LocalKeyring
from heimdall.secret import SecretBytes
from kms_contract import KmsContract

AD = b"associated"


@pytest.fixture
def keyring(tmp_path: Path) -> LocalKeyring:
    return LocalKeyring(tmp_path / "data" / "keyring.json")


def test_providers_satisfy_the_interface(keyring: LocalKeyring) -> None:
    legacy = LegacyMasterKey(parse_master_key(base64.b64encode(os.urandom(32)).decode()))
    assert isinstance(keyring, KeyManagementService)
    assert isinstance(legacy, KeyManagementService)


def test_keyring_is_created_on_first_use_with_mode_0600(keyring: LocalKeyring) -> None:
    assert stat.S_IMODE(keyring.path.stat().st_mode) == 0o600
    description = keyring.describe()
    assert description.latest_version == 1
    assert description.versions[0].state is KeyState.ACTIVE


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_group_or_world_readable_keyring_is_refused(keyring: LocalKeyring, mode: int) -> None:
    keyring.path.chmod(mode)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        LocalKeyring(keyring.path)


def test_missing_keyring_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        LocalKeyring(tmp_path / "nope.json", create=False)


def test_damaged_keyring_is_a_configuration_error(keyring: LocalKeyring) -> None:
    doc = json.loads(keyring.path.read_text())
    doc["versions"][0]["material"] = "short"
    keyring.path.write_text(json.dumps(doc))
    with pytest.raises(ConfigurationError, match="damaged"):
        LocalKeyring(keyring.path)
    keyring.path.write_text("{not json")
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        LocalKeyring(keyring.path)


def test_wrap_unwrap_round_trip_and_binding(keyring: LocalKeyring) -> None:
    data_key = keyring.generate_data_key(AD)
    with keyring.unwrap(data_key.wrapped, AD) as plaintext:
        assert bytes(plaintext.view()) == bytes(data_key.plaintext.view())
    with pytest.raises(DecryptionFailed):
        keyring.unwrap(data_key.wrapped, b"other")


def test_rotation_keeps_old_versions_and_wraps_under_the_new_one(keyring: LocalKeyring) -> None:
    old = keyring.generate_data_key(AD)
    description = keyring.rotate()
    assert description.latest_version == 2
    new = keyring.generate_data_key(AD)
    assert (old.wrapped.key_version, new.wrapped.key_version) == (1, 2)
    assert new.wrapped.key_identifier == "heimdall-pii-v2"
    keyring.unwrap(old.wrapped, AD).wipe()
    rewrapped = keyring.rewrap(old.wrapped, AD)
    assert rewrapped.key_version == 2
    with keyring.unwrap(rewrapped, AD) as plaintext:
        assert bytes(plaintext.view()) == bytes(old.plaintext.view())


def test_another_process_sees_a_rotation(keyring: LocalKeyring) -> None:
    other = LocalKeyring(keyring.path)
    keyring.rotate()
    assert other.describe().latest_version == 2
    assert other.generate_data_key(AD).wrapped.key_version == 2


def test_min_decryption_version_disables_older_versions(keyring: LocalKeyring) -> None:
    old = keyring.generate_data_key(AD)
    keyring.rotate()
    description = keyring.set_min_decryption_version(2)
    assert description.min_decryption_version == 2
    assert [v.state for v in description.versions] == [KeyState.DISABLED, KeyState.ACTIVE]
    with pytest.raises(KeyVersionDisabled) as caught:
        keyring.unwrap(old.wrapped, AD)
    assert caught.value.key_version == 1


def test_min_decryption_version_above_latest_is_refused(keyring: LocalKeyring) -> None:
    with pytest.raises(LifecycleError):
        keyring.set_min_decryption_version(2)


def test_unknown_version_or_identifier_is_key_not_found(keyring: LocalKeyring) -> None:
    wrapped = keyring.generate_data_key(AD).wrapped
    for bad in (
        WrappedKey("heimdall-pii-v7", 7, wrapped.ciphertext),
        WrappedKey("other-key-v1", 1, wrapped.ciphertext),
    ):
        with pytest.raises(KeyNotFound):
            keyring.unwrap(bad, AD)


def test_batch_operations_report_per_item(keyring: LocalKeyring) -> None:
    good = keyring.generate_data_key(AD).wrapped
    bad = WrappedKey(good.key_identifier, 1, b"\0" * 60)
    results = keyring.rewrap_many([(good, AD), (bad, AD), (good, AD)])
    assert isinstance(results[0], WrappedKey)
    assert isinstance(results[1], DecryptionFailed)
    assert isinstance(results[2], WrappedKey)
    unwrapped = keyring.unwrap_many([(bad, AD), (good, AD)])
    assert isinstance(unwrapped[0], DecryptionFailed)
    assert isinstance(unwrapped[1], SecretBytes)


def test_keyring_repr_and_errors_hold_no_key_material(keyring: LocalKeyring) -> None:
    material = json.loads(keyring.path.read_text())["versions"][0]["material"]
    assert material not in repr(keyring)
    data_key = keyring.generate_data_key(AD)
    assert "plaintext" not in repr(data_key)
    assert base64.b64encode(bytes(data_key.plaintext.view())).decode() not in repr(data_key)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(b"short").decode(), "32 bytes, not 5"),
        ("", "32 bytes, not 0"),
    ],
)
def test_bad_master_key_is_a_configuration_error_without_the_value(
    value: str, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        parse_master_key(value)
    if value:
        assert value not in str(caught.value)


def test_legacy_key_cannot_rotate_and_names_the_migration() -> None:
    legacy = LegacyMasterKey(parse_master_key(base64.b64encode(os.urandom(32)).decode()))
    with pytest.raises(LifecycleError, match="heimdall reencrypt"):
        legacy.rotate()


def test_legacy_key_identifier_tells_master_keys_apart() -> None:
    one = LegacyMasterKey(parse_master_key(base64.b64encode(os.urandom(32)).decode()))
    two = LegacyMasterKey(parse_master_key(base64.b64encode(os.urandom(32)).decode()))
    wrapped = one.generate_data_key(AD).wrapped
    assert one.key_name != two.key_name
    with pytest.raises(KeyNotFound):
        two.unwrap(wrapped, AD)


def test_secret_bytes_wipes_and_masks() -> None:
    secret = SecretBytes(b"k" * 32)
    view = secret.view()
    assert "k" * 8 not in repr(secret) and "redacted" in str(secret)
    secret.wipe()
    assert bytes(view) == b"\0" * 32
    assert secret.wiped
    with pytest.raises(ValueError, match="wiped"):
        secret.view()
    with pytest.raises(TypeError):
        pickle.dumps(SecretBytes(b"x"))


def test_secret_bytes_context_manager_wipes_on_exit() -> None:
    with SecretBytes.random(32) as secret:
        view = secret.view()
        assert any(view)
    assert not any(view)


def test_encryption_may_lag_a_rotation_elsewhere_by_one_second_but_decryption_never(
    tmp_path: Path,
) -> None:
    now = [100.0]
    keyring = LocalKeyring(tmp_path / "keyring.json", monotonic=lambda: now[0])
    old = keyring.generate_data_key(AD)
    other = LocalKeyring(tmp_path / "keyring.json")
    other.rotate()
    other.set_min_decryption_version(2)
    assert keyring.generate_data_key(AD).wrapped.key_version == 1
    with pytest.raises(KeyVersionDisabled):
        keyring.unwrap(old.wrapped, AD)  # the floor applies at once
    now[0] += 1.5
    assert keyring.generate_data_key(AD).wrapped.key_version == 2


class _Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TestLocalKeyringContract(KmsContract):
    @pytest.fixture
    def provider(self, tmp_path: Path) -> LocalKeyring:
        return LocalKeyring(tmp_path / "keyring.json")

    @pytest.fixture
    def unreachable(self, tmp_path: Path) -> LocalKeyring:
        """The keyring file vanished (a lost mount, say) after the provider opened it."""
        clock = _Clock()
        keyring = LocalKeyring(tmp_path / "gone" / "keyring.json", monotonic=clock)
        (tmp_path / "gone" / "keyring.json").unlink()
        clock.now += 60  # past the second a wrapping key may be reused without a look
        return keyring

    @pytest.fixture
    def secrets(self, tmp_path: Path, provider: LocalKeyring) -> list[str]:
        doc = json.loads((tmp_path / "keyring.json").read_text())
        return [version["material"] for version in doc["versions"]]
