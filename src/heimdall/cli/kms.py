"""``heimdall kms check`` (the runbook's pre-flight) and ``heimdall vault bootstrap``."""

from __future__ import annotations

import os

import typer

from heimdall.cli.common import fail, kms_app, load_settings, open_service, out, vault_app
from heimdall.errors import ConfigurationError
from heimdall.preflight import run_checks


@kms_app.command("check")
def kms_check() -> None:
    """Connectivity, authentication, key readable, a test round trip, audit device."""
    with open_service() as (service, _):
        checks = run_checks(service.kms)
    for check in checks:
        mark = "ok  " if check.ok else "FAIL"
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
