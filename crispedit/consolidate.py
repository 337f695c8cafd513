"""Consolidation (issue 23, lever 5): after an edit, re-solve the whole change of the edited layers
so that it keeps what it does on the edits' inputs while paying the capability curvature.

A stream stacks its chunks' deltas: each is found from the head with the earlier edits protected,
but none is revisited, and each leaves some change in directions no edit needs. Consolidation
re-solves the stream's cumulative change once per chunk, in closed form.

For one edited layer let D (d_out × d_in) be the cumulative change after the new chunk,

    K̄ = S_A / n

the mean Gram matrix of the layer's inputs a over every token of every edit of the stream so far
(the stream state's S_A plus the new chunk's rows aᵀa, over their token count n:
`sequential.StreamState`, `sequential.EditRows`), and A, B the layer's capability K-FAC factors:
the base curvature's, not the stream's (whose A holds the edit keys themselves, which would then
count on both sides). ΔW is chosen to keep the edits' outputs at their own inputs, ΔW a ≈ D a for
the edits' a (MEMIT's keys-and-values view), and to cost little capability:

    min_ΔW  tr(B (ΔW − D) K̄ (ΔW − D)ᵀ) + λ · tr(B ΔW A ΔWᵀ)

The first term is Σ over edit tokens of (ΔW a − D a)ᵀ B (ΔW a − D a) / n, the second λ times the
K-FAC Laplace form of ΔW (crispedit.laplace, doubled): λ is the weight of a mean capability token
against a mean edit token. Both are convex quadratics in ΔW; the gradient is

    2 B (ΔW − D) K̄ + 2 λ B ΔW A = 0

and B, positive definite, cancels on the left:

    (ΔW − D) K̄ + λ ΔW A = 0   ⇒   ΔW (K̄ + λ A) = D K̄   ⇒   ΔW = D K̄ (K̄ + λ A)⁻¹

one d_in × d_in solve per layer, whatever B is. Where K̄ dominates (the edits' inputs) ΔW keeps D;
in directions the edits never see (K̄ a = 0) it drops D entirely; between, D is shrunk by how much
capability curvature A has there against the edits' K̄. λ → 0 with K̄ of full rank returns D.

Why B weighs the first term, and not the edit set's own output-gradient factor S_B/n: at a
converged edit each target's probability is near 1, so the edits' output gradients, and their
Gauss–Newton curvature g gᵀ, are near zero; the quadratic (ΔW − D) under S_B ⊗ K̄ would be nearly
flat, and the solve would erase the edits for any λ. Weighting both terms by the same B keeps the
edits' outputs themselves (values at their keys, in the capability's own metric) and lets B drop
out. The rows of the chunk are measured at the edited point (before consolidation), as a stream
stores them (`streams.edit_on_stream`).

The solve runs in float64 on the model's device, on the (d_out, d_in) view of each weight (GPT-2's
Conv1D stores it transposed); the consolidated change comes back in float32 in the weight's storage
layout, as every delta is (crispedit.delta). A stream publishes D′ − (the parent's cumulative
delta) as the new version's delta, so its chain still sums, in fp32 and chain order, to the
weights the model holds (crispedit.sequential's module doc); a batch edit outside a stream is the
case of an empty parent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from contract.facts import Fact
from crispedit.curvature import Curvature
from crispedit.delta import Delta
from crispedit.evaluate import teacher_forced_accuracy
from crispedit.models import get_layers, is_conv1d, model_fingerprint
from crispedit.sequential import StreamState, accumulate, edit_set_factors, set_weights

# K̄ + λA is singular only where both the edits' inputs and the capability corpus leave a direction
# empty (a capability corpus of fewer tokens than d_in); a ridge of this share of its mean diagonal
# makes the solve well posed there and moves nothing else measurably (float64 keeps ~16 digits)
DAMPING = 1e-10


def consolidated(D: torch.Tensor, K: torch.Tensor, A: torch.Tensor, weight: float) -> torch.Tensor:
    """ΔW = D K̄ (K̄ + λA)⁻¹ for one layer (module doc): `D` (d_out, d_in), `K` the edits' mean
    input Gram K̄ and `A` the capability factor (d_in, d_in), `weight` λ. Computed in float64 on
    D's device, returned there in float64. Since K̄ + λA is symmetric, ΔWᵀ = (K̄ + λA)⁻¹ K̄ Dᵀ: one
    linear solve, no inverse."""
    device = D.device
    D, K, A = (t.to(device, torch.float64) for t in (D, K, A))
    M = K + weight * A
    M.diagonal().add_(DAMPING * float(M.diagonal().mean()))
    return torch.linalg.solve(M, K @ D.T).T


def capability_rise(D: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """½·tr(B D A Dᵀ), the capability loss rise (nats per token) the K-FAC form predicts for a
    change `D` (d_out, d_in) of a layer with factors A, B (crispedit.laplace's q, read here
    from the factors themselves: two products, where the form's eigenbases would take an
    eigendecomposition that a consolidation does not otherwise need)."""
    D = D.double()
    return float(
        0.5 * ((B.to(D.device, torch.float64) @ D) * (D @ A.to(D.device, torch.float64))).sum()
    )


def consolidate(
    model: nn.Module,
    cumulative: dict[str, torch.Tensor],
    state: StreamState,
    capability: Curvature,
    weight: float,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The consolidated change D′ of every layer in `cumulative` (state-dict keyed, storage
    layout: what `sequential.accumulate` gives), with K̄ from `state` (the edits' factors, this
    edit's rows included) and A, B from `capability`; float64 on the model's device, returned
    fp32 on the host. Also returns per layer the relative change ‖D′ − D‖/‖D‖ and the K-FAC
    capability rise predicted for D and for D′ (`capability_rise`)."""
    device = next(model.parameters()).device
    names = [key.removesuffix(".weight") for key in cumulative]
    modules = get_layers(model, names)
    out, change, before, after = {}, {}, {}, {}
    for name in names:
        key, layer = f"{name}.weight", capability.layers[name]
        if layer.A is None or layer.B is None:
            raise ValueError(f"consolidation needs the capability factors A and B of {name}")
        stored = cumulative[key].to(device, torch.float64)
        D = stored.T if is_conv1d(modules[name]) else stored  # the (d_out, d_in) view
        K = state.S_A[name].to(device, torch.float64) / state.tokens
        A = layer.A.to(device, torch.float64)
        new = consolidated(D, K, A, weight)
        change[name] = float((new - D).norm() / D.norm()) if D.norm() > 0 else 0.0
        before[name] = capability_rise(D, A, layer.B)
        after[name] = capability_rise(new, A, layer.B)
        out[key] = (new.T if is_conv1d(modules[name]) else new).float().cpu()
        del stored, D, K, A, new
    figures = {
        "relative_change": change,
        "predicted_loss_increase": {"before": sum(before.values()), "after": sum(after.values())},
        "predicted_loss_increase_per_layer": {"before": before, "after": after},
    }
    return out, figures


