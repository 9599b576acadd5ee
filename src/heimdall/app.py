"""Composition root: settings in, a wired :class:`heimdall.service.Heimdall` out.

The only module (with the CLI) that picks concrete providers and stores.
"""

from __future__ import annotations

from collections.abc import Callable

from heimdall.audit import JsonlAuditLog
from heimdall.cipher import CachePolicy, FieldCipher
from heimdall.envelope import EncryptionVersion
from heimdall.errors import ConfigurationError
from heimdall.kms.base import KeyManagementService
from heimdall.kms.legacy import LegacyMasterKey, parse_master_key
from heimdall.kms.local import LocalKeyring
from heimdall.modes import CipherRouter, EncryptionMode
from heimdall.policy import default_policy, load_policy
from heimdall.service import Heimdall
from heimdall.settings import Environment, Settings
from heimdall.store.sqlite import SqliteStore

__all__ = ["LOCAL_KEYRING_WARNING", "build"]

LOCAL_KEYRING_WARNING = (
    "warning: HMD_ENV=production is running on the local keyring ({path}); its master key "
    "is only as safe as that file. Set HMD_KMS_PROVIDER to a key management service."
)


def _kms_provider(settings: Settings, *, create: bool) -> KeyManagementService | None:
    if settings.kms_provider == "local":
        if not create and not settings.keyring_file.exists():
            return None
        return LocalKeyring(settings.keyring_file, key_name=settings.kms_key_name, create=create)
    raise ConfigurationError(
        f"HMD_KMS_PROVIDER={settings.kms_provider} is not available in this version of heimdall"
    )


def build(settings: Settings, *, warn: Callable[[str], None] = lambda _: None) -> Heimdall:
    """Wire a Heimdall from *settings*. Warnings (one line each) go to *warn*."""
    cache = CachePolicy(
        max_uses=settings.dek_max_uses, max_age_seconds=settings.dek_max_age_seconds
    )
    mode = settings.encryption_mode
    legacy_cipher = None
    if settings.master_key:
        legacy_cipher = FieldCipher(
            LegacyMasterKey(parse_master_key(settings.master_key)), EncryptionVersion.LEGACY, cache
        )
        if mode is EncryptionMode.KMS:
            warn("warning: HMD_MASTER_KEY is set but kms mode never uses it; remove it")
    # In legacy mode the KMS is only read (rollback), so its keyring is not created there.
    kms = _kms_provider(settings, create=mode is not EncryptionMode.LEGACY)
    kms_cipher = FieldCipher(kms, EncryptionVersion.KMS_V1, cache) if kms else None
    if isinstance(kms, LocalKeyring) and settings.env is Environment.PRODUCTION:
        warn(LOCAL_KEYRING_WARNING.format(path=kms.path))
    router = CipherRouter(mode, kms=kms_cipher, legacy=legacy_cipher)
    policy = load_policy(settings.policy) if settings.policy else default_policy()
    return Heimdall(
        router=router,
        store=SqliteStore(settings.sqlite_file),
        audit=JsonlAuditLog(settings.audit_file, fsync=settings.audit_fsync),
        policy=policy,
    )
