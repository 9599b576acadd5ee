"""The AWS rows' machinery in ``bench/``: moto_server started and stopped by pid, the SDK of
the bench pointed at it and the caller's AWS settings put back, KMS requests counted by
operation, and the ingest row's ceiling judged on every KMS request.

The rows themselves run in ``tests/test_bench_smoke.py`` (``python -m bench --quick``).
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path

import boto3
import pytest
from bench.aws import AWS_INGEST, AwsResult, AwsRun, notes
from bench.aws_rows import request_counter
from bench.aws_server import RequestCounter, moto_server, sdk_environment
from bench.timing import Measurement

from aws_server import ACCOUNT, MotoServer, require_moto_binary
from heimdall.kms.aws import AwsKms


def _refuses_connections(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "", parts.port or 80), timeout=1).close()
    except OSError:
        return True
    return False


def test_moto_server_is_stopped_by_pid_when_the_rows_fail() -> None:
    binary = require_moto_binary()

    with pytest.raises(RuntimeError, match="the rows failed"), moto_server(binary) as server:
        pid, url = server.pid, server.url
        assert server.answers()
        raise RuntimeError("the rows failed")

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: gone, not a zombie
    assert _refuses_connections(url)


def test_sdk_environment_points_the_sdk_at_moto_and_puts_the_callers_settings_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    binary = require_moto_binary()
    monkeypatch.setenv("AWS_PROFILE", "operator")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOPERATOR00000000")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "operator-config"))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    before = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}

    with moto_server(binary) as server, sdk_environment(server):
        inside = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        # Answered by moto (its account), with none of the caller's profile or credentials.
        identity = boto3.client("sts").get_caller_identity()

    assert identity["Account"] == ACCOUNT
    assert "AWS_PROFILE" not in inside
    assert inside["AWS_ENDPOINT_URL"] == server.url
    assert inside["AWS_ACCESS_KEY_ID"] != before["AWS_ACCESS_KEY_ID"]
    assert inside["AWS_EC2_METADATA_DISABLED"] == "true"
    assert {k: v for k, v in os.environ.items() if k.startswith("AWS_")} == before


def test_request_counter_counts_each_kms_request_once_by_operation(
    moto: MotoServer, aws_key: str
) -> None:
    # The test server's provider uses one client as both its retried and its one-shot client:
    # counted twice, every request would show as two.
    kms = AwsKms(moto.settings(aws_key), moto.clients())
    counter = request_counter(kms)
    before = counter.snapshot()

    data_keys = [kms.generate_data_key(f"field-{i}".encode()) for i in range(3)]
    kms.unwrap(data_keys[0].wrapped, b"field-0").wipe()
    for data_key in data_keys:
        data_key.plaintext.wipe()

    sent = dict(RequestCounter.since(before, counter.snapshot()))
    assert (sent["GenerateDataKey"], sent["Decrypt"]) == (3, 1)
    # Besides those, only the reads of the key's versions.
    assert set(sent) <= {"GenerateDataKey", "Decrypt", "ListAliases", "DescribeKey",
                         "ListResourceTags"}  # fmt: skip


def _ingest_result(*requests: tuple[str, int]) -> AwsResult:
    run = AwsRun(7.0, 6.0, sum(n for _, n in requests), tuple(requests))
    return AwsResult(AWS_INGEST, Measurement(140_000, 1, (run,)), calls_ceiling=0.2)


def test_the_ingest_ceiling_counts_every_kms_request_audit_checkpoints_included() -> None:
    data_keys = (("GenerateDataKey", 14), ("ListAliases", 8))
    without_audit = _ingest_result(*data_keys)
    with_audit = _ingest_result(*data_keys, ("GenerateMac", 140))

    lines = notes([with_audit], "moto")

    assert without_audit.ceiling_met is True
    assert with_audit.ceiling_met is False
    assert round(with_audit.kms_calls_per_1000, 3) == round(162 / 140, 3)
    assert (
        "aws KMS calls ceiling (<= 0.2 per 1,000 fields, aws/ingest) MISSED: 1.16 per 1,000, of "
        "which the audit checkpoints' GenerateMac (one event per field; see "
        "HMD_AUDIT_CHECKPOINT_EVERY and _SECONDS) 1.00 and the data keys and key reads 0.157"
    ) in lines
    assert any(
        line.startswith("- aws/ingest: KMS calls per 1,000 fields: 1.16 (162 per run of ")
        and "GenerateDataKey 14, GenerateMac 140, ListAliases 8" in line
        for line in lines
    ), lines
    assert with_audit.to_json()["kms_calls_ceiling_met"] is False
