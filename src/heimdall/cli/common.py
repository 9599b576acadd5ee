"""Shared pieces of the command line: the Typer apps, consoles, settings, progress."""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

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

from heimdall.app import build
from heimdall.modes import EncryptionMode
from heimdall.rbac import Caller, parse_role
from heimdall.service import Heimdall
from heimdall.settings import Settings, unknown_variables

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
kms_app = typer.Typer(help="Check the key provider.", no_args_is_help=True)
vault_app = typer.Typer(help="Set up Vault / OpenBao for heimdall.", no_args_is_help=True)
app.add_typer(kms_app, name="kms")
app.add_typer(vault_app, name="vault")
reencrypt_app = typer.Typer(
    help="Bring every field to the latest key version (in hybrid mode, legacy fields to the KMS).",
    invoke_without_command=True,
)
app.add_typer(reencrypt_app, name="reencrypt")
migrate_app = typer.Typer(
    help="Move from the static env key to the KMS (spec: Migration Strategy).",
    no_args_is_help=True,
)
app.add_typer(migrate_app, name="migrate")


out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ActorOption = Annotated[
    str | None, typer.Option("--actor", help="Who is acting, for the audit trail.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def fail(message: str) -> NoReturn:
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(1)


def load_settings() -> Settings:
    for name in unknown_variables(os.environ):
        err.print(f"warning: {name} is not a heimdall setting and is ignored", markup=False)
    return Settings.from_env(os.environ)


def caller_for(settings: Settings, actor: str | None) -> Caller:
    name = actor or settings.actor or f"cli:{getpass.getuser()}"
    return Caller(actor=name, role=parse_role(settings.role))


@contextmanager
def open_service(mode: EncryptionMode | None = None) -> Iterator[tuple[Heimdall, Settings]]:
    settings = load_settings()
    service = build(settings, warn=lambda line: err.print(line, markup=False), mode=mode)
    try:
        yield service, settings
    finally:
        service.close()


def progress_bar(total: int, label: str) -> Progress:
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


def tracked(progress: Progress, total: int) -> Callable[[int], None]:
    task = progress.add_task("", total=total, rate="")
    started = time.monotonic()
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        elapsed = max(time.monotonic() - started, 1e-9)
        progress.update(task, advance=count, rate=f"{done / elapsed:,.0f}/s")

    return advance
