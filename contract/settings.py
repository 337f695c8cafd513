"""Edit settings: every editor option, its default and its valid values, written once.

`EditSettings` is what an edit is run with, wherever it comes from: the CLI's flags, an API
request's `options`, a worker's job, the bench's grid. A version's manifest records
`to_options()` under "options", and `from_options` reads such a dict back, so a recorded edit can
be rerun with exactly its settings. Each field's metadata holds its bounds (`ge`, `gt`, `le`,
`lt`), its `choices`, and, for the options a client of the shared service may set, `api` with
the service's own upper limit where it is stricter than the engine's (`api_le`): the API's request
model is built from these, so it cannot drift from the engine.

The defaults were chosen by bench/quality.py on its tuning splits; bench/results/ holds the
figures behind each one (γ, epochs, the projected update, the anchors, clip), and the comments
below say only which way each choice went.

Standard library only: the API imports this without torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# memit and alphaedit are the closed-form editors of crispedit.memit and crispedit.alphaedit
METHODS = ("ft", "nullspace", "kfac", "ekfac", "memit", "alphaedit")
CLOSED_FORM = ("memit", "alphaedit")
# the methods whose edit keeps to a curvature subspace set by γ, which a drift budget raises
BUDGETED = ("nullspace", "kfac", "ekfac")
ALIASES = {"crispedit": "kfac"}  # our default, the best setting of the quality benchmark
PROJECT_CHOICES = ("gradient", "update")
STOP_CHOICES = ("batch", "fact")
PROJECTOR_DTYPES = ("float32", "model")
CHAT_TEMPLATE_CHOICES = ("auto", "on", "off")
LR_SCHEDULES = ("constant", "cosine")  # crispedit.editor.scheduled_lr
ANCHOR_CHOICES = ("random", "similar")  # crispedit.anchors
WARM_STARTS = ("off", "lstsq")  # crispedit.start
EDIT_SITES = ("all", "subject")  # crispedit.editor


class SettingsError(ValueError):
    """An edit option is unknown or out of range; `field` names it as `EditSettings` spells it,
    and the message starts with it ("clip must be below 1.0, not 1.5")."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field


def _option(default: Any, doc: str, **rules: Any) -> Any:
    return dataclasses.field(default=default, metadata={"doc": doc, **rules})


