"""The files heimdall keeps: opened only when nobody else could have planted or swapped them.

The data dir holds the keyring (every master key, with the local provider), the database and the
audit trail. Another user who can write to that directory, or to the directory of a file named
by HMD_KEYRING_PATH, HMD_SQLITE_PATH or HMD_AUDIT_LOG, could plant a symlink that makes heimdall
overwrite a file of its choosing, or plant a keyring and a database of their own that heimdall
would then fill with values they can read. So, as OpenSSH does for its keys:

* the data dir must not be a symlink, must belong to the user running heimdall and must not be
  writable by group or others;
* the directory holding any other file heimdall opens must belong to that user or to root and
  must not be writable by group or others, unless it is sticky (``/tmp``: others may add names,
  but never rename or remove ours);
* the file itself is opened relative to the directory already checked (``openat``), never
  through a symlink (``O_NOFOLLOW``), created with ``O_EXCL`` when new (so a name planted in the
  meantime fails instead of being written through), and refused if it is not a regular file,
  does not belong to the running user, or is writable by group or others.

Every refusal is one :class:`ConfigurationError` naming the path and the fix.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from heimdall.errors import ConfigurationError

__all__ = ["ensure_private_dir", "open_private", "require_owned_config"]

_GROUP_OR_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH
_GROUP_OR_OTHER_ANY = 0o077


def ensure_private_dir(path: Path, what: str = "data dir") -> None:
    """Create *path* (mode 0700) if it does not exist, then refuse it unless it is a real
    directory of the running user that group and others cannot write to."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        try:
            path.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass  # made by another process in the meantime: checked below like any other
        except OSError as exc:
            raise ConfigurationError(f"{what} {path} cannot be created: {exc.strerror}") from None
        info = os.lstat(path)
    except OSError as exc:
        raise ConfigurationError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ConfigurationError(
            f"{what} {path} is a symbolic link; heimdall follows none: use the real directory"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigurationError(f"{what} {path} is not a directory")
    _check_owner(info, f"{what} {path}", allow_root=False)
    _check_not_writable(info, f"{what} {path}", path)


def open_private(path: Path, flags: int, *, what: str, secret: bool = False) -> int:
    """Open *path* with *flags* (``os.O_*``) as the module docstring says; a file descriptor.

    With ``os.O_CREAT`` in *flags* a missing file is created with mode 0600 and ``O_EXCL``; an
    existing one is opened without creating (with ``os.O_EXCL`` too, it is FileExistsError).
    *secret* (the keyring) also refuses a file that group or others may read. OSErrors other
    than these refusals propagate to the caller, who knows what the file is for.
    """
    path = Path(path)
    dir_fd = _open_parent(path.parent, what, path)
    try:
        fd = _open_in(dir_fd, path, flags, what)
        try:
            _check_file(os.fstat(fd), path, what, secret=secret)
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        os.close(dir_fd)


def require_owned_config(path: Path) -> None:
    """Refuse a config file that someone other than root or the running user could change.

    The file may be reached through symlinks (Kubernetes mounts config maps that way); the file
    they lead to and its directory are what is checked.
    """
    try:
        real = path.resolve(strict=True)
        info = os.stat(real)
        directory = os.stat(real.parent)
    except OSError as exc:
        raise ConfigurationError(f"config file {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigurationError(f"config file {path} is not a regular file")
    subject = f"config file {path}" + (f" ({real})" if real != path else "")
    _check_owner(info, subject, allow_root=True)
    _check_not_writable(info, subject, real)
    parent = f"directory {real.parent} (of config file {path})"
    _check_owner(directory, parent, allow_root=True)
    if not directory.st_mode & stat.S_ISVTX:
        _check_not_writable(directory, parent, real.parent)


def _open_in(dir_fd: int, path: Path, flags: int, what: str) -> int:
    name = path.name
    base = (flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)) | os.O_NOFOLLOW | os.O_CLOEXEC
    if flags & os.O_CREAT:
        try:
            return os.open(name, base | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # Opened below as an existing file, and checked like one.
    try:
        fd = os.open(name, base, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigurationError(
                f"{what} {path} is a symbolic link; heimdall follows none: use the real file"
            ) from None
        raise
    if flags & os.O_TRUNC:
        os.ftruncate(fd, 0)  # only now that the file is known to be ours
    return fd


def _open_parent(directory: Path, what: str, path: Path) -> int:
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigurationError(
            f"the directory of {what} {path} cannot be opened: {exc.strerror}"
        ) from None
    try:
        info = os.fstat(dir_fd)
        subject = f"directory {directory} (of {what} {path})"
        _check_owner(info, subject, allow_root=True)
        if not info.st_mode & stat.S_ISVTX:
            _check_not_writable(info, subject, directory)
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd


def _check_file(info: os.stat_result, path: Path, what: str, *, secret: bool) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise ConfigurationError(f"{what} {path} is {kind}")
    _check_owner(info, f"{what} {path}", allow_root=False)
    mode = stat.S_IMODE(info.st_mode)
    if secret and mode & _GROUP_OR_OTHER_ANY:
        raise ConfigurationError(
            f"{what} {path} is readable by group or others (mode {mode:04o}); run: chmod 600 {path}"
        )
    _check_not_writable(info, f"{what} {path}", path)


def _check_owner(info: os.stat_result, subject: str, *, allow_root: bool) -> None:
    uid = os.geteuid()
    if info.st_uid == uid or (allow_root and info.st_uid == 0):
        return
    raise ConfigurationError(
        f"{subject} belongs to uid {info.st_uid}, not to the user running heimdall "
        f"(uid {uid}); run heimdall as its owner, or give it to this user with chown"
    )


def _check_not_writable(info: os.stat_result, subject: str, target: Path) -> None:
    mode = stat.S_IMODE(info.st_mode)
    if mode & _GROUP_OR_OTHER_WRITE:
        raise ConfigurationError(
            f"{subject} is writable by group or others (mode {mode:04o}); run: chmod go-w {target}"
        )
