"""Vault / OpenBao Transit rows: heimdall's key provider against a real server on this machine.

:func:`dev_server` starts a throwaway OpenBao dev server (``bao server -dev``: in memory,
unsealed, a random root token) on a free 127.0.0.1 port, its output in a log file in a temp
dir, waits up to 20 s for ``/v1/sys/health``, enables ``transit/`` and creates the derived key
``heimdall-pii`` (aes256-gcm96), as ``heimdall vault bootstrap`` does. The server is stopped by
pid (SIGTERM to its process group, SIGKILL after a grace period) when the rows are done, also
on an exception, Ctrl-C or SIGTERM; on Linux the kernel kills it if the bench itself is killed.

The server shares this machine's CPUs with the bench, over loopback HTTP: every figure is
heimdall plus OpenBao on the same cores. The provider is built the way the application builds
it (``VaultSettings`` defaults for batch size and requests in flight, token auth).

Each run reports, besides its time, the HTTP requests ``VaultTransport`` sent inside the timed
block (the "KMS calls" of these rows), ``FieldCipher.kms_calls`` where a cipher is involved,
and the CPU time the OpenBao server used meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import ingest, processes
from bench.envelopes import FIELD_NAME, VERSION, Corpus
from bench.report import Result
from bench.timing import Run, Stopwatch
from heimdall.app import build
from heimdall.cipher import CachePolicy, FieldCipher
from heimdall.envelope import ALGORITHM, EncryptionContext, wrap_associated_data
from heimdall.errors import HeimdallError
from heimdall.ingest import IngestReport, ingest_lines
from heimdall.kms.base import WrappedKey
from heimdall.kms.vault import VaultTransit
from heimdall.kms.vault_config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    VaultPattern,
    VaultSettings,
)
from heimdall.rbac import Caller
from heimdall.service import FIELD_LABEL
from heimdall.settings import Settings

__all__ = [
    "KEY_NAME",
    "MOUNT",
    "DevServer",
    "Rewrapper",
    "ServerStartError",
    "VaultResult",
    "VaultRun",
    "bao_binary",
    "decrypt_run",
    "dev_server",
    "ingest_run",
    "new_transit",
    "notes",
    "seal_datakey",
    "seal_transit",
    "wrapped_data_keys",
]

MOUNT = "transit"
KEY_NAME = "heimdall-pii"
STARTUP_TIMEOUT = 20.0
STOP_GRACE = 5.0
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 20
_REPO = Path(__file__).resolve().parent.parent
# Variables that could point the server (or its token helper) somewhere else.
_SCRUBBED_ENV_PREFIXES = ("BAO_", "VAULT_")
# Loopback only: no proxy from the environment, for the setup calls here.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerStartError(RuntimeError):
    """The dev server did not come up (the message carries the tail of its log)."""


@dataclass(frozen=True, slots=True)
class VaultRun(Run):
    """A :class:`Run` whose ``kms_calls`` are the HTTP requests sent to OpenBao, plus the
    cipher's own count of provider calls and the server's CPU time during the run."""

    cipher_calls: int | None = None  # None: no FieldCipher involved
    server_cpu_seconds: float = 0.0


# -- the server ---------------------------------------------------------------------------------


def bao_binary() -> Path | None:
    """``bao`` next to the running interpreter (the venv's), in the repo's .venv, or on PATH."""
    for candidate in (Path(sys.executable).parent / "bao", _REPO / ".venv" / "bin" / "bao"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("bao")
    return Path(found) if found else None


def _free_port_pair() -> int:
    """A free loopback port whose successor is free too (a dev server's cluster port)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((processes.LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((processes.LOOPBACK, port + 1))
            except OSError:
                continue
        return port
    raise ServerStartError("no pair of adjacent free loopback ports found")


@dataclass
class DevServer:
    """One running ``bao server -dev``."""

    addr: str
    token: str
    pid: int
    log_path: Path
    proc: subprocess.Popen[bytes]

    def api(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, token: bool = True
    ) -> tuple[int, dict[str, Any]]:
        """One request to the API: (status, JSON body); status 0 when nothing answered."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - always http://127.0.0.1:<port>
            f"{self.addr}/v1/{path}", data=data, method=method
        )
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("X-Vault-Token", self.token)
        try:
            with _OPENER.open(request, timeout=3.0) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        except OSError:
            return 0, {}
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            payload = {}
        return status, payload if isinstance(payload, dict) else {}

    def require(self, method: str, path: str, body: dict[str, Any] | None, what: str) -> None:
        status, payload = self.api(method, path, body)
        if status not in (200, 204):
            raise ServerStartError(f"{what} failed: HTTP {status} {payload.get('errors', '')}")

    @property
    def running(self) -> bool:
        return not processes.has_exited(self.proc)

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (0.0 if unreadable)."""
        return processes.cpu_seconds(self.pid)

    def version(self) -> str:
        status, payload = self.api("GET", "sys/health", token=False)
        return str(payload.get("version", "unknown")) if status == 200 else "unknown"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:]) or "(the server log is empty)"

    def stop(self) -> None:
        processes.stop(self.proc, signal.SIGTERM, STOP_GRACE)


