"""GET /v1/models: the served models the key may use, the streams it may see, and their curvature.

The store keys curvature by content (model fingerprint, layers, corpus...), not by model name. A
model's curvature is found through the fingerprint configured for it, the base fingerprints and
curvature keys its versions record, and the keys its workers recorded as built
(`contract.jobs.curvature_index_key`); a curvature job queued or running shows as `building`.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field
from redis import Redis

from contract.jobs import queue_name
from curvature_store import Store, StoreError
from service import access, jobqueue
from service.config import ApiKey, ServedModel, Settings
from service.deps import KeyDep, RedisDep, SettingsDep, StoreDep

router = APIRouter(tags=["models"])


class StreamInfo(BaseModel):
    stream: str
    head: str | None
    count: int
    moved_at: str | None


class CurvatureInfo(BaseModel):
    key: str
    layers: list[str]
    tokens: int
    kind: str
    labels: str
    bytes: int
    created_at: str | None


class ModelInfo(BaseModel):
    name: str
    layers: list[str] | None = Field(description="The configured edited layers (null: default)")
    queue: str
    streams: list[StreamInfo]
    curvature_status: str = Field(
        description="'cached' when curvature is stored, else 'building' while a curvature job "
        "is queued or running, else 'none'"
    )
    curvature: list[CurvatureInfo]


class ModelList(BaseModel):
    models: list[ModelInfo]


def _describe(
    settings: Settings, key: ApiKey, store: Store, redis: Redis, name: str, served: ServedModel
) -> ModelInfo:
    streams = []
    fingerprints = {served.fingerprint} if served.fingerprint else set()
    keys: set[str] = jobqueue.recorded_curvature(redis, name)
    for model, stream in store.streams():
        if model != name:
            continue
        if not access.may(
            key, "read", model, stream, access.owner_of(settings, store, model, stream)
        ):
            continue
        info = store.head_info(model, stream)
        streams.append(
            StreamInfo(
                stream=stream, head=info["version"], count=info["count"], moved_at=info["moved_at"]
            )
        )
        if info["version"] is not None:
            try:
                manifest = store.manifest(info["version"])
            except StoreError:
                continue  # a broken stream is `verify`'s business, not a reason to fail here
            fingerprints.add(manifest.get("base_fingerprint"))
            keys.add(manifest.get("curvature_key"))
    curvature = [
        CurvatureInfo(
            key=doc["key"],
            layers=doc["key_fields"]["layers"],
            tokens=doc["key_fields"]["tokens"],
            kind=doc["key_fields"]["kind"],
            labels=doc["key_fields"]["labels"],
            bytes=doc["bytes"],
            created_at=doc.get("created_at"),
        )
        for doc in store.list_curvature()
        if doc["key"] in keys or doc["key_fields"].get("model_fingerprint") in fingerprints
    ]
    return ModelInfo(
        name=name,
        layers=served.layers,
        queue=queue_name(name),
        streams=streams,
        curvature_status=_status(redis, name, curvature),
        curvature=curvature,
    )


def _status(redis: Redis, name: str, curvature: list[CurvatureInfo]) -> str:
    if curvature:
        return "cached"
    return "building" if jobqueue.curvature_building(redis, name) else "none"


@router.get("/v1/models", response_model=ModelList)
def list_models(settings: SettingsDep, key: KeyDep, store: StoreDep, redis: RedisDep) -> ModelList:
    """The served models this key may use, each with the heads of the streams it may read and
    the model's stored curvature."""
    names = sorted(name for name in settings.models if access.may(key, "read", name))
    return ModelList(
        models=[
            _describe(settings, key, store, redis, name, settings.models[name]) for name in names
        ]
    )
