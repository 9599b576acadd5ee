"""``python -m bench [--quick | --large] [--only SECTION] [--json PATH]``: heimdall throughput.
See README.md.

The Vault rows run against a throwaway OpenBao dev server on 127.0.0.1 that the bench starts and
stops itself (bench/vault.py); without the ``bao`` binary they are skipped, with the reason
printed. The re-encryption rows run the background job on a throwaway PostgreSQL cluster the
bench starts and stops itself (bench/reencrypt.py); without the PostgreSQL server programs they
are skipped, with the reason printed. The AWS KMS rows run against a throwaway moto server
(``moto_server``) the bench starts and stops itself (bench/aws.py); without it they are skipped,
with the reason printed. The API rows run ``heimdall serve`` on loopback, with an OpenBao dev
server of their own for their Vault row (bench/api.py). The Apache AGE rows run on a PostgreSQL
cluster of their own (bench/age.py); without the ``age`` extension they are skipped, with the
reason printed.

Exits 0 whenever every benchmark ran (or was skipped for want of ``bao``, PostgreSQL or
``moto_server``), targets
met or not (a missed target is printed as MISSED); non-zero if something crashed or a server did
not start.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench import age, api, aws, envelopes, ingest, reencrypt
from bench.machine import contention, machine_info
from bench.report import Result, Row, format_report, write_json
from bench.timing import Measurement, measure
from heimdall.cipher import CachePolicy
from heimdall.kms.vault_config import DEFAULT_BATCH_SIZE, DEFAULT_CONCURRENCY, VaultPattern

if TYPE_CHECKING:
    from bench.vault import DevServer

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

# Vault / OpenBao Transit rows (bench/vault.py): a throwaway dev server on 127.0.0.1.
VAULT_DECRYPT_TARGET, VAULT_REWRAP_TARGET = 20_000, 50_000
# The figures these rows are set against. They are not Tink figures, so they are printed in the
# notes under the table (and in the JSON), not in the table's reference column.
VAULT_DECRYPT_TRANSIT_REFERENCE = (
    1_000,
    "one Transit call per field reaches about 1,000 fields/s here",
)
VAULT_REWRAP_REFERENCE = (
    96_000,
    "Vault encrypt with batch_input of 250, about 96,000/s (the product's stated reference)",
)

VAULT_INGEST_DATAKEY = Row(
    "vault/ingest-datakey",
    "as ingest/sqlite (same synthetic records, fresh data dir per run) with build(Settings("
    "kms_provider='vault', vault_pattern=datakey)): pattern A, data keys from Transit "
    "datakey/plaintext, values sealed locally, default cache (one data key per 10,000 fields)",
)
VAULT_INGEST_TRANSIT = Row(
    "vault/ingest-transit",
    "as vault/ingest-datakey with vault_pattern=transit: pattern B, Transit encrypts every "
    "value itself; each ingest batch goes to Transit encrypt as batch_input requests of "
    f"{DEFAULT_BATCH_SIZE}, {DEFAULT_CONCURRENCY} in flight",
)
VAULT_DECRYPT_DATAKEY = Row(
    "vault/decrypt-datakey",
    "FieldCipher.decrypt (default CachePolicy, fresh cipher per run) of pattern A envelopes "
    "sealed through Vault with the default cache, new EncryptionContext per field: the fields "
    "share a data key, unwrapped once through Transit decrypt",
    VAULT_DECRYPT_TARGET,
)
VAULT_DECRYPT_TRANSIT = Row(
    "vault/decrypt-transit",
    "FieldCipher.decrypt_many of pattern B envelopes (what Heimdall.decrypt_many uses): the "
    f"values go to Transit decrypt in batch_input requests of {DEFAULT_BATCH_SIZE}, "
    f"{DEFAULT_CONCURRENCY} in flight",
)
VAULT_REWRAP = Row(
    "vault/rewrap-2000",
    "VaultTransit.rewrap_many of 2,000 wrapped data keys (each from Transit datakey with its "
    "own associated data, made before timing); the key is rotated before every run (untimed) "
    "and each run rewraps the previous run's keys, so every key moves to a new version; "
    f"batch_input of {DEFAULT_BATCH_SIZE}, {DEFAULT_CONCURRENCY} in flight. Figures are keys/s",
    VAULT_REWRAP_TARGET,
)


@dataclass(frozen=True, slots=True)
class Sizes:
    fields: int  # per crypto run
    repetitions: int  # timed crypto runs
    warmups: int  # discarded crypto runs, full size
    ingest_records: int  # per ingest run
    ingest_repetitions: int
    ingest_warmup_records: int  # one discarded ingest run of this many records
    # Vault rows. vault/ingest-* use the ingest sizes above; vault/decrypt-datakey the crypto ones.
    vault_transit_fields: int  # vault/decrypt-transit: fields per run
    vault_transit_repetitions: int
    vault_transit_warmup_fields: int  # one discarded run of this many fields
    vault_rewrap_keys: int  # vault/rewrap-2000: keys per run
    # reencrypt/* rows: fields per row, timed runs of each rewrap row (a legacy row has one: a
    # field migrates once), and run_job's batch size.
    reencrypt_fields: int
    reencrypt_runs: int
    reencrypt_batch: int


FULL = Sizes(20_000, 7, 1, 20_000, 3, 1_000, 20_000, 3, 2_000, 2_000, 100_000, 3, 5_000)
QUICK = Sizes(2_000, 3, 1, 300, 1, 100, 100, 1, 20, 200, 2_000, 1, 500)
# --large: the re-encryption rows once more at 1,000,000 fields, one timed run each.
LARGE_REENCRYPT = (1_000_000, 1)
SECTIONS = ("crypto", "ingest", "vault", "aws", "reencrypt", "age", "api")


@dataclass
class VaultOutcome:
    """What the Vault rows produced: results, lines for under the table, and whether they ran
    (a missing ``bao`` is a skip, not a failure; a server that does not start is a failure)."""

    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    server: str = "not run"
    failed: bool = False


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


def _vault_skipped(outcome: VaultOutcome, reason: str, *, failed: bool = False) -> VaultOutcome:
    message = f"vault rows {'failed' if failed else 'skipped'}: {reason}"
    print(message, file=sys.stderr, flush=True)
    outcome.notes.append(message)
    outcome.failed = failed
    return outcome


def _start_vault(stack: contextlib.ExitStack, outcome: VaultOutcome) -> DevServer | None:
    """A throwaway OpenBao dev server, stopped when *stack* closes; None (and a note in
    *outcome*) when it cannot run."""
    try:
        from bench import vault  # noqa: PLC0415 - needs the optional vault extra
    except ImportError as exc:
        _vault_skipped(outcome, f"cannot import the Vault provider ({exc})")
        return None
    binary = vault.bao_binary()
    if binary is None:
        _vault_skipped(outcome, "bao not found")
        return None
    print(f"  starting an OpenBao dev server ({binary}) ...", file=sys.stderr, flush=True)
    try:
        server = stack.enter_context(vault.dev_server(binary))
    except vault.ServerStartError as exc:
        _vault_skipped(outcome, f"the OpenBao dev server did not start: {exc}", failed=True)
        return None
    outcome.server = f"OpenBao {server.version()} dev server (bao server -dev, in memory)"
    return server


def run_servers(
    sizes: Sizes,
    sections: Sequence[str],
    reencrypt_sizes: Sequence[tuple[int, int]],
    *,
    quick: bool = False,
) -> tuple[VaultOutcome, reencrypt.ReencryptOutcome | None, aws.AwsOutcome | None]:
    """The Vault rows against a throwaway OpenBao dev server, then the AWS rows against a
    throwaway moto server, then the re-encryption rows on a throwaway PostgreSQL cluster (the
    Vault side of the AWS migration row and the re-encryption rows' Vault rows on the same
    OpenBao server); every server is started and stopped here."""
    outcome = VaultOutcome()
    reencrypt_outcome = None
    aws_outcome = None
    with contextlib.ExitStack() as stack:
        server = _start_vault(stack, outcome)
        if server is not None and "vault" in sections:
            outcome.results = _vault_rows(server, sizes)
        if "aws" in sections:
            aws_outcome = aws.run_rows(
                quick=quick,
                vault_server=server,
                vault_unavailable=outcome.notes[-1] if outcome.notes else None,
            )
        if "reencrypt" in sections:
            reencrypt_outcome = reencrypt.run_rows(
                reencrypt_sizes,
                batch_size=sizes.reencrypt_batch,
                server=server,
                vault_unavailable=outcome.notes[-1] if outcome.notes else None,
            )
    if outcome.results:
        from bench import vault  # noqa: PLC0415 - see _start_vault

        outcome.notes = vault.notes(outcome.results, outcome.server)
    return outcome, reencrypt_outcome, aws_outcome


def _vault_rows(server: DevServer, sizes: Sizes) -> list[Result]:
    from bench import vault  # noqa: PLC0415 - see run_vault

    def result(
        row: Row, m: Measurement, reference: tuple[int, str] | None = None, unit: str = "fields"
    ) -> Result:
        number, label = reference or (None, None)
        return vault.VaultResult(row, m, reference=number, reference_label=label, unit=unit)

    results: list[Result] = []
    transit = vault.new_transit(server)
    records = sizes.ingest_records
    lines = ingest.synthetic_lines(records)
    warmup_lines = ingest.synthetic_lines(sizes.ingest_warmup_records)
    for row, pattern in (
        (VAULT_INGEST_DATAKEY, VaultPattern.DATAKEY),
        (VAULT_INGEST_TRANSIT, VaultPattern.TRANSIT),
    ):
        m = measure(
            row.id,
            partial(vault.ingest_run, server, pattern, lines),
            fields_per_run=records * len(ingest.ENCRYPT_FIELDS),
            repetitions=sizes.ingest_repetitions,
            warmups=1,
            warmup=partial(vault.ingest_run, server, pattern, warmup_lines),
        )
        results.append(result(row, m))

    corpus = envelopes.make_corpus(sizes.fields)
    sealed = vault.seal_datakey(transit, corpus)
    m = measure(
        VAULT_DECRYPT_DATAKEY.id,
        partial(vault.decrypt_run, server, transit, corpus, sealed, direct=False),
        fields_per_run=sizes.fields,
        repetitions=sizes.repetitions,
        warmups=sizes.warmups,
    )
    results.append(result(VAULT_DECRYPT_DATAKEY, m))

    n, w = sizes.vault_transit_fields, sizes.vault_transit_warmup_fields
    corpus = envelopes.make_corpus(n)
    sealed = vault.seal_transit(transit, corpus)
    warm = envelopes.Corpus(corpus.values[:w], corpus.canonical_keys[:w], corpus.floor_ads[:w])
    m = measure(
        VAULT_DECRYPT_TRANSIT.id,
        partial(vault.decrypt_run, server, transit, corpus, sealed, direct=True),
        fields_per_run=n,
        repetitions=sizes.vault_transit_repetitions,
        warmups=1,
        warmup=partial(vault.decrypt_run, server, transit, warm, sealed[:w], direct=True),
    )
    results.append(result(VAULT_DECRYPT_TRANSIT, m, VAULT_DECRYPT_TRANSIT_REFERENCE))

    # Last, because it rotates the Transit key before every run.
    keys = sizes.vault_rewrap_keys
    print(f"  making {keys:,} wrapped data keys through Transit ...", file=sys.stderr, flush=True)
    rewrapper = vault.Rewrapper(server, transit, vault.wrapped_data_keys(transit, keys))
    m = measure(
        VAULT_REWRAP.id,
        rewrapper,
        fields_per_run=keys,
        repetitions=sizes.repetitions,
        warmups=sizes.warmups,
    )
    results.append(result(VAULT_REWRAP, m, VAULT_REWRAP_REFERENCE, "keys"))
    return results


def _add_aws(
    outcome: aws.AwsOutcome | None,
    results: list[Result],
    notes: list[str],
    machine: dict[str, str | int | float | bool | None],
) -> bool:
    """The AWS rows' results, notes and server added to the run's; whether a server failed."""
    if outcome is None:
        return False
    results.extend(outcome.results)
    notes.extend(["", *outcome.notes] if notes else outcome.notes)
    machine["moto"] = outcome.server
    return outcome.failed


def _add_age(
    sections: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    results: list[Result],
    notes: list[str],
    machine: dict[str, str | int | float | bool | None],
) -> bool:
    """The Apache AGE rows (AGE beside plain PostgreSQL on a cluster of their own:
    bench/age.py) at the re-encryption sizes, added to the run's; whether a server failed."""
    if "age" not in sections:
        return False
    outcome = age.run_rows(sizes)
    results.extend(outcome.results)
    notes.extend(["", *outcome.notes] if notes else outcome.notes)
    machine["postgres_age"] = outcome.server
    return outcome.failed


