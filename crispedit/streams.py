"""The engine on the store: cached curvature, and edits that become versions on a stream.

`curvature_store` keeps files and pointers (and never imports torch); this module turns them into
tensors and back. An edit on a stream (DESIGN §2.7, §3):

1. read the head, its cumulative delta D and its stream state (edit-set factor sums, rebuilt
   from the rows its chain's versions store, or taken from the worker's `StreamStateCache`);
2. set the model's edited layers to W_base + D, build the projector from capability + β·edits;
3. edit; D' = D + δ (fp32, chain order); set the layers to W_base + D';
4. measure the new facts' factor rows on the edited model; with `consolidate` > 0, re-solve D'
   under the capability curvature and the stream's edit inputs (crispedit.consolidate), δ becoming
   the consolidated change minus D and the layers W_base + D + δ;
5. publish delta δ + those rows as a new version whose parent is the head read in 1 (refused with
   `Conflict` when another writer moved the head meanwhile: nothing is published then).

The model's weights are always re-derived from the base and the head, so a worker can keep one
model resident for any stream of it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from types import EllipsisType

import torch
from torch import nn

from contract.facts import Fact, fact_to_record
from contract.names import CURVATURE_FILE, DELTA_FILE, ROWS_FILE, STATE_FILE
from contract.policy import Policy
from contract.settings import CLOSED_FORM, DEFAULTS, OPTION_NAMES, EditSettings
from crispedit.artifacts import ArtifactError, load_tensors, save_tensors
from crispedit.consolidate import consolidate_edit
from crispedit.curvature import (
    CHECKPOINT_BATCHES,
    Checkpointing,
    Curvature,
    CurvatureRecipe,
    run_recipe,
)
from crispedit.delta import Delta
from crispedit.editor import make_editor
from crispedit.evaluate import generate_answers
from crispedit.guard import judge
from crispedit.models import get_layers, is_conv1d, model_fingerprint
from crispedit.projector import resolve_method
from crispedit.sequential import (
    EditRows,
    StreamState,
    accumulate,
    edit_set_factors,
    set_weights,
    stream_curvature,
    weights_at,
)
from curvature_store import Conflict, Store, StoreError

HEADS_CACHED = 1
STREAMS_CACHED = 2


def cached_curvature(
    store: Store,
    model: nn.Module,
    tokenizer,
    recipe: CurvatureRecipe,
    progress: bool = True,
    on_progress: Callable[[dict], None] | None = None,
    checkpoint_every: int = CHECKPOINT_BATCHES,
) -> tuple[Curvature, dict]:
    """The curvature of `recipe` from the store, collected and stored first when missing.

    A collection checkpoints its partial sums in the store's staging area
    (`Store.checkpoint_file`) every `checkpoint_every` batches and resumes from them when it is
    started again with the same recipe; the checkpoint is deleted once the curvature is stored.
    `on_progress` follows the collection (`curvature.collect_curvature`). Returns the curvature
    and its store manifest (`cache_hit` tells whether it was there).
    """
    manifest = store.find_curvature(**recipe.key_fields)
    if manifest is not None:
        return Curvature.load(store.curvature_file(manifest["key"])), {
            **manifest,
            "cache_hit": True,
        }
    checkpoint = Checkpointing(
        store.checkpoint_file(store.curvature_key(**recipe.key_fields)),
        every_batches=checkpoint_every,
    )
    curvature = run_recipe(
        model, tokenizer, recipe, progress=progress, checkpoint=checkpoint, on_progress=on_progress
    )
    path = curvature.save(store.staging_dir() / CURVATURE_FILE)
    meta = {k: v for k, v in curvature.meta.items() if k != "key"}
    manifest = store.put_curvature(path, recipe.key_fields, meta=meta)
    checkpoint.path.unlink(missing_ok=True)  # kept in the store now: its partial sums are spent
    return curvature, {"cache_hit": False, **manifest}


def base_weights(model: nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the layers' weights as they are now (taken right after loading: the base every
    stream version starts from), on the host: a job copies them onto the device once."""
    layers = get_layers(model, layers)
    return {name: m.weight.detach().to("cpu", copy=True) for name, m in layers.items()}


