"""The heimdall service: audited, permission-checked operations on encrypted fields.

Every public method checks the caller's permission first, audits what it did (successes and
failures, with identifiers only), and raises only :mod:`heimdall.errors` types. This is the
data plane: encrypt (through :mod:`heimdall.ingest`), decrypt, lookup, status and the blind
index. The key lifecycle is :mod:`heimdall.rotation` (this class offers its everyday steps as
methods: rotate, set a floor, count dependents), and so is re-encryption.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeGuard

from heimdall import metrics
from heimdall.audit import (
    AuditEvent,
    AuditSink,
    DecryptionRow,
    Decryptions,
    EventType,
    utc_now_ms,
)
from heimdall.blind_index import META_KEY, BlindIndex, StoredIndexKey, is_canonical_key
from heimdall.cipher import FieldCipher
from heimdall.envelope import EncryptionContext, context_of, parse
from heimdall.errors import (
    DecryptionFailed,
    FieldNotFound,
    HeimdallError,
    InvalidEnvelope,
    InvalidInput,
    KeyNotFound,
    KeyVersionDisabled,
    ModeViolation,
    PermissionDenied,
    StorageError,
)
from heimdall.kms.base import KeyDescription, KeyManagementService
from heimdall.modes import CipherRouter
from heimdall.normalize import normalize
from heimdall.policy import FieldAction, Policy
from heimdall.rbac import Caller, Permission
from heimdall.rotation import lifecycle
from heimdall.store.base import FieldCount, FieldValue, GraphStore

__all__ = [
    "DECRYPT_ITEM_ERRORS",
    "FIELD_LABEL",
    "DecryptOutcome",
    "Heimdall",
    "LookupResult",
    "Status",
]

FIELD_LABEL: Final = "FieldValue"
_REASON_RE: Final = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,199}\Z")

# What fails one field of Heimdall.decrypt_each and not the call: the key is not a canonical key
# or names no field, or the field cannot be decrypted as stored. Anything else (the store or the
# key provider unavailable or refusing, the audit trail unwritable, the caller refused) fails the
# whole call.
DECRYPT_ITEM_ERRORS: Final[tuple[type[HeimdallError], ...]] = (
    FieldNotFound,
    DecryptionFailed,
    InvalidEnvelope,
    KeyVersionDisabled,
    KeyNotFound,
    ModeViolation,
    InvalidInput,
)

# A field's plaintext, or the error of its own item.
DecryptOutcome = str | HeimdallError

_NOT_A_KEY: Final = (
    "(<field>:hash:<64 hex digits>); decrypt takes the key `heimdall lookup` prints, never a value"
)
# What the audit event of a decrypted value that is not UTF-8 names as its error.
_NOT_TEXT: Final = UnicodeDecodeError("utf-8", b"", 0, 0, "not UTF-8 text")
# The key_identifier and key_version members of an envelope that decrypted, as its text holds
# them in the canonical layout. Such an envelope passed the parser (heimdall.envelope.load): a
# JSON object of unique members, none of whose values holds a quote or a backslash, so the first
# match is those members and their values' text is their values. Members written otherwise
# (spaced, escaped, in another order) do not match, and are read by the parser instead (_key_of).
_KEY_MEMBERS: Final = re.compile(
    r'"key_identifier":"([A-Za-z0-9._:/@+=,\-]{1,512})","key_version":([0-9]{1,10})[,}]'
)


@dataclass(frozen=True, slots=True)
class LookupResult:
    canonical_key: str
    found: bool
    sightings: int


@dataclass(frozen=True, slots=True)
class Status:
    mode: str
    provider: str
    latest_version: int
    counts: tuple[FieldCount, ...]

    @property
    def total(self) -> int:
        return sum(c.count for c in self.counts)


def field_context(field: FieldValue) -> EncryptionContext:
    return context_of(FIELD_LABEL, field.canonical_key, field.field_name)


class Heimdall:
    """Composes a cipher router, a store, an audit sink and a policy."""

    def __init__(
        self,
        *,
        router: CipherRouter,
        store: GraphStore,
        audit: AuditSink,
        policy: Policy,
    ) -> None:
        self.router = router
        self.store = store
        self.audit = audit
        self.policy = policy
        self._index: BlindIndex | None = None
        self._index_lock = threading.Lock()  # one blind-index key per process, however many threads

    # -- plumbing -------------------------------------------------------------------------

    def record(self, *events: AuditEvent) -> None:
        self.audit.write(events)

    def require(self, caller: Caller, permission: Permission, *, field: str | None = None) -> None:
        """Raise PermissionDenied (audited as access.denied) unless *caller* holds *permission*."""
        if caller.may(permission):
            return
        role = caller.role.value if caller.role else "none"
        self.record(
            AuditEvent.denial(
                caller, permission.value, f"role {role} lacks {permission.value}", field=field
            )
        )
        raise PermissionDenied(f"role {role} may not {permission.value.replace('_', ' ')}")

    @property
    def kms(self) -> KeyManagementService:
        """The provider new fields are wrapped under."""
        return self.router.writer.kms

    # -- blind index ------------------------------------------------------------------------

    def blind_index(self, caller: Caller) -> BlindIndex:
        """The blind index, creating and storing its wrapped key on first use."""
        index = self._index
        if index is not None:
            return index
        with self._index_lock:
            if self._index is None:
                self._index = self._load_blind_index(caller)
            return self._index

    def _load_blind_index(self, caller: Caller) -> BlindIndex:
        stored_text = self.store.get_meta(META_KEY)
        if stored_text is None:
            cipher = self.router.writer
            stored, plaintext = StoredIndexKey.generate(
                cipher.kms, cipher.encryption_version.value, utc_now_ms()
            )
            self.record(
                AuditEvent.of(
                    EventType.KEY_CREATE,
                    caller,
                    key_identifier=stored.wrapped.key_identifier,
                    key_version=stored.wrapped.key_version,
                    operation="blind_index_key",
                )
            )
            if self.store.insert_meta_if_absent(META_KEY, stored.to_json()):
                return BlindIndex(plaintext)
            plaintext.wipe()  # another process created it first; use theirs
            stored_text = self.store.get_meta(META_KEY)
            if stored_text is None:
                raise StorageError("the blind-index key vanished while it was being created")
        stored = StoredIndexKey.from_json(stored_text)
        kms = self.router.reader(stored.encryption_version).kms
        return BlindIndex(kms.unwrap(stored.wrapped, stored.associated_data))

    # -- reads ------------------------------------------------------------------------------

    def decrypt(self, canonical_key: str, *, reason: str, caller: Caller) -> str:
        """The plaintext of one field. Requires a reason; audited whatever the outcome."""
        return self.decrypt_many([canonical_key], reason=reason, caller=caller)[canonical_key]

    def decrypt_many(
        self, canonical_keys: Sequence[str], *, reason: str, caller: Caller
    ) -> dict[str, str]:
        """Plaintexts by canonical key; all-or-nothing. The first key that fails fails the call
        with its error: one audit event per field up to and including it (the fields after it
        are not audited, and no plaintext is returned)."""
        self._check_decrypt(caller, reason)
        malformed = sum(1 for key in canonical_keys if not is_canonical_key(key))
        if malformed:
            # Most likely a value typed where its key belongs: it must reach neither the
            # trail nor the message, so the event names no field.
            self.record(self._decrypt_event(caller, None, None, reason, InvalidInput("")))
            raise InvalidInput(
                f"{malformed} of the {len(canonical_keys)} keys given is not a canonical key "
                + _NOT_A_KEY
            )
        router = self.router
        batch = metrics.CryptoBatch("decrypt", len(canonical_keys), router.writer, router.kms)
        try:
            looked_up = self._look_up(canonical_keys)
        except HeimdallError as exc:
            batch.finish(failed=len(canonical_keys))
            if canonical_keys:
                self.record(self._decrypt_event(caller, canonical_keys[0], None, reason, exc))
            raise
        # Nothing after the first key that cannot even be looked up is decrypted.
        first = next((i for i, (_, _, c) in enumerate(looked_up) if not _is_cipher(c)), None)
        opened = self._open(looked_up if first is None else looked_up[: first + 1])
        stamp = utc_now_ms()  # one time for the batch: its fields are decrypted together
        plaintexts: dict[str, str] = {}
        rows: list[DecryptionRow] = []
        for key, field, outcome, audited in opened:
            rows.append(_decryption_row(key, field, audited))
            if isinstance(outcome, HeimdallError):
                batch.finish(failed=len(canonical_keys))
                self.audit.write(Decryptions.of(caller, reason, stamp, rows))
                raise outcome
            plaintexts[key] = outcome
        batch.finish()
        self.audit.write(Decryptions.of(caller, reason, stamp, rows))
        return plaintexts

    def decrypt_each(
        self, canonical_keys: Sequence[str], *, reason: str, caller: Caller
    ) -> dict[str, DecryptOutcome]:
        """Each distinct key's plaintext, or the error of its own item: one bad key fails only
        itself. Item errors are :data:`DECRYPT_ITEM_ERRORS`: a key that is not a canonical key
        (InvalidInput), names no field (FieldNotFound), or whose field cannot be decrypted as
        stored (DecryptionFailed, InvalidEnvelope, KeyVersionDisabled, KeyNotFound,
        ModeViolation, InvalidInput for a value that is not UTF-8 text).

        Every distinct key is audited exactly once, all in one append before any plaintext is
        returned: a ``crypto.decrypt`` event of success, or of failure naming its error's type.
        Text that is not a canonical key is audited without it (it may be a value typed where
        its key belongs) and is never in a message. Fields are read from the store in one query
        per chunk of keys, and decrypted in one batch per cipher.

        Anything else fails the whole call, and no plaintext leaves it: PermissionDenied (the
        caller's role, or no valid reason: audited as ``access.denied``, nothing read);
        StorageError, ConfigurationError or a KmsError other than the item errors (the store or
        the key provider failed): every key is then audited as a failure, naming its own item
        error or else the error that failed the call; AuditError (the events could not be
        written).
        """
        self._check_decrypt(caller, reason)
        unique = list(dict.fromkeys(canonical_keys))
        keys = [key for key in unique if is_canonical_key(key)]
        malformed = len(unique) - len(keys)
        not_a_key = InvalidInput("not a canonical key " + _NOT_A_KEY)
        outcomes: dict[str, DecryptOutcome] = dict.fromkeys(unique, not_a_key)
        router = self.router
        batch = metrics.CryptoBatch("decrypt", len(keys), router.writer, router.kms)
        try:
            opened = self._open(self._look_up(keys)) if keys else []
        except HeimdallError as exc:
            opened = [(key, None, exc, exc) for key in keys]
        stamp = utc_now_ms()  # one time for the batch: its fields are decrypted together
        # One event per text that is not a canonical key, naming no field.
        rows: list[DecryptionRow] = [_decryption_row(None, None, not_a_key)] * malformed
        fatal = next((o for _, _, o, _ in opened if _fails_the_call(o)), None)
        failed = 0
        for key, field, outcome, own_error in opened:
            if isinstance(outcome, HeimdallError):
                failed += 1
            outcomes[key] = outcome
            # A field that decrypted while the call fails is withheld: a failure, of that error.
            error = own_error if own_error is not None or fatal is None else fatal
            rows.append(_decryption_row(key, field, error))
        batch.finish(failed=len(keys) if fatal is not None else failed)
        self.audit.write(Decryptions.of(caller, reason, stamp, rows))
        if fatal is not None:
            raise fatal
        return outcomes

    def _check_decrypt(self, caller: Caller, reason: str) -> None:
        """PermissionDenied (audited) unless *caller* may decrypt, for a valid *reason*."""
        self.require(caller, Permission.DECRYPT)
        if not isinstance(reason, str) or not _REASON_RE.match(reason):
            self.record(AuditEvent.denial(caller, "decrypt", "no valid reason given"))
            raise PermissionDenied(
                "decrypt requires a reason: 1-200 printable ASCII characters, "
                "e.g. 'support:ticket-1234'"
            )

    def _look_up(
        self, canonical_keys: Sequence[str]
    ) -> list[tuple[str, FieldValue | None, FieldCipher | HeimdallError]]:
        """Each key's field and the cipher that reads it (or the error why not), in order: one
        store query per chunk of keys. Raises the StorageError of a store that fails."""
        fields = self.store.get_fields(canonical_keys)
        reader = self.router.reader
        readers: dict[str, FieldCipher] = {}  # by encryption_version, asked once per call
        looked_up: list[tuple[str, FieldValue | None, FieldCipher | HeimdallError]] = []
        for key in canonical_keys:
            field = fields.get(key)
            try:
                if field is None:
                    raise FieldNotFound("no field has this canonical key")
                cipher = readers.get(field.encryption_version)
                if cipher is None:
                    cipher = readers[field.encryption_version] = reader(field.encryption_version)
                looked_up.append((key, field, cipher))
            except HeimdallError as exc:
                looked_up.append((key, field, exc))
        return looked_up

    def _open(
        self, looked_up: Sequence[tuple[str, FieldValue | None, FieldCipher | HeimdallError]]
    ) -> list[tuple[str, FieldValue | None, DecryptOutcome, BaseException | None]]:
        """Each looked-up field's plaintext (or error), in order, with what its audit event
        names as the error (None on success). Fields are decrypted in one batch per cipher, so
        values the KMS encrypted itself (pattern B) go to it in batch calls."""
        by_cipher: dict[int, list[int]] = {}
        for index, (_, _, cipher) in enumerate(looked_up):
            if _is_cipher(cipher):
                by_cipher.setdefault(id(cipher), []).append(index)
        plaintexts: dict[int, bytes | HeimdallError] = {}
        for indexes in by_cipher.values():
            cipher = looked_up[indexes[0]][2]
            assert isinstance(cipher, FieldCipher)
            items = []
            for index in indexes:
                field = looked_up[index][1]
                assert field is not None
                items.append((field.encrypted_data, field_context(field)))
            plaintexts.update(zip(indexes, cipher.decrypt_many(items), strict=True))
        opened: list[tuple[str, FieldValue | None, DecryptOutcome, BaseException | None]] = []
        for index, (key, field, cipher) in enumerate(looked_up):
            result = plaintexts[index] if isinstance(cipher, FieldCipher) else cipher
            if isinstance(result, HeimdallError):
                opened.append((key, field, result, result))
                continue
            try:
                opened.append((key, field, result.decode(), None))
            except UnicodeDecodeError:
                # Audited as what happened, with none of the value (the codec's own error holds
                # it); the caller gets the error type of bad input.
                refused = InvalidInput("the decrypted value is not UTF-8 text")
                opened.append((key, field, refused, _NOT_TEXT))
        return opened

    def _decrypt_event(
        self,
        caller: Caller,
        key: str | None,
        field: FieldValue | None,
        reason: str,
        error: BaseException | None,
        *,
        timestamp: str | None = None,
    ) -> AuditEvent:
        key_identifier, key_version = _key_of(field, decrypted=error is None)
        return AuditEvent.decryption(
            caller,
            field_identifier=key,
            key_identifier=key_identifier,
            key_version=key_version,
            reason=reason,
            error=error,
            timestamp=timestamp or utc_now_ms(),
        )

    def lookup(self, field_name: str, value: str, *, caller: Caller) -> LookupResult:
        """Find a value by its blind index, decrypting nothing."""
        self.require(caller, Permission.LOOKUP)
        rule = self.policy.rule_for(field_name)
        if rule.action is not FieldAction.ENCRYPT:
            raise InvalidInput(f"field {field_name!r} is not encrypted by the policy")
        try:
            normalised = normalize(rule.normalizer, value)
        except ValueError as exc:
            raise InvalidInput(f"field {field_name!r}: {exc}") from None
        key = self.blind_index(caller).canonical_key(field_name, normalised)
        found = self.store.get_field(key) is not None
        sightings = self.store.count_sightings(key) if found else 0
        self.record(AuditEvent.of(EventType.LOOKUP, caller, field_identifier=key, count=sightings))
        return LookupResult(key, found, sightings)

    def status(self, *, caller: Caller) -> Status:
        self.require(caller, Permission.READ_STATUS)
        description = self.kms.describe()
        return Status(
            mode=self.router.mode.value,
            provider=self.kms.provider,
            latest_version=description.latest_version,
            counts=tuple(self.store.field_counts()),
        )

    # -- keys: the lifecycle lives in heimdall.rotation.lifecycle ---------------------------

    def describe_keys(self, *, caller: Caller) -> KeyDescription:
        return lifecycle.describe(self, caller=caller)

    def rotate_keys(self, *, caller: Caller) -> KeyDescription:
        """New master key version; new fields use it, old fields still decrypt."""
        return lifecycle.rotate(self, caller=caller)

    def dependents_below(self, version: int) -> tuple[int, bool]:
        """Stored fields whose data key is wrapped below *version*, and whether the
        blind-index key is too."""
        return lifecycle.dependents_below(self, version)

    def set_min_decryption_version(
        self, version: int, *, caller: Caller, force: bool = False
    ) -> KeyDescription:
        """Raise the decryption floor; refused while fields still depend on lower versions."""
        return lifecycle.set_min_decryption_version(self, version, caller=caller, force=force)

    def close(self) -> None:
        """Wipe the blind-index key, close the store, and close the audit sink (which writes
        a checkpoint of what this process recorded)."""
        with self._index_lock:
            if self._index is not None:
                self._index.wipe()
                self._index = None
        try:
            self.store.close()
        finally:
            self.audit.close()


def _is_cipher(cipher: FieldCipher | HeimdallError) -> bool:
    return isinstance(cipher, FieldCipher)


def _fails_the_call(outcome: DecryptOutcome) -> TypeGuard[HeimdallError]:
    return isinstance(outcome, HeimdallError) and not isinstance(outcome, DECRYPT_ITEM_ERRORS)


def _decryption_row(
    key: str | None, field: FieldValue | None, error: BaseException | None
) -> DecryptionRow:
    """The ``crypto.decrypt`` event of *key* (see Decryptions), as _decrypt_event makes it."""
    key_identifier, key_version = _key_of(field, decrypted=error is None)
    return key, key_identifier, key_version, None if error is None else type(error).__name__


def _key_of(field: FieldValue | None, *, decrypted: bool = False) -> tuple[str | None, int | None]:
    """The key_identifier and key_version *field*'s envelope names: what its value was (or
    would have been) decrypted under, whatever the row's own key_version column says. The
    envelope of a field that *decrypted* is valid, and its members are read from the text
    without parsing it again (see _KEY_MEMBERS). An envelope that cannot be read names no key;
    its version is then the row's. Never raises."""
    if field is None:
        return None, None
    text = field.encrypted_data
    if decrypted and isinstance(text, str):  # a store may hand over bytes: the parser reads them
        members = _KEY_MEMBERS.search(text)
        if members is not None:
            return members.group(1), int(members.group(2))
    try:
        envelope = parse(text)  # values checked too: a failure's event names only valid ones
    except HeimdallError:
        return None, field.key_version
    return envelope.key_identifier, envelope.key_version
