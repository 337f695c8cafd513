"""Sequential editing on a stream: each batch is edited from the stream head, protecting the
capability curvature *and* the edits already made (DESIGN §2.7).

The stream state after a version is the running, token-weighted sum of the edit-set K-FAC factors
(S_A = Σ a aᵀ, S_B = Σ g gᵀ over the `prompt target` texts of every applied edit, computed after
applying them) and their token count n. A version stores only its own edits' rows a and g
(`EditRows`); a head's sums are those of its chain, rebuilt in chain order (crispedit/streams.py
`read_state`). The projector of the next batch is built from

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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from contract.facts import Fact
from contract.settings import DEFAULTS
from crispedit.corpus import pad_batches
from crispedit.curvature import (
    Curvature,
    LayerCurvature,
    collect_rows,
    eigenbasis,
    to_host,
)
from crispedit.delta import Delta, add_to_weights
from crispedit.models import get_layers
from crispedit.targets import encode_pair

BETA = DEFAULTS.beta  # the weight of earlier edits: contract.settings
EDIT_BATCH = 16


@dataclass
class EditRows:
    """One version's own edits as K-FAC factor rows on the CPU: per layer the valid tokens' inputs
    a (n × d_in) and output gradients g (n × d_out) of its `prompt target` texts, in the dtype the
    model computed them in (bf16 for a bf16 model: exact, and half the bytes of fp32).

    Their Gram matrices aᵀa and gᵀg are what the version adds to the stream state. A version
    stores these rows, n·(d_in + d_out) numbers per layer, rather than the state's d_in² + d_out²
    sums (rank ≤ n either way): the state of a head is rebuilt along its chain (streams.read_state).
    """

    a: dict[str, torch.Tensor]  # layer -> (n, d_in)
    g: dict[str, torch.Tensor]  # layer -> (n, d_out)
    tokens: int

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict for a safetensors file (`{layer}/a`, `{layer}/g`, `tokens`)."""
        out = {"tokens": torch.tensor([self.tokens], dtype=torch.int64)}
        for name in self.a:
            out[f"{name}/a"] = self.a[name]
            out[f"{name}/g"] = self.g[name]
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], layers: list[str]) -> EditRows:
        """The rows of `layers` from a `to_tensors` dict; ValueError saying what is wrong with it
        (a missing or extra tensor, a row count that is not `tokens`, a dtype that is no float)."""
        count = tensors.get("tokens")
        if count is None or count.dtype != torch.int64 or count.shape != (1,):
            raise ValueError("no token count")
        tokens = int(count[0])
        expected = {"tokens"} | {f"{name}/{part}" for name in layers for part in ("a", "g")}
        if set(tensors) != expected:
            wrong = sorted(set(tensors) ^ expected)
            raise ValueError(f"its tensors are not the rows of layers {layers}: {wrong}")
        for key, value in tensors.items():
            if key != "tokens" and (
                not value.is_floating_point() or value.dim() != 2 or len(value) != tokens
            ):
                raise ValueError(
                    f"{key} is {value.dtype} of shape {tuple(value.shape)}, "
                    f"not the float rows of {tokens} tokens"
                )
        return cls(
            a={name: tensors[f"{name}/a"] for name in layers},
            g={name: tensors[f"{name}/g"] for name in layers},
            tokens=tokens,
        )


@dataclass
class StreamState:
    """Running sums of the edit-set factors of every edit applied on a stream so far, float64 on
    the host."""

    S_A: dict[str, torch.Tensor]  # layer -> Σ a aᵀ (float64)
    S_B: dict[str, torch.Tensor]  # layer -> Σ g gᵀ (float64)
    tokens: int = 0

    @classmethod
    def empty(cls) -> StreamState:
        return cls(S_A={}, S_B={}, tokens=0)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> StreamState:
        """The state a version written before `EditRows` stored whole (`{layer}/S_A`,
        `{layer}/S_B` in fp32, `tokens`): the sums of its whole chain."""
        state = cls.empty()
        state.tokens = int(tensors["tokens"][0])
        for key, value in tensors.items():
            if key.endswith("/S_A"):
                state.S_A[key.removesuffix("/S_A")] = value.double()
            elif key.endswith("/S_B"):
                state.S_B[key.removesuffix("/S_B")] = value.double()
        return state

    def plus(self, rows: EditRows, device: torch.device | str | None = None) -> StreamState:
        """The state after adding `rows`' edits: S_A + aᵀa and S_B + gᵀg per layer, each product
        in float64 on `device` (the model's, where it is faster; default the CPU) and added to the
        sums on the host. ValueError when the rows' widths are not the sums'."""
        S_A, S_B = dict(self.S_A), dict(self.S_B)
        for sums, parts in ((S_A, rows.a), (S_B, rows.g)):
            for name, X in parts.items():
                product = _gram(X, device)
                if name not in sums:
                    sums[name] = product
                elif sums[name].shape != product.shape:
                    raise ValueError(
                        f"rows of {name} are {X.shape[1]} wide, its sums {tuple(sums[name].shape)}"
                    )
                else:
                    sums[name] = sums[name] + product
        return StreamState(S_A=S_A, S_B=S_B, tokens=self.tokens + rows.tokens)


