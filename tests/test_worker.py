"""The ``heimdall worker`` loop: scheduled rotation, the re-encryption job, metrics, stopping."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from heimdall import metrics
from heimdall.app import build
from heimdall.errors import ConfigurationError
from heimdall.ingest import IngestReport
from heimdall.kms.base import KeyState
from heimdall.rbac import Caller
from heimdall.rotation.job import change_state, job_store, start_job
from heimdall.rotation.lifecycle import retire
from heimdall.rotation.worker import ROTATION_CLAIM_META, Worker
from heimdall.service import Heimdall
from heimdall.settings import Settings
from heimdall.store.jobs import JobState

DAY = 86_400.0
TIMEOUT = 120
HEIMDALL = shutil.which("heimdall", path=str(Path(sys.executable).parent))

Setup = Callable[..., tuple[Heimdall, Settings]]
Ingest = Callable[..., IngestReport]
AuditReader = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def setup(data_dir: Path) -> Iterator[Setup]:
    """``setup(**settings)`` -> a service on the test's data dir and the settings it was built
    from (audit without fsync, no pause between job batches unless asked)."""
    built: list[Heimdall] = []

    def make(**options: Any) -> tuple[Heimdall, Settings]:
        options.setdefault("reencrypt_interval_seconds", 0)
        settings = Settings(data_dir=data_dir, audit_fsync=False, **options)
        service = build(settings)
        built.append(service)
        return service, settings

    yield make
    for service in built:
        service.close()


def created_at(service: Heimdall) -> float:
    """When the latest master key version was created (seconds since the epoch)."""
    description = service.kms.describe()
    latest = next(v for v in description.versions if v.version == description.latest_version)
    return datetime.fromisoformat(latest.created_at).timestamp()


def versions(service: Heimdall, caller: Caller) -> dict[int, int]:
    return {c.key_version: c.count for c in service.status(caller=caller).counts}


def rotations(audit_events: AuditReader) -> list[dict[str, Any]]:
    return [e for e in audit_events() if e["event_type"] == "key.rotate"]


def test_once_after_the_cadence_rotates_and_reencrypts_every_field(
    setup: Setup,
    ingest: Ingest,
    caller: Caller,
    people: list[dict[str, Any]],
    audit_events: AuditReader,
) -> None:
    service, settings = setup()
    fields = ingest(service, people).fields_encrypted
    clock = created_at(service) + 91 * DAY
    worker = Worker(service, settings, caller=Caller(actor="worker:test"), clock=lambda: clock)
    worker.run(once=True)

    assert service.kms.describe().latest_version == 2
    assert versions(service, caller) == {2: fields}
    job = job_store(service).latest_job()
    assert job is not None
    assert (job.state, job.target_version, job.total, job.completed, job.failed) == (
        JobState.DONE,
        2,
        fields,
        fields,
        0,
    )
    [event] = rotations(audit_events)
    assert (event["actor"], event["result"], event["key_version"]) == ("worker:test", "success", 2)
    assert service.decrypt_many(
        [f.canonical_key for batch in service.store.iter_fields() for f in batch][:5],
        reason="test:worker",
        caller=caller,
    )


def test_once_before_the_cadence_does_nothing(
    setup: Setup,
    ingest: Ingest,
    caller: Caller,
    people: list[dict[str, Any]],
    audit_events: AuditReader,
) -> None:
    service, settings = setup()
    fields = ingest(service, people).fields_encrypted
    clock = created_at(service) + 10 * DAY
    report = Worker(service, settings, caller=caller, clock=lambda: clock).cycle()

    assert (report.rotated_to, report.started, report.worked) == (None, None, None)
    assert service.kms.describe().latest_version == 1
    assert versions(service, caller) == {1: fields}
    assert job_store(service).latest_job() is None
    assert rotations(audit_events) == []


def test_rotation_disabled_never_rotates(
    setup: Setup,
    ingest: Ingest,
    caller: Caller,
    people: list[dict[str, Any]],
    audit_events: AuditReader,
) -> None:
    service, settings = setup(rotation_enabled=False)
    fields = ingest(service, people).fields_encrypted
    clock = created_at(service) + 91 * DAY
    Worker(service, settings, caller=caller, clock=lambda: clock).run(once=True)

    assert service.kms.describe().latest_version == 1
    assert versions(service, caller) == {1: fields}
    assert job_store(service).latest_job() is None
    assert rotations(audit_events) == []


def test_a_rotation_made_elsewhere_gets_its_job_once(
    setup: Setup, ingest: Ingest, caller: Caller, people: list[dict[str, Any]]
) -> None:
    service, settings = setup()
    fields = ingest(service, people).fields_encrypted
    service.rotate_keys(caller=caller)  # e.g. `heimdall keys rotate`, or in Vault itself
    worker = Worker(service, settings, caller=caller)
    first = worker.cycle()
    assert first.started is not None and first.worked is not None
    assert (first.worked.state, first.worked.completed) == (JobState.DONE, fields)
    assert versions(service, caller) == {2: fields}
    assert worker.cycle().started is None


def test_a_job_an_operator_cancelled_is_not_restarted(
    setup: Setup, ingest: Ingest, caller: Caller, people: list[dict[str, Any]]
) -> None:
    service, settings = setup()
    fields = ingest(service, people).fields_encrypted
    service.rotate_keys(caller=caller)
    job = start_job(service, caller=caller)
    assert job is not None
    change_state(service, job.job_id, JobState.CANCELLED, caller=caller)

    report = Worker(service, settings, caller=caller).cycle()
    assert (report.started, report.worked) == (None, None)
    assert versions(service, caller) == {1: fields}


def test_auto_reencrypt_off_rotates_but_starts_no_job(
    setup: Setup, ingest: Ingest, caller: Caller, people: list[dict[str, Any]]
) -> None:
    service, settings = setup(auto_reencrypt=False)
    fields = ingest(service, people).fields_encrypted
    clock = created_at(service) + 91 * DAY
    report = Worker(service, settings, caller=caller, clock=lambda: clock).cycle()
    assert (report.rotated_to, report.started) == (2, None)
    assert versions(service, caller) == {1: fields}


@pytest.mark.parametrize(("claimed_ago", "rotates"), [(60.0, False), (7_200.0, True)])
def test_a_rotation_another_worker_claimed_is_left_to_it_unless_stale(
    setup: Setup, caller: Caller, claimed_ago: float, rotates: bool
) -> None:
    service, settings = setup()
    now = created_at(service) + 91 * DAY
    service.store.set_meta(f"{ROTATION_CLAIM_META}1", f"{now - claimed_ago:.0f}")
    report = Worker(service, settings, caller=caller, clock=lambda: now).cycle()
    assert (report.rotated_to == 2) is rotates
    assert service.kms.describe().latest_version == (2 if rotates else 1)


def test_a_retired_version_is_disabled_after_its_grace_period(
    setup: Setup, ingest: Ingest, caller: Caller, people: list[dict[str, Any]]
) -> None:
    service, settings = setup(grace_period_days=30)
    ingest(service, people)
    service.rotate_keys(caller=caller)
    Worker(service, settings, caller=caller).cycle()  # re-encrypts everything to version 2
    retired = time.time()
    retire(service, 1, caller=caller, clock=lambda: retired)

    soon = Worker(service, settings, caller=caller, clock=lambda: retired + 29 * DAY).cycle()
    assert soon.disabled_below is None
    later = Worker(service, settings, caller=caller, clock=lambda: retired + 31 * DAY).cycle()
    assert later.disabled_below == 2
    states = {v.version: v.state for v in service.kms.describe().versions}
    assert states == {1: KeyState.DISABLED, 2: KeyState.ACTIVE}


def test_stop_ends_the_worker_between_batches_and_the_job_resumes(
    setup: Setup, ingest: Ingest, caller: Caller, people: list[dict[str, Any]]
) -> None:
    service, settings = setup(
        reencrypt_batch_size=10, reencrypt_interval_seconds=30, reencrypt_workers=2
    )
    fields = ingest(service, people).fields_encrypted
    service.rotate_keys(caller=caller)
    worker = Worker(service, settings, caller=caller)
    thread = threading.Thread(target=worker.run)
    thread.start()
    jobs = job_store(service)
    deadline = time.monotonic() + 30
    while (job := jobs.latest_job()) is None or job.completed == 0:
        assert time.monotonic() < deadline, "the first batch never committed"
        time.sleep(0.02)
    worker.stop()  # the worker is pausing 30 s between batches: it must not wait that out
    thread.join(timeout=5)
    assert not thread.is_alive()
    job = jobs.latest_job()
    assert job is not None
    # Each of the two threads stops in the pause after its batch: one batch each at most.
    assert job.state is JobState.RUNNING and job.completed in {10, 20}

    service2, settings2 = setup(reencrypt_batch_size=10)
    Worker(service2, settings2, caller=caller).run(once=True)
    job = jobs.latest_job()
    assert job is not None
    assert (job.state, job.completed) == (JobState.DONE, fields)


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a loopback http URL
        return int(response.status), response.read().decode()


def test_metrics_are_served_on_loopback(
    setup: Setup, ingest: Ingest, caller: Caller, people: list[dict[str, Any]]
) -> None:
    service, settings = setup()
    ingest(service, people)
    Worker(service, settings, caller=caller).run(once=True)
    server = metrics.serve(0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        status, body = _get(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200
    assert 'heimdall_reencryption_progress{status="total"}' in body
    assert 'heimdall_fields_by_key_version{encryption_version="kms_v1",key_version="1"}' in body


def test_a_port_in_use_is_a_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            metrics.serve(port)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _cli_env(data_dir: Path) -> dict[str, str]:
    """The environment without the caller's HMD_* variables, on *data_dir*."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("HMD_")}
    env.update(
        HMD_DATA_DIR=str(data_dir), HMD_AUDIT_FSYNC="false", HMD_REENCRYPT_INTERVAL_SECONDS="0"
    )
    return env


