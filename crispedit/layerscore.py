"""Which layers to edit: how far the facts' loss can fall per unit of predicted capability loss.

Issue 23's lever 2 asks for the edited layers to be chosen by a measured criterion rather than by
sweeps. For one candidate layer with weight W (d_out × d_in), let G be the gradient of the facts'
edit loss at the base weights and B ⊗ A its K-FAC capability curvature (crispedit.curvature), so
that a change ΔW lowers the facts' loss by about -⟨G, ΔW⟩ and raises the capability loss by about
q(ΔW) = ½ vec(ΔW)ᵀ (B ⊗ A) vec(ΔW) (crispedit.laplace). The steepest first-order decrease of the
facts' loss within a capability budget q ≤ ε is, by a Lagrange multiplier (ΔW ∝ -H⁻¹g, scaled
until q = ε), with H = B ⊗ A + δI and g = vec(G):

    max { -⟨G, ΔW⟩ : ½ vec(ΔW)ᵀ H vec(ΔW) ≤ ε } = √(2ε · gᵀ H⁻¹ g)

In the factors' eigenbases (A = U_A diag(s_A) U_Aᵀ, B likewise) H is diagonal, so with
R = U_Bᵀ G U_A and Λ_ij = s_B[i]·s_A[j]

    score = √(gᵀ H⁻¹ g) = √(Σ_ij R_ij² / (Λ_ij + δ))

is the facts' loss a layer can shed per √(2ε) nats of predicted capability loss: its natural
gradient norm. Two more figures say what the projected editor can use of it. The projector at γ
(crispedit.projector) keeps the staircase M of the products below λ_γ, and moves only there:
`kept_share` = Σ_M R² / Σ R² = ‖P G‖² / ‖G‖² is the share of the plain gradient it passes, and
`kept_score` = √(Σ_M R² / (Λ + δ)) the same steepest decrease restricted to the kept directions.

Several layers: K-FAC's curvature has no cross-layer terms, so a set S of layers sharing one budget
ε sheds at most √(2ε · Σ_{l∈S} score_l²) (`joint_score`), and the best k layers are the k of
highest score, contiguous or not (`choose_layers`, in the `layers` option's format: "15,17-20").
This ignores how one layer's change alters another's gradient and curvature, and it always
prefers more layers: it ranks layers, it does not say how many to edit.

Why the natural-gradient form: a layer whose inputs are scaled by c and weight by 1/c computes
the same function, and nothing about the edit should change; A → c²A, B stays, G → cG, so R² and
Λ (and δ, relative to Λ) all scale by c² and the score does not move, while ‖G‖ scales by c (the
same holds for outputs scaled by c: B → B/c², G → G/c). So ‖G‖ alone cannot rank layers whose
activations differ in scale, as SmolLM2's middle layers' massive activations do.

The facts' loss is the projected editor's own (crispedit.editor, through crispedit.targets): the
mean cross-entropy over the target tokens of every fact's sequences (its prompt, and with
`contexts` the prompt after each context prefix), prompts wrapped as `chat_template` says, taken
over all facts at once (the editor's steps take batches of `batch_size`; their mean is this). The
subject anchors' KL is zero at the base weights, and so is its gradient: it adds nothing here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from contract.facts import Fact
from contract.settings import DEFAULTS, EditSettings
from crispedit.contexts import context_prefixes
from crispedit.curvature import Curvature, LayerCurvature
from crispedit.editor import Sequences
from crispedit.models import (
    block_index,
    block_spec,
    get_layers,
    is_conv1d,
    parse_layers,
    trainable_only,
)
from crispedit.projector import kfac_threshold
from crispedit.targets import (
    resolve_chat_template,
    target_batches,
    target_positions,
    target_token_losses_at,
)

# δ = DAMPING · mean(Λ) = DAMPING · mean(s_A) · mean(s_B): relative to the layer's own eigenvalues,
# so that rescaling a layer leaves its score alone (see above). Its role is to bound 1/Λ where
# the corpus did not see a direction at all (A is rank-deficient when the curvature has fewer
# tokens than d_in: Llama-3-8B's 14,336 inputs from 5,000 tokens), where the quadratic model says
# "free" only because it knows nothing. It is below every product of a well-sampled layer (on
# SmolLM2's layers 20-24 with 20k tokens the smallest product is 1.4e-3 of the mean), so it barely
# touches the directions the curvature did measure.
DAMPING = 1e-3
SCORES = ("score", "kept_score")  # what `choose_layers` may rank by


@dataclass(frozen=True)
class LayerScore:
    """One candidate layer's figures (see the module docstring)."""

    name: str
    block: int | None  # its block's index where the layer is that block's MLP output projection
    score: float  # √(Σ R² / (Λ + δ)): the facts' loss it sheds per √(2ε) of capability loss
    kept_score: float  # the same over the directions the projector at γ keeps
    kept_share: float  # ‖P G‖² / ‖G‖²: the share of the plain gradient the projector passes
    grad_norm: float  # ‖G‖ (Frobenius): not scale-invariant, shown for contrast


