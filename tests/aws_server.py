"""moto servers (an AWS emulator) on loopback for the AWS KMS provider's tests.

Loaded as a pytest plugin from ``conftest.py`` (``pytest_plugins = [..., "aws_server"]``).
Fixtures:

``moto`` (session)
    One ``moto_server`` (KMS, STS and IAM in one process, all in memory). It does not check
    credentials: any are accepted.
``moto_regions`` (session)
    A third server for several regions (moto keeps each region's state apart in one process, so
    ReplicateKey works inside it). moto 5.2.5 stores at most 36 bytes of key ID in its
    ciphertext blobs, and a multi-Region key's ID (``mrk-`` and a UUID) has 40: nothing
    encrypted under one would decrypt again, in any region. This server is moto with that field
    widened to 40 bytes (:data:`_MULTI_REGION_SERVER`); nothing else in moto changes.
    moto implements neither GetParametersForImport nor ImportKeyMaterial, and two servers share
    no state, so one server serves every region; a region goes down through a :class:`Relay`
    that is stopped, or an endpoint nobody listens on.
``moto_iam`` (session)
    A second server that enforces IAM: every request's SigV4 signature is checked against the
    IAM user or assumed role it names, and each action is allowed only by that principal's
    identity policies (moto's ``INITIAL_NO_AUTH_ACTION_COUNT``, set to 0 through
    ``/moto-api/reset-auth`` once an operator user exists). moto evaluates only a policy's
    actions: its resources must be ``*`` and it takes a condition it cannot evaluate as a deny;
    key policies and grants it does not enforce at all.
``aws_environment`` (function)
    Dummy credentials and a region in this test's environment only, every other ``AWS_*``
    variable removed, the SDK kept off the machine's AWS config files and the instance metadata
    service, and every AWS endpoint pointed at ``moto``: no request leaves the machine.
``aws_key`` (function)
    A fresh key name, bootstrapped on ``moto`` by ``heimdall.kms.aws_bootstrap`` (version 1,
    aliases, key policy, automatic rotation, the audit key).
``regions_environment`` (function)
    As ``aws_environment``, on ``moto_regions``.
``relay`` (function)
    A :class:`Relay` to ``moto_regions``: the first region's endpoint, stopped mid-test.

Every server binds to 127.0.0.1 on a free port, runs in its own process group and is stopped by
pid at teardown; ``tests/vault_server.py``'s ``atexit`` hook and ``PR_SET_PDEATHSIG`` stop what
a crashed session left behind. When ``moto_server`` is missing the fixtures skip, except under
``CI=true`` where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from heimdall.kms.aws_access import role_actions
from heimdall.kms.aws_bootstrap import bootstrap
from heimdall.kms.aws_client import AwsClients
from heimdall.kms.aws_config import AwsSettings
from heimdall.rbac import Role
from vault_server import _LIVE, _LIVE_LOCK, _die_with_parent, _free_ports, _terminate

STARTUP_TIMEOUT = 20.0
STOP_GRACE = 5.0
REGION = "eu-west-1"
REGIONS = ("us-west-2", "eu-west-1")  # of moto_regions: the first holds the primaries
ACCOUNT = "123456789012"  # moto's default account
# Dummy credentials: moto's non-enforcing server takes any. Distinctive, so a leak check can
# look for them.
DUMMY_ACCESS_KEY = "AKIAHEIMDALLDUMMY000"
DUMMY_SECRET_KEY = "heimdall-dummy-secret-key-never-real-0000"
_LOOPBACK = "127.0.0.1"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies
# moto's server with room for a multi-Region key's ID in its ciphertext blobs (see the module
# docstring); a moto that has the room already is left as it is.
_MULTI_REGION_SERVER = """
import sys
from moto.kms import utils
from moto.server import main

if utils.KEY_ID_LEN < 40:
    utils.KEY_ID_LEN = 40
    utils.HEADER_LEN = utils.KEY_ID_LEN + utils.IV_LEN + utils.TAG_LEN
    utils.CIPHERTEXT_HEADER_FORMAT = f">{utils.KEY_ID_LEN}s{utils.IV_LEN}s{utils.TAG_LEN}s"
    _unpack = utils._deserialize_ciphertext_blob

    def _deserialize(ciphertext_blob):
        ciphertext = _unpack(ciphertext_blob=ciphertext_blob)
        return ciphertext._replace(key_id=ciphertext.key_id.rstrip("\\0"))

    utils._deserialize_ciphertext_blob = _deserialize