def _spawn(binary: Path, workdir: Path, token: str, port: int) -> DevServer:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
    env["HOME"] = str(workdir)  # the dev server's token helper, if any, writes ~/.vault-token
    log_path = workdir / f"bao-{port}.log"
    args = [
        str(binary),
        "server",
        "-dev",
        f"-dev-root-token-id={token}",
        f"-dev-listen-address={processes.LOOPBACK}:{port}",
        "-dev-no-store-token",
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: S603 - our own argument list, no shell
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,  # own process group: Ctrl-C reaches the bench, not bao
            preexec_fn=processes.die_with_parent(),  # noqa: PLW1509 - the child only calls prctl
        )
    return DevServer(f"http://{processes.LOOPBACK}:{port}", token, proc.pid, log_path, proc)


def _wait_until_serving(server: DevServer, deadline: float) -> None:
    """Poll sys/health until it answers 200 (active, unsealed), then until the token works."""
    for what, path, token in (
        ("sys/health to report an active node", "sys/health", False),
        ("the root token to be accepted", "auth/token/lookup-self", True),
    ):
        while server.api("GET", path, token=token)[0] != 200:
            if not server.running:
                raise ServerStartError(f"bao exited while waiting for {what}")
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"timed out after {STARTUP_TIMEOUT:.0f} s waiting for {what}"
                )
            time.sleep(0.05)


def create_key(server: DevServer, name: str) -> None:
    """A derived Transit key and its audit-checkpoint key, as ``heimdall vault bootstrap``
    creates them."""
    server.require(
        "POST",
        f"{MOUNT}/keys/{name}",
        {"type": "aes256-gcm96", "derived": True},
        f"creating transit key {name}",
    )
    server.require(
        "POST",
        f"{MOUNT}/keys/{name}-audit",
        {"type": "hmac", "key_size": 32},
        f"creating transit key {name}-audit",
    )


@contextlib.contextmanager
def dev_server(binary: Path) -> Iterator[DevServer]:
    """A running dev server with transit and the key ``heimdall-pii``; stopped on exit."""
    with (
        processes.sigterm_unwinds(),
        tempfile.TemporaryDirectory(prefix="heimdall-bench-bao-") as tmp,
    ):
        workdir = Path(tmp)
        token = f"bench-{secrets.token_hex(16)}"
        server: DevServer | None = None
        try:
            for attempt in range(1, PORT_ATTEMPTS + 1):
                server = _spawn(binary, workdir, token, _free_port_pair())
                try:
                    _wait_until_serving(server, time.monotonic() + STARTUP_TIMEOUT)
                    break
                except ServerStartError as exc:
                    server.stop()
                    # Someone took the port between our probe and the server's bind.
                    if attempt < PORT_ATTEMPTS and "address already in use" in server.log_tail():
                        continue
                    raise ServerStartError(
                        f"{exc}\n--- last lines of the bao log ---\n{server.log_tail()}"
                    ) from None
            assert server is not None
            server.require("POST", f"sys/mounts/{MOUNT}", {"type": "transit"}, "enabling transit")
            create_key(server, KEY_NAME)
            yield server
        finally:
            if server is not None:
                server.stop()