def fact_gradients(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    layers: list[str],
    settings: EditSettings = DEFAULTS,
) -> dict[str, torch.Tensor]:
    """Per layer of `layers`, the gradient G of the facts' edit loss at the model's weights, as
    the (d_out, d_in) matrix in fp32 on the model's device.

    The loss is the editor's (module docstring): `settings` gives its `contexts`, `chat_template`
    and `batch_size` (facts per forward, each with all its sequences). Each batch's gradient is
    cast to fp32 as soon as it exists and summed there, so a bf16 model's gradients are not
    summed in bf16. Only the layers' weights require grad meanwhile; their `.grad` is left as it
    was found.
    """
    facts = list(facts)
    if not facts:
        raise ValueError("no facts to score layers on")
    modules = get_layers(model, layers)
    device = next(model.parameters()).device
    chat = resolve_chat_template(tokenizer, settings.chat_template)
    prefixes = context_prefixes(model, tokenizer, settings.contexts)
    sequences = Sequences.of(facts, prefixes)
    per_batch = settings.batch_size * (len(prefixes) + 1)
    batches = list(target_batches(tokenizer, sequences.pairs, per_batch, chat=chat))
    # the mean over every target token of every batch, as one batch of all the facts would take it
    n_targets = sum(int(target_positions(b["labels"]).sum()) for b in batches)
    saved = {name: m.weight.grad for name, m in modules.items()}
    grads: dict[str, torch.Tensor] = {}
    try:
        with trainable_only(model, [m.weight for m in modules.values()]):
            for m in modules.values():
                m.weight.grad = None
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                where = target_positions(batch["labels"])
                losses, _ = target_token_losses_at(
                    logits[:, :-1][where], batch["labels"][:, 1:][where], where
                )
                (losses.sum() / n_targets).backward()
                del logits, losses
                for name, m in modules.items():
                    g, m.weight.grad = m.weight.grad, None
                    if g is None:  # the loss does not reach this layer
                        continue
                    g = (g.T if is_conv1d(m) else g).float()
                    grads[name] = grads[name].add_(g) if name in grads else g.clone()
    finally:
        for name, m in modules.items():
            m.weight.grad = saved[name]
    return {
        name: grads[name] if name in grads else _zeros_like_weight(m, device)
        for name, m in modules.items()
    }


def _zeros_like_weight(module: nn.Module, device: torch.device) -> torch.Tensor:
    d_out, d_in = (module.weight.T if is_conv1d(module) else module.weight).shape
    return torch.zeros(d_out, d_in, dtype=torch.float32, device=device)


