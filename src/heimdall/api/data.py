"""The data plane: ingest records, look a value up, decrypt fields.

spec: Envelope Encryption Architecture (Encryption Flow, Decryption Flow); Audit Log
Requirements (Encryption and Decryption Operations). Each route calls what ``heimdall ingest``,
``heimdall lookup`` and ``heimdall decrypt`` call, with the request's caller: the library
checks the permission (encrypt, lookup, decrypt) and audits every field.

* ``POST /v1/records`` ingests a batch as one store transaction (:func:`heimdall.ingest.
  ingest_lines`); the policy decides what is encrypted. A record the policy cannot classify is
  an error of its own item, written nowhere; the others are written. Each stored record's
  encrypted fields come back as canonical keys.
* ``POST /v1/decrypt`` decrypts a batch of canonical keys with a reason. A key that is not a
  canonical key, names no field, or whose field cannot be decrypted is an error of its own item
  (audited as a failed decrypt, as the library audits it), not of the batch; plaintext is only
  ever in the answer, never in the log or the trail.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final

from fastapi import APIRouter, Request

from heimdall.api.auth import AuthenticatedCaller
from heimdall.api.deps import check_batch, service_of
from heimdall.api.errors import error_of
from heimdall.api.schemas import (
    DecryptItem,
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
from heimdall.errors import (
    DecryptionFailed,
    FieldNotFound,
    HeimdallError,
    InvalidEnvelope,
    InvalidInput,
    KeyNotFound,
    KeyVersionDisabled,
    ModeViolation,
)
from heimdall.ingest import ingest_lines
from heimdall.rbac import Caller
from heimdall.service import Heimdall

__all__ = ["router"]

router = APIRouter(tags=["data"])

# What fails one field and not the batch; anything else (the KMS or the store unavailable, the
# audit trail unwritable, a refusal of the caller) fails the whole request.
_ITEM_ERRORS: Final = (
    FieldNotFound,
    DecryptionFailed,
    InvalidEnvelope,
    KeyVersionDisabled,
    KeyNotFound,
    ModeViolation,
    InvalidInput,
)


def _item_error(exc: HeimdallError) -> ItemError:
    _, code, message = error_of(exc)
    return ItemError(code=code, message=message)


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


Outcome = str | HeimdallError


def _decrypt_each(
    service: Heimdall, keys: Sequence[str], *, reason: str, caller: Caller
) -> dict[str, Outcome]:
    """Each of *keys* (well-formed canonical keys, no two alike) decrypted, or its error."""

    def one(key: str) -> Outcome:
        try:
            return service.decrypt_many([key], reason=reason, caller=caller)[key]
        except _ITEM_ERRORS as exc:
            return exc

    present = service.store.existing_keys(keys)
    # A key naming no field: the library audits the attempt, with the key, as a failed decrypt.
    outcomes: dict[str, Outcome] = {key: one(key) for key in keys if key not in present}
    stored = [key for key in keys if key in present]
    if stored:
        try:
            outcomes.update(service.decrypt_many(stored, reason=reason, caller=caller))
        except _ITEM_ERRORS:
            # One field failed the batch call (the library is all or nothing): each alone.
            outcomes.update((key, one(key)) for key in stored)
    return outcomes


def _refuse_malformed(
    service: Heimdall, malformed: Sequence[str], *, reason: str, caller: Caller
) -> HeimdallError:
    """The library's refusal of text that is not a canonical key, audited there without the
    text (it may be a value typed where its key belongs)."""
    try:
        service.decrypt_many(malformed, reason=reason, caller=caller)
    except InvalidInput as exc:
        return exc
    return InvalidInput("not a canonical key")  # the library refuses them all first


@router.post("/v1/decrypt", response_model=DecryptResponse)
def decrypt(body: DecryptRequest, request: Request, caller: AuthenticatedCaller) -> DecryptResponse:
    """Decrypt a batch of fields by canonical key, for a reason (permission: decrypt)."""
    check_batch(request, len(body.keys))
    service = service_of(request)
    malformed = {key for key in body.keys if not is_canonical_key(key)}
    outcomes: dict[str, Outcome] = {}
    if malformed:
        error = _refuse_malformed(service, sorted(malformed), reason=body.reason, caller=caller)
        outcomes.update((key, error) for key in malformed)
    wanted = list(dict.fromkeys(key for key in body.keys if key not in malformed))
    if wanted:
        outcomes.update(_decrypt_each(service, wanted, reason=body.reason, caller=caller))
    results = []
    for key in body.keys:
        outcome = outcomes[key]
        shown = None if key in malformed else key
        if isinstance(outcome, HeimdallError):
            results.append(DecryptItem(canonical_key=shown, ok=False, error=_item_error(outcome)))
        else:
            results.append(DecryptItem(canonical_key=shown, ok=True, plaintext=outcome))
    return DecryptResponse(results=results)
