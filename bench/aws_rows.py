"""aws/ingest, aws/decrypt and aws/rewrap: heimdall's AWS KMS provider on the bench's moto server.

Each row has a KMS key of its own, made by heimdall's bootstrap as ``heimdall aws bootstrap``
makes it (version 1, its aliases and key policy, the audit key). The provider is built the way
the application builds it: :func:`heimdall.app.build` for ingest, :class:`AwsKms` with the
:class:`AwsSettings` defaults otherwise. Every run reports the HTTP requests the provider's SDK
clients sent to KMS inside the timed block, by operation, and moto's CPU time meanwhile.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from bench import envelopes, ingest
from bench.aws import (
    AWS_DECRYPT,
    AWS_INGEST,
    AWS_REWRAP,
    CALLS_CEILING,
    AwsResult,
    AwsRun,
    AwsSizes,
)
from bench.aws_server import REGION, MotoServer, RequestCounter
from bench.envelopes import FIELD_NAME, VERSION, Corpus
from bench.report import Result
from bench.timing import Stopwatch, measure
from heimdall.app import build
from heimdall.cipher import CachePolicy, FieldCipher
from heimdall.envelope import ALGORITHM, EncryptionContext, wrap_associated_data
from heimdall.errors import HeimdallError
from heimdall.ingest import IngestReport, ingest_lines
from heimdall.kms.aws import AwsKms
from heimdall.kms.aws_bootstrap import bootstrap
from heimdall.kms.aws_client import connect
from heimdall.kms.aws_config import AwsSettings
from heimdall.kms.base import WrappedKey
from heimdall.rbac import Caller
from heimdall.service import FIELD_LABEL
from heimdall.settings import Settings

__all__ = [
    "Rewrapper",
    "aws_settings",
    "decrypt_run",
    "ingest_run",
    "new_key",
    "request_counter",
    "run",
    "seal",
    "wrapped_data_keys",
]


def aws_settings(server: MotoServer, key_name: str) -> AwsSettings:
    return AwsSettings(key_name=key_name, region=REGION, endpoint_url=server.url)


def new_key(server: MotoServer) -> str:
    """A fresh key, bootstrapped as ``heimdall aws bootstrap`` does; its name."""
    name = f"heimdall-bench-{secrets.token_hex(4)}"
    settings = aws_settings(server, name)
    bootstrap(connect(settings), settings, {})
    return name


def request_counter(kms: AwsKms) -> RequestCounter:
    """Counts what *kms* sends to KMS: its clients in every region, retried and not."""
    return RequestCounter(
        client for region in kms.clients.regions for client in (region.kms, region.once)
    )


_T = TypeVar("_T")


def _timed(
    server: MotoServer, counter: RequestCounter, cipher: FieldCipher | None, work: Callable[[], _T]
) -> tuple[AwsRun, _T]:
    """*work* timed, with the KMS requests, cipher calls and moto CPU time it took."""
    requests, cpu = counter.snapshot(), server.cpu_seconds()
    calls = cipher.kms_calls if cipher is not None else 0
    with Stopwatch() as clock:
        result = work()
    sent = counter.since(requests, counter.snapshot())
    run = AwsRun(
        clock.seconds,
        clock.cpu_seconds,
        sum(n for _, n in sent),
        sent,
        cipher.kms_calls - calls if cipher is not None else None,
        server.cpu_seconds() - cpu,
    )
    return run, result


# -- ingest -------------------------------------------------------------------------------------


def _check_ingest(report: IngestReport, records: int) -> None:
    expected = records * len(ingest.ENCRYPT_FIELDS)
    if (
        report.errors
        or report.records != records
        or report.fields_encrypted != expected
        or report.fields_deduplicated
    ):
        raise AssertionError(
            f"aws ingest did not encrypt every field: {report.records} records, "
            f"{report.fields_encrypted}/{expected} fields encrypted, "
            f"{report.fields_deduplicated} deduplicated, {len(report.errors)} errors"
        )


def ingest_run(server: MotoServer, key_name: str, lines: tuple[str, ...]) -> AwsRun:
    """:func:`bench.ingest.ingest_run` with ``build(Settings(kms_provider="aws", ...))``: a
    fresh data dir (SQLite, audit log with fsync) each run, the same KMS key throughout."""
    with tempfile.TemporaryDirectory(prefix="heimdall-bench-aws-") as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            kms_provider="aws",
            kms_key_name=key_name,
            aws=aws_settings(server, key_name),
        )
        heimdall = build(settings)
        try:
            caller = Caller(actor="bench")
            # Created once per store (a data key from KMS), so made before the clock starts.
            heimdall.blind_index(caller)
            cipher = heimdall.router.writer
            assert isinstance(cipher.kms, AwsKms)
            run, report = _timed(
                server,
                request_counter(cipher.kms),
                cipher,
                partial(
                    ingest_lines,
                    heimdall,
                    lines,
                    caller=caller,
                    source_name="bench",
                    batch_size=ingest.BATCH_SIZE,
                ),
            )
        finally:
            heimdall.close()
    _check_ingest(report, len(lines))
    return run


# -- decrypt ------------------------------------------------------------------------------------


def _context(key: str) -> EncryptionContext:
    return EncryptionContext(FIELD_LABEL, key, FIELD_NAME)


def seal(kms: AwsKms, corpus: Corpus) -> tuple[str, ...]:
    """Envelopes under the default cache: data keys from GenerateDataKey, values sealed
    locally."""
    cipher = FieldCipher(kms, VERSION, CachePolicy())
    return tuple(
        cipher.encrypt(value, _context(key)).envelope
        for value, key in zip(corpus.values, corpus.canonical_keys, strict=True)
    )


def decrypt_run(
    server: MotoServer,
    kms: AwsKms,
    counter: RequestCounter,
    corpus: Corpus,
    sealed: tuple[str, ...],
) -> AwsRun:
    """``FieldCipher.decrypt`` per field with a fresh cipher (default cache, so cold): each
    distinct data key unwrapped through KMS Decrypt once."""
    cipher = FieldCipher(kms, VERSION, CachePolicy())

    def work() -> list[bytes]:
        decrypt = cipher.decrypt
        return [
            decrypt(envelope, EncryptionContext(FIELD_LABEL, key, FIELD_NAME))
            for envelope, key in zip(sealed, corpus.canonical_keys, strict=True)
        ]

    run, plaintexts = _timed(server, counter, cipher, work)
    if tuple(plaintexts) != corpus.values:
        raise AssertionError("aws decrypt returned wrong plaintexts")
    return run


# -- rewrap -------------------------------------------------------------------------------------


def wrapped_data_keys(kms: AwsKms, count: int) -> list[tuple[WrappedKey, bytes]]:
    """*count* data keys from GenerateDataKey, each under its own associated data (as
    FieldCipher makes them: version, algorithm, a fresh dek_id); plaintexts wiped at once."""
    items = []
    for _ in range(count):
        ad = wrap_associated_data(VERSION.value, ALGORITHM, secrets.token_hex(16))
        data_key = kms.generate_data_key(ad)
        data_key.plaintext.wipe()
        items.append((data_key.wrapped, ad))
    return items


class Rewrapper:
    """One run: rotate the key (a new KMS key, untimed), then ``rewrap_many`` of the keys,
    timed. Each run rewraps what the previous run produced, so every run really moves every
    key to a new version (checked)."""

    def __init__(
        self,
        server: MotoServer,
        kms: AwsKms,
        counter: RequestCounter,
        items: list[tuple[WrappedKey, bytes]],
    ) -> None:
        self.server = server
        self.kms = kms
        self.counter = counter
        self.items = items

    def __call__(self) -> AwsRun:
        latest = self.kms.rotate().latest_version
        items = self.items
        run, results = _timed(self.server, self.counter, None, partial(self.kms.rewrap_many, items))
        rewrapped: list[tuple[WrappedKey, bytes]] = []
        for (old, ad), result in zip(items, results, strict=True):
            if isinstance(result, HeimdallError):
                raise AssertionError(f"rewrap failed: {type(result).__name__}: {result}")
            if result.key_version != latest or result.key_version <= old.key_version:
                raise AssertionError(
                    f"rewrap gave version {result.key_version}, expected {latest} "
                    f"(from {old.key_version})"
                )
            rewrapped.append((result, ad))
        self.items = rewrapped
        return run


# -- the rows -----------------------------------------------------------------------------------


def run(server: MotoServer, sizes: AwsSizes) -> list[Result]:
    """aws/ingest, aws/decrypt and aws/rewrap, each on a key of its own."""
    results: list[Result] = []
    key_name = new_key(server)
    lines = ingest.synthetic_lines(sizes.ingest_records)
    warmup_lines = ingest.synthetic_lines(sizes.ingest_warmup_records)
    m = measure(
        AWS_INGEST.id,
        partial(ingest_run, server, key_name, lines),
        fields_per_run=sizes.ingest_records * len(ingest.ENCRYPT_FIELDS),
        repetitions=sizes.ingest_repetitions,
        warmups=1,
        warmup=partial(ingest_run, server, key_name, warmup_lines),
    )
    results.append(AwsResult(AWS_INGEST, m, calls_ceiling=CALLS_CEILING))

    kms = AwsKms(aws_settings(server, new_key(server)))
    counter = request_counter(kms)
    corpus = envelopes.make_corpus(sizes.decrypt_fields)
    sealed = seal(kms, corpus)
    m = measure(
        AWS_DECRYPT.id,
        partial(decrypt_run, server, kms, counter, corpus, sealed),
        fields_per_run=sizes.decrypt_fields,
        repetitions=sizes.decrypt_repetitions,
        warmups=sizes.decrypt_warmups,
    )
    results.append(AwsResult(AWS_DECRYPT, m))

    # Last, and on a key of its own, because it rotates before every run.
    kms = AwsKms(aws_settings(server, new_key(server)))
    counter = request_counter(kms)
    keys = sizes.rewrap_keys
    print(f"  making {keys:,} wrapped data keys through KMS ...", file=sys.stderr, flush=True)
    m = measure(
        AWS_REWRAP.id,
        Rewrapper(server, kms, counter, wrapped_data_keys(kms, keys)),
        fields_per_run=keys,
        repetitions=sizes.rewrap_repetitions,
        warmups=sizes.rewrap_warmups,
    )
    results.append(AwsResult(AWS_REWRAP, m, unit="keys"))
    return results