def score_layer(
    G: torch.Tensor,
    curvature: LayerCurvature,
    gamma: float = DEFAULTS.gamma,
    clip: float = DEFAULTS.clip,
    damping: float = DAMPING,
) -> dict[str, float]:
    """`score`, `kept_score`, `kept_share` and `grad_norm` of one layer (see `LayerScore`) for
    its gradient G (d_out, d_in) and K-FAC curvature, computed in fp32 on G's device.

    The kept directions are the K-FAC projector's at γ with `clip` (the default method's:
    `projector.kfac_threshold`). The eigenbases come from `curvature.eigen` on G's device (its
    factors stay where they are; the eigendecompositions are kept on the host, as a projector's
    are, for the edit that follows). A layer whose curvature is zero (a dead MLP channel set)
    has δ = 0: a zero gradient there scores 0, a nonzero one infinity (the model then predicts
    no capability cost at all). A zero gradient has kept share 0.
    """
    device = G.device
    s_A, U_A = curvature.eigen("A", device)
    s_B, U_B = curvature.eigen("B", device)
    G = G.to(torch.float32)
    R = U_B.float().T @ G @ U_A.float()
    R2 = R.square()
    lam = s_B.float()[:, None] * s_A.float()[None, :]
    delta = damping * float(s_A.float().mean()) * float(s_B.float().mean())
    # where R = 0 the term is 0 whatever Λ + δ is (0/0 for a zero curvature)
    terms = torch.where(R2 > 0, R2 / (lam + delta), torch.zeros_like(R2))
    _, k = kfac_threshold(s_A, s_B, gamma, clip)  # row i keeps its k_i smallest products
    kept = torch.arange(R.shape[1], device=device)[None, :] < k.to(device)[:, None]
    total = float(R2.sum())
    return {
        "score": math.sqrt(float(terms.sum())),
        "kept_score": math.sqrt(float(terms[kept].sum())),
        "kept_share": float(R2[kept].sum()) / total if total > 0 else 0.0,
        "grad_norm": math.sqrt(float(G.square().sum())),
    }


def rank_layers(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    curvature: Curvature,
    layers: list[str] | str | None = None,
    settings: EditSettings = DEFAULTS,
    damping: float = DAMPING,
) -> list[LayerScore]:
    """Each candidate layer's `LayerScore` for an edit of `facts`, in depth order.

    `layers` are the candidates (a `layers` spec or names; default: every layer of `curvature`),
    each of which the curvature must hold. The gradients come from one pass over the facts
    (`fact_gradients`, with `settings`' loss options); the kept directions are those of
    `settings`' γ and clip. Every candidate's fp32 gradient is held at once on the model's
    device (7.5 GB for Llama-3-8B's 32 down projections: rank fewer candidates at a time there).
    """
    names = parse_layers(model, list(curvature.layers) if layers is None else layers)
    missing = [n for n in names if n not in curvature.layers]
    if missing:
        raise ValueError(f"the curvature has no factors for layer {missing[0]!r}")
    grads = fact_gradients(model, tokenizer, facts, names, settings)
    scores = []
    for name in names:
        figures = score_layer(
            grads.pop(name), curvature.layers[name], settings.gamma, settings.clip, damping
        )
        scores.append(LayerScore(name=name, block=block_index(model, name), **figures))
    return scores


def choose_layers(scores: Sequence[LayerScore], k: int, by: str = "score") -> str:
    """The `k` layers of highest `by` ("score" or "kept_score"), as a `layers` spec that
    `models.parse_layers` reads back: block indices with runs as ranges ("15,17-20") when every
    chosen layer is its block's MLP output projection, else their module names, comma-separated,
    in depth order. They need not be contiguous (see the module docstring); ties keep the
    earlier layer of `scores`."""
    if by not in SCORES:
        raise ValueError(f"layers are chosen by one of {SCORES}, not {by!r}")
    if not 1 <= k <= len(scores):
        raise ValueError(f"cannot choose {k} of {len(scores)} layers")
    order = sorted(range(len(scores)), key=lambda i: -getattr(scores[i], by))
    chosen = [scores[i] for i in sorted(order[:k])]
    if all(s.block is not None for s in chosen):
        return block_spec([s.block for s in chosen])
    return ",".join(s.name for s in chosen)


def joint_score(scores: Iterable[LayerScore], by: str = "score") -> float:
    """√(Σ score²) over a set of layers: the facts' loss they shed together per √(2ε) of
    capability loss (K-FAC has no cross-layer curvature); `by` "kept_score" for the projected
    editor's share."""
    return math.sqrt(sum(getattr(s, by) ** 2 for s in scores))
