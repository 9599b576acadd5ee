"""``heimdall age adopt``: a graph the old env-key code wrote, seeded with raw Cypher as that code
wrote it (the spec's MERGE ... SET), taken into heimdall's keeping and migrated to the KMS."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from heimdall.app import build
from heimdall.audit import JsonlAuditLog
from heimdall.cipher import FieldCipher
from heimdall.envelope import EncryptionContext, EncryptionVersion, parse
from heimdall.errors import PermissionDenied
from heimdall.kms.legacy import LegacyMasterKey, parse_master_key
from heimdall.rbac import Caller, Role
from heimdall.rotation.adopt import NodeKind, adopt
from heimdall.service import FIELD_LABEL, Heimdall
from heimdall.settings import Settings, StoreKind
from heimdall.store.age import AgeStore
from heimdall.store.nodes import FieldNode
from heimdall.types import EncryptionMode
from postgres_server import connect
from test_app_age import _env, _heimdall
from test_store_age import age_connect, cypher

CALLER = Caller(actor="test:adopt")
# The spec's snippet, as the old code ran it for an encrypted field.
OLD_WRITE = (
    "MERGE (fv:FieldValue {canonical_key: $key}) SET fv.encrypted_data = $encrypted_json,"
    " fv.is_encrypted = true, fv.key_version = $key_version"
)
LEGACY_VALUES = [f"legacy{i}@example.com" for i in range(5)]
PLAIN_VALUES = ["plain0@example.com", "plain1@example.com"]


def canonical(value: str) -> str:
    """A canonical key as the old code computed one (some keyed hash; its form is what counts)."""
    return f"email:hash:{hashlib.sha256(value.encode()).hexdigest()}"


def legacy_envelope(master_key: str, value: str) -> str:
    """The envelope the old env-key code wrote for *value*: the legacy format."""
    cipher = FieldCipher(LegacyMasterKey(parse_master_key(master_key)), EncryptionVersion.LEGACY)
    context = EncryptionContext(FIELD_LABEL, canonical(value), "email")
    return cipher.encrypt(value.encode(), context).envelope


# Nodes heimdall must report and leave alone: what each lacks, by a tag of our own.
INCOMPLETE = {
    "no key": "CREATE (:FieldValue {tag: 'no key', is_encrypted: false, value: 'x@example.com'})",
    "bad key": "CREATE (:FieldValue {tag: 'bad key', canonical_key: 'a@b', is_encrypted: false,"
    " value: 'x'})",
    "no flag": "CREATE (:FieldValue {tag: 'no flag', canonical_key: $k1, value: 'x'})",
    "garbage": "CREATE (:FieldValue {tag: 'garbage', canonical_key: $k2, is_encrypted: true,"
    " encrypted_data: 'v1:not-an-envelope'})",
    "two values": "CREATE (:FieldValue {tag: 'two values', canonical_key: $k3,"
    " is_encrypted: false, value: 'a', encrypted_data: 'b'})",
    "other field": "CREATE (:FieldValue {tag: 'other field', canonical_key: $k4,"
    " field_name: 'phone', is_encrypted: false, value: 'x'})",
}


@pytest.fixture
def old_graph(age_dsn: str, postgres_store_dsn: str, master_key: str) -> str:
    """A database holding the graph ``heimdall`` as the old code left it: five legacy
    envelopes, two values in the clear (one in ``value``, one in ``encrypted_data``), an
    application property on one of them, and one node of each incomplete kind."""
    dsn = postgres_store_dsn
    with connect(dsn) as conn:
        conn.execute("CREATE EXTENSION age")
    with age_connect(dsn) as conn:
        conn.execute("SELECT create_graph('heimdall')")
        for value in LEGACY_VALUES:
            params = {
                "key": canonical(value),
                "encrypted_json": legacy_envelope(master_key, value),
                "key_version": 1,
            }
            cypher(conn, OLD_WRITE, params)
        cypher(
            conn,
            "MERGE (fv:FieldValue {canonical_key: $key}) SET fv.value = $value,"
            " fv.is_encrypted = false, fv.tenant = 'acme'",
            {"key": canonical(PLAIN_VALUES[0]), "value": PLAIN_VALUES[0]},
        )
        cypher(
            conn,
            "MERGE (fv:FieldValue {canonical_key: $key}) SET fv.encrypted_data = $value,"
            " fv.is_encrypted = false",
            {"key": canonical(PLAIN_VALUES[1]), "value": PLAIN_VALUES[1]},
        )
        keys = {f"k{n}": canonical(f"incomplete{n}") for n in range(1, 5)}
        for query in INCOMPLETE.values():
            cypher(conn, query, keys)
    return dsn


def nodes(dsn: str) -> dict[str, dict[str, Any]]:
    """Every FieldValue's properties, by canonical key or, lacking one, by tag."""
    with age_connect(dsn) as conn:
        rows = cypher(conn, "MATCH (fv:FieldValue) RETURN properties(fv)")
    return {str(p.get("canonical_key") or p["tag"]): p for (p,) in rows}


