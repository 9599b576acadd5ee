"""Commands on stored fields: ingest, decrypt, lookup, reencrypt, status."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from heimdall.cli.common import (
    ActorOption,
    JsonOption,
    app,
    caller_for,
    err,
    fail,
    open_service,
    out,
    progress_bar,
    tracked,
)
from heimdall.cli.output import terminal_safe, write_json, write_value
from heimdall.envelope import MAX_PLAINTEXT_BYTES
from heimdall.ingest import ingest_lines, read_lines


@app.command()
def ingest(
    file: Annotated[Path, typer.Argument(help="JSON Lines file, one record per line.")],
    actor: ActorOption = None,
    batch_size: Annotated[int | None, typer.Option(min=1, max=100_000)] = None,
) -> None:
    """Encrypt and store the PII fields of every record in FILE."""
    if not file.is_file():
        fail(f"{file} is not a readable file")
    with open_service() as (service, settings):
        caller = caller_for(settings, actor)
        with file.open("rb") as handle:
            total = sum(1 for _ in handle)
        started = time.monotonic()
        with progress_bar(total, "ingest") as progress:
            report = ingest_lines(
                service,
                read_lines(str(file)),
                caller=caller,
                source_name=file.stem,
                batch_size=batch_size or settings.ingest_batch_size,
                progress=tracked(progress, total),
            )
        elapsed = time.monotonic() - started
    for line_error in report.errors[:50]:
        err.print(f"line {line_error.line}: {line_error.message}", markup=False)
    if len(report.errors) > 50:
        err.print(f"... and {len(report.errors) - 50} more rejected lines", markup=False)
    fields = report.fields_encrypted + report.fields_deduplicated
    out.print(
        f"ingested {report.records:,} records in {elapsed:.2f} s: {fields:,} PII fields "
        f"({report.fields_encrypted:,} new values encrypted, {report.fields_deduplicated:,} "
        f"already known), {report.dropped_fields:,} fields dropped by policy, "
        f"{len(report.errors):,} lines rejected",
        markup=False,
    )
    if report.errors:
        raise typer.Exit(1)


@app.command()
def decrypt(
    canonical_key: Annotated[str, typer.Argument(help="e.g. email:hash:<hex>")],
    reason: Annotated[str, typer.Option("--reason", help="Why, for the audit trail.")],
    actor: ActorOption = None,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw", help="On a terminal too, print control characters as they are (unescaped)."
        ),
    ] = False,
) -> None:
    """Print the plaintext of one field. Audited with the reason given.

    A program reading stdout gets the value's exact UTF-8 bytes and one newline; a terminal
    gets control characters escaped, unless --raw.
    """
    with open_service() as (service, settings):
        plaintext = service.decrypt(
            canonical_key, reason=reason, caller=caller_for(settings, actor)
        )
    write_value(plaintext, raw=raw)


def _value_argument(value: str) -> str:
    """The value to look up: ``-`` reads it from standard input (one line, its newline
    stripped), so it never sits in the process's arguments, where other users can read it."""
    if value != "-":
        return value
    data = sys.stdin.buffer.read(MAX_PLAINTEXT_BYTES + 2)
    if len(data) > MAX_PLAINTEXT_BYTES + 1:
        fail(f"the value on standard input is over the {MAX_PLAINTEXT_BYTES}-byte limit")
    if data.endswith(b"\n"):
        data = data[:-1]
        if data.endswith(b"\r"):
            data = data[:-1]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        fail("the value on standard input is not UTF-8 text")


@app.command()
def lookup(
    field: Annotated[str, typer.Argument(help="Field name, e.g. email")],
    value: Annotated[
        str,
        typer.Argument(
            help="The value to find, or - to read it from standard input (recommended: a "
            "value on the command line is visible to other users of the machine)"
        ),
    ],
    actor: ActorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Find a value by its blind index, without decrypting anything."""
    value = _value_argument(value)
    with open_service() as (service, settings):
        result = service.lookup(field, value, caller=caller_for(settings, actor))
    if as_json:
        write_json(
            {
                "canonical_key": result.canonical_key,
                "found": result.found,
                "sightings": result.sightings,
            }
        )
    elif result.found:
        out.print(f"{result.canonical_key}  ({result.sightings} sightings)")
    else:
        fail(f"no stored {field} has that value")


@app.command()
def status(as_json: JsonOption = False, actor: ActorOption = None) -> None:
    """Field counts by encryption_version, key and key_version."""
    with open_service() as (service, settings):
        result = service.status(caller=caller_for(settings, actor))
    if as_json:
        write_json(
            {
                "mode": result.mode,
                "provider": result.provider,
                "latest_version": result.latest_version,
                "total": result.total,
                "fields": [
                    {
                        "encryption_version": c.encryption_version,
                        "key_name": c.key_name,
                        "key_version": c.key_version,
                        "count": c.count,
                    }
                    for c in result.counts
                ],
            }
        )
        return
    table = Table(
        title=terminal_safe(
            f"mode {result.mode}, provider {result.provider}, "
            f"latest key version {result.latest_version}"
        )
    )
    table.add_column("encryption_version")
    table.add_column("key")
    table.add_column("key_version", justify="right")
    table.add_column("fields", justify="right")
    for count in result.counts:
        table.add_row(
            terminal_safe(count.encryption_version),
            terminal_safe(count.key_name or ""),
            str(count.key_version),
            f"{count.count:,}",
        )
    table.add_row("total", "", "", f"{result.total:,}", style="bold")
    out.print(table)
