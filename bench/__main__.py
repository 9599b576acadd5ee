"""``python -m bench [--quick] [--json PATH]``: heimdall throughput on one core. See README.md.

Exits 0 whenever every benchmark ran, targets met or not (a missed target is printed as MISSED);
non-zero only if something crashed.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench import envelopes, ingest
from bench.machine import contention, machine_info
from bench.report import Result, Row, format_report, write_json
from bench.timing import measure
from heimdall.cipher import CachePolicy

RESULTS_DIR = Path(__file__).resolve().parent / "results"

ENCRYPT_TARGET, DECRYPT_TARGET, INGEST_TARGET = 100_000, 150_000, 20_000
ENCRYPT_REFERENCE, DECRYPT_REFERENCE = 121_000, 194_000

ENCRYPT_DEFAULT = Row(
    "encrypt/default-cache",
    "FieldCipher.encrypt of a 40-byte value with a new EncryptionContext per field, local "
    "keyring, default CachePolicy (one data key serves up to 10,000 fields)",
    ENCRYPT_TARGET,
    ENCRYPT_REFERENCE,
)
ENCRYPT_PER_FIELD = Row(
    "encrypt/dek-per-field",
    "as encrypt/default-cache with CachePolicy(max_uses=1): the keyring generates and wraps a "
    "fresh data key for every field, as Tink's KMS envelope AEAD does",
    ENCRYPT_TARGET,
    ENCRYPT_REFERENCE,
)
DECRYPT_DEFAULT = Row(
    "decrypt/default-cache",
    "FieldCipher.decrypt (default CachePolicy, fresh cipher per run) of envelopes sealed under "
    "the default cache, new EncryptionContext per field: fields share a data key, unwrapped once",
    DECRYPT_TARGET,
    DECRYPT_REFERENCE,
)
DECRYPT_PER_FIELD = Row(
    "decrypt/dek-per-field",
    "as decrypt/default-cache but of envelopes sealed with max_uses=1: every field misses the "
    "cache and unwraps its own data key through the keyring",
    DECRYPT_TARGET,
    DECRYPT_REFERENCE,
)
FLOOR_ENCRYPT = Row(
    "floor/aes-gcm-encrypt",
    "cryptography AESGCM.encrypt, one fixed key, os.urandom(12) nonce per call, the same 40-byte "
    "values, each field's real heimdall associated data (about 200 bytes)",
)
FLOOR_DECRYPT = Row(
    "floor/aes-gcm-decrypt",
    "AESGCM.decrypt of those (nonces and ciphertexts made before timing)",
)
INGEST = Row(
    "ingest/sqlite",
    "ingest_lines, default Settings in a fresh temp dir (local keyring, SQLite, audit log with "
    f"fsync), batch {ingest.BATCH_SIZE}; fields = records x {len(ingest.ENCRYPT_FIELDS)} "
    "encrypt fields (all unique, none deduplicated), plus 1 plain field",
    INGEST_TARGET,
)


@dataclass(frozen=True, slots=True)
class Sizes:
    fields: int  # per crypto run
    repetitions: int  # timed crypto runs
    warmups: int  # discarded crypto runs, full size
    ingest_records: int  # per ingest run
    ingest_repetitions: int
    ingest_warmup_records: int  # one discarded ingest run of this many records


FULL = Sizes(20_000, 7, 1, 20_000, 3, 1_000)
QUICK = Sizes(2_000, 3, 1, 300, 1, 100)


def run_crypto(sizes: Sizes) -> list[Result]:
    corpus = envelopes.make_corpus(sizes.fields)
    n, reps, warm = sizes.fields, sizes.repetitions, sizes.warmups
    default, per_field = CachePolicy(), CachePolicy(max_uses=1)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="heimdall-bench-keyring-") as tmp:
        keyring = envelopes.new_keyring(Path(tmp))

        for row, cache in ((ENCRYPT_DEFAULT, default), (ENCRYPT_PER_FIELD, per_field)):
            m = measure(
                row.id,
                partial(envelopes.encrypt_run, keyring, corpus, cache),
                fields_per_run=n,
                repetitions=reps,
                warmups=warm,
            )
            results.append(Result(row, m))

        for row, cache in ((DECRYPT_DEFAULT, default), (DECRYPT_PER_FIELD, per_field)):
            sealed = envelopes.seal_all(keyring, corpus, cache)
            m = measure(
                row.id,
                partial(envelopes.decrypt_run, keyring, corpus, sealed),
                fields_per_run=n,
                repetitions=reps,
                warmups=warm,
            )
            results.append(Result(row, m))

    aead = AESGCM(os.urandom(32))
    m = measure(
        FLOOR_ENCRYPT.id,
        lambda: envelopes.floor_encrypt_run(aead, corpus),
        fields_per_run=n,
        repetitions=reps,
        warmups=warm,
    )
    results.append(Result(FLOOR_ENCRYPT, m))
    floor_sealed = envelopes.floor_seal_all(aead, corpus)
    m = measure(
        FLOOR_DECRYPT.id,
        lambda: envelopes.floor_decrypt_run(aead, corpus, floor_sealed),
        fields_per_run=n,
        repetitions=reps,
        warmups=warm,
    )
    results.append(Result(FLOOR_DECRYPT, m))
    return results


def run_ingest(sizes: Sizes) -> Result:
    lines = ingest.synthetic_lines(sizes.ingest_records)
    warmup_lines = ingest.synthetic_lines(sizes.ingest_warmup_records)
    fields = sizes.ingest_records * len(ingest.ENCRYPT_FIELDS)
    m = measure(
        INGEST.id,
        lambda: ingest.ingest_run(lines),
        fields_per_run=fields,
        repetitions=sizes.ingest_repetitions,
        warmups=1,
        warmup=lambda: ingest.ingest_run(warmup_lines),
    )
    return Result(INGEST, m)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="small runs for the smoke test (a few seconds)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the results (default bench/results/latest.json, "
        "or bench/results/quick.json with --quick)",
    )
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        # The table has a µ and dashes; never crash on a terminal that cannot show them.
        sys.stdout.reconfigure(errors="replace")
    quick: bool = args.quick
    json_path: Path = args.json or RESULTS_DIR / ("quick.json" if quick else "latest.json")
    sizes = QUICK if quick else FULL

    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    start = time.perf_counter()
    machine = machine_info()
    busy = {"at start": contention()}
    print(f"running heimdall bench{' (--quick)' if quick else ''} ...", file=sys.stderr)
    results = [*run_crypto(sizes), run_ingest(sizes)]
    busy["at end"] = contention()
    duration = time.perf_counter() - start

    write_json(
        json_path, results, machine, busy, quick=quick, started_at=started_at, duration_s=duration
    )
    report = format_report(
        results, machine, busy, quick=quick, duration_s=duration, json_path=json_path
    )
    print(report, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
