"""``heimdall kms check`` on AWS KMS: what each role needs, checked by doing it.

spec: Runbook: Re-encryption After Migration (step 1, pre-flight) and Access Control Model. AWS
has no call that tells credentials what they may do (IAM's policy simulator needs IAM rights of
its own and ignores key policies), so each check makes a harmless call a role needs, and only
where :mod:`heimdall.kms.aws_access` gives the role that call; the others are skipped, with the
reason. :func:`heimdall.preflight.run_checks` adds the round trip for the roles that may both
wrap and unwrap.

* ``credentials``: STS GetCallerIdentity (allowed to every principal): the SDK's chain (or the
  role in ``HMD_AWS_ROLE_ARN``) yields credentials AWS accepts, in the key's account;
* ``key readable`` and ``latest key``: the versions, the latest one's KMS key enabled, and
  ``alias/<name>`` pointing at it;
* ``automatic rotation``: of the latest key's material;
* ``audit key``: signing a checkpoint (GenerateMac) and checking one (VerifyMac).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from heimdall.errors import HeimdallError
from heimdall.kms.aws_access import METADATA, SIGN_CHECKPOINTS, VERIFY_CHECKPOINTS, may
from heimdall.kms.aws_audit import AwsAuditKey, audit_alias
from heimdall.kms.aws_client import aws_errors
from heimdall.kms.aws_versions import key_id_of, latest_alias
from heimdall.preflight import Check, key_readable
from heimdall.rbac import Role

if TYPE_CHECKING:
    from heimdall.kms.aws import AwsKms

__all__ = ["aws_checks"]


def _attempt(name: str, check: Callable[[], tuple[bool, str]]) -> Check:
    try:
        ok, detail = check()
    except HeimdallError as exc:
        return Check(name, False, str(exc))
    return Check(name, ok, detail)


def aws_checks(kms: AwsKms, role: Role | None) -> list[Check]:
    """The checks of *kms* for *role* (``None``: the local operator). See the module docstring."""
    checks = [_attempt("credentials", lambda: _credentials(kms))]
    if all(may(role, action) for action in METADATA):
        checks += [key_readable(kms), _attempt("latest key", lambda: _latest(kms))]
    else:
        checks.append(Check.skip("key readable", f"{role} may not read key metadata"))
    if may(role, "kms:GetKeyRotationStatus"):
        checks.append(_attempt("automatic rotation", lambda: _rotation(kms)))
    else:
        checks.append(Check.skip("automatic rotation", f"{role} may not read it"))
    audit = AwsAuditKey(kms.clients, kms.settings.key_name)
    alias = audit_alias(kms.settings.key_name)
    if may(role, SIGN_CHECKPOINTS):
        checks.append(_attempt("audit key signs", lambda: _signs(audit, alias)))
    if may(role, VERIFY_CHECKPOINTS):
        checks.append(_attempt("audit key verifies", lambda: _verifies(audit, alias)))
    return checks


def _credentials(kms: AwsKms) -> tuple[bool, str]:
    with aws_errors("ask STS who the credentials are"):
        identity = kms.clients.sts.get_caller_identity()
    account, arn = str(identity.get("Account", "")), str(identity.get("Arn", ""))
    wanted = kms.settings.account
    if wanted and account != wanted:
        return False, (
            f"{arn} is in account {account}, the key in {wanted}: set HMD_AWS_ROLE_ARN to a "
            f"role in {wanted}"
        )
    return True, f"{arn} (account {account})"


def _latest(kms: AwsKms) -> tuple[bool, str]:
    chain = kms.versions()
    latest = chain.versions[chain.latest_version]
    adopted = kms.settings.adopt_key
    first = chain.versions.get(1)
    if adopted and first is not None and first.key_id != key_id_of(adopted):
        return False, f"HMD_AWS_KEY names KMS key {adopted}, but version 1 is {first.key_id}"
    if latest.key_state != "Enabled":
        return False, f"version {latest.version}'s KMS key is {latest.key_state}"
    pointer = latest_alias(chain.name)
    if chain.latest_target != latest.key_id:
        return False, (
            f"{pointer} does not point at the latest version {latest.version}: run "
            "`heimdall aws bootstrap`"
        )
    return True, f"version {latest.version} ({latest.key_id}) enabled, {pointer} points at it"


def _rotation(kms: AwsKms) -> tuple[bool, str]:
    chain = kms.versions()
    key = chain.versions[chain.latest_version]
    with aws_errors(f"read the rotation status of KMS key {key.key_id}"):
        enabled = kms.clients.kms.get_key_rotation_status(KeyId=key.key_id).get(
            "KeyRotationEnabled"
        )
    if enabled is not True:
        return False, (
            f"automatic rotation of version {key.version}'s key material is off: run "
            "`heimdall aws bootstrap`"
        )
    return True, f"on for version {key.version}'s key material"


def _signs(audit: AwsAuditKey, alias: str) -> tuple[bool, str]:
    audit.sign(b"heimdall.preflight")
    return True, f"may sign checkpoints with {alias}"


def _verifies(audit: AwsAuditKey, alias: str) -> tuple[bool, str]:
    if not audit.exists():
        return False, f"AWS KMS has no audit key {alias}: run `heimdall aws bootstrap`"
    return True, f"may verify checkpoints with {alias}"
