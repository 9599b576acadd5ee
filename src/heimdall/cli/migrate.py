"""``heimdall migrate status | start | verify | enforce | rollback`` (spec: Migration Strategy)."""

from __future__ import annotations

import enum
from typing import Annotated

import typer

from heimdall.cli.common import ActorOption, JsonOption, caller_for, migrate_app, open_service, out
from heimdall.cli.foreground import run_here
from heimdall.cli.output import write_json
from heimdall.envelope import EncryptionVersion
from heimdall.rbac import Permission
from heimdall.rotation.job import JobKind, job_store, start_job
from heimdall.rotation.migration import recorded_mode, require_verified, set_mode, verify
from heimdall.types import EncryptionMode

SampleOption = Annotated[int, typer.Option("--sample", min=0, max=100_000)]


@migrate_app.command("status")
def migrate_status(as_json: JsonOption = False, actor: ActorOption = None) -> None:
    """The mode in force, legacy and KMS field counts, and the newest re-encryption job."""
    with open_service() as (service, settings):
        service.require(caller_for(settings, actor), Permission.READ_STATUS)
        store = service.store
        recorded = recorded_mode(store)
        legacy = store.count_fields(encryption_version=EncryptionVersion.LEGACY.value)
        by_key: dict[str, int] = {}
        for count in store.field_counts():
            if count.encryption_version == EncryptionVersion.KMS_V1.value:
                name = count.key_name or "(none)"
                by_key[name] = by_key.get(name, 0) + count.count
        kms = sum(by_key.values())
        job = job_store(service).latest_job()
    body = {
        "mode": service.router.mode.value,
        "recorded_mode": recorded.value if recorded else None,
        "legacy_fields": legacy,
        "kms_fields": kms,
        "kms_fields_by_key": by_key,
        "job": None
        if job is None
        else {
            "job_id": job.job_id,
            "state": job.state.value,
            "completed": job.completed,
            "total": job.total,
        },
    }
    if as_json:
        write_json(body)
        return
    keys = ", ".join(f"{count:,} under {name}" for name, count in by_key.items())
    out.print(
        f"mode {body['mode']} (recorded: {body['recorded_mode'] or 'none'}): "
        f"{legacy:,} legacy fields, {kms:,} KMS fields" + (f" ({keys})" if keys else ""),
        markup=False,
    )


@migrate_app.command("start")
def migrate_start(actor: ActorOption = None) -> None:
    """legacy -> hybrid, and re-encrypt every legacy field under the KMS (needs HMD_MASTER_KEY)."""
    with open_service(mode=EncryptionMode.HYBRID) as (service, settings):
        caller = caller_for(settings, actor)
        set_mode(service, EncryptionMode.HYBRID, caller=caller, reason="migrate start")
        out.print(
            "mode is now hybrid: new fields go to the KMS, legacy fields still read", markup=False
        )
        job = start_job(service, caller=caller, kind=JobKind.MIGRATION)
        if job is None:
            out.print("nothing to re-encrypt: no legacy field remains", markup=False)
            return
        run_here(
            service, settings, job, caller=caller, batch_size=None, interval=None, workers=None
        )


@migrate_app.command("verify")
def migrate_verify(sample: SampleOption = 50, actor: ActorOption = None) -> None:
    """Prove by query that no legacy field remains, and decrypt a random sample for real."""
    with open_service() as (service, settings):
        result = verify(service, caller=caller_for(settings, actor), sample=sample)
    index_key = "legacy" if result.index_key_legacy else "under the KMS"
    if result.index_key_elsewhere and not result.index_key_legacy:
        index_key = "under another KMS key"
    out.print(
        f"{result.legacy_fields:,} legacy fields, blind-index key {index_key}, "
        f"{result.sampled - result.sample_failures}/{result.sampled} sampled fields decrypted, "
        f"{result.other_key_fields:,} fields under another KMS key than "
        f"{result.key_name or 'the KMS key'}",
        markup=False,
    )
    require_verified(result)
    out.print(
        f"verified: every field is KMS-encrypted under {result.key_name}; only its key "
        "provider's settings are needed",
        markup=False,
    )


@migrate_app.command("enforce")
def migrate_enforce(sample: SampleOption = 50, actor: ActorOption = None) -> None:
    """hybrid -> kms, only when verify passes; the env key is no longer needed after this."""
    with open_service() as (service, settings):
        caller = caller_for(settings, actor)
        require_verified(verify(service, caller=caller, sample=sample), one_key=False)
        set_mode(service, EncryptionMode.KMS, caller=caller, reason="migrate enforce")
    out.print(
        "mode is now kms: legacy fields are refused; HMD_MASTER_KEY can be removed", markup=False
    )


class RollbackTarget(enum.StrEnum):
    LEGACY = "legacy"
    HYBRID = "hybrid"


@migrate_app.command("rollback")
def migrate_rollback(
    to: Annotated[
        RollbackTarget,
        typer.Option(
            "--to",
            help="legacy: new fields go under HMD_MASTER_KEY again (the spec's rollback); "
            "hybrid: new fields stay under the KMS.",
        ),
    ] = RollbackTarget.LEGACY,
    actor: ActorOption = None,
) -> None:
    """Back off the KMS (spec: Rollback Plan). Every stored field stays readable.

    By default new fields are written under HMD_MASTER_KEY again (legacy mode), so a KMS
    outage or defect stops no write; KMS fields are still read. `heimdall migrate start`
    resumes the migration later. --to hybrid keeps writing under the KMS.
    """
    mode = EncryptionMode.LEGACY if to is RollbackTarget.LEGACY else EncryptionMode.HYBRID
    with open_service(mode=mode) as (service, settings):
        set_mode(
            service,
            mode,
            caller=caller_for(settings, actor),
            reason=f"migrate rollback to {mode.value}",
        )
    if mode is EncryptionMode.LEGACY:
        out.print(
            "mode is now legacy: new fields are written under HMD_MASTER_KEY, KMS fields "
            "still read; keep HMD_MASTER_KEY and the KMS settings, and run `heimdall migrate "
            "start` to resume the migration"
        )
    else:
        out.print("mode is now hybrid: legacy and KMS fields both read, new fields go to the KMS")
