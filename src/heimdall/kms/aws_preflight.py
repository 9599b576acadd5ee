"""``heimdall kms check`` on AWS KMS: what each role needs, checked by doing it.

spec: Runbook: Re-encryption After Migration (step 1, pre-flight) and Access Control Model. AWS
has no call that tells credentials what they may do (IAM's policy simulator needs IAM rights of
its own and ignores key policies), so each check makes a harmless call a role needs, and only
where :mod:`heimdall.kms.aws_access` gives the role that call; the others are skipped, with the
reason. :func:`heimdall.preflight.run_checks` adds the round trip for the roles that may both
wrap and unwrap.

* ``credentials``: STS GetCallerIdentity (allowed to every principal): the SDK's chain (or the
  role in ``HMD_AWS_ROLE_ARN``) yields credentials AWS accepts, in the key's account;
* ``key readable`` and ``latest key``: the versions, every one's KMS key heimdall's
  (:mod:`heimdall.kms.aws_trust`), the latest one's enabled, and ``alias/<name>`` pointing at
  it;
* ``automatic rotation``: of the latest key's material;
* ``grants`` and ``key policies`` (:mod:`heimdall.kms.aws_key_access`): who else the keys let
  in;
* ``audit key``: signing a checkpoint (GenerateMac) and checking one (VerifyMac);
* with several regions (``HMD_AWS_REGIONS``), ``region <name>`` for each: that it answers, and
  holds every version's alias naming the same KMS key as the others (a replica it lacks would
  leave fields unreadable there when it is the region that answers). The checks above go to
  the first region that answers, as every call does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from heimdall.errors import HeimdallError
from heimdall.kms.aws_access import METADATA, SIGN_CHECKPOINTS, VERIFY_CHECKPOINTS, may
from heimdall.kms.aws_audit import AwsAuditKey, audit_alias
from heimdall.kms.aws_client import RegionClients, aws_call
from heimdall.kms.aws_key_access import grants, key_policies
from heimdall.kms.aws_versions import KeyChain, key_id_of, latest_alias, load_chain, version_alias
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
    for name, action, check in (
        ("grants", "kms:ListGrants", grants),
        ("key policies", "kms:GetKeyPolicy", key_policies),
    ):
        if may(role, action):
            checks.append(_attempt(name, partial(check, kms)))
        else:
            checks.append(Check.skip(name, f"{role} may not read them"))
    audit = kms.audit_key()
    alias = audit_alias(kms.settings.key_name)
    if may(role, SIGN_CHECKPOINTS):
        checks.append(_attempt("audit key signs", lambda: _signs(audit, alias)))
    if may(role, VERIFY_CHECKPOINTS):
        checks.append(_attempt("audit key verifies", lambda: _verifies(audit, alias)))
    if kms.clients.replicas:
        if all(may(role, action) for action in METADATA):
            checks += _region_checks(kms)
        else:
            checks.append(Check.skip("regions", f"{role} may not read key metadata"))
    return checks


def _credentials(kms: AwsKms) -> tuple[bool, str]:
    identity = aws_call("ask STS who the credentials are", kms.clients.sts.get_caller_identity)
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

    def status(region: RegionClients) -> Any:
        answer = aws_call(
            f"read the rotation status of KMS key {key.key_id}",
            lambda: region.kms.get_key_rotation_status(KeyId=key.key_id),
        )
        return answer.get("KeyRotationEnabled")

    enabled = kms.regions.call(status)
    if enabled is not True:
        return False, (
            f"automatic rotation of version {key.version}'s key material is off: run "
            "`heimdall aws bootstrap`"
        )
    return True, f"on for version {key.version}'s key material"


def _region_checks(kms: AwsKms) -> list[Check]:
    """One check per region, each against the versions of the first region that answers."""
    chains: dict[str, KeyChain | HeimdallError] = {}
    for region in kms.clients.regions:
        try:
            chains[region.region] = load_chain(region.kms, kms.settings.key_name, kms.ownership())
        except HeimdallError as exc:
            chains[region.region] = exc
    read = [(name, chain) for name, chain in chains.items() if isinstance(chain, KeyChain)]
    checks = []
    for name, chain in chains.items():
        if isinstance(chain, HeimdallError):
            checks.append(Check(f"region {name}", False, str(chain)))
            continue
        reference_region, reference = read[0]
        checks.append(Check(f"region {name}", *_agrees(chain, reference, reference_region)))
    return checks


def _agrees(chain: KeyChain, reference: KeyChain, where: str) -> tuple[bool, str]:
    """Whether *chain* holds every version of *reference* (read in *where*), under the same
    KMS keys, and its latest version's key is enabled."""
    for version, key in sorted(reference.versions.items()):
        here = chain.versions.get(version)
        alias = version_alias(chain.name, version)
        if here is None:
            return False, f"no {alias} here: run `heimdall aws bootstrap`"
        if here.key_id != key.key_id:
            return False, f"{alias} names another KMS key than in {where}"
    if not chain.versions:
        return False, f"no alias/{chain.name}-v1 here: run `heimdall aws bootstrap`"
    latest = chain.versions[chain.latest_version]
    if latest.key_state != "Enabled":
        return False, f"version {latest.version}'s KMS key is {latest.key_state} here"
    first = min(chain.versions)
    return True, f"versions {first}-{latest.version}, version {latest.version} enabled"


def _signs(audit: AwsAuditKey, alias: str) -> tuple[bool, str]:
    audit.sign(b"heimdall.preflight")
    return True, f"may sign checkpoints with {alias}"


def _verifies(audit: AwsAuditKey, alias: str) -> tuple[bool, str]:
    if not audit.exists():
        return False, f"AWS KMS has no audit key {alias}: run `heimdall aws bootstrap`"
    return True, f"may verify checkpoints with {alias}"
