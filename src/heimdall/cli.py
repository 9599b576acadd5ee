"""The ``heimdall`` command line.

Every failure heimdall anticipates is printed as one line, ``error: <sentence>``, on stderr with
exit status 1 (2 for usage errors); no traceback is ever shown, since a traceback's locals could
hold plaintext. ``HMD_DEBUG=1`` re-raises unexpected errors for debugging.
"""

from __future__ import annotations

import getpass
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from heimdall.app import build
from heimdall.audit import JsonlAuditLog
from heimdall.errors import HeimdallError
from heimdall.ingest import ingest_lines, read_lines
from heimdall.kms.base import KeyDescription
from heimdall.rbac import Caller, Permission, parse_role
from heimdall.reencrypt import pending, reencrypt
from heimdall.service import Heimdall
from heimdall.settings import Settings, unknown_variables

__all__ = ["app", "main"]

app = typer.Typer(
    name="heimdall",
    help="Envelope encryption of PII fields under keys held in a key management service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
keys_app = typer.Typer(help="Show and rotate the master key.", no_args_is_help=True)
audit_app = typer.Typer(help="Read and check the audit trail.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ActorOption = Annotated[
    str | None, typer.Option("--actor", help="Who is acting, for the audit trail.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(message: str) -> NoReturn:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(1)


def _settings() -> Settings:
    for name in unknown_variables(os.environ):
        err.print(f"warning: {name} is not a heimdall setting and is ignored", markup=False)
    return Settings.from_env(os.environ)


def _caller(settings: Settings, actor: str | None) -> Caller:
    name = actor or settings.actor or f"cli:{getpass.getuser()}"
    return Caller(actor=name, role=parse_role(settings.role))


@contextmanager
def _service() -> Iterator[tuple[Heimdall, Settings]]:
    settings = _settings()
    service = build(settings, warn=lambda line: err.print(line, markup=False))
    try:
        yield service, settings
    finally:
        service.close()


def _progress(total: int, label: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=False,
    )


def _tracked(progress: Progress, total: int) -> Callable[[int], None]:
    task = progress.add_task("", total=total, rate="")
    started = time.monotonic()
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        elapsed = max(time.monotonic() - started, 1e-9)
        progress.update(task, advance=count, rate=f"{done / elapsed:,.0f}/s")

    return advance


@app.command()
def ingest(
    file: Annotated[Path, typer.Argument(help="JSON Lines file, one record per line.")],
    actor: ActorOption = None,
    batch_size: Annotated[int | None, typer.Option(min=1, max=100_000)] = None,
) -> None:
    """Encrypt and store the PII fields of every record in FILE."""
    if not file.is_file():
        _fail(f"{file} is not a readable file")
    with _service() as (service, settings):
        caller = _caller(settings, actor)
        with file.open("rb") as handle:
            total = sum(1 for _ in handle)
        started = time.monotonic()
        with _progress(total, "ingest") as progress:
            report = ingest_lines(
                service,
                read_lines(str(file)),
                caller=caller,
                source_name=file.stem,
                batch_size=batch_size or settings.ingest_batch_size,
                progress=_tracked(progress, total),
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
) -> None:
    """Print the plaintext of one field. Audited with the reason given."""
    with _service() as (service, settings):
        plaintext = service.decrypt(canonical_key, reason=reason, caller=_caller(settings, actor))
    out.print(plaintext, markup=False)


@app.command()
def lookup(
    field: Annotated[str, typer.Argument(help="Field name, e.g. email")],
    value: Annotated[str, typer.Argument(help="The value to find")],
    actor: ActorOption = None,
    as_json: JsonOption = False,
) -> None:
    """Find a value by its blind index, without decrypting anything."""
    with _service() as (service, settings):
        result = service.lookup(field, value, caller=_caller(settings, actor))
    if as_json:
        out.print_json(
            orjson.dumps(
                {
                    "canonical_key": result.canonical_key,
                    "found": result.found,
                    "sightings": result.sightings,
                }
            ).decode()
        )
    elif result.found:
        out.print(f"{result.canonical_key}  ({result.sightings} sightings)", markup=False)
    else:
        _fail(f"no stored {field} has that value")


def _describe_json(description: KeyDescription) -> dict[str, Any]:
    return {
        "provider": description.provider,
        "key_name": description.key_name,
        "latest_version": description.latest_version,
        "min_decryption_version": description.min_decryption_version,
        "min_encryption_version": description.min_encryption_version,
        "versions": [
            {"version": v.version, "state": v.state.value, "created_at": v.created_at}
            for v in description.versions
        ],
    }


def _print_description(description: KeyDescription) -> None:
    table = Table(title=f"{description.provider} key {description.key_name}")
    for column in ("version", "identifier", "state", "created"):
        table.add_column(column)
    for v in description.versions:
        latest = " (latest)" if v.version == description.latest_version else ""
        table.add_row(
            f"{v.version}{latest}",
            description.key_identifier(v.version),
            v.state.value,
            v.created_at,
        )
    out.print(table)
    out.print(
        f"min_decryption_version={description.min_decryption_version} "
        f"min_encryption_version={description.min_encryption_version}",
        markup=False,
    )


@keys_app.command("show")
def keys_show(as_json: JsonOption = False, actor: ActorOption = None) -> None:
    """Show the master key's versions and their states."""
    with _service() as (service, settings):
        description = service.describe_keys(caller=_caller(settings, actor))
    if as_json:
        out.print_json(orjson.dumps(_describe_json(description)).decode())
    else:
        _print_description(description)


@keys_app.command("rotate")
def keys_rotate(actor: ActorOption = None) -> None:
    """Create a new master key version; new fields use it, old fields still decrypt."""
    with _service() as (service, settings):
        description = service.rotate_keys(caller=_caller(settings, actor))
        waiting = pending(service, description.latest_version)
    out.print(
        f"rotated {description.key_name} to version {description.latest_version}; "
        f"{waiting:,} fields are on older versions (run `heimdall reencrypt`)",
        markup=False,
    )


@keys_app.command("set-min-decryption-version")
def keys_set_min_decryption_version(
    version: Annotated[int, typer.Argument(min=1)],
    force: Annotated[
        bool, typer.Option(help="Even if stored fields depend on older versions.")
    ] = False,
    actor: ActorOption = None,
) -> None:
    """Disable decryption with versions below VERSION (emergency runbook, step 2)."""
    with _service() as (service, settings):
        description = service.set_min_decryption_version(
            version, caller=_caller(settings, actor), force=force
        )
    out.print(f"min_decryption_version is now {description.min_decryption_version}", markup=False)


@app.command("reencrypt")
def reencrypt_command(
    actor: ActorOption = None,
    batch_size: Annotated[int, typer.Option(min=1, max=100_000)] = 500,
) -> None:
    """Bring every field to the latest key version (in hybrid mode, legacy fields to the KMS)."""
    with _service() as (service, settings):
        caller = _caller(settings, actor)
        service.require(caller, Permission.REENCRYPT)
        total = pending(service, service.kms.describe().latest_version)
        started = time.monotonic()
        with _progress(total, "reencrypt") as progress:
            report = reencrypt(
                service, caller=caller, batch_size=batch_size, progress=_tracked(progress, total)
            )
        elapsed = time.monotonic() - started
    out.print(
        f"reencrypt to version {report.target_version} in {elapsed:.2f} s: "
        f"{report.rewrapped:,} rewrapped, {report.reencrypted:,} re-encrypted from legacy, "
        f"{report.failed:,} failed, {report.conflicts:,} concurrent updates retried",
        markup=False,
    )
    if report.legacy_skipped:
        err.print(
            f"{report.legacy_skipped:,} legacy fields were left as they are: set "
            "HMD_ENCRYPTION_MODE=hybrid with HMD_MASTER_KEY to migrate them",
            markup=False,
        )
    if report.failed:
        raise typer.Exit(1)


@app.command()
def status(as_json: JsonOption = False, actor: ActorOption = None) -> None:
    """Field counts by encryption_version and key_version."""
    with _service() as (service, settings):
        result = service.status(caller=_caller(settings, actor))
    if as_json:
        out.print_json(
            orjson.dumps(
                {
                    "mode": result.mode,
                    "provider": result.provider,
                    "latest_version": result.latest_version,
                    "total": result.total,
                    "fields": [
                        {
                            "encryption_version": c.encryption_version,
                            "key_version": c.key_version,
                            "count": c.count,
                        }
                        for c in result.counts
                    ],
                }
            ).decode()
        )
        return
    table = Table(
        title=f"mode {result.mode}, provider {result.provider}, "
        f"latest key version {result.latest_version}"
    )
    table.add_column("encryption_version")
    table.add_column("key_version", justify="right")
    table.add_column("fields", justify="right")
    for count in result.counts:
        table.add_row(count.encryption_version, str(count.key_version), f"{count.count:,}")
    table.add_row("total", "", f"{result.total:,}", style="bold")
    out.print(table)


def _audit_log(actor: str | None) -> JsonlAuditLog:
    settings = _settings()
    caller = _caller(settings, actor)
    if not caller.may(Permission.READ_AUDIT):
        _fail(f"role {settings.role} may not read the audit trail")
    return JsonlAuditLog(settings.audit_file)


@audit_app.command("tail")
def audit_tail(
    lines: Annotated[int, typer.Option("-n", "--lines", min=1, max=100_000)] = 10,
    actor: ActorOption = None,
) -> None:
    """Print the last N audit events as JSON lines."""
    for event in _audit_log(actor).tail(lines):
        out.print(orjson.dumps(event).decode(), markup=False)


@audit_app.command("verify")
def audit_verify(actor: ActorOption = None) -> None:
    """Check the audit trail's hash chain: no line was edited, removed or reordered."""
    report = _audit_log(actor).verify()
    if not report.ok:
        _fail(f"audit trail broken at line {report.first_bad_line}: {report.problem}")
    out.print(f"audit trail intact: {report.lines:,} events", markup=False)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _usage_error(exc: typer.TyperException) -> int:
    """Print a usage error (bad option, missing argument) as one line; its exit status."""
    # Typer vendors click and keeps its exception types private, so NoArgsIsHelpError (a usage
    # error whose message is the help text) is recognised by name, as typer.rich_utils does.
    if type(exc).__name__ == "NoArgsIsHelpError":
        out.print(exc.format_message(), markup=False, end="")
        return 2
    ctx = getattr(exc, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    err.print(f"error: {_one_line(exc.format_message())}{hint}", markup=False)
    return int(getattr(exc, "exit_code", 2))


def _run() -> int:
    try:
        # standalone_mode=False: Typer would print usage errors as a multi-line panel.
        result = app(standalone_mode=False)
    except typer.TyperException as exc:
        return _usage_error(exc)
    except typer.Abort:
        err.print("error: aborted", markup=False)
        return 1
    return result if isinstance(result, int) else 0


def main() -> None:
    """Console entry point: run the app and turn every anticipated failure into one line."""
    try:
        code = _run()
    except HeimdallError as exc:
        err.print(f"error: {_one_line(str(exc))}", markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("error: interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:  # the last line of defence: never a traceback
        if os.environ.get("HMD_DEBUG") == "1":
            raise
        err.print(
            f"error: internal error ({type(exc).__name__}); set HMD_DEBUG=1 for details",
            markup=False,
        )
        sys.exit(70)
    sys.exit(code)
