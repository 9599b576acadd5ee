"""Runs the ``heimdall`` console script as a user runs it: a subprocess with a clean environment.

Every :class:`Cli` has its own HMD_DATA_DIR under the test's tmp_path and an environment without
the caller's HMD_* variables, so nothing reads or writes a real keyring. The ``cli`` fixture is
available to every test module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
HEIMDALL = shutil.which("heimdall", path=str(Path(sys.executable).parent)) or shutil.which(
    "heimdall"
)
PEOPLE_FILE = REPO / "examples" / "people.jsonl"
TIMEOUT = 120
# Rich treats these as "this is a terminal"; a test must not inherit them.
_TERMINAL_OVERRIDES = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
ANSI = re.compile(r"\x1b\[")


def repair_torn_audit_tail(env: Mapping[str, str]) -> None:
    """What an operator does after a SIGKILL that landed inside an audit append (the trail then
    refuses every operation until told): repair it, which is audited. Nothing if the kill missed
    the append; any other finding of the check fails the test."""

    def heimdall(*args: str) -> subprocess.CompletedProcess[str]:
        assert HEIMDALL is not None
        return subprocess.run(
            [HEIMDALL, "audit", "verify", *args],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    verified = heimdall()
    if verified.returncode == 0 or "the trail has no keyed checkpoint" in verified.stderr:
        return  # every process was killed before its first checkpoint: the next one adds it
    assert "--repair-torn-tail" in verified.stderr, verified.stderr  # nothing else is broken
    repaired = heimdall("--repair-torn-tail")
    assert repaired.returncode == 0, repaired.stderr


def clean_environ() -> dict[str, str]:
    """os.environ without any HMD_* variable or terminal override."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("HMD_") and name not in _TERMINAL_OVERRIDES
    }


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``error:`` line of a failed run (non-zero exit, no traceback)."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    lines = nonempty_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]


@dataclass
class Cli:
    """Runs the console script in *cwd* with one data dir and a clean environment."""

    cwd: Path
    data_dir: Path

    @property
    def env(self) -> dict[str, str]:
        env = clean_environ()
        env["HMD_DATA_DIR"] = str(self.data_dir)
        env["HMD_AUDIT_FSYNC"] = "false"
        return env

    def run(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        input_text: str | None = None,
        input_bytes: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run with *input_text* (UTF-8) or *input_bytes* on stdin (else none)."""
        assert HEIMDALL is not None
        stdin = input_text.encode() if input_text is not None else input_bytes
        result = subprocess.run(
            [HEIMDALL, *args],
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
        return subprocess.CompletedProcess(
            result.args,
            result.returncode,
            result.stdout.decode("utf-8", errors="replace"),
            result.stderr.decode("utf-8", errors="replace"),
        )

    def ok(self, *args: str, env: Mapping[str, str] | None = None) -> str:
        """stdout of a run that must succeed."""
        result = self.run(*args, env=env)
        assert result.returncode == 0, result
        assert "Traceback" not in result.stderr
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def write_jsonl(self, name: str, lines: list[str]) -> Path:
        path = self.cwd / name
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    def write_records(self, name: str, records: list[dict[str, Any]]) -> Path:
        return self.write_jsonl(name, [json.dumps(record) for record in records])

    def canonical_key(self, field: str, value: str) -> str:
        result = self.json("lookup", field, value)
        assert result["found"] is True
        key = result["canonical_key"]
        assert isinstance(key, str)
        return key


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(cwd=tmp_path, data_dir=tmp_path / "data")