@dataclass(frozen=True)
class EditSettings:
    """How one edit is run: every option of the projected editor, with its default.

    Construction validates every field (`SettingsError` naming the first bad one), so an
    EditSettings that exists is one the editor accepts. `layers` is None (the curvature's
    layers, or the model's default block), a layer spec such as "20-24", or a tuple of names.
    """

    method: str = _option(
        "crispedit",
        "kfac (alias crispedit), ekfac, nullspace, ft (no projection), or the closed-form "
        "memit and alphaedit",
        choices=(*ALIASES, *METHODS), api=True,
    )  # fmt: skip
    # with 100 epochs, the update projected and subject anchors, γ 0.9 lands nearly every tuning
    # edit of both data sets at the least drift
    gamma: float = _option(
        0.9, "Protected share of the curvature energy (0: plain fine-tuning).",
        ge=0.0, le=1.0, api=True,
    )  # fmt: skip
    layers: str | tuple[str, ...] | None = _option(
        None, "The edited layers (default: the worker's).", api=True
    )
    # at γ 0.9 fewer epochs leave many CounterFact edits unlearnt, and with anchors zsRE's longer
    # answers need more than 50; a converged edit stops sooner anyway
    epochs: int = _option(
        100, "Epochs at most; a converged edit stops sooner.", ge=1, api=True, api_le=100
    )
    lr: float = _option(
        5e-4, "Adam's learning rate (with lr_schedule cosine: its peak).",
        gt=0.0, api=True, api_le=1.0,
    )  # fmt: skip
    # constant until measured on the tuning splits (issue 23's speed lever): a higher peak that
    # decays might land the same edits in fewer epochs
    lr_schedule: str = _option(
        "constant",
        "The learning rate over each edit's planned epochs: constant (lr throughout), or "
        "cosine (a linear warm-up over the first 5 % of the epochs, none under 20, then a cosine "
        "decay from lr, its peak, to lr / 10 at the last; set per epoch, and started over at "
        "each of a drift budget's raises). "
        "kfac, ekfac, nullspace and ft; not memit or alphaedit.",
        choices=LR_SCHEDULES, api=True,
    )  # fmt: skip
    # off: on CounterFact's tuning split the closed-form step lowered the loss at once but Adam
    # still ran all 100 epochs, at more drift (+0.52 % against +0.29 %; bench/README)
    warm_start: str = _option(
        "off",
        "Where Adam's epochs start: off (at the weights before the edit), or lstsq (after one "
        "closed-form least-squares step under the same projection, its length searched on the "
        "edit's loss; crispedit.start). kfac, ekfac, nullspace and ft; not memit or alphaedit.",
        choices=WARM_STARTS,
    )
    # off until measured (issue 23's generalization lever): MEMIT and ROME write a fact into the
    # subject's last token, from where any prompt about the subject can read it
    edit_site: str = _option(
        "all",
        "Where the edit's change acts while it is trained: all (every token of the fact's "
        "sequences), or subject (only the subject's last token, the prompt's last without a "
        "subject; elsewhere the layers keep their weights before), so the change learns to act "
        "through the subject rather than the sentence. The edited model applies it everywhere. "
        "kfac, ekfac, nullspace and ft; not memit or alphaedit, which edit there already.",
        choices=EDIT_SITES,
    )
    batch_size: int = _option(32, "Facts per step.", ge=1)
    # the step is the same (its gradient summed over micro-batches, up to float rounding); only
    # the activations held at once shrink, at the cost of one extra forward per step
    micro_batch: int = _option(
        0, "Facts per forward and backward within a step (0: the whole batch at once).", ge=0
    )
    seed: int = _option(0, "Seed of each epoch's shuffle of the facts.", ge=0)
    # "gradient" is the reference recipe, but Adam then rescales each coordinate and part of every
    # step leaks into blocked directions; "update" keeps the whole edit in the kept subspace
    project: str = _option(
        "update",
        "What the projector is applied to: the gradient alone, or also each step's update.",
        choices=PROJECT_CHOICES,
    )
    # a bf16 rotation loses about 3 significant digits of the kept gradient, hence float32
    projector_dtype: str = _option(
        "float32", "The dtype gradients are rotated in: float32, or the model's own.",
        choices=PROJECTOR_DTYPES,
    )  # fmt: skip
    # anchors keep a statement's neighbours from flipping with it; a higher weight costs zsRE
    # efficacy; questions get none: on zsRE they cost generalization and drift and protect no
    # neighbour
    anchors: int = _option(
        2,
        "Subject anchors per fact (default 2): the fact's prompt asked about other subjects, "
        "whose answers the edit keeps. They keep statement-style edits (CounterFact) local; a "
        "question (a prompt ending in '?', as zsRE's) gets none, where they only cost drift. "
        "0 turns them off; see the README.",
        ge=0, api=True, api_le=8,
    )  # fmt: skip
    anchor_weight: float = _option(
        3.0, "Weight of the anchors' KL against the facts' loss.",
        ge=0.0, api=True, api_le=100.0,
    )  # fmt: skip
    anchor_questions: bool = _option(False, "Whether questions get anchors too.")
    # random until measured on the tuning splits (issue 23's locality lever): CounterFact's
    # neighbours are subjects like the edited one, which random diverse anchors protect poorly
    anchor_choice: str = _option(
        "random",
        "How each fact's anchor subjects are chosen: random (drawn by the seed from a fixed "
        "pool of 58 general subjects), or similar (those of a larger pool of about 300 nearest "
        "to the fact's own subject, by the cosine of the model's hidden states at the subject's "
        "last token entering the lowest edited block).",
        choices=ANCHOR_CHOICES, api=True,
    )  # fmt: skip
    # "fact": a fact below loss_stop drops out of the loss (it has landed: pushing it further
    # only grows the weight change); "batch": each batch's mean loss is compared
    loss_stop: float = _option(
        0.01, "A batch below this loss is skipped; the edit stops below it.", ge=0.0
    )
    stop: str = _option(
        "batch", "Compare loss_stop with each batch's mean loss, or each fact's own.",
        choices=STOP_CHOICES,
    )  # fmt: skip
    # clipping helps layers with a massive activation (SmolLM2's middle ones) and costs a little
    # drift on layers without outliers: so off by default
    clip: float = _option(
        0.0,
        "Share of each curvature factor's eigenvalues winsorized before the gamma rule "
        "(default 0: none), for layers with outlier activations; kfac and nullspace only. "
        "See the README.",
        ge=0.0, lt=1.0, api=True,
    )  # fmt: skip
    beta: float = _option(1.0, "Weight of a stream's earlier edits' curvature.", ge=0.0)
    # off until measured on the tuning splits. Its unit needs no per-layer normalisation: the
    # penalty is the predicted rise of the mean capability loss per token (nats), the facts' loss
    # a mean per target token (nats), so laplace is their exchange rate, the same for any layer
    # (a layer whose inputs are scaled by c, its weight by 1/c, keeps both losses and their
    # gradients' ratio) and any model
    laplace: float = _option(
        0.0,
        "Weight of the K-FAC Laplace penalty (Ritter et al. 2018), added to the facts' loss: "
        "the predicted rise of the capability loss, ½·tr(ΔWᵀ B ΔW A) per layer in nats per "
        "token, so the edit also avoids kept directions in proportion to their curvature (0: "
        "off; 1 weighs a nat of it like a nat of the facts' loss). kfac, ekfac, nullspace, and "
        "ft given a curvature; not memit or alphaedit.",
        ge=0.0, api=True, api_le=100.0,
    )  # fmt: skip
    # off until measured on the tuning splits (issue 23, lever 4). The unit is the report's
    # predicted_loss_increase (nats per token); the API's cap, a nat per token (perplexity ×2.7),
    # lies far above any edit worth publishing
    drift_budget: float = _option(
        0.0,
        "Largest predicted capability-loss rise (the report's predicted_loss_increase, "
        "½·tr(ΔWᵀ B ΔW A) summed over the edited layers, nats per token) the edit may cause "
        "(0: off). The edit runs at gamma first; while its delta's rise exceeds the budget, "
        "gamma is raised, a few times at most, along 1 - (1 - gamma)/2^k (from 0.9: 0.95, "
        "0.975, 0.9875), and the edit goes on from its change so far projected onto the "
        "smaller kept subspace. The report gives the gamma used, whether the budget was met, "
        "and each rung tried (gamma_trail). kfac, ekfac and nullspace.",
        ge=0.0, api=True, api_le=1.0,
    )  # fmt: skip
    # off until measured on the tuning splits (issue 23's lever 5, crispedit.consolidate). Its
    # unit is a ratio of token weights: K̄ is the mean Gram of the edits' inputs, A the mean of the
    # capability corpus's, so 1 weighs a capability token like an edit token
    consolidate: float = _option(
        0.0,
        "Consolidation after the edit (0: off): the edited layers' whole change D (on a stream, "
        "the stream's cumulative change) is re-solved to keep its outputs on every edit's "
        "inputs while paying the capability curvature, ΔW = D·K̄·(K̄ + consolidate·A)⁻¹ per "
        "layer (K̄ the edits' mean input Gram matrix, A the capability's): the weight of a "
        "capability token against an edit token. Needs a curvature (ft: as with laplace).",
        ge=0.0, api=True, api_le=100.0,
    )  # fmt: skip
    # off until measured on the tuning splits (issue 23: edits that hold for their prompt but
    # not for its paraphrases); the cap is the number of starters (crispedit.contexts.CONTEXTS)
    contexts: int = _option(
        0,
        "Context prefixes per fact (0: off, at most 10): each fact is also trained after that "
        "many short texts the model generates (greedy, from fixed starters, once per edit), "
        "so the edit holds for the fact in a text, not only for its bare prompt. Its anchors "
        "and efficacy stay on the bare prompt. kfac, ekfac, nullspace and ft; memit and "
        "alphaedit have value_contexts.",
        ge=0, le=10, api=True, api_le=10,
    )  # fmt: skip
    # an instruct model is asked in its own format: on SmolLM2-Instruct the template's edit
    # generalised and stayed local better at no more drift, for a longer edit (each prompt grows
    # by the template's turns); bench/README.md, "The chat template"
    chat_template: str = _option(
        "auto",
        "Wrap every prompt the edit trains and is measured on in the tokenizer's chat template "
        "(a user turn, then the assistant's generation prompt, then the target): on, off, or "
        "auto (on when the tokenizer has a template). The manifest records the resolved on/off.",
        choices=CHAT_TEMPLATE_CHOICES, api=True,
    )  # fmt: skip

    # MEMIT (Meng et al. 2023) and AlphaEdit (Fang et al. 2025): the papers' defaults. On
    # SmolLM2 the covariance weight 15,000 lands few edits; bench/results/quality.md has the
    # setting tuned there (layers 4-8, covariance weight 1,500)
    value_steps: int = _option(
        25, "memit/alphaedit: Adam steps of each fact's target value optimisation.",
        ge=1, api=True, api_le=100,
    )  # fmt: skip
    value_lr: float = _option(
        0.5, "memit/alphaedit: learning rate of the target value optimisation.",
        gt=0.0, api=True, api_le=10.0,
    )  # fmt: skip
    value_clamp: float = _option(
        4.0, "memit/alphaedit: the value change's largest norm, in norms of the hidden state.",
        gt=0.0, api=True,
    )  # fmt: skip
    value_contexts: int = _option(
        5, "memit/alphaedit: short generated prefixes the value must hold under (0: the prompt "
        "alone), at most 5.",
        ge=0, le=5,
    )  # fmt: skip
    kl_factor: float = _option(
        0.0625, "memit/alphaedit: weight of the KL on '{subject} is a' prompts in the value "
        "optimisation.",
        ge=0.0, api=True,
    )  # fmt: skip
    covariance_weight: float = _option(
        15000.0, "memit: weight of the preserved keys' covariance (the K-FAC factor A) in the "
        "least-squares solve.",
        ge=0.0, api=True,
    )  # fmt: skip
    null_threshold: float = _option(
        0.02, "alphaedit: eigenvalues of A below this span the null space the update is kept in.",
        gt=0.0, api=True,
    )  # fmt: skip
    alphaedit_l2: float = _option(
        10.0, "alphaedit: weight of the update's L2 penalty in its solve.", gt=0.0, api=True
    )

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check(field, getattr(self, field.name))
        if isinstance(self.layers, list):  # a JSON list: frozen settings keep a tuple
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.clip and resolve_method(self.method) == "ekfac":
            raise SettingsError("clip", "applies to kfac and nullspace, not to ekfac")
        if self.laplace and resolve_method(self.method) in CLOSED_FORM:
            raise SettingsError(
                "laplace", f"applies to the projected editor, not to {resolve_method(self.method)}"
            )
        if self.drift_budget and resolve_method(self.method) not in BUDGETED:
            raise SettingsError(
                "drift_budget",
                f"applies to kfac, ekfac and nullspace (whose edit has a gamma to raise), not "
                f"to {resolve_method(self.method)}",
            )
        if self.lr_schedule != "constant" and resolve_method(self.method) in CLOSED_FORM:
            raise SettingsError(
                "lr_schedule",
                f"applies to the projected editor, not to {resolve_method(self.method)} "
                "(whose value optimisation runs at value_lr)",
            )
        if self.warm_start != "off" and resolve_method(self.method) in CLOSED_FORM:
            raise SettingsError(
                "warm_start",
                f"applies to the projected editor, not to {resolve_method(self.method)} "
                "(which solves in closed form already)",
            )
        if self.edit_site != "all" and resolve_method(self.method) in CLOSED_FORM:
            raise SettingsError(
                "edit_site",
                f"applies to the projected editor, not to {resolve_method(self.method)} "
                "(which edits at the subject's last token already)",
            )
        if self.contexts and resolve_method(self.method) in CLOSED_FORM:
            raise SettingsError(
                "contexts",
                f"applies to the projected editor, not to {resolve_method(self.method)} "
                "(whose value_contexts does this)",
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> EditSettings:
        """Settings from a dict of options (an API request's, a manifest's "options"): a key
        missing or None takes its default. An unknown key or a bad value raises SettingsError."""
        options = dict(options or {})
        _refuse_unknown(options)
        return cls(**{key: value for key, value in options.items() if value is not None})

    def to_options(self) -> dict[str, Any]:
        """Every option as plain JSON (layers as a list), as a version's manifest records it;
        `from_options` reads it back into equal settings."""
        options = dataclasses.asdict(self)
        if isinstance(self.layers, tuple):
            options["layers"] = list(self.layers)
        return options

    def override(self, **changes: Any) -> EditSettings:
        """These settings with the options in `changes` that are not None changed (a caller's
        keyword arguments over its settings); an unknown name or a bad value raises
        SettingsError, as in `from_options`."""
        _refuse_unknown(changes)
        kept = {key: value for key, value in changes.items() if value is not None}
        return dataclasses.replace(self, **kept)


def _refuse_unknown(options: Mapping[str, Any]) -> None:
    for key in options:
        if key not in OPTION_NAMES:
            known = ", ".join(OPTION_NAMES)
            raise SettingsError(str(key), f"is not an edit option (known: {known})")


def resolve_method(method: str) -> str:
    """Map a method name or alias (`crispedit`) to one of `METHODS`; ValueError otherwise."""
    resolved = ALIASES.get(method, method)
    if resolved not in METHODS:
        names = ", ".join([*ALIASES, *METHODS])
        raise ValueError(f"unknown method {method!r}: one of {names}")
    return resolved


def option_rules(name: str) -> dict[str, Any]:
    """The metadata of option `name`: doc, bounds, choices, and `api`/`api_le` for the service.
    Raises KeyError for a name that is not an option."""
    for field in dataclasses.fields(EditSettings):
        if field.name == name:
            return dict(field.metadata)
    raise KeyError(name)


def _check(field: dataclasses.Field, value: Any) -> None:
    """Raise SettingsError unless `value` has the field's type and respects its rules."""
    name, rules = field.name, field.metadata
    kind = type(field.default)
    if name == "layers":
        _check_layers(value)
        return
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise SettingsError(name, f"must be a finite {kind.__name__}, got {value!r}")
    if "choices" in rules and value not in rules["choices"]:
        problem = f"must be one of {', '.join(rules['choices'])}, not {value!r}"
        if name == "method":
            problem += f" (unknown method {value!r})"
        raise SettingsError(name, problem)
    for rule, holds, words in (
        ("ge", lambda v, b: v >= b, "at least"),
        ("gt", lambda v, b: v > b, "above"),
        ("le", lambda v, b: v <= b, "at most"),
        ("lt", lambda v, b: v < b, "below"),
    ):
        if rule in rules and not holds(value, rules[rule]):
            raise SettingsError(name, f"must be {words} {rules[rule]}, not {value!r}")


def _check_layers(value: Any) -> None:
    if value is None or (isinstance(value, str) and value.strip()):
        return
    names = isinstance(value, list | tuple) and value
    if names and all(isinstance(name, str) and name.strip() for name in value):
        return
    raise SettingsError("layers", "must be a layer spec or a non-empty list of layer names")


DEFAULTS = EditSettings()
OPTION_NAMES = tuple(field.name for field in dataclasses.fields(EditSettings))
