"""FieldCipher: data key caching (also under many threads), wiping and rotation pick-up; the
two patterns it routes between (EnvelopeCipher, DirectCipher) and what each refuses."""

from __future__ import annotations

import base64
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from heimdall.cipher import CachePolicy, DirectCipher, EnvelopeCipher, FieldCipher
from heimdall.envelope import KMS_DIRECT, EncryptionContext, EncryptionVersion, Envelope, parse
from heimdall.errors import HeimdallError, KeyVersionDisabled, KmsUnavailable, UnsupportedEnvelope
from heimdall.kms.base import DataKey, WrappedKey
from heimdall.kms.legacy import LegacyMasterKey, parse_master_key
from heimdall.kms.local import LocalKeyring
from heimdall.secret import SecretBytes

CTX = EncryptionContext("FieldValue", "email:hash:00", "email")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cipher(path: Path, clock: Clock | None = None, **policy: float) -> FieldCipher:
    clock = clock or Clock()
    return FieldCipher(
        LocalKeyring(path, monotonic=clock),
        EncryptionVersion.KMS_V1,
        CachePolicy(**policy),  # type: ignore[arg-type]
        monotonic=clock,
    )


def test_data_key_is_reused_up_to_max_uses(tmp_path: Path) -> None:
    cipher = _cipher(tmp_path / "k.json", max_uses=3)
    ids = [cipher.encrypt(b"v", CTX).dek_id for _ in range(7)]
    assert ids[0] == ids[1] == ids[2] != ids[3]
    assert ids[3] == ids[4] == ids[5] != ids[6]
    assert cipher.kms_calls == 3


def test_max_uses_one_gives_every_field_its_own_data_key(tmp_path: Path) -> None:
    cipher = _cipher(tmp_path / "k.json", max_uses=1)
    assert len({cipher.encrypt(b"v", CTX).dek_id for _ in range(20)}) == 20


def test_data_key_expires_after_max_age(tmp_path: Path) -> None:
    clock = Clock()
    cipher = _cipher(tmp_path / "k.json", clock, max_age_seconds=60)
    first = cipher.encrypt(b"v", CTX).dek_id
    clock.now += 59
    assert cipher.encrypt(b"v", CTX).dek_id == first
    clock.now += 2
    assert cipher.encrypt(b"v", CTX).dek_id != first


def test_rotation_in_another_process_is_used_once_the_cached_key_expires(tmp_path: Path) -> None:
    clock = Clock()
    cipher = _cipher(tmp_path / "k.json", clock, max_age_seconds=30)
    assert cipher.encrypt(b"v", CTX).key_version == 1
    LocalKeyring(tmp_path / "k.json").rotate()
    assert cipher.encrypt(b"v", CTX).key_version == 1  # bounded staleness, by design
    clock.now += 31
    assert cipher.encrypt(b"v", CTX).key_version == 2


def test_forget_keys_makes_a_rotation_take_effect_at_once(tmp_path: Path) -> None:
    cipher = _cipher(tmp_path / "k.json")
    cipher.encrypt(b"v", CTX)
    cipher.kms.rotate()
    cipher.forget_keys()
    assert cipher.encrypt(b"v", CTX).key_version == 2


def test_decryption_floor_applies_once_cached_keys_are_forgotten(tmp_path: Path) -> None:
    cipher = _cipher(tmp_path / "k.json")
    envelope = cipher.encrypt(b"v", CTX).envelope
    assert cipher.decrypt(envelope, CTX) == b"v"
    cipher.kms.rotate()
    LocalKeyring(tmp_path / "k.json").set_min_decryption_version(2)
    cipher.forget_keys()
    with pytest.raises(KeyVersionDisabled):
        cipher.decrypt(envelope, CTX)


