"""Sequential editing on a stream: each batch is edited from the stream head, protecting the
capability curvature *and* the edits already made (DESIGN §2.7).

The stream state after a version is the running, token-weighted sum of the edit-set K-FAC factors
(S_A = Σ a aᵀ, S_B = Σ g gᵀ over the `prompt target` texts of every applied edit, computed after
applying them) and their token count n. The projector of the next batch is built from

    A = A_cap + β · S_A / n,   B = B_cap + β · S_B / n

β = 1 gives the mean edit token the same weight as the mean capability token, whatever the number
of edits or corpus tokens: earlier edits stay protected as the stream grows, and capability stays
protected as edits accumulate.

An EK-FAC capability curvature is re-expressed in new eigenbases, those of the stream's A and B
(re-estimating its eigenvalues there from data would take another pass over the corpus, so they
come from the curvature itself):

    U_A, U_B = eigenbases of A, B        λ_ij = diag of (EK-FAC_cap + B ⊗ A − B_cap ⊗ A_cap) there

The capability part is its EK-FAC matrix, diagonal in the old bases U_A°, U_B°, seen in the new:
with R_A = U_Aᵀ U_A° (and R_B), its diagonal is (R_B ∘ R_B) λ° (R_A ∘ R_A)ᵀ. The increase the K-FAC
rule gives, cross terms β (B_cap ⊗ S_A/n + S_B/n ⊗ A_cap) included, is e_B,i · e_A,j − s_B,i · s_A,j
there, with e the eigenvalues of A and B and s_A = diag(U_Aᵀ A_cap U_A). The new bases matter: in
the capability's own (measured on 10 × 100 CounterFact edits) the edit curvature's mass lies off
the diagonal, spread thinly over many eigenvalues below the γ threshold, and the stream kept 0.44
of its edits; the eigenbases of A and B hold the edit directions as eigenvectors of their own.

Each batch starts a fresh Adam, so no optimizer moment ever meets a changed projector (DESIGN's
"re-project Adam's first moment" has nothing to act on).

Weights are exact: the model on a stream is always `W_base + D` where D is the cumulative delta of
the head, summed in fp32 in chain order, the same order the store composes it in; so applying the
store's cumulative delta to the base model reproduces the edited weights bitwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from contract.facts import Fact
from contract.settings import DEFAULTS
from crispedit.corpus import pad_batches
from crispedit.curvature import Curvature, LayerCurvature, collect_curvature, eigenbasis
from crispedit.delta import Delta, add_to_weights
from crispedit.models import get_layers
from crispedit.targets import encode_pair

BETA = DEFAULTS.beta  # the weight of earlier edits: contract.settings
EDIT_BATCH = 16


@dataclass
class StreamState:
    """Running sums of the edit-set factors of every edit applied on a stream so far."""

    S_A: dict[str, torch.Tensor]  # layer -> Σ a aᵀ (float64)
    S_B: dict[str, torch.Tensor]  # layer -> Σ g gᵀ (float64)
    tokens: int = 0

    @classmethod
    def empty(cls) -> StreamState:
        return cls(S_A={}, S_B={}, tokens=0)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict for a safetensors file (`{layer}/S_A`, `{layer}/S_B`, `tokens`).

        Stored in fp32 (half the bytes of fp64; a protection matrix needs no more): for SmolLM2's
        five layers that is 54 MB per version, for five Llama-3-8B layers about 4 GB.
        """
        out = {"tokens": torch.tensor([self.tokens], dtype=torch.int64)}
        for name in self.S_A:
            out[f"{name}/S_A"] = self.S_A[name].float()
            out[f"{name}/S_B"] = self.S_B[name].float()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> StreamState:
        state = cls.empty()
        state.tokens = int(tensors["tokens"][0])
        for key, value in tensors.items():
            if key.endswith("/S_A"):
                state.S_A[key.removesuffix("/S_A")] = value.double()
            elif key.endswith("/S_B"):
                state.S_B[key.removesuffix("/S_B")] = value.double()
        return state

    def plus(self, other: StreamState) -> StreamState:
        """The state after adding `other`'s edits to this one."""
        S_A, S_B = dict(self.S_A), dict(self.S_B)
        for name in other.S_A:
            S_A[name] = S_A[name] + other.S_A[name] if name in S_A else other.S_A[name]
            S_B[name] = S_B[name] + other.S_B[name] if name in S_B else other.S_B[name]
        return StreamState(S_A=S_A, S_B=S_B, tokens=self.tokens + other.tokens)


