"""No copy of the env key or of a data key is left in a heimdall process's memory.

A child process opens the service the way every CLI command does (settings from its real
environment, HMD_MASTER_KEY included), ingests, decrypts legacy and KMS fields, closes the
service and waits. The test then reads the child's whole memory through /proc and searches it
for the env key (as base64 text and as raw bytes) and for every data key the child unwrapped.

What Python cannot wipe, and this test therefore does not look for: the key schedules inside
OpenSSL while a key is in use (freed and cleansed by OpenSSL with its cipher context), the
local keyring's master keys (they pass through the JSON text of the keyring file), and a KMS's
HTTP response bodies.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from heimdall.app import build
from heimdall.blind_index import META_KEY, StoredIndexKey
from heimdall.envelope import parse, wrap_associated_data
from heimdall.ingest import ingest_lines
from heimdall.kms.base import WrappedKey
from heimdall.kms.legacy import LegacyMasterKey, parse_master_key
from heimdall.kms.local import LocalKeyring
from heimdall.rbac import Caller
from heimdall.settings import Settings
from heimdall.types import EncryptionMode

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/mem").exists(), reason="reading a process's memory needs /proc"
)

CALLER = Caller("test:memory")

CHILD = """
import gc, sys
import orjson
from heimdall.cli.common import open_service
from heimdall.ingest import ingest_lines
from heimdall.rbac import Caller

caller = Caller("test:memory")
keys = orjson.loads(open(sys.argv[1], "rb").read())
with open_service() as (service, _), open(sys.argv[2]) as lines:
    ingest_lines(service, lines, caller=caller, source_name="child")
    for key in keys:
        service.decrypt(key, reason="test:memory-scan", caller=caller)
    service.decrypt_many(keys, reason="test:memory-scan", caller=caller)
del service
gc.collect()
print("ready", flush=True)
sys.stdin.read()
"""


def _records(prefix: str, count: int) -> list[str]:
    return [
        orjson.dumps(
            {"id": f"{prefix}{n}", "email": f"{prefix}{n}@example.com", "name": f"Person {n}"}
        ).decode()
        + "\n"
        for n in range(count)
    ]


def _readable_regions(pid: int) -> Iterator[tuple[int, int]]:
    with open(f"/proc/{pid}/maps", encoding="ascii") as maps:
        for line in maps:
            fields = line.split()
            if fields[1].startswith("r") and not line.rstrip().endswith(("[vvar]", "[vsyscall]")):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                yield start, end


def _memory(pid: int) -> bytes:
    chunks = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end in _readable_regions(pid):
            try:
                mem.seek(start)
                chunks.append(mem.read(end - start))
            except OSError:
                continue  # a region that cannot be read (a guard page)
    return b"\x00".join(chunks)


def _data_keys(data_dir: Path, master_key: str) -> dict[str, bytes]:
    """Every data key the store's fields and its blind-index key are wrapped with."""
    keyring = LocalKeyring(data_dir / "keyring.json", create=False)
    legacy = LegacyMasterKey(parse_master_key(master_key))
    settings = Settings(data_dir=data_dir, master_key=master_key, audit_fsync=False)
    service = build(settings, mode=EncryptionMode.HYBRID)
    found: dict[str, bytes] = {}
    try:
        for batch in service.store.iter_fields():
            for field in batch:
                envelope = parse(field.encrypted_data)
                provider = keyring if envelope.encryption_version.value == "kms_v1" else legacy
                ad = wrap_associated_data(
                    envelope.encryption_version.value, envelope.algorithm, envelope.dek_id
                )
                wrapped = WrappedKey(
                    envelope.key_identifier, envelope.key_version, envelope.encrypted_dek
                )
                with provider.unwrap(wrapped, ad) as key:
                    found[f"data key {envelope.dek_id}"] = bytes(key.view())
        stored_text = service.store.get_meta(META_KEY)
        assert stored_text is not None
        stored = StoredIndexKey.from_json(stored_text)
        provider = keyring if stored.encryption_version == "kms_v1" else legacy
        with provider.unwrap(stored.wrapped, stored.associated_data) as key:
            found["blind-index key"] = bytes(key.view())
    finally:
        service.close()
    return found


def test_no_env_key_or_data_key_is_left_in_memory(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    master_key = base64.b64encode(os.urandom(32)).decode()
    legacy = build(
        Settings(data_dir=data_dir, master_key=master_key, audit_fsync=False),
        mode=EncryptionMode.LEGACY,
    )
    ingest_lines(legacy, _records("old", 20), caller=CALLER, source_name="old")
    legacy.close()
    hybrid = build(
        Settings(data_dir=data_dir, master_key=master_key, audit_fsync=False, dek_max_uses=7),
        mode=EncryptionMode.HYBRID,
    )
    ingest_lines(hybrid, _records("new", 20), caller=CALLER, source_name="new")
    keys = [f.canonical_key for batch in hybrid.store.iter_fields() for f in batch]
    hybrid.close()
    (tmp_path / "keys.json").write_bytes(orjson.dumps(keys))
    (tmp_path / "more.jsonl").write_text("".join(_records("more", 20)), encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    env.update(
        {
            "HMD_DATA_DIR": str(data_dir),
            "HMD_MASTER_KEY": master_key,
            "HMD_ENCRYPTION_MODE": "hybrid",
            "HMD_DEK_MAX_USES": "1",
            "HMD_AUDIT_FSYNC": "false",
        }
    )
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "keys.json"), str(tmp_path / "more.jsonl")],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as child:
        try:
            assert child.stdout is not None and child.stderr is not None
            line = child.stdout.readline()
            assert line == b"ready\n", child.stderr.read()
            memory = _memory(child.pid)
            environ = Path(f"/proc/{child.pid}/environ").read_bytes()
        finally:
            child.kill()

    raw_master = base64.b64decode(master_key)
    needles = {
        "HMD_MASTER_KEY (base64)": master_key.encode(),
        "HMD_MASTER_KEY (raw)": raw_master,
        **_data_keys(data_dir, master_key),
    }
    assert len(needles) > 2 + 6  # the data keys of both ingests, and the blind-index key
    assert len(memory) > 10_000_000  # the scan really read the interpreter's memory
    assert memory.count(b"test:memory-scan") > 0  # ... including objects the child made
    left = sorted(name for name, needle in needles.items() if needle in memory)
    assert left == []
    assert master_key.encode() not in environ
    assert b"HMD_MASTER_KEY" not in environ.replace(b"\x00", b"\n").split(b"=")[0]


def test_a_key_the_application_put_in_the_environment_itself_is_not_zeroed_under_it() -> None:
    """The wipe is for the copy only the environment holds: an application that set the
    variable from a constant it still uses keeps its constant intact."""
    script = (
        "import os\n"
        "KEY = b'QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY='\n"
        "os.environb[b'HMD_MASTER_KEY'] = KEY\n"
        "import heimdall\n"
        "assert 'HMD_MASTER_KEY' not in os.environ\n"
        "print(KEY.decode())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMD_")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=\n"