def incomplete_nodes(dsn: str) -> dict[str, dict[str, Any]]:
    return {k: p for k, p in nodes(dsn).items() if "tag" in p}


def _service(tmp_path: Path, dsn: str, mode: EncryptionMode, master_key: str | None) -> Heimdall:
    return build(
        Settings(
            data_dir=tmp_path / "data",
            store=StoreKind.AGE,
            postgres_dsn=dsn,
            encryption_mode=mode,
            master_key=master_key,
            audit_fsync=False,
        )
    )


def _store(service: Heimdall) -> AgeStore:
    assert isinstance(service.store, AgeStore)
    return service.store


# -- the command line, end to end ----------------------------------------------------------------


def test_adopt_then_migrate_brings_every_old_node_to_the_kms_and_leaves_the_rest_alone(
    tmp_path: Path, old_graph: str, master_key: str
) -> None:
    incomplete_before = incomplete_nodes(old_graph)
    env = _env(tmp_path, old_graph, HMD_MASTER_KEY=master_key, HMD_ENCRYPTION_MODE="legacy")

    adopted = _heimdall(env, "age", "adopt", "--json")

    assert adopted.returncode == 0, adopted.stderr
    report = json.loads(adopted.stdout)
    assert report["found"] == {"legacy": 5, "kms": 0, "plaintext": 2, "incomplete": 6}
    assert (report["adopted"], report["encrypted"], report["complete"]) == (5, 2, 0)
    assert {item["reason"].split()[0] for item in report["incomplete"]} >= {"no", "is_encrypted"}
    assert "6 FieldValue nodes lack what heimdall needs" in adopted.stderr
    listed = {item["node_id"] for item in report["incomplete"]}
    assert len(listed) == 6
    assert incomplete_nodes(old_graph) == incomplete_before  # never changed

    migrated = _heimdall({**env, "HMD_ENCRYPTION_MODE": "hybrid"}, "migrate", "start")
    assert migrated.returncode == 0, migrated.stderr

    after = nodes(old_graph)
    for value in LEGACY_VALUES + PLAIN_VALUES:
        properties = after[canonical(value)]
        assert properties["encryption_version"] == "kms_v1"
        assert parse(properties["encrypted_data"]).encryption_version == "kms_v1"
        assert "value" not in properties and value not in json.dumps(properties)
        read = _heimdall(env, "decrypt", canonical(value), "--reason", "test:adopted")
        assert read.stdout == value + "\n", read.stderr
    assert after[canonical(PLAIN_VALUES[0])]["tenant"] == "acme"  # the application's own
    assert incomplete_nodes(old_graph) == incomplete_before
    trail = (tmp_path / "data" / "audit.log").read_text()
    assert all(value not in trail for value in LEGACY_VALUES + PLAIN_VALUES)


def test_a_dry_run_reports_and_changes_nothing(
    tmp_path: Path, old_graph: str, master_key: str
) -> None:
    before = nodes(old_graph)
    env = _env(tmp_path, old_graph, HMD_MASTER_KEY=master_key, HMD_ENCRYPTION_MODE="legacy")

    result = _heimdall(env, "age", "adopt", "--dry-run")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "graph heimdall: 13 FieldValue nodes"
    assert "  legacy envelopes (the env key): 5" in lines
    assert "  values in the clear (is_encrypted false): 2" in lines
    assert "  lacking what heimdall needs: 6" in lines
    assert sum(line.startswith("node ") for line in lines) == 6
    assert "dry run: nothing was written" in lines
    assert nodes(old_graph) == before
    assert all(value not in result.stdout for value in LEGACY_VALUES + PLAIN_VALUES)


