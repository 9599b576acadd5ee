"""``heimdall kms check`` (the runbook's pre-flight), ``heimdall kms migrate`` (every field to
another key provider) and ``heimdall vault bootstrap``."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from heimdall.audit import AuditEvent, EventType, ForwardedAuditLog, JsonlAuditLog
from heimdall.cli.common import (
    ActorOption,
    caller_for,
    err,
    fail,
    kms_app,
    load_settings,
    open_service,
    out,
    vault_app,
)
from heimdall.cli.foreground import BatchOption, IntervalOption, WorkersOption, run_here
from heimdall.errors import AuditError, ConfigurationError, KmsError
from heimdall.preflight import run_checks
from heimdall.rotation.batch import rewrap_index_key
from heimdall.rotation.job import JobKind, plan, start_job
from heimdall.service import Heimdall
from heimdall.settings import KMS_PROVIDERS


@kms_app.command("check")
def kms_check() -> None:
    """Check the key provider for what the role in HMD_ROLE may do (unset: everything).

    Connectivity, authentication, the role's capabilities, audit device, key readable, a test
    round trip; a check the role has no use for is shown as skipped and does not fail.
    """
    with open_service() as (service, settings):
        caller = caller_for(settings, None)
        checks = run_checks(service.kms, caller.role)
        failed = [check.name for check in checks if not check.ok]
        # Audited like every command: which provider was checked, by whom, and how it went.
        service.record(
            AuditEvent.of(
                EventType.KMS_CHECK,
                caller,
                failed=bool(failed),
                operation=f"kms check {service.kms.provider}",
                count=len(failed),
            )
        )
    for check in checks:
        mark = "skip" if check.skipped else "ok  " if check.ok else "FAIL"
        out.print(f"{mark} {check.name}: {check.detail}", markup=False)
    if not all(check.ok for check in checks):
        raise typer.Exit(1)


@kms_app.command("migrate")
def kms_migrate(
    *,
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help=f"The provider every field moves to ({'|'.join(KMS_PROVIDERS)}): the one "
            "HMD_KMS_PROVIDER names.",
        ),
    ],
    actor: ActorOption = None,
    batch_size: BatchOption = None,
    interval: IntervalOption = None,
    workers: WorkersOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would move.")] = False,
) -> None:
    """Move every field, and the blind-index key, to the key of the provider HMD_KMS_PROVIDER
    names, from the providers in HMD_KMS_READ_PROVIDERS.

    Each distinct data key is unwrapped by the provider it is under and wrapped by the new one;
    the data ciphertexts are not touched, and every field decrypts at every moment. It runs as
    the re-encryption job: resumable after any stop (`heimdall reencrypt run`), shared by any
    number of workers, shown by `heimdall reencrypt status`. When `heimdall migrate verify`
    shows no field under another key, the old provider's settings can go.

    Once the fields have moved, the audit trail is verified with both providers' audit keys,
    and a checkpoint of the new one vouches for the old one's checkpoints, so that the trail
    still verifies once the old provider is gone.
    """
    settings = load_settings()
    if to not in KMS_PROVIDERS:
        fail(f"--to {to!r} is not one of {'|'.join(KMS_PROVIDERS)}")
    if settings.kms_provider != to:
        fail(
            f"--to {to}: set HMD_KMS_PROVIDER={to} (new fields go under its key from now on) "
            f"and name the provider the fields are under now in HMD_KMS_READ_PROVIDERS "
            f"(it is {settings.kms_provider}), with the settings of both"
        )
    with open_service() as (service, settings):
        caller = caller_for(settings, actor)
        if dry_run:
            would = plan(service, caller=caller)
            out.print(
                f"dry run, nothing written: {would.moved_fields:,} fields would move to the key "
                f"{would.target_key} version {would.target_version}, and "
                f"{would.rewrap_fields - would.moved_fields:,} be rewrapped to that version",
                markup=False,
            )
            return
        job = start_job(service, caller=caller, kind=JobKind.KMS_MIGRATION)
        if job is None:
            description = service.kms.describe()
            cipher = service.router.require_kms("kms migrate")
            moved = rewrap_index_key(
                service,
                cipher,
                description.latest_version,
                description.key_name,
                caller=caller,
            )
            out.print(
                f"nothing to move: every field is under {description.key_name}"
                + ("; the blind-index key has moved there too" if moved else ""),
                markup=False,
            )
            _vouch_for_the_old_checkpoints(service)
            return
        run_here(
            service,
            settings,
            job,
            caller=caller,
            batch_size=batch_size,
            interval=interval,
            workers=workers,
        )
        _vouch_for_the_old_checkpoints(service)


def _vouch_for_the_old_checkpoints(service: Heimdall) -> None:
    """Verify the trail with every provider's audit key, then have the new provider's key
    vouch for the checkpoints the others made (JsonlAuditLog.vouch). A trail that does not
    verify fails the command; a provider that cannot answer (or a role that may not verify,
    as heimdall-worker on Vault) leaves the trail as it is, with a warning."""
    sink = service.audit
    if not isinstance(sink, (JsonlAuditLog, ForwardedAuditLog)):
        return  # a sink an embedding program gave: not a file this command can check
    try:
        _, keys = sink.vouch()
    except KmsError as exc:
        err.print(
            f"warning: the audit trail's checkpoints of the old provider are not vouched for "
            f"({exc}); `heimdall audit verify` needs that provider until a run of this command "
            "that can verify with both (heimdall-admin) vouches for them",
            markup=False,
        )
        return
    except (AuditError, ConfigurationError) as exc:
        fail(f"the fields moved, but the audit trail was not vouched for: {exc}")
    if keys:
        out.print(
            f"audit trail verified; a checkpoint now vouches for the checkpoints made with "
            f"{' and '.join(keys)}, so that checking the trail no longer needs "
            + ("that provider" if len(keys) == 1 else "those providers"),
            markup=False,
        )


@vault_app.command("bootstrap")
def vault_bootstrap() -> None:
    """Enable Transit, create the key, write the four role policies and their AppRole roles.

    Idempotent. Run it with an admin token (HMD_VAULT_TOKEN or VAULT_TOKEN).
    """
    settings = load_settings()
    if settings.kms_provider != "vault" or settings.vault is None:
        fail("set HMD_KMS_PROVIDER=vault and HMD_VAULT_ADDR first")
    vault = settings.vault
    if not vault.token:
        raise ConfigurationError("bootstrap needs an admin token in HMD_VAULT_TOKEN or VAULT_TOKEN")
    try:
        import hvac  # noqa: PLC0415 - optional extra

        from heimdall.kms.vault_bootstrap import (  # noqa: PLC0415
            bootstrap,
            credential_instructions,
        )
    except ImportError:
        fail("the vault extra is not installed: pip install 'heimdall[vault]'")
    client = hvac.Client(
        url=vault.addresses[0],
        token=vault.token,
        namespace=vault.namespace,
        verify=vault.verify,
        timeout=vault.timeout,
    )
    report = bootstrap(
        client, mount=vault.mount, key_name=vault.key_name, approle_mount=vault.approle_mount
    )
    for action in report.actions:
        out.print(action, markup=False)
    for line in credential_instructions(
        report, os.environ.get("HMD_VAULT_ADDR", vault.addresses[0])
    ):
        out.print(line, markup=False)
