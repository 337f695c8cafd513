"""Merged checkpoints: the full model at a version as a Hugging Face folder, for any server.

`POST /v1/versions/{id}/checkpoint` queues a job on the model's workers that writes it into the
store (sharded safetensors, config, tokenizer; `curvature_store.checkpoints`); the job is
followed at GET /v1/jobs/{id}. `GET .../checkpoint` lists its files with sizes, sha256 and
download URLs, and `GET .../checkpoint/files/{name}` serves one, resumable with HTTP range
requests. The store keeps the newest `Settings.checkpoints_kept`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from contract.jobs import checkpoint_payload
from curvature_store import NotFound
from curvature_store.checkpoints import checkpoint_file, read_checkpoint
from service import access, deltas, jobqueue
from service.deps import KeyDep, RedisDep, SettingsDep, StoreDep, served_model, version_for
from service.errors import ApiError, responses

router = APIRouter(tags=["checkpoints"])


class CheckpointAccepted(BaseModel):
    version: str
    status: Literal["ready", "queued", "running"] = Field(
        description="ready: the files are listed at `checkpoint_url`; else follow `url`"
    )
    job_id: str | None = Field(description="The job writing it (null when ready)")
    url: str | None = Field(description="Where to poll the job (GET)")
    checkpoint_url: str = Field(description="Where its files are listed (GET)")


class CheckpointFile(BaseModel):
    name: str
    bytes: int
    sha256: str
    url: str = Field(description="GET it; Range requests resume a download")


class Checkpoint(BaseModel):
    version: str
    model: str
    stream: str
    created_at: str
    bytes: int = Field(description="All files together")
    files: list[CheckpointFile]


def _url(version_id: str) -> str:
    return f"/v1/versions/{version_id}/checkpoint"


@router.post(
    "/v1/versions/{version_id}/checkpoint",
    status_code=202,
    response_model=CheckpointAccepted,
    summary="Write the full model at a version into the store, as a job",
    responses={
        200: {"model": CheckpointAccepted, "description": "Already written"},
        **responses(400, 404),
    },
)
def create_checkpoint(
    version_id: str,
    response: Response,
    key: KeyDep,
    settings: SettingsDep,
    redis: RedisDep,
    store: StoreDep,
) -> CheckpointAccepted:
    """200 when the version's checkpoint is in the store; else 202 with the job that writes it
    (the one already queued or running for this version, or a new one on the model's queue).
    Writing it prunes the oldest checkpoints beyond the retention setting."""
    manifest = version_for(settings, store, key, version_id, "edit")
    served_model(settings, key, manifest["model"], "version_id")  # a worker must serve it
    if read_checkpoint(store, version_id) is not None:
        response.status_code = 200
        return CheckpointAccepted(
            version=version_id, status="ready", job_id=None, url=None,
            checkpoint_url=_url(version_id),
        )  # fmt: skip
    payload = checkpoint_payload(manifest["model"], version_id, settings.checkpoints_kept, key.name)
    scope = access.job_scope(settings, store, key, manifest)
    job = jobqueue.submit_checkpoint(redis, settings, payload, scope)
    url = f"/v1/jobs/{job.id}"
    response.headers["Location"] = url
    status = jobqueue.job_view(redis, job)["status"]
    return CheckpointAccepted(
        version=version_id,
        status="running" if status == "running" else "queued",
        job_id=job.id,
        url=url,
        checkpoint_url=_url(version_id),
    )


@router.get(
    "/v1/versions/{version_id}/checkpoint",
    response_model=Checkpoint,
    responses=responses(400, 404),
)
def get_checkpoint(
    version_id: str, key: KeyDep, store: StoreDep, settings: SettingsDep
) -> Checkpoint:
    """The version's checkpoint: its files (a Hugging Face model folder) with their sizes,
    sha256 and download URLs; 404 `no_checkpoint` until a checkpoint job has written it (or
    after the retention setting pruned it)."""
    version_for(settings, store, key, version_id, "read")
    manifest = read_checkpoint(store, version_id)
    if manifest is None:
        raise ApiError(
            404, "no_checkpoint", f"version {version_id} has no checkpoint: POST to create it",
            "version_id",
        )  # fmt: skip
    files = [
        CheckpointFile(name=name, url=f"{_url(version_id)}/files/{name}", **record)
        for name, record in sorted(manifest["files"].items())
    ]
    return Checkpoint(
        **{k: manifest[k] for k in ("version", "model", "stream", "created_at", "bytes")},
        files=files,
    )


@router.get(
    "/v1/versions/{version_id}/checkpoint/files/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file"},
        206: {"description": "The byte range asked for (`Range: bytes=a-b`)"},
        304: {"description": "Not modified (If-None-Match matched the ETag)"},
        416: {"description": "The range is outside the file"},
        **responses(400, 404),
    },
)
def get_checkpoint_file(
    version_id: str,
    name: str,
    key: KeyDep,
    settings: SettingsDep,
    store: StoreDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """One file of the checkpoint, with `ETag` (its sha256), `Accept-Ranges: bytes` and range
    requests (206) so that a broken download of a large shard resumes where it stopped."""
    manifest = version_for(settings, store, key, version_id, "read")
    try:
        path, record = checkpoint_file(store, version_id, name)
    except NotFound as err:
        raise ApiError(404, "not_found", str(err), "name") from None
    return deltas.immutable_file(
        path, record["sha256"], manifest["model"], name, "application/octet-stream", if_none_match
    )
