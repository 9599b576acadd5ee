"""Wipeable holders for key material.

Python cannot promise that no copy of a secret ever exists (the interpreter and OpenSSL make
their own), but key bytes that heimdall owns live in one mutable buffer that is overwritten
with zeros as soon as the key is no longer needed, and never show in a repr, str or pickle.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import NoReturn, Self

__all__ = ["SecretBytes"]


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
        """*size* bytes from the operating system's CSPRNG."""
        return cls.adopt(bytearray(os.urandom(size)))

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
