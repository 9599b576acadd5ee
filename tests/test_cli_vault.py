"""The command line on Vault / OpenBao: kms check, vault bootstrap and the tour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vault_server import BaoServer

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path, server: BaoServer, key: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HMD_", "VAULT_"))}
    env.update(
        {
            "PATH": f"{BIN}:{env.get('PATH', '')}",
            "HMD_DATA_DIR": str(tmp_path / "data"),
            "HMD_AUDIT_FSYNC": "false",
            "HMD_KMS_PROVIDER": "vault",
            "HMD_KMS_KEY_NAME": key,
            "HMD_VAULT_ADDR": server.addr,
            "HMD_VAULT_TOKEN": server.root_token,
            **extra,
        }
    )
    return env


def _heimdall(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "heimdall"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_kms_check_passes_against_a_healthy_server(
    tmp_path: Path, bao: BaoServer, transit_key: str
) -> None:
    result = _heimdall(_env(tmp_path, bao, transit_key), "kms", "check")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("connectivity", "authentication", "audit device", "key readable", "round trip"):
        assert any(line.startswith("ok") and name in line for line in lines), result.stdout
    assert bao.root_token not in result.stdout + result.stderr


def test_kms_check_fails_on_an_unreachable_address(
    tmp_path: Path, bao: BaoServer, transit_key: str
) -> None:
    env = _env(tmp_path, bao, transit_key, HMD_VAULT_ADDR=f"http://127.0.0.1:9,{bao.addr}")
    result = _heimdall(env, "kms", "check")
    assert result.returncode == 1
    assert "FAIL connectivity http://127.0.0.1:9: unreachable" in result.stdout
    assert f"ok   connectivity {bao.addr}" in result.stdout


def test_vault_bootstrap_is_idempotent(tmp_path: Path, bao: BaoServer) -> None:
    key = f"cli-bootstrap-{os.urandom(4).hex()}"
    env = _env(tmp_path, bao, key)
    first = _heimdall(env, "vault", "bootstrap")
    assert first.returncode == 0, first.stderr
    assert f"created key {key}" in first.stdout
    second = _heimdall(env, "vault", "bootstrap")
    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout
    assert bao.root_token not in first.stdout + second.stdout
    described = json.loads(_heimdall(env, "keys", "show", "--json").stdout)
    assert described["latest_version"] == 1


def test_the_tour_runs_on_vault(tmp_path: Path, bao: BaoServer, transit_key: str) -> None:
    env = _env(tmp_path, bao, transit_key)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    first = json.loads((ROOT / "examples" / "people.jsonl").read_text().splitlines()[0])
    assert first["email"] in result.stdout
    assert "provider vault" in result.stdout
    assert "audit trail intact" in result.stdout
    assert "FAIL" not in result.stdout
