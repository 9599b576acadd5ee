"""The audit trail's files are opened only when nobody else could have planted or swapped them.

Another user who can write to the audit log's directory could plant a symlink named like the
log or its head record and make heimdall write through it, or leave a file of their own there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from audit_tools import sample_events, write_events
from heimdall.audit import JsonlAuditLog
from heimdall.errors import AuditError, ConfigurationError

OTHER_UID = 65534
FILES = ["audit.log", "audit.log.head"]


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir(mode=0o700)
    return directory


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in FILES}


@pytest.mark.parametrize("name", FILES)
def test_a_symlink_planted_as_an_audit_file_is_refused_and_its_target_untouched(
    log_dir: Path, tmp_path: Path, name: str
) -> None:
    log = write_events(log_dir / "audit.log", 3)
    target = tmp_path / "precious.txt"
    target.write_bytes(b"not heimdall's\n")
    (log_dir / name).unlink()
    (log_dir / name).symlink_to(target)

    with pytest.raises(AuditError, match="symbolic link") as refused:
        log.write(sample_events(1))

    assert "\n" not in str(refused.value)
    assert target.read_bytes() == b"not heimdall's\n"
    assert (log_dir / name).is_symlink()


def test_a_symlink_planted_as_the_audit_log_is_refused_by_verify_and_tail(
    log_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere.log"
    write_events(target, 3)
    (log_dir / "audit.log").symlink_to(target)
    log = JsonlAuditLog(log_dir / "audit.log")

    with pytest.raises(ConfigurationError, match="symbolic link"):
        log.verify()
    with pytest.raises(ConfigurationError, match="symbolic link"):
        log.tail(1)


@pytest.mark.parametrize("name", FILES)
def test_an_audit_file_group_may_write_is_refused(log_dir: Path, name: str) -> None:
    log = write_events(log_dir / "audit.log", 3)
    (log_dir / name).chmod(0o620)
    before = _snapshot(log_dir)

    with pytest.raises(AuditError, match="writable by group or others"):
        log.write(sample_events(1))

    assert _snapshot(log_dir) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
@pytest.mark.parametrize("name", FILES)
def test_an_audit_file_of_another_user_is_refused(log_dir: Path, name: str) -> None:
    log = write_events(log_dir / "audit.log", 3)
    os.chown(log_dir / name, OTHER_UID, OTHER_UID)
    before = _snapshot(log_dir)

    with pytest.raises(AuditError, match=f"belongs to uid {OTHER_UID}"):
        log.write(sample_events(1))

    assert _snapshot(log_dir) == before


def test_a_new_audit_log_and_head_are_created_private(log_dir: Path) -> None:
    write_events(log_dir / "audit.log", 1)

    for name in FILES:
        assert (log_dir / name).stat().st_mode & 0o777 == 0o600, name
    # The head is replaced through a temporary file: none is left behind.
    assert sorted(path.name for path in log_dir.iterdir()) == FILES