def test_adopting_twice_changes_nothing_the_second_time(
    tmp_path: Path, old_graph: str, master_key: str
) -> None:
    env = _env(tmp_path, old_graph, HMD_MASTER_KEY=master_key, HMD_ENCRYPTION_MODE="legacy")
    assert _heimdall(env, "age", "adopt").returncode == 0
    once = nodes(old_graph)

    again = json.loads(_heimdall(env, "age", "adopt", "--json").stdout)

    assert (again["complete"], again["adopted"], again["encrypted"]) == (7, 0, 0)
    assert nodes(old_graph) == once


def test_in_kms_mode_values_in_the_clear_go_straight_to_the_kms(
    tmp_path: Path, old_graph: str
) -> None:
    env = _env(tmp_path, old_graph)

    report = json.loads(_heimdall(env, "age", "adopt", "--json").stdout)

    assert report["encrypted"] == 2
    properties = nodes(old_graph)[canonical(PLAIN_VALUES[1])]
    assert properties["encryption_version"] == "kms_v1"
    read = _heimdall(env, "decrypt", canonical(PLAIN_VALUES[1]), "--reason", "test:kms")
    assert read.stdout == PLAIN_VALUES[1] + "\n"


def test_adopt_on_another_store_is_a_one_line_error(tmp_path: Path) -> None:
    env = _env(tmp_path, None, HMD_STORE="sqlite")

    result = _heimdall(env, "age", "adopt")

    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: heimdall age adopt needs HMD_STORE=age")


# -- the library -------------------------------------------------------------------------------


def test_adopting_needs_the_reencrypt_permission_and_a_denial_is_audited(
    tmp_path: Path, old_graph: str, master_key: str
) -> None:
    before = nodes(old_graph)
    service = _service(tmp_path, old_graph, EncryptionMode.LEGACY, master_key)
    try:
        with pytest.raises(PermissionDenied):
            adopt(service, _store(service), caller=Caller(actor="app", role=Role.APP))
        # A dry run only reads: an admin (no plaintext access) may run one.
        admin = Caller(actor="admin", role=Role.ADMIN)
        report = adopt(service, _store(service), caller=admin, dry_run=True)
        assert report.found[NodeKind.LEGACY] == 5
    finally:
        service.close()
    assert nodes(old_graph) == before
    denied = [e for e in JsonlAuditLog(tmp_path / "data" / "audit.log") if e["actor"] == "app"]
    assert [e["result"] for e in denied] == ["denied"]


class _RacingNodes:
    """The store's nodes, with another writer changing each node just before heimdall does."""

    def __init__(self, store: AgeStore, dsn: str) -> None:
        self.store = store
        self.dsn = dsn

    def field_nodes(self, after: int, limit: int) -> list[FieldNode]:
        return self.store.field_nodes(after, limit)

    def change_node(
        self, node: FieldNode, changes: Mapping[str, object], remove: Sequence[str] = ()
    ) -> bool:
        with age_connect(self.dsn) as conn:
            cypher(
                conn,
                "MATCH (fv:FieldValue) WHERE id(fv) = $id SET fv.touched = true",
                {"id": node.node_id},
            )
        return self.store.change_node(node, changes, remove)


def test_a_node_changed_by_another_writer_meanwhile_is_left_alone(
    tmp_path: Path, old_graph: str, master_key: str
) -> None:
    service = _service(tmp_path, old_graph, EncryptionMode.LEGACY, master_key)
    try:
        report = adopt(service, _RacingNodes(_store(service), old_graph), caller=CALLER)
    finally:
        service.close()

    assert (report.adopted, report.encrypted, report.changed_meanwhile) == (0, 0, 7)
    plain = nodes(old_graph)[canonical(PLAIN_VALUES[0])]
    assert plain["value"] == PLAIN_VALUES[0] and plain["touched"] is True
    assert "encryption_version" not in nodes(old_graph)[canonical(LEGACY_VALUES[0])]


def test_a_value_kept_beside_an_envelope_is_reported_not_removed(
    tmp_path: Path, old_graph: str, master_key: str
) -> None:
    key = canonical(LEGACY_VALUES[0])
    with age_connect(old_graph) as conn:
        cypher(
            conn, "MATCH (fv:FieldValue) WHERE fv.canonical_key = $k SET fv.value = 'x'", {"k": key}
        )
    service = _service(tmp_path, old_graph, EncryptionMode.LEGACY, master_key)
    try:
        report = adopt(service, _store(service), caller=CALLER)
    finally:
        service.close()

    assert [u.reason for u in report.incomplete if "beside" in u.reason] == [
        "it keeps a value property beside its envelope"
    ]
    assert nodes(old_graph)[key]["value"] == "x"
    assert "encryption_version" not in nodes(old_graph)[key]
