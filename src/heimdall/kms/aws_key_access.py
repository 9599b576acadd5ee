"""``heimdall kms check`` on AWS: who else heimdall's keys let in (grants, key policies).

heimdall checks that every key it uses is its own (:mod:`heimdall.kms.aws_trust`), but who may
use a key is AWS's to decide, from the key policy and the key's grants; heimdall never makes a
grant (heimdall-admin is denied CreateGrant), and writes one key policy on every key
(:mod:`heimdall.kms.aws_key_policy`). So:

* ``grants``: every grant on a version's key or the audit key fails the check, with its ID, its
  grantee and its operations (ListGrants): a grant lets a principal use the key whatever the key
  policy says;
* ``key policies``: the key policies of every version's key and of the audit key must be the
  same, except a key still on AWS's default key policy (the account's IAM policies only: what a
  rotation makes, :mod:`heimdall.kms.aws_rotation`), which is reported for ``heimdall aws
  bootstrap`` to write heimdall's. Any other difference fails: a key policy heimdall did not
  write, on a key it uses.

Both are read in the first region that answers.
"""

from __future__ import annotations

import json
import re
from functools import partial
from typing import TYPE_CHECKING, Any

from heimdall.errors import KeyNotFound
from heimdall.kms.aws_audit import audit_alias
from heimdall.kms.aws_client import RegionClients, aws_call
from heimdall.kms.aws_key_policy import HEIMDALL_POLICY_ID
from heimdall.kms.aws_replicas import key_policy_of
from heimdall.kms.aws_versions import describe_key

if TYPE_CHECKING:
    from heimdall.kms.aws import AwsKms

__all__ = ["grants", "key_policies"]


def _keys(kms: AwsKms) -> list[tuple[str, str]]:
    """(what, key ID) of every version's key and of the audit key, if there is one."""
    chain = kms.versions()
    keys = [(f"version {v}", key.key_id) for v, key in sorted(chain.versions.items())]
    alias = audit_alias(kms.settings.key_name)
    try:
        metadata = kms.regions.call(lambda at: describe_key(at.kms, alias))
    except KeyNotFound:
        return keys
    return [*keys, ("the audit key", str(metadata["KeyId"]))]


def _grants_of(region: RegionClients, key_id: str) -> list[dict[str, Any]]:
    pages = aws_call(
        f"list the grants of KMS key {key_id}",
        lambda: list(region.kms.get_paginator("list_grants").paginate(KeyId=key_id)),
    )
    return [grant for page in pages for grant in page.get("Grants", [])]


def grants(kms: AwsKms) -> tuple[bool, str]:
    """The ``grants`` check (see the module docstring)."""
    keys = _keys(kms)
    found = []
    for what, key_id in keys:
        for grant in kms.regions.call(partial(_grants_of, key_id=key_id)):
            operations = ", ".join(map(str, grant.get("Operations") or [])) or "no operation"
            found.append(
                f"{what}: grant {grant.get('GrantId', '?')} to "
                f"{grant.get('GranteePrincipal', '?')} ({operations})"
            )
    if found:
        return False, (
            f"{len(found)} grant(s) let principals use heimdall's keys whatever the key policy "
            f"says: {'; '.join(found)}. heimdall makes none: revoke those not wanted "
            "(aws kms revoke-grant)"
        )
    return True, f"none on {len(keys)} key(s)"


def _is_default(policy: Any, account: str) -> bool:
    """Whether *policy* is AWS's default key policy: the account's IAM policies, nothing else
    (heimdall's, even with no role in it, has an Id of its own)."""
    statements = policy.get("Statement") if isinstance(policy, dict) else None
    if not isinstance(statements, list) or len(statements) != 1:
        return False
    if policy.get("Id") == HEIMDALL_POLICY_ID:
        return False
    (statement,) = statements
    return isinstance(statement, dict) and bool(
        statement.get("Effect") == "Allow"
        and re.fullmatch(rf"arn:aws[a-z-]*:iam::{account}:root", str(_principal(statement)))
        and statement.get("Action") == "kms:*"
        and "Condition" not in statement
    )


def _principal(statement: dict[str, Any]) -> object:
    principal = statement.get("Principal")
    return principal.get("AWS") if isinstance(principal, dict) else principal


def key_policies(kms: AwsKms) -> tuple[bool, str]:
    """The ``key policies`` check (see the module docstring)."""
    account = kms.ownership().account
    policies: dict[str, list[str]] = {}
    defaults = []
    for what, key_id in _keys(kms):
        text = kms.regions.call(partial(key_policy_of, key_id=key_id, what=what))
        try:
            policy = json.loads(text)
        except ValueError:
            policy = text
        if _is_default(policy, account):
            defaults.append(what)
            continue
        policies.setdefault(json.dumps(policy, sort_keys=True), []).append(what)
    if len(policies) > 1:
        groups = " / ".join(", ".join(whats) for whats in policies.values())
        return False, (
            f"heimdall's keys have different key policies ({groups}): run `heimdall aws "
            "bootstrap` to write heimdall's on every key, and find out who wrote the others"
        )
    if defaults:
        return True, (
            f"{', '.join(defaults)}: AWS's default key policy (the roles reach it through their "
            "IAM policies); `heimdall aws bootstrap` writes heimdall's"
        )
    return True, "the same on every key"