main(sys.argv[1:])
"""


def moto_binary() -> Path | None:
    """``moto_server`` next to the running interpreter (the venv's), else the one on PATH."""
    candidate = Path(sys.executable).parent / "moto_server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("moto_server")
    return Path(found) if found else None


def require_moto_binary() -> Path:
    binary = moto_binary()
    if binary is not None:
        return binary
    reason = (
        "moto_server was not found next to the interpreter or on PATH (install the dev "
        "extras: pip install -e '.[dev]', which include moto[server])"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)


@dataclass
class MotoServer:
    """One running ``moto_server`` process."""

    url: str
    pid: int
    log_path: Path
    _proc: subprocess.Popen[bytes] = field(repr=False, compare=False)
    _made: dict[Credentials | None, AwsClients] = field(
        default_factory=dict, repr=False, compare=False
    )

    def stop(self) -> None:
        _terminate(self._proc, STOP_GRACE)

    def post(self, path: str, data: bytes) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - a loopback http:// URL
            f"{self.url}{path}",
            data=data,
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with _OPENER.open(request, timeout=5) as response:
            answer: dict[str, Any] = json.loads(response.read() or b"{}")
        return answer

    def client(
        self, service: str, credentials: Credentials | None = None, region: str = REGION
    ) -> Any:
        """A boto3 client of this server in *region*, with *credentials* (default: the dummy
        ones)."""
        credentials = credentials or Credentials(DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY)
        return boto3.Session(
            aws_access_key_id=credentials.access_key,
            aws_secret_access_key=credentials.secret_key,
            region_name=region,
        ).client(service, endpoint_url=self.url)

    def clients(self, credentials: Credentials | None = None) -> AwsClients:
        """The AWS KMS provider's clients on this server, with *credentials* (default: the
        dummy ones); made once per credentials, as boto3 clients are thread-safe and slow to
        make. They retry like the provider's own, the ``once`` client included."""
        made = self._made.get(credentials)
        if made is None:
            kms = self.client("kms", credentials)
            made = self._made[credentials] = AwsClients(
                kms=kms, once=kms, sts=self.client("sts", credentials)
            )
        return made

    def settings(self, key_name: str, **options: Any) -> AwsSettings:
        return AwsSettings(key_name=key_name, region=REGION, endpoint_url=self.url, **options)


def _answers(url: str) -> bool:
    try:
        with _OPENER.open(f"{url}/moto-api/reset-auth", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # 400 "Need to POST": it answers
    except OSError:
        return False


def start_moto(workdir: Path, *, multi_region_keys: bool = False) -> MotoServer:
    """A ``moto_server`` on loopback and a free port, answering; see the module docstring.
    *multi_region_keys*: the server of ``moto_regions``."""
    binary = require_moto_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    (port,) = _free_ports(1)
    log_path = workdir / "moto.log"
    # The server needs no credential: none of the caller's AWS_* or HMD_* variables reach it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HMD_"))}
    command = [str(binary)]
    if multi_region_keys:
        command = [sys.executable, "-c", _MULTI_REGION_SERVER]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, "-H", _LOOPBACK, "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,  # own process group: stop() signals the whole group
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - the child only calls prctl
        )
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc
    server = MotoServer(f"http://{_LOOPBACK}:{port}", proc.pid, log_path, proc)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not _answers(server.url):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            tail = log_path.read_text(errors="replace")[-2000:]
            pytest.fail(f"moto_server did not start on {server.url}:\n{tail}", pytrace=False)
        time.sleep(0.05)
    return server


@dataclass
class IamServer:
    """A moto server that enforces IAM, and the operator allowed everything on it."""

    server: MotoServer
    operator: Credentials

    def user(self, name: str, actions: frozenset[str] | set[str]) -> Credentials:
        """A new IAM user allowed exactly *actions* (on every resource); its access key."""
        iam = self.server.client("iam", self.operator)
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="actions", PolicyDocument=_policy(actions))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return Credentials(key["AccessKeyId"], key["SecretAccessKey"])

    def role_user(self, role: Role) -> Credentials:
        """A user standing in for *role*: allowed exactly its KMS actions (aws_access)."""
        return self.user(f"{role.value}-{uuid.uuid4().hex[:8]}", role_actions(role))

    def role(self, name: str, actions: frozenset[str], trusted: Credentials) -> str:
        """An IAM role allowed exactly *actions*, which the user of *trusted* may assume."""
        iam = self.server.client("iam", self.operator)
        user = self.server.client("sts", trusted).get_caller_identity()["Arn"]
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": user}, "Action": "sts:AssumeRole"}
            ],
        }
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))
        iam.put_role_policy(RoleName=name, PolicyName="actions", PolicyDocument=_policy(actions))
        return str(arn["Role"]["Arn"])