def read_cumulative(store: Store, version: str | None) -> dict[str, torch.Tensor]:
    """The head's cumulative delta against the base as torch tensors ({} for the base itself)."""
    if version is None:
        return {}
    return {k: torch.from_numpy(v.copy()) for k, v in store.cumulative_delta(version).items()}


class StreamStateCache:
    """The stream state of the version each stream was last read or written at, on the host.

    A worker's next job on a stream usually starts from the version it has just published, whose
    sums are here: `read_state` then adds no rows at all, or only those of the versions published
    since, instead of rebuilding the chain. One version is kept per stream, for the `size` streams
    used last; an entry is the float64 sums of every edited layer, Σ 8·(d_in² + d_out²) bytes
    (the plan's "S_A, S_B (fp64)", bench/results/memory-8b.md), so a worker's host memory grows
    with `size`, never with a stream's length. Versions never change, so an entry stays right
    after a rollback: it is used only when its version is in the chain being read.
    """

    def __init__(self, size: int = STREAMS_CACHED):
        if size < 1:
            raise ValueError(f"a stream state cache holds at least 1 stream, not {size}")
        self.size = size
        self._entries: OrderedDict[tuple[str, str], tuple[str, StreamState]] = OrderedDict()

    def get(self, model: str, stream: str) -> tuple[str, StreamState] | None:
        """The version of `model`/`stream` last put here and its state, or None."""
        entry = self._entries.get((model, stream))
        if entry is not None:
            self._entries.move_to_end((model, stream))
        return entry

    def put(self, model: str, stream: str, version: str, state: StreamState) -> None:
        """Keep `state` as the state at `version`, replacing the stream's previous entry."""
        self._entries[(model, stream)] = (version, state)
        self._entries.move_to_end((model, stream))
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


def read_state(
    store: Store,
    version: str | None,
    device: torch.device | str | None = None,
    states: StreamStateCache | None = None,
) -> StreamState:
    """The stream state at `version` (empty for the base): the sums of its chain, on the host.

    Walks the chain back from `version` to the nearest version whose sums are known (the one
    `states` holds for the stream, or one written before rows existed: its STATE_FILE holds its
    whole chain's sums) or to the stream's first version, then adds each later version's rows in
    chain order (`StreamState.plus`, products on `device`): the same terms in the same order
    however the state is reached. `states`, when given, then keeps the result. A version whose
    rows or sums are missing, corrupt or do not fit raises StoreError naming it.
    """
    if version is None:
        return StreamState.empty()
    doc = store.manifest(version)
    model, stream = doc["model"], doc["stream"]
    known = states.get(model, stream) if states is not None else None
    state, pending = StreamState.empty(), []
    for entry in store.lineage(model, stream, upto=version):  # newest first
        if known is not None and entry["id"] == known[0]:
            state = known[1]
            break
        if ROWS_FILE not in entry["files"]:
            state = _stored_sums(store, entry)
            break
        pending.append(entry)
    for entry in reversed(pending):
        rows = _stored_rows(store, entry)
        try:
            state = state.plus(rows, device)
        except ValueError as err:
            raise StoreError(f"version {entry['id']}: {err}") from None
    if states is not None:
        states.put(model, stream, version, state)
    return state


def _stored_rows(store: Store, manifest: dict) -> EditRows:
    """A version's own edit rows, checked against its layers (StoreError naming it otherwise)."""
    version = manifest["id"]
    path = store.version_file(version, ROWS_FILE)
    try:
        tensors, _ = load_tensors(path, "edit rows")
    except ArtifactError:
        raise StoreError(f"version {version}: its {ROWS_FILE} is not a rows file") from None
    try:
        return EditRows.from_tensors(tensors, manifest.get("layers", []))
    except ValueError as err:
        raise StoreError(f"version {version}: its {ROWS_FILE} is unusable: {err}") from None


