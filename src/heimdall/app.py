"""Composition root: settings in, a wired :class:`heimdall.service.Heimdall` out.

The only module (with the CLI) that picks concrete providers and stores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from heimdall import metrics
from heimdall.audit import (
    AuditSink,
    ForwardedAuditLog,
    ForwardSink,
    JsonlAuditLog,
    StdoutForwarder,
    SyslogForwarder,
)
from heimdall.blind_index import StoredIndexKey
from heimdall.cipher import CachePolicy, FieldCipher
from heimdall.envelope import EncryptionVersion, load
from heimdall.errors import ConfigurationError, HeimdallError
from heimdall.kms.base import AuditKey, KeyManagementService
from heimdall.kms.legacy import LegacyMasterKey, parse_master_key
from heimdall.kms.local import LocalKeyring
from heimdall.kms.multi import MultiProvider
from heimdall.kms.vault_config import VaultPattern
from heimdall.modes import MIGRATE_HINT, CipherRouter
from heimdall.policy import FieldAction, default_policy, load_policy
from heimdall.private_files import ensure_private_dir
from heimdall.rotation.migration import recorded_mode
from heimdall.service import Heimdall
from heimdall.settings import Environment, Settings, StoreKind
from heimdall.store.base import GraphStore
from heimdall.store.sqlite import SqliteStore
from heimdall.types import EncryptionMode

__all__ = [
    "ENVIRONMENT_META",
    "LOCAL_KEYRING_WARNING",
    "build",
    "check_environment",
    "open_audit_log",
]

ENVIRONMENT_META = "environment"

LOCAL_KEYRING_WARNING = (
    "warning: HMD_ENV=production is running on the local keyring ({path}); its master key "
    "is only as safe as that file. Set HMD_KMS_PROVIDER to a key management service."
)


def _kms_key_in_use(store: GraphStore) -> str | None:
    """The key identifier of something *store* holds wrapped under a KMS (the blind-index
    key, else a field), or None when it holds nothing of the kind."""
    kms_v1 = EncryptionVersion.KMS_V1.value
    stored = StoredIndexKey.stored_in(store)
    if stored is not None and not stored.is_legacy:
        return stored.wrapped.key_identifier
    for batch in store.iter_fields(encryption_version=kms_v1, batch_size=1):
        for field in batch:
            try:
                return str(load(field.encrypted_data)["key_identifier"])
            except HeimdallError:
                return "(unreadable)"
    return None


def _missing_keyring(path: Path, key_identifier: str) -> str:
    if "/" in key_identifier:  # <mount>/<key>-vN: a Vault Transit key
        return (
            f"the store holds fields wrapped by Vault Transit (key {key_identifier}), not by a "
            "local keyring: set HMD_KMS_PROVIDER=vault and the HMD_VAULT_* settings they were "
            "written with"
        )
    return (
        f"keyring file {path} does not exist but the store holds fields encrypted under a "
        f"local keyring (key {key_identifier}); restore the keyring file (a new keyring "
        "cannot decrypt them)"
    )


def _vault(settings: Settings) -> KeyManagementService:
    try:
        from heimdall.kms.vault import VaultTransit  # noqa: PLC0415 - the vault extra (urllib3)
    except ImportError:
        raise ConfigurationError(
            "HMD_KMS_PROVIDER=vault needs the vault extra: pip install 'heimdall[vault]'"
        ) from None
    assert settings.vault is not None  # Settings.from_env builds it for the vault provider
    return VaultTransit(settings.vault, observer=metrics.record_kms_call)


def _aws(settings: Settings) -> KeyManagementService:
    try:
        from heimdall.kms.aws import AwsKms  # noqa: PLC0415 - the aws extra (boto3)
    except ImportError:
        raise ConfigurationError(
            "HMD_KMS_PROVIDER=aws needs the aws extra: pip install 'heimdall[aws]'"
        ) from None
    assert settings.aws is not None  # Settings.from_env builds it for the aws provider
    return AwsKms(settings.aws, observer=metrics.record_kms_call)


def _kms_provider(
    settings: Settings, store: GraphStore, *, create: bool
) -> KeyManagementService | None:
    """The provider new fields go under (HMD_KMS_PROVIDER), with the ones that are only read
    (HMD_KMS_READ_PROVIDERS) behind a MultiProvider; None in legacy mode without a keyring."""
    primary = _provider(settings.kms_provider, settings, store, create=create)
    if primary is None or not settings.kms_read_providers:
        return primary
    readers = []
    for name in settings.kms_read_providers:
        reader = _provider(name, settings, store, create=False, reader=True)
        assert reader is not None  # a reader's keyring must exist: _local refuses otherwise
        readers.append(reader)
    return MultiProvider(primary, readers)


def _provider(
    name: str,
    settings: Settings,
    store: GraphStore | None,
    *,
    create: bool,
    reader: bool = False,
) -> KeyManagementService | None:
    """The provider *name* (a reader: one HMD_KMS_READ_PROVIDERS names). A local keyring that
    does not exist is created if *create* (after asking *store* whether it holds fields a new
    one could never open), refused for a reader, and None otherwise."""
    if name == "vault":
        return _vault(settings)
    if name == "aws":
        return _aws(settings)
    if name != "local":
        raise _unavailable(name, reader=reader)
    path = settings.keyring_file
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. a name too long, or a directory that may not be searched
        raise ConfigurationError(f"keyring file {path} cannot be opened: {exc.strerror}") from None
    if reader and not exists:
        raise _no_reader_keyring(path)
    if not exists:
        if not create:
            return None
        # A fresh keyring could never unwrap what the store holds: refuse instead of creating
        # one and failing later on every decrypt with an opaque "decryption failed".
        assert store is not None  # what creates a keyring has the store at hand
        in_use = _kms_key_in_use(store)
        if in_use is not None:
            raise ConfigurationError(_missing_keyring(path, in_use))
    try:
        return LocalKeyring(
            path, key_name=settings.kms_key_name, create=create, observer=metrics.record_kms_call
        )
    except OSError as exc:  # e.g. a directory, or a parent that is a file
        raise ConfigurationError(
            f"keyring file {path} cannot be opened: {exc.strerror or type(exc).__name__}"
        ) from None


def _unavailable(name: str, *, reader: bool) -> ConfigurationError:
    named = f"HMD_KMS_READ_PROVIDERS names {name}, which" if reader else f"HMD_KMS_PROVIDER={name}"
    return ConfigurationError(f"{named} is not available in this version of heimdall")


def _no_reader_keyring(path: Path) -> ConfigurationError:
    return ConfigurationError(
        f"HMD_KMS_READ_PROVIDERS names local, but the keyring file {path} does not exist: "
        "set HMD_KEYRING_PATH to the keyring the fields were written with"
    )


def _primary(kms: KeyManagementService | None) -> KeyManagementService | None:
    """The provider new fields go under."""
    return kms.primary if isinstance(kms, MultiProvider) else kms


def _check_every_key_is_read(store: GraphStore, kms: KeyManagementService) -> None:
    """Refuse settings under which fields the store holds could not be decrypted: a key no
    configured provider holds (one removed from HMD_KMS_READ_PROVIDERS before `heimdall kms
    migrate` had moved every field off it, or the wrong HMD_KMS_PROVIDER). One index probe per
    distinct key, whatever the number of fields."""
    members = kms.members if isinstance(kms, MultiProvider) else (kms,)
    for key_name in store.key_names():
        if any(member.owns(f"{key_name}-v1") for member in members):
            continue
        count = store.count_fields(
            encryption_version=EncryptionVersion.KMS_V1.value, key_name=key_name
        )
        raise ConfigurationError(
            f"the store holds {count:,} fields under the key {key_name}, which no configured "
            f"key provider holds: {_provider_hint(key_name)}"
        )


def _provider_hint(key_name: str) -> str:
    """Which settings would read fields under *key_name*, judged by its form."""
    if key_name.startswith("aws:"):
        provider, settings = "aws", "the HMD_AWS_* settings"
    elif "/" in key_name:
        provider, settings = "vault", "the HMD_VAULT_* settings"
    else:
        provider, settings = "local", "HMD_KEYRING_PATH"
    return (
        f"set HMD_KMS_PROVIDER={provider}, or add {provider} to HMD_KMS_READ_PROVIDERS while "
        f"`heimdall kms migrate` moves them, with {settings} they were written with"
    )


def _store(settings: Settings) -> GraphStore:
    if settings.store is StoreKind.SQLITE:
        return SqliteStore(settings.sqlite_file)
    if not settings.postgres_dsn:
        raise ConfigurationError(f"HMD_STORE={settings.store.value} needs HMD_POSTGRES_DSN")
    try:
        from heimdall.store.age import AgeStore  # noqa: PLC0415 - optional extra
        from heimdall.store.postgres import PostgresStore  # noqa: PLC0415 - likewise
    except ImportError:
        raise ConfigurationError(
            f"HMD_STORE={settings.store.value} needs the postgres extra: "
            "pip install 'heimdall[postgres]'"
        ) from None
    if settings.store is StoreKind.AGE:
        return AgeStore(
            settings.postgres_dsn,
            graph=settings.age_graph,
            pool_size=settings.postgres_pool_size,
        )
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


def _check_environment(settings: Settings, store: GraphStore) -> None:
    """A store once used in production stays production: a caller cannot leave its role and
    audit settings behind by leaving HMD_ENV unset."""
    marked = store.get_meta(ENVIRONMENT_META)
    if settings.env is Environment.PRODUCTION:
        if marked != Environment.PRODUCTION.value:
            store.set_meta(ENVIRONMENT_META, Environment.PRODUCTION.value)
    elif marked == Environment.PRODUCTION.value:
        raise ConfigurationError(
            "this store is marked production; set HMD_CONFIG to the service's config file "
            '(env = "production"), which sets the role and the audit settings'
        )


def _master_key_in_kms_mode(store: GraphStore) -> str:
    """The warning for an env key set in kms mode. Removing it is advised only when nothing
    stored needs it: it is the only key of every legacy field."""
    legacy = store.count_fields(encryption_version=EncryptionVersion.LEGACY.value)
    stored_index = StoredIndexKey.stored_in(store)
    index_legacy = stored_index is not None and stored_index.is_legacy
    if legacy or index_legacy:
        what = f"{legacy:,} legacy fields" + (" and the blind-index key" if index_legacy else "")
        return (
            f"warning: {what} are stored under HMD_MASTER_KEY, its only key, and kms mode "
            f"refuses them; {MIGRATE_HINT}"
        )
    return (
        "warning: HMD_MASTER_KEY is set but no legacy field is stored and kms mode never uses "
        "it; remove it"
    )


def _uses_data_dir(settings: Settings) -> bool:
    """Whether any file heimdall opens lives in the data dir (by default all of them do)."""
    return (
        settings.audit_log is None
        or (settings.store is StoreKind.SQLITE and settings.sqlite_path is None)
        or (settings.kms_provider == "local" and settings.keyring_path is None)
    )


def build(
    settings: Settings,
    *,
    warn: Callable[[str], None] = lambda _: None,
    mode: EncryptionMode | None = None,
    audit_stdout: TextIO | None = None,
) -> Heimdall:
    """Wire a Heimdall from *settings*. Warnings (one line each) go to *warn*.

    The encryption mode is *mode* if given (the migrate commands), else the mode recorded in
    the store by `heimdall migrate`, else HMD_ENCRYPTION_MODE. *audit_stdout* is where the
    ``stdout`` audit sink writes (standard output unless given: a command whose own output is
    on standard output passes standard error, so that output stays exact).
    """
    if _uses_data_dir(settings):
        ensure_private_dir(settings.data_dir)
    cache = CachePolicy(
        max_uses=settings.dek_max_uses, max_age_seconds=settings.dek_max_age_seconds
    )
    policy = load_policy(settings.policy) if settings.policy else default_policy()
    if policy.default_action is FieldAction.PLAIN:
        warn(
            "warning: the policy's default_action is plain: every field it does not name is "
            "stored in the clear; name each such field, or make the default drop or encrypt"
        )
    store = _store(settings)
    try:
        _check_environment(settings, store)
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
                warn(_master_key_in_kms_mode(store))
    except BaseException:
        store.close()
        raise
    try:
        # In legacy mode the KMS is only read (rollback), so its keyring is not created there.
        kms = _kms_provider(settings, store, create=mode is not EncryptionMode.LEGACY)
        if kms is not None:
            _check_every_key_is_read(store, kms)
        direct = settings.vault_pattern is VaultPattern.TRANSIT
        kms_cipher = (
            FieldCipher(kms, EncryptionVersion.KMS_V1, cache, direct=direct) if kms else None
        )
        router = CipherRouter(mode, kms=kms_cipher, legacy=legacy_cipher)
        audit = _audit_sink(settings, kms, audit_stdout)
    except BaseException:
        store.close()
        raise
    primary = _primary(kms)
    if isinstance(primary, LocalKeyring) and settings.env is Environment.PRODUCTION:
        warn(LOCAL_KEYRING_WARNING.format(path=primary.path))
    return Heimdall(
        router=router,
        store=store,
        audit=audit,
        policy=policy,
    )


# -- the audit trail: file, keyed checkpoints, forwarding (see heimdall.audit) -----------------


def _audit_key(kms: KeyManagementService | None) -> AuditKey | None:
    """The provider's key for audit checkpoints; None without a provider (legacy mode)."""
    if isinstance(kms, LocalKeyring):
        return kms.audit_key()
    if kms is not None and kms.provider == "vault":
        from heimdall.kms.vault import VaultTransit  # noqa: PLC0415 - the vault extra
        from heimdall.kms.vault_audit import VaultAuditKey  # noqa: PLC0415 - likewise

        assert isinstance(kms, VaultTransit)
        return VaultAuditKey(kms.transport)
    if kms is not None and kms.provider == "aws":
        from heimdall.kms.aws import AwsKms  # noqa: PLC0415 - the aws extra

        assert isinstance(kms, AwsKms)
        return kms.audit_key()
    return None


