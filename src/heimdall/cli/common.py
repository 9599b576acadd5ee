"""Shared pieces of the command line: the Typer apps, consoles, settings, progress."""

from __future__ import annotations

import os
import pwd
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

import typer
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
from heimdall.cli.output import SafeConsole
from heimdall.errors import ConfigurationError
from heimdall.rbac import Caller, parse_role
from heimdall.secret import SecretBytes
from heimdall.service import Heimdall
from heimdall.settings import Environment, Settings, unknown_variables
from heimdall.types import EncryptionMode

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
kms_app = typer.Typer(
    help="Check the key provider; move every field to another.", no_args_is_help=True
)
vault_app = typer.Typer(help="Set up Vault / OpenBao for heimdall.", no_args_is_help=True)
app.add_typer(kms_app, name="kms")
app.add_typer(vault_app, name="vault")
aws_app = typer.Typer(help="Set up AWS KMS for heimdall.", no_args_is_help=True)
app.add_typer(aws_app, name="aws")
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


# Neither interprets markup or emoji codes, and both escape control characters in what they
# print (heimdall.cli.output): messages and tables may hold text someone else chose.
out = SafeConsole()
err = SafeConsole(stderr=True)

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


def _os_user() -> str:
    # From the effective uid, not getpass.getuser(): that reads LOGNAME and USER first, which
    # the caller sets.
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid-{uid}"


def caller_for(settings: Settings, actor: str | None) -> Caller:
    """The caller of this command. In production the audit actor always names the account
    that ran it; a name given with --actor or HMD_ACTOR is added to it, never replaces it."""
    user = f"cli:{_os_user()}"
    name = actor or settings.actor
    if settings.env is Environment.PRODUCTION:
        name = user if name is None else f"{user} as {name}"
    name = name or user
    try:
        name.encode()  # bytes that are not UTF-8 arrive as lone surrogates, which no trail takes
    except UnicodeEncodeError:
        raise ConfigurationError(
            "the actor (--actor, HMD_ACTOR or the account name) is not valid UTF-8 text"
        ) from None
    return Caller(actor=name, role=parse_role(settings.role))


@contextmanager
def open_service(
    mode: EncryptionMode | None = None, *, output_on_stdout: bool = True
) -> Iterator[tuple[Heimdall, Settings]]:
    """The service of the caller's settings, closed on exit. A command whose output is on
    stdout (all but the worker) sends the ``stdout`` audit sink to stderr instead."""
    settings = load_settings()
    try:
        service = build(
            settings,
            warn=lambda line: err.print(line, markup=False),
            mode=mode,
            audit_stdout=sys.stderr if output_on_stdout else None,
        )
    finally:
        # The legacy cipher holds the key now; the text taken from the environment goes.
        if isinstance(settings.master_key, SecretBytes):
            settings.master_key.wipe()
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
