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
    AUDIT_KEY_METADATA,
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
HEIMDALL_TAGS = {"heimdall:key", "heimdall:version", "heimdall:state"}
STATES = {"active", "retired", "disabled"}


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
    key's (its MACs, and the metadata that shows it is heimdall's) on keys tagged
    heimdall-pii-audit, never on another account's keys. Tagging included: a tag change on
    "*" is only the tagging of a key being created (see the next test)."""
    for statement in _load(DEPLOY / f"{role.value}.json")["Statement"]:
        actions = _actions(statement)
        if statement["Effect"] != "Allow" or actions <= ACCOUNT_ACTIONS:
            continue
        if actions == {"kms:TagResource"} and statement["Resource"] == "*":
            assert statement["Condition"]["Null"] == {"aws:ResourceTag/heimdall:key": "true"}
            continue
        if statement["Resource"] != KEY_RESOURCE:
            assert actions <= {"kms:CreateAlias", "kms:UpdateAlias"}  # on the aliases
            continue
        tag = statement["Condition"]["StringEquals"]["aws:ResourceTag/heimdall:key"]
        assert tag == ("heimdall-pii-audit" if actions & MAC_ACTIONS else "heimdall-pii")
        assert not (actions & MAC_ACTIONS and actions - MAC_ACTIONS - AUDIT_KEY_METADATA)


def _tag_keys(statement: dict[str, Any]) -> set[str]:
    return set(statement["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"])


def test_the_admin_may_retag_heimdalls_keys_only_with_a_state_and_tag_only_new_keys() -> None:
    """An admin cannot tag a key into heimdall's chain: on heimdall's keys it may change only
    heimdall:state (to a state heimdall knows), and heimdall's three tags go only on a key being
    created or replicated, never on one tagged heimdall:key already (another deployment's, the
    audit key) nor on one with an alias of its own."""
    statements = _load(DEPLOY / "heimdall-admin.json")["Statement"]
    tagging = [s for s in statements if "kms:TagResource" in _actions(s)]
    assert all(_actions(s) == {"kms:TagResource"} for s in tagging)
    (existing,) = [s for s in tagging if s["Resource"] == KEY_RESOURCE]
    assert existing["Condition"]["StringEquals"] == {
        "aws:ResourceTag/heimdall:key": "heimdall-pii",
        "aws:RequestTag/heimdall:state": sorted(STATES),
    }
    assert _tag_keys(existing) == {"heimdall:state"}
    (new,) = [s for s in tagging if s["Resource"] == "*"]
    assert new["Condition"]["StringEquals"] == {"aws:RequestTag/heimdall:key": "heimdall-pii"}
    assert _tag_keys(new) == HEIMDALL_TAGS
    assert new["Condition"]["Null"] == {"aws:ResourceTag/heimdall:key": "true"}
    assert new["Condition"]["ForAllValues:StringLike"] == {
        "kms:ResourceAliases": ["alias/heimdall-pii-v*"]
    }
    assert len(tagging) == 2
    (creating,) = [s for s in statements if "kms:CreateKey" in _actions(s)]
    assert creating["Condition"]["StringEquals"] == {"aws:RequestTag/heimdall:key": "heimdall-pii"}
    assert _tag_keys(creating) == HEIMDALL_TAGS


def test_the_admin_may_repoint_only_the_latest_alias() -> None:
    """A version alias is created once and never moved: UpdateAlias only on alias/heimdall-pii."""
    statements = _load(DEPLOY / "heimdall-admin.json")["Statement"]
    updating = [s for s in statements if "kms:UpdateAlias" in _actions(s)]
    alias_resources = [s["Resource"] for s in updating if s["Resource"] != KEY_RESOURCE]
    assert alias_resources == ["arn:aws:kms:*:${ACCOUNT_ID}:alias/heimdall-pii"]


def _key_policy_by_principal() -> dict[str, list[dict[str, Any]]]:
    by_principal: dict[str, list[dict[str, Any]]] = {}
    for statement in _load(DEPLOY / "key-policy.json")["Statement"]:
        by_principal.setdefault(statement["Principal"]["AWS"], []).append(statement)
    return by_principal


def test_the_key_policy_grants_each_role_exactly_its_key_actions() -> None:
    by_principal = _key_policy_by_principal()
    (root,) = by_principal["arn:aws:iam::${ACCOUNT_ID}:root"]
    assert root["Action"] == "kms:*"
    for role, placeholder in ROLE_PLACEHOLDERS.items():
        statements = by_principal[placeholder]
        assert all(s["Effect"] == "Allow" for s in statements)
        granted = set().union(*(_actions(s) for s in statements))
        assert granted == key_actions(role)
        assert not granted & ACCOUNT_ACTIONS
    assert len(by_principal) == 1 + len(Role)


def test_the_key_policy_lets_the_admin_change_only_the_state_tag() -> None:
    """The key policy holds on heimdall's keys alone, so no resource condition: the tag keys
    and the state are the condition."""
    admin = _key_policy_by_principal()[ROLE_PLACEHOLDERS[Role.ADMIN]]
    (tagging,) = [s for s in admin if "kms:TagResource" in _actions(s)]
    assert _actions(tagging) == {"kms:TagResource"}
    assert _tag_keys(tagging) == {"heimdall:state"}
    assert tagging["Condition"]["StringEquals"] == {"aws:RequestTag/heimdall:state": sorted(STATES)}
    for statement in _key_policy_by_principal().values():
        for each in statement:
            if "kms:TagResource" in _actions(each) or each["Action"] == "kms:*":
                continue
            assert "Condition" not in each


def test_the_key_policy_lets_whoever_creates_a_key_with_it_keep_managing_it() -> None:
    """AWS's lockout safety check: CreateKey with a key policy fails unless the policy lets the
    creator call PutKeyPolicy afterwards. heimdall's does so for the account's principals, through
    their IAM policies (the root statement), with no condition and no deny."""
    document = json.loads(key_policy("111122223333", {Role.ADMIN: ARN.format("admin")}))
    (root,) = [s for s in document["Statement"] if s["Sid"] == "EnableIamPolicies"]
    assert root == {
        "Sid": "EnableIamPolicies",
        "Effect": "Allow",
        "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
        "Action": "kms:*",
        "Resource": "*",
    }
    assert all(s["Effect"] == "Allow" for s in document["Statement"])


def test_the_packaged_key_policy_is_the_deployed_one() -> None:
    assert (PACKAGED / "key-policy.json").read_bytes() == (DEPLOY / "key-policy.json").read_bytes()


def test_the_key_policy_is_rendered_for_the_account_and_the_roles_given() -> None:
    rendered = json.loads(
        key_policy("111122223333", {Role.APP: ARN.format("app"), Role.WORKER: ARN.format("w")})
    )
    principals = [s["Principal"]["AWS"] for s in rendered["Statement"]]
    assert principals == ["arn:aws:iam::111122223333:root", ARN.format("app"), ARN.format("w")]
    admin = json.loads(key_policy("111122223333", {Role.ADMIN: ARN.format("admin")}))
    assert [s["Sid"] for s in admin["Statement"]] == [
        "EnableIamPolicies",
        "HeimdallAdmin",
        "HeimdallAdminStateTags",
    ]
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
