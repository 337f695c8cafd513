"""Versions: a version's manifest, its delta file (own, or cumulative against the base) and that
delta as a PEFT LoRA adapter archive; publishing a held version (one kept outside its stream's
policy) by force; completions at a version and at its parent, by a worker of its model.

A key sees a version where `service.access` gives it `read` on the version's stream; any other
answers 404 as an unknown id does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from contract.adapters import ARCHIVES, DEFAULT_RANK, FORMATS, AdapterError
from contract.jobs import (
    GENERATE_TOKENS,
    MAX_GENERATE_TOKENS,
    MAX_PROMPTS,
    JobArgumentError,
    generate_payload,
)
from contract.names import VERSION_RULE, is_version_id
from curvature_store import Conflict, StoreError
from service import access, adapters, deltas, jobqueue
from service.deps import (
    KeyDep,
    RedisDep,
    SettingsDep,
    StoreDep,
    require_json,
    served_model,
    version_for,
)
from service.errors import ApiError, responses
from service.routers.streams import StreamHead

router = APIRouter(tags=["versions"])


@router.get(
    "/v1/versions/{version_id}",
    response_model=dict[str, Any],
    responses=responses(400, 404),
)
def get_version(version_id: str, key: KeyDep, store: StoreDep, settings: SettingsDep) -> dict:
    """The version's manifest: id, model, stream, parent, number, created_at, who made it
    (`actor`: team and key id), the facts, the editor's options and metrics, and each file's
    sha256 and size."""
    return version_for(settings, store, key, version_id)


@router.get(
    "/v1/versions/{version_id}/delta",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The delta as safetensors; ETag is its quoted sha256",
        },
        304: {"description": "Not modified (If-None-Match matched the ETag)"},
        **responses(400, 404),
    },
)
def get_delta(
    version_id: str,
    key: KeyDep,
    store: StoreDep,
    settings: SettingsDep,
    against: Annotated[
        Literal["parent", "base"],
        Query(description="parent: this version's own change; base: the sum from the base"),
    ] = "parent",
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Download the version's delta (safetensors), streamed, with `ETag` (its sha256) and
    `Content-Length`; `?against=base` gives the cumulative delta from the base model, which
    applied to the base gives this version's weights."""
    manifest = version_for(settings, store, key, version_id)
    if against == "base":
        path, sha = deltas.cumulative_delta(
            store, settings.cumulative_cache_dir, version_id, settings.cache_max_bytes
        )
        filename = f"{version_id}-cumulative.safetensors"
    else:
        path, sha = deltas.version_delta(store, version_id)
        filename = f"{version_id}.safetensors"
    return deltas.immutable_file(
        path, sha, manifest["model"], filename, "application/octet-stream", if_none_match
    )


class PublishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force: bool = Field(
        description="Must be true: the version is outside its stream's policy (it was held)"
    )
    expected_head: str | None = Field(
        default=None, description="When given, the head must still be this (409 otherwise)"
    )


@router.post(
    "/v1/versions/{version_id}/publish",
    response_model=StreamHead,
    dependencies=[Depends(require_json)],
    responses=responses(400, 404, 409, 413, 415),
)
def publish_version(
    version_id: str, body: PublishRequest, key: KeyDep, store: StoreDep, settings: SettingsDep
) -> StreamHead:
    """Publish a held version (an edit job on a guarded stream `rejected` it) by force: the
    head moves to it, and the stream's log records `forced` and who did it (team and key id).
    `force` must be true; the version's parent must still be the head (409 `stale_head`
    otherwise: the stream moved on since), and a version published already answers 409
    `not_held`. Admin keys only."""
    manifest = version_for(settings, store, key, version_id)
    model, stream = manifest["model"], manifest["stream"]
    owner = access.owner_of(settings, store, model, stream)
    not_found = ApiError(404, "not_found", f"no version {version_id}", "version_id")
    access.require(key, "admin", model, stream, owner, not_found)
    if not body.force:
        raise ApiError(
            400, "force_required", "publishing a version outside its policy needs force", "force"
        )
    if body.expected_head is not None and not is_version_id(body.expected_head):
        raise ApiError(400, "invalid_id", f"invalid version id: {VERSION_RULE}", "expected_head")
    expected = body.expected_head if "expected_head" in body.model_fields_set else ...
    try:
        info = store.publish_version(
            model, stream, version_id, expected, {"forced": True}, access.actor(key)
        )
    except Conflict as err:
        raise ApiError(409, "stale_head", str(err), "expected_head", head=err.head) from None
    except StoreError as err:
        raise ApiError(409, "not_held", str(err), "version_id") from None
    return StreamHead(model=model, stream=stream, head=info["version"], count=info["count"],
                         moves=info["moves"], moved_at=info["moved_at"])  # fmt: skip


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(
        description=f"1 to {MAX_PROMPTS} prompts, each non-empty",
        examples=[["The Eiffel Tower is in"]],
    )
    max_new_tokens: int | None = Field(
        default=None, description=f"Greedy tokens per completion, 1 to {MAX_GENERATE_TOKENS} "
        f"(default {GENERATE_TOKENS})",
    )  # fmt: skip


