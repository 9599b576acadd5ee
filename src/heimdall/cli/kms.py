"""``heimdall kms check`` (the runbook's pre-flight) and ``heimdall vault bootstrap``."""

from __future__ import annotations

import os

import typer

from heimdall.audit import AuditEvent, EventType
from heimdall.cli.common import (
    caller_for,
    fail,
    kms_app,
    load_settings,
    open_service,
    out,
    vault_app,
)
from heimdall.errors import ConfigurationError
from heimdall.preflight import run_checks


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