def test_forget_keys_also_drops_a_data_key_unwrapped_while_it_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    envelope = _cipher(tmp_path / "k.json").encrypt(b"v", CTX).envelope
    cipher = _cipher(tmp_path / "k.json")
    unwrapped, resume = threading.Event(), threading.Event()
    original = cipher.kms.unwrap

    def slow_unwrap(wrapped: WrappedKey, ad: bytes) -> SecretBytes:
        secret = original(wrapped, ad)  # allowed: the floor is not raised yet
        unwrapped.set()
        assert resume.wait(30)
        return secret

    monkeypatch.setattr(cipher.kms, "unwrap", slow_unwrap)
    results: list[bytes] = []
    reader = threading.Thread(target=lambda: results.append(cipher.decrypt(envelope, CTX)))
    reader.start()
    assert unwrapped.wait(30)
    cipher.kms.rotate()
    LocalKeyring(tmp_path / "k.json").set_min_decryption_version(2)
    cipher.forget_keys()
    resume.set()
    reader.join()
    assert results == [b"v"]  # that read began before the floor was raised
    monkeypatch.undo()
    with pytest.raises(KeyVersionDisabled):
        cipher.decrypt(envelope, CTX)


def test_fields_sharing_a_data_key_unwrap_it_once(tmp_path: Path) -> None:
    writer = _cipher(tmp_path / "k.json")
    envelopes = [writer.encrypt(str(i).encode(), CTX).envelope for i in range(100)]
    reader = _cipher(tmp_path / "k.json")
    assert [reader.decrypt(e, CTX) for e in envelopes] == [str(i).encode() for i in range(100)]
    assert reader.kms_calls == 1


def test_unwrapped_key_cache_is_bounded(tmp_path: Path) -> None:
    writer = _cipher(tmp_path / "k.json", max_uses=1)
    envelopes = [writer.encrypt(b"v", CTX).envelope for _ in range(20)]
    reader = _cipher(tmp_path / "k.json", max_unwrapped_keys=5)
    for envelope in envelopes:
        reader.decrypt(envelope, CTX)
    assert len(reader._unwrapped) == 5
    assert reader.decrypt(envelopes[0], CTX) == b"v"  # evicted keys are unwrapped again


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads every microsecond, so races that need an unlucky switch happen at once."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("frequent_thread_switches")
def test_data_key_cache_stays_consistent_under_many_threads() -> None:
    # The static master key unwraps without file I/O, so the threads spend their time in the
    # cipher's own code, where they race.
    master_key = LegacyMasterKey(parse_master_key(base64.b64encode(os.urandom(32)).decode()))
    writer = FieldCipher(master_key, EncryptionVersion.LEGACY, CachePolicy(max_uses=1))
    contexts = [EncryptionContext("FieldValue", f"email:hash:{i:02x}", "email") for i in range(48)]
    values = [f"value-{i}".encode() for i in range(48)]
    envelopes = [writer.encrypt(v, c).envelope for v, c in zip(values, contexts, strict=True)]
    items = list(zip(envelopes, contexts, strict=True))
    # One data key per field and room for two: nearly every decrypt unwraps a key and evicts one.
    cipher = FieldCipher(
        master_key, EncryptionVersion.LEGACY, CachePolicy(max_uses=1, max_unwrapped_keys=2)
    )
    start = threading.Barrier(16, timeout=60)
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            start.wait()
            for round_ in range(30):
                if worker == 0:
                    sealed = cipher.encrypt(b"new value", CTX)
                    assert cipher.decrypt(sealed.envelope, CTX) == b"new value"
                    cipher.forget_keys()
                elif worker < 4:
                    assert cipher.decrypt_many(items) == values
                else:
                    shift = worker + round_  # the threads walk the fields from different places
                    for step in range(len(items)):
                        index = (shift + step) % len(items)
                        assert cipher.decrypt(*items[index]) == values[index]
        except BaseException as exc:  # reported below with its type, whatever it is
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [repr(f) for f in failures] == []
    assert len(cipher._unwrapped) <= 2


