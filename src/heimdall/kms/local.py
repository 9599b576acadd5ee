"""The embedded default provider: a versioned keyring file in HMD_DATA_DIR.

The keyring holds its master key versions in the clear, protected only by file permissions, so it
is meant for development, tests and single-host deployments that accept that. It is created on
first use with mode 0600 and refused if group or others can read it. Rotation and version floors
are read-modify-write under an exclusive lock, written atomically (temp file, fsync, rename), and
every process picks up a change made by another one on its next key operation.
"""

from __future__ import annotations

import binascii
import fcntl
import json
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from heimdall.aead import KEY_SIZE, Aead
from heimdall.errors import ConfigurationError, HeimdallError, LifecycleError
from heimdall.kms.base import DataKey, Health, KeyDescription, KeyState, WrappedKey
from heimdall.kms.keyset import Keyset, KeysetVersion
from heimdall.secret import SecretBytes, wipe_buffer

__all__ = ["LocalKeyring"]

FORMAT = "heimdall.keyring.v1"
_DOMAIN = b"heimdall.local-keyring.v1\x00"
_WRAP_STALENESS = 1.0  # seconds; see LocalKeyring._current


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class LocalKeyring:
    """A KeyManagementService backed by a keyring file. See the module docstring."""

    provider = "local"

    def __init__(
        self,
        path: Path,
        *,
        key_name: str = "heimdall-pii",
        create: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
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
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _create(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, json.dumps(doc, indent=2).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._path)
        dir_fd = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _read_doc(self) -> tuple[dict[str, Any], tuple[int, int, int]]:
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ConfigurationError(f"keyring file {self._path} does not exist") from None
        except OSError as exc:
            raise ConfigurationError(
                f"keyring file {self._path} cannot be read: {exc.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
                raise ConfigurationError(f"keyring file {self._path} is {kind}")
            mode = stat.S_IMODE(info.st_mode)
            if mode & 0o077:
                raise ConfigurationError(
                    f"keyring file {self._path} is readable by group or others "
                    f"(mode {mode:04o}); run: chmod 600 {self._path}"
                )
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
            raise ConfigurationError(
                f"keyring file {self._path} is missing or unreadable"
            ) from None
        if (info.st_ino, info.st_mtime_ns, info.st_size) != self._stamp:
            self._keyset = self._load()
        self._checked = now
        return self._keyset

    # -- KeyManagementService --------------------------------------------------------------

    def generate_data_key(self, associated_data: bytes) -> DataKey:
        return self._current(_WRAP_STALENESS).generate_data_key(associated_data)

    def wrap(self, plaintext: SecretBytes, associated_data: bytes) -> WrappedKey:
        return self._current(_WRAP_STALENESS).wrap(plaintext, associated_data)

    def wrap_many(
        self, items: Sequence[tuple[SecretBytes, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        return self._current(_WRAP_STALENESS).wrap_many(items)

    def unwrap(self, wrapped: WrappedKey, associated_data: bytes) -> SecretBytes:
        return self._current().unwrap(wrapped, associated_data)

    def unwrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[SecretBytes | HeimdallError]:
        return self._current().unwrap_many(items)

    def rewrap(self, wrapped: WrappedKey, associated_data: bytes) -> WrappedKey:
        return self._current().rewrap(wrapped, associated_data)

    def rewrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        return self._current().rewrap_many(items)

    def describe(self) -> KeyDescription:
        return self._current().describe()

    def rotate(self) -> KeyDescription:
        with self._locked():
            doc, _ = self._read_doc()
            latest = max(v["version"] for v in doc["versions"])
            material = bytearray(os.urandom(KEY_SIZE))
            doc["versions"].append(_version_doc(latest + 1, material))
            wipe_buffer(material)
            self._write(doc)
        return self._current().describe()

    def set_min_decryption_version(self, version: int) -> KeyDescription:
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

    def set_min_encryption_version(self, version: int) -> KeyDescription:
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

    def health(self) -> Health:
        try:
            description = self._current().describe()
        except HeimdallError as exc:
            return Health(False, self.provider, str(exc))
        return Health(True, self.provider, f"keyring {self._path}, v{description.latest_version}")

    def __repr__(self) -> str:
        return f"LocalKeyring(path={str(self._path)!r}, key_name={self._key_name!r})"


def _version_doc(version: int, material: bytearray) -> dict[str, Any]:
    return {
        "version": version,
        "state": KeyState.ACTIVE.value,
        "created_at": _now(),
        "material": binascii.b2a_base64(material, newline=False).decode(),
    }


def _keyset_from_doc(doc: dict[str, Any], path: Path) -> Keyset:
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
        return Keyset(
            provider=LocalKeyring.provider,
            domain=_DOMAIN,
            name=str(doc["key_name"]),
            versions=versions,
            min_decryption_version=int(doc["min_decryption_version"]),
            min_encryption_version=int(doc["min_encryption_version"]),
        )
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise ConfigurationError(f"keyring file {path} is damaged") from None
