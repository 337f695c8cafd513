"""Jobs: status, a server-sent event stream of it, and cancel.

A key sees an edit job where `service.access` gives it `read` on the job's stream (cancel: `edit`),
and a curvature job where it holds a grant on the model (cancel: `admin`); any other job id
answers 404, as an unknown one does, so that job ids of other teams cannot be probed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job
from starlette.types import Receive, Scope, Send

from contract.names import JOB_ID_RULE, is_job_id
from curvature_store import Store
from service import access, jobqueue
from service.config import ApiKey, Role, Settings
from service.deps import KeyDep, MaybeStoreDep, RedisDep, SettingsDep
from service.errors import ApiError, ErrorResponse, responses

router = APIRouter(tags=["jobs"])


class Actor(BaseModel):
    team: str
    key_id: str


class Timings(BaseModel):
    submitted_at: str | None
    enqueued_at: str | None
    started_at: str | None
    ended_at: str | None


class JobView(BaseModel):
    job_id: str
    url: str
    type: Literal["edit", "curvature", "generate", "checkpoint"] = Field(
        description="An edit (POST /v1/edits), a curvature build (POST /v1/curvature), "
        "completions at a version (POST /v1/versions/{id}/generate) or a merged checkpoint "
        "(POST /v1/versions/{id}/checkpoint)"
    )
    status: Literal["queued", "running", "succeeded", "failed", "cancelled", "rejected"] = Field(
        description="rejected: an edit on a guarded stream whose version is outside the "
        "stream's policy (kept, not published; `result.guard` holds the metrics and the failed "
        "rules)"
    )
    rq_status: str = Field(description="RQ's own status (queued, deferred, started, ...)")
    model: str | None
    stream: str | None
    n_facts: int | None
    submitted_by: Actor | None = Field(
        default=None, description="Who submitted it: team and key id (never the key)"
    )
    position: int | None = Field(
        description="Jobs ahead of this one in its model's queue (0: next); null unless queued"
    )
    waiting_for: str | None = Field(
        description="While deferred: the earlier job of the same stream it waits for, or the "
        "curvature build it needs"
    )
    cancel_requested: bool
    progress: Any = Field(
        description="What the worker reports: phase (curvature, edit, guard: a guarded "
        "stream's policy check, done), epoch, loss, facts_done; for a curvature build, pass, "
        "tokens_done and tokens_total"
    )
    timings: Timings
    version: str | None = Field(
        description="The version the job published (or kept, when rejected; or answers as; a "
        "checkpoint job: the version it wrote)"
    )
    metrics: Any = None
    curvature_key: str | None = Field(
        default=None, description="The store key a curvature job built (or found)"
    )
    result: Any = None
    error: str | None = Field(description="The error's last line, when failed")


def _job_for(
    redis: Redis, settings: Settings, store: Store | None, key: ApiKey, job_id: str, role: Role
) -> Job:
    """The job, or 400 (malformed id) / 404 (unknown, or one the key may not see or act on as
    `role`: an edit job's stream role, a curvature job's model role, one higher to cancel)."""
    if not is_job_id(job_id):
        raise ApiError(400, "invalid_id", f"invalid job id: {JOB_ID_RULE}", "job_id")
    not_found = ApiError(404, "not_found", f"no job {job_id}", "job_id")
    job = jobqueue.fetch(redis, job_id)
    if job is None:
        raise not_found
    model, stream = job.meta["model"], job.meta.get("stream")
    if job.meta.get("job_type") == "curvature":
        access.require(key, "admin" if role != "read" else "read", model, None, None, not_found)
    else:
        owner = job.meta.get("owner") or access.owner_of(settings, store, model, stream)
        access.require(key, role, model, stream, owner, not_found)
    return job


def _shown(view: dict, key: ApiKey) -> dict:
    """The job view as `key` may see it: a curvature build is the model's, seen by every team
    with a grant on it, but who asked for it only by that team."""
    if (view.get("submitted_by") or {}).get("team") != key.team:
        view["submitted_by"] = None
    return view


@router.get("/v1/jobs/{job_id}", response_model=JobView, responses=responses(400, 404))
def get_job(
    job_id: str, key: KeyDep, redis: RedisDep, store: MaybeStoreDep, settings: SettingsDep
) -> dict:
    """A job's status, queue position, progress, timings, who submitted it, and its version and
    metrics or error."""
    job = _job_for(redis, settings, store, key, job_id, "read")
    return _shown(jobqueue.job_view(redis, job, store), key)


@router.post(
    "/v1/jobs/{job_id}/cancel",
    response_model=JobView,
    responses={
        202: {"model": JobView, "description": "Cancel requested; the worker ends the job"},
        **responses(400, 404, 409),
    },
)
def cancel_job(
    job_id: str,
    key: KeyDep,
    redis: RedisDep,
    response: Response,
    store: MaybeStoreDep,
    settings: SettingsDep,
) -> dict:
    """Cancel a job (an edit: `edit` role on its stream; a curvature build: `admin`): 200 when it
    was waiting and is cancelled now, 202 when it is running (or waiting behind an earlier job of
    its stream) and its worker will end it without publishing; 409 when it has already ended."""
    job = _job_for(redis, settings, store, key, job_id, "edit")
    if not jobqueue.cancel(redis, job):
        response.status_code = 202
    job.refresh()
    return _shown(jobqueue.job_view(redis, job), key)


class _CountedStream(StreamingResponse):
    """A StreamingResponse that gives its slot back however the response ends (done, client
    gone, cancelled, even before the first event), since an unstarted generator's `finally`
    would never run."""

    def __init__(self, *args: Any, release: Callable[[], None], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _open_stream(request: Request, settings: Settings, key: ApiKey) -> Callable[[], None]:
    """Take one of the process's event-stream slots for `key`, or ApiError: 429 when the key
    holds `sse_max_per_key` streams, 503 when the process holds `sse_max_total`. Returns the
    function that gives the slot back (idempotent). Counted per process, on its event loop."""
    state = request.app.state
    if not hasattr(state, "sse_open"):
        state.sse_open = Counter()
    open_streams: Counter[str] = state.sse_open
    retry = {"Retry-After": "5"}
    if open_streams.total() >= settings.sse_max_total:
        raise ApiError(
            503, "too_many_streams", "too many open event streams; poll GET /v1/jobs/{id} or "
            "retry later", headers=retry,
        )  # fmt: skip
    if open_streams[key.id] >= settings.sse_max_per_key:
        raise ApiError(
            429, "too_many_streams", f"this API key holds {settings.sse_max_per_key} open event "
            "streams, the limit; close one or poll GET /v1/jobs/{id}", headers=retry,
        )  # fmt: skip
    open_streams[key.id] += 1
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            open_streams[key.id] -= 1
            if open_streams[key.id] <= 0:
                del open_streams[key.id]

    return release


def _sse(event: str, data: object, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"},
        **responses(400, 404),
        429: {
            "model": ErrorResponse,
            "description": "The key's open event streams are at the "
            "limit (CRISPEDIT_SSE_MAX_PER_KEY), or its rate limit",
        },
        503: {
            "model": ErrorResponse,
            "description": "The process's open event streams are at "
            "the limit (CRISPEDIT_SSE_MAX_TOTAL), or Redis is unavailable",
        },
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
    CRISPEDIT_SSE_MAX_S seconds (`timeout` event), or with an `error` event when the key is
    revoked meanwhile; comments keep idle connections open. A key may hold
    CRISPEDIT_SSE_MAX_PER_KEY streams at once (429 beyond), an API process CRISPEDIT_SSE_MAX_TOTAL
    (503 beyond)."""
    # errors before the stream starts
    await run_in_threadpool(_job_for, redis, settings, store, key, job_id, "read")

    def view() -> dict | None:
        job = jobqueue.fetch(redis, job_id)
        return None if job is None else _shown(jobqueue.job_view(redis, job, store), key)

    async def stream() -> AsyncIterator[str]:
        started = last_sent = time.monotonic()
        previous = None
        count = 0
        while True:
            if not request.app.state.keys.holds(key):  # revoked since the stream began
                yield _sse("error", {"code": "unauthorized", "message": "the API key is revoked"})
                return
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

    release = _open_stream(request, settings, key)  # the last check: nothing raises after it
    return _CountedStream(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        release=release,
    )