def _stored_sums(store: Store, manifest: dict) -> StreamState:
    """The whole state a version written before rows existed stores as sums (StoreError naming
    it when it has none, or not those of its layers)."""
    version = manifest["id"]
    if STATE_FILE not in manifest["files"]:
        raise StoreError(f"version {version} has no stream state ({ROWS_FILE} or {STATE_FILE})")
    path = store.version_file(version, STATE_FILE)
    try:
        tensors, _ = load_tensors(path, "stream state")
        state = StreamState.from_tensors(tensors)
    except (ArtifactError, KeyError, IndexError):
        raise StoreError(f"version {version}: its {STATE_FILE} is not a stream state") from None
    missing = [n for n in manifest.get("layers", []) if n not in state.S_A or n not in state.S_B]
    if missing:
        raise StoreError(f"version {version}: its {STATE_FILE} lacks the sums of {missing}")
    return state


def check_stream_base(store: Store, head: str | None, fingerprint: str, layers: list[str]) -> None:
    """Refuse to continue a stream that was started on another model or other layers."""
    if head is None:
        return
    manifest = store.manifest(head)  # every version records the stream's base and layers
    if manifest.get("base_fingerprint") != fingerprint:
        raise StoreError(
            f"stream was started on model {manifest.get('base_fingerprint')}, "
            f"this model is {fingerprint}"
        )
    if manifest.get("layers") != layers:
        raise StoreError(f"stream edits layers {manifest.get('layers')}, not {layers}")


class StreamCurvatureCache:
    """The stream curvatures of the last few heads a worker edited from, kept on the host.

    The curvature an edit from a head is projected with (`sequential.stream_curvature`) depends on
    the head, β and the capability curvature alone; its costly part, the float64 `eigh` of every
    edited layer's factors, runs once, on the model's device. An entry holds what a projector
    needs and nothing more: each layer's eigenvalues and eigenbases (for EK-FAC, the bases and
    its eigenvalue matrix), not A and B, in host memory (page-locked with CUDA); a job's
    projectors copy them to the device and free them with the job. A job that starts from a head
    an earlier one started from (a retried job, one that lost a conflict, a pinned parent, a
    rollback) takes it from here instead. An entry is the size of the model's edited layers'
    factors in host memory, so by default one head is kept.
    """

    def __init__(self, size: int = HEADS_CACHED):
        if size < 1:
            raise ValueError(f"a stream curvature cache holds at least 1 head, not {size}")
        self.size = size
        self._entries: OrderedDict[tuple, tuple[Curvature, Curvature]] = OrderedDict()

    def stream_curvature(
        self,
        head: str,
        capability: Curvature,
        state: StreamState,
        beta: float,
        device: torch.device | str,
    ) -> Curvature:
        """`sequential.stream_curvature(capability, state, beta, device)` for the stream state
        `state` of version `head`, the one computed before when this cache has it."""
        key = (head, beta, capability.kind, str(torch.device(device)))
        hit = self._entries.get(key)
        if hit is None or hit[0] is not capability:  # another capability is another curvature
            hit = (capability, stream_curvature(capability, state, beta, device))
        self._entries[key] = hit
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return hit[1]


