"""deploy/aws: the key policy and the role IAM policies grant exactly heimdall's role table.

The table is :mod:`heimdall.kms.aws_access` (KMS actions by heimdall permission, summed over
:data:`heimdall.rbac.ROLE_PERMISSIONS`); these tests parse the shipped JSON and compare.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from heimdall.errors import ConfigurationError
from heimdall.kms.aws_access import (
    ACCOUNT_ACTIONS,
    ADMIN_DENIED,
    SIGN_CHECKPOINTS,
    VERIFY_CHECKPOINTS,
    key_actions,
    role_actions,
)
from heimdall.kms.aws_bootstrap import ROLE_PLACEHOLDERS, key_policy
from heimdall.rbac import Role

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "aws"
PACKAGED = Path(__file__).resolve().parent.parent / "src" / "heimdall" / "kms" / "aws_policies"
MAC_ACTIONS = {SIGN_CHECKPOINTS, VERIFY_CHECKPOINTS}
KEY_RESOURCE = "arn:aws:kms:*:${ACCOUNT_ID}:key/*"  # this account's keys only
ARN = "arn:aws:iam::111122223333:role/heimdall-{}"


def _load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    assert document["Version"] == "2012-10-17"
    return document


def _actions(statement: dict[str, Any]) -> set[str]:
    actions = statement["Action"]
    return {actions} if isinstance(actions, str) else set(actions)


def _allowed(document: dict[str, Any]) -> set[str]:
    return set().union(*(_actions(s) for s in document["Statement"] if s["Effect"] == "Allow"))


@pytest.mark.parametrize("role", list(Role))
def test_each_role_iam_policy_allows_exactly_its_kms_actions(role: Role) -> None:
    document = _load(DEPLOY / f"{role.value}.json")
    assert _allowed(document) == role_actions(role)
    denied = [s for s in document["Statement"] if s["Effect"] == "Deny"]
    if role is Role.ADMIN:
        assert [_actions(s) for s in denied] == [set(ADMIN_DENIED)]
        assert denied[0]["Resource"] == "*"
    else:
        assert denied == []


@pytest.mark.parametrize("role", list(Role))
def test_key_actions_are_scoped_to_heimdalls_tagged_keys_in_the_account(role: Role) -> None:
    """The master key versions' actions on keys tagged heimdall:key=heimdall-pii, the audit
    key's on keys tagged heimdall-pii-audit, never on another account's keys."""
    for statement in _load(DEPLOY / f"{role.value}.json")["Statement"]:
        actions = _actions(statement)
        if statement["Effect"] != "Allow" or actions <= ACCOUNT_ACTIONS | {"kms:TagResource"}:
            continue
        if statement["Resource"] != KEY_RESOURCE:
            assert actions <= {"kms:CreateAlias", "kms:UpdateAlias"}  # on the aliases
            continue
        tag = statement["Condition"]["StringEquals"]["aws:ResourceTag/heimdall:key"]
        assert tag == ("heimdall-pii-audit" if actions <= MAC_ACTIONS else "heimdall-pii")
        assert not (actions & MAC_ACTIONS and actions - MAC_ACTIONS)


def test_the_admin_may_change_only_the_state_tag_and_create_only_tagged_keys() -> None:
    statements = _load(DEPLOY / "heimdall-admin.json")["Statement"]
    tagging = [s for s in statements if "kms:TagResource" in _actions(s)]
    for statement in tagging:
        keys = statement["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"]
        assert set(keys) <= {"heimdall:key", "heimdall:version", "heimdall:state"}
    (creating,) = [s for s in statements if "kms:CreateKey" in _actions(s)]
    condition = creating["Condition"]["StringEquals"]
    assert condition == {"aws:RequestTag/heimdall:key": "heimdall-pii"}


def test_the_key_policy_grants_each_role_exactly_its_key_actions() -> None:
    document = _load(DEPLOY / "key-policy.json")
    by_principal = {s["Principal"]["AWS"]: s for s in document["Statement"]}
    assert by_principal["arn:aws:iam::${ACCOUNT_ID}:root"]["Action"] == "kms:*"
    for role, placeholder in ROLE_PLACEHOLDERS.items():
        statement = by_principal[placeholder]
        assert statement["Effect"] == "Allow"
        assert _actions(statement) == key_actions(role)
        assert not _actions(statement) & ACCOUNT_ACTIONS
    assert len(document["Statement"]) == 1 + len(Role)


def test_the_packaged_key_policy_is_the_deployed_one() -> None:
    assert (PACKAGED / "key-policy.json").read_bytes() == (DEPLOY / "key-policy.json").read_bytes()


def test_the_key_policy_is_rendered_for_the_account_and_the_roles_given() -> None:
    rendered = json.loads(
        key_policy("111122223333", {Role.APP: ARN.format("app"), Role.WORKER: ARN.format("w")})
    )
    principals = [s["Principal"]["AWS"] for s in rendered["Statement"]]
    assert principals == ["arn:aws:iam::111122223333:root", ARN.format("app"), ARN.format("w")]
    assert "${" not in json.dumps(rendered)


@pytest.mark.parametrize(
    ("account", "arn"),
    [
        ("11112222333", ARN.format("app")),
        ("111122223333", "arn:aws:iam::111122223333:user/someone"),
        ("111122223333", '"}, "Principal": "*'),
    ],
)
def test_a_malformed_account_or_role_is_refused(account: str, arn: str) -> None:
    with pytest.raises(ConfigurationError):
        key_policy(account, {Role.APP: arn})