# -- the provider, as the application builds it ------------------------------------------------


def vault_settings(server: DevServer) -> VaultSettings:
    return VaultSettings(
        addresses=(server.addr,), mount=MOUNT, key_name=KEY_NAME, token=server.token
    )


def new_transit(server: DevServer) -> VaultTransit:
    return VaultTransit(vault_settings(server))


def _app_settings(server: DevServer, data_dir: Path, pattern: VaultPattern) -> Settings:
    return Settings(
        data_dir=data_dir,
        kms_provider="vault",
        kms_key_name=KEY_NAME,
        vault=vault_settings(server),
        vault_pattern=pattern,
    )


def _vault_run(
    clock: Stopwatch, http_requests: int, cipher_calls: int | None, server_cpu_seconds: float
) -> VaultRun:
    return VaultRun(
        clock.seconds, clock.cpu_seconds, http_requests, cipher_calls, server_cpu_seconds
    )


# -- ingest -------------------------------------------------------------------------------------


def _check_ingest(report: IngestReport, records: int) -> None:
    expected = records * len(ingest.ENCRYPT_FIELDS)
    if (
        report.errors
        or report.records != records
        or report.fields_encrypted != expected
        or report.fields_deduplicated
    ):
        raise AssertionError(
            f"vault ingest did not encrypt every field: {report.records} records, "
            f"{report.fields_encrypted}/{expected} fields encrypted, "
            f"{report.fields_deduplicated} deduplicated, {len(report.errors)} errors"
        )


def ingest_run(server: DevServer, pattern: VaultPattern, lines: tuple[str, ...]) -> VaultRun:
    """:func:`bench.ingest.ingest_run` with ``build(Settings(kms_provider="vault", ...))``: a
    fresh data dir (SQLite, audit log with fsync) each run, the same Transit key throughout."""
    with tempfile.TemporaryDirectory(prefix="heimdall-bench-vault-") as tmp:
        heimdall = build(_app_settings(server, Path(tmp), pattern))
        try:
            caller = Caller(actor="bench")
            # Created once per store (a data key from Transit), so made before the clock starts.
            heimdall.blind_index(caller)
            cipher = heimdall.router.writer
            transit = cipher.kms
            assert isinstance(transit, VaultTransit)
            calls, cipher_calls, server_cpu = (
                transit.transport.calls,
                cipher.kms_calls,
                server.cpu_seconds(),
            )
            with Stopwatch() as clock:
                report = ingest_lines(
                    heimdall,
                    lines,
                    caller=caller,
                    source_name="bench",
                    batch_size=ingest.BATCH_SIZE,
                )
            run = _vault_run(
                clock,
                transit.transport.calls - calls,
                cipher.kms_calls - cipher_calls,
                server.cpu_seconds() - server_cpu,
            )
        finally:
            heimdall.close()
    _check_ingest(report, len(lines))
    return run


# -- decrypt ------------------------------------------------------------------------------------


def _context(key: str) -> EncryptionContext:
    return EncryptionContext(FIELD_LABEL, key, FIELD_NAME)


def seal_datakey(transit: VaultTransit, corpus: Corpus) -> tuple[str, ...]:
    """Pattern A envelopes, default cache: data keys from Transit, values sealed locally."""
    cipher = FieldCipher(transit, VERSION, CachePolicy())
    return tuple(
        cipher.encrypt(value, _context(key)).envelope
        for value, key in zip(corpus.values, corpus.canonical_keys, strict=True)
    )


