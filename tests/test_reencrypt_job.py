"""The background re-encryption job: resumable after crashes, shared by workers, steerable."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cli_runner import repair_torn_audit_tail
from heimdall.app import build
from heimdall.errors import LifecycleError
from heimdall.ingest import ingest_lines
from heimdall.rbac import Caller
from heimdall.rotation.batch import BatchWorker as Run
from heimdall.rotation.job import (
    StopRequest,
    change_state,
    job_store,
    plan,
    run_job,
    start_job,
)
from heimdall.service import Heimdall
from heimdall.settings import Settings
from heimdall.store.jobs import Job, JobState
from heimdall.types import EncryptionMode

CALLER = Caller(actor="test:job")
BIN = Path(sys.executable).parent


def _lines(count: int) -> list[str]:
    return [
        json.dumps({"id": f"r{i}", "email": f"user{i}@example.com", "name": f"User Number{i}"})
        for i in range(count)
    ]


def _service(data_dir: Path, **options: Any) -> Heimdall:
    return build(Settings(data_dir=data_dir, audit_fsync=False, **options))


def _start(service: Heimdall) -> Job:
    job = start_job(service, caller=CALLER)
    assert job is not None
    return job


def _values(service: Heimdall) -> dict[str, str]:
    keys = [f.canonical_key for batch in service.store.iter_fields() for f in batch]
    return service.decrypt_many(keys, reason="test:verify", caller=CALLER)


@pytest.fixture
def rotated(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A data dir with 400 fields (a data key each) on version 1, the key rotated to 2."""
    service = _service(tmp_path / "data", dek_max_uses=1)
    ingest_lines(service, _lines(200), caller=CALLER, source_name="t")
    values = _values(service)
    service.rotate_keys(caller=CALLER)
    service.close()
    return tmp_path / "data", values


def test_job_brings_every_field_to_the_target_and_counts_exactly(
    rotated: tuple[Path, dict[str, str]],
) -> None:
    data_dir, values = rotated
    service = _service(data_dir)
    job = _start(service)
    assert (job.total, job.target_version, job.state) == (400, 2, JobState.RUNNING)
    done = run_job(service, job.job_id, caller=CALLER, batch_size=64)
    assert (done.state, done.completed, done.failed) == (JobState.DONE, 400, 0)
    assert [(c.key_version, c.count) for c in service.status(caller=CALLER).counts] == [(2, 400)]
    assert _values(service) == values
    service.close()


def test_dry_run_reports_and_writes_nothing(rotated: tuple[Path, dict[str, str]]) -> None:
    data_dir, _ = rotated
    service = _service(data_dir)
    before = [f.encrypted_data for b in service.store.iter_fields() for f in b]
    would = plan(service, caller=CALLER)
    assert (would.target_version, would.rewrap_fields, would.reencrypt_fields) == (2, 400, 0)
    assert [f.encrypted_data for b in service.store.iter_fields() for f in b] == before
    assert job_store(service).latest_job() is None
    service.close()