def _add_api(
    sections: Sequence[str], results: list[Result], notes: list[str], *, quick: bool
) -> bool:
    """The API rows, when *sections* has them (heimdall serve on loopback, with servers of
    their own: bench/api.py), added to the run's results and notes; whether a server failed."""
    if "api" not in sections:
        return False
    outcome = api.run_rows(quick=quick)
    results.extend(outcome.results)
    notes.extend(["", *outcome.notes] if notes else outcome.notes)
    return outcome.failed


def _insert_notes(report: str, notes: Sequence[str]) -> str:
    """*notes* as a paragraph of their own just before the report's targets line."""
    if not notes:
        return report
    lines = report.split("\n")
    at = next(
        (
            i
            for i, line in enumerate(lines)
            if line.startswith(("targets missed", "all targets met"))
        ),
        len(lines),
    )
    return "\n".join([*lines[:at], *notes, "", *lines[at:]])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="small runs for the smoke test (a few seconds)"
    )
    size.add_argument(
        "--large",
        action="store_true",
        help="also run the re-encryption rows at 1,000,000 fields each (many minutes, mostly "
        "loading the fields)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        default=None,
        help="run only this section of rows (repeatable; default: all)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the results (default bench/results/latest.json, "
        "bench/results/quick.json with --quick, bench/results/large.json with --large)",
    )
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        # The table has a µ and dashes; never crash on a terminal that cannot show them.
        sys.stdout.reconfigure(errors="replace")
    quick: bool = args.quick
    large: bool = args.large
    sections: list[str] = args.only or list(SECTIONS)
    default_json = "quick.json" if quick else "large.json" if large else "latest.json"
    json_path: Path = args.json or RESULTS_DIR / default_json
    sizes = QUICK if quick else FULL
    reencrypt_sizes = [(sizes.reencrypt_fields, sizes.reencrypt_runs)]
    if large:
        reencrypt_sizes.append(LARGE_REENCRYPT)

    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    start = time.perf_counter()
    machine = machine_info()
    busy = {"at start": contention()}
    flag = " (--quick)" if quick else " (--large)" if large else ""
    print(f"running heimdall bench{flag} ...", file=sys.stderr)
    results: list[Result] = []
    if "crypto" in sections:
        results.extend(run_crypto(sizes))
    if "ingest" in sections:
        results.append(run_ingest(sizes))
    notes: list[str] = []
    failed = False
    if {"vault", "aws", "reencrypt"} & set(sections):
        vault_outcome, reencrypt_outcome, aws_outcome = run_servers(
            sizes, sections, reencrypt_sizes, quick=quick
        )
        results.extend(vault_outcome.results)
        machine["openbao"] = vault_outcome.server
        if "vault" in sections:
            notes.extend(vault_outcome.notes)
        failed = vault_outcome.failed  # a dev server that does not start fails the run
        failed = _add_aws(aws_outcome, results, notes, machine) or failed
        if reencrypt_outcome is not None:
            results.extend(reencrypt_outcome.results)
            machine["postgres"] = reencrypt_outcome.server
            notes.extend(["", *reencrypt_outcome.notes] if notes else reencrypt_outcome.notes)
            failed = failed or reencrypt_outcome.failed
    # Rows on servers of their own: each section runs whatever the other did.
    failed = (
        any(
            [
                _add_age(sections, reencrypt_sizes, results, notes, machine),
                _add_api(sections, results, notes, quick=quick),
            ]
        )
        or failed
    )
    busy["at end"] = contention()
    duration = time.perf_counter() - start

    write_json(
        json_path, results, machine, busy, quick=quick, started_at=started_at, duration_s=duration
    )
    report = format_report(
        results, machine, busy, quick=quick, duration_s=duration, json_path=json_path
    )
    print(_insert_notes(report, notes), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # The OpenBao dev server and the PostgreSQL cluster, if running, were stopped on the
        # way out.
        print("bench interrupted", file=sys.stderr)
        sys.exit(130)
