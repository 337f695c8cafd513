"""Consolidation (crispedit.consolidate): the closed form against the brute-force minimiser, its
limits, and a stream and a batch edit consolidated with their deltas exact."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_EDIT, make_tiny, tiny_stream_store
from conftest import tiny_stream_edit as edit
from devices import accelerator, on_accelerator

from contract.facts import Fact
from contract.settings import EditSettings
from crispedit.consolidate import consolidate, consolidate_edit, consolidated
from crispedit.curvature import plan_curvature, run_recipe
from crispedit.delta import add_to_weights
from crispedit.editor import make_editor
from crispedit.models import get_layers, parse_layers
from crispedit.sequential import StreamState, edit_set_factors, set_weights
from crispedit.streams import base_weights, read_cumulative, read_state

CHUNKS = [
    [Fact(prompt="The Eiffel Tower is located in", target="Rome")],
    [Fact(prompt="The capital of France is", target="Berlin"), Fact(prompt="Ice is", target="hot")],
]


def spd(d: int, generator: torch.Generator, rank: int | None = None) -> torch.Tensor:
    """A random symmetric positive (semi-)definite d × d matrix in float64, of `rank` (full)."""
    X = torch.randn(d, rank or 2 * d, generator=generator, dtype=torch.float64)
    return X @ X.T / X.shape[1]


def brute_force(D, K, A, B, weight):
    """The minimiser of tr(B(X−D)K(X−D)ᵀ) + λ·tr(BXAXᵀ) from its Kronecker normal equations:
    with column-major vec, tr(B X K Xᵀ) = vec(X)ᵀ (K ⊗ B) vec(X), so (K⊗B + λ A⊗B) vec X =
    (K⊗B) vec D."""
    d_out, d_in = D.shape
    H = torch.kron(K, B) + weight * torch.kron(A, B)
    x = torch.linalg.solve(H, torch.kron(K, B) @ D.T.reshape(-1))
    return x.reshape(d_in, d_out).T


def objective(X, D, K, A, B, weight):
    E = X - D
    return torch.trace(B @ E @ K @ E.T) + weight * torch.trace(B @ X @ A @ X.T)


def test_the_closed_form_is_the_minimiser_and_B_drops_out():
    g = torch.Generator().manual_seed(0)
    d_out, d_in, weight = 5, 6, 0.7
    D = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    K, A = spd(d_in, g), spd(d_in, g)
    ours = consolidated(D, K, A, weight)
    assert ours.dtype == torch.float64
    for B in (spd(d_out, g), torch.diag(torch.rand(d_out, generator=g, dtype=torch.float64) + 3)):
        torch.testing.assert_close(ours, brute_force(D, K, A, B, weight), rtol=1e-8, atol=1e-10)
        # a minimum: any step away from it costs more
        step = 1e-3 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        assert objective(ours + step, D, K, A, B, weight) > objective(ours, D, K, A, B, weight)


def test_no_weight_keeps_D_and_a_larger_one_shrinks_the_curved_directions_first():
    g = torch.Generator().manual_seed(1)
    d_out, d_in = 4, 6
    D = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    K, A = spd(d_in, g), spd(d_in, g)
    torch.testing.assert_close(consolidated(D, K, A, 1e-12), D, rtol=1e-6, atol=1e-8)
    # common eigenvectors: q0 where A is large and K small, q1 where K is large and A small
    Q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    a = torch.tensor([10.0, 0.01, 1, 1, 1, 1], dtype=torch.float64)
    k = torch.tensor([0.1, 10.0, 1, 1, 1, 1], dtype=torch.float64)
    A, K = Q @ torch.diag(a) @ Q.T, Q @ torch.diag(k) @ Q.T
    kept = {}
    for weight in (0.1, 1.0, 10.0):
        new = consolidated(D, K, A, weight)
        kept[weight] = [float((new @ Q[:, i]).norm() / (D @ Q[:, i]).norm()) for i in (0, 1)]
        assert kept[weight][0] < kept[weight][1]  # the curved direction gives way first
        # exactly the per-direction factor k / (k + λa) there
        assert kept[weight][0] == pytest.approx(0.1 / (0.1 + weight * 10.0), rel=1e-6)
    assert kept[10.0][0] < kept[1.0][0] < kept[0.1][0]  # more λ, more shrinking
    # a direction no edit input reaches is dropped, however small λ
    K = Q[:, 1:] @ Q[:, 1:].T  # K̄ without q0
    assert float((consolidated(D, K, A, 1e-6) @ Q[:, 0]).norm()) < 1e-6 * float(D.norm())


@pytest.fixture
def setup(tmp_path, tiny_tokenizer):
    store, model, layers, curvature = tiny_stream_store(tmp_path / "store", tiny_tokenizer)
    return store, model, tiny_tokenizer, layers, curvature


def test_off_the_stream_path_never_consolidates(setup, monkeypatch, tmp_path, tiny_tokenizer):
    def boom(*args, **kwargs):
        raise AssertionError("consolidate 0 must not consolidate")

    monkeypatch.setattr("crispedit.streams.consolidate_edit", boom)
    first, delta = edit(setup, CHUNKS[0], consolidate=0.0)
    assert "consolidation" not in first["metrics"] and first["options"]["consolidate"] == 0.0
    assert "consolidation" not in delta.report
    # the same edit on another store with the option left out: the same delta, bit for bit
    store, model, layers, curvature = tiny_stream_store(tmp_path / "other", tiny_tokenizer)
    _, again = edit((store, model, tiny_tokenizer, layers, curvature), CHUNKS[0])
    for key, d in delta.tensors.items():
        assert torch.equal(d, again.tensors[key]), key


def test_a_consolidated_stream_sums_to_the_models_weights(setup):
    store, model, _tok, layers, _curvature = setup
    weight = 0.5
    manifests, deltas = [], []
    for facts in CHUNKS:
        manifest, delta = edit(setup, facts, consolidate=weight)
        manifests.append(manifest)
        deltas.append(delta)
        # the store's cumulative delta on a fresh base: exactly the model's weights
        fresh = make_tiny("llama")
        add_to_weights(fresh, read_cumulative(store, manifest["id"]))
        for name, module in get_layers(fresh, layers).items():
            assert torch.equal(module.weight, get_layers(model, [name])[name].weight), name
    # and the versions' deltas, summed in chain order, are that cumulative delta
    summed = {k: deltas[0].tensors[k] + deltas[1].tensors[k] for k in deltas[0].tensors}
    head = read_cumulative(store, manifests[1]["id"])
    assert all(torch.equal(summed[k], head[k]) for k in head)
    # the manifest carries the figures, and the option round-trips through the settings
    figures = manifests[1]["metrics"]["consolidation"]
    assert figures["weight"] == weight
    assert (
        figures["efficacy"] == manifests[1]["metrics"]["efficacy"] == deltas[1].report["efficacy"]
    )
    assert 0 <= figures["efficacy_edit"] <= 1
    assert set(figures["relative_change"]) == set(layers)
    assert all(0 < r < 1 for r in figures["relative_change"].values())  # shrunk, not erased
    rise = figures["predicted_loss_increase"]
    assert rise["after"] < rise["before"]  # the solve pays capability curvature
    assert EditSettings.from_options(manifests[1]["options"]).consolidate == weight
    # the stored rows are the chunk's at the edited point: the state the solve used is the stream's
    state = read_state(store, manifests[1]["id"])
    assert state.tokens == manifests[1]["edit_tokens"]


def test_the_stream_solve_is_the_closed_form_on_the_stream_state(setup, monkeypatch):
    """The head's cumulative delta is D K̄ (K̄ + λA)⁻¹ of the change the edit left, D, with K̄ the
    mean input Gram over every edit token of the stream (both chunks' rows, as stored) and A the
    capability's factor, to fp32 rounding."""
    store, _model, _tok, layers, curvature = setup
    weight = 2.0
    edit(setup, CHUNKS[0], consolidate=weight)
    seen = {}
    real = consolidate

    def spy(model, cumulative, state, capability, weight):
        seen["D"] = {k: v.clone() for k, v in cumulative.items()}
        return real(model, cumulative, state, capability, weight)

    monkeypatch.setattr("crispedit.consolidate.consolidate", spy)
    second, _ = edit(setup, CHUNKS[1], consolidate=weight)
    state = read_state(store, second["id"])
    head = read_cumulative(store, second["id"])
    for name in layers:
        key = f"{name}.weight"
        K = state.S_A[name] / state.tokens
        expected = consolidated(seen["D"][key].double(), K, curvature.layers[name].A, weight)
        torch.testing.assert_close(head[key].double(), expected, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(head[key], seen["D"][key])  # it did move


def curved(tokenizer):
    """A tiny Llama, its layers 2-3 and their K-FAC curvature from a little WikiText."""
    model = make_tiny("llama")
    layers = parse_layers(model, "2-3")
    recipe = plan_curvature(model, tokenizer, "wikitext", 400, layers, seq_len=64)
    return model, layers, run_recipe(model, tokenizer, recipe, progress=False)


def test_a_batch_edit_is_consolidated_from_its_own_rows(tiny_tokenizer):
    model, layers, curvature = curved(tiny_tokenizer)
    base = base_weights(model, layers)
    facts = CHUNKS[1]
    delta = make_editor(model, tiny_tokenizer, curvature, layers=layers, **TINY_EDIT).edit(facts)
    rows = edit_set_factors(model, tiny_tokenizer, layers, facts)
    out, cumulative = consolidate_edit(model, tiny_tokenizer, curvature, base, delta, facts, 1.0)
    expected, _ = consolidate(model, delta.tensors, StreamState.empty().plus(rows), curvature, 1.0)
    for key in delta.tensors:
        assert torch.equal(out.tensors[key], expected[key])  # an empty parent: D′ itself
        assert torch.equal(cumulative[key], expected[key])
    fresh = make_tiny("llama")
    add_to_weights(fresh, out.tensors)  # `apply` of the consolidated delta: the model's weights
    for name, module in get_layers(fresh, layers).items():
        assert torch.equal(module.weight, get_layers(model, [name])[name].weight)
    assert out.meta["consolidate"] == 1.0 and out.report["consolidation"]["weight"] == 1.0
    assert out.report["consolidation"]["efficacy_edit"] == delta.report["efficacy"]


def test_without_a_curvature_it_says_what_it_needs(tiny_tokenizer, setup):
    store, *_ = setup
    with pytest.raises(ValueError, match="capability curvature"):
        edit(setup, CHUNKS[0], consolidate=1.0, method="ft", capability=None)
    assert store.head("tiny", "main") is None  # nothing published
    model = make_tiny("llama")
    layers = parse_layers(model, "2-3")
    base = base_weights(model, layers)
    delta = make_editor(model, tiny_tokenizer, None, method="ft", layers=layers, **TINY_EDIT).edit(
        CHUNKS[0]
    )
    with pytest.raises(ValueError, match="capability curvature"):
        consolidate_edit(model, tiny_tokenizer, None, base, delta, CHUNKS[0], 1.0)


def test_a_bf16_model_solves_in_float64_and_its_delta_is_fp32(tiny_tokenizer, monkeypatch):
    model, layers, curvature = curved(tiny_tokenizer)
    model = model.to(torch.bfloat16)
    base = base_weights(model, layers)
    delta = make_editor(model, tiny_tokenizer, curvature, layers=layers, **TINY_EDIT).edit(
        CHUNKS[1]
    )
    solved = []
    real = consolidated

    def spy(D, K, A, weight):
        out = real(D, K, A, weight)
        solved.append((D.dtype, K.dtype, A.dtype, out.dtype))
        return out

    monkeypatch.setattr("crispedit.consolidate.consolidated", spy)
    out, cumulative = consolidate_edit(
        model, tiny_tokenizer, curvature, base, delta, CHUNKS[1], 1.0
    )
    assert solved and all(set(dtypes) == {torch.float64} for dtypes in solved)
    assert all(t.dtype == torch.float32 for t in out.tensors.values())
    assert all(m.weight.dtype == torch.bfloat16 for m in get_layers(model, layers).values())
    # the weights are base + delta as `apply` adds it (fp32 add, cast to bf16)
    fresh = make_tiny("llama").to(torch.bfloat16)
    set_weights(fresh, base, cumulative)
    for name, module in get_layers(fresh, layers).items():
        assert torch.equal(module.weight, get_layers(model, [name])[name].weight)


def test_on_an_accelerator_it_solves_there_and_returns_to_the_host(tiny_tokenizer):
    model, layers, curvature = curved(tiny_tokenizer)
    D = {
        f"{n}.weight": 1e-2 * torch.randn_like(m.weight)
        for n, m in get_layers(model, layers).items()
    }
    rows = edit_set_factors(model, tiny_tokenizer, layers, CHUNKS[1])
    state = StreamState.empty().plus(rows)
    expected, _ = consolidate(model, D, state, curvature, 1.0)
    with accelerator() as dev:
        ours, _ = consolidate(model.to(dev), D, state, curvature, 1.0)
    for key, d in ours.items():
        assert not on_accelerator(d) and d.dtype == torch.float32
        torch.testing.assert_close(d, expected[key])
