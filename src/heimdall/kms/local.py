"""The embedded default provider: a versioned keyring file in HMD_DATA_DIR.

The keyring holds its master key versions in the clear, protected only by file permissions, so it
is meant for development, tests and single-host deployments that accept that. It is created on
first use with mode 0600 and refused if group or others can read it. Rotation and version floors
are read-modify-write under an exclusive lock, written atomically (temp file, fsync, rename), and
every process picks up a change made by another one on its next key operation.

The keyring also holds the audit trail's MAC key (:meth:`LocalKeyring.audit_key`, HMAC-SHA256,
spec: Audit Log Requirements), created on first use under the same lock and in the same atomic
write: the keyring file is what holds every key of this provider, and whoever can read it can
forge checkpoints, as they can decrypt every field.
"""

from __future__ import annotations

import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from heimdall.aead import KEY_SIZE, Aead
from heimdall.errors import ConfigurationError, HeimdallError, KmsUnavailable, LifecycleError
from heimdall.kms.base import (
    AuditKey,
    DataKey,
    DirectCiphertext,
    KeyDescription,
    KeyState,
    KmsCallObserver,
    WrappedKey,
    valid_key_name,
)
from heimdall.kms.keyset import Keyset, KeysetVersion
from heimdall.kms.provider import KeyProvider
from heimdall.private_files import ensure_private_dir, open_private, write_all
from heimdall.secret import SecretBytes, wipe_buffer

__all__ = ["LocalKeyring"]

