"""The data dir and the files in it are used only when nobody else could have planted them.

Another local user who can write where heimdall keeps its keyring, database or audit log could
plant a symlink (heimdall would write through it) or a keyring and database of their own
(heimdall would fill them with values they can read). Every such case is refused with one line
naming the path and the fix, and the link's target is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from heimdall.app import build
from heimdall.errors import ConfigurationError
from heimdall.kms.local import LocalKeyring
from heimdall.private_files import ensure_private_dir, open_private
from heimdall.rbac import Caller
from heimdall.settings import Settings
from heimdall.store.sqlite import SqliteStore

OTHER_UID = 65534  # nobody
as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a file to another user needs root (chown)"
)
HEIMDALL = shutil.which("heimdall", path=str(Path(sys.executable).parent))
CALLER = Caller(actor="test:alice")


def _settings(data_dir: Path, **overrides: object) -> Settings:
    return Settings(data_dir=data_dir, audit_fsync=False, **overrides)  # type: ignore[arg-type]


def _open_and_close(settings: Settings) -> None:
    service = build(settings)
    try:
        service.status(caller=CALLER)
    finally:
        service.close()


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n", encoding="utf-8")
    return victim


# -- the data dir ---------------------------------------------------------------------------


def test_a_new_data_dir_is_created_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _open_and_close(_settings(data_dir))
    assert data_dir.stat().st_mode & 0o777 == 0o700


def test_a_data_dir_that_is_a_symlink_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link = tmp_path / "data"
    link.symlink_to(elsewhere)
    with pytest.raises(ConfigurationError, match=rf"data dir {link} is a symbolic link"):
        _open_and_close(_settings(link))
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o1777], ids=oct)
def test_a_data_dir_writable_by_group_or_others_is_refused_with_the_fix(
    tmp_path: Path, mode: int
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(mode)
    with pytest.raises(ConfigurationError, match=rf"run: chmod go-w {data_dir}$"):
        _open_and_close(_settings(data_dir))
    assert list(data_dir.iterdir()) == []


@as_root
def test_a_data_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    os.chown(data_dir, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigurationError, match=rf"belongs to uid {OTHER_UID}"):
        _open_and_close(_settings(data_dir))
    assert list(data_dir.iterdir()) == []


# -- the keyring ----------------------------------------------------------------------------


def test_a_planted_keyring_symlink_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _open_and_close(_settings(tmp_path / "attacker"))  # a keyring the attacker holds
    data_dir.mkdir(mode=0o700)
    (data_dir / "keyring.json").symlink_to(tmp_path / "attacker" / "keyring.json")
    with pytest.raises(ConfigurationError, match=r"keyring file .* is a symbolic link"):
        _open_and_close(_settings(data_dir))


@as_root
def test_a_keyring_of_another_user_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _open_and_close(_settings(data_dir))
    os.chown(data_dir / "keyring.json", OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigurationError, match=rf"keyring file .* belongs to uid {OTHER_UID}"):
        _open_and_close(_settings(data_dir))


def test_a_planted_keyring_lock_symlink_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    _open_and_close(_settings(data_dir))
    victim = _victim(tmp_path)
    (data_dir / "keyring.json.lock").unlink(missing_ok=True)
    (data_dir / "keyring.json.lock").symlink_to(victim)
    keyring = LocalKeyring(data_dir / "keyring.json")
    with pytest.raises(ConfigurationError, match=r"keyring lock file .* is a symbolic link"):
        keyring.rotate()
    assert victim.read_text(encoding="utf-8") == "precious\n"
    assert keyring.describe().latest_version == 1


@pytest.mark.parametrize("mode", [0o777, 0o1777], ids=["shared", "sticky"])
def test_a_keyring_or_database_in_a_directory_others_can_write_is_refused(
    tmp_path: Path, mode: int
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)  # sticky (/tmp) too: others could plant the database's -wal and -shm
    with pytest.raises(ConfigurationError, match=rf"directory {shared} .* run: chmod go-w"):
        LocalKeyring(shared / "keyring.json")
    with pytest.raises(ConfigurationError, match=rf"directory {shared} .* run: chmod go-w"):
        SqliteStore(shared / "heimdall.db")
    assert list(shared.iterdir()) == []


def test_missing_directories_are_made_private_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        ensure_private_dir(tmp_path / "a" / "b" / "data")
    finally:
        os.umask(previous)
    for directory in ("a", "a/b", "a/b/data"):
        assert (tmp_path / directory).stat().st_mode & 0o777 == 0o700


# -- the database ---------------------------------------------------------------------------


def test_a_planted_database_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    victim = _victim(tmp_path)
    (data_dir / "heimdall.db").symlink_to(victim)
    with pytest.raises(ConfigurationError, match=r"database file .* is a symbolic link"):
        SqliteStore(data_dir / "heimdall.db")
    assert victim.read_text(encoding="utf-8") == "precious\n"


def test_a_planted_wal_symlink_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    victim = _victim(tmp_path)
    (data_dir / "heimdall.db-wal").symlink_to(victim)
    with pytest.raises(ConfigurationError, match="is a symbolic link"):
        SqliteStore(data_dir / "heimdall.db")
    assert victim.read_text(encoding="utf-8") == "precious\n"


@as_root
def test_a_database_of_another_user_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _open_and_close(_settings(data_dir))
    os.chown(data_dir / "heimdall.db", OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigurationError, match=rf"database file .* belongs to uid {OTHER_UID}"):
        _open_and_close(_settings(data_dir))


def test_a_group_writable_database_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _open_and_close(_settings(data_dir))
    (data_dir / "heimdall.db").chmod(0o660)
    with pytest.raises(ConfigurationError, match=r"database file .* writable by group or others"):
        _open_and_close(_settings(data_dir))


# -- the primitives -------------------------------------------------------------------------


def test_open_private_creates_new_files_0600_and_never_writes_through_a_link(
    tmp_path: Path,
) -> None:
    os.close(open_private(tmp_path / "new", os.O_RDWR | os.O_CREAT, what="file"))
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o600
    victim = _victim(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "link").symlink_to(victim)
    for name in ("dangling", "link"):
        with pytest.raises(ConfigurationError, match="is a symbolic link"):
            open_private(tmp_path / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, what="file")
    assert not (tmp_path / "nowhere").exists()
    assert victim.read_text(encoding="utf-8") == "precious\n"


def test_ensure_private_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="is not a directory"):
        ensure_private_dir(tmp_path / "file")


@pytest.mark.skipif(HEIMDALL is None, reason="the heimdall console script is missing")
def test_the_cli_refuses_an_untrusted_data_dir_in_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    assert HEIMDALL is not None
    result = subprocess.run(
        [HEIMDALL, "status"],
        env={**env, "HMD_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: data dir {data_dir} is writable by group or others (mode 0777); "
        f"run: chmod go-w {data_dir}"
    ]


@pytest.mark.parametrize(
    "flags",
    [os.O_RDONLY, os.O_RDWR | os.O_APPEND | os.O_CREAT, os.O_WRONLY],
    ids=["read", "append", "write"],
)
def test_a_planted_fifo_is_refused_at_once_not_waited_on(tmp_path: Path, flags: int) -> None:
    ensure_private_dir(tmp_path / "data")
    fifo = tmp_path / "data" / "audit.log.head"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException | int] = []

    def open_it() -> None:
        try:
            outcome.append(open_private(fifo, flags, what="audit log head record"))
        except BaseException as exc:  # kept for the assertion below
            outcome.append(exc)

    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(timeout=5)
    if opener.is_alive():  # blocked in open(): release it before failing
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
        pytest.fail("open_private waited on a FIFO for a writer or a reader")
    [refused] = outcome
    assert isinstance(refused, ConfigurationError)
    assert str(refused) == f"audit log head record {fifo} is not a regular file"
