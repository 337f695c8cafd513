"""Edits of a bf16 model (issue 22): Adam on fp32 masters keeps the delta out of the blocked
subspace as an fp32 edit does, and the model ends at the delta rounded once into bf16."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from test_editor import FACTS, FAST, curvature_for

from crispedit.editor import CrispEditor
from crispedit.models import get_layers, is_conv1d, parse_layers


def blocked_share(D: torch.Tensor, P) -> float:
    """‖D's component in the blocked subspace‖ / ‖D‖, in float64 from the projector's bases and
    mask: U_B ((U_Bᵀ D U_A) ⊙ ¬M) U_Aᵀ, U_B the identity for `nullspace`."""
    D = D.double()
    U_A = P.U_A.double()
    U_B = torch.eye(D.shape[0], dtype=torch.float64) if P.U_B is None else P.U_B.double()
    blocked = ~P.M.expand(D.shape)
    rotated = U_B.T @ D @ U_A
    return float((U_B @ (rotated * blocked) @ U_A.T).norm() / D.norm())


def bf16_model(arch: str):
    """A tiny random model of `arch` (the same for a given arch) cast to bf16."""
    return make_tiny(arch).to(torch.bfloat16)


@pytest.fixture(scope="module")
def curvatures(tiny_tokenizer):
    """Per architecture, curvature of layers 2-3 collected from the fp32 copy of the bf16 model,
    built once for this module's tests."""
    made = {}

    def get(arch: str):
        if arch not in made:
            model = bf16_model(arch).float()
            layers = parse_layers(model, "2-3")
            made[arch] = layers, curvature_for(model, tiny_tokenizer, layers)
        return made[arch]

    return get


@pytest.mark.parametrize(
    ("arch", "method"), [("llama", "kfac"), ("llama", "nullspace"), ("gpt2", "kfac")]
)
def test_a_bf16_edit_keeps_its_delta_out_of_the_blocked_subspace(
    arch, method, curvatures, tiny_tokenizer
):
    """GPT-2's Conv1D stores its weight transposed: the delta is compared in the (d_out, d_in)
    layout the projector works in."""
    layers, curvature = curvatures(arch)
    model = bf16_model(arch)
    before = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}
    editor = CrispEditor(
        model, tiny_tokenizer, curvature, method=method, gamma=0.8, layers=layers, **FAST
    )
    delta = editor.edit(FACTS)
    for name, module in get_layers(model, layers).items():
        D = delta.tensors[f"{name}.weight"]
        assert D.dtype == torch.float32 and float(D.norm()) > 0.0
        P = editor.projectors[name]
        assert blocked_share(D.T if is_conv1d(module) else D, P) <= 1e-5
        # the model holds W_before + delta, rounded once into its dtype
        assert module.weight.dtype == torch.bfloat16
        assert torch.equal(module.weight, (before[name].float() + D).to(torch.bfloat16))
        assert module.weight.grad is None
    assert delta.report["efficacy"] > delta.report["efficacy_before"]