def test_plaintext_data_keys_are_wiped_after_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cipher = _cipher(tmp_path / "k.json", max_uses=1)
    issued: list[DataKey] = []
    unwrapped: list[SecretBytes] = []
    kms = cipher.kms
    original_generate, original_unwrap = kms.generate_data_key, kms.unwrap

    def generate(ad: bytes) -> DataKey:
        issued.append(original_generate(ad))
        return issued[-1]

    def unwrap(wrapped: WrappedKey, ad: bytes) -> SecretBytes:
        unwrapped.append(original_unwrap(wrapped, ad))
        return unwrapped[-1]

    monkeypatch.setattr(kms, "generate_data_key", generate)
    monkeypatch.setattr(kms, "unwrap", unwrap)
    envelope = cipher.encrypt(b"v", CTX).envelope
    _cipher(tmp_path / "k.json").decrypt(envelope, CTX)
    reader = FieldCipher(kms, EncryptionVersion.KMS_V1)
    reader.decrypt(envelope, CTX)
    assert issued and all(d.plaintext.wiped for d in issued)
    assert unwrapped and all(s.wiped for s in unwrapped)


def test_rewrap_keeps_ciphertext_timestamp_and_data_key_id(tmp_path: Path) -> None:
    cipher = _cipher(tmp_path / "k.json")
    before = parse(cipher.encrypt(b"v", CTX).envelope)
    cipher.kms.rotate()
    after = cipher.rewrap_many([(before, CTX)])[0]
    assert not isinstance(after, Exception)
    assert after.key_version == 2 and after.key_identifier == "heimdall-pii-v2"
    assert after.ciphertext == before.ciphertext
    assert after.encryption_timestamp == before.encryption_timestamp
    assert after.dek_id == before.dek_id
    assert after.encrypted_dek != before.encrypted_dek
    assert cipher.decrypt(after.to_json(), CTX) == b"v"


def test_rewrap_many_calls_the_kms_once_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cipher = _cipher(tmp_path / "k.json", max_uses=4)
    envelopes = [parse(cipher.encrypt(b"v", CTX).envelope) for _ in range(12)]
    cipher.kms.rotate()
    calls: list[int] = []
    original = cipher.kms.rewrap_many

    def counting(
        items: Sequence[tuple[WrappedKey, bytes]],
    ) -> list[WrappedKey | HeimdallError]:
        calls.append(len(items))
        return original(items)

    monkeypatch.setattr(cipher.kms, "rewrap_many", counting)
    results = cipher.rewrap_many([(e, CTX) for e in envelopes])
    assert calls == [3]  # 12 fields, 3 distinct data keys, one batch call
    assert all(not isinstance(r, Exception) and r.key_version == 2 for r in results)