def edit_on_stream(
    store: Store,
    model_name: str,
    stream: str,
    model: nn.Module,
    tokenizer,
    base: dict[str, torch.Tensor],
    capability: Curvature | None,
    facts: Sequence[Fact],
    method: str | None = None,
    gamma: float | None = None,
    beta: float | None = None,
    parent: str | EllipsisType | None = ...,
    curvature_key: str | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
    job: str | None = None,
    actor: dict | None = None,
    cache: StreamCurvatureCache | None = None,
    states: StreamStateCache | None = None,
    settings: EditSettings = DEFAULTS,
    force: bool = False,
    on_phase: Callable[[str], None] | None = None,
    **editor_options,
) -> tuple[dict, Delta]:
    """Apply `facts` on top of the stream head and publish the result as a new version.

    The edit runs with `settings`; `method`, `gamma`, `beta` and any option of EditSettings in
    `editor_options` override it (None: keep), and the rest of `editor_options` (`progress`,
    `on_epoch`, `fast`) go to the editor (`make_editor`) as they are. The manifest records the
    settings under "options" (`EditSettings.to_options`, with the stream's layers and the chat
    template's resolved on or off).

    `base` holds the unedited weights of the edited layers (`base_weights`). `parent`, when
    given, is the head the caller expects (`None` = the base): anything else raises `Conflict`
    before any work. `evaluate(model)`, when given, is measured at the head and after the edit;
    both land in the version's metrics. `job`, the id of the service job doing the edit, is
    recorded in the manifest, so a job whose worker died after the version was committed can be
    matched with it; `actor` (who asked for it, e.g. `{"team", "key_id"}`) goes into the manifest
    and the stream's log. `cache`, a worker's `StreamCurvatureCache`, spares a job from a head
    that an earlier job started from the eigendecompositions of its projectors; `states`, a worker's
    `StreamStateCache`, spares it from rebuilding the head's stream state along the chain (the
    new version's state is put there once published). Returns the new version's manifest and the
    delta against its parent.

    With `consolidate` > 0 the stream's cumulative change is re-solved after the edit
    (`consolidate.consolidate_edit`, K̄ from the stream's state and the new rows): the published
    delta is the consolidated change minus the head's, the manifest's metrics hold its
    `consolidation` figures and its `efficacy` is the consolidated model's. Without a capability
    curvature that raises ValueError before any work.

    A guarded stream (one with a policy in the store, `contract.policy`) measures the new
    version before the head moves (`guard.judge`; the manifest's "guard" holds the result): a
    version outside the policy is kept but not published (`Store.create_version(publish=False)`,
    listed as held) unless `force`, which publishes it and notes `forced` in the stream's log.
    A stored policy that does not parse raises PolicyError before any work. `on_phase("guard")`,
    when given, is called as the check starts (it takes what the policy's sample sizes cost).
    """
    overrides = {k: v for k, v in editor_options.items() if k in OPTION_NAMES}
    runtime = {k: v for k, v in editor_options.items() if k not in OPTION_NAMES}
    settings = settings.override(method=method, gamma=gamma, beta=beta, **overrides)
    if settings.consolidate and capability is None:  # said before any work
        raise ValueError("consolidate needs the capability curvature (its K-FAC factors A, B)")
    layers = list(base)
    head = store.head(model_name, stream)
    stored_policy = store.policy(model_name, stream)
    policy = Policy.from_dict(stored_policy) if stored_policy is not None else None
    if parent is not ... and parent != head:
        raise Conflict(f"stream head is {head or 'base'}, not {parent or 'base'}", head=head)
    set_weights(model, base, {})
    base_fingerprint = model_fingerprint(model, layers)
    check_stream_base(store, head, base_fingerprint, layers)

    device = next(model.parameters()).device  # the projectors' and their curvature's
    cumulative = read_cumulative(store, head)
    state = read_state(store, head, device, states)
    set_weights(model, base, cumulative)
    before = evaluate(model) if evaluate is not None else None
    curvature = _projection_curvature(capability, state, head, settings, device, cache)
    # AlphaEdit keeps its update off the keys of the stream's earlier edits (crispedit.alphaedit)
    previous = state.S_A if state.tokens else None
    editor = make_editor(
        model, tokenizer, curvature, settings, layers=layers, previous=previous, **runtime
    )
    delta = editor.edit(facts)
    chat = editor.chat  # the edit set is measured on the prompts as the edit wrapped them
    del editor, curvature  # the projectors' copies on the device: not needed past the edit
    parent_cumulative, cumulative = cumulative, accumulate(cumulative, delta)
    set_weights(model, base, cumulative)
    rows = edit_set_factors(model, tokenizer, layers, facts, chat=chat)
    # the next job's state, added up before publishing: a failure here publishes nothing
    consolidating = settings.consolidate > 0
    next_state = state.plus(rows, device) if states is not None or consolidating else None
    if consolidating:  # the stream's whole change re-solved, its rows those of the edit's point
        delta, cumulative = consolidate_edit(
            model, tokenizer, capability, base, delta, facts, settings.consolidate, chat=chat,
            parent=parent_cumulative, state=next_state,
        )  # fmt: skip
    after = evaluate(model) if evaluate is not None else None

    manifest = {
        **_manifest(facts, delta.report, settings, layers),
        "base_fingerprint": base_fingerprint,
        "weights_fingerprint": model_fingerprint(model, layers),
        "curvature_key": curvature_key,
        "edit_tokens": state.tokens + rows.tokens,  # of the stream so far
        # stored (d_in, d_out), GPT-2's Conv1D: what an adapter export must transpose
        "transposed_layers": [n for n, m in get_layers(model, layers).items() if is_conv1d(m)],
    }
    if job is not None:
        manifest["job"] = job
    if evaluate is not None:
        manifest["metrics"]["evaluation"] = {"before": before, "after": after}
    publish, note = True, None
    if policy is not None:
        if on_phase is not None:
            on_phase("guard")
        verdict = judge(
            model, tokenizer, base, parent_cumulative, facts, policy,
            delta.report["efficacy"], chat=chat,
        )  # fmt: skip
        forced = force and not verdict["passed"]
        manifest["guard"] = {**verdict, "forced": forced}
        publish = verdict["passed"] or force
        if not verdict["passed"]:
            note = {"forced": forced, "failed": [f["rule"] for f in verdict["failed"]]}
    published = _publish(
        store, model_name, stream, head, delta, rows, manifest, actor, publish, note
    )
    if states is not None and publish:  # a held version's state is no stream's next
        states.put(model_name, stream, published["id"], next_state)
    return published, delta