def seal_transit(transit: VaultTransit, corpus: Corpus) -> tuple[str, ...]:
    """Pattern B envelopes: Transit encrypted each value (in batch requests)."""
    cipher = FieldCipher(transit, VERSION, CachePolicy(), direct=True)
    sealed = cipher.encrypt_many(
        [
            (value, _context(key))
            for value, key in zip(corpus.values, corpus.canonical_keys, strict=True)
        ]
    )
    return tuple(field.envelope for field in sealed)


def decrypt_run(
    server: DevServer,
    transit: VaultTransit,
    corpus: Corpus,
    envelopes: tuple[str, ...],
    *,
    direct: bool,
) -> VaultRun:
    """A fresh cipher (default cache, so cold). Pattern A: ``FieldCipher.decrypt`` per field,
    each distinct data key unwrapped through Transit once. Pattern B: ``FieldCipher.decrypt_many``
    of all the fields, the values sent to Transit decrypt in batch requests."""
    cipher = FieldCipher(transit, VERSION, CachePolicy(), direct=direct)
    decrypt = cipher.decrypt
    plaintexts: list[bytes] = []
    append = plaintexts.append
    calls, server_cpu = transit.transport.calls, server.cpu_seconds()
    with Stopwatch() as clock:
        if direct:
            results = cipher.decrypt_many(
                [
                    (envelope, EncryptionContext(FIELD_LABEL, key, FIELD_NAME))
                    for envelope, key in zip(envelopes, corpus.canonical_keys, strict=True)
                ]
            )
            plaintexts = [r for r in results if isinstance(r, bytes)]
        else:
            for envelope, key in zip(envelopes, corpus.canonical_keys, strict=True):
                append(decrypt(envelope, EncryptionContext(FIELD_LABEL, key, FIELD_NAME)))
    run = _vault_run(
        clock,
        transit.transport.calls - calls,
        cipher.kms_calls,
        server.cpu_seconds() - server_cpu,
    )
    if tuple(plaintexts) != corpus.values:
        raise AssertionError("vault decrypt returned wrong plaintexts")
    return run


# -- rewrap -------------------------------------------------------------------------------------


def wrapped_data_keys(transit: VaultTransit, count: int) -> list[tuple[WrappedKey, bytes]]:
    """*count* data keys from Transit ``datakey``, each under its own associated data (as
    FieldCipher makes them: version, algorithm, a fresh dek_id); plaintexts wiped at once."""
    items = []
    for _ in range(count):
        ad = wrap_associated_data(VERSION.value, ALGORITHM, secrets.token_hex(16))
        data_key = transit.generate_data_key(ad)
        data_key.plaintext.wipe()
        items.append((data_key.wrapped, ad))
    return items


class Rewrapper:
    """One run: rotate the Transit key (untimed), then ``rewrap_many`` of the keys, timed.

    Each run rewraps what the previous run produced, so every run really moves every key to a
    new version (checked)."""

    def __init__(
        self, server: DevServer, transit: VaultTransit, items: list[tuple[WrappedKey, bytes]]
    ) -> None:
        self.server = server
        self.transit = transit
        self.items = items

    def __call__(self) -> VaultRun:
        latest = self.transit.rotate().latest_version
        items = self.items
        transport = self.transit.transport
        calls, server_cpu = transport.calls, self.server.cpu_seconds()
        with Stopwatch() as clock:
            results = self.transit.rewrap_many(items)
        run = _vault_run(
            clock, transport.calls - calls, None, self.server.cpu_seconds() - server_cpu
        )
        rewrapped: list[tuple[WrappedKey, bytes]] = []
        for (old, ad), result in zip(items, results, strict=True):
            if isinstance(result, HeimdallError):
                raise AssertionError(f"rewrap failed: {type(result).__name__}: {result}")
            if result.key_version != latest or result.key_version <= old.key_version:
                raise AssertionError(
                    f"rewrap gave version {result.key_version}, expected {latest} "
                    f"(from {old.key_version})"
                )
            rewrapped.append((result, ad))
        self.items = rewrapped
        return run


