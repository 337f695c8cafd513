"""The job contract between the API and the workers: queue and key names, payload and result.

The API enqueues, on the RQ queue `queue_name(model)`, the function `JOB_FUNCTION` (by its dotted
path, so the API never imports torch) with one plain-JSON argument, an `EditPayload` built by
`edit_payload`. `facts` are `contract.facts.fact_to_record` records; `options` holds only what
the client set: options of `contract.settings.EditSettings`, and `evaluate` and `force`, which
are the job's own (measure the edit; publish past a guarded stream's policy), not the editor's.
`check_parent` true means the head must be `parent_version` (None: the base) when the job runs.

While it runs, the job's meta holds `progress` ({phase, epoch, epochs, loss, facts_total,
facts_done}); the API sets `cancel_requested` in the meta and the key `cancel_key(id)` (which
survives a worker's save of a stale meta) to stop it before it starts work or at the next epoch.
The worker returns an `EditResult` (`edit_result`), and the version's manifest names the job
(`job`). The jobs of one stream are chained through `last_key` under the lock `lock_key`.

Curvature is built by jobs of its own (`CURVATURE_FUNCTION`, with a `CurvaturePayload`, on the
same model queue, under a long timeout of their own): an edit job never builds it. A curvature
request is named by `curvature_spec` (kind, tokens, corpus; None: the worker's configuration).
Workers record what they have built in the hash `curvature_index_key(model)` (spec -> store key;
a worker clears its model's hash when it starts: its model or corpus may have changed); the API
records its latest job per spec in `curvature_jobs_key(model)`, under `curvature_lock_key`, so
that one build per spec runs at a time. An edit submitted while the curvature its method needs
(`curvature_kind`) is not recorded waits for that build: the API makes it depend on the
curvature job (enqueued if none is running), and the edit fails with a clear error if the
build did not produce it. While it runs, a curvature job's meta holds `progress` ({phase:
"curvature", pass, tokens_done, tokens_total}); it returns a `CurvatureResult`.

A generate job (`GENERATE_FUNCTION`, a `GeneratePayload` built by `generate_payload`, on the
same model queue) returns a `GenerateResult`: greedy completions at a version and its parent.

A merged checkpoint (the full model at a version, as a Hugging Face folder in the store) is
written by a job of its own (`CHECKPOINT_FUNCTION`, with a `CheckpointPayload`, on the model's
queue); `keep` is the API's retention setting, applied by the worker once the checkpoint is in
(`curvature_store.checkpoints.prune`). It returns a `CheckpointResult`.

Standard library only, like the rest of `contract`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, TypedDict

from contract.settings import EditSettings, resolve_method

JOB_FUNCTION = "workers.jobs.apply_edit"
CURVATURE_FUNCTION = "workers.jobs.build_curvature"
CHECKPOINT_FUNCTION = "workers.jobs.write_checkpoint"
CURVATURE_KINDS = ("kfac", "ekfac")
JOB_OPTIONS = ("evaluate", "force")  # a request's options that are the job's, not the editor's
GENERATE_FUNCTION = "workers.jobs.generate"
MAX_PROMPTS = 20  # prompts of one generate job
PROMPT_CHARS = 2000
GENERATE_TOKENS = 24  # greedy tokens per completion, by default
MAX_GENERATE_TOKENS = 64
PREFIX = "crispedit"


def queue_name(model: str) -> str:
    """The RQ queue of a served model's edit jobs."""
    return f"{PREFIX}:{model}"


def cancel_key(job_id: str) -> str:
    """The Redis key the API sets when a job's cancellation is requested."""
    return f"{PREFIX}:cancel:{job_id}"


def last_key(model: str, stream: str) -> str:
    """The Redis key holding the id of the stream's last submitted job."""
    return f"{PREFIX}:last:{model}:{stream}"


def lock_key(model: str, stream: str) -> str:
    """The Redis lock that makes a stream's submissions one chain."""
    return f"{PREFIX}:lock:{model}:{stream}"


def curvature_index_key(model: str) -> str:
    """The Redis hash, written by the workers, of the model's built curvature: spec -> key."""
    return f"{PREFIX}:curvature:{model}"


