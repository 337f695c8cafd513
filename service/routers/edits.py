"""POST /v1/edits: validate fact edits and enqueue them as a job on the stream's model queue.

Nothing is enqueued unless the whole request is valid: the body (pydantic), each fact (read by
`contract.facts`, as the engine reads it), the model (served, allowed for the key) and the
expected parent version (still the stream's head).
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from contract.facts import (
    ControlCharacter,
    FactsError,
    FactTooLong,
    UnknownRelation,
    fact_from_record,
    fact_to_record,
)
from contract.jobs import edit_payload
from contract.names import NAME_RULE, VERSION_RULE, is_name, is_version_id
from contract.settings import (
    ANCHOR_CHOICES,
    CHAT_TEMPLATE_CHOICES,
    DEFAULTS,
    LR_SCHEDULES,
    EditSettings,
    SettingsError,
    option_rules,
)
from curvature_store import Store
from service import access, idempotency, jobqueue
from service.config import Settings
from service.deps import (
    KeyDep,
    RedisDep,
    SettingsDep,
    StoreDep,
    require_json,
    served_model,
    unknown_stream,
)
from service.errors import ApiError, responses

router = APIRouter(tags=["edits"])

Text = Annotated[str, Field(max_length=2000)]


class Neighbor(BaseModel):
    """An unrelated prompt whose answer the edit must leave unchanged."""

    model_config = ConfigDict(extra="forbid")
    prompt: Text
    target: Text


class FactIn(BaseModel):
    """One fact edit: complete `prompt` (or `relation` filled with `subject`) with `target`."""

    model_config = ConfigDict(extra="forbid")
    subject: Text | None = Field(default=None, examples=["The Eiffel Tower"])
    relation: Text | None = Field(
        default=None,
        description="A template with {} for the subject, a phrase that follows the subject, or "
        "a Wikidata property id such as P17 (see GET /v1/relations).",
        examples=["P17"],
    )
    prompt: Text | None = Field(default=None, description="The full prompt (instead of relation)")
    object: Text | None = Field(default=None, description="The new answer (alias of target)")
    target: Text | None = Field(default=None, description="The new answer", examples=["Italy"])
    paraphrases: list[Text] = Field(default_factory=list, max_length=100)
    neighbors: list[Neighbor] = Field(default_factory=list, max_length=100)
    ground_truth: Text | None = Field(default=None, description="The old answer, if known")


def _option(name: str) -> Any:
    """The request field of EditSettings option `name`: null (the worker's default) or a value
    within the option's bounds, and the service's own upper limit where it is stricter."""
    rules = option_rules(name)
    bounds = {rule: rules[rule] for rule in ("ge", "gt", "le", "lt") if rule in rules}
    if "api_le" in rules:
        bounds["le"] = rules["api_le"]
    if isinstance(getattr(DEFAULTS, name), float):
        bounds["allow_inf_nan"] = False
    return Field(default=None, description=rules["doc"], **bounds)


class EditOptions(BaseModel):
    """Editor options (`contract.settings.EditSettings`, where each is defined with its default
    and bounds); what is not set is left to the worker's defaults."""

    model_config = ConfigDict(extra="forbid")
    method: Literal[option_rules("method")["choices"]] | None = _option("method")  # type: ignore[valid-type]
    gamma: float | None = _option("gamma")
    layers: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, min_length=1, max_length=256, description=option_rules("layers")["doc"]
    )
    epochs: int | None = _option("epochs")
    lr: float | None = _option("lr")
    lr_schedule: Literal[LR_SCHEDULES] | None = _option("lr_schedule")  # type: ignore[valid-type]
    anchors: int | None = _option("anchors")
    anchor_weight: float | None = _option("anchor_weight")
    anchor_choice: Literal[ANCHOR_CHOICES] | None = _option("anchor_choice")  # type: ignore[valid-type]
    clip: float | None = _option("clip")
    laplace: float | None = _option("laplace")
    consolidate: float | None = _option("consolidate")
    contexts: int | None = _option("contexts")
    drift_budget: float | None = _option("drift_budget")
    chat_template: Literal[CHAT_TEMPLATE_CHOICES] | None = _option("chat_template")  # type: ignore[valid-type]
    value_steps: int | None = _option("value_steps")
    value_lr: float | None = _option("value_lr")
    value_clamp: float | None = _option("value_clamp")
    kl_factor: float | None = _option("kl_factor")
    covariance_weight: float | None = _option("covariance_weight")
    null_threshold: float | None = _option("null_threshold")
    alphaedit_l2: float | None = _option("alphaedit_l2")
    evaluate: bool | None = Field(
        default=None, description="Measure the edit (efficacy, locality, perplexity) before and "
        "after; the results land in the version's metrics.",
    )  # fmt: skip
    force: bool | None = Field(
        default=None, description="On a guarded stream, publish the version even when it is "
        "outside the stream's policy (recorded as forced in the stream's log). Admin keys only.",
    )  # fmt: skip

    @field_validator("lr_schedule", "clip", "laplace", "contexts", "drift_budget")
    @classmethod
    def _option_for_method(cls, value: float | None, info: ValidationInfo) -> float | None:
        # the rules that tie lr_schedule, clip, laplace, contexts and drift_budget to the method are
        # EditSettings'; bounds were checked above
        method = info.data.get("method") or DEFAULTS.method
        if value is not None:
            try:
                EditSettings(method=method, **{info.field_name: value})
            except SettingsError as err:
                raise ValueError(str(err)) from None
        return value


