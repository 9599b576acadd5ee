"""``heimdall aws bootstrap`` and ``heimdall aws schedule-deletion``."""

from __future__ import annotations

from typing import Annotated

import typer

from heimdall.audit import EventType
from heimdall.cli.common import (
    ActorOption,
    aws_app,
    caller_for,
    fail,
    load_settings,
    open_service,
    out,
)
from heimdall.errors import HeimdallError, LifecycleError
from heimdall.rbac import Permission, Role
from heimdall.rotation.lifecycle import dependents_below, key_event

_MISSING_EXTRA = "the aws extra is not installed: pip install 'heimdall[aws]'"


def _role_option(role: Role) -> object:
    return typer.Option(
        f"--{role.value.removeprefix('heimdall-')}-role",
        help=f"IAM role ARN of {role.value}: granted its key actions in the key policy.",
    )


@aws_app.command("bootstrap")
def aws_bootstrap(
    app_role: Annotated[str | None, _role_option(Role.APP)] = None,
    worker_role: Annotated[str | None, _role_option(Role.WORKER)] = None,
    admin_role: Annotated[str | None, _role_option(Role.ADMIN)] = None,
    audit_role: Annotated[str | None, _role_option(Role.AUDIT)] = None,
) -> None:
    """Set up the KMS keys: version 1, the aliases, the key policy, the audit key (idempotent).

    Creates (or adopts, HMD_AWS_KEY) the version-1 KMS key, applies the key policy, turns on
    automatic rotation, and prints what it found and did. Without any --*-role option it keeps
    the roles the key policies grant already; with them, it grants the roles given (name every
    role). A key it did not create and HMD_AWS_KEY does not name is refused, never tagged. With
    HMD_AWS_REGIONS the keys are multi-Region keys, replicated, tagged and aliased in every
    region. Run it with credentials that may manage KMS keys, kms:PutKeyPolicy included (the
    SDK's default chain): an account administrator, not heimdall-admin.
    """
    settings = load_settings()
    if settings.kms_provider != "aws" or settings.aws is None:
        fail("set HMD_KMS_PROVIDER=aws first")
    try:
        from heimdall.kms.aws_bootstrap import bootstrap, instructions  # noqa: PLC0415
        from heimdall.kms.aws_client import connect  # noqa: PLC0415 - the aws extra
    except ImportError:
        fail(_MISSING_EXTRA)
    given = {Role.APP: app_role, Role.WORKER: worker_role, Role.ADMIN: admin_role}
    given[Role.AUDIT] = audit_role
    roles = {role: arn for role, arn in given.items() if arn}
    report = bootstrap(connect(settings.aws), settings.aws, roles)
    for line in [*report.actions, "", *instructions(report, settings.aws)]:
        out.print(line, markup=False)


@aws_app.command("schedule-deletion")
def aws_schedule_deletion(
    version: Annotated[int, typer.Argument(help="Delete the KMS keys of versions up to this.")],
    days: Annotated[
        int, typer.Option("--days", help="Waiting period, 7-30 days, in which it can be undone.")
    ] = 7,
    actor: ActorOption = None,
) -> None:
    """Schedule the deletion of disabled versions' KMS keys (the runbook's last step).

    Refused while stored fields still depend on them. Within the waiting period, lowering the
    decryption floor (`keys set-min-decryption-version --force`) cancels it.
    """
    try:
        from heimdall.kms.aws import AwsKms  # noqa: PLC0415 - the aws extra
    except ImportError:
        fail(_MISSING_EXTRA)
    with open_service() as (service, settings):
        caller = caller_for(settings, actor)
        service.require(caller, Permission.CONFIGURE_KEYS)
        operation = f"schedule deletion of versions <= {version} in {days} days"
        kms = service.kms
        try:
            if not isinstance(kms, AwsKms):
                raise LifecycleError("schedule-deletion is for HMD_KMS_PROVIDER=aws")
            fields, index_key = dependents_below(service, version + 1)
            if fields or index_key:
                raise LifecycleError(
                    f"{fields} stored fields still depend on key versions up to {version}; "
                    "run `heimdall reencrypt` first",
                    dependent_fields=fields + int(index_key),
                )
            scheduled = kms.schedule_deletion(version + 1, days)
        except HeimdallError as exc:
            service.record(key_event(EventType.KEY_CONFIG, caller, None, exc, operation=operation))
            raise
        description = kms.describe()
        service.record(
            key_event(EventType.KEY_CONFIG, caller, description, None, operation=operation)
        )
    for number, date in scheduled:
        out.print(f"version {number}: KMS key deletion scheduled for {date}", markup=False)
    if not scheduled:
        out.print(f"no key of a version up to {version} was left to schedule", markup=False)