def curvature_jobs_key(model: str) -> str:
    """The Redis hash, written by the API, of the model's latest curvature job: spec -> job id."""
    return f"{PREFIX}:curvature-jobs:{model}"


def checkpoint_jobs_key(model: str) -> str:
    """The Redis hash, written by the API, of the model's latest checkpoint job per version."""
    return f"{PREFIX}:checkpoint-jobs:{model}"


def curvature_lock_key(model: str) -> str:
    """The Redis lock under which the API reads and enqueues a model's curvature jobs."""
    return f"{PREFIX}:curvature-lock:{model}"


def curvature_spec(kind: str, tokens: int | None = None, corpus: str | None = None) -> str:
    """A curvature request as one canonical string (None: the worker's configured token budget
    or corpus): the field of both curvature hashes. ValueError for an unknown kind."""
    if kind not in CURVATURE_KINDS:
        raise ValueError(f"curvature kind must be one of {CURVATURE_KINDS}, not {kind!r}")
    return json.dumps({"corpus": corpus, "kind": kind, "tokens": tokens}, sort_keys=True)


def curvature_kind(method: str, laplace: float = 0.0, consolidate: float = 0.0) -> str | None:
    """The curvature an edit method projects with: None for plain fine-tuning (`ft`), unless it
    has a Laplace penalty (`laplace` > 0) or is consolidated (`consolidate` > 0), which take
    K-FAC's."""
    resolved = resolve_method(method)
    if resolved == "ft":
        return "kfac" if laplace or consolidate else None
    return "ekfac" if resolved == "ekfac" else "kfac"


class EditPayload(TypedDict):
    """The edit job's one argument."""

    model: str
    stream: str
    facts: list[dict]
    parent_version: str | None
    check_parent: bool
    options: dict[str, Any]
    submitted_at: str
    key_name: str
    actor: dict | None  # who submitted it: {"team", "key_id"}, recorded in manifest and log


class EditResult(TypedDict):
    """What an edit job returns: the new version's summary and the job's duration. On a guarded
    stream `guard` holds the policy's verdict (`crispedit.guard.judge`) and `rejected` is true
    when the version was kept without moving the head (the API shows the job as `rejected`)."""

    version: str
    number: int
    parent: str | None
    stream: str
    metrics: dict
    seconds: float
    rejected: bool
    guard: dict | None


class GeneratePayload(TypedDict):
    """The generate job's one argument: greedy completions of `prompts` at `version` and at its
    parent, `max_new_tokens` each."""

    model: str
    version: str
    prompts: list[str]
    max_new_tokens: int
    submitted_at: str
    key_name: str


class GenerateResult(TypedDict):
    """What a generate job returns: per prompt `{prompt, version, parent}` completions."""

    version: str
    parent: str | None
    completions: list[dict]
    seconds: float


class JobArgumentError(ValueError):
    """A job argument is out of bounds; `field` names it as the request spells it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field


class CurvaturePayload(TypedDict):
    """The curvature job's one argument (None: the worker's configured tokens or corpus)."""

    model: str
    kind: str
    tokens: int | None
    corpus: str | None
    submitted_at: str
    key_name: str
    actor: dict | None


class CurvatureResult(TypedDict):
    """What a curvature job returns: the store key, and whether it was there already."""

    key: str
    kind: str
    tokens: int
    cache_hit: bool
    resumed_from: dict | None
    seconds: float


class CheckpointPayload(TypedDict):
    """The checkpoint job's one argument."""

    model: str
    version: str
    keep: int  # checkpoints the store keeps, the newest; older ones are removed
    submitted_at: str
    key_name: str


class CheckpointResult(TypedDict):
    """What a checkpoint job returns: the version, its files and their total size."""

    version: str
    files: list[str]
    bytes: int
    pruned: list[str]
    seconds: float


