"""``heimdall keys``: show, rotate, set-min-decryption-version."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from heimdall.cli.common import (
    ActorOption,
    JsonOption,
    caller_for,
    keys_app,
    open_service,
    out,
)
from heimdall.cli.output import terminal_safe, write_json
from heimdall.kms.base import KeyDescription
from heimdall.rotation.emergency import emergency_rotate
from heimdall.rotation.job import may_reencrypt_emergency, work_left
from heimdall.rotation.lifecycle import disable, retire


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
    table = Table(title=terminal_safe(f"{description.provider} key {description.key_name}"))
    for column in ("version", "identifier", "state", "created"):
        table.add_column(column)
    for v in description.versions:
        latest = " (latest)" if v.version == description.latest_version else ""
        table.add_row(
            f"{v.version}{latest}",
            terminal_safe(description.key_identifier(v.version)),
            v.state.value,
            terminal_safe(v.created_at),
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
    with open_service() as (service, settings):
        description = service.describe_keys(caller=caller_for(settings, actor))
    if as_json:
        write_json(_describe_json(description))
    else:
        _print_description(description)


@keys_app.command("rotate")
def keys_rotate(
    emergency: Annotated[
        bool,
        typer.Option(
            "--emergency",
            help="Key compromise: also stop encrypting with old versions, re-encrypt every "
            "field under new data keys at full speed, then disable the old versions.",
        ),
    ] = False,
    actor: ActorOption = None,
) -> None:
    """Create a new master key version; new fields use it, old fields still decrypt."""
    if emergency:
        with open_service() as (service, settings):
            caller = caller_for(settings, actor)
            result = emergency_rotate(service, caller=caller)
        done = f"{result.job.completed:,} fields re-encrypted" if result.job else "no fields"
        if result.job is not None and not may_reencrypt_emergency(caller):
            done = (
                f"job {result.job.job_id} started to re-encrypt {result.job.total:,} fields "
                f"under new data keys: run `heimdall reencrypt run` as a role that may decrypt "
                "and encrypt (heimdall-app), then `heimdall keys disable` as this one"
            )
        disabled = (
            f"versions below {result.disabled_below} disabled"
            if result.disabled_below
            else "old versions NOT disabled yet: fields still depend on them"
        )
        out.print(
            f"emergency rotation to version {result.description.latest_version}: "
            f"{done}, {disabled}",
            markup=False,
        )
        if not result.disabled_below:
            raise typer.Exit(1)
        return
    with open_service() as (service, settings):
        description = service.rotate_keys(caller=caller_for(settings, actor))
        waiting = work_left(service).fields
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
    with open_service() as (service, settings):
        description = service.set_min_decryption_version(
            version, caller=caller_for(settings, actor), force=force
        )
    out.print(f"min_decryption_version is now {description.min_decryption_version}", markup=False)


ForceOption = Annotated[
    bool, typer.Option("--force", help="Even if stored fields depend on these versions.")
]


@keys_app.command("retire")
def keys_retire(
    version: Annotated[int, typer.Argument(min=1)],
    force: ForceOption = False,
    actor: ActorOption = None,
) -> None:
    """Retire versions up to VERSION: they still decrypt but never encrypt again."""
    with open_service() as (service, settings):
        description = retire(service, version, caller=caller_for(settings, actor), force=force)
    out.print(
        f"versions below {description.min_encryption_version} are retired (decrypt-only)",
        markup=False,
    )


@keys_app.command("disable")
def keys_disable(
    version: Annotated[int, typer.Argument(min=1)],
    force: ForceOption = False,
    actor: ActorOption = None,
) -> None:
    """Disable versions up to VERSION: fields still under them can no longer be decrypted."""
    with open_service() as (service, settings):
        description = disable(service, version, caller=caller_for(settings, actor), force=force)
    out.print(f"versions below {description.min_decryption_version} are disabled", markup=False)
