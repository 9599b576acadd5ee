"""The floor of the API latency row: a route of the shape of ``POST /v1/decrypt`` that does
nothing, served as ``heimdall serve`` serves (FastAPI on uvicorn, h11, uvloop, the access log
on). Its requests/s and latency, from the same clients in the same run, are what the framework
and this machine allow before heimdall does any work (bench/api.py starts it with
``python -m uvicorn bench.api_floor:app``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict

__all__ = ["ANSWER", "app"]

ANSWER = b'{"results":[]}'


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    keys: list[str]
    reason: str


def _caller(request: Request) -> str:
    """A synchronous dependency, as heimdall's authentication is (one thread-pool hop)."""
    return request.headers.get("authorization", "")


app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@app.post("/v1/decrypt")
def decrypt(body: _Body, caller: Annotated[str, Depends(_caller)]) -> Response:
    """A synchronous route (the second hop), answering a fixed body."""
    return Response(ANSWER, media_type="application/json")
