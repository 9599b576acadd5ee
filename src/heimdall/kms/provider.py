"""The one wrapper around every key provider.

As the AWS Encryption SDK's MasterKey does, each public method of :class:`KeyProvider` checks
its arguments once, refuses a wrapped key that is not one of this provider's before any call,
reports the call once to the provider's observer (which the composition root binds to
:mod:`heimdall.metrics`: one count and one duration per call, whatever the provider), and turns
a provider that breaks the interface into a KmsError; then it calls the provider's hook. A
provider implements only what its service does:

* ``_generate_data_key``, ``_rotate``, ``_describe`` and the two floors, always;
* the wrapping operations either one at a time (``_wrap_one``, ``_unwrap_one``,
  ``_rewrap_one``: the batch form then runs them item by item, each failing on its own) or in
  batches where the service has a batch API (``_wrap_many`` and the others: Vault's
  ``batch_input``); a service without one but slow per call (a cloud KMS) sets
  ``concurrency`` so the items of a batch are sent side by side;
* :meth:`owns`, which says whether a key identifier names a version of its key.

Error translation stays with each provider, at its SDK's boundary; the seam only makes sure that
nothing but a :class:`heimdall.errors.HeimdallError` comes out of a batch item.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import ClassVar, Final, TypeVar

from heimdall.aead import KEY_SIZE
from heimdall.errors import (
    AccessDenied,
    DecryptionFailed,
    HeimdallError,
    KeyNotFound,
    KeyVersionDisabled,
    KmsError,
    KmsUnavailable,
)
from heimdall.kms.base import DataKey, KeyDescription, KmsCallObserver, WrappedKey
from heimdall.secret import SecretBytes

__all__ = ["MAX_ASSOCIATED_DATA", "MAX_WRAPPED_BYTES", "KeyProvider", "call_result"]

MAX_ASSOCIATED_DATA: Final = 64 * 1024
MAX_WRAPPED_BYTES: Final = 8 * 1024

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def call_result(error: BaseException | None) -> str:
    """The observer's word for how a call ended: a closed set, never an error's message."""
    if error is None:
        return "success"
    for kind, word in (
        (KmsUnavailable, "unavailable"),
        (AccessDenied, "denied"),
        (KeyVersionDisabled, "disabled"),
        (KeyNotFound, "not_found"),
        (DecryptionFailed, "invalid"),
    ):
        if isinstance(error, kind):
            return word
    return "failure"


def _unobserved(provider: str, operation: str, result: str, seconds: float) -> None:
    """The observer of a provider nobody watches."""


class KeyProvider(abc.ABC):
    """A master key held by a key provider; the public methods are the interface heimdall uses
    (:class:`heimdall.kms.base.KeyManagementService`). See the module docstring."""

    provider: ClassVar[str]
    # Items of a batch in flight at once (per-item hooks); a provider may set it per instance,
    # from its settings.
    concurrency: int = 1

    def __init__(self, *, observer: KmsCallObserver | None = None) -> None:
        self._observe: KmsCallObserver = observer or _unobserved
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- the interface -------------------------------------------------------------------

    def generate_data_key(self, associated_data: bytes) -> DataKey:
        """A new random 256-bit data key, wrapped under the latest encryption version."""
        _check_associated_data(associated_data)
        with self._call("generate_data_key"):
            data_key = self._generate_data_key(associated_data)
        if len(data_key.plaintext) != KEY_SIZE:
            data_key.plaintext.wipe()
            raise KmsError(
                "the provider returned a data key of the wrong size", provider=self.provider
            )
        return data_key

    def wrap(self, plaintext: SecretBytes, associated_data: bytes) -> WrappedKey:
        """Wrap an existing data key under the latest encryption version."""
        return _one(self.wrap_many([(plaintext, associated_data)]))

    def wrap_many(
        self, items: Sequence[tuple[SecretBytes, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        for plaintext, associated_data in items:
            _check_associated_data(associated_data)
            if len(plaintext) != KEY_SIZE:
                raise ValueError("a data key is 32 bytes")
        with self._call("wrap"):
            return self._one_answer_each(items, self._wrap_many(items) if items else [])

    def unwrap(self, wrapped: WrappedKey, associated_data: bytes) -> SecretBytes:
        """The plaintext data key (wipe it after use). KeyVersionDisabled below the decryption
        floor; KeyNotFound for a key that is not this provider's."""
        return _one(self.unwrap_many([(wrapped, associated_data)]))

    def unwrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[SecretBytes | HeimdallError]:
        return self._owned("unwrap", items, self._unwrap_many)

    def rewrap(self, wrapped: WrappedKey, associated_data: bytes) -> WrappedKey:
        """The same data key, wrapped under the latest version; the plaintext stays inside
        the provider where it can."""
        return _one(self.rewrap_many([(wrapped, associated_data)]))

    def rewrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        return self._owned("rewrap", items, self._rewrap_many)

    def rotate(self) -> KeyDescription:
        """Create a new key version and make it the one new data keys are wrapped under."""
        with self._call("rotate"):
            return self._rotate()

    def set_min_decryption_version(self, version: int) -> KeyDescription:
        """Refuse to unwrap data keys wrapped below *version* (emergency runbook, step 2)."""
        _check_version(version)
        with self._call("configure"):
            return self._set_min_decryption_version(version)

    def set_min_encryption_version(self, version: int) -> KeyDescription:
        """Retire versions below *version*: decrypt-only from now on."""
        _check_version(version)
        with self._call("configure"):
            return self._set_min_encryption_version(version)

    def describe(self) -> KeyDescription:
        with self._call("describe"):
            return self._describe()

    # -- what every provider fills in ----------------------------------------------------

    @abc.abstractmethod
    def owns(self, key_identifier: str) -> bool:
        """Whether *key_identifier* names a version of this provider's key."""

    @abc.abstractmethod
    def _generate_data_key(self, associated_data: bytes) -> DataKey: ...

    @abc.abstractmethod
    def _rotate(self) -> KeyDescription: ...

    @abc.abstractmethod
    def _describe(self) -> KeyDescription: ...

    @abc.abstractmethod
    def _set_min_decryption_version(self, version: int) -> KeyDescription: ...

    @abc.abstractmethod
    def _set_min_encryption_version(self, version: int) -> KeyDescription: ...

    def _wrap_one(self, plaintext: SecretBytes, associated_data: bytes) -> WrappedKey:
        raise NotImplementedError

    def _unwrap_one(self, wrapped: WrappedKey, associated_data: bytes) -> SecretBytes:
        raise NotImplementedError

    def _rewrap_one(self, wrapped: WrappedKey, associated_data: bytes) -> WrappedKey:
        raise NotImplementedError

    def _wrap_many(
        self, items: Sequence[tuple[SecretBytes, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        return self._each(self._wrap_one, items)

    def _unwrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[SecretBytes | HeimdallError]:
        return self._each(self._unwrap_one, items)

    def _rewrap_many(
        self, items: Sequence[tuple[WrappedKey, bytes]]
    ) -> list[WrappedKey | HeimdallError]:
        return self._each(self._rewrap_one, items)

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def _call(self, operation: str) -> Iterator[None]:
        """Report the call once: its operation, how it ended and how long it took."""
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            seconds = time.perf_counter() - started
            self._observe(self.provider, operation, call_result(error), seconds)

    def _owned(
        self,
        operation: str,
        items: Sequence[tuple[WrappedKey, bytes]],
        hook: Callable[[Sequence[tuple[WrappedKey, bytes]]], list[_Result | HeimdallError]],
    ) -> list[_Result | HeimdallError]:
        """*hook* on the items whose wrapped key is this provider's; the others refused, each
        on its own, before any call."""
        results: list[_Result | HeimdallError | None] = []
        mine: list[tuple[WrappedKey, bytes]] = []
        for wrapped, associated_data in items:
            _check_associated_data(associated_data)
            refusal = self._refusal(wrapped)
            results.append(refusal)
            if refusal is None:
                mine.append((wrapped, associated_data))
        answers: Iterator[_Result | HeimdallError] = iter([])
        if mine:
            with self._call(operation):
                answered = self._one_answer_each(mine, hook(mine))
            answers = iter(
                self._name_version(answer, wrapped)
                for answer, (wrapped, _) in zip(answered, mine, strict=True)
            )
        return [next(answers) if result is None else result for result in results]

    def _name_version(
        self, answer: _Result | HeimdallError, wrapped: WrappedKey
    ) -> _Result | HeimdallError:
        """A refusal for the version's floor names that version, whatever the service said."""
        if isinstance(answer, KeyVersionDisabled) and not answer.key_version:
            return KeyVersionDisabled(
                str(answer),
                provider=self.provider,
                key_identifier=wrapped.key_identifier,
                key_version=wrapped.key_version,
            )
        return answer

    def _refusal(self, wrapped: WrappedKey) -> HeimdallError | None:
        if not 0 < len(wrapped.ciphertext) <= MAX_WRAPPED_BYTES or wrapped.key_version < 1:
            return KeyNotFound(
                "the wrapped key is malformed", provider=self.provider, key_identifier=""
            )
        if not self.owns(wrapped.key_identifier):
            return KeyNotFound(
                self._foreign(wrapped.key_identifier),
                provider=self.provider,
                key_identifier=wrapped.key_identifier,
            )
        return None

    def _foreign(self, key_identifier: str) -> str:
        """Why *key_identifier*, which :meth:`owns` refused, is not this provider's: a provider
        that can tell the likely cause (another env key, another keyring) says so here."""
        return f"the wrapped key names {key_identifier}, not a key of the {self.provider} provider"

    def _one_answer_each(
        self, items: Sequence[object], results: list[_Result | HeimdallError]
    ) -> list[_Result | HeimdallError]:
        if len(results) != len(items):
            raise KmsError(
                f"the provider answered {len(results)} results for {len(items)} items",
                provider=self.provider,
            )
        return results

    def _each(
        self,
        operation: Callable[[_Item, bytes], _Result],
        items: Sequence[tuple[_Item, bytes]],
    ) -> list[_Result | HeimdallError]:
        """Batch semantics over a per-item hook: each item fails on its own, and with
        ``concurrency`` above 1 up to that many are in flight at once."""

        def one(item: tuple[_Item, bytes]) -> _Result | HeimdallError:
            try:
                return operation(*item)
            except HeimdallError as exc:
                return exc

        if self.concurrency <= 1 or len(items) <= 1:
            return [one(item) for item in items]
        return list(self._batch_pool().map(one, items))

    def _batch_pool(self) -> ThreadPoolExecutor:
        """The provider's one pool, made at the first batch that needs it. Batches arrive from
        many threads at once (the API's, a job's): without the lock two could each make a pool,
        and one would leak its threads."""
        pool = self._pool
        if pool is None:
            with self._pool_lock:
                pool = self._pool
                if pool is None:
                    pool = self._pool = ThreadPoolExecutor(
                        self.concurrency, thread_name_prefix=f"heimdall-{self.provider}"
                    )
        return pool


def _one(results: list[_Result | HeimdallError]) -> _Result:
    (result,) = results
    if isinstance(result, HeimdallError):
        raise result
    return result


def _check_associated_data(associated_data: object) -> None:
    if not isinstance(associated_data, bytes | bytearray) or not associated_data:
        raise ValueError("associated data must be non-empty bytes")
    if len(associated_data) > MAX_ASSOCIATED_DATA:
        raise ValueError("associated data is over 64 KiB")


def _check_version(version: int) -> None:
    if type(version) is not int or version < 1:
        raise ValueError("a key version is a positive integer")
