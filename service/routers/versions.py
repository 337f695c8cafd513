"""Versions: a version's manifest, its delta file (own, or cumulative against the base), and that
delta as a PEFT LoRA adapter archive.

A key sees only versions of models it may use; others answer 404 like unknown ids.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse

from contract.adapters import ARCHIVES, DEFAULT_RANK, FORMATS, AdapterError
from curvature_store import NotFound, Store
from service import adapters, deltas
from service.config import ApiKey
from service.deps import KeyDep, SettingsDep, StoreDep, check_version_id, version_for
from service.errors import ApiError, responses

router = APIRouter(tags=["versions"])


def _manifest_for(store: Store, key: ApiKey, version_id: str) -> dict:
    """The version's manifest, or 400 (malformed id) / 404 (unknown or not the key's model)."""
    check_version_id(version_id)
    try:
        manifest = store.manifest(version_id)
    except NotFound:
        manifest = None
    if manifest is None or not key.allows(manifest["model"]):
        raise ApiError(404, "not_found", f"no version {version_id}", "version_id")
    return manifest


@router.get(
    "/v1/versions/{version_id}",
    response_model=dict[str, Any],
    responses=responses(400, 404),
)
def get_version(version_id: str, key: KeyDep, store: StoreDep) -> dict:
    """The version's manifest: id, model, stream, parent, number, created_at, the facts, the
    editor's options and metrics, and each file's sha256 and size."""
    return _manifest_for(store, key, version_id)


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
    manifest = _manifest_for(store, key, version_id)
    if against == "base":
        path, sha = deltas.cumulative_delta(store, settings.cumulative_cache_dir, version_id)
        filename = f"{version_id}-cumulative.safetensors"
    else:
        path, sha = deltas.version_delta(store, version_id)
        filename = f"{version_id}.safetensors"
    headers = {
        "ETag": deltas.etag(sha),
        "X-Content-SHA256": sha,
        "X-Model": manifest["model"],
        # a version never changes, and neither do its deltas
        "Cache-Control": "private, max-age=31536000, immutable",
    }
    if deltas.not_modified(if_none_match, sha):
        return Response(status_code=304, headers=headers)
    return FileResponse(
        path, media_type="application/octet-stream", filename=filename, headers=headers
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
    manifest = version_for(store, key, version_id, "read")
    try:
        path, sha = adapters.adapter_archive(
            store, settings.cumulative_cache_dir, version_id, rank, energy, archive
        )
    except AdapterError as err:
        raise ApiError(422, "invalid_adapter", str(err), err.field) from None
    headers = {
        "ETag": deltas.etag(sha),
        "X-Content-SHA256": sha,
        "X-Model": manifest["model"],
        "Cache-Control": "private, max-age=31536000, immutable",
    }
    if deltas.not_modified(if_none_match, sha):
        return Response(status_code=304, headers=headers)
    spec = f"e{energy:g}" if energy is not None else f"r{rank or DEFAULT_RANK}"
    return FileResponse(
        path,
        media_type=ARCHIVE_TYPES[archive],
        filename=f"{version_id}-adapter-{spec}.{archive}",
        headers=headers,
    )
