"""Security property: no plaintext, key material or envelope leaks out of a whole run.

spec: Security Summary and Audit Log Requirements ("plaintext, DEKs and whole envelopes are never
logged or audited"). One end-to-end run over all of examples/people.jsonl (legacy ingest, hybrid
ingest, rotation, re-encryption, decrypts, failing operations) and then every place a value could
escape to is searched for every encrypted value of the file: the audit log, log records,
stdout/stderr, every exception heimdall raised (caught or not), the repr of the service objects,
and the raw bytes of the SQLite database and its write-ahead log.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import orjson
import pytest

import heimdall
from heimdall.errors import (
    DecryptionFailed,
    FieldNotFound,
    HeimdallError,
    InvalidInput,
    KeyNotFound,
    ModeViolation,
    PermissionDenied,
)
from heimdall.ingest import IngestReport
from heimdall.policy import RecordError
from heimdall.rbac import Caller, Role
from heimdall.reencrypt import reencrypt
from heimdall.secret import SecretBytes
from heimdall.service import Heimdall, field_context
from heimdall.store.base import FieldUpdate, FieldValue
from heimdall.store.sqlite import SqliteStore
from heimdall.types import EncryptionMode

ServiceFactory = Callable[..., Heimdall]
Ingest = Callable[..., IngestReport]

REASON = "support:ticket-1234"
HEIMDALL_SOURCE = str(Path(heimdall.__file__).parent)
ExcInfo = tuple[type[BaseException], BaseException, TracebackType]


# Named here, not read from the policy, so a policy regression cannot shrink the search.
ENCRYPTED_FIELDS = ("email", "phone", "ssn", "name", "address", "date_of_birth", "ip")


def _plaintexts(records: Iterable[dict[str, Any]]) -> set[str]:
    """Every value of an encrypted field, as in the file and as stored (stripped)."""
    values: set[str] = set()
    for record in records:
        for name in ENCRYPTED_FIELDS:
            value = record.get(name)
            if isinstance(value, str):
                values.update({value, value.strip()} - {""})
    return values


@contextmanager
def _heimdall_exceptions() -> Iterator[list[BaseException]]:
    """Every exception raised inside heimdall's own code while the block runs, caught or not."""
    seen: dict[int, BaseException] = {}

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "exception":
            exc_info: ExcInfo = arg
            tb = exc_info[2]
            while tb.tb_next is not None:
                tb = tb.tb_next
            # Raised here (by heimdall, or by C code it called), not passing through from a
            # library such as ipaddress, whose own messages are caught and replaced.
            if tb.tb_frame.f_code.co_filename.startswith(HEIMDALL_SOURCE):
                seen.setdefault(id(exc_info[1]), exc_info[1])
        return local

    def global_trace(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename.startswith(HEIMDALL_SOURCE):
            frame.f_trace_lines = False
            return local
        return None

    previous = sys.gettrace()
    sys.settrace(global_trace)
    captured: list[BaseException] = []
    try:
        yield captured
    finally:
        sys.settrace(previous)
        captured.extend(seen.values())


def _occurring(needles_file: Path, haystack: bytes) -> list[str]:
    """The lines of *needles_file* that occur in *haystack*.

    ``grep -F`` matches all needles in one pass; ~2000 separate ``in`` scans of the 35 MB
    write-ahead log a re-encryption leaves would take minutes.
    """
    grep = shutil.which("grep")
    assert grep is not None, "these checks need grep"
    result = subprocess.run(
        [grep, "-a", "-o", "-F", "-f", str(needles_file)],
        input=haystack,
        capture_output=True,
        env={**os.environ, "LC_ALL": "C"},
        check=False,
    )
    assert result.returncode in {0, 1}, result.stderr.decode(errors="replace")
    return sorted(set(result.stdout.decode("utf-8", errors="replace").splitlines()))


def _exception_texts(exceptions: Iterable[BaseException]) -> list[str]:
    texts = []
    for exc in exceptions:
        texts += [repr(exc), str(exc), "".join(traceback.format_exception(exc))]
    return texts


def _tamper(service: Heimdall, key: str) -> None:
    field = service.store.get_field(key)
    assert field is not None
    marker = '"ciphertext":"'
    at = field.encrypted_data.index(marker) + len(marker)
    flipped = "B" if field.encrypted_data[at] == "A" else "A"
    tampered = field.encrypted_data[:at] + flipped + field.encrypted_data[at + 1 :]
    update = FieldUpdate(tampered, field.key_version, field.encryption_version, field.dek_id)
    assert service.store.compare_and_swap(key, field.encrypted_data, update)


def _raw_db(service: Heimdall) -> bytes:
    store = service.store
    assert isinstance(store, SqliteStore)
    files = [store.path, Path(f"{store.path}-wal")]
    return b"".join(f.read_bytes() for f in files if f.exists())


def _run(
    make_service: ServiceFactory,
    ingest: Ingest,
    records: list[dict[str, Any]],
    master_key: str,
    caller: Caller,
) -> tuple[list[BaseException], list[object], list[str]]:
    """The whole scenario. Returns the exceptions callers saw, objects to repr, ingest errors."""
    raised: list[BaseException] = []
    objects: list[object] = []
    half = len(records) // 2
    lines: list[dict[str, Any] | str] = [*records]
    # Bad lines made of real values: their error messages must not echo them.
    lines += [
        {"id": "bad-1", "email": records[0]["phone"]},
        {"id": "bad-2", "ip": records[1]["name"]},
        {"id": "bad-3", "date_of_birth": records[2]["address"]},
        {"id": "bad-4", "ssn": [records[3]["ssn"]]},
        orjson.dumps(records[4]).decode()[:-1] + "\n",  # truncated JSON
    ]

    legacy = make_service(EncryptionMode.LEGACY, master_key)
    first = ingest(legacy, lines[:half])
    legacy_key = legacy.lookup("email", records[0]["email"], caller=caller).canonical_key
    objects += [legacy, legacy.router.writer, legacy.router.writer.kms]
    legacy.close()
    kms_only = make_service(EncryptionMode.KMS)
    with pytest.raises(ModeViolation) as mode_violation:
        kms_only.decrypt(legacy_key, reason=REASON, caller=caller)
    raised.append(mode_violation.value)
    wrong = make_service(EncryptionMode.LEGACY, base64.b64encode(b"k" * 32).decode())
    with pytest.raises(KeyNotFound) as not_found:
        wrong.decrypt(legacy_key, reason=REASON, caller=caller)
    raised.append(not_found.value)

    hybrid = make_service(EncryptionMode.HYBRID, master_key, dek_max_uses=50)
    second = ingest(hybrid, lines[half:])
    hybrid.rotate_keys(caller=caller)
    report = reencrypt(hybrid, caller=caller, batch_size=100)
    assert report.reencrypted + report.rewrapped > 0 and report.failed == 0

    keys = [hybrid.lookup("email", r["email"], caller=caller).canonical_key for r in records[:5]]
    decrypted = hybrid.decrypt_many(keys, reason=REASON, caller=caller)
    assert sorted(decrypted.values()) == sorted({r["email"] for r in records[:5]})
    _tamper(hybrid, keys[0])
    failures: list[tuple[type[HeimdallError], Callable[[], object]]] = [
        (DecryptionFailed, lambda: hybrid.decrypt(keys[0], reason=REASON, caller=caller)),
        (
            FieldNotFound,
            lambda: hybrid.decrypt("email:hash:" + "0" * 64, reason=REASON, caller=caller),
        ),
        # A value given where its canonical key belongs must reach neither message nor trail.
        (InvalidInput, lambda: hybrid.decrypt(records[0]["email"], reason=REASON, caller=caller)),
        (PermissionDenied, lambda: hybrid.decrypt(keys[1], reason="", caller=caller)),
        (InvalidInput, lambda: hybrid.lookup("ip", records[0]["name"], caller=caller)),
        (InvalidInput, lambda: hybrid.lookup("email", records[0]["phone"], caller=caller)),
        (
            PermissionDenied,
            lambda: hybrid.decrypt(
                keys[1], reason=REASON, caller=Caller("oidc:auditor", role=Role.AUDIT)
            ),
        ),
    ]
    for error, operation in failures:
        with pytest.raises(error) as info:
            operation()
        raised.append(info.value)

    cipher = hybrid.router.writer
    sample = records[5]["ssn"]
    data_key = cipher.kms.generate_data_key(b"associated")
    stored = hybrid.store.get_field(keys[1])
    assert stored is not None
    sealed = cipher.encrypt(sample.encode(), field_context(stored))
    fields: list[FieldValue] = [f for batch in hybrid.store.iter_fields() for f in batch]
    objects += [
        hybrid,
        kms_only,
        wrong,
        hybrid.router,
        cipher,
        cipher.kms,
        hybrid.router.legacy,
        hybrid.router.legacy.kms if hybrid.router.legacy else None,
        hybrid.blind_index(caller),
        hybrid.store,
        hybrid.audit,
        SecretBytes(sample.encode()),
        data_key,
        data_key.plaintext,
        data_key.wrapped,
        sealed,
        first,
        second,
        report,
        *fields,
    ]
    errors = [error.message for error in [*first.errors, *second.errors]]
    assert len(errors) == 5
    data_key.plaintext.wipe()
    return raised, objects, errors


def test_no_plaintext_key_material_or_envelope_leaks(
    *,
    make_service: ServiceFactory,
    ingest: Ingest,
    all_people: list[dict[str, Any]],
    master_key: str,
    caller: Caller,
    data_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    plaintexts = _plaintexts(all_people)
    assert len(all_people) == 300 and len(plaintexts) > 1500
    needles = tmp_path / "plaintexts.txt"
    needles.write_text("".join(f"{value}\n" for value in sorted(plaintexts)), encoding="utf-8")
    planted = sorted(plaintexts)[len(plaintexts) // 2]
    assert _occurring(needles, b"\x00noise" + planted.encode() + b"noise\xff") == [planted]

    with _heimdall_exceptions() as internal:
        raised, objects, line_errors = _run(make_service, ingest, all_people, master_key, caller)
        db_while_open = _raw_db(make_service())

    captured = capsys.readouterr()
    # The capture sees exceptions heimdall caught itself, e.g. the per-line errors of ingest.
    assert any(isinstance(exc, RecordError) for exc in internal)
    keyring = orjson.loads((data_dir / "keyring.json").read_bytes())
    materials = [version["material"] for version in keyring["versions"]]
    assert len(materials) == 2
    secrets = [*materials, master_key]
    texts = {
        "audit log": (data_dir / "audit.log").read_text(encoding="utf-8"),
        "log records": caplog.text
        + "".join(f"{r.getMessage()}{r.args!r}{r.exc_text}" for r in caplog.records),
        "stdout": captured.out,
        "stderr": captured.err,
        "exceptions": "\n".join(_exception_texts([*raised, *internal])),
        "reprs": "\n".join(f"{obj!r}\n{obj!s}" for obj in objects),
        "ingest errors": "\n".join(line_errors),
    }
    for where, text in texts.items():
        assert _occurring(needles, text.encode()) == [], f"plaintext in {where}"
        assert not [s for s in secrets if s in text], f"key material in {where}"
        assert "encrypted_dek" not in text, f"an envelope in {where}"
    for raw in (db_while_open, _raw_db(make_service())):
        assert b"encrypted_dek" in raw  # the envelopes are there: the search reads the data
        assert _occurring(needles, raw) == [], "plaintext in the SQLite files"
        assert not [s for s in secrets if s.encode() in raw], "key material in the database"