def _policy(actions: frozenset[str] | set[str]) -> str:
    actions = set(actions)
    if {"kms:ReEncryptFrom", "kms:ReEncryptTo"} <= actions:
        # moto names a request's IAM action after its operation: ReEncrypt, where AWS checks
        # ReEncryptFrom on the source key and ReEncryptTo on the destination.
        actions.add("kms:ReEncrypt")
    statement = {"Effect": "Allow", "Action": sorted(actions), "Resource": "*"}
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A moto server that accepts any credentials (see the module docstring)."""
    server = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_regions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A moto server for several regions, multi-Region keys decrypting (see the module
    docstring)."""
    server = start_moto(tmp_path_factory.mktemp("moto-regions"), multi_region_keys=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_iam(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IamServer]:
    """A moto server that enforces IAM identity policies (see the module docstring)."""
    server = start_moto(tmp_path_factory.mktemp("moto-iam"))
    try:
        iam = server.client("iam")
        iam.create_user(UserName="operator")
        iam.put_user_policy(UserName="operator", PolicyName="all", PolicyDocument=_policy({"*"}))
        key = iam.create_access_key(UserName="operator")["AccessKey"]
        server.post("/moto-api/reset-auth", b"0")
        yield IamServer(server, Credentials(key["AccessKeyId"], key["SecretAccessKey"]))
    finally:
        server.stop()


def sdk_environment(tmp_path: Path, server: MotoServer) -> dict[str, str]:
    """The AWS_* variables of a test on *server*: dummy credentials, nothing off the machine."""
    return {
        "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": server.url,  # every service, STS included
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def _use_environment(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def aws_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto: MotoServer
) -> dict[str, str]:
    """:func:`sdk_environment` in this test's os.environ (and every other AWS_* removed)."""
    environment = sdk_environment(tmp_path, moto)
    _use_environment(monkeypatch, environment)
    return environment


@pytest.fixture
def regions_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_regions: MotoServer
) -> dict[str, str]:
    """:func:`sdk_environment` of ``moto_regions`` in this test's os.environ."""
    environment = sdk_environment(tmp_path, moto_regions)
    _use_environment(monkeypatch, environment)
    return environment


class Relay:
    """A loopback TCP relay to a server: an endpoint that can go down mid-run. Once stopped,
    its port refuses connections, and the connections it carried are cut."""

    def __init__(self, target_url: str) -> None:
        target = urllib.parse.urlsplit(target_url)
        self._target = (target.hostname or _LOOPBACK, target.port or 80)
        self._listener = socket.create_server((_LOOPBACK, 0))
        self._listener.settimeout(0.05)  # so the accepting thread sees stop() soon
        self.url = f"http://{_LOOPBACK}:{self._listener.getsockname()[1]}"
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Refuse new connections and cut the open ones. Idempotent."""
        self._stopped.set()
        self._accepting.join()
        self._listener.close()
        with self._lock:
            cut, self._open = self._open, set()
        for end in cut:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


@pytest.fixture
def relay(moto_regions: MotoServer) -> Iterator[Relay]:
    """A relay to ``moto_regions``, stopped at teardown if the test did not stop it."""
    running = Relay(moto_regions.url)
    try:
        yield running
    finally:
        running.stop()


def unreachable_url() -> str:
    """A loopback URL that nothing listens on: connections are refused."""
    (port,) = _free_ports(1)
    return f"http://{_LOOPBACK}:{port}"


def new_key_name() -> str:
    return f"heimdall-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def aws_key(moto: MotoServer, aws_environment: dict[str, str]) -> str:
    """A fresh key bootstrapped on ``moto``; its name."""
    name = new_key_name()
    bootstrap(moto.clients(), moto.settings(name), {})
    return name


@contextlib.contextmanager
def recorded_calls(client: Any) -> Iterator[list[str]]:
    """The names of the operations *client* sends while the block runs, in order."""
    calls: list[str] = []

    def record(model: Any, **_: Any) -> None:
        calls.append(str(model.name))

    client.meta.events.register("before-call.kms", record)
    try:
        yield calls
    finally:
        client.meta.events.unregister("before-call.kms", record)
