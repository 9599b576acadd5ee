"""What each heimdall role may do with AWS KMS: the one table of KMS actions, by permission.

spec: Access Control Model (AWS KMS Policy Example, Role-Based Access). :data:`PERMISSION_ACTIONS`
names every KMS action heimdall calls for each :class:`heimdall.rbac.Permission`; a role may call
the union over its permissions (:func:`role_actions`). The policies in ``deploy/aws`` (the key
policy and one IAM policy per role) grant exactly that, and ``tests/test_aws_policies.py`` holds
them to it; ``heimdall kms check`` checks a role only for what this table gives it. To make a new
KMS call, add it here and to the policies.

Where heimdall's table and AWS's differ:

* every permission that touches a data key also reads key metadata (:data:`METADATA`): heimdall
  finds its key versions through aliases and refuses a version below the decryption floor itself,
  before any call, so even heimdall-worker ("decrypt only") reads which versions exist and their
  states. Metadata holds no key material;
* writing the blind index (encrypt) and looking a value up both unwrap the blind-index key;
* every permission whose commands write audit events may sign the trail's checkpoints with the
  audit key (GenerateMac); reading the audit trail verifies them (VerifyMac). Either first reads
  the audit key's metadata (DescribeKey, ListResourceTags: :data:`AUDIT_KEY_METADATA`), to check
  that the key its alias names is heimdall's audit key;
* reading the keys (``heimdall kms check``) lists their grants (ListGrants): a grant lets
  another principal use a key whatever its key policy says;
* heimdall-admin creates the KMS key of each new version, and whoever creates a key chooses its
  key policy. Its IAM policy therefore also denies, explicitly, every action that yields a
  plaintext data key (:data:`ADMIN_DENIED`): an explicit deny wins over any key policy or grant.
  PutKeyPolicy is among them, so heimdall-admin creates keys without a key policy (AWS's
  default): AWS refuses one at creation that would not let the creator call PutKeyPolicy.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from heimdall.rbac import ROLE_PERMISSIONS, Permission, Role

__all__ = [
    "ACCOUNT_ACTIONS",
    "ADMIN_DENIED",
    "AUDIT_KEY_METADATA",
    "METADATA",
    "PERMISSION_ACTIONS",
    "SIGN_CHECKPOINTS",
    "VERIFY_CHECKPOINTS",
    "key_actions",
    "may",
    "role_actions",
]

METADATA: Final = frozenset({"kms:DescribeKey", "kms:ListAliases", "kms:ListResourceTags"})
AUDIT_KEY_METADATA: Final = frozenset({"kms:DescribeKey", "kms:ListResourceTags"})
SIGN_CHECKPOINTS: Final = "kms:GenerateMac"
VERIFY_CHECKPOINTS: Final = "kms:VerifyMac"

PERMISSION_ACTIONS: Final[Mapping[Permission, frozenset[str]]] = MappingProxyType(
    {
        Permission.ENCRYPT: METADATA
        | {"kms:GenerateDataKey", "kms:Encrypt", "kms:Decrypt", SIGN_CHECKPOINTS},
        Permission.DECRYPT: METADATA | {"kms:Decrypt", SIGN_CHECKPOINTS},
        Permission.LOOKUP: METADATA | {"kms:Decrypt", SIGN_CHECKPOINTS},
        Permission.READ_KEYS: METADATA | {"kms:GetKeyRotationStatus", "kms:ListGrants"},
        Permission.READ_STATUS: METADATA,
        # A rotation creates the next version's KMS key (AWS's default key policy, the
        # version's tags), turns on the automatic rotation of its key material, claims its
        # alias and points alias/<name> at it; a rotation that lost a race schedules its unused
        # key's deletion. With several regions the key is replicated to each other one
        # (ReplicateKey on the key, and CreateKey with the version's tags in the replica's
        # region). Who rotates also reads the keys' policies (heimdall kms check).
        Permission.ROTATE: METADATA
        | {
            "kms:CreateKey",
            "kms:ReplicateKey",
            "kms:GetKeyPolicy",
            "kms:TagResource",
            "kms:EnableKeyRotation",
            "kms:CreateAlias",
            "kms:UpdateAlias",
            "kms:ScheduleKeyDeletion",
            SIGN_CHECKPOINTS,
        },
        # The floors: heimdall:state tags, and the KMS keys of disabled versions disabled (or
        # scheduled for deletion) in KMS itself.
        Permission.CONFIGURE_KEYS: METADATA
        | {
            "kms:TagResource",
            "kms:DisableKey",
            "kms:EnableKey",
            "kms:ScheduleKeyDeletion",
            "kms:CancelKeyDeletion",
            SIGN_CHECKPOINTS,
        },
        # Rewrap: ReEncrypt never shows the caller the data key.
        Permission.REENCRYPT: METADATA | {"kms:ReEncryptFrom", "kms:ReEncryptTo", SIGN_CHECKPOINTS},
        Permission.READ_AUDIT: AUDIT_KEY_METADATA | {VERIFY_CHECKPOINTS},
    }
)

# Actions on no particular key: granted in IAM policies only, never in a key policy.
ACCOUNT_ACTIONS: Final = frozenset({"kms:CreateKey", "kms:ListAliases"})

# Denied to heimdall-admin outright (see the module docstring).
ADMIN_DENIED: Final = frozenset(
    {
        "kms:Decrypt",
        "kms:GenerateDataKey",
        "kms:GenerateDataKeyPair",
        "kms:CreateGrant",
        "kms:PutKeyPolicy",
    }
)


def role_actions(role: Role) -> frozenset[str]:
    """Every KMS action *role* calls."""
    return frozenset().union(*(PERMISSION_ACTIONS[p] for p in ROLE_PERMISSIONS[role]))


def key_actions(role: Role) -> frozenset[str]:
    """The actions of *role* that act on a key: what its statement in a key policy grants."""
    return role_actions(role) - ACCOUNT_ACTIONS


def may(role: Role | None, action: str) -> bool:
    """Whether *role* calls *action* (the local operator, ``None``, calls everything)."""
    return role is None or action in role_actions(role)
