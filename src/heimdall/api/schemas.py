"""Request and response bodies, as pydantic models (they are the OpenAPI document's schemas).

Requests are strict: an unknown member, or a value of the wrong JSON type (``"1000"`` for a
number, ``1`` for a boolean), is a 422, never coerced. Batch sizes are checked against
``HMD_API_MAX_BATCH`` by the routes (413), since the limit is a setting.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from heimdall.kms.base import KeyDescription
from heimdall.rotation.job import JobPlan
from heimdall.store.jobs import Job

__all__ = [
    "DecryptItem",
    "DecryptRequest",
    "DecryptResponse",
    "ErrorBody",
    "IngestItem",
    "IngestRequest",
    "IngestResponse",
    "JobBody",
    "JobPlanBody",
    "KeysBody",
    "LookupRequest",
    "LookupResponse",
    "ReencryptRequest",
    "RotateRequest",
    "StrictBody",
    "VersionRequest",
    "job_body",
    "keys_body",
    "plan_body",
]


class StrictBody(BaseModel):
    """A request body: strict types, no unknown member."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ItemError(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error: ``{"error": {"code": ..., "message": ...}}``."""

    error: ItemError


# -- data plane -----------------------------------------------------------------------------


class IngestRequest(StrictBody):
    records: list[dict[str, Any]] = Field(
        min_length=1, description="Records, as `heimdall ingest` reads them (JSON objects)."
    )
    source: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$",
        description="The records' source label; record ids default to `<source>:<n>`. "
        "Default: `api-<request id>`, so records without an id of their own never collide.",
    )


class IngestItem(BaseModel):
    index: int
    ok: bool
    canonical_keys: dict[str, str] | None = None
    error: ItemError | None = None


class IngestResponse(BaseModel):
    results: list[IngestItem]
    records: int
    fields_encrypted: int
    fields_deduplicated: int
    dropped_fields: int


class LookupRequest(StrictBody):
    field: str = Field(min_length=1, max_length=128)
    value: str = Field(max_length=65_536)


class LookupResponse(BaseModel):
    canonical_key: str
    found: bool
    sightings: int


class DecryptRequest(StrictBody):
    keys: list[str] = Field(min_length=1, description="Canonical keys, as lookup returns them.")
    reason: str = Field(
        description="Why, for the audit trail: 1-200 printable ASCII characters, "
        "e.g. `support:ticket-1234`."
    )


class DecryptItem(BaseModel):
    canonical_key: str | None = Field(
        description="The key asked for; null when it was not a canonical key (never echoed)."
    )
    ok: bool
    plaintext: str | None = None
    error: ItemError | None = None


class DecryptResponse(BaseModel):
    results: list[DecryptItem]


# -- keys -----------------------------------------------------------------------------------


class RotateRequest(StrictBody):
    emergency: bool = Field(
        default=False,
        description="Key compromise: also retire every older version and start the "
        "emergency re-encryption job (spec: Runbook: Emergency Key Compromise Response).",
    )


class VersionRequest(StrictBody):
    version: int = Field(ge=1)
    force: bool = Field(default=False, description="Even if stored fields depend on it.")


class KeyVersionBody(BaseModel):
    version: int
    identifier: str
    state: str
    created_at: str


class KeysBody(BaseModel):
    provider: str
    key_name: str
    latest_version: int
    min_decryption_version: int
    min_encryption_version: int
    versions: list[KeyVersionBody]


def keys_body(description: KeyDescription) -> KeysBody:
    return KeysBody(
        provider=description.provider,
        key_name=description.key_name,
        latest_version=description.latest_version,
        min_decryption_version=description.min_decryption_version,
        min_encryption_version=description.min_encryption_version,
        versions=[
            KeyVersionBody(
                version=v.version,
                identifier=description.key_identifier(v.version),
                state=v.state.value,
                created_at=v.created_at,
            )
            for v in description.versions
        ],
    )


# -- the re-encryption job ------------------------------------------------------------------


class ReencryptRequest(StrictBody):
    batch_size: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Must equal the workers' HMD_REENCRYPT_BATCH_SIZE: workers pace the job.",
    )
    interval_seconds: float | None = Field(
        default=None,
        ge=0,
        le=86_400,
        description="Must equal the workers' HMD_REENCRYPT_INTERVAL_SECONDS.",
    )
    dry_run: bool = Field(default=False, description="Report what a job would do; start none.")


class JobBody(BaseModel):
    job_id: str
    kind: str
    state: str
    target_key: str | None
    target_version: int
    total: int
    completed: int
    failed: int
    pending: int | None = None
    rate_per_second: float | None = None
    created_at: str
    updated_at: str


def job_body(job: Job, *, pending: int | None = None, rate: float | None = None) -> JobBody:
    return JobBody(
        job_id=job.job_id,
        kind=job.kind.value,
        state=job.state.value,
        target_key=job.target_key or None,
        target_version=job.target_version,
        total=job.total,
        completed=job.completed,
        failed=job.failed,
        pending=pending,
        rate_per_second=rate,
        created_at=job.created_at,
        updated_at=job.updated_at,
    )


class JobPlanBody(BaseModel):
    dry_run: Literal[True] = True
    target_key: str | None
    target_version: int
    rewrap_fields: int
    reencrypt_fields: int
    legacy_left: int
    moved_fields: int


def plan_body(plan: JobPlan) -> JobPlanBody:
    return JobPlanBody(
        target_key=plan.target_key or None,
        target_version=plan.target_version,
        rewrap_fields=plan.rewrap_fields,
        reencrypt_fields=plan.reencrypt_fields,
        legacy_left=plan.legacy_left,
        moved_fields=plan.moved_fields,
    )