def consolidate_edit(
    model: nn.Module,
    tokenizer,
    capability: Curvature | None,
    base: dict[str, torch.Tensor],
    delta: Delta,
    facts: Sequence[Fact],
    weight: float,
    *,
    chat: bool = False,
    parent: dict[str, torch.Tensor] | None = None,
    state: StreamState | None = None,
) -> tuple[Delta, dict[str, torch.Tensor]]:
    """Consolidate the edit `delta` just made (the model holds `base + parent + delta`, as the
    editor or a stream left it) with weight λ = `weight`; every edit path calls this one.

    `parent` is the cumulative change the edit started from (a stream's head; none for a batch
    edit, where `base` holds the weights before it), `state` the edits' factors with this edit's
    rows included (a stream's; none: this edit's own rows, measured here on `facts` with the
    prompts wrapped as the edit wrapped them, `chat`). The model ends at `base + parent + the new
    delta`, the new delta being D′ − parent in fp32, so that `accumulate(parent, new delta)` (the
    store's sum) is exactly what the model holds; returns that delta and that cumulative.

    The new delta's report is the edit's with `efficacy` re-measured on the consolidated model
    (teacher-forced on the facts' prompts) and a `consolidation` entry: λ, the edit's own
    efficacy, and `consolidate`'s figures. ValueError without a capability curvature."""
    if capability is None:
        raise ValueError("consolidation needs the capability curvature (its K-FAC factors A, B)")
    parent = {} if parent is None else parent
    layers = list(base)
    if state is None:
        device = next(model.parameters()).device
        rows = edit_set_factors(model, tokenizer, layers, facts, chat=chat)
        state = StreamState.empty().plus(rows, device)
    cumulative = accumulate(parent, delta)
    new, figures = consolidate(model, cumulative, state, capability, weight)
    tensors = {k: v - parent[k] if k in parent else v for k, v in new.items()}
    rebased = Delta(tensors=tensors)
    cumulative = accumulate(parent, rebased)
    set_weights(model, base, cumulative)
    pairs = [(f.prompt, f.target) for f in facts]
    efficacy = teacher_forced_accuracy(model, tokenizer, pairs, chat=chat)
    meta = {
        **delta.meta,
        "edited_fingerprint": model_fingerprint(model, layers),
        "consolidate": weight,
    }
    report = {
        **delta.report,
        **meta,
        "efficacy": efficacy,
        "delta_norm": {k: float(v.norm()) for k, v in tensors.items()},
        "consolidation": {
            "weight": weight,
            "efficacy": efficacy,
            "efficacy_edit": delta.report.get("efficacy"),
            **figures,
        },
    }
    return Delta(tensors=tensors, meta=meta, report=report), cumulative
