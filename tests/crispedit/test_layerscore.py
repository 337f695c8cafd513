"""The layer score (crispedit.layerscore): against the Kronecker form written out with torch.kron,
invariant where a layer is only rescaled, zero where the facts' loss cannot reach a layer, its
choice in the `layers` option's format, and its device and dtype discipline."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny
from devices import accelerator, on_accelerator
from test_editor import FACTS, curvature_for
from test_laplace import spd

from contract.settings import DEFAULTS
from crispedit.contexts import context_prefixes
from crispedit.curvature import LayerCurvature
from crispedit.layerscore import (
    DAMPING,
    LayerScore,
    choose_layers,
    fact_gradients,
    joint_score,
    rank_layers,
    score_layer,
)
from crispedit.models import get_layers, is_conv1d, parse_layers
from crispedit.projector import build_projector
from crispedit.targets import target_batches, target_loss


def brute_force(G: torch.Tensor, c: LayerCurvature, gamma: float) -> dict[str, float]:
    """score, kept_score and kept_share from the explicit (B ⊗ A + δI)⁻¹, in float64, with the
    kept directions those the real projector passes: P commutes with B ⊗ A (it keeps a set of
    its eigenvectors), so the kept score is √(vec(PG)ᵀ H⁻¹ vec(PG))."""
    A, B = c.A.double(), c.B.double()
    d_out, d_in = G.shape
    delta = DAMPING * float(torch.trace(A) / d_in) * float(torch.trace(B) / d_out)
    H = torch.kron(B, A) + delta * torch.eye(d_out * d_in, dtype=torch.float64)
    g = G.double().reshape(-1)  # row-major: entry (i, j) at i·d_in + j, as kron(B, A) indexes it
    P = build_projector(c, "kfac", gamma)
    kept = P(G.float()).double().reshape(-1)
    return {
        "score": math.sqrt(float(g @ torch.linalg.solve(H, g))),
        "kept_score": math.sqrt(float(kept @ torch.linalg.solve(H, kept))),
        "kept_share": float(kept @ kept / (g @ g)),
    }


def one_batch_gradient(model, tok, layers, pairs) -> dict[str, torch.Tensor]:
    """The gradient of `target_loss` over one batch holding every pair, by plain autograd, as
    (d_out, d_in): what the editor would descend with all the facts in one step."""
    batch = next(target_batches(tok, pairs, len(pairs)))
    modules = get_layers(model, layers)
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target_loss(logits, batch["labels"]).backward()
    grads = {n: (m.weight.grad.T if is_conv1d(m) else m.weight.grad).clone()
             for n, m in modules.items()}  # fmt: skip
    model.zero_grad()
    return grads


# ---------------------------------------------------------------------------------------------
# (1) the score is the Kronecker form's


@pytest.mark.parametrize("gamma", (0.0, 0.5, 0.9))
def test_the_score_is_the_explicit_kronecker_form(gamma):
    A, B = spd(7, 1), spd(5, 2)
    c = LayerCurvature(A=A.float(), B=B.float())
    G = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    ours = score_layer(G, c, gamma=gamma)
    expected = brute_force(G, c, gamma)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-4), key
    assert ours["grad_norm"] == pytest.approx(float(G.norm()), rel=1e-6)
    if gamma == 0.0:  # nothing blocked: the projector keeps it all
        assert ours["kept_share"] == pytest.approx(1.0) and ours["kept_score"] == ours["score"]
    else:
        assert 0.0 < ours["kept_share"] < 1.0 and ours["kept_score"] < ours["score"]


@pytest.mark.parametrize("contexts", (0, 2))
def test_a_real_layer_scores_its_facts_gradient_under_the_kronecker_form(tiny, contexts):
    """Tiny Llama (Linear) and GPT-2 (Conv1D): the gradient is the editor's loss over all the
    facts' sequences in one batch (facts scored one per forward here), and each layer's score
    is the explicit Kronecker form of it."""
    model, tok = tiny
    layers = parse_layers(model, "1-3")
    curvature = curvature_for(model, tok, layers)
    settings = DEFAULTS.override(batch_size=1, contexts=contexts)
    prefixes = context_prefixes(model, tok, contexts)
    pairs = [(p + f.prompt, f.target) for f in FACTS for p in ("", *prefixes)]
    expected = one_batch_gradient(model, tok, layers, pairs)
    grads = fact_gradients(model, tok, FACTS, layers, settings)
    for name in layers:
        assert grads[name].dtype == torch.float32
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-7)
    scores = rank_layers(model, tok, FACTS, curvature, settings=settings)
    assert [s.name for s in scores] == layers
    for s in scores:
        bf = brute_force(expected[s.name], curvature.layers[s.name], DEFAULTS.gamma)
        assert s.score == pytest.approx(bf["score"], rel=1e-3)
        assert s.kept_score == pytest.approx(bf["kept_score"], rel=1e-3)
        assert s.kept_share == pytest.approx(bf["kept_share"], rel=1e-3, abs=1e-6)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# (2) a rescaled layer scores the same


@pytest.mark.parametrize("damping", (DAMPING, 1.0))
def test_a_layer_rescaled_without_changing_the_model_scores_the_same(tiny_tokenizer, damping):
    """Block 2's down projection reads inputs 8× larger (its up projection × 8) through a weight
    8× smaller: the same model, and the same score, kept score and kept share, while its plain
    gradient norm is 8× larger (its gradient G = g aᵀ grows with a). A damping as large as the
    mean eigenvalue product shows δ scales with the layer too."""
    c = 8.0  # a power of two: the rescaled weights are exact
    base, scaled = make_tiny("llama"), make_tiny("llama")
    with torch.no_grad():
        block = scaled.model.layers[2].mlp
        block.up_proj.weight.mul_(c)
        block.down_proj.weight.div_(c)
    ids = torch.tensor([[5, 17, 33, 2, 91, 7]])
    torch.testing.assert_close(scaled(input_ids=ids).logits, base(input_ids=ids).logits)
    layers = parse_layers(base, "1-3")
    ours = {}
    for key, model in (("base", base), ("scaled", scaled)):
        curvature = curvature_for(model, tiny_tokenizer, layers)
        scores = rank_layers(model, tiny_tokenizer, FACTS, curvature, damping=damping)
        ours[key] = {s.name: s for s in scores}
    for name in layers:
        b, s = ours["base"][name], ours["scaled"][name]
        assert s.score == pytest.approx(b.score, rel=1e-3)
        assert s.kept_score == pytest.approx(b.kept_score, rel=1e-3)
        assert s.kept_share == pytest.approx(b.kept_share, rel=1e-3)
        ratio = c if name == layers[1] else 1.0
        assert s.grad_norm == pytest.approx(ratio * b.grad_norm, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# (3) a layer the facts' loss cannot reach scores 0


def test_a_pruned_mlp_scores_zero_and_is_never_chosen(tiny_tokenizer):
    """Block 1's MLP pruned (its up projection zeroed, as structured pruning leaves a block):
    its down projection reads zeros at every token, so neither the facts' loss nor the
    capability loss can move through it (G = 0 and A = 0, so δ = 0 too): score 0, not NaN, and
    the choice passes it over."""
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.zero_()
    layers = parse_layers(model, "0-3")
    curvature = curvature_for(model, tiny_tokenizer, layers)
    assert float(curvature.layers[layers[1]].A.abs().max()) == 0.0
    scores = rank_layers(model, tiny_tokenizer, FACTS, curvature)
    dead = scores[1]
    assert (dead.score, dead.kept_score, dead.kept_share, dead.grad_norm) == (0.0, 0.0, 0.0, 0.0)
    assert all(s.score > 0 and math.isfinite(s.score) for s in scores if s is not dead)
    assert choose_layers(scores, 3) == "0,2-3"


def test_zero_gradient_and_zero_curvature_at_the_edges():
    c = LayerCurvature(A=spd(7, 1).float(), B=spd(5, 2).float())
    assert score_layer(torch.zeros(5, 7), c)["score"] == 0.0
    # a gradient the curvature never saw: no predicted capability cost at all
    blind = LayerCurvature(A=torch.zeros(7, 7), B=spd(5, 2).float())
    assert score_layer(torch.ones(5, 7), blind)["score"] == math.inf


# ---------------------------------------------------------------------------------------------
# (4) the choice, in the `layers` option's format


def scored(names: list[str], blocks: list[int | None], values: list[float]) -> list[LayerScore]:
    return [
        LayerScore(name=n, block=b, score=v, kept_score=10 - v, kept_share=0.5, grad_norm=1.0)
        for n, b, v in zip(names, blocks, values, strict=True)
    ]


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
def test_the_choice_is_the_top_k_as_a_spec_parse_layers_reads_back(arch):
    model = make_tiny(arch)
    names = parse_layers(model, "0-3")
    scores = scored(names, [0, 1, 2, 3], [3.0, 1.0, 2.0, 4.0])
    expected = {
        1: ("3", [3]),
        2: ("0,3", [0, 3]),
        3: ("0,2-3", [0, 2, 3]),
        4: ("0-3", [0, 1, 2, 3]),
    }
    for k, (spec, blocks) in expected.items():
        assert choose_layers(scores, k) == spec
        assert parse_layers(model, spec) == [names[i] for i in blocks]
    assert choose_layers(scores, 2, by="kept_score") == "1-2"  # 10 - score: the lowest two
    assert joint_score(scores[:2]) == pytest.approx(math.sqrt(3.0**2 + 1.0**2))
    for k in (0, 5):
        with pytest.raises(ValueError, match="layers"):
            choose_layers(scores, k)
    with pytest.raises(ValueError, match="chosen by"):
        choose_layers(scores, 2, by="grad_norm")


def test_a_choice_with_a_layer_that_is_no_mlp_output_is_written_as_module_names():
    model = make_tiny("llama")
    names = parse_layers(model, ["model.layers.1.self_attn.o_proj", "model.layers.2.mlp.down_proj",
                                 "model.layers.3.mlp.down_proj"])  # fmt: skip
    layers = parse_layers(model, names)
    scores = [LayerScore(name=n, block=None if "attn" in n else int(n.split(".")[2]), score=v,
                         kept_score=v, kept_share=1.0, grad_norm=1.0)
              for n, v in zip(layers, (5.0, 1.0, 3.0), strict=True)]  # fmt: skip
    spec = choose_layers(scores, 2)
    assert spec == "model.layers.1.self_attn.o_proj,model.layers.3.mlp.down_proj"
    assert parse_layers(model, spec) == [layers[0], layers[2]]
    assert choose_layers(scores[1:], 2) == "2-3"


def test_rank_layers_names_each_blocks_index_and_refuses_a_layer_without_curvature(
    tiny_tokenizer,
):
    model = make_tiny("llama")
    layers = parse_layers(model, "2-3")
    curvature = curvature_for(model, tiny_tokenizer, layers)
    scores = rank_layers(model, tiny_tokenizer, FACTS, curvature)
    assert [s.block for s in scores] == [2, 3]
    assert parse_layers(model, choose_layers(scores, 2)) == layers
    with pytest.raises(ValueError, match="no factors"):
        rank_layers(model, tiny_tokenizer, FACTS, curvature, layers="1-3")


# ---------------------------------------------------------------------------------------------
# (5) devices and dtypes


def test_a_bf16_model_gets_fp32_gradients_and_scores_close_to_fp32(tiny_tokenizer):
    """The gradients of a bf16 model are cast to fp32 per batch and summed there; its scores
    (curvature of the bf16 model, factors fp32) agree with the fp32 model's to bf16's precision.
    A `.grad` the caller had stays as it was."""
    layers = parse_layers(make_tiny("llama"), "1-3")
    settings = DEFAULTS.override(batch_size=1)
    ref_model = make_tiny("llama")
    ref_curvature = curvature_for(ref_model, tiny_tokenizer, layers)
    ref = rank_layers(ref_model, tiny_tokenizer, FACTS, ref_curvature, settings=settings)
    model = make_tiny("llama").to(torch.bfloat16)
    kept_grad = torch.ones_like(model.model.layers[2].mlp.down_proj.weight)
    model.model.layers[2].mlp.down_proj.weight.grad = kept_grad
    grads = fact_gradients(model, tiny_tokenizer, FACTS, layers, settings)
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert model.model.layers[2].mlp.down_proj.weight.grad is kept_grad
    curvature = curvature_for(model, tiny_tokenizer, layers)
    assert all(c.A.dtype == torch.float32 for c in curvature.layers.values())
    ours = rank_layers(model, tiny_tokenizer, FACTS, curvature, settings=settings)
    for o, r in zip(ours, ref, strict=True):
        assert isinstance(o.score, float)
        assert o.score == pytest.approx(r.score, rel=5e-2)
        assert o.kept_share == pytest.approx(r.kept_share, abs=5e-2)


@pytest.mark.parametrize("where", ("cpu", "accelerator"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_on_the_accelerator_with_the_curvature_on_either_device(tiny_tokenizer, where, dtype):
    """The model on the logical accelerator (tests/devices.py: a mixed-device op raises there as
    on CUDA), the curvature on the host or collected there: the gradients stay on the model's
    device in fp32, the curvature's factors stay where they were, and the scores are the CPU
    run's."""
    layers = parse_layers(make_tiny("llama"), "1-3")
    cpu_model = make_tiny("llama").to(dtype)
    host_curvature = curvature_for(cpu_model, tiny_tokenizer, layers)
    expected = rank_layers(cpu_model, tiny_tokenizer, FACTS, host_curvature)
    with accelerator() as dev:
        model = make_tiny("llama").to(dev, dtype)
        curvature = (
            curvature_for(make_tiny("llama").to(dtype), tiny_tokenizer, layers)
            if where == "cpu"
            else curvature_for(model, tiny_tokenizer, layers)
        )
        grads = fact_gradients(model, tiny_tokenizer, FACTS, layers)
        assert all(on_accelerator(g) and g.dtype == torch.float32 for g in grads.values())
        ours = rank_layers(model, tiny_tokenizer, FACTS, curvature)
        for c in curvature.layers.values():
            assert on_accelerator(c.A) == on_accelerator(c.B) == (where == "accelerator")
    rtol = 1e-3 if dtype == torch.float32 else 5e-2
    for o, e in zip(ours, expected, strict=True):
        assert o.score == pytest.approx(e.score, rel=rtol)
        assert o.kept_score == pytest.approx(e.kept_score, rel=rtol)
        assert o.kept_share == pytest.approx(e.kept_share, abs=rtol)