def _projection_curvature(
    capability: Curvature | None,
    state: StreamState,
    head: str | None,
    settings: EditSettings,
    device: torch.device,
    cache: StreamCurvatureCache | None,
) -> Curvature | None:
    """The curvature an edit from `head` is projected with: none for `ft` (unless it has a
    Laplace penalty, which then takes the stream's as the projected methods do); from the base,
    the capability's (whose eigenbases it keeps); else the stream's, from `cache` when it has
    it. MEMIT and AlphaEdit take the capability's: their covariance is that of the preserved
    keys (AlphaEdit gets the earlier edits' keys apart)."""
    method = resolve_method(settings.method)
    if method == "ft" and (not settings.laplace or capability is None):
        return None  # an ft edit with laplace and no curvature: the editor says what it lacks
    if method in CLOSED_FORM:
        return capability
    if cache is None or head is None:
        return stream_curvature(capability, state, settings.beta, device)
    return cache.stream_curvature(head, capability, state, settings.beta, device)


def _manifest(
    facts: Sequence[Fact], report: dict, settings: EditSettings, layers: list[str]
) -> dict:
    """What a version records of its edit: the facts, the method and its settings, the metrics
    (with the capability-loss rise its curvature predicts, where the editor reports one)."""
    manifest = {
        "facts": [fact_to_record(f) for f in facts],
        "method": report["method"],
        "projector": report["projector"],
        "gamma": report["gamma"],
        "beta": settings.beta,
        "layers": layers,
        # the chat template as resolved for this tokenizer, so a rerun wraps its prompts alike
        "options": {
            **settings.to_options(),
            "layers": layers,
            "chat_template": report["chat_template"],
        },
        "metrics": {
            k: report[k] for k in ("n_edits", "efficacy", "efficacy_before", "epochs", "time_s")
        },
    }
    if report.get("predicted_loss_increase") is not None:
        manifest["metrics"]["predicted_loss_increase"] = report["predicted_loss_increase"]
    if report.get("gamma_trail"):  # a drift budget's search: met or not, and every γ tried
        manifest["metrics"]["drift_budget_met"] = report["drift_budget_met"]
        manifest["metrics"]["gamma_trail"] = report["gamma_trail"]
    if "consolidation" in report:  # the efficacy above is then the consolidated model's
        manifest["metrics"]["consolidation"] = report["consolidation"]
    return manifest