FORMAT = "heimdall.keyring.v1"
_DOMAIN = b"heimdall.local-keyring.v1\x00"
_WRAP_STALENESS = 1.0  # seconds; see LocalKeyring._current
_AUDIT_KEY = "audit_key"
_AUDIT_MAC_PREFIX = "hmac-sha256:v1:"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class LocalKeyring(KeyProvider):
    """A key provider backed by a keyring file. See the module docstring."""

    provider = "local"

    def __init__(
        self,
        path: Path,
        *,
        key_name: str = "heimdall-pii",
        create: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
        observer: KmsCallObserver | None = None,
    ) -> None:
        super().__init__(observer=observer)
        self._path = Path(path)
        self._monotonic = monotonic
        self._key_name = key_name
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        if not self._path.exists():
            if not create:
                raise ConfigurationError(f"keyring file {self._path} does not exist")
            self._create()
        self._keyset = self._load()

    @property
    def path(self) -> Path:
        return self._path

    # -- file handling -------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self._path.with_name(self._path.name + ".lock")
        try:
            fd = open_private(lock_path, os.O_RDWR | os.O_CREAT, what="keyring lock file")
        except OSError as exc:
            raise ConfigurationError(
                f"keyring lock file {lock_path} cannot be opened: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _create(self) -> None:
        if not self._path.parent.exists():
            ensure_private_dir(self._path.parent, "keyring directory")
        with self._locked():
            if self._path.exists():
                return
            material = bytearray(os.urandom(KEY_SIZE))
            doc = {
                "format": FORMAT,
                "key_name": self._key_name,
                "min_decryption_version": 1,
                "min_encryption_version": 1,
                "versions": [_version_doc(1, material)],
            }
            wipe_buffer(material)
            self._write(doc)

    def _write(self, doc: dict[str, Any]) -> None:
        # A fresh random name, created O_EXCL in the checked directory, so no planted file or
        # link is ever written through; then renamed over the keyring atomically.
        # A short write (a full disk) must never become the keyring: every key is in it.
        tmp = self._path.with_name(f".{self._path.name}.{secrets.token_hex(8)}.tmp")
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, what="keyring file")
        try:
            try:
                write_all(fd, json.dumps(doc, indent=2).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # it holds every master key
            raise KmsUnavailable(
                f"keyring file {self._path} cannot be written ({exc.strerror}); "
                "it was left as it was",
                provider=self.provider,
            ) from None
        dir_fd = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _read_doc(self) -> tuple[dict[str, Any], tuple[int, int, int]]:
        try:
            # Checks the owner, the mode (no access for group or others) and the directory.
            fd = open_private(self._path, os.O_RDONLY, what="keyring file", secret=True)
        except FileNotFoundError:
            raise ConfigurationError(f"keyring file {self._path} does not exist") from None
        except OSError as exc:
            raise ConfigurationError(
                f"keyring file {self._path} cannot be read: {exc.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
            with os.fdopen(os.dup(fd), "rb") as handle:
                raw = handle.read()
        finally:
            os.close(fd)
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ConfigurationError(f"keyring file {self._path} is not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ConfigurationError(f"keyring file {self._path} is not a {FORMAT} keyring")
        return doc, (info.st_ino, info.st_mtime_ns, info.st_size)

    def _load(self) -> Keyset:
        doc, stamp = self._read_doc()
        keyset = _keyset_from_doc(doc, self._path)
        self._stamp = stamp
        return keyset

    def _current(self, max_staleness: float = 0.0) -> Keyset:
        """The keyset, reloaded if another process changed the file since we read it.

        Decryption (and describe) always check the file, so a raised decryption floor applies
        at once; encryption may use a keyset up to *max_staleness* seconds old, since wrapping
        a new data key under the previous version for that long is harmless.
        """
        now = self._monotonic()
        if max_staleness and now - self._checked < max_staleness:
            return self._keyset
        try:
            info = os.stat(self._path)
        except OSError:
            # It was there when this provider opened it: the service is gone, perhaps for a
            # while (a lost mount), as a server can be.
            raise KmsUnavailable(
                f"keyring file {self._path} is missing or unreadable", provider=self.provider
            ) from None
        if (info.st_ino, info.st_mtime_ns, info.st_size) != self._stamp:
            self._keyset = self._load()
        self._checked = now
        return self._keyset

    # -- KeyProvider hooks ----------------------------------------------------------------

    def owns(self, key_identifier: str) -> bool:
        return self._current(_WRAP_STALENESS).owns(key_identifier)

    def _foreign(self, key_identifier: str) -> str:
        return self._current(_WRAP_STALENESS).foreign(key_identifier)

    def _generate_data_key(self, associated_data: bytes) -> DataKey:
        return self._current(_WRAP_STALENESS).generate_data_key(associated_data)

    def _wrap_many(
        self, items: Sequence[tuple[SecretBytes, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        return self._each(self._current(_WRAP_STALENESS).wrap, items)

    def _unwrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[SecretBytes | HeimdallError]:
        return self._each(self._current().unwrap, items)

    def _rewrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        return self._each(self._current().rewrap, items)

    # -- DirectEncryption (pattern B) --------------------------------------------------------

    def encrypt_values(
        self, items: Sequence[tuple[SecretBytes, bytes]]
    ) -> list[DirectCiphertext | HeimdallError]:
        with self._call("encrypt_values"):
            return self._each(self._current(_WRAP_STALENESS).encrypt_value, items)

    def decrypt_values(
        self, items: Sequence[tuple[DirectCiphertext, bytes]]
    ) -> list[SecretBytes | HeimdallError]:
        with self._call("decrypt_values"):
            return self._each(self._current().decrypt_value, items)

    def reencrypt_values(
        self, items: Sequence[tuple[DirectCiphertext, bytes]]
    ) -> list[DirectCiphertext | HeimdallError]:
        with self._call("reencrypt_values"):
            return self._each(self._current().reencrypt_value, items)

    # -- the key ---------------------------------------------------------------------------

    def _describe(self) -> KeyDescription:
        return self._current().describe()

    def _rotate(self) -> KeyDescription:
        with self._locked():
            doc, _ = self._read_doc()
            latest = max(v["version"] for v in doc["versions"])
            material = bytearray(os.urandom(KEY_SIZE))
            doc["versions"].append(_version_doc(latest + 1, material))
            wipe_buffer(material)
            self._write(doc)
        return self._current().describe()

    def _set_min_decryption_version(self, version: int) -> KeyDescription:
        with self._locked():
            doc, _ = self._read_doc()
            latest = max(v["version"] for v in doc["versions"])
            if not 1 <= version <= latest:
                raise LifecycleError(
                    f"min_decryption_version must be between 1 and the latest version {latest}"
                )
            doc["min_decryption_version"] = version
            doc["min_encryption_version"] = max(doc["min_encryption_version"], version)
            self._write(doc)
        return self._current().describe()

    def _set_min_encryption_version(self, version: int) -> KeyDescription:
        """Retire every version below *version*: they still decrypt but no longer encrypt."""
        with self._locked():
            doc, _ = self._read_doc()
            latest = max(v["version"] for v in doc["versions"])
            if not 1 <= version <= latest:
                raise LifecycleError(
                    f"min_encryption_version must be between 1 and the latest version {latest}"
                )
            doc["min_encryption_version"] = max(version, doc["min_decryption_version"])
            self._write(doc)
        return self._current().describe()

    # -- the audit key ---------------------------------------------------------------------

    def audit_key(self) -> AuditKey:
        """The key that authenticates the audit trail's checkpoints (see the module docstring)."""
        return _LocalAuditKey(self)

    def _audit_material(self, *, create: bool) -> bytearray | None:
        """The audit MAC key (wipe it after use); created first if *create*, else None when
        the keyring has none yet."""
        doc, _ = self._read_doc()
        if _AUDIT_KEY not in doc and create:
            with self._locked():
                doc, _ = self._read_doc()
                if _AUDIT_KEY not in doc:  # not created by another process meanwhile
                    material = bytearray(os.urandom(KEY_SIZE))
                    doc[_AUDIT_KEY] = {
                        "created_at": _now(),
                        "material": binascii.b2a_base64(material, newline=False).decode(),
                    }
                    wipe_buffer(material)
                    self._write(doc)
        entry = doc.get(_AUDIT_KEY)
        if entry is None:
            return None
        try:
            material = bytearray(binascii.a2b_base64(entry["material"], strict_mode=True))
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise ConfigurationError(f"keyring file {self._path} has a damaged audit key") from None
        if len(material) != KEY_SIZE:
            wipe_buffer(material)
            raise ConfigurationError(f"keyring file {self._path} has a damaged audit key")
        return material

    def __repr__(self) -> str:
        return f"LocalKeyring(path={str(self._path)!r}, key_name={self._key_name!r})"


class _LocalAuditKey:
    """The keyring's audit MAC key: HMAC-SHA256, MACs written ``hmac-sha256:v1:<base64>``."""

    key_identifier = "local/audit"

    def __init__(self, keyring: LocalKeyring) -> None:
        self._keyring = keyring

    def sign(self, message: bytes) -> str:
        material = self._keyring._audit_material(create=True)
        assert material is not None  # created if missing
        return _AUDIT_MAC_PREFIX + _hmac(material, message)

    def exists(self) -> bool:
        material = self._keyring._audit_material(create=False)
        if material is None:
            return False
        wipe_buffer(material)
        return True

    def verify(self, message: bytes, mac: str) -> bool:
        material = self._keyring._audit_material(create=False)
        if material is None:
            raise ConfigurationError(
                f"keyring file {self._keyring.path} holds no audit key, so it cannot check "
                "checkpoints: is this the keyring that wrote the trail?"
            )
        expected = _AUDIT_MAC_PREFIX + _hmac(material, message)
        return hmac.compare_digest(expected.encode(), mac.encode(errors="replace"))

    def __repr__(self) -> str:
        return f"_LocalAuditKey(keyring={str(self._keyring.path)!r})"


def _hmac(material: bytearray, message: bytes) -> str:
    try:
        digest = hmac.new(material, message, hashlib.sha256).digest()
    finally:
        wipe_buffer(material)
    return binascii.b2a_base64(digest, newline=False).decode()


def _version_doc(version: int, material: bytearray) -> dict[str, Any]:
    return {
        "version": version,
        "state": KeyState.ACTIVE.value,
        "created_at": _now(),
        "material": binascii.b2a_base64(material, newline=False).decode(),
    }


def _keyset_from_doc(doc: dict[str, Any], path: Path) -> Keyset:
    if not valid_key_name(doc.get("key_name")):
        # Only an older heimdall could have written one: the name is bound into every key it
        # wrapped, so it cannot simply be corrected in place.
        raise ConfigurationError(
            f"keyring file {path} names its key with characters a key name may not hold; if "
            "no field was stored under it, remove the keyring and the database and start again"
        )
    try:
        versions: dict[int, KeysetVersion] = {}
        for entry in doc["versions"]:
            material = bytearray(binascii.a2b_base64(entry["material"], strict_mode=True))
            try:
                aead = Aead(material)
            finally:
                wipe_buffer(material)
            version = int(entry["version"])
            versions[version] = KeysetVersion(
                version, KeyState(entry["state"]), str(entry["created_at"]), aead
            )
        name = str(doc["key_name"])
        return Keyset(
            provider=LocalKeyring.provider,
            domain=_DOMAIN,
            name=name,
            versions=versions,
            min_decryption_version=int(doc["min_decryption_version"]),
            min_encryption_version=int(doc["min_encryption_version"]),
        )
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise ConfigurationError(f"keyring file {path} is damaged") from None
