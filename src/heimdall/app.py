"""Composition root: settings in, a wired :class:`heimdall.service.Heimdall` out.

The only module (with the CLI) that picks concrete providers and stores.
"""

from __future__ import annotations

from collections.abc import Callable

from heimdall.audit import JsonlAuditLog
from heimdall.blind_index import META_KEY, StoredIndexKey
from heimdall.cipher import CachePolicy, FieldCipher
from heimdall.envelope import EncryptionVersion
from heimdall.errors import ConfigurationError
from heimdall.kms.base import KeyManagementService
from heimdall.kms.legacy import LegacyMasterKey, parse_master_key
from heimdall.kms.local import LocalKeyring
from heimdall.kms.vault_config import VaultPattern
from heimdall.migration import recorded_mode
from heimdall.modes import CipherRouter, EncryptionMode
from heimdall.policy import default_policy, load_policy
from heimdall.service import Heimdall
from heimdall.settings import Environment, Settings, StoreKind
from heimdall.store.base import GraphStore
from heimdall.store.sqlite import SqliteStore

__all__ = ["LOCAL_KEYRING_WARNING", "build"]

LOCAL_KEYRING_WARNING = (
    "warning: HMD_ENV=production is running on the local keyring ({path}); its master key "
    "is only as safe as that file. Set HMD_KMS_PROVIDER to a key management service."
)


def _holds_kms_data(store: GraphStore) -> bool:
    """Whether *store* holds a field or the blind-index key wrapped under the KMS."""
    kms_v1 = EncryptionVersion.KMS_V1.value
    if store.count_fields(encryption_version=kms_v1) > 0:
        return True
    stored_text = store.get_meta(META_KEY)
    return stored_text is not None and (
        StoredIndexKey.from_json(stored_text).encryption_version == kms_v1
    )


def _vault(settings: Settings) -> KeyManagementService:
    try:
        from heimdall.kms.vault import VaultTransit  # noqa: PLC0415 - the vault extra (urllib3)
    except ImportError:
        raise ConfigurationError(
            "HMD_KMS_PROVIDER=vault needs the vault extra: pip install 'heimdall[vault]'"
        ) from None
    assert settings.vault is not None  # Settings.from_env builds it for the vault provider
    return VaultTransit(settings.vault)


def _kms_provider(
    settings: Settings, store: GraphStore, *, create: bool
) -> KeyManagementService | None:
    if settings.kms_provider == "vault":
        return _vault(settings)
    if settings.kms_provider != "local":
        raise ConfigurationError(
            f"HMD_KMS_PROVIDER={settings.kms_provider} is not available in this version of heimdall"
        )
    path = settings.keyring_file
    if not path.exists():
        if not create:
            return None
        # A fresh keyring could never unwrap what the store holds: refuse instead of creating
        # one and failing later on every decrypt with an opaque "decryption failed".
        if _holds_kms_data(store):
            raise ConfigurationError(
                f"keyring file {path} does not exist but the store holds fields encrypted "
                "under it; restore the keyring file (a new keyring cannot decrypt them)"
            )
    try:
        return LocalKeyring(path, key_name=settings.kms_key_name, create=create)
    except OSError as exc:  # e.g. a directory, or a parent that is a file
        raise ConfigurationError(
            f"keyring file {path} cannot be opened: {exc.strerror or type(exc).__name__}"
        ) from None


def _store(settings: Settings) -> GraphStore:
    if settings.store is StoreKind.SQLITE:
        return SqliteStore(settings.sqlite_file)
    if not settings.postgres_dsn:
        raise ConfigurationError("HMD_STORE=postgres needs HMD_POSTGRES_DSN")
    try:
        from heimdall.store.postgres import PostgresStore  # noqa: PLC0415 - optional extra
    except ImportError:
        raise ConfigurationError(
            "HMD_STORE=postgres needs the postgres extra: pip install 'heimdall[postgres]'"
        ) from None
    return PostgresStore(settings.postgres_dsn, pool_size=settings.postgres_pool_size)


def _effective_mode(
    settings: Settings, store: GraphStore, warn: Callable[[str], None]
) -> EncryptionMode:
    recorded = recorded_mode(store)
    if recorded is None:
        return settings.encryption_mode
    if recorded is not settings.encryption_mode:
        warn(
            f"warning: the store's recorded mode {recorded.value} (set by `heimdall migrate`) "
            f"overrides HMD_ENCRYPTION_MODE={settings.encryption_mode.value}"
        )
    return recorded


def build(
    settings: Settings,
    *,
    warn: Callable[[str], None] = lambda _: None,
    mode: EncryptionMode | None = None,
) -> Heimdall:
    """Wire a Heimdall from *settings*. Warnings (one line each) go to *warn*.

    The encryption mode is *mode* if given (the migrate commands), else the mode recorded in
    the store by `heimdall migrate`, else HMD_ENCRYPTION_MODE.
    """
    cache = CachePolicy(
        max_uses=settings.dek_max_uses, max_age_seconds=settings.dek_max_age_seconds
    )
    policy = load_policy(settings.policy) if settings.policy else default_policy()
    store = _store(settings)
    try:
        if mode is None:
            mode = _effective_mode(settings, store, warn)
        legacy_cipher = None
        if settings.master_key:
            legacy_cipher = FieldCipher(
                LegacyMasterKey(parse_master_key(settings.master_key)),
                EncryptionVersion.LEGACY,
                cache,
            )
            if mode is EncryptionMode.KMS:
                warn("warning: HMD_MASTER_KEY is set but kms mode never uses it; remove it")
    except BaseException:
        store.close()
        raise
    try:
        # In legacy mode the KMS is only read (rollback), so its keyring is not created there.
        kms = _kms_provider(settings, store, create=mode is not EncryptionMode.LEGACY)
        direct = settings.vault_pattern is VaultPattern.TRANSIT
        kms_cipher = (
            FieldCipher(kms, EncryptionVersion.KMS_V1, cache, direct=direct) if kms else None
        )
        router = CipherRouter(mode, kms=kms_cipher, legacy=legacy_cipher)
    except BaseException:
        store.close()
        raise
    if isinstance(kms, LocalKeyring) and settings.env is Environment.PRODUCTION:
        warn(LOCAL_KEYRING_WARNING.format(path=kms.path))
    return Heimdall(
        router=router,
        store=store,
        audit=JsonlAuditLog(settings.audit_file, fsync=settings.audit_fsync),
        policy=policy,
    )