def _audit_log(
    settings: Settings,
    primary: KeyManagementService | None,
    readers: Sequence[KeyManagementService] = (),
) -> JsonlAuditLog:
    """The audit log, its checkpoints signed with the audit key of *primary*, the provider new
    fields go under, and checked also with those of *readers*, the providers only read
    (HMD_KMS_READ_PROVIDERS): a trail kept across a move from one key service to another holds
    checkpoints of both."""
    return JsonlAuditLog(
        settings.audit_file,
        fsync=settings.audit_fsync,
        key=_audit_key(primary),
        read_keys=[key for reader in readers if (key := _audit_key(reader)) is not None],
        checkpoint_every=settings.audit_checkpoint_every,
        checkpoint_seconds=settings.audit_checkpoint_seconds,
    )


def _audit_sink(
    settings: Settings, kms: KeyManagementService | None, stdout: TextIO | None = None
) -> AuditSink:
    readers = kms.readers if isinstance(kms, MultiProvider) else ()
    log = _audit_log(settings, _primary(kms), readers)
    if not settings.audit_sinks:
        return log
    forwarders = [
        SyslogForwarder(settings.audit_syslog_address)
        if sink is ForwardSink.SYSLOG
        else StdoutForwarder(stdout)
        for sink in settings.audit_sinks
    ]
    return ForwardedAuditLog(log, forwarders, required=settings.audit_sinks_required)


def check_environment(settings: Settings) -> None:
    """Refuse *settings* outside production on a store marked production (see build), for the
    commands that use no store otherwise (``heimdall audit``)."""
    if _uses_data_dir(settings):
        ensure_private_dir(settings.data_dir)
    store = _store(settings)
    try:
        _check_environment(settings, store)
    finally:
        store.close()


def open_audit_log(settings: Settings) -> JsonlAuditLog:
    """The audit log of *settings* with its providers' audit keys, to read and check the trail
    (``heimdall audit``): creates no keyring."""
    # A keyring not made yet holds no audit key: verify then says whether the trail needs one.
    primary = _provider(settings.kms_provider, settings, None, create=False)
    readers = [
        _provider(name, settings, None, create=False, reader=True)
        for name in settings.kms_read_providers
    ]
    return _audit_log(settings, primary, [reader for reader in readers if reader is not None])