@pytest.mark.skipif(HEIMDALL is None, reason="the heimdall console script is missing")
def test_heimdall_worker_once_reencrypts_after_a_rotation(
    setup: Setup, ingest: Ingest, caller: Caller, people: list[dict[str, Any]], data_dir: Path
) -> None:
    service, _ = setup()
    fields = ingest(service, people).fields_encrypted
    service.rotate_keys(caller=caller)
    assert HEIMDALL is not None
    result = subprocess.run(
        [HEIMDALL, "worker", "--once", "--actor", "ops:worker"],
        env=_cli_env(data_dir),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "started re-encryption job" in result.stderr
    assert f"{fields:,} of {fields:,} fields done" in result.stderr
    assert versions(service, caller) == {2: fields}


@pytest.mark.skipif(HEIMDALL is None, reason="the heimdall console script is missing")
def test_heimdall_worker_serves_metrics_and_stops_on_sigterm(tmp_path: Path) -> None:
    assert HEIMDALL is not None
    port = _free_port()
    process = subprocess.Popen(
        [HEIMDALL, "worker", "--metrics-port", str(port)],
        env=_cli_env(tmp_path / "data"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert process.poll() is None, process.communicate()
            try:
                status, body = _get(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                assert time.monotonic() < deadline, "the worker never served /metrics"
                time.sleep(0.1)
        assert status == 200
        assert "heimdall_reencryption_progress" in body
        os.kill(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert f"serving metrics on http://127.0.0.1:{port}/metrics" in stderr
    assert "SIGTERM received" in stderr and "worker stopped" in stderr


@pytest.mark.skipif(HEIMDALL is None, reason="the heimdall console script is missing")
def test_heimdall_worker_with_a_port_in_use_fails_in_one_line(tmp_path: Path) -> None:
    assert HEIMDALL is not None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [HEIMDALL, "worker", "--once", "--metrics-port", str(port)],
            env=_cli_env(tmp_path / "data"),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: cannot serve metrics on 127.0.0.1:{port}: Address already in use"]
