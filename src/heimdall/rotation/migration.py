"""Migration from the static env key to the KMS, as the spec's phases.

spec: Migration Strategy, Phases 3-5, and the Rollback Plan. The encryption mode in force is
recorded in the store, so every process that opens it sees the same mode (it overrides
``HMD_ENCRYPTION_MODE``, with a warning when the two differ):

* ``start``: legacy -> hybrid, and the re-encryption job that moves legacy fields to the KMS
  (:func:`heimdall.rotation.job.start_job` with :attr:`JobKind.MIGRATION`);
* ``verify``: proves by query that no legacy field (nor the blind-index key) remains, and
  decrypts a random sample of fields for real;
* ``enforce``: hybrid -> kms, only when verify passes;
* ``rollback``: back to legacy (new fields under the env key again, KMS fields still read) or
  to hybrid.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import orjson

from heimdall.audit import AuditEvent, EventType, utc_now_ms
from heimdall.blind_index import StoredIndexKey
from heimdall.envelope import EncryptionVersion
from heimdall.errors import HeimdallError, LifecycleError
from heimdall.rbac import Caller, Permission
from heimdall.service import Heimdall
from heimdall.store.base import GraphStore
from heimdall.types import EncryptionMode

__all__ = [
    "MODE_META",
    "Verification",
    "recorded_mode",
    "require_verified",
    "set_mode",
    "verify",
]

MODE_META = "encryption_mode"
LEGACY = EncryptionVersion.LEGACY.value


def recorded_mode(store: GraphStore) -> EncryptionMode | None:
    text = store.get_meta(MODE_META)
    if text is None:
        return None
    try:
        return EncryptionMode(orjson.loads(text)["mode"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def set_mode(heimdall: Heimdall, mode: EncryptionMode, *, caller: Caller, reason: str) -> None:
    """Record *mode* for every process; audited."""
    heimdall.require(caller, Permission.CONFIGURE_KEYS)
    before = recorded_mode(heimdall.store)
    heimdall.store.set_meta(
        MODE_META,
        orjson.dumps(
            {"mode": mode.value, "changed_at": utc_now_ms(), "actor": caller.actor}
        ).decode(),
    )
    heimdall.record(
        AuditEvent.of(
            EventType.MODE_CHANGE,
            caller,
            operation=f"{before.value if before else 'unset'} -> {mode.value}",
            reason=reason,
        )
    )


@dataclass(frozen=True, slots=True)
class Verification:
    """What :func:`verify` found. *key_name* is the KMS key new fields go under (empty in
    legacy mode); *other_key_fields* counts the KMS fields under any other key (another
    provider's, while ``heimdall kms migrate`` moves them), *index_key_elsewhere* whether the
    blind-index key is too."""

    legacy_fields: int
    index_key_legacy: bool
    sampled: int
    sample_failures: int
    key_name: str = ""
    other_key_fields: int = 0
    index_key_elsewhere: bool = False

    @property
    def migrated(self) -> bool:
        """No field nor the blind-index key under the env key, and the sample decrypted: the
        env key is no longer needed (``migrate enforce``)."""
        return not (self.legacy_fields or self.index_key_legacy or self.sample_failures)

    @property
    def ok(self) -> bool:
        """:attr:`migrated`, and everything under the one key: no other key provider is
        needed either."""
        return self.migrated and not (self.other_key_fields or self.index_key_elsewhere)


def verify(heimdall: Heimdall, *, caller: Caller, sample: int = 50) -> Verification:
    """No legacy field remains (by query), and a random sample decrypts (for real)."""
    store = heimdall.store
    legacy_fields = store.count_fields(encryption_version=LEGACY)
    stored = StoredIndexKey.stored_in(store)
    key_name, other_key_fields, index_key_elsewhere = "", 0, False
    cipher = heimdall.router.kms
    if cipher is not None:
        key_name = cipher.kms.describe().key_name
        kms_v1 = EncryptionVersion.KMS_V1.value
        other_key_fields = store.count_fields(encryption_version=kms_v1) - store.count_fields(
            encryption_version=kms_v1, key_name=key_name
        )
        index_key_elsewhere = stored is not None and stored.outdated(1, key_name)
    # Reservoir sampling: one pass, memory bounded by the sample size, not the store.
    rng = random.Random()  # noqa: S311 - which fields to spot-check, not a secret
    chosen: list[str] = []
    seen = 0
    for batch in store.iter_fields(batch_size=5000):
        for field in batch:
            seen += 1
            if len(chosen) < sample:
                chosen.append(field.canonical_key)
            else:
                slot = rng.randrange(seen)
                if slot < sample:
                    chosen[slot] = field.canonical_key
    failures = 0
    for key in chosen:
        try:
            heimdall.decrypt(key, reason="migrate:verify", caller=caller)
        except HeimdallError:
            failures += 1
    return Verification(
        legacy_fields,
        stored is not None and stored.is_legacy,
        len(chosen),
        failures,
        key_name,
        other_key_fields,
        index_key_elsewhere,
    )


def require_verified(result: Verification, *, one_key: bool = True) -> None:
    """Raise LifecycleError unless *result* is :attr:`~Verification.ok` (with *one_key*
    False: :attr:`~Verification.migrated`), naming what remains."""
    if result.ok or (result.migrated and not one_key):
        return
    remains = [f"{result.legacy_fields} legacy fields remain"]
    if result.index_key_legacy:
        remains.append("the blind-index key is still legacy")
    if one_key and result.other_key_fields:
        remains.append(
            f"{result.other_key_fields} fields are under another key than {result.key_name} "
            "(`heimdall kms migrate` moves them)"
        )
    if one_key and result.index_key_elsewhere:
        remains.append(f"the blind-index key is under another key than {result.key_name}")
    if result.sample_failures:
        remains.append(f"{result.sample_failures} sampled fields failed to decrypt")
    raise LifecycleError(
        "migration is not complete: " + ", ".join(remains),
        dependent_fields=result.legacy_fields + (result.other_key_fields if one_key else 0),
    )