def test_a_crash_mid_batch_writes_nothing_of_that_batch_and_the_job_resumes(
    rotated: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, values = rotated
    service = _service(data_dir)
    job = _start(service)
    original = Run.rewrap
    batches = []

    def crash_on_third(self: Run, fields: list[Any], sink: Any) -> None:
        batches.append(len(fields))
        original(self, fields, sink)
        if len(batches) == 3:
            raise RuntimeError("worker died")  # after computing, before the commit

    monkeypatch.setattr(Run, "rewrap", crash_on_third)
    with pytest.raises(RuntimeError):
        run_job(service, job.job_id, caller=CALLER, batch_size=50)
    half = job_store(service).get_job(job.job_id)
    assert half is not None and half.completed == 100  # two batches committed, the third not
    assert service.store.count_fields(key_version_below=2) == 300
    monkeypatch.setattr(Run, "rewrap", original)
    done = run_job(service, job.job_id, caller=CALLER, batch_size=50)
    assert (done.state, done.completed) == (JobState.DONE, 400)
    assert _values(service) == values
    service.close()


def test_pause_resume_and_cancel(rotated: tuple[Path, dict[str, str]]) -> None:
    data_dir, _ = rotated
    service = _service(data_dir)
    job = _start(service)
    assert (
        change_state(service, job.job_id, JobState.PAUSED, caller=CALLER).state is JobState.PAUSED
    )
    paused = run_job(service, job.job_id, caller=CALLER)
    assert (paused.state, paused.completed) == (JobState.PAUSED, 0)
    change_state(service, job.job_id, JobState.RUNNING, caller=CALLER)
    change_state(service, job.job_id, JobState.CANCELLED, caller=CALLER)
    with pytest.raises(LifecycleError):
        change_state(service, job.job_id, JobState.RUNNING, caller=CALLER)
    assert run_job(service, job.job_id, caller=CALLER).completed == 0
    events = [json.loads(line) for line in (data_dir / "audit.log").read_text().splitlines()]
    steering = [e["operation"].split()[0] for e in events if e["event_type"] == "job.reencrypt"]
    assert steering[-4:] == ["paused", "running", "cancelled", "running"]
    service.close()


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update({"HMD_DATA_DIR": str(data_dir), "HMD_AUDIT_FSYNC": "false"})
    return env


def _rewraps(data_dir: Path) -> list[dict[str, Any]]:
    """The successful crypto.rewrap events of fields, as the audit trail has them."""
    events = [json.loads(line) for line in (data_dir / "audit.log").read_text().splitlines()]
    return [
        e
        for e in events
        if e["event_type"] == "crypto.rewrap"
        and e.get("field_identifier")
        and e["result"] == "success"
    ]


def test_worker_killed_at_five_random_points_finishes_exactly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    service = _service(data_dir, dek_max_uses=1)
    ingest_lines(service, _lines(1500), caller=CALLER, source_name="t")
    values = _values(service)
    service.rotate_keys(caller=CALLER)
    job = _start(service)
    service.close()
    worker = [str(BIN / "heimdall"), "reencrypt", "--batch-size", "20", "--interval", "0.05"]
    rng = random.Random(7)  # noqa: S311 - when to kill, not a secret
    kills = 0
    # Five SIGKILLs at least, and more while none has got as far as its first batch (a loaded
    # machine may take longer than the first kill to start the command).
    while kills < 5 or (kills < 10 and not _rewraps(data_dir)):
        process = subprocess.Popen(
            worker, env=_env(data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.6, 1.4))
        process.send_signal(signal.SIGKILL)
        process.wait()
        repair_torn_audit_tail(_env(data_dir))
        kills += 1
    finish = subprocess.run(worker, env=_env(data_dir), capture_output=True, text=True, check=False)
    assert finish.returncode == 0, finish.stderr
    service = _service(data_dir)
    final = job_store(service).get_job(job.job_id)
    assert final is not None
    assert (final.state, final.completed, final.total, final.failed) == (
        JobState.DONE,
        3000,
        3000,
        0,
    )
    # Killed workers did part of the work before the last one finished it.
    assert len({e["request_id"] for e in _rewraps(data_dir)}) > 1
    assert service.store.count_fields(key_version_below=2) == 0
    assert _values(service) == values
    service.close()


def test_two_workers_side_by_side_never_do_the_same_field(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    service = _service(data_dir, dek_max_uses=1)
    ingest_lines(service, _lines(600), caller=CALLER, source_name="t")
    service.rotate_keys(caller=CALLER)
    job = _start(service)
    service.close()
    worker = [str(BIN / "heimdall"), "reencrypt", "run", "--batch-size", "25", "--interval", "0.05"]
    processes = [
        subprocess.Popen(worker, env=_env(data_dir), stdout=subprocess.DEVNULL) for _ in range(2)
    ]
    for process in processes:
        process.wait(timeout=120)
        assert process.returncode == 0
    rewraps = _rewraps(data_dir)
    per_field = Counter(e["field_identifier"] for e in rewraps)
    assert len(per_field) == 1200 and set(per_field.values()) == {1}  # each field exactly once
    assert len({e["request_id"] for e in rewraps}) == 2  # and both workers did some of them
    service = _service(data_dir)
    final = job_store(service).get_job(job.job_id)
    assert final is not None and (final.completed, final.state) == (1200, JobState.DONE)
    service.close()


def test_threads_of_one_run_do_each_field_once(rotated: tuple[Path, dict[str, str]]) -> None:
    data_dir, values = rotated
    service = _service(data_dir)
    job = _start(service)
    done = run_job(service, job.job_id, caller=CALLER, batch_size=16, workers=3)
    assert (done.state, done.completed, done.failed) == (JobState.DONE, 400, 0)
    per_field = Counter(e["field_identifier"] for e in _rewraps(data_dir))
    assert len(per_field) == 400 and set(per_field.values()) == {1}
    assert _values(service) == values
    service.close()


def test_an_error_in_one_thread_stops_the_others_and_is_raised(
    rotated: tuple[Path, dict[str, str]],
) -> None:
    data_dir, values = rotated
    service = _service(data_dir)
    job = _start(service)
    batches: list[int] = []

    def progress(claimed: int) -> None:
        batches.append(claimed)
        if len(batches) == 2:
            raise RuntimeError("worker interrupted")

    with pytest.raises(RuntimeError, match="worker interrupted"):
        run_job(service, job.job_id, caller=CALLER, batch_size=16, workers=3, progress=progress)
    stopped = job_store(service).get_job(job.job_id)
    assert stopped is not None and stopped.state is JobState.RUNNING
    assert stopped.completed == 16 * len(batches) < 400  # each thread ends its batch, no more
    done = run_job(service, job.job_id, caller=CALLER, batch_size=16, workers=3)
    assert (done.state, done.completed) == (JobState.DONE, 400)
    per_field = Counter(e["field_identifier"] for e in _rewraps(data_dir))
    assert len(per_field) == 400 and set(per_field.values()) == {1}
    assert _values(service) == values
    service.close()


def test_workers_started_together_join_one_job(
    rotated: tuple[Path, dict[str, str]],
) -> None:
    data_dir, _ = rotated
    services = [_service(data_dir), _service(data_dir)]
    start = threading.Barrier(2, timeout=30)
    got: dict[int, str] = {}

    def begin(index: int) -> None:
        start.wait()
        got[index] = _start(services[index]).job_id

    threads = [threading.Thread(target=begin, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for service in services:
        service.close()

    assert len(got) == 2 and got[0] == got[1]
    lines = (data_dir / "audit.log").read_text().splitlines()
    starts = [e for e in map(json.loads, lines) if e.get("operation") == f"start {got[0]}"]
    assert len(starts) == 1


def test_nothing_to_do_starts_no_job(tmp_path: Path) -> None:
    service = _service(tmp_path / "data")
    ingest_lines(service, _lines(5), caller=CALLER, source_name="t")
    assert start_job(service, caller=CALLER) is None
    assert job_store(service).latest_job() is None
    service.close()


def test_status_shows_total_completed_failed_and_rate(
    rotated: tuple[Path, dict[str, str]],
) -> None:
    data_dir, _ = rotated
    worker = subprocess.run(
        [str(BIN / "heimdall"), "reencrypt"],
        env=_env(data_dir),
        capture_output=True,
        text=True,
        check=False,
    )
    assert worker.returncode == 0, worker.stderr
    status = subprocess.run(
        [str(BIN / "heimdall"), "reencrypt", "status", "--json"],
        env=_env(data_dir),
        capture_output=True,
        text=True,
        check=False,
    )
    body = json.loads(status.stdout)
    assert (body["state"], body["total"], body["completed"], body["failed"]) == (
        "done",
        400,
        400,
        0,
    )
    assert body["rate_per_second"] > 0


# -- the pause between batches ----------------------------------------------------------------


def _timed(data_dir: Path, *args: str, **env: str) -> float:
    """Run ``heimdall *args`` to the end of its job; the seconds its summary says it took."""
    result = subprocess.run(
        [str(BIN / "heimdall"), *args],
        env={**_env(data_dir), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = re.search(r" in (\d+\.\d+) s: job \S+ done, ", result.stdout)
    assert summary is not None, result.stdout
    return float(summary.group(1))


def _interval_in_config_file(directory: Path, seconds: str) -> dict[str, str]:
    config = directory / "heimdall.toml"
    config.write_text(f"[key_rotation]\nreencrypt_interval_seconds = {seconds}\n")
    config.chmod(0o600)
    return {"HMD_CONFIG": str(config)}


@pytest.mark.parametrize(
    ("command", "where"),
    [
        (("reencrypt",), "environment"),
        (("reencrypt",), "config file"),
        (("reencrypt", "run"), "environment"),
    ],
    ids=["reencrypt-environment", "reencrypt-config-file", "reencrypt-run-environment"],
)
def test_reencrypt_pauses_the_configured_interval_between_batches(
    rotated: tuple[Path, dict[str, str]], tmp_path: Path, command: tuple[str, ...], where: str
) -> None:
    data_dir, values = rotated
    if command[-1] == "run":  # it joins the active job
        service = _service(data_dir)
        _start(service)
        service.close()
    interval = (
        {"HMD_REENCRYPT_INTERVAL_SECONDS": "1"}
        if where == "environment"
        else _interval_in_config_file(tmp_path, "1")
    )
    # 400 fields in batches of 150 on one thread: 150 and 150, each followed by a pause of a
    # second, then the last 100.
    seconds = _timed(data_dir, *command, "--batch-size", "150", "--workers", "1", **interval)
    assert seconds >= 1.95
    service = _service(data_dir)
    assert _values(service) == values
    service.close()


def test_migrate_start_pauses_the_configured_interval_between_batches(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    master_key = base64.b64encode(os.urandom(32)).decode()
    legacy = _service(data_dir, encryption_mode=EncryptionMode.LEGACY, master_key=master_key)
    ingest_lines(legacy, _lines(100), caller=CALLER, source_name="t")  # 200 legacy fields
    legacy.close()
    seconds = _timed(
        data_dir,
        "migrate",
        "start",
        HMD_MASTER_KEY=master_key,
        HMD_REENCRYPT_INTERVAL_SECONDS="1",
        HMD_REENCRYPT_BATCH_SIZE="80",
        HMD_REENCRYPT_WORKERS="1",
    )
    assert seconds >= 1.95  # 80, a pause, 80, a pause, then the last 40


def test_the_interval_option_overrides_the_setting(
    rotated: tuple[Path, dict[str, str]],
) -> None:
    data_dir, _ = rotated
    seconds = _timed(
        data_dir,
        *("reencrypt", "--batch-size", "150", "--workers", "1", "--interval", "0"),
        HMD_REENCRYPT_INTERVAL_SECONDS="10",
    )
    assert seconds < 5


def test_a_job_of_one_batch_does_not_wait_the_interval(
    rotated: tuple[Path, dict[str, str]],
) -> None:
    data_dir, _ = rotated
    seconds = _timed(
        data_dir, "reencrypt", "--batch-size", "1000", HMD_REENCRYPT_INTERVAL_SECONDS="10"
    )
    assert seconds < 5


@pytest.mark.parametrize(
    ("batch_size", "workers"),
    # One thread, one short batch; or two threads, the first pausing after its full batch of
    # 300 while the second drains the queue with the last 100, which ends that pause.
    [(1000, 1), (300, 2)],
    ids=["one-thread", "two-threads"],
)
def test_no_thread_pauses_once_a_batch_has_drained_the_queue(
    rotated: tuple[Path, dict[str, str]], batch_size: int, workers: int
) -> None:
    data_dir, _ = rotated
    service = _service(data_dir)
    job = _start(service)
    began = time.monotonic()
    done = run_job(
        service,
        job.job_id,
        caller=CALLER,
        batch_size=batch_size,
        interval_seconds=10,
        workers=workers,
    )
    assert time.monotonic() - began < 5
    assert (done.state, done.completed) == (JobState.DONE, 400)
    service.close()


def test_a_stop_request_ends_every_thread_after_its_batch_and_the_job_resumes(
    rotated: tuple[Path, dict[str, str]],
) -> None:
    data_dir, values = rotated
    service = _service(data_dir)
    job = _start(service)
    stop = StopRequest()
    batches: list[int] = []
    finals: list[Job] = []

    def work() -> None:
        finals.append(
            run_job(
                service,
                job.job_id,
                caller=CALLER,
                batch_size=16,
                interval_seconds=30,
                workers=3,
                progress=batches.append,
                stop=stop,
            )
        )

    thread = threading.Thread(target=work)
    thread.start()
    deadline = time.monotonic() + 30
    while not batches:
        assert time.monotonic() < deadline, "the first batch never committed"
        time.sleep(0.01)
    stop.set()  # the threads are pausing 30 s between batches: they must not wait that out
    thread.join(timeout=5)
    assert not thread.is_alive()
    [stopped] = finals
    # Each thread ends the batch it has claimed, and claims no other.
    assert stopped.state is JobState.RUNNING
    assert stopped.completed == 16 * len(batches) and len(batches) <= 3
    done = run_job(service, job.job_id, caller=CALLER, batch_size=16, workers=3)
    assert (done.state, done.completed) == (JobState.DONE, 400)
    per_field = Counter(e["field_identifier"] for e in _rewraps(data_dir))
    assert len(per_field) == 400 and set(per_field.values()) == {1}
    assert _values(service) == values
    service.close()
