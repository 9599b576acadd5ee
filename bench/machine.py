"""What the numbers were measured on."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sqlite3
import tempfile
from pathlib import Path

import cryptography
from cryptography.hazmat.backends.openssl import backend

__all__ = ["contention", "machine_info"]

_REPO = Path(__file__).resolve().parent.parent


def _cpuinfo() -> tuple[str, bool | None]:
    """CPU model name and whether it advertises AES-NI (None if /proc/cpuinfo is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or "unknown", None
    model = "unknown"
    aes: bool | None = None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and model == "unknown":
            model = value.strip()
        elif name in ("flags", "Features") and aes is None:
            aes = "aes" in value.split()
    return model, aes


def _nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _filesystem(path: str) -> str:
    """The mount point and type holding *path*, from /proc/mounts (longest matching prefix)."""
    try:
        mounts = Path("/proc/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return "unknown"
    real = os.path.realpath(path)
    best = ("", "unknown")
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point, fs_type = parts[1], parts[2]
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best[0]):
            best = (mount_point, fs_type)
    return f"{best[1]} (mounted at {best[0]})" if best[0] else "unknown"


def _git_commit() -> str | None:
    """HEAD's commit, read from .git without running git."""
    git = _REPO / ".git"
    try:
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        ref_file = git / ref
        if ref_file.exists():
            return ref_file.read_text(encoding="utf-8").strip()
        for line in (git / "packed-refs").read_text(encoding="utf-8").splitlines():
            commit, _, name = line.partition(" ")
            if name == ref:
                return commit
    except OSError:
        return None
    return None


def _pressure(resource: str) -> str | None:
    """The kernel's pressure stall figure "some avg10/avg60" for *resource*: the share of time
    at least one task waited for it over the last 10 s / 60 s (None without PSI)."""
    try:
        text = Path(f"/proc/pressure/{resource}").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("some "):
            fields = dict(part.split("=", 1) for part in line.split()[1:])
            return f"{fields.get('avg10', '?')}% / {fields.get('avg60', '?')}%"
    return None


def contention() -> dict[str, str | float | None]:
    """How busy the machine is right now: other work here makes the figures noisy."""
    load1, load5, _ = os.getloadavg()
    return {
        "load_average_1m_5m": f"{load1:.2f} / {load5:.2f}",
        "cpu_pressure_some_avg10_avg60": _pressure("cpu"),
        "io_pressure_some_avg10_avg60": _pressure("io"),
    }


def machine_info() -> dict[str, str | int | float | bool | None]:
    model, aes = _cpuinfo()
    tmp = tempfile.gettempdir()
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cryptography": cryptography.__version__,
        "openssl": backend.openssl_version_text(),
        "sqlite": sqlite3.sqlite_version,
        "heimdall": importlib.metadata.version("heimdall"),
        "git_commit": _git_commit(),
        "cpu_model": model,
        "cpu_aes_ni": aes,
        "nproc": _nproc(),
        "platform": platform.platform(),
        "temp_dir": tmp,
        "temp_dir_filesystem": _filesystem(tmp),
    }
