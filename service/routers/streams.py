"""Streams: the streams a key may read, a stream's versions, its log (who moved its head, when),
and rolling its head back.

A key sees a stream only where `service.access` gives it `read` (rollback: `admin`); any other
stream answers 404 as one that does not exist.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator

from contract.names import DELTA_FILE, VERSION_RULE, is_version_id
from curvature_store import Conflict, NotFound, Store, StoreError
from service import access
from service.config import ApiKey, Settings
from service.deps import (
    KeyDep,
    SettingsDep,
    StoreDep,
    StreamAdminDep,
    StreamReadDep,
    check_name,
    require_json,
    served_model,
    unknown_stream,
)
from service.errors import ApiError, responses
from service.routers.jobs import Actor

router = APIRouter(tags=["streams"])


class StreamSummary(BaseModel):
    model: str
    stream: str
    head: str | None = Field(description="The head version (null: the base model)")
    versions: int = Field(description="Versions in the head's lineage (rolled back: not counted)")
    updated_at: str | None = Field(description="When the head last moved")


class StreamList(BaseModel):
    streams: list[StreamSummary] = Field(description="Sorted by model, then stream")


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
        if value is not None and not is_version_id(value):
            raise ValueError(f"not a version id: {VERSION_RULE}")
        return value


class Owner(BaseModel):
    team: str
    claimed_at: str | None = None


class LogEntry(BaseModel):
    op: str = Field(description="create (a new version) or rollback")
    version: str | None = Field(description="The head after the move (null: the base)")
    previous: str | None = Field(description="The head before the move")
    at: str | None
    moves: int
    actor: Actor | None = Field(description="Who moved it: team and key id (never the key)")


class StreamLog(BaseModel):
    model: str
    stream: str
    owner: Owner | None = Field(description="The team that owns the stream")
    entries: list[LogEntry] = Field(description="Every head move, oldest first")


def _require_stream(store: Store, model: str, stream: str) -> None:
    if not store.has_stream(model, stream):
        raise unknown_stream(model, stream)


def _unknown_version(version: str) -> ApiError:
    return ApiError(404, "not_found", f"no version {version}", "version")


def _check_target(settings: Settings, store: Store, key: ApiKey, version: str) -> None:
    """404 for a rollback target the key may not read (another team's, or unknown), so that the
    answer does not tell whether another team's version id exists."""
    try:
        manifest = store.manifest(version)
    except NotFound:
        raise _unknown_version(version) from None
    model, stream = manifest["model"], manifest["stream"]
    owner = access.owner_of(settings, store, model, stream)
    access.require(key, "read", model, stream, owner, _unknown_version(version))


@router.get("/v1/streams", response_model=StreamList, responses=responses(400, 404))
def list_streams(
    settings: SettingsDep,
    key: KeyDep,
    store: StoreDep,
    model: Annotated[str | None, Query(description="Only this model's streams")] = None,
) -> StreamList:
    """Every stream of a served model that this key may read, with its head, its number of
    versions and when its head last moved; `?model=` narrows it to one model."""
    if model is not None:
        served_model(settings, key, check_name(model, "model"))
    found = []
    for name, stream in store.streams():
        if name not in settings.models or (model is not None and name != model):
            continue
        if not access.may(
            key, "read", name, stream, access.owner_of(settings, store, name, stream)
        ):
            continue
        info = store.head_info(name, stream)
        found.append(
            StreamSummary(
                model=name,
                stream=stream,
                head=info["version"],
                versions=info["count"],
                updated_at=info["moved_at"],
            )
        )
    return StreamList(streams=found)


@router.get(
    "/v1/streams/{model}/{stream}/versions",
    response_model=StreamVersions,
    responses=responses(400, 404),
)
def list_versions(ref: StreamReadDep, store: StoreDep) -> StreamVersions:
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
    responses=responses(400, 404, 409, 413, 415),
)
def rollback(
    ref: StreamAdminDep,
    body: RollbackRequest,
    store: StoreDep,
    key: KeyDep,
    settings: SettingsDep,
) -> StreamHead:
    """Move the stream's head back to an ancestor version (null: the base model); needs the
    `admin` role. Nothing is deleted: later versions stay listed, out of the lineage. With
    `expected_head`, 409 unless the head is still that version (null: the base). The stream's
    log records who did it."""
    _require_stream(store, ref.model, ref.stream)
    if body.version is not None:
        _check_target(settings, store, key, body.version)
    expected = body.expected_head if "expected_head" in body.model_fields_set else ...
    try:
        info = store.rollback(
            ref.model, ref.stream, body.version, expected_head=expected, actor=access.actor(key)
        )
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


@router.get(
    "/v1/streams/{model}/{stream}/log",
    response_model=StreamLog,
    responses=responses(400, 404),
)
def stream_log(ref: StreamReadDep, store: StoreDep) -> StreamLog:
    """The stream's owner and every move of its head, oldest first: each new version and each
    rollback, with when and who (team and key id)."""
    _require_stream(store, ref.model, ref.stream)
    recorded = store.stream_owner(ref.model, ref.stream) or {}
    entries = [
        LogEntry(
            op=entry.get("op", "unknown"),
            version=entry.get("version"),
            previous=entry.get("from"),
            at=entry.get("at"),
            moves=entry["moves"],
            actor=entry.get("actor"),
        )
        for entry in store.log(ref.model, ref.stream)
    ]
    return StreamLog(
        model=ref.model,
        stream=ref.stream,
        owner=Owner(team=ref.owner, claimed_at=recorded.get("claimed_at")) if ref.owner else None,
        entries=entries,
    )