class GenerateAccepted(BaseModel):
    job_id: str
    url: str = Field(description="Where to poll the job (GET); its result holds the completions")
    model: str
    version: str


@router.post(
    "/v1/versions/{version_id}/generate",
    status_code=202,
    response_model=GenerateAccepted,
    dependencies=[Depends(require_json)],
    responses=responses(400, 404, 413, 415, 422),
)
def generate(
    version_id: str,
    body: GenerateRequest,
    key: KeyDep,
    store: StoreDep,
    settings: SettingsDep,
    redis: RedisDep,
    response: Response,
) -> GenerateAccepted:
    """Queue greedy completions of up to 20 prompts at this version and at its parent to a
    worker of the version's model, which answers as each version for a moment and restores its
    resident weights bit for bit. 202 with the job; the finished job's `result.completions` is a
    list of `{prompt, version, parent}`. Works for held versions too (try before forcing)."""
    manifest = version_for(settings, store, key, version_id)  # 404 unless the key may read it
    model = served_model(settings, key, manifest["model"], "version_id")
    try:
        payload = generate_payload(model, version_id, body.prompts, body.max_new_tokens, key.name)
    except JobArgumentError as err:
        raise ApiError(422, "invalid_request", str(err), err.field) from None
    scope = access.job_scope(settings, store, key, manifest)
    job = jobqueue.submit_generate(redis, settings, payload, scope)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return GenerateAccepted(
        job_id=job.id, url=f"/v1/jobs/{job.id}", model=model, version=version_id
    )


ARCHIVE_TYPES = {"tar.gz": "application/gzip", "zip": "application/zip"}


@router.get(
    "/v1/versions/{version_id}/adapter",
    response_class=FileResponse,
    responses={
        200: {
            "content": {t: {} for t in ARCHIVE_TYPES.values()},
            "description": "The adapter folder (adapter_config.json, adapter_model.safetensors, "
            "crispedit_adapter.json) as an archive; ETag is its quoted sha256",
        },
        304: {"description": "Not modified (If-None-Match matched the ETag)"},
        **responses(400, 404, 422),
    },
)
def get_adapter(
    version_id: str,
    key: KeyDep,
    store: StoreDep,
    settings: SettingsDep,
    against: Annotated[
        Literal["base"], Query(description="the adapter holds the cumulative delta from the base")
    ] = "base",
    rank: Annotated[
        int | None,
        Query(
            ge=1,
            description="every layer's rank (at most min(d_out, d_in)); with neither rank nor "
            f"energy: {DEFAULT_RANK}, capped at each layer's size",
        ),
    ] = None,
    energy: Annotated[
        float | None,
        Query(
            gt=0,
            le=1,
            description="per layer, the smallest rank keeping this share of the "
            "squared singular values (instead of rank)",
        ),
    ] = None,
    adapter_format: Annotated[
        Literal[FORMATS], Query(alias="format", description="the adapter format")
    ] = "peft",
    archive: Annotated[Literal[ARCHIVES], Query(description="the archive type")] = "tar.gz",
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Download the version's cumulative delta as a PEFT LoRA adapter: a truncated SVD of each
    edited layer at `rank` (or the rank holding `energy` of it), `lora_alpha = r`, with the
    per-layer rank and relative Frobenius error in `crispedit_adapter.json`. Load it with
    `PeftModel.from_pretrained(base_model, folder)` or an inference server's LoRA loader."""
    manifest = version_for(settings, store, key, version_id, "read")
    try:
        path, sha = adapters.adapter_archive(
            store, settings.cumulative_cache_dir, version_id, rank, energy, archive
        )
    except AdapterError as err:
        raise ApiError(422, "invalid_adapter", str(err), err.field) from None
    spec = f"e{energy:g}" if energy is not None else f"r{rank or DEFAULT_RANK}"
    filename = f"{version_id}-adapter-{spec}.{archive}"
    return deltas.immutable_file(
        path, sha, manifest["model"], filename, ARCHIVE_TYPES[archive], if_none_match
    )