def edit_set_factors(
    model: nn.Module, tokenizer, layers: list[str], facts: Sequence[Fact], *, chat: bool = False
) -> StreamState:
    """K-FAC sums of the `prompt target` texts of `facts` (`chat`: the prompts wrapped in the chat
    template, as the edit was) on the model as it is now, on the CPU (where a stream state is
    added up and stored, whatever the model's device)."""
    sequences = [encode_pair(tokenizer, f.prompt, f.target, chat=chat)[0] for f in facts]
    curvature = collect_curvature(
        model, layers, pad_batches(sequences, tokenizer.pad_token_id, EDIT_BATCH), progress=False
    )
    n = curvature.tokens
    return StreamState(
        S_A={name: (c.A.double() * n).cpu() for name, c in curvature.layers.items()},
        S_B={name: (c.B.double() * n).cpu() for name, c in curvature.layers.items()},
        tokens=n,
    )


def stream_curvature(
    capability: Curvature,
    state: StreamState,
    beta: float = BETA,
    device: torch.device | str | None = None,
) -> Curvature:
    """The curvature that protects capability and the stream's previous edits (see module doc),
    on `device`: the model's, where its projectors are built (default: the capability's).

    The capability's factors and the state's sums, wherever they live (the capability on the
    device that built it or on the CPU that read it from the store, the state on the CPU), are
    moved there once per layer, and EK-FAC's eigendecompositions run there.
    """
    if state.tokens == 0 or beta == 0:
        return capability
    layers = {}
    for name, c in capability.layers.items():
        target = c.A.device if device is None else torch.device(device)
        layers[name] = _stream_layer(
            c, state.S_A[name], state.S_B[name], state.tokens, beta, target
        )
    meta = {**capability.meta, "stream_edit_tokens": state.tokens, "beta": beta}
    return Curvature(layers=layers, tokens=capability.tokens, meta=meta)


def _stream_layer(
    c: LayerCurvature, S_A: torch.Tensor, S_B: torch.Tensor, n: int, beta: float, device
) -> LayerCurvature:
    """One layer's A = A_cap + β·S_A/n, B likewise, and for EK-FAC its eigenvalues re-expressed in
    the eigenbases of A and B (module doc), computed in float64 on `device`."""
    on_device = lambda t: t.to(device, torch.float64)  # noqa: E731
    A_cap, B_cap = on_device(c.A), on_device(c.B)
    A = A_cap + beta * on_device(S_A) / n
    B = B_cap + beta * on_device(S_B) / n
    layer = LayerCurvature(A=A.float(), B=B.float())
    if c.ekfac is not None:
        e_A, U_A = eigenbasis(A)
        e_B, U_B = eigenbasis(B)
        R_A, R_B = U_A.T @ on_device(c.U_A), U_B.T @ on_device(c.U_B)
        capability_part = (R_B * R_B) @ on_device(c.ekfac) @ (R_A * R_A).T
        s_A, s_B = _diagonal_in(U_A, A_cap), _diagonal_in(U_B, B_cap)
        increase = e_B[:, None] * e_A[None, :] - s_B[:, None] * s_A[None, :]
        layer.U_A, layer.U_B = U_A.float(), U_B.float()
        layer.ekfac = (capability_part + increase).clamp_min(0).float()
    return layer


def _diagonal_in(U: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """diag(Uᵀ M U) in float64, from one matrix product instead of two."""
    U = U.double()
    return ((M @ U) * U).sum(0)


def set_weights(
    model: nn.Module, base: dict[str, torch.Tensor], cumulative: dict[str, torch.Tensor]
) -> None:
    """Set the edited layers to `base + cumulative` (fp32 add, the one way `apply` adds)."""
    with torch.no_grad():
        for name, module in get_layers(model, list(base)).items():
            module.weight.copy_(base[name])
    add_to_weights(
        model, {k: v for k, v in cumulative.items() if k.removesuffix(".weight") in base}
    )


def accumulate(cumulative: dict[str, torch.Tensor], delta: Delta) -> dict[str, torch.Tensor]:
    """The cumulative delta after `delta`: previous + delta, added in fp32 (the store's order)."""
    out = dict(cumulative)
    for key, d in delta.tensors.items():
        out[key] = out[key] + d if key in out else d.clone()
    return out
