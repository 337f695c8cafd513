"""The worker's side of the job contract (`contract.jobs`): the RQ job functions `apply_edit`,
`build_curvature`, `generate` and `write_checkpoint`.

They find this process's resident engine for the payload's model, report progress into the job's
meta, and check for a cancellation request before work and between epochs (or batches of a
curvature build). A failed or cancelled edit publishes no version, except a job whose worker died
after committing its version: the API then reports the job as succeeded from that manifest
(`service.jobqueue.job_view`). An edit job never builds curvature: without it, it fails at once
(the API makes an edit wait for the curvature job it needs). A curvature job that fails or is
cancelled leaves its checkpoint, from which the next one resumes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from redis import Redis
from redis.exceptions import RedisError
from rq import get_current_job
from rq.job import Job

from contract.jobs import (
    CheckpointPayload,
    CheckpointResult,
    CurvaturePayload,
    CurvatureResult,
    EditPayload,
    EditResult,
    GeneratePayload,
    GenerateResult,
    cancel_key,
    curvature_index_key,
    curvature_spec,
)
from workers.engine import CurvatureMissing, Engine, JobCancelled

log = logging.getLogger(__name__)

_ENGINES: dict[str, Engine] = {}


def register(engine: Engine) -> None:
    """Make `engine` the resident engine for its model in this process."""
    _ENGINES[engine.name] = engine


def _engine(model: object) -> Engine:
    engine = _ENGINES.get(model)
    if engine is None:
        raise RuntimeError(f"no resident engine for model {model!r} here")
    return engine


def _reporter(job: Job | None) -> Callable[[dict], None]:
    """Write a job's progress into its meta, keeping what the API wrote meanwhile (a cancel)."""

    def report(progress: dict) -> None:
        if job is not None:
            try:
                job.meta = job.get_meta(refresh=True)
                job.meta["progress"] = progress
                job.save_meta()
            except RedisError:  # Redis away past the client's retries: the edit goes on
                log.warning("progress of job %s not saved: Redis unavailable", job.id)

    return report


def _cancel_check(job: Job | None) -> Callable[[], bool]:
    def cancelled() -> bool:
        if job is None:
            return False
        # the API sets both: the key survives a meta save that raced with its request
        try:
            flagged = job.connection.exists(cancel_key(job.id))
            return bool(flagged or job.get_meta(refresh=True).get("cancel_requested"))
        except RedisError:  # no cancel can have been requested through a Redis that is away
            return False

    return cancelled


def record_curvature(connection: Redis, model: str, spec: str, key: str) -> None:
    """Tell the API that curvature `spec` of `model` is built, as store key `key`."""
    connection.hset(curvature_index_key(model), spec, key)


def apply_edit(request: EditPayload) -> EditResult:
    """RQ job: apply an edit request with this process's resident engine (see module doc)."""
    engine = _engine(request.get("model"))
    job = get_current_job()
    try:
        return engine.apply(
            request, _reporter(job), _cancel_check(job),
            job_id=job.id if job is not None else None, build_curvature=False,
        )  # fmt: skip
    except CurvatureMissing as err:
        build = job.meta.get("curvature_job") if job is not None else None
        if build is None:
            raise
        raise CurvatureMissing(f"{err}; the curvature job {build} did not build it") from None


def generate(request: GeneratePayload) -> GenerateResult:
    """RQ job: greedy completions at a version and at its parent with this process's resident
    engine, whose weights are restored bit for bit afterwards (`Engine.generate`)."""
    return _engine(request.get("model")).generate(request)


def build_curvature(request: CurvaturePayload) -> CurvatureResult:
    """RQ job: build (or find) a curvature with this process's resident engine, resuming an
    interrupted build, and record it for the API (`contract.jobs.curvature_index_key`)."""
    started = time.perf_counter()
    engine = _engine(request.get("model"))
    job = get_current_job()
    report, cancelled = _reporter(job), _cancel_check(job)
    if cancelled():
        raise JobCancelled("cancelled before it started; nothing was built")

    def on_progress(info: dict) -> None:
        if cancelled():
            raise JobCancelled("cancelled by request; the next build resumes where this stopped")
        report({"phase": "curvature", **info})

    kind, tokens, corpus = request["kind"], request.get("tokens"), request.get("corpus")
    report({"phase": "curvature", "pass": "corpus", "tokens_done": 0, "tokens_total": None})
    _, manifest = engine.build_curvature(kind, tokens, corpus, report=on_progress)
    if job is not None:
        record_curvature(
            job.connection, engine.name, curvature_spec(kind, tokens, corpus), manifest["key"]
        )
    return CurvatureResult(
        key=manifest["key"],
        kind=kind,
        tokens=manifest["key_fields"]["tokens"],
        cache_hit=bool(manifest["cache_hit"]),
        resumed_from=manifest.get("meta", {}).get("resumed_from")
        if not manifest["cache_hit"]
        else None,
        seconds=round(time.perf_counter() - started, 3),
    )


def write_checkpoint(request: CheckpointPayload) -> CheckpointResult:
    """RQ job: write the merged checkpoint of a version into the store with this process's
    resident model (`Engine.write_checkpoint`), then apply the retention `keep`."""
    started = time.perf_counter()
    engine = _engine(request.get("model"))
    job = get_current_job()
    report, cancelled = _reporter(job), _cancel_check(job)
    if cancelled():
        raise JobCancelled("cancelled before it started; nothing was written")
    report({"phase": "checkpoint", "version": request["version"]})
    manifest, pruned = engine.write_checkpoint(request["version"], request["keep"])
    report({"phase": "done", "version": request["version"]})
    return CheckpointResult(
        version=manifest["version"],
        files=sorted(manifest["files"]),
        bytes=manifest["bytes"],
        pruned=pruned,
        seconds=round(time.perf_counter() - started, 3),
    )
