"""Liveness, readiness and Prometheus metrics: no API key (orchestrators and scrapers call them),
except for /metrics when CRISPEDIT_METRICS_REQUIRE_KEY is set."""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from redis.exceptions import RedisError

from service.deps import RedisDep, metrics_access, open_store
from service.errors import responses

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Liveness: 200 whenever the process answers."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis or the store is unavailable"}},
)
def readyz(request: Request, redis: RedisDep) -> JSONResponse:
    """Readiness: 200 when Redis answers a ping and the store is readable and writable, else 503
    with the failing check(s)."""
    checks = {}
    try:
        redis.ping()
        checks["redis"] = "ok"
    except RedisError:
        checks["redis"] = "unreachable"
    try:
        store = open_store(request.app.state)
        (store.root / "store.json").read_bytes()
        writable = os.access(store.root / "tmp", os.W_OK)
        checks["store"] = "ok" if writable else "read-only"
    except Exception:  # any reason the store cannot be opened; the reason may name paths
        checks["store"] = "unavailable"
    ready = all(value == "ok" for value in checks.values())
    body = Readiness(status="ready" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(metrics_access)],
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        **responses(401, 429),
    },
)
def metrics(request: Request) -> Response:
    """Prometheus metrics: requests by route and status, latency, queue depth and jobs by status
    per model, edits accepted. Open by default; with CRISPEDIT_METRICS_REQUIRE_KEY, only with
    `Authorization: Bearer KEY` (any valid key)."""
    data = generate_latest(request.app.state.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