class EditRequest(BaseModel):
    """A batch of fact edits for one stream of one model."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128, examples=["smollm2"])
    stream: str = Field(default="main", min_length=1, max_length=128)
    facts: list[FactIn] = Field(
        min_length=1, description="At most CRISPEDIT_MAX_FACTS facts (default 100)."
    )
    parent_version: str | None = Field(
        default=None,
        description="The head this edit must apply on (null: the base model); 409 otherwise.",
    )
    options: EditOptions = Field(default_factory=EditOptions)

    @field_validator("stream")
    @classmethod
    def _stream_name(cls, value: str) -> str:
        if not is_name(value):
            raise ValueError(NAME_RULE)
        return value

    @field_validator("parent_version")
    @classmethod
    def _version_id(cls, value: str | None) -> str | None:
        if value is not None and not is_version_id(value):
            raise ValueError(f"not a version id: {VERSION_RULE}")
        return value


class EditAccepted(BaseModel):
    job_id: str
    url: str = Field(description="Where to poll the job (GET).")
    model: str
    stream: str


_FIELD_RE = re.compile(r"field '([^']+)'")


# the refusals that `contract.facts` names itself: 400 with their own code; other bad facts 422
_REFUSED = {FactTooLong: "fact_too_long", ControlCharacter: "control_character"}


def _to_record(index: int, fact: FactIn) -> dict:
    """The fact as the engine's canonical record, or ApiError naming `facts[i].field`: 400 for a
    fact over the size limits of `contract.facts` or with a control character in what defines
    it, 422 for any other bad fact."""
    where = f"facts[{index}]"
    try:
        return fact_to_record(fact_from_record(fact.model_dump(exclude_none=True), where))
    except FactsError as err:
        found = _FIELD_RE.search(str(err))
        field = f"{where}.{found.group(1)}" if found else where
        refused = _REFUSED.get(type(err))
        if refused is not None:
            raise ApiError(400, refused, str(err), field) from None
        code = "unknown_relation" if isinstance(err, UnknownRelation) else "invalid_fact"
        raise ApiError(422, code, str(err), field) from None


@router.post(
    "/v1/edits",
    status_code=202,
    response_model=EditAccepted,
    dependencies=[Depends(require_json)],
    summary="Submit fact edits as a job",
    responses={
        200: {"model": EditAccepted, "description": "A retry: the job of the first request"},
        **responses(400, 403, 404, 409, 413, 415),
    },
)
def submit_edit(
    body: EditRequest,
    request: Request,
    response: Response,
    settings: SettingsDep,
    key: KeyDep,
    redis: RedisDep,
    store: StoreDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> EditAccepted:
    """Validate the edit and enqueue it; 202 with the job id (200 for an idempotent retry).

    Jobs of one stream run strictly in submission order. With `parent_version`, the stream's head
    must be that version now (409 with the current head otherwise), and the worker checks it
    again when the job runs. An edit whose method needs a curvature that is not built yet waits
    for the job building it (started now if none runs: see POST /v1/curvature); if that build
    fails, the edit fails saying so. Needs the `edit` role on the stream; the first edit of a
    new stream makes the key's team its owner (404 for another team's stream). `options.force`
    needs the `admin` role on the stream (403 otherwise).
    """
    model = served_model(settings, key, body.model)
    owner = access.owner_of(settings, store, model, body.stream)
    access.require(key, "edit", model, body.stream, owner, unknown_stream(model, body.stream))
    if body.options.force and not access.may(key, "admin", model, body.stream, owner):
        raise ApiError(
            403, "forbidden", "only an admin key may force past a stream's policy", "options.force"
        )
    _check_size(body, settings.max_facts)
    _check_layers(settings, model, body.options.layers)
    records = [_to_record(i, fact) for i, fact in enumerate(body.facts)]
    check_parent = "parent_version" in body.model_fields_set

    job_id = uuid.uuid4().hex
    digest = idempotency.request_digest(
        {"body": body.model_dump(mode="json"), "check_parent": check_parent}
    )
    if idempotency_key is not None:
        earlier = idempotency.reserve(
            redis, key.id, idempotency_key, digest, job_id, settings.idempotency_ttl_s
        )
        if earlier is not None:  # a retry: answer as the first time, without re-checking
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
            return _accepted(response, earlier, model, body.stream)
    try:
        if check_parent:
            _check_parent(store, model, body)
        payload = edit_payload(
            model=model,
            stream=body.stream,
            facts=records,
            parent_version=body.parent_version,
            check_parent=check_parent,
            options=body.options.model_dump(exclude_none=True),
            key_name=key.name,
            actor=access.actor(key),
        )
        if owner is None:  # a new stream: of two teams racing to create it, one owns it
            owner = access.claim(settings, store, key, model, body.stream)
            access.require(
                key, "edit", model, body.stream, owner, unknown_stream(model, body.stream)
            )
        method = body.options.method or DEFAULTS.method
        laplace = DEFAULTS.laplace if body.options.laplace is None else body.options.laplace
        consolidate = body.options.consolidate
        consolidate = DEFAULTS.consolidate if consolidate is None else consolidate
        build = jobqueue.curvature_for_edit(
            redis, settings, store, model, method, key.name, access.actor(key), laplace=laplace,
            consolidate=consolidate,
        )  # fmt: skip
        job = jobqueue.submit(redis, settings, job_id, payload, curvature_job=build, owner=owner)
    except BaseException:
        if idempotency_key is not None:
            idempotency.release(redis, key.id, idempotency_key)
        raise
    if idempotency_key is not None:
        idempotency.complete(redis, key.id, idempotency_key, digest, job.id)
    metrics = request.app.state.metrics
    metrics.edits_accepted.labels(model).inc()
    metrics.facts_accepted.labels(model).inc(len(records))
    return _accepted(response, job.id, model, body.stream)


def _check_size(body: EditRequest, max_facts: int) -> None:
    """422 `too_many_facts` for a request over the deployment's limit."""
    if len(body.facts) > max_facts:
        raise ApiError(
            422,
            "too_many_facts",
            f"{len(body.facts)} facts in one request; the limit is {max_facts}",
            "facts",
        )


