"""Sequential editing through the store: versions, exact cumulative deltas, stream state."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from contract.facts import Fact
from crispedit.curvature import LayerCurvature, plan_curvature
from crispedit.delta import add_to_weights
from crispedit.models import get_layers, model_fingerprint, parse_layers
from crispedit.projector import build_projector
from crispedit.sequential import StreamState, stream_curvature
from crispedit.streams import (
    STATE_FILE,
    base_weights,
    cached_curvature,
    edit_on_stream,
    materialize,
    read_state,
)
from curvature_store import Conflict, Store, StoreError

BATCHES = [
    [Fact(prompt="The Eiffel Tower is located in", target="Rome")],
    [Fact(prompt="The capital of France is", target="Berlin"), Fact(prompt="Ice is", target="hot")],
    [Fact(prompt="Robert Boulter is an English", target="chef")],
]
FAST = {"lr": 3e-2, "epochs": 8, "progress": False}


@pytest.fixture
def setup(tmp_path, tiny_tokenizer):
    model = make_tiny("llama")
    layers = parse_layers(model, "2-3")
    store = Store(tmp_path / "store")
    recipe = plan_curvature(model, tiny_tokenizer, "wikitext", 400, layers, seq_len=64)
    curvature, _ = cached_curvature(store, model, tiny_tokenizer, recipe, progress=False)
    return store, model, tiny_tokenizer, layers, curvature


def edit(setup, facts, **kwargs):
    store, model, tok, layers, curvature = setup
    base = kwargs.pop("base", None) or base_weights(make_tiny("llama"), layers)
    curvature = kwargs.pop("capability", curvature)
    return edit_on_stream(
        store, "tiny", "main", model, tok, base, curvature, facts, **FAST, **kwargs
    )


def test_curvature_cache_hit_skips_collection(setup, monkeypatch):
    store, model, tok, layers, curvature = setup
    recipe = plan_curvature(model, tok, "wikitext", 400, layers, seq_len=64)

    def no_collection(*args, **kwargs):
        raise AssertionError("a cache hit must not collect")

    monkeypatch.setattr("crispedit.streams.run_recipe", no_collection)
    again, manifest = cached_curvature(store, model, tok, recipe)
    assert manifest["cache_hit"] is True
    for name in layers:
        assert torch.equal(again.layers[name].A, curvature.layers[name].A)
    other = plan_curvature(model, tok, "wikitext", 300, layers, seq_len=64)
    with pytest.raises(AssertionError, match="must not collect"):
        cached_curvature(store, model, tok, other)  # another token budget is another key


def test_versions_chain_and_cumulative_delta_is_bitwise_exact(setup):
    store, model, _tok, layers, _ = setup
    manifests = []
    for facts in BATCHES:
        manifest, _delta = edit(setup, facts)
        manifests.append(manifest)
        # the store's cumulative delta on a fresh base gives exactly the editor's weights
        fresh = make_tiny("llama")
        add_to_weights(
            fresh,
            {k: torch.from_numpy(v) for k, v in store.cumulative_delta(manifest["id"]).items()},
        )
        for name, module in get_layers(fresh, layers).items():
            assert torch.equal(module.weight, get_layers(model, [name])[name].weight), name
        assert manifest["weights_fingerprint"] == model_fingerprint(model, layers)
    assert [m["number"] for m in manifests] == [1, 2, 3]
    assert [m["parent"] for m in manifests] == [None, manifests[0]["id"], manifests[1]["id"]]
    assert store.head("tiny", "main") == manifests[-1]["id"]
    assert (manifests[1]["facts"][1]["prompt"], manifests[1]["facts"][1]["target"]) == (
        "Ice is",
        "hot",
    )
    assert manifests[0]["base_fingerprint"] == manifests[2]["base_fingerprint"]
    assert manifests[2]["metrics"]["n_edits"] == 1 and manifests[2]["method"] == "crispedit"
    # materialize a middle version onto another fresh base
    fresh = make_tiny("llama")
    materialize(store, manifests[1]["id"], fresh)
    expected = {
        k: torch.from_numpy(v) for k, v in store.cumulative_delta(manifests[1]["id"]).items()
    }
    base = make_tiny("llama")
    add_to_weights(base, expected)
    for name in layers:
        assert torch.equal(
            get_layers(fresh, [name])[name].weight, get_layers(base, [name])[name].weight
        )


def test_state_accumulates_and_protects_earlier_edits(setup):
    store, _model, _tok, layers, curvature = setup
    first, _ = edit(setup, BATCHES[0])
    second, _ = edit(setup, BATCHES[1])
    s1, s2 = read_state(store, first["id"]), read_state(store, second["id"])
    assert 0 < s1.tokens == first["edit_tokens"] < s2.tokens == second["edit_tokens"]
    for name in layers:
        assert torch.all(
            torch.linalg.eigvalsh(s2.S_A[name] - s1.S_A[name]) > -1e-6
        )  # sums only grow
    protected = stream_curvature(curvature, s2, beta=1.0)
    name = layers[-1]
    kept = build_projector(curvature.layers[name], "kfac", 0.8).kept_fraction
    kept_stream = build_projector(protected.layers[name], "kfac", 0.8).kept_fraction
    assert kept_stream != kept
    # the stream's eigenbases are those of A_cap + β·S_A/n (B likewise) as written, in float64
    for name in layers:
        c = curvature.layers[name]
        A = c.A.double() + 1.0 * s2.S_A[name] / s2.tokens
        B = c.B.double() + 1.0 * s2.S_B[name] / s2.tokens
        P = build_projector(protected.layers[name], "kfac", 0.8)
        Q = build_projector(LayerCurvature(A=A, B=B), "kfac", 0.8)
        assert torch.equal(P.U_A, Q.U_A) and torch.equal(P.U_B, Q.U_B)
        assert torch.equal(P.k, Q.k)
    # β = 0 ignores the stream state
    assert stream_curvature(curvature, s2, beta=0.0) is curvature
    assert StreamState.from_tensors(s2.to_tensors()).tokens == s2.tokens


def test_wrong_parent_is_a_conflict_and_publishes_nothing(setup):
    store = setup[0]
    first, _ = edit(setup, BATCHES[0])
    with pytest.raises(Conflict, match="base"):
        edit(setup, BATCHES[1], parent=None)
    assert store.head("tiny", "main") == first["id"]
    assert [v["id"] for v in store.versions("tiny", "main")] == [first["id"]]
    second, _ = edit(setup, BATCHES[1], parent=first["id"])
    assert second["parent"] == first["id"]


def test_rollback_then_edit_continues_from_the_older_head(setup):
    store, model, _, layers, _ = setup
    first, _ = edit(setup, BATCHES[0])
    edit(setup, BATCHES[1])
    store.rollback("tiny", "main", first["id"])
    third, _ = edit(setup, BATCHES[2])
    assert third["parent"] == first["id"] and third["number"] == 2
    cumulative = store.cumulative_delta(third["id"])
    fresh = make_tiny("llama")
    add_to_weights(fresh, {k: torch.from_numpy(v) for k, v in cumulative.items()})
    for name in layers:
        assert torch.equal(
            get_layers(fresh, [name])[name].weight, get_layers(model, [name])[name].weight
        )


def test_a_stream_refuses_another_model(setup):
    store, _, _, layers, _ = setup
    edit(setup, BATCHES[0])
    other = base_weights(make_tiny("llama", seed=1), layers)
    with pytest.raises(StoreError, match="started on model"):
        edit(setup, BATCHES[1], base=other)
    with pytest.raises(StoreError, match="belongs to model"):
        materialize(store, store.head("tiny", "main"), make_tiny("llama", seed=1))
    assert len(store.versions("tiny", "main")) == 1


def test_ft_on_a_stream_needs_no_curvature(setup):
    store, model, tok, layers, _ = setup
    base = base_weights(make_tiny("llama"), layers)
    manifest, _delta = edit_on_stream(
        store, "tiny", "ft", model, tok, base, None, BATCHES[0], method="ft", **FAST
    )
    assert manifest["gamma"] is None and manifest["stream"] == "ft"
    assert store.version_file(manifest["id"], STATE_FILE).is_file()


def test_ekfac_on_a_stream_moves_to_the_streams_eigenbases(setup):
    store, model, tok, layers, _ = setup
    recipe = plan_curvature(model, tok, "wikitext", 400, layers, kind="ekfac", seq_len=64)
    curvature, _ = cached_curvature(store, model, tok, recipe, progress=False)
    first, _ = edit(setup, BATCHES[0], capability=curvature, method="ekfac", gamma=0.8)
    second, _ = edit(setup, BATCHES[1], capability=curvature, method="ekfac", gamma=0.8)
    assert (first["method"], second["method"]) == ("ekfac", "ekfac")

    state = read_state(store, second["id"])
    protected = stream_curvature(curvature, state, beta=0.5)
    assert protected.kind == "ekfac"
    for name in layers:
        c, p = curvature.layers[name], protected.layers[name]
        A_cap, B_cap = c.A.double(), c.B.double()
        A = A_cap + 0.5 * state.S_A[name] / state.tokens
        B = B_cap + 0.5 * state.S_B[name] / state.tokens
        # the new bases diagonalise the stream's factors
        for U, M in ((p.U_A.double(), A), (p.U_B.double(), B)):
            torch.testing.assert_close(U.T @ U, torch.eye(len(U), dtype=U.dtype), atol=1e-5, rtol=0)
            inner = U.T @ M @ U
            off = inner - torch.diag(torch.diagonal(inner))
            assert off.abs().max() <= 1e-5 * M.abs().max()
        # the eigenvalues: the diagonal there of the capability's EK-FAC matrix plus the increase
        # the K-FAC rule gives (cross terms B_cap ⊗ S_A and S_B ⊗ A_cap included)
        old = torch.kron(c.U_B.double(), c.U_A.double())
        new = torch.kron(p.U_B.double(), p.U_A.double())
        capability = old @ torch.diag(c.ekfac.double().flatten()) @ old.T
        increase = torch.kron(B, A) - torch.kron(B_cap, A_cap)
        expected = torch.diagonal(new.T @ (capability + increase) @ new).view_as(c.ekfac)
        scale = expected.abs().max()
        torch.testing.assert_close(p.ekfac.double(), expected, rtol=1e-4, atol=1e-6 * scale)
        assert p.ekfac.sum() > c.ekfac.sum()  # the edits' curvature is added, none taken away
