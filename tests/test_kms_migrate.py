"""Moving a deployment between key providers: fields under the local keyring, OpenBao and AWS
KMS (moto) in one store at once, and `heimdall kms migrate` from Vault to AWS on PostgreSQL,
killed and resumed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from aws_server import DUMMY_SECRET_KEY, MotoServer, sdk_environment
from cli_runner import repair_torn_audit_tail
from heimdall.app import build
from heimdall.envelope import parse
from heimdall.errors import ConfigurationError
from heimdall.ingest import ingest_lines
from heimdall.kms.vault_config import VaultSettings
from heimdall.rbac import Caller
from heimdall.rotation.job import job_store
from heimdall.service import Heimdall
from heimdall.settings import Settings, StoreKind
from heimdall.store.jobs import JobKind, JobState
from vault_server import BaoServer

CALLER = Caller(actor="test:kms-migrate")
BIN = Path(sys.executable).parent
RECORDS = 5_000  # two encrypted fields each


def _lines(count: int, offset: int = 0) -> list[str]:
    return [
        json.dumps({"id": f"r{i}", "email": f"user{i}@example.com", "ssn": f"900-{i:07d}"}) + "\n"
        for i in range(offset, offset + count)
    ]


def _values(service: Heimdall, every: int = 1) -> dict[str, str]:
    keys = [f.canonical_key for b in service.store.iter_fields(batch_size=5000) for f in b]
    return service.decrypt_many(keys[::every], reason="test:verify", caller=CALLER)


def _done(service: Heimdall) -> int:
    """Fields the active job has completed (0 without one)."""
    job = job_store(service).active_job()
    return job.completed if job else 0


def _vault(server: BaoServer, key: str) -> VaultSettings:
    return VaultSettings(addresses=(server.addr,), token=server.root_token, key_name=key)


# -- three providers in one store -------------------------------------------------------------


def test_a_store_holding_local_vault_and_aws_fields_decrypts_them_all(
    tmp_path: Path, bao: BaoServer, transit_key: str, moto: MotoServer, aws_key: str
) -> None:
    data_dir = tmp_path / "data"
    common: dict[str, Any] = {"data_dir": data_dir, "audit_fsync": False}
    written: dict[str, str] = {}
    stages = [
        Settings(**common),
        Settings(
            **common,
            kms_provider="vault",
            kms_read_providers=("local",),
            kms_key_name=transit_key,
            vault=_vault(bao, transit_key),
        ),
        Settings(
            **common,
            kms_provider="aws",
            kms_read_providers=("vault", "local"),
            kms_key_name=aws_key,
            aws=moto.settings(aws_key),
            vault=_vault(bao, transit_key),
        ),
    ]
    for number, settings in enumerate(stages):
        service = build(settings)
        try:
            ingest_lines(service, _lines(10, 10 * number), caller=CALLER, source_name="t")
            values = _values(service)
            assert written.items() <= values.items()  # what earlier stages wrote still reads
            written = values
            names = service.store.key_names()
        finally:
            service.close()
    assert names == sorted([f"aws:alias/{aws_key}", "heimdall-pii", f"transit/{transit_key}"])
    assert len(written) == 60
    # Without the reader a key needs, the store is refused, naming the key and the setting.
    with pytest.raises(ConfigurationError, match=rf"20 fields under the key transit/{transit_key}"):
        build(replace(stages[2], kms_read_providers=("local",)))


# -- `heimdall kms migrate` from Vault to AWS on PostgreSQL ------------------------------------


def _env(
    tmp_path: Path,
    *,
    dsn: str,
    bao: BaoServer,
    transit_key: str,
    moto: MotoServer,
    aws_key: str,
    **extra: str,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HMD_", "AWS_"))}
    env.update(sdk_environment(tmp_path, moto))
    env.update(
        {
            "HMD_DATA_DIR": str(tmp_path / "data"),
            "HMD_AUDIT_FSYNC": "false",
            "HMD_REENCRYPT_INTERVAL_SECONDS": "0",
            "HMD_STORE": "postgres",
            "HMD_POSTGRES_DSN": dsn,
            "HMD_KMS_PROVIDER": "aws",
            "HMD_KMS_KEY_NAME": aws_key,
            "HMD_AWS_ENDPOINT_URL": moto.url,
            "HMD_KMS_READ_PROVIDERS": "vault",
            "HMD_VAULT_ADDR": bao.addr,
            "HMD_VAULT_TOKEN": bao.root_token,
            "HMD_VAULT_KEY_NAME": transit_key,
            **extra,
        }
    )
    return env


@pytest.fixture
def moving_env(  # noqa: PLR0917 - the servers and keys a move between providers needs
    tmp_path: Path,
    postgres_store_dsn: str,
    bao: BaoServer,
    transit_key: str,
    moto: MotoServer,
    aws_key: str,
) -> dict[str, str]:
    """The CLI's environment for a store on PostgreSQL moving from Vault to AWS."""
    return _env(
        tmp_path,
        dsn=postgres_store_dsn,
        bao=bao,
        transit_key=transit_key,
        moto=moto,
        aws_key=aws_key,
    )


