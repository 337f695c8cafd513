"""Streams: a stream's versions, and rolling its head back."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator

from contract.names import DELTA_FILE, VERSION_RE
from curvature_store import Conflict, NotFound, StoreError
from service.deps import KeyDep, StoreDep, StreamDep, require_json
from service.errors import ApiError, responses

router = APIRouter(tags=["streams"])


class FileInfo(BaseModel):
    sha256: str
    bytes: int


class VersionSummary(BaseModel):
    id: str
    number: int
    parent: str | None
    created_at: str | None
    in_lineage: bool = Field(description="In the head's lineage (false: rolled back past)")
    held: bool = Field(
        default=False,
        description="Kept outside the stream's policy, never published (POST "
        "/v1/versions/{id}/publish with force publishes it)",
    )
    head: bool
    n_facts: int | None
    method: str | None
    metrics: Any = None
    delta: FileInfo


class StreamVersions(BaseModel):
    model: str
    stream: str
    head: str | None
    versions: list[VersionSummary] = Field(description="Every version ever made, newest first")


class StreamHead(BaseModel):
    model: str
    stream: str
    head: str | None = Field(description="The head version (null: the base model)")
    count: int = Field(description="Versions in the head's lineage")
    moves: int
    moved_at: str | None


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(description="An ancestor of the head, or null for the base model")
    expected_head: str | None = Field(
        default=None, description="When given, the head must still be this (409 otherwise)"
    )

    @field_validator("version", "expected_head")
    @classmethod
    def _version_id(cls, value: str | None) -> str | None:
        if value is not None and not VERSION_RE.match(value):
            raise ValueError("expected a version id: 'v' followed by 26 hex digits")
        return value


def _require_stream(store, model: str, stream: str) -> None:
    if not store.has_stream(model, stream):
        raise ApiError(404, "unknown_stream", f"no stream {model}/{stream}", "stream")


@router.get(
    "/v1/streams/{model}/{stream}/versions",
    response_model=StreamVersions,
    responses=responses(400, 403, 404),
)
def list_versions(ref: StreamDep, store: StoreDep) -> StreamVersions:
    """Every version of the stream, newest first, with whether it is in the head's lineage."""
    _require_stream(store, ref.model, ref.stream)
    head = store.head(ref.model, ref.stream)
    summaries = []
    for doc in store.versions(ref.model, ref.stream):
        facts = doc.get("facts")
        summaries.append(
            VersionSummary(
                id=doc["id"],
                number=doc["number"],
                parent=doc["parent"],
                created_at=doc.get("created_at"),
                in_lineage=doc["in_lineage"],
                held=doc.get("held", False),
                head=doc["id"] == head,
                n_facts=len(facts) if isinstance(facts, list) else None,
                method=doc.get("method") if isinstance(doc.get("method"), str) else None,
                metrics=doc.get("metrics"),
                delta=FileInfo(**doc["files"][DELTA_FILE]),
            )
        )
    return StreamVersions(model=ref.model, stream=ref.stream, head=head, versions=summaries)


@router.post(
    "/v1/streams/{model}/{stream}/rollback",
    response_model=StreamHead,
    dependencies=[Depends(require_json)],
    responses=responses(400, 403, 404, 409, 413, 415),
)
def rollback(ref: StreamDep, body: RollbackRequest, store: StoreDep, key: KeyDep) -> StreamHead:
    """Move the stream's head back to an ancestor version (null: the base model). Nothing is
    deleted: later versions stay listed, out of the lineage. With `expected_head`, 409 unless
    the head is still that version (null: the base)."""
    _require_stream(store, ref.model, ref.stream)
    if body.version is not None:
        # a version of a model the key may not use answers as an unknown one (404), not 409:
        # the answer must not tell whether another tenant's version id exists
        try:
            owner = store.manifest(body.version)["model"]
        except NotFound:
            owner = None
        if owner is None or not key.allows(owner):
            raise ApiError(404, "not_found", f"no version {body.version}", "version")
    expected = body.expected_head if "expected_head" in body.model_fields_set else ...
    try:
        info = store.rollback(ref.model, ref.stream, body.version, expected_head=expected)
    except NotFound:
        raise ApiError(404, "not_found", f"no version {body.version}", "version") from None
    except Conflict as err:
        raise ApiError(409, "stale_head", str(err), "expected_head", head=err.head) from None
    except StoreError as err:  # not on this stream, or not an ancestor of the head
        raise ApiError(409, "not_an_ancestor", str(err), "version") from None
    return StreamHead(
        model=ref.model,
        stream=ref.stream,
        head=info["version"],
        count=info["count"],
        moves=info["moves"],
        moved_at=info["moved_at"],
    )
