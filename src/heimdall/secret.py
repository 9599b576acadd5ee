"""Wipeable holders for key material.

Python cannot promise that no copy of a secret ever exists (the interpreter and OpenSSL make
their own), but key bytes that heimdall owns live in one mutable buffer that is overwritten
with zeros as soon as the key is no longer needed, and never show in a repr, str or pickle.
"""

from __future__ import annotations

import binascii
import ctypes
import os
import sys
from types import TracebackType
from typing import NoReturn, Self

__all__ = ["SecretBytes", "take_environment_secrets", "take_environment_variable"]


class SecretBytes:
    """A bytearray of key material with a masked repr and an explicit :meth:`wipe`.

    Use it as a context manager to wipe on exit::

        with SecretBytes(os.urandom(32)) as key:
            aead = Aead(key.view())
    """

    __slots__ = ("_buffer", "_wiped")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer = bytearray(data)
        self._wiped = False

    @classmethod
    def adopt(cls, buffer: bytearray) -> SecretBytes:
        """Take ownership of *buffer* without copying it."""
        secret = cls.__new__(cls)
        secret._buffer = buffer
        secret._wiped = False
        return secret

    @classmethod
    def random(cls, size: int) -> SecretBytes:
        """*size* bytes from the operating system's CSPRNG, read straight into the buffer
        (``os.urandom`` would leave an immutable copy of the key behind)."""
        buffer = bytearray(size)
        try:
            fd = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no /dev (a bare chroot): the immutable copy cannot be avoided
            buffer[:] = os.urandom(size)
            return cls.adopt(buffer)
        try:
            view = memoryview(buffer)
            filled = 0
            while filled < size:
                filled += os.readv(fd, [view[filled:]])
        finally:
            os.close(fd)
        return cls.adopt(buffer)

    @classmethod
    def from_base64(cls, text: str | bytes | bytearray | memoryview) -> SecretBytes:
        """Decode strict base64 (padded, no whitespace) into a new buffer.

        binascii returns the key as an immutable ``bytes`` object; on CPython that object,
        which nothing else references, is overwritten with zeros once copied, so no key byte
        is left in freed memory. Raises ValueError (never echoing the text) if *text* is not
        such base64.
        """
        try:
            decoded = binascii.a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError, TypeError):
            raise ValueError("not base64") from None
        secret = cls(decoded)
        _zero_fresh_bytes(decoded)
        return secret

    def view(self) -> bytearray:
        """The live buffer. Callers must not keep it beyond the secret's lifetime."""
        if self._wiped:
            raise ValueError("key material was already wiped")
        return self._buffer

    def __len__(self) -> int:
        return len(self._buffer)

    @property
    def wiped(self) -> bool:
        return self._wiped

    def wipe(self) -> None:
        """Overwrite the buffer with zeros. Idempotent."""
        if not self._wiped:
            wipe_buffer(self._buffer)
            self._wiped = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __del__(self) -> None:
        self.wipe()

    def __repr__(self) -> str:
        state = "wiped" if self._wiped else f"{len(self._buffer)} bytes"
        return f"SecretBytes(<redacted, {state}>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        # Equality on secrets invites timing leaks and accidental logging; compare explicitly.
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled")


def wipe_buffer(buffer: bytearray) -> None:
    """Overwrite a bytearray in place with zeros."""
    buffer[:] = bytes(len(buffer))  # in place: same length, so the buffer is not reallocated


_ENVIRONMENT_ONLY = 3  # references to a value only os.environ holds, seen from _take
# Secrets taken out of the environment when heimdall was imported, until they are claimed.
_TAKEN: dict[str, SecretBytes] = {}
ENVIRONMENT_SECRETS = ("HMD_MASTER_KEY",)


def take_environment_secrets() -> None:
    """Take every secret heimdall reads from the environment out of it, now.

    Called first thing when the heimdall package is imported, before any library it uses is:
    some copy the whole environment into strings of their own at import time (the standard
    library's wsgiref does), which no one can wipe afterwards.
    """
    for name in ENVIRONMENT_SECRETS:
        secret = _take(name)
        if secret is not None:
            previous = _TAKEN.pop(name, None)
            if previous is not None:
                previous.wipe()
            _TAKEN[name] = secret


def take_environment_variable(name: str) -> SecretBytes | None:
    """The secret in environment variable *name*, in a wipeable buffer, handed over once.

    The variable is removed from the environment (no child process inherits it), and on
    CPython its value is first overwritten with zeros where the process keeps it: the C
    environment block (which /proc/<pid>/environ shows) and the bytes object in os.environ.
    Without that, both copies would stay readable in memory for the life of the process.
    None when the variable is unset or empty, or was handed over already.
    """
    current = _take(name)
    taken = _TAKEN.pop(name, None)
    if current is None:
        return taken
    if taken is not None:
        taken.wipe()  # the environment was set again since: the newer value wins
    return current


def _take(name: str) -> SecretBytes | None:
    if not hasattr(os, "environb"):  # pragma: no cover - not POSIX
        value = os.environ.pop(name, "")
        return SecretBytes(value.encode()) if value else None
    key = name.encode()
    stored = os.environb.get(key)  # the very bytes object os.environ keeps, not a copy
    if stored is None:
        return None
    secret = SecretBytes(stored) if stored else None
    if sys.implementation.name == "cpython":
        _zero_c_environment(key)
        # Only when nothing but the environment holds it (its dict, this frame, the call's
        # argument): a value the application put there itself may be a constant it still uses.
        if sys.getrefcount(stored) <= _ENVIRONMENT_ONLY:
            _zero_bytes_object(stored)
    del os.environb[key]  # also unsetenv()
    return secret


def _zero_c_environment(key: bytes) -> None:
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_void_p
    libc.getenv.argtypes = [ctypes.c_char_p]
    address = libc.getenv(key)
    if address:
        ctypes.memset(address, 0, libc.strlen(ctypes.c_void_p(address)))


def _zero_bytes_object(data: bytes) -> None:
    """Overwrite a bytes object's contents in place. Only for an object no one else uses:
    a bytes object is immutable to Python code, which may share or cache it (CPython shares
    the empty and the one-byte objects, which are never passed here)."""
    if len(data) > 1:
        offset = bytes.__basicsize__ - 1  # CPython: PyBytesObject.ob_sval
        ctypes.memset(id(data) + offset, 0, len(data))


def _zero_fresh_bytes(data: bytes) -> None:
    """Zero a bytes object this module just received from a decoder (and alone holds)."""
    if sys.implementation.name == "cpython":
        _zero_bytes_object(data)
