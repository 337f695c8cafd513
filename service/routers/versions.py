"""Versions: a version's manifest and its delta file (own, or cumulative against the base).

A key sees a version where `service.access` gives it `read` on the version's stream; any other
answers 404 as an unknown id does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse

from curvature_store import NotFound, Store
from service import access, deltas
from service.config import ApiKey, Settings
from service.deps import KeyDep, SettingsDep, StoreDep, check_version_id
from service.errors import ApiError, responses

router = APIRouter(tags=["versions"])


def _manifest_for(store: Store, settings: Settings, key: ApiKey, version_id: str) -> dict:
    """The version's manifest, or 400 (malformed id) / 404 (unknown, or the key may not read
    its stream)."""
    check_version_id(version_id)
    not_found = ApiError(404, "not_found", f"no version {version_id}", "version_id")
    try:
        manifest = store.manifest(version_id)
    except NotFound:
        raise not_found from None
    model, stream = manifest["model"], manifest["stream"]
    owner = access.owner_of(settings, store, model, stream)
    access.require(key, "read", model, stream, owner, not_found)
    return manifest


@router.get(
    "/v1/versions/{version_id}",
    response_model=dict[str, Any],
    responses=responses(400, 404),
)
def get_version(version_id: str, key: KeyDep, store: StoreDep, settings: SettingsDep) -> dict:
    """The version's manifest: id, model, stream, parent, number, created_at, who made it
    (`actor`: team and key id), the facts, the editor's options and metrics, and each file's
    sha256 and size."""
    return _manifest_for(store, settings, key, version_id)


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
    manifest = _manifest_for(store, settings, key, version_id)
    if against == "base":
        path, sha = deltas.cumulative_delta(
            store, settings.cumulative_cache_dir, version_id, settings.cache_max_bytes
        )
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