def _gram(X: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """Xᵀ X in float64, computed on `device` (default X's), returned on the CPU."""
    X = X.to(X.device if device is None else device, torch.float64)
    return (X.T @ X).cpu()


def edit_set_factors(
    model: nn.Module, tokenizer, layers: list[str], facts: Sequence[Fact], *, chat: bool = False
) -> EditRows:
    """The K-FAC factor rows of the `prompt target` texts of `facts` (`chat`: the prompts wrapped
    in the chat template, as the edit was) on the model as it is now, in its dtype, on the CPU
    (where a stream's state is stored, whatever the model's device)."""
    sequences = [encode_pair(tokenizer, f.prompt, f.target, chat=chat)[0] for f in facts]
    rows = collect_rows(model, layers, pad_batches(sequences, tokenizer.pad_token_id, EDIT_BATCH))
    tokens = len(next(iter(rows.values()))[0])
    return EditRows(
        a={name: a for name, (a, _) in rows.items()},
        g={name: g for name, (_, g) in rows.items()},
        tokens=tokens,
    )


def stream_curvature(
    capability: Curvature,
    state: StreamState,
    beta: float = BETA,
    device: torch.device | str | None = None,
) -> Curvature:
    """The curvature that protects capability and the stream's previous edits (see module doc),
    computed on `device`: the model's, where the float64 `eigh` runs fastest (default: the
    capability's).

    Each layer holds what a projector needs and nothing else: the eigenbases of A and B (and for
    EK-FAC its eigenvalues there), on the host; A and B themselves are not kept. The layers are
    computed one at a time, so the device holds one layer's float64 work at most (`_stream_layer`).
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


def _protected_factor(
    cap: torch.Tensor, S: torch.Tensor, n: int, beta: float, device
) -> torch.Tensor:
    """cap + β·S/n in float64 on `device`, in one float64 buffer (the copy of S, updated in
    place; the same operations in the same order as the expression, so the same bits)."""
    out = S.to(device, torch.float64, copy=True)
    return out.mul_(beta).div_(n).add_(cap.to(device))


def _stream_layer(
    c: LayerCurvature, S_A: torch.Tensor, S_B: torch.Tensor, n: int, beta: float, device
) -> LayerCurvature:
    """One layer's A = A_cap + β·S_A/n, B likewise, decomposed in float64 on `device` (accurate
    for near-singular factors); for EK-FAC its eigenvalues re-expressed in the eigenbases of A
    and B (module doc). Returns the eigendecompositions alone, on the host."""
    layer = LayerCurvature(A=None, B=None)
    squared_rotations, diagonals = {}, {}
    for which, cap, S in (("A", c.A, S_A), ("B", c.B, S_B)):
        factor = _protected_factor(cap, S, n, beta, device)
        e, U = eigenbasis(factor)
        del factor  # freed before the next buffers
        layer.keep_eigen(which, e.float(), U.float())
        if c.ekfac is not None:  # what the EK-FAC part needs of U, while U is float64
            diagonals[which] = (e, _diagonal_in(U, cap.to(device, torch.float64)))
            U_old = getattr(c, f"U_{which}").to(device, torch.float64)
            squared_rotations[which] = (U.T @ U_old).square_()  # R ∘ R, R = Uᵀ U°
            del U_old
        del U
    if c.ekfac is not None:
        (e_A, s_A), (e_B, s_B) = diagonals["A"], diagonals["B"]
        R_A, R_B = squared_rotations["A"], squared_rotations["B"]
        capability_part = R_B @ c.ekfac.to(device, torch.float64) @ R_A.T
        increase = e_B[:, None] * e_A[None, :] - s_B[:, None] * s_A[None, :]
        # the EK-FAC bases are the eigenbases just kept: one host copy serves both
        layer.U_A, layer.U_B = layer.eigen("A", "cpu")[1], layer.eigen("B", "cpu")[1]
        layer.ekfac = to_host(capability_part.add_(increase).clamp_min_(0).float())
    return layer


def _diagonal_in(U: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """diag(Uᵀ M U) in float64, from one matrix product instead of two."""
    U = U.double()
    return (M @ U).mul_(U).sum(0)


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


@contextmanager
def weights_at(
    model: nn.Module, base: dict[str, torch.Tensor], cumulative: dict[str, torch.Tensor]
) -> Iterator[None]:
    """Inside: the edited layers at `base + cumulative` (`set_weights`, so bitwise a version's
    weights); on exit, even when the body raises, the weights they held before come back bit for
    bit. Lets a resident model answer as another version of its stream for a moment."""
    layers = get_layers(model, list(base))
    saved = {name: module.weight.detach().clone() for name, module in layers.items()}
    try:
        set_weights(model, base, cumulative)
        yield
    finally:
        with torch.no_grad():
            for name, module in layers.items():
                module.weight.copy_(saved[name])


def accumulate(cumulative: dict[str, torch.Tensor], delta: Delta) -> dict[str, torch.Tensor]:
    """The cumulative delta after `delta`: previous + delta, added in fp32 (the store's order)."""
    out = dict(cumulative)
    for key, d in delta.tensors.items():
        out[key] = out[key] + d if key in out else d.clone()
    return out
