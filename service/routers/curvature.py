"""POST /v1/curvature: have a model's workers build (or find) a capability curvature, as a job.

Building curvature takes minutes to hours, so it is a job of its own on the model's queue, under
a timeout of its own (`Settings.curvature_timeout_s`), never part of an edit job. One build per
curvature runs at a time: a request for a curvature being built gets that job; one already built
(recorded by a worker and still in the store) is answered at once with its store key.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from contract.jobs import CURVATURE_KINDS, curvature_payload, curvature_spec
from service import access, jobqueue
from service.deps import KeyDep, RedisDep, SettingsDep, StoreDep, require_json, served_model
from service.errors import ApiError, responses

router = APIRouter(tags=["curvature"])


class CurvatureRequest(BaseModel):
    """Which curvature to build; what is not set is the worker's configuration."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128, examples=["smollm2"])
    kind: Literal[CURVATURE_KINDS] = Field(  # type: ignore[valid-type]
        default="kfac", description="kfac, or ekfac (a second pass for the eigenvalues)"
    )
    tokens: int | None = Field(
        default=None, ge=2, le=10**12, description="Corpus tokens (null: the worker's budget)"
    )
    corpus: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="A corpus on the workers' file system: `wikitext`, a text or JSONL file "
        "(gzipped or not), a folder or glob of them, or a Hugging Face datasets folder "
        "(null: the worker's CRISPEDIT_CORPUS)",
    )


class CurvatureAccepted(BaseModel):
    model: str
    kind: str
    status: Literal["built", "queued", "running"] = Field(
        description="built: `key` is in the store; else follow `url`"
    )
    key: str | None = Field(description="The store key of the curvature, once built")
    job_id: str | None = Field(description="The job building it (null when already built)")
    url: str | None = Field(description="Where to poll the job (GET)")


@router.post(
    "/v1/curvature",
    status_code=202,
    response_model=CurvatureAccepted,
    dependencies=[Depends(require_json)],
    summary="Build a model's capability curvature as a job",
    responses={
        200: {"model": CurvatureAccepted, "description": "Already built: its key"},
        **responses(404, 415),
    },
)
def build_curvature(
    body: CurvatureRequest,
    response: Response,
    settings: SettingsDep,
    key: KeyDep,
    redis: RedisDep,
    store: StoreDep,
) -> CurvatureAccepted:
    """200 with the key when this curvature is built; else 202 with the job that builds it (the
    one already queued or running for the same request, or a new one). Needs the `admin` role
    on the model. The job's progress (tokens done of the total) and, when done, its
    `curvature_key` are at GET /v1/jobs/{id}."""
    model = served_model(settings, key, body.model)
    unknown = ApiError(404, "unknown_model", f"model {model!r} is not served", "model")
    access.require(key, "admin", model, None, None, unknown)
    spec = curvature_spec(body.kind, body.tokens, body.corpus)
    built = jobqueue.built_curvature(redis, store, model, spec)
    if built is not None:
        response.status_code = 200
        return CurvatureAccepted(
            model=model, kind=body.kind, status="built", key=built, job_id=None, url=None
        )
    payload = curvature_payload(
        model, body.kind, body.tokens, body.corpus, key.name, access.actor(key)
    )
    job, _ = jobqueue.submit_curvature(redis, settings, payload)
    url = f"/v1/jobs/{job.id}"
    response.headers["Location"] = url
    status = jobqueue.job_view(redis, job)["status"]
    return CurvatureAccepted(
        model=model,
        kind=body.kind,
        status="running" if status == "running" else "queued",
        key=None,
        job_id=job.id,
        url=url,
    )
