"""The files heimdall keeps: opened only when nobody else could have planted or swapped them.

The data dir holds the keyring (every master key, with the local provider), the database and the
audit trail. Another user who can write to that directory, or to the directory of a file named
by HMD_KEYRING_PATH, HMD_SQLITE_PATH or HMD_AUDIT_LOG, could plant a symlink that makes heimdall
overwrite a file of its choosing, or plant a keyring and a database of their own that heimdall
would then fill with values they can read. So, as OpenSSH does for its keys:

* the data dir must not be a symlink, must belong to the user running heimdall and must not be
  writable by group or others;
* the directory holding any other file heimdall opens must belong to that user or to root and
  must not be writable by group or others, even if it is sticky (``/tmp``): there others may
  plant the names SQLite creates beside a database (``-wal``, ``-shm``) before it does;
* a directory heimdall creates, and every missing directory above it, is made mode 0700;
* the file itself is opened relative to the directory already checked (``openat``), never
  through a symlink (``O_NOFOLLOW``), created with ``O_EXCL`` when new (so a name planted in the
  meantime fails instead of being written through), and refused if it is not a regular file,
  does not belong to the running user, or is writable by group or others.

Every refusal is one :class:`ConfigurationError` naming the path and the fix. A config file
(:func:`read_config`) may be reached through symlinks, but is checked on the descriptor it is
read through, so what is checked is what is read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from heimdall.errors import ConfigurationError

__all__ = [
    "ConfigFile",
    "check_private_file",
    "ensure_private_dir",
    "fsync_directory",
    "open_private",
    "read_config",
    "write_all",
]

_GROUP_OR_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH
_GROUP_OR_OTHER_ANY = 0o077


def ensure_private_dir(path: Path, what: str = "data dir") -> None:
    """Create *path* (mode 0700) if it does not exist, then refuse it unless it is a real
    directory of the running user that group and others cannot write to."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        try:
            _make_private_dirs(path)
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


def _make_private_dirs(path: Path) -> None:
    """Make *path* and every missing directory above it, each 0700 whatever the umask."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue  # made by another process in the meantime: checked like any other
        os.chmod(directory, 0o700)  # a umask may narrow mkdir's mode, even to nothing


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
            # A regular file: its reads and writes may block again, as the caller expects.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            if flags & os.O_TRUNC:
                os.ftruncate(fd, 0)  # only now that the file is known to be ours
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        os.close(dir_fd)


def fsync_directory(path: Path) -> None:
    """Make the names in directory *path* durable (a rename into it, a file created in it).
    OSError if it cannot be done."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_private_file(path: Path, *, what: str, create: bool = False) -> bool:
    """Check *path* as :func:`open_private` does, without opening it if it exists; whether it
    exists (it does after *create*, which makes a missing file with mode 0600).

    For files another library opens by name while this process may already have them open
    (SQLite's database, -wal and -shm files): closing any descriptor of a file drops every
    POSIX lock the process holds on it, so opening and closing one to check it would silently
    release the locks of a connection already using it. A new file is created and closed, as
    nothing can hold a lock on it yet."""
    path = Path(path)
    dir_fd = _open_parent(path.parent, what, path)
    try:
        if create:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                os.close(os.open(path.name, flags, 0o600, dir_fd=dir_fd))
                return True
            except FileExistsError:
                pass  # checked below as an existing file
        try:
            info = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(info.st_mode):
            raise ConfigurationError(
                f"{what} {path} is a symbolic link; heimdall follows none: use the real file"
            )
        _check_file(info, path, what, secret=False)
        return True
    finally:
        os.close(dir_fd)


_MAX_CONFIG_BYTES: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """A config file's bytes, and who could have changed them, taken from the one open
    descriptor they were read through (so the check and the read see the same file)."""

    path: Path
    real: Path
    data: bytes = field(repr=False)
    info: os.stat_result = field(repr=False)
    directory: os.stat_result = field(repr=False)

    def require_owned(self) -> None:
        """Refuse the file if someone other than root or the running user could change it:
        the file, or the directory it is in (reached through any symlinks, as Kubernetes
        mounts config maps)."""
        subject = f"config file {self.path}" + (f" ({self.real})" if self.real != self.path else "")
        _check_owner(self.info, subject, allow_root=True)
        _check_not_writable(self.info, subject, self.real)
        parent = f"directory {self.real.parent} (of config file {self.path})"
        _check_owner(self.directory, parent, allow_root=True)
        _check_not_writable(self.directory, parent, self.real.parent)


def read_config(path: Path) -> ConfigFile:
    """Read the config file at *path* (symlinks followed) through one descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigurationError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(f"config file {path} is not a regular file")
        real = _opened_path(fd, path)
        directory = os.stat(real.parent)
        data = os.read(fd, _MAX_CONFIG_BYTES + 1)
        if len(data) > _MAX_CONFIG_BYTES:
            raise ConfigurationError(f"config file {path} is over 1 MiB")
    except OSError as exc:
        raise ConfigurationError(f"config file {path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    return ConfigFile(path, real, data, info, directory)


def _opened_path(fd: int, path: Path) -> Path:
    """Where the file open as *fd* is (Linux knows exactly; elsewhere, the path resolved)."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return path.resolve()


def write_all(fd: int, data: bytes) -> None:
    """Write all of *data*: a short write is continued, so a full disk raises ENOSPC (or EFBIG
    past a file size limit) instead of passing unnoticed."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _open_in(dir_fd: int, path: Path, flags: int, what: str) -> int:
    name = path.name
    # O_NONBLOCK: a FIFO planted under the name would block the open itself until a writer
    # came (the file checks run only on the descriptor open returns); open_private clears it.
    base = (
        (flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
        | os.O_NOFOLLOW
        | os.O_CLOEXEC
        | os.O_NONBLOCK
    )
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
        if exc.errno == errno.ENXIO:  # a FIFO without a reader, opened to write; or a device
            raise ConfigurationError(f"{what} {path} is not a regular file") from None
        raise
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
        # Not even sticky (/tmp): SQLite creates its -wal and -shm files beside the database
        # itself, and another user can plant them first in such a directory.
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
