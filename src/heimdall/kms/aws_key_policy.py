"""heimdall's key policy (``aws_policies/key-policy.json``, the same as
``deploy/aws/key-policy.json``): rendered for an account and the roles' IAM role ARNs, and the
roles read back from the key policies AWS holds.

spec: AWS KMS Policy Example. The first statement lets the account's IAM policies apply, as
AWS's default key policy does; it is also what lets whoever creates a key with this policy keep
managing it (AWS's key policy lockout safety check: the creating principal must be allowed
PutKeyPolicy afterwards, here through its own IAM policies). Each role given gets one
statement (two for heimdall-admin: its tag changes under a condition) granting exactly its key
actions of :mod:`heimdall.kms.aws_access`; a role not given gets none.

Re-running ``heimdall aws bootstrap`` without naming the roles keeps the roles the keys' policies
already name (:func:`roles_in_policies`), so an idempotent run never strips a role's access.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from heimdall.errors import ConfigurationError
from heimdall.rbac import Role

__all__ = ["HEIMDALL_POLICY_ID", "ROLE_PLACEHOLDERS", "key_policy", "roles_in_policies"]

HEIMDALL_POLICY_ID: Final = "heimdall-key-policy"  # the template's Id

ROLE_PLACEHOLDERS: Final[Mapping[Role, str]] = {
    Role.APP: "${HEIMDALL_APP_ROLE_ARN}",
    Role.WORKER: "${HEIMDALL_WORKER_ROLE_ARN}",
    Role.ADMIN: "${HEIMDALL_ADMIN_ROLE_ARN}",
    Role.AUDIT: "${HEIMDALL_AUDIT_ROLE_ARN}",
}
_ACCOUNT: Final = "${ACCOUNT_ID}"
_ROLE_ARN: Final = re.compile(r"arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}\Z")


def _template() -> dict[str, Any]:
    text = importlib.resources.files("heimdall.kms").joinpath("aws_policies", "key-policy.json")
    template: dict[str, Any] = json.loads(text.read_text(encoding="utf-8"))
    return template


def _role_statements() -> dict[str, Role]:
    """The Sid of each statement of the template that grants a role, and the role."""
    placeholders = {placeholder: role for role, placeholder in ROLE_PLACEHOLDERS.items()}
    return {
        str(statement["Sid"]): placeholders[statement["Principal"]["AWS"]]
        for statement in _template()["Statement"]
        if statement["Principal"]["AWS"] in placeholders
    }


def key_policy(account: str, roles: Mapping[Role, str]) -> str:
    """The key policy for *account*, with the statements of each role in *roles* (its IAM role
    ARN); the roles not given get none."""
    if not re.fullmatch(r"[0-9]{12}", account):
        raise ConfigurationError("an AWS account ID is 12 digits")
    for role, arn in roles.items():
        if not _ROLE_ARN.match(arn):
            raise ConfigurationError(f"the IAM role of {role} must be a role ARN")
    template = _template()
    placeholders = {placeholder: role for role, placeholder in ROLE_PLACEHOLDERS.items()}
    statements = []
    for statement in template["Statement"]:
        principal = statement["Principal"]["AWS"]
        granted = placeholders.get(principal)
        if granted is not None:
            if granted not in roles:
                continue
            principal = roles[granted]
        statements.append({**statement, "Principal": {"AWS": principal.replace(_ACCOUNT, account)}})
    return json.dumps({**template, "Statement": statements}, indent=2)


def roles_in_policies(policies: Iterable[str]) -> dict[Role, str]:
    """The IAM role ARN each role's statements name in the key policies *policies* (JSON
    texts): statements are known by their Sid. A role named as two principals, or as something
    other than a role ARN (AWS shows a deleted role by its unique ID), is refused: which one to
    keep is the operator's to say."""
    sids = _role_statements()
    found: dict[Role, set[str]] = {}
    for text in policies:
        try:
            document = json.loads(text)
        except ValueError:
            document = {}
        statements = document.get("Statement", []) if isinstance(document, dict) else []
        for statement in statements if isinstance(statements, list) else []:
            role = sids.get(str(statement.get("Sid", ""))) if isinstance(statement, dict) else None
            if role is not None:
                principal = (statement.get("Principal") or {}).get("AWS")
                found.setdefault(role, set()).add(principal if isinstance(principal, str) else "")
    for role, principals in found.items():
        if len(principals) != 1 or not _ROLE_ARN.match(next(iter(principals))):
            flag = role.value.removeprefix("heimdall-")
            raise ConfigurationError(
                f"the key policies of heimdall's keys do not name one IAM role for {role}: "
                f"run `heimdall aws bootstrap` with --{flag}-role (and the other roles' options)"
            )
    return {role: next(iter(principals)) for role, principals in found.items()}
