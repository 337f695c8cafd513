"""Stream policies: the bounds a guarded stream's versions must meet before the head moves.

The policy's shape, its bounds and its rules are `contract.policy`'s; this router reads and
writes it with the stream in the store. Setting or removing one is an admin's (`service.access`).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from contract.policy import Policy, PolicyError, policy_fields
from service import access
from service.deps import (
    KeyDep,
    SettingsDep,
    StoreDep,
    StreamAdminDep,
    StreamReadDep,
    require_json,
    unknown_stream,
)
from service.errors import ApiError, responses

router = APIRouter(tags=["policies"])
_DOCS = policy_fields()


class RegressionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="A prompt whose greedy answer is checked")
    answer: str | None = Field(
        default=None, description="The answer it must give (null: the parent's, unchanged)"
    )


class PolicyIn(BaseModel):
    """A stream policy; a bound left out (null) is not measured. Bounds are checked by
    `contract.policy` (400 naming the field)."""

    model_config = ConfigDict(extra="forbid")
    min_efficacy: float | None = Field(default=None, description=_DOCS["min_efficacy"])
    max_ppl_change_pct: float | None = Field(default=None, description=_DOCS["max_ppl_change_pct"])
    max_kl: float | None = Field(default=None, description=_DOCS["max_kl"])
    min_fact_retention: float | None = Field(default=None, description=_DOCS["min_fact_retention"])
    regression: list[RegressionIn] | None = Field(default=None, description=_DOCS["regression"])
    heldout_tokens: int | None = Field(default=None, description=_DOCS["heldout_tokens"])
    retention_facts: int | None = Field(default=None, description=_DOCS["retention_facts"])
    max_new_tokens: int | None = Field(default=None, description=_DOCS["max_new_tokens"])


class RegressionOut(BaseModel):
    prompt: str
    answer: str | None


class PolicyOut(BaseModel):
    """The stored policy, every field present (unset bounds null, sample sizes defaulted)."""

    model: str
    stream: str
    min_efficacy: float | None
    max_ppl_change_pct: float | None
    max_kl: float | None
    min_fact_retention: float | None
    regression: list[RegressionOut]
    heldout_tokens: int
    retention_facts: int
    max_new_tokens: int


def _no_policy(store, model: str, stream: str) -> ApiError:
    """The 404 of a stream without a policy: `unknown_stream` where the stream does not exist
    either, the answer another team's stream gets, so that a stream's existence does not leak."""
    if not store.has_stream(model, stream):
        return unknown_stream(model, stream)
    return ApiError(404, "no_policy", f"stream {model}/{stream} has no policy", "stream")


def _out(model: str, stream: str, policy: dict) -> PolicyOut:
    return PolicyOut(model=model, stream=stream, **Policy.from_dict(policy).to_dict())


@router.get(
    "/v1/streams/{model}/{stream}/policy",
    response_model=PolicyOut,
    responses=responses(400, 404),
)
def get_policy(ref: StreamReadDep, store: StoreDep) -> PolicyOut:
    """The stream's publishing policy; 404 `no_policy` when the stream is not guarded (and
    `unknown_stream`, as for another team's, when it has neither a policy nor a version)."""
    policy = store.policy(ref.model, ref.stream)
    if policy is None:
        raise _no_policy(store, ref.model, ref.stream)
    return _out(ref.model, ref.stream, policy)


@router.put(
    "/v1/streams/{model}/{stream}/policy",
    response_model=PolicyOut,
    dependencies=[Depends(require_json)],
    responses=responses(400, 404, 413, 415),
)
def put_policy(
    ref: StreamAdminDep, body: PolicyIn, store: StoreDep, key: KeyDep, settings: SettingsDep
) -> PolicyOut:
    """Guard the stream (or replace its policy): from the next edit job on, a version outside
    the policy is kept but not published and its job ends `rejected`. The stream needs no
    version yet. Impossible bounds (efficacy above 1, a negative KL, more than 20 regression
    prompts, ...) answer 400 naming the field, and change nothing. Admin keys only."""
    try:
        policy = Policy.from_dict(body.model_dump(exclude_none=True))
    except PolicyError as err:
        raise ApiError(400, "invalid_policy", str(err), err.field) from None
    if access.owner_of(settings, store, ref.model, ref.stream) is None:
        # guarding a new stream creates it, as its first edit would: its owner is this team
        owner = access.claim(settings, store, key, ref.model, ref.stream)
        access.require(
            key, "admin", ref.model, ref.stream, owner, unknown_stream(ref.model, ref.stream)
        )
    store.set_policy(ref.model, ref.stream, policy.to_dict())
    return _out(ref.model, ref.stream, policy.to_dict())


@router.delete(
    "/v1/streams/{model}/{stream}/policy",
    status_code=204,
    response_class=Response,
    responses=responses(400, 404),
)
def delete_policy(ref: StreamAdminDep, store: StoreDep) -> Response:
    """Stop guarding the stream (204); 404 `no_policy` when it had none. Admin keys only."""
    if not store.delete_policy(ref.model, ref.stream):
        raise _no_policy(store, ref.model, ref.stream)
    return Response(status_code=204)
