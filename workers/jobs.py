"""The worker's side of the job contract (`contract.jobs`): the RQ job function `apply_edit`.

It finds this process's resident engine for the payload's model, reports progress into the job's
meta, and checks for a cancellation request before work and between epochs. A failed or
cancelled job publishes no version, except a job whose worker died after committing its version:
the API then reports the job as succeeded from that manifest (`service.jobqueue.job_view`).
"""

from __future__ import annotations

from rq import get_current_job

from contract.jobs import EditPayload, EditResult, cancel_key
from workers.engine import Engine

_ENGINES: dict[str, Engine] = {}


def register(engine: Engine) -> None:
    """Make `engine` the resident engine for its model in this process."""
    _ENGINES[engine.name] = engine


def apply_edit(request: EditPayload) -> EditResult:
    """RQ job: apply an edit request with this process's resident engine (see module doc)."""
    engine = _ENGINES.get(request.get("model"))
    if engine is None:
        raise RuntimeError(f"no resident engine for model {request.get('model')!r} here")
    job = get_current_job()

    def report(progress: dict) -> None:
        if job is not None:
            job.meta = job.get_meta(refresh=True)  # keep what the API wrote meanwhile (a cancel)
            job.meta["progress"] = progress
            job.save_meta()

    def cancelled() -> bool:
        if job is None:
            return False
        # the API sets both: the key survives a meta save that raced with its request
        flagged = job.connection.exists(cancel_key(job.id))
        return bool(flagged or job.get_meta(refresh=True).get("cancel_requested"))

    return engine.apply(request, report, cancelled, job_id=job.id if job is not None else None)
