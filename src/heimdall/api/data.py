"""The data plane: ingest records, look a value up, decrypt fields.

spec: Envelope Encryption Architecture (Encryption Flow, Decryption Flow); Audit Log
Requirements (Encryption and Decryption Operations). Each route calls what ``heimdall ingest``,
``heimdall lookup`` and ``heimdall decrypt`` call, with the request's caller: the library
checks the permission (encrypt, lookup, decrypt) and audits every field.

* ``POST /v1/records`` ingests a batch as one store transaction (:func:`heimdall.ingest.
  ingest_lines`); the policy decides what is encrypted. A record the policy cannot classify is
  an error of its own item, written nowhere; the others are written. Each stored record's
  encrypted fields come back as canonical keys.
* ``POST /v1/decrypt`` decrypts a batch of canonical keys with a reason
  (:meth:`heimdall.service.Heimdall.decrypt_each`). A key that is not a canonical key, names no
  field, or whose field cannot be decrypted is an error of its own item (audited once as a
  failed decrypt, as the library audits it), not of the batch; anything else (the KMS or the
  store unavailable, the audit trail unwritable, a refusal of the caller) fails the request.
  Plaintext is only ever in the answer, never in the log or the trail.
"""

from __future__ import annotations

import json

import orjson
from fastapi import APIRouter, Request, Response

from heimdall.api.auth import AuthenticatedCaller
from heimdall.api.deps import check_batch, service_of
from heimdall.api.errors import error_of
from heimdall.api.schemas import (
    DecryptRequest,
    DecryptResponse,
    IngestItem,
    IngestRequest,
    IngestResponse,
    ItemError,
    LookupRequest,
    LookupResponse,
)
from heimdall.blind_index import is_canonical_key
from heimdall.errors import HeimdallError
from heimdall.ingest import ingest_lines
from heimdall.service import DecryptOutcome

__all__ = ["router"]

router = APIRouter(tags=["data"])


def _line(record: dict[str, object]) -> str | None:
    """The record as a JSON line, None if it has no JSON form (NaN, which Python's parser
    accepts but JSON does not)."""
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return None


@router.post("/v1/records", response_model=IngestResponse)
def ingest_records(
    body: IngestRequest, request: Request, caller: AuthenticatedCaller
) -> IngestResponse:
    """Encrypt and store a batch of records (permission: encrypt)."""
    check_batch(request, len(body.records))
    results: dict[int, IngestItem] = {}
    lines: list[str] = []
    indexes: list[int] = []  # the record index of each line
    for index, record in enumerate(body.records):
        line = _line(record)
        if line is None:
            message = "not storable as JSON (NaN or Infinity in a value)"
            error = ItemError(code="invalid_record", message=message)
            results[index] = IngestItem(index=index, ok=False, error=error)
        else:
            lines.append(line)
            indexes.append(index)

    def written(number: int, fields: tuple[tuple[str, str], ...]) -> None:
        index = indexes[number - 1]
        results[index] = IngestItem(index=index, ok=True, canonical_keys=dict(fields))

    report = ingest_lines(
        service_of(request),
        lines,
        caller=caller,
        source_name=body.source or f"api-{caller.request_id}",
        batch_size=max(len(lines), 1),  # one transaction for the request
        on_written=written,
    )
    for line_error in report.errors:
        index = indexes[line_error.line - 1]
        error = ItemError(code="invalid_record", message=line_error.message)
        results[index] = IngestItem(index=index, ok=False, error=error)
    return IngestResponse(
        results=[results[index] for index in range(len(body.records))],
        records=report.records,
        fields_encrypted=report.fields_encrypted,
        fields_deduplicated=report.fields_deduplicated,
        dropped_fields=report.dropped_fields,
    )


@router.post("/v1/lookup", response_model=LookupResponse)
def lookup(body: LookupRequest, request: Request, caller: AuthenticatedCaller) -> LookupResponse:
    """Find a value by its blind index, decrypting nothing (permission: lookup)."""
    found = service_of(request).lookup(body.field, body.value, caller=caller)
    return LookupResponse(
        canonical_key=found.canonical_key, found=found.found, sightings=found.sightings
    )


def _decrypt_item(key: str, outcome: DecryptOutcome) -> dict[str, object]:
    """One DecryptItem as its JSON object, members in the model's order."""
    if isinstance(outcome, HeimdallError):
        _, code, message = error_of(outcome)
        shown = key if is_canonical_key(key) else None  # a value typed for a key is never echoed
        error = {"code": code, "message": message}
        return {"canonical_key": shown, "ok": False, "plaintext": None, "error": error}
    return {"canonical_key": key, "ok": True, "plaintext": outcome, "error": None}


@router.post("/v1/decrypt", response_model=DecryptResponse)
def decrypt(body: DecryptRequest, request: Request, caller: AuthenticatedCaller) -> Response:
    """Decrypt a batch of fields by canonical key, for a reason (permission: decrypt)."""
    check_batch(request, len(body.keys))
    service = service_of(request)
    outcomes = service.decrypt_each(body.keys, reason=body.reason, caller=caller)
    # The DecryptResponse written from the outcomes: no model built per item, then validated
    # and encoded again (response_model still describes the answer in the OpenAPI document).
    results = [_decrypt_item(key, outcomes[key]) for key in body.keys]
    return Response(orjson.dumps({"results": results}), media_type="application/json")