def now_iso() -> str:
    """The current UTC time as ISO 8601 with milliseconds and a `Z`."""
    text = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def edit_payload(
    model: str,
    stream: str,
    facts: list[dict],
    parent_version: str | None,
    check_parent: bool,
    options: dict[str, Any],
    key_name: str,
    actor: dict | None = None,
) -> EditPayload:
    """The job's argument, stamped with the submission time. `options` must be valid
    (`job_settings` reads them back); `check_parent` says whether the client gave
    `parent_version`: the worker must then check it again when the job runs (an earlier job of
    the stream may have moved the head meanwhile). `actor` says who submitted it (the version's
    manifest and the stream's log record it). Raises SettingsError for bad options."""
    job_settings(options)
    return EditPayload(
        model=model,
        stream=stream,
        facts=facts,
        parent_version=parent_version,
        check_parent=check_parent,
        options=options,
        submitted_at=now_iso(),
        key_name=key_name,
        actor=actor,
    )


def job_settings(options: Mapping[str, Any] | None) -> tuple[EditSettings, bool]:
    """A payload's options as (the editor's settings, whether to evaluate the edit).
    Raises SettingsError naming an unknown or bad option."""
    options = dict(options or {})
    evaluate = bool(options.get("evaluate"))
    for name in JOB_OPTIONS:
        options.pop(name, None)
    return EditSettings.from_options(options), evaluate


def edit_result(manifest: Mapping[str, Any], seconds: float) -> EditResult:
    """The job's return value for the version `manifest` it made in `seconds`."""
    guard = manifest.get("guard")
    return EditResult(
        version=manifest["id"],
        number=manifest["number"],
        parent=manifest["parent"],
        stream=manifest["stream"],
        metrics=manifest["metrics"],
        seconds=round(seconds, 3),
        rejected=guard is not None and not guard["passed"] and not guard["forced"],
        guard=guard,
    )


def generate_payload(
    model: str, version: str, prompts: list[str], max_new_tokens: int | None, key_name: str
) -> GeneratePayload:
    """The generate job's argument, stamped with the submission time. JobArgumentError names
    `prompts` (none, more than MAX_PROMPTS), `prompts[i]` (empty or too long) or
    `max_new_tokens` (outside 1..MAX_GENERATE_TOKENS)."""
    if not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_PROMPTS:
        count = len(prompts) if isinstance(prompts, list) else "no list of"
        raise JobArgumentError("prompts", f"holds {count} prompts; give 1 to {MAX_PROMPTS}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise JobArgumentError(f"prompts[{i}]", "must be a non-empty string")
        if len(prompt) > PROMPT_CHARS:
            raise JobArgumentError(f"prompts[{i}]", f"is longer than {PROMPT_CHARS} characters")
    tokens = GENERATE_TOKENS if max_new_tokens is None else max_new_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise JobArgumentError("max_new_tokens", f"must be an integer, not {tokens!r}")
    if not 1 <= tokens <= MAX_GENERATE_TOKENS:
        raise JobArgumentError(
            "max_new_tokens", f"must be 1 to {MAX_GENERATE_TOKENS}, not {tokens}"
        )
    return GeneratePayload(
        model=model,
        version=version,
        prompts=list(prompts),
        max_new_tokens=tokens,
        submitted_at=now_iso(),
        key_name=key_name,
    )


def curvature_payload(
    model: str,
    kind: str,
    tokens: int | None,
    corpus: str | None,
    key_name: str,
    actor: dict | None = None,
) -> CurvaturePayload:
    """The curvature job's argument, stamped with the submission time; ValueError for an
    unknown kind or a token budget under 2 (no sequence has a next-token label then)."""
    curvature_spec(kind, tokens, corpus)
    if tokens is not None and tokens < 2:
        raise ValueError(f"a curvature needs a budget of 2 or more tokens, not {tokens}")
    return CurvaturePayload(
        model=model,
        kind=kind,
        tokens=tokens,
        corpus=corpus,
        submitted_at=now_iso(),
        key_name=key_name,
        actor=actor,
    )


def checkpoint_payload(model: str, version: str, keep: int, key_name: str) -> CheckpointPayload:
    """The checkpoint job's argument, stamped with the submission time; ValueError for a
    retention under 1."""
    if keep < 1:
        raise ValueError(f"keep at least 1 checkpoint, not {keep}")
    return CheckpointPayload(
        model=model, version=version, keep=keep, submitted_at=now_iso(), key_name=key_name
    )
