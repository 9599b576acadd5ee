"""API rows: ``heimdall serve`` on loopback, driven over HTTP from this process.

For each key provider (the local keyring; Vault / OpenBao Transit on a throwaway dev server, see
bench/vault.py, when ``bao`` is there) the rows start ``heimdall serve`` as a subprocess on a
free 127.0.0.1 port with a fresh data dir (SQLite, the audit log with fsync on, as deployed), make
a heimdall-app service token as ``heimdall tokens create`` does, and time requests made with httpx
(keep-alive connections, JSON bodies). Every figure is heimdall plus HTTP plus the client, all
on this machine's CPUs; the server is stopped by pid when the rows are done (SIGTERM, SIGKILL
after a grace period; on Linux the kernel kills it if the bench dies).

* ``api/ingest-local``: ``POST /v1/records`` of 1,000 synthetic records per request (seven
  encrypted fields each, all unique); fields/s.
* ``api/decrypt-local`` and ``api/decrypt-vault``: ``POST /v1/decrypt`` of 1,000 canonical keys
  per request, one client; fields/s.
* ``api/decrypt-1-16-clients``: ``POST /v1/decrypt`` of one key per request from 16 clients at
  once (local keyring): requests/s in the table, p50 and p99 latency in the notes.
* ``api/floor-empty-route-16-clients``: the same requests from the same clients to a route of
  the same shape that does nothing (bench/api_floor.py), served as heimdall serve serves: what
  the framework, the clients and this machine allow before heimdall does any work.

Targets: decrypt through the API >= 50,000 fields/s on the local keyring, >= 20,000 on Vault;
single-key latency p99 <= 10 ms at 16 clients (printed in the notes, met or MISSED).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import ingest, processes
from bench.report import Result, Row
from bench.timing import Run, Stopwatch, measure
from heimdall.rbac import Role
from heimdall.store.sqlite import SqliteStore
from heimdall.tokens import ServiceTokens

__all__ = ["ApiOutcome", "run_rows"]

BATCH = 1000
CLIENTS = 16
STARTUP_TIMEOUT = 30.0
HEIMDALL = Path(sys.executable).parent / "heimdall"

INGEST = Row(
    "api/ingest-local",
    f"POST /v1/records through heimdall serve (local keyring, SQLite, audit fsync), {BATCH:,} "
    f"records per request; fields = records x {len(ingest.ENCRYPT_FIELDS)} encrypt fields",
)
DECRYPT_LOCAL_TARGET, DECRYPT_VAULT_TARGET = 50_000, 20_000
LATENCY_P99_TARGET_MS = 10.0
DECRYPT_LOCAL = Row(
    "api/decrypt-local",
    f"POST /v1/decrypt of {BATCH:,} canonical keys per request, one client, local keyring",
    DECRYPT_LOCAL_TARGET,
)
DECRYPT_VAULT = Row(
    "api/decrypt-vault",
    "as api/decrypt-local on Vault Transit (pattern A, the OpenBao dev server)",
    DECRYPT_VAULT_TARGET,
)
LATENCY = Row(
    "api/decrypt-1-16-clients",
    f"POST /v1/decrypt of one key per request, {CLIENTS} clients at once, local keyring; "
    f"figures are requests/s (latency in the notes, target p99 <= {LATENCY_P99_TARGET_MS:g} ms)",
)
FLOOR = Row(
    "api/floor-empty-route-16-clients",
    f"the requests of api/decrypt-1-16-clients from the same {CLIENTS} clients to a route of "
    "the same shape that does nothing (bench/api_floor.py: FastAPI on uvicorn as heimdall "
    "serve runs it); figures are requests/s (latency in the notes)",
)


@dataclass(frozen=True, slots=True)
class Sizes:
    records: int  # per ingest run
    decrypt_fields: int  # per decrypt run
    latency_requests: int  # per latency run
    vault_records: int  # ingested (untimed) for the Vault decrypt row
    repetitions: int
    warmups: int


FULL = Sizes(10_000, 20_000, 4_000, 3_000, repetitions=3, warmups=1)
QUICK = Sizes(200, 500, 96, 100, repetitions=1, warmups=0)


@dataclass
class ApiOutcome:
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: bool = False


class ServerStartError(Exception):
    pass


@dataclass
class Server:
    url: str
    token: str


def _env(data_dir: Path, port: int, extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update({"HMD_DATA_DIR": str(data_dir), "HMD_API_LISTEN": f"127.0.0.1:{port}", **extra})
    return env


@contextlib.contextmanager
def _serve(extra: Mapping[str, str]) -> Iterator[Server]:
    """``heimdall serve`` on a fresh data dir and a free port, with a heimdall-app token."""
    with tempfile.TemporaryDirectory(prefix="heimdall-bench-api-") as tmp:
        data_dir = Path(tmp) / "data"
        env = _env(data_dir, processes.free_port(), extra)
        # As `heimdall tokens create` makes it, in this process before the server opens the
        # store (a process holds one store of a SQLite file at a time: see heimdall.api.app).
        store = SqliteStore(data_dir / "heimdall.db")
        try:
            token, _ = ServiceTokens(store).create(
                "bench", Role.APP, expires_in=None, created_by="bench"
            )
        finally:
            store.close()
        url = f"http://{env['HMD_API_LISTEN']}"
        with _running([str(HEIMDALL), "serve"], env, Path(tmp) / "serve.log", url):
            yield Server(url, token)


@contextlib.contextmanager
def _floor() -> Iterator[Server]:
    """The empty route of bench/api_floor.py, served as ``heimdall serve`` serves."""
    port = processes.free_port()
    argv = [sys.executable, "-m", "uvicorn", "bench.api_floor:app"]
    argv += ["--host", processes.LOOPBACK, "--port", str(port), "--http", "h11"]
    argv += ["--loop", "uvloop", "--no-server-header"]
    root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    with tempfile.TemporaryDirectory(prefix="heimdall-bench-floor-") as tmp:
        url = f"http://{processes.LOOPBACK}:{port}"
        with _running(argv, env, Path(tmp) / "floor.log", url, ready="/v1/decrypt"):
            yield Server(url, "floor")


@contextlib.contextmanager
def _running(
    argv: list[str], env: Mapping[str, str], log: Path, url: str, *, ready: str = "/healthz"
) -> Iterator[None]:
    """*argv* as a server process until the block ends (SIGTERM, SIGKILL after a grace period;
    on Linux the kernel kills it if the bench dies); its output goes to *log*."""
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603 - our own argument list, no shell
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=processes.die_with_parent(),  # noqa: PLW1509 - only calls prctl
        )
    try:
        _wait(proc, url, log, ready)
        yield
    finally:
        processes.stop(proc, signal.SIGTERM, 10.0)


def _wait(proc: subprocess.Popen[bytes], url: str, log: Path, ready: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if processes.has_exited(proc):
            break
        with contextlib.suppress(httpx.HTTPError):
            # Any answer at all: the floor's route answers a GET with 405.
            if httpx.get(f"{url}{ready}", timeout=2, trust_env=False).status_code in (200, 405):
                return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:]
    raise ServerStartError(f"{Path(log).stem} did not start: {tail}")


def _client(server: Server) -> httpx.Client:
    return httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {server.token}"},
        timeout=120,
        trust_env=False,
    )


def _records(start: int, count: int) -> list[dict[str, object]]:
    return [json.loads(line) for line in ingest.synthetic_lines(start + count)[start:]]


class Ingester:
    """Each run ingests records no earlier run did (nothing is deduplicated); their canonical
    keys are kept for the decrypt rows."""

    def __init__(self, server: Server, records: int) -> None:
        self.server = server
        self.records = records
        self.next = 0
        self.keys: list[str] = []

    def __call__(self) -> Run:
        batches = [
            _records(self.next + n, min(BATCH, self.records - n))
            for n in range(0, self.records, BATCH)
        ]
        self.next += self.records
        with _client(self.server) as client, Stopwatch() as clock:
            for batch in batches:
                answer = client.post("/v1/records", json={"records": batch})
                answer.raise_for_status()
                for item in answer.json()["results"]:
                    self.keys.extend(item["canonical_keys"].values())
        return clock.run()


def _decrypt_run(server: Server, keys: list[str]) -> Run:
    with _client(server) as client, Stopwatch() as clock:
        for start in range(0, len(keys), BATCH):
            answer = client.post(
                "/v1/decrypt", json={"keys": keys[start : start + BATCH], "reason": "bench"}
            )
            answer.raise_for_status()
    return clock.run()


class LatencyRun:
    """Single-key decrypts from CLIENTS threads; every request's latency is kept."""

    def __init__(self, server: Server, keys: list[str], requests: int) -> None:
        self.server = server
        self.keys = keys
        self.requests = requests
        self.latencies: list[float] = []

    def __call__(self) -> Run:
        per_client = self.requests // CLIENTS

        def work(number: int) -> list[float]:
            seen = []
            with _client(self.server) as client:
                for n in range(per_client):
                    key = self.keys[(number * per_client + n) % len(self.keys)]
                    started = time.perf_counter()
                    answer = client.post("/v1/decrypt", json={"keys": [key], "reason": "bench"})
                    seen.append(time.perf_counter() - started)
                    answer.raise_for_status()
            return seen

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool, Stopwatch() as clock:
            for latencies in pool.map(work, range(CLIENTS)):
                self.latencies.extend(latencies)
        return clock.run()