def _check_layers(settings: Settings, model: str, layers: list[str] | None) -> None:
    """400 on `options.layers` unless it is the layer list the model's workers edit: a worker
    edits only its own layers (`workers.engine`), so any other list would wait its turn in the
    stream and then fail. Without `layers` in the served model's configuration the API cannot
    tell, and refuses any explicit list."""
    if layers is None:
        return
    served = settings.models[model].layers
    if served is None:
        raise ApiError(
            400,
            "layers_not_served",
            f"model {model!r} is edited at its workers' own layers, which this deployment does "
            "not configure (CRISPEDIT_MODELS layers); leave options.layers out",
            "options.layers",
        )
    if list(layers) != list(served):
        raise ApiError(
            400,
            "layers_not_served",
            f"the workers of model {model!r} edit layers {served} (GET /v1/models), not "
            f"{layers}; leave options.layers out or give exactly that list",
            "options.layers",
        )


def _check_parent(store: Store, model: str, body: EditRequest) -> None:
    """409 `stale_parent` (with the current head) unless the stream's head is the request's
    `parent_version` now."""
    head = store.head(model, body.stream)
    if head != body.parent_version:
        raise ApiError(
            409,
            "stale_parent",
            f"stream {model}/{body.stream} has head {head or 'base (null)'}, "
            f"not {body.parent_version or 'base (null)'}",
            "parent_version",
            head=head,
        )


def _accepted(response: Response, job_id: str, model: str, stream: str) -> EditAccepted:
    """The 202 (or replayed 200) body of an accepted edit, with its Location header."""
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return EditAccepted(job_id=job_id, url=f"/v1/jobs/{job_id}", model=model, stream=stream)
