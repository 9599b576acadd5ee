"""heimdall on Apache AGE (HMD_STORE=age), end to end: settings, the command line, the tour, an
application reading the graph with its own Cypher, and a re-encryption worker SIGKILLed mid-job.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cli_runner import (
    PEOPLE_FILE,
    REPO,
    assert_one_line_error,
    clean_environ,
    repair_torn_audit_tail,
)
from heimdall.app import build
from heimdall.envelope import EncryptionContext, parse
from heimdall.ingest import ingest_lines
from heimdall.rbac import Caller
from heimdall.rotation.job import job_store, start_job
from heimdall.service import FIELD_LABEL, Heimdall
from heimdall.settings import Settings, StoreKind
from heimdall.store.age import AgeStore
from heimdall.store.jobs import JobState
from test_store_age import age_connect, cypher

BIN = Path(sys.executable).parent
CALLER = Caller(actor="test:age")
TIMEOUT = 300


def _env(tmp_path: Path, dsn: str | None, **more: str) -> dict[str, str]:
    env = clean_environ()
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env.update({"HMD_DATA_DIR": str(tmp_path / "data"), "HMD_AUDIT_FSYNC": "false"})
    env["HMD_STORE"] = "age"
    if dsn is not None:
        env["HMD_POSTGRES_DSN"] = dsn
    env.update(more)
    return env


def _heimdall(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "heimdall"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def _service(tmp_path: Path, dsn: str, **options: Any) -> Heimdall:
    return build(
        Settings(
            data_dir=tmp_path / "data",
            store=StoreKind.AGE,
            postgres_dsn=dsn,
            audit_fsync=False,
            **options,
        )
    )


# -- settings (no server needed) -----------------------------------------------------------------


def test_the_store_and_graph_are_read_from_the_environment() -> None:
    settings = Settings.from_env({"HMD_STORE": "age", "HMD_AGE_GRAPH": "crm_graph"})

    assert (settings.store, settings.age_graph) == (StoreKind.AGE, "crm_graph")
    assert Settings.from_env({}).age_graph == "heimdall"


def test_age_without_a_dsn_is_a_one_line_error(tmp_path: Path) -> None:
    result = _heimdall(_env(tmp_path, None), "status")

    assert assert_one_line_error(result) == "error: HMD_STORE=age needs HMD_POSTGRES_DSN"
    assert result.returncode == 1


@pytest.mark.parametrize("graph", ["Heimdall", "crm-graph", "pg_crm", "ag_catalog", "x", "a$b"])
def test_a_graph_name_age_could_not_take_as_a_literal_is_refused(
    tmp_path: Path, graph: str
) -> None:
    # Refused before anything connects: nothing listens on port 9.
    env = _env(tmp_path, "host=127.0.0.1 port=9 dbname=x", HMD_AGE_GRAPH=graph)

    line = assert_one_line_error(_heimdall(env, "status"))

    assert line.startswith(f"error: HMD_AGE_GRAPH={graph!r} must be 3-63 characters")


# -- the command line and the tour ---------------------------------------------------------------


def test_ingest_rotate_reencrypt_and_decrypt_on_age(tmp_path: Path, age_store_dsn: str) -> None:
    people = tmp_path / "people.jsonl"
    people.write_text(
        "".join(json.dumps({"id": f"p{i}", "email": f"p{i}@example.com"}) + "\n" for i in range(60))
    )
    env = _env(tmp_path, age_store_dsn)
    for args in (("ingest", str(people)), ("keys", "rotate"), ("reencrypt",)):
        result = _heimdall(env, *args)
        assert result.returncode == 0, result.stderr
    status = json.loads(_heimdall(env, "status", "--json").stdout)
    assert status["fields"] == [
        {"encryption_version": "kms_v1", "key_name": "heimdall-pii", "key_version": 2, "count": 60}
    ]
    found = json.loads(_heimdall(env, "lookup", "email", "p7@example.com", "--json").stdout)
    decrypted = _heimdall(env, "decrypt", found["canonical_key"], "--reason", "test:age")
    assert decrypted.stdout == "p7@example.com\n"
    assert age_store_dsn not in (tmp_path / "data" / "audit.log").read_text()


def _tour(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        check=False,
    )


def test_the_tour_runs_on_age(tmp_path: Path, age_store_dsn: str) -> None:
    env = _env(tmp_path, age_store_dsn, HMD_DATA_DIR=str(tmp_path / "demo"))

    result = _tour(env)

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    first = json.loads(PEOPLE_FILE.read_text(encoding="utf-8").splitlines()[0])["email"]
    assert first in result.stdout.splitlines()  # the decrypted value, on its own line
    assert "audit trail intact" in result.stdout
    store = AgeStore(age_store_dsn, pool_size=1)
    try:
        counts = store.field_counts()
    finally:
        store.close()
    # Every field of the tour is in the graph, under the KMS key's latest version.
    assert [(c.encryption_version, c.key_version) for c in counts] == [("kms_v1", 2)]
    assert sum(c.count for c in counts) > 300


def test_the_tour_refuses_a_store_that_holds_fields_already(
    tmp_path: Path, age_store_dsn: str
) -> None:
    env = _env(tmp_path, age_store_dsn)
    lines = PEOPLE_FILE.read_text(encoding="utf-8").splitlines()[:3]
    (tmp_path / "some.jsonl").write_text("\n".join(lines) + "\n")
    assert _heimdall(env, "ingest", str(tmp_path / "some.jsonl")).returncode == 0

    result = _tour({**env, "HMD_DATA_DIR": str(tmp_path / "demo")})

    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: the HMD_STORE=age store already holds")


def _encrypted(output: str) -> int:
    """The new values an ingest reports: "... (N new values encrypted, ...)"."""
    found = re.search(r"\(([0-9,]+) new values encrypted", output)
    assert found is not None, output
    return int(found.group(1).replace(",", ""))


def test_two_ingests_of_the_same_file_at_once_leave_one_field_value_per_value(
    tmp_path: Path, age_store_dsn: str
) -> None:
    env = _env(tmp_path, age_store_dsn)
    first = tmp_path / "first.jsonl"
    first.write_text(PEOPLE_FILE.read_text(encoding="utf-8").splitlines()[0] + "\n")
    # The keyring and the blind-index key exist before the race, as in any deployment.
    started = _heimdall(env, "ingest", str(first))
    assert started.returncode == 0, started.stderr
    command = [str(BIN / "heimdall"), "ingest", str(PEOPLE_FILE), "--batch-size", "20"]
    processes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=TIMEOUT) for process in processes]

    assert [process.returncode for process in processes] == [0, 0], outputs
    with age_connect(age_store_dsn) as conn:
        fields = cypher(conn, "MATCH (fv:FieldValue) RETURN count(fv)")[0][0]
        keys = cypher(conn, "MATCH (fv:FieldValue) RETURN count(DISTINCT fv.canonical_key)")[0][0]
    assert fields == keys
    # Each value was created once, by whichever ingest stored it first.
    assert fields == _encrypted(started.stdout) + sum(_encrypted(out) for out, _ in outputs)


# -- an application reading the graph ------------------------------------------------------------


def test_an_applications_cypher_query_reads_the_envelope_heimdall_wrote_and_it_decrypts(
    tmp_path: Path, age_store_dsn: str
) -> None:
    people = [json.loads(line) for line in PEOPLE_FILE.read_text().splitlines()[:20]]
    service = _service(tmp_path, age_store_dsn)
    try:
        ingest_lines(
            service,
            [json.dumps(p) + "\n" for p in people],
            caller=CALLER,
            source_name="crm",
        )
        email = people[0]["email"]
        canonical_key = service.lookup("email", email, caller=CALLER).canonical_key

        # The application's query, as the issue writes it, on a connection of its own.
        with age_connect(age_store_dsn) as conn:
            rows = cypher(
                conn,
                "MATCH (fv:FieldValue {canonical_key: $k}) RETURN fv.encrypted_data",
                {"k": canonical_key},
            )
        assert len(rows) == 1
        envelope_text = rows[0][0]
        assert parse(envelope_text).encryption_version == "kms_v1"
        context = EncryptionContext(FIELD_LABEL, canonical_key, "email")
        cipher = service.router.reader("kms_v1")
        assert cipher.decrypt(envelope_text, context) == email.encode()
    finally:
        service.close()


# -- a worker SIGKILLed mid-job ------------------------------------------------------------------


def _rewraps(data_dir: Path) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in (data_dir / "audit.log").read_text().splitlines()]
    return [
        e
        for e in events
        if e["event_type"] == "crypto.rewrap"
        and e.get("field_identifier")
        and e["result"] == "success"
    ]


def test_a_sigkilled_reencryption_on_age_resumes_and_every_field_decrypts(
    tmp_path: Path, age_store_dsn: str
) -> None:
    lines = [
        json.dumps({"id": f"r{i}", "email": f"user{i}@example.com", "name": f"User Number{i}"})
        for i in range(1000)
    ]
    service = _service(tmp_path, age_store_dsn, dek_max_uses=1)
    ingest_lines(service, lines, caller=CALLER, source_name="t")
    keys = [f.canonical_key for batch in service.store.iter_fields() for f in batch]
    values = service.decrypt_many(keys, reason="test:before", caller=CALLER)
    service.rotate_keys(caller=CALLER)
    job = start_job(service, caller=CALLER)
    assert job is not None and job.total == 2000
    service.close()
    env = _env(tmp_path, age_store_dsn)
    worker = [str(BIN / "heimdall"), "reencrypt", "--batch-size", "20", "--interval", "0.05"]
    rng = random.Random(13)  # noqa: S311 - when to kill, not a secret
    kills = 0
    while kills < 3 or (kills < 8 and not _rewraps(tmp_path / "data")):
        process = subprocess.Popen(
            worker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(1.0, 2.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        repair_torn_audit_tail(env)
    finish = _heimdall(env, "reencrypt", "--batch-size", "200", "--interval", "0")
    assert finish.returncode == 0, finish.stderr

    service = _service(tmp_path, age_store_dsn)
    try:
        final = job_store(service).get_job(job.job_id)
        assert final is not None
        assert (final.state, final.completed, final.total, final.failed) == (
            JobState.DONE,
            2000,
            2000,
            0,
        )
        # Killed workers committed part of the work before the last one finished it.
        assert len({e["request_id"] for e in _rewraps(tmp_path / "data")}) > 1
        assert service.store.count_fields(key_version_below=2) == 0
        assert service.decrypt_many(keys, reason="test:after", caller=CALLER) == values
    finally:
        service.close()