# -- reporting ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VaultResult(Result):
    """A Vault row's result: its runs are :class:`VaultRun` s, and its reference (if any) is not
    the table's Tink reference, so it travels here with its own label."""

    reference: int | None = None
    reference_label: str | None = None
    unit: str = "fields"  # what a run counts: "keys" for the rewrap row

    def _vault_runs(self) -> list[VaultRun]:
        return [run for run in self.measurement.runs if isinstance(run, VaultRun)]

    @property
    def kms_calls_per_1000_fields(self) -> float:
        """HTTP requests to OpenBao per 1,000 fields, over all timed runs."""
        m = self.measurement
        return 1000 * sum(run.kms_calls for run in m.runs) / (m.fields_per_run * len(m.runs))

    @property
    def cipher_calls_per_run(self) -> int | None:
        runs = self._vault_runs()
        return runs[-1].cipher_calls if runs else None

    @property
    def server_cpu_share(self) -> float:
        """OpenBao's CPU time over the wall time of the timed runs."""
        runs = self._vault_runs()
        wall = sum(run.seconds for run in runs)
        return sum(run.server_cpu_seconds for run in runs) / wall if wall else 0.0

    def to_json(self) -> dict[str, Any]:
        # Zero-argument super() fails in a slots dataclass (the class is recreated).
        doc = Result.to_json(self)
        doc["kms_calls_meaning"] = "HTTP requests sent to OpenBao inside the timed block"
        doc["kms_calls_per_1000_fields"] = round(self.kms_calls_per_1000_fields, 3)
        doc["unit"] = self.unit
        doc["cipher_kms_calls_per_run"] = self.cipher_calls_per_run
        doc["server_cpu_share"] = round(self.server_cpu_share, 3)
        doc["runs_server_cpu_seconds"] = [
            round(run.server_cpu_seconds, 3) for run in self._vault_runs()
        ]
        doc["reference_fields_per_s"] = self.reference
        doc["reference_label"] = self.reference_label
        return doc


def _per_1000(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2g}" if value >= 1 else f"{value:.3f}"


def notes(results: Sequence[Result], server: str) -> list[str]:
    """Lines for under the table: what the Vault rows ran against, KMS calls per 1,000 fields,
    the server's CPU share, and each row's reference."""
    vault_results = [r for r in results if isinstance(r, VaultResult)]
    if not vault_results:
        return []
    lines = [
        f"Vault rows: {server}, on 127.0.0.1 and the same CPUs as the bench; the provider as "
        "the application builds it (VaultSettings defaults: batch_input of "
        f"{DEFAULT_BATCH_SIZE}, {DEFAULT_CONCURRENCY} requests in flight). KMS calls = HTTP "
        "requests sent to OpenBao inside the timed block. CPU time / wall time above is the "
        "bench process only; OpenBao's own share is below.",
        "",
    ]
    for r in vault_results:
        m = r.measurement
        calls = sum(run.kms_calls for run in m.runs) / len(m.runs)
        cipher = r.cipher_calls_per_run
        line = (
            f"- {r.row.id}: KMS calls per 1,000 {r.unit}: {_per_1000(r.kms_calls_per_1000_fields)} "
            f"({calls:,.0f} per run of {m.fields_per_run:,} {r.unit}"
            + (f"; FieldCipher.kms_calls {cipher:,}" if cipher is not None else "")
            + f"); OpenBao CPU time / wall time: {r.server_cpu_share:.2f}"
        )
        if r.reference is not None:
            line += f"; reference: {r.reference_label}"
        lines.append(line)
    return lines