@pytest.mark.parametrize(
    "policy",
    [{"max_uses": 0}, {"max_uses": 2**25}, {"max_age_seconds": 0}, {"max_unwrapped_keys": 0}],
)
def test_cache_policy_rejects_unsafe_limits(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        CachePolicy(**policy)  # type: ignore[arg-type]


def test_one_cipher_reads_and_rewraps_both_patterns(tmp_path: Path) -> None:
    keyring = LocalKeyring(tmp_path / "k.json")
    pattern_a = FieldCipher(keyring, EncryptionVersion.KMS_V1).encrypt(b"a", CTX).envelope
    direct = FieldCipher(keyring, EncryptionVersion.KMS_V1, direct=True)
    pattern_b = direct.encrypt(b"b", CTX).envelope
    assert parse(pattern_b).algorithm == KMS_DIRECT
    reader = FieldCipher(keyring, EncryptionVersion.KMS_V1)
    assert reader.decrypt(pattern_b, CTX) == b"b"
    assert reader.decrypt_many([(pattern_a, CTX), (pattern_b, CTX)]) == [b"a", b"b"]
    assert direct.decrypt(pattern_a, CTX) == b"a"
    keyring.rotate()
    before = [parse(pattern_a), parse(pattern_b)]
    new_a, new_b = reader.rewrap_many([(e, CTX) for e in before])
    assert isinstance(new_a, Envelope) and isinstance(new_b, Envelope)
    assert new_a.key_version == new_b.key_version == 2
    assert new_a.ciphertext == before[0].ciphertext  # only the data key was rewrapped
    assert new_b.ciphertext != before[1].ciphertext  # the provider re-encrypted the value
    assert new_b.encrypted_dek == b""
    for old, new in zip(before, (new_a, new_b), strict=True):
        assert (new.dek_id, new.encryption_timestamp) == (old.dek_id, old.encryption_timestamp)
    assert reader.decrypt_many([(new_a.to_json(), CTX), (new_b.to_json(), CTX)]) == [b"a", b"b"]


def test_each_pattern_refuses_the_others_envelopes(tmp_path: Path) -> None:
    keyring = LocalKeyring(tmp_path / "k.json")
    envelopes = EnvelopeCipher(keyring, EncryptionVersion.KMS_V1)
    values = DirectCipher(keyring, EncryptionVersion.KMS_V1)
    pattern_a = envelopes.encrypt(b"a", CTX).envelope
    pattern_b = values.encrypt(b"b", CTX).envelope
    assert (envelopes.decrypt(pattern_a, CTX), values.decrypt(pattern_b, CTX)) == (b"a", b"b")
    for cipher, foreign in ((envelopes, pattern_b), (values, pattern_a)):
        with pytest.raises(UnsupportedEnvelope):
            cipher.decrypt(foreign, CTX)
        [result] = cipher.decrypt_many([(foreign, CTX)])
        assert isinstance(result, UnsupportedEnvelope)
        [rewrapped] = cipher.rewrap_many([(parse(foreign), CTX)])
        assert isinstance(rewrapped, UnsupportedEnvelope)


def test_pattern_b_needs_a_provider_that_encrypts_values_itself() -> None:
    master_key = LegacyMasterKey(parse_master_key(base64.b64encode(os.urandom(32)).decode()))
    with pytest.raises(ValueError, match="does not encrypt values itself"):
        FieldCipher(master_key, EncryptionVersion.LEGACY, direct=True)
    cipher = FieldCipher(master_key, EncryptionVersion.LEGACY)
    sealed = parse(cipher.encrypt(b"v", CTX).envelope)
    forged = Envelope(
        encryption_version=EncryptionVersion.LEGACY,
        algorithm=KMS_DIRECT,
        key_identifier=sealed.key_identifier,
        key_version=1,
        dek_id=sealed.dek_id,
        encrypted_dek=b"",
        ciphertext=sealed.ciphertext,
        encryption_timestamp=sealed.encryption_timestamp,
    )
    with pytest.raises(UnsupportedEnvelope):
        cipher.decrypt(forged.to_json(), CTX)


def test_a_cached_data_key_expires_after_max_age_for_batch_decrypts_too(tmp_path: Path) -> None:
    clock = Clock()
    envelope = _cipher(tmp_path / "k.json", clock).encrypt(b"v", CTX).envelope
    cipher = _cipher(tmp_path / "k.json", clock, max_age_seconds=60)
    assert cipher.decrypt_many([(envelope, CTX)]) == [b"v"]
    calls = cipher.kms_calls

    clock.now += 59
    assert cipher.decrypt_many([(envelope, CTX)] * 3) == [b"v"] * 3
    assert cipher.kms_calls == calls  # all three from the cache
    other = LocalKeyring(tmp_path / "k.json")
    other.rotate()
    other.set_min_decryption_version(2)  # in another process: nothing here forgets its keys
    assert cipher.decrypt_many([(envelope, CTX)]) == [b"v"]  # bounded staleness, by design

    clock.now += 2
    [refused] = cipher.decrypt_many([(envelope, CTX)])
    assert isinstance(refused, KeyVersionDisabled)
    with pytest.raises(KeyVersionDisabled):
        cipher.decrypt(envelope, CTX)


def test_a_batch_stops_asking_a_provider_that_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = _cipher(tmp_path / "k.json", max_uses=1)  # every field its own data key
    envelopes = [writer.encrypt(b"v", CTX).envelope for _ in range(5)]
    cipher = _cipher(tmp_path / "k.json")  # nothing cached
    asked = []

    def unreachable(*args: object) -> object:
        asked.append(args)
        raise KmsUnavailable("the provider cannot be reached")

    monkeypatch.setattr(cipher.kms, "unwrap", unreachable)

    results = cipher.decrypt_many([(envelope, CTX) for envelope in envelopes])

    assert len(asked) == 1
    assert [type(result) for result in results] == [KmsUnavailable] * 5