def _publish(
    store: Store,
    model_name: str,
    stream: str,
    head: str | None,
    delta: Delta,
    rows: EditRows,
    manifest: dict,
    actor: dict | None = None,
    publish: bool = True,
    note: dict | None = None,
) -> dict:
    """Stage the delta and the edit rows and create the version on `head` (Conflict, and nothing
    published, when another writer moved it), made by `actor`, moving the head to it unless not
    `publish`; the stored manifest."""
    stage = store.staging_dir()
    delta.save(stage / DELTA_FILE)
    save_tensors(stage / ROWS_FILE, rows.to_tensors(), {"edit_tokens": rows.tokens})
    files = {DELTA_FILE: stage / DELTA_FILE, ROWS_FILE: stage / ROWS_FILE}
    return store.create_version(
        model_name, stream, head, files, manifest, actor=actor, publish=publish, note=note
    )


def materialize(
    store: Store, version: str, model: nn.Module, base: dict[str, torch.Tensor] | None = None
) -> None:
    """Set `model` (the base model, or any model with `base` given) to the weights of `version`."""
    manifest = store.manifest(version)
    layers = manifest["layers"]
    if base is None:
        base = base_weights(model, layers)
    set_weights(model, base, {})
    found = model_fingerprint(model, layers)
    if found != manifest["base_fingerprint"]:
        raise StoreError(
            f"version {version} belongs to model {manifest['base_fingerprint']}, this is {found}"
        )
    set_weights(model, base, read_cumulative(store, version))


def completions(
    store: Store,
    version: str,
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    base: dict[str, torch.Tensor] | None = None,
) -> list[dict]:
    """Greedy completions of `prompts` at `version` and at its parent, `{prompt, version,
    parent}` each: the whole text of up to `max_new_tokens` tokens, the prompts wrapped in the
    chat template when the version's edit was (`options.chat_template`).

    `model` is the base model, or any version of the stream with `base` given (a worker's
    resident model): its weights are the same bit for bit afterwards (`sequential.weights_at`).
    StoreError when the version was made on other layers or another base model."""
    manifest = store.manifest(version)
    layers = manifest["layers"]
    if base is None:
        base = base_weights(model, layers)
    if list(base) != layers:
        raise StoreError(f"version {version} edits layers {layers}, not {list(base)}")
    with weights_at(model, base, {}):
        found = model_fingerprint(model, layers)
    if found != manifest["base_fingerprint"]:
        raise StoreError(
            f"version {version} belongs to model {manifest['base_fingerprint']}, this is {found}"
        )
    chat = manifest.get("options", {}).get("chat_template") == "on"
    answers = {}
    for side, at in (("version", version), ("parent", manifest["parent"])):
        with weights_at(model, base, read_cumulative(store, at)):
            answers[side] = generate_answers(
                model, tokenizer, list(prompts), max_new_tokens, chat=chat, whole=True
            )
    return [
        {"prompt": prompt, "version": after, "parent": before}
        for prompt, after, before in zip(
            prompts, answers["version"], answers["parent"], strict=True
        )
    ]
