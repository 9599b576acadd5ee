"""The KeyProvider seam itself: the thread pool a provider sends batch items through."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from heimdall.kms import provider as provider_module
from heimdall.kms.base import DataKey, KeyDescription, WrappedKey
from heimdall.kms.provider import KeyProvider
from heimdall.secret import SecretBytes

THREADS = 16


class _SideBySide(KeyProvider):
    """A provider whose batch items go side by side (a cloud KMS's shape), wrapping locally."""

    provider = "test"
    concurrency = 4

    def owns(self, key_identifier: str) -> bool:
        return key_identifier == "test-v1"

    def _wrap_one(self, plaintext: SecretBytes, associated_data: bytes) -> WrappedKey:
        return WrappedKey("test-v1", 1, bytes(plaintext.view()[:4]) + associated_data)

    def _generate_data_key(self, associated_data: bytes) -> DataKey:
        raise NotImplementedError

    def _rotate(self) -> KeyDescription:
        raise NotImplementedError

    def _describe(self) -> KeyDescription:
        raise NotImplementedError

    def _set_min_decryption_version(self, version: int) -> KeyDescription:
        raise NotImplementedError

    def _set_min_encryption_version(self, version: int) -> KeyDescription:
        raise NotImplementedError


def test_batches_from_many_threads_at_once_share_one_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[ThreadPoolExecutor] = []
    made_lock = threading.Lock()

    class _Counted(ThreadPoolExecutor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(0.05)  # a slow start widens the window two threads could both enter
            super().__init__(*args, **kwargs)
            with made_lock:
                made.append(self)

    monkeypatch.setattr(provider_module, "ThreadPoolExecutor", _Counted)
    provider = _SideBySide()
    start = threading.Barrier(THREADS)
    results: list[list[object]] = []

    def batch() -> None:
        items = [(SecretBytes.random(32), b"item one"), (SecretBytes.random(32), b"item two")]
        start.wait()
        answers = provider.wrap_many(items)
        with made_lock:
            results.append(list(answers))

    threads = [threading.Thread(target=batch) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert len(made) == 1
        assert len(results) == THREADS
        assert all(isinstance(answer, WrappedKey) for answers in results for answer in answers)
    finally:
        for pool in made:
            pool.shutdown(wait=True)
