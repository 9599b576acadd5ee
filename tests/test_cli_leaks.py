"""Scanner: PII values never leave the ciphertext through the command line.

Known values are ingested, then every command runs (and the usual mistakes: a value given where
its canonical key belongs, a value that is not stored, bad lines made of real values). Every
byte the commands print, except the one value a successful ``decrypt`` is asked for, and the
whole audit trail are searched for every value. The audit trail may only carry canonical keys.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from cli_runner import PEOPLE_FILE, Cli

ENCRYPTED_FIELDS = ("email", "phone", "ssn", "name", "address", "date_of_birth", "ip")
CANONICAL_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*:hash:[0-9a-f]{64}")


def _people(count: int) -> list[dict[str, Any]]:
    with PEOPLE_FILE.open("rb") as handle:
        return [orjson.loads(line) for _, line in zip(range(count), handle, strict=False)]


def _values(records: list[dict[str, Any]]) -> set[str]:
    return {
        record[name].strip()
        for record in records
        for name in ENCRYPTED_FIELDS
        if isinstance(record.get(name), str) and len(record[name].strip()) >= 6
    }


def test_no_command_prints_or_audits_a_value_it_was_not_asked_to_decrypt(cli: Cli) -> None:
    people = _people(60)
    values = _values(people)
    assert len(values) > 200
    bad_lines = [
        json.dumps({"id": "bad-1", "email": people[0]["phone"]}),
        json.dumps({"id": "bad-2", "ip": people[1]["name"]}),
        json.dumps({"id": "bad-3", "ssn": [people[2]["ssn"]]}),
        json.dumps(people[3])[:-3],
    ]
    source = cli.write_jsonl("people.jsonl", [json.dumps(p) for p in people] + bad_lines)
    target = people[5]["email"]
    printed: list[str] = []

    def run(*args: str, stdin: str | None = None) -> str:
        result = cli.run(*args, input_text=stdin)
        printed.extend([result.stdout, result.stderr])
        return result.stdout

    run("ingest", str(source))
    key = json.loads(run("lookup", "email", "-", "--json", stdin=target))["canonical_key"]
    run("lookup", "name", people[6]["name"])  # the argument form still works
    run("lookup", "email", "-", stdin="nobody-stored@example.com")
    run("decrypt", people[7]["email"], "--reason", "support:mistake")  # a value, not a key
    run("decrypt", key, "--reason", "")  # no reason
    run("decrypt", "email:hash:" + "0" * 64, "--reason", "support:missing")
    for command in (
        ("status",),
        ("keys", "show"),
        ("keys", "rotate"),
        ("reencrypt", "--dry-run"),
        ("reencrypt", "--interval", "0"),
        ("reencrypt", "status"),
        ("migrate", "status"),
        ("kms", "check"),
        ("worker", "--once"),
        ("audit", "tail", "-n", "500"),
        ("audit", "verify"),
    ):
        run(*command)
    decrypted = cli.run("decrypt", key, "--reason", "support:ticket-1")
    # Equal values (after normalisation) share one field, stored as first ingested.
    assert decrypted.stdout.lower() == target.strip().lower() + "\n"
    printed.append(decrypted.stderr)

    audit = (cli.data_dir / "audit.log").read_text(encoding="utf-8")
    everything = "\n".join(printed)
    for where, text in (("output", everything), ("audit trail", audit)):
        leaked = sorted(value for value in values if value in text)
        assert leaked == [], f"values in the {where}"
    events = [json.loads(line) for line in audit.splitlines()]
    identifiers = {e["field_identifier"] for e in events if "field_identifier" in e}
    assert identifiers and all(CANONICAL_KEY.fullmatch(i) for i in identifiers)
    mistaken = [e for e in events if e.get("reason") == "support:mistake"]
    assert [(e["event_type"], e["result"], e.get("error")) for e in mistaken] == [
        ("crypto.decrypt", "failure", "InvalidInput")
    ]
