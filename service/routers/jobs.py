"""Jobs: status, a server-sent event stream of it, and cancel.

A key sees only the jobs of models it may use; any other job id answers 404, as an unknown one
does, so that job ids of other tenants cannot be probed.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job

from service import jobqueue
from service.config import ApiKey
from service.deps import KeyDep, MaybeStoreDep, RedisDep, SettingsDep
from service.errors import ApiError, responses

router = APIRouter(tags=["jobs"])

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Timings(BaseModel):
    submitted_at: str | None
    enqueued_at: str | None
    started_at: str | None
    ended_at: str | None


class JobView(BaseModel):
    job_id: str
    url: str
    type: Literal["edit", "curvature", "checkpoint"] = Field(
        description="An edit (POST /v1/edits), a curvature build (POST /v1/curvature) or a "
        "merged checkpoint (POST /v1/versions/{id}/checkpoint)"
    )
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    rq_status: str = Field(description="RQ's own status (queued, deferred, started, ...)")
    model: str | None
    stream: str | None
    n_facts: int | None
    position: int | None = Field(
        description="Jobs ahead of this one in its model's queue (0: next); null unless queued"
    )
    waiting_for: str | None = Field(
        description="While deferred: the earlier job of the same stream it waits for, or the "
        "curvature build it needs"
    )
    cancel_requested: bool
    progress: Any = Field(
        description="What the worker reports: phase, epoch, loss, facts_done; for a curvature "
        "build, pass, tokens_done and tokens_total"
    )
    timings: Timings
    version: str | None = Field(
        description="The version the job published (a checkpoint job: the version it wrote)"
    )
    metrics: Any = None
    curvature_key: str | None = Field(
        default=None, description="The store key a curvature job built (or found)"
    )
    result: Any = None
    error: str | None = Field(description="The error's last line, when failed")


def _job_for(redis: Redis, key: ApiKey, job_id: str) -> Job:
    """The job, or 400 (malformed id) / 404 (unknown, or of a model the key may not use)."""
    if not JOB_ID_RE.match(job_id):
        raise ApiError(400, "invalid_id", "invalid job id", "job_id")
    job = jobqueue.fetch(redis, job_id)
    if job is None or not key.allows(job.meta["model"]):
        raise ApiError(404, "not_found", f"no job {job_id}", "job_id")
    return job


@router.get("/v1/jobs/{job_id}", response_model=JobView, responses=responses(400, 404))
def get_job(job_id: str, key: KeyDep, redis: RedisDep, store: MaybeStoreDep) -> dict:
    """A job's status, queue position, progress, timings, and its version and metrics or error."""
    return jobqueue.job_view(redis, _job_for(redis, key, job_id), store)


@router.post(
    "/v1/jobs/{job_id}/cancel",
    response_model=JobView,
    responses={
        202: {"model": JobView, "description": "Cancel requested; the worker ends the job"},
        **responses(400, 404, 409),
    },
)
def cancel_job(job_id: str, key: KeyDep, redis: RedisDep, response: Response) -> dict:
    """Cancel a job: 200 when it was waiting and is cancelled now, 202 when it is running (or
    waiting behind an earlier job of its stream) and its worker will end it without publishing;
    409 when it has already ended."""
    job = _job_for(redis, key, job_id)
    if not jobqueue.cancel(redis, job):
        response.status_code = 202
    job.refresh()
    return jobqueue.job_view(redis, job)


def _sse(event: str, data: object, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"},
        **responses(400, 404),
    },
)
async def job_events(
    job_id: str,
    request: Request,
    key: KeyDep,
    redis: RedisDep,
    settings: SettingsDep,
    store: MaybeStoreDep,
) -> StreamingResponse:
    """Server-sent events: a `status` event (the job view, as GET /v1/jobs/{id}) whenever it
    changes, then `end` after a terminal status. The stream also ends after
    CRISPEDIT_SSE_MAX_S seconds (`timeout` event); comments keep idle connections open."""
    await run_in_threadpool(_job_for, redis, key, job_id)  # errors before the stream starts

    def view() -> dict | None:
        job = jobqueue.fetch(redis, job_id)
        return None if job is None else jobqueue.job_view(redis, job, store)

    async def stream() -> AsyncIterator[str]:
        started = last_sent = time.monotonic()
        previous = None
        count = 0
        while True:
            try:
                current = await run_in_threadpool(view)
            except RedisError:
                yield _sse("error", {"code": "unavailable", "message": "Redis is unavailable"})
                return
            if current is None:
                yield _sse("error", {"code": "not_found", "message": f"job {job_id} expired"})
                return
            snapshot = json.dumps(current, sort_keys=True)
            now = time.monotonic()
            if snapshot != previous:
                count += 1
                previous, last_sent = snapshot, now
                yield _sse("status", current, count)
            if current["status"] in jobqueue.TERMINAL:
                yield _sse("end", {"status": current["status"]})
                return
            if now - started >= settings.sse_max_s:
                yield _sse("timeout", {"status": current["status"]})
                return
            if now - last_sent >= settings.sse_keepalive_s:
                last_sent = now
                yield ": keepalive\n\n"
            if await request.is_disconnected():
                return
            await asyncio.sleep(settings.sse_poll_s)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