def _local_rows(sizes: Sizes, outcome: ApiOutcome) -> list[str]:
    with _serve({}) as server:
        ingester = Ingester(server, sizes.records)
        m = measure(
            INGEST.id,
            ingester,
            fields_per_run=sizes.records * len(ingest.ENCRYPT_FIELDS),
            repetitions=sizes.repetitions,
            warmups=sizes.warmups,
        )
        outcome.results.append(Result(INGEST, m))
        keys = (ingester.keys * (sizes.decrypt_fields // len(ingester.keys) + 1))[
            : sizes.decrypt_fields
        ]
        m = measure(
            DECRYPT_LOCAL.id,
            lambda: _decrypt_run(server, keys),
            fields_per_run=len(keys),
            repetitions=sizes.repetitions,
            warmups=sizes.warmups,
        )
        outcome.results.append(Result(DECRYPT_LOCAL, m))
        notes = [_latency_row(LATENCY, server, ingester.keys, sizes, outcome, target=True)]
    with _floor() as floor:
        notes.append(_latency_row(FLOOR, floor, ingester.keys, sizes, outcome, target=False))
    return notes


def _latency_row(
    row: Row, server: Server, keys: list[str], sizes: Sizes, outcome: ApiOutcome, *, target: bool
) -> str:
    """*row* measured with LatencyRun against *server*, its result added to *outcome*; its note."""
    run = LatencyRun(server, keys, sizes.latency_requests)
    m = measure(
        row.id,
        run,
        fields_per_run=sizes.latency_requests // CLIENTS * CLIENTS,
        repetitions=sizes.repetitions,
        warmups=sizes.warmups,
    )
    outcome.results.append(Result(row, m))
    return _latency_note(row, run, m.fields_per_run * sizes.repetitions, target=target)


def _latency_note(row: Row, run: LatencyRun, timed: int, *, target: bool) -> str:
    """p50 and p99 of the timed requests of *run* (the warm-up's are left out)."""
    cuts = statistics.quantiles(run.latencies[-timed:], n=100)
    p50, p99 = cuts[49] * 1000, cuts[98] * 1000
    verdict = ""
    if target:
        met = "met" if p99 <= LATENCY_P99_TARGET_MS else "MISSED"
        verdict = f" (target p99 <= {LATENCY_P99_TARGET_MS:g} ms: {met})"
    return (
        f"- {row.id}: latency p50 {p50:.1f} ms, p99 {p99:.1f} ms{verdict} over {timed:,} "
        f"requests ({CLIENTS} clients, keep-alive)"
    )


def _vault_rows(sizes: Sizes, outcome: ApiOutcome) -> None:
    from bench import vault  # noqa: PLC0415 - needs the optional vault extra

    binary = vault.bao_binary()
    if binary is None:
        outcome.notes.append("api/decrypt-vault skipped: bao not found")
        return
    with vault.dev_server(binary) as bao:
        env = {
            "HMD_KMS_PROVIDER": "vault",
            "HMD_KMS_KEY_NAME": vault.KEY_NAME,
            "HMD_VAULT_ADDR": bao.addr,
            "HMD_VAULT_TOKEN": bao.token,
        }
        with _serve(env) as server:
            ingester = Ingester(server, sizes.vault_records)
            ingester()
            keys = (ingester.keys * (sizes.decrypt_fields // len(ingester.keys) + 1))[
                : sizes.decrypt_fields
            ]
            m = measure(
                DECRYPT_VAULT.id,
                lambda: _decrypt_run(server, keys),
                fields_per_run=len(keys),
                repetitions=sizes.repetitions,
                warmups=sizes.warmups,
            )
            outcome.results.append(Result(DECRYPT_VAULT, m))


def run_rows(*, quick: bool) -> ApiOutcome:
    """The API rows; a server that does not start fails them (a missing ``bao`` skips Vault's)."""
    sizes = QUICK if quick else FULL
    outcome = ApiOutcome()
    try:
        with processes.sigterm_unwinds():
            latency_notes = _local_rows(sizes, outcome)
            _vault_rows(sizes, outcome)
    except (ServerStartError, httpx.HTTPError) as exc:
        message = f"api rows failed: {exc}"
        print(message, file=sys.stderr, flush=True)
        outcome.notes.append(message)
        outcome.failed = True
        return outcome
    outcome.notes[:0] = [
        "API rows: heimdall serve on 127.0.0.1 (uvicorn, one process), driven by httpx clients "
        "in the bench process on the same CPUs; audit log fsynced per request.",
        *latency_notes,
    ]
    return outcome