def _heimdall(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "heimdall"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_kms_migrate_from_vault_to_aws_survives_three_sigkills_and_leaves_nothing_behind(  # noqa: PLR0917
    tmp_path: Path,
    postgres_store_dsn: str,
    bao: BaoServer,
    transit_key: str,
    aws_key: str,
    moving_env: dict[str, str],
) -> None:
    on_vault = build(
        Settings(
            data_dir=tmp_path / "data",
            audit_fsync=False,
            store=StoreKind.POSTGRES,
            postgres_dsn=postgres_store_dsn,
            kms_provider="vault",
            kms_key_name=transit_key,
            vault=_vault(bao, transit_key),
            dek_max_uses=100,  # a hundred data keys: each moved once, from Vault to AWS
        )
    )
    ingest_lines(on_vault, _lines(RECORDS), caller=CALLER, source_name="t", batch_size=2000)
    expected = _values(on_vault, every=97)
    ciphertexts = {
        f.canonical_key: parse(f.encrypted_data).ciphertext
        for b in on_vault.store.iter_fields(batch_size=5000)
        for f in b
    }
    on_vault.close()
    env = moving_env
    # Before the move, the AWS settings alone cannot open the store: Vault still holds keys.
    alone = {k: v for k, v in env.items() if k != "HMD_KMS_READ_PROVIDERS"}
    refused = _heimdall(alone, "status")
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "HMD_KMS_READ_PROVIDERS" in refused.stderr
    dry = _heimdall(env, "kms", "migrate", "--to", "aws", "--dry-run")
    assert f"{2 * RECORDS:,} fields would move to the key aws:alias/{aws_key}" in dry.stdout

    moving = build(Settings.from_env(env))
    command = [str(BIN / "heimdall"), "kms", "migrate", "--to", "aws", "--batch-size", "50"]
    command += ["--interval", "0.1"]
    rng = random.Random(5)  # noqa: S311 - when to kill, not a secret
    kills = 0
    # Three SIGKILLs at least, and more while none has got as far as its first batch (a
    # loaded machine may take seconds to start the command).
    while kills < 3 or (kills < 8 and not _done(moving)):
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(1.5, 3.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        repair_torn_audit_tail(env)
        kills += 1
        # Every field decrypts at every moment: under Vault or under AWS, whichever it is now.
        assert _values(moving, every=97) == expected
    job = job_store(moving).active_job()
    assert job is not None and job.kind is JobKind.KMS_MIGRATION
    assert 0 < job.completed < 2 * RECORDS  # the killed ones did some of it, not all
    status = json.loads(_heimdall(env, "reencrypt", "status", "--json").stdout)
    assert (status["kind"], status["target_key"]) == ("kms-migration", f"aws:alias/{aws_key}")

    finish = _heimdall(env, *command[1:])

    assert finish.returncode == 0, finish.stderr
    vouched = f"a checkpoint now vouches for the checkpoints made with transit/{transit_key}-audit"
    assert vouched in finish.stdout
    again = _heimdall(env, *command[1:])  # nothing of Vault's since: nothing to vouch for
    assert again.returncode == 0, again.stderr
    assert "nothing to move" in again.stdout and "vouches" not in again.stdout
    # Once vouched for, Vault's checkpoints need Vault no more, even while it is still named.
    refused = _heimdall({**env, "HMD_VAULT_TOKEN": "s.not-a-token"}, *command[1:])
    assert refused.returncode == 0, refused.stderr
    assert refused.stderr == "" and "vouches" not in refused.stdout
    checked_anyway = _heimdall({**env, "HMD_VAULT_TOKEN": "s.not-a-token"}, "audit", "verify")
    assert checked_anyway.returncode == 0, checked_anyway.stderr
    assert "s.not-a-token" not in checked_anyway.stdout + checked_anyway.stderr
    final = job_store(moving).get_job(job.job_id)
    assert final is not None
    assert (final.state, final.completed, final.total, final.failed) == (
        JobState.DONE,
        2 * RECORDS,
        2 * RECORDS,
        0,
    )
    assert moving.store.key_names() == [f"aws:alias/{aws_key}"]
    assert {
        f.canonical_key: parse(f.encrypted_data).ciphertext
        for b in moving.store.iter_fields(batch_size=5000)
        for f in b
    } == ciphertexts  # only the data keys moved
    moving.close()
    verified = _heimdall(env, "migrate", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "0 fields under another KMS key" in verified.stdout
    # Only now can Vault's settings go: AWS alone reads every field and finds them by value.
    no_vault = {k: v for k, v in alone.items() if not k.startswith("HMD_VAULT_")}
    after = build(Settings.from_env(no_vault))
    try:
        assert _values(after, every=97) == expected
        assert after.lookup("email", "user3@example.com", caller=CALLER).found
    finally:
        after.close()
    # The trail holds checkpoints of both key services: with both configured, each is checked
    # with its own key; without Vault, the move's last checkpoint vouches for Vault's.
    checked = _heimdall(env, "audit", "verify")
    assert checked.returncode == 0, checked.stderr
    assert f"with transit/{transit_key}-audit and aws:alias/{aws_key}-audit" in checked.stdout
    without = _heimdall(no_vault, "audit", "verify")
    assert without.returncode == 0, without.stderr
    assert f"verified with aws:alias/{aws_key}-audit\n" in without.stdout
    assert f"made with transit/{transit_key}-audit w" in without.stdout
    assert "not checked here" in without.stdout
    assert "a later checkpoint vouches for the trail before it" in without.stdout
    trail = (tmp_path / "data" / "audit.log").read_text()
    for secret in (DUMMY_SECRET_KEY, bao.root_token):
        assert secret not in trail and secret not in finish.stdout + finish.stderr
    assert '"operation":"start ' in trail and '"operation":"done ' in trail


def test_kms_migrate_names_what_to_set_when_the_target_is_not_the_provider(
    bao: BaoServer, moving_env: dict[str, str]
) -> None:
    env = moving_env

    wrong = _heimdall(env, "kms", "migrate", "--to", "vault")
    unknown = _heimdall(env, "kms", "migrate", "--to", "nowhere")
    same = _heimdall({**env, "HMD_KMS_READ_PROVIDERS": "aws"}, "status")

    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1
    assert "set HMD_KMS_PROVIDER=vault" in wrong.stderr
    assert unknown.returncode == 1 and "is not one of" in unknown.stderr
    assert same.returncode == 1 and "already names" in same.stderr
    for result in (wrong, unknown, same):
        assert "Traceback" not in result.stderr
        assert bao.root_token not in result.stderr


def test_kms_check_checks_the_provider_written_to_and_each_one_only_read(
    moving_env: dict[str, str],
) -> None:
    env = moving_env

    checked = _heimdall(env, "kms", "check")
    broken = _heimdall({**env, "HMD_VAULT_TOKEN": "s.not-a-token"}, "kms", "check")

    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert any(line.startswith("ok   round trip") for line in lines)
    assert any(line.startswith("ok   vault (read only): ") for line in lines)
    assert not any("vault (read only): round trip" in line for line in lines)
    assert broken.returncode == 1
    assert any(line.startswith("FAIL vault (read only): ") for line in broken.stdout.splitlines())
    assert "s.not-a-token" not in broken.stdout + broken.stderr
