"""The engine across devices: the model on an accelerator, curvature and the store on the CPU.

Each test runs under `devices.accelerator()`, where an op that mixes the (logical) accelerator with
the CPU raises as it does on CUDA, and compares its result with the same computation on the CPU.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import make_tiny
from devices import accelerator, memory_allocated, on_accelerator

from contract.facts import Fact
from crispedit import projector
from crispedit.corpus import pad_batches, read_documents, token_sequences
from crispedit.curvature import Curvature, LayerCurvature, collect_curvature, plan_curvature
from crispedit.editor import CrispEditor
from crispedit.models import parse_layers
from crispedit.projector import build_projector, energy_threshold, kfac_threshold
from crispedit.sequential import BETA, StreamState, stream_curvature
from crispedit.streams import (
    StreamCurvatureCache,
    base_weights,
    cached_curvature,
    edit_on_stream,
    read_state,
)
from curvature_store import Store

FACTS = [
    [Fact(prompt="The Eiffel Tower is located in", target="Rome")],
    [Fact(prompt="The capital of France is", target="Berlin"), Fact(prompt="Ice is", target="hot")],
]
FAST = {"lr": 3e-2, "epochs": 4, "progress": False}


@pytest.fixture
def dev():
    with accelerator() as device:
        yield device


def assert_close_on_cpu(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    """`ours` (on any device) against `ref`, relative to `ref`'s largest entry."""
    scale = ref.abs().max().item()
    torch.testing.assert_close(
        ours.cpu().double(), ref.cpu().double(), rtol=rtol, atol=rtol * scale
    )


def test_the_logical_accelerator_fails_where_cuda_does(dev):
    x = torch.arange(6.0).view(2, 3)
    y = x.to(dev)
    assert y.device == dev and on_accelerator(y) and not on_accelerator(y.cpu())
    for mixed in (lambda: y + x, lambda: x @ y.T, lambda: torch.zeros(3).add_(y[0])):
        with pytest.raises(RuntimeError, match="same device"):
            mixed()
    # what CUDA accepts: CPU scalars, CPU indices, copies either way, factories on the device
    assert torch.equal((y * torch.tensor(2.0)).cpu(), x * 2)
    assert torch.equal(y[torch.tensor([1])].cpu(), x[1:])
    z = torch.zeros(2, 3, device=dev).copy_(x)
    assert on_accelerator(z) and torch.equal(z.cpu(), x)
    # real values, through autograd too: d/dw Σ (w yᵀ) = 1 y, each row the column sums of x
    w = torch.randn(3, 3, requires_grad=True)
    (w.to(dev) @ y.T).sum().backward()
    assert not on_accelerator(w.grad) and torch.equal(w.grad, x.sum(0).expand(3, 3))


def tiny_batches(tokenizer) -> list[dict]:
    docs = read_documents("wikitext")[:40]
    return list(pad_batches(token_sequences(tokenizer, docs, 300, 48), tokenizer.pad_token_id, 3))


# bf16 activations differ by the attention kernel the device picks: agreement to bf16's precision
@pytest.mark.parametrize(
    ("dtype", "rtol"), ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)), ids=("fp32", "bf16")
)
def test_ekfac_collection_with_the_model_on_the_accelerator(tiny_tokenizer, dev, dtype, rtol):
    batches = tiny_batches(tiny_tokenizer)
    layers = parse_layers(make_tiny("llama"), "2-3")
    model = make_tiny("llama").to(dtype)
    ref = collect_curvature(model, layers, batches, kind="ekfac", progress=False)
    there = make_tiny("llama").to(dev, dtype)
    ours = collect_curvature(there, layers, batches, kind="ekfac", progress=False)
    assert ours.tokens == ref.tokens
    for name in layers:
        c, r = ours.layers[name], ref.layers[name]
        assert all(on_accelerator(t) for t in (c.A, c.B, c.U_A, c.U_B, c.ekfac))
        for key in ("A", "B", "ekfac"):  # (the bases only up to each eigenvector's sign)
            assert_close_on_cpu(getattr(c, key), getattr(r, key), rtol)


def layer_curvature(d_in: int = 40, d_out: int = 24, seed: int = 0) -> LayerCurvature:
    """A random SPD K-FAC pair with EK-FAC eigenvalues in random bases, on the CPU."""
    g = torch.Generator().manual_seed(seed)

    def spd(d: int) -> torch.Tensor:
        X = torch.randn(3 * d, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d)
        return (X.T @ X / len(X)).float()

    def orthogonal(d: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(d, d, generator=g))[0]

    c = LayerCurvature(A=spd(d_in), B=spd(d_out))
    c.U_A, c.U_B = orthogonal(d_in), orthogonal(d_out)
    c.ekfac = torch.rand(d_out, d_in, generator=g) ** 3
    return c


def moved(c: LayerCurvature, device) -> LayerCurvature:
    return LayerCurvature(
        A=c.A.to(device), B=c.B.to(device), U_A=c.U_A.to(device), U_B=c.U_B.to(device),
        ekfac=c.ekfac.to(device),
    )  # fmt: skip


@pytest.mark.parametrize("gamma", (0.5, 0.9, 0.99))
def test_thresholds_with_eigenvalues_on_the_accelerator(gamma, dev, monkeypatch):
    monkeypatch.setattr(projector, "CHUNK_ELEMENTS", 300)  # chunks of 15 rows: two per radix pass
    lam = torch.rand(30, 20, generator=torch.Generator().manual_seed(1)) ** 3
    there = lam.to(dev)
    expected = energy_threshold(lambda i, j: lam[i:j], len(lam), gamma)
    assert energy_threshold(lambda i, j: there[i:j], len(lam), gamma) == expected
    s_A, s_B = lam[0].sort().values, lam[1].sort().values
    tau, k = kfac_threshold(s_A, s_B, gamma, clip=0.1)
    tau_there, k_there = kfac_threshold(s_A.to(dev), s_B.to(dev), gamma, clip=0.1)
    assert tau_there == tau and torch.equal(k_there.cpu(), k)
    # the projectors whose thresholds these are, from a curvature living on the accelerator
    c = layer_curvature()
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(2))
    for method in ("nullspace", "kfac", "ekfac"):
        P = build_projector(c, method, gamma)
        Q = build_projector(moved(c, dev), method, gamma, device=dev)
        assert on_accelerator(Q.M) and on_accelerator(Q.U_A)
        assert torch.equal(Q.M.cpu(), P.M), method
        assert_close_on_cpu(Q(G.to(dev)), P(G))


def count_eigh(monkeypatch) -> list[bool]:
    """Spy on `torch.linalg.eigh`: one entry per call, whether it ran on the accelerator."""
    calls, eigh = [], torch.linalg.eigh

    def spy(M, *args, **kwargs):
        calls.append(on_accelerator(M))
        return eigh(M, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    return calls


@pytest.mark.parametrize("method", ("nullspace", "kfac", "ekfac"))
def test_projector_from_curvature_on_the_cpu_for_a_model_on_the_accelerator(
    method, dev, monkeypatch
):
    c = layer_curvature()
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(2))
    P = build_projector(moved(c, "cpu"), method, 0.9)  # the same tensors, its own eigenbases
    calls = count_eigh(monkeypatch)
    Q = build_projector(c, method, 0.9, device=dev)
    assert on_accelerator(Q.M) and on_accelerator(Q.U_A) and torch.equal(Q.M.cpu(), P.M)
    assert_close_on_cpu(Q(G.to(dev)), P(G))
    # the factors' eigh ran on the model's device (EK-FAC's bases come with the curvature)
    assert calls == ([] if method == "ekfac" else [True] * (1 if method == "nullspace" else 2))
    build_projector(c, method, 0.8, device=dev)
    assert len(calls) == (0 if method == "ekfac" else 1 if method == "nullspace" else 2)


def test_an_edit_with_the_model_on_the_accelerator_and_curvature_on_the_cpu(tiny_tokenizer, dev):
    layers = parse_layers(make_tiny("llama"), "2-3")
    curvature = collect_curvature(
        make_tiny("llama"), layers, tiny_batches(tiny_tokenizer), progress=False
    )
    ref = CrispEditor(make_tiny("llama"), tiny_tokenizer, curvature, seed=0, **FAST)
    ours = CrispEditor(make_tiny("llama").to(dev), tiny_tokenizer, curvature, seed=0, **FAST)
    expected, delta = ref.edit(FACTS[1]), ours.edit(FACTS[1])
    for key, d in delta.tensors.items():
        assert not on_accelerator(d)  # a delta is a CPU artifact
        assert_close_on_cpu(d, expected.tensors[key], rtol=1e-3)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model) -> int:
    return nbytes(model.parameters()) + nbytes(model.buffers())


def allocated() -> int:
    """Bytes on the accelerator once the tensors no longer referenced are freed."""
    gc.collect()
    return memory_allocated()


def test_projectors_hold_the_only_curvature_on_the_accelerator(tiny_tokenizer, dev):
    """A curvature built on the model's device leaves it once the editor's projectors hold their
    copies there: the accelerator then holds the model and the projectors, and after the
    editor, the model alone. A second projector from the host's eigenbases is bitwise the same."""
    start = allocated()
    model = make_tiny("llama").to(dev)
    layers = parse_layers(model, "2-3")
    curvature = collect_curvature(model, layers, tiny_batches(tiny_tokenizer), progress=False)
    assert all(on_accelerator(c.A) and on_accelerator(c.B) for c in curvature.layers.values())
    editor = CrispEditor(model, tiny_tokenizer, curvature, method="kfac", progress=False)
    for c in curvature.layers.values():
        held = [c.A, c.B, *c.eigen("A", "cpu"), *c.eigen("B", "cpu")]
        assert not any(on_accelerator(t) for t in held)
    projectors = editor.projectors.values()
    assert all(P.k is not None and P._mask is None for P in projectors)  # a staircase's counts
    projector_bytes = nbytes(t for P in projectors for t in (P.U_A, P.U_B, P.k))
    assert allocated() - start == model_bytes(model) + projector_bytes
    for name, P in editor.projectors.items():
        again = build_projector(curvature.layers[name], "kfac", editor.settings.gamma, device=dev)
        assert torch.equal(again.U_A.cpu(), P.U_A.cpu()) and torch.equal(again.k.cpu(), P.k.cpu())
    del editor, projectors, P, again
    assert allocated() - start == model_bytes(model)


def stream_setup(tmp_path, tokenizer, device, kind: str, built_on_device: bool):
    """A store whose capability curvature was built on the model's device (a worker's first
    build) or read back from the store (on the CPU), and the model on `device`."""
    model = make_tiny("llama").to(device)
    layers = parse_layers(model, "2-3")
    store = Store(tmp_path / "store")
    recipe = plan_curvature(model, tokenizer, "wikitext", 400, layers, kind=kind, seq_len=64)
    builder = model if built_on_device else make_tiny("llama")
    capability, _ = cached_curvature(store, builder, tokenizer, recipe, progress=False)
    if not built_on_device:
        capability, manifest = cached_curvature(store, model, tokenizer, recipe, progress=False)
        assert manifest["cache_hit"] and not on_accelerator(capability.layers[layers[0]].A)
    return store, model, layers, capability


def run_stream(store, model, tokenizer, layers, capability, method, batches=FACTS, cache=None):
    """Versions on one stream, one per batch of facts: their manifests and deltas."""
    base = base_weights(make_tiny("llama"), layers)
    options = {"method": method, "gamma": 0.8, "cache": cache, **FAST}
    versions = []
    for facts in batches:
        versions.append(
            edit_on_stream(
                store, "tiny", "main", model, tokenizer, base, capability, facts, **options
            )
        )
    return versions


@pytest.mark.parametrize("built_on_device", (True, False), ids=("built", "stored"))
@pytest.mark.parametrize("method", ("kfac", "ekfac"))
def test_a_streams_second_version_with_the_model_on_the_accelerator(
    tmp_path, tiny_tokenizer, dev, method, built_on_device
):
    ref_setup = stream_setup(tmp_path / "cpu", tiny_tokenizer, "cpu", method, built_on_device)
    expected = run_stream(*ref_setup[:2], tiny_tokenizer, *ref_setup[2:], method)
    store, model, layers, capability = stream_setup(
        tmp_path / "dev", tiny_tokenizer, dev, method, built_on_device
    )
    versions = run_stream(store, model, tiny_tokenizer, layers, capability, method)
    assert [m["number"] for m, _ in versions] == [1, 2]
    for (manifest, delta), (ref_manifest, ref_delta) in zip(versions, expected, strict=True):
        assert manifest["edit_tokens"] == ref_manifest["edit_tokens"]
        for key, d in delta.tensors.items():
            assert_close_on_cpu(d, ref_delta.tensors[key], rtol=1e-3)
        state, ref_state = (
            read_state(store, manifest["id"]),
            read_state(*ref_setup[:1], ref_manifest["id"]),
        )
        for name in layers:
            assert_close_on_cpu(state.S_A[name], ref_state.S_A[name])
            assert_close_on_cpu(state.S_B[name], ref_state.S_B[name])


@pytest.mark.parametrize("method", ("kfac", "ekfac"))
def test_a_second_job_from_the_same_head_reuses_its_eigenbases(
    tmp_path, tiny_tokenizer, dev, method, monkeypatch
):
    start = allocated()
    store, model, layers, capability = stream_setup(tmp_path, tiny_tokenizer, dev, method, True)
    cache = StreamCurvatureCache()
    (first, _), (second, delta) = run_stream(
        store, model, tiny_tokenizer, layers, capability, method, cache=cache
    )
    # between jobs the accelerator holds the model alone: the capability curvature (built
    # there), the cached stream curvature and the projectors' copies are gone from it
    assert allocated() == start + model_bytes(model)
    state = read_state(store, first["id"])
    calls = count_eigh(monkeypatch)
    entry = cache.stream_curvature(first["id"], capability, state, BETA, dev)
    for c in entry.layers.values():  # what a projector needs, on the host; no A, B
        assert c.A is None and c.B is None
        held = [*c.eigen("A", "cpu"), *c.eigen("B", "cpu"), c.U_A, c.U_B, c.ekfac]
        assert not any(on_accelerator(t) for t in held if t is not None)
    store.rollback("tiny", "main", first["id"])  # the second job's head is the head again
    [(again, delta_again)] = run_stream(
        store, model, tiny_tokenizer, layers, capability, method, FACTS[1:], cache
    )
    assert calls == [] and again["parent"] == second["parent"] == first["id"]
    assert all(torch.equal(d, delta.tensors[key]) for key, d in delta_again.tensors.items())
    # without the cache the same job decomposes every factor again, on the model's device
    store.rollback("tiny", "main", first["id"])
    [(_, uncached)] = run_stream(
        store, model, tiny_tokenizer, layers, capability, method, FACTS[1:]
    )
    assert calls == [True] * 2 * len(layers)
    assert all(torch.equal(d, delta.tensors[key]) for key, d in uncached.tensors.items())


def test_the_stream_curvature_cache_keeps_the_most_recent_heads(monkeypatch):
    c = layer_curvature()
    capability = Curvature(layers={"layer": c}, tokens=100)
    state = StreamState(S_A={"layer": 3 * c.A.double()}, S_B={"layer": c.B.double()}, tokens=7)
    cache = StreamCurvatureCache(size=2)
    calls = count_eigh(monkeypatch)

    def decompositions(head, beta=1.0, cap=capability):
        before = len(calls)
        cache.stream_curvature(head, cap, state, beta, "cpu")
        return len(calls) - before

    assert decompositions("v1") == 2 and decompositions("v1") == 0  # EK-FAC: eigh of A and B
    first = cache.stream_curvature("v1", capability, state, 1.0, "cpu")
    expected = stream_curvature(capability, state, 1.0, "cpu").layers["layer"]
    assert torch.equal(first.layers["layer"].ekfac, expected.ekfac)
    assert decompositions("v1", beta=0.5) == 2  # another β, another curvature
    assert decompositions("v2") == 2 and decompositions("v1") == 2  # v1 was the oldest of 3
    other = Curvature(layers={"layer": moved(c, "cpu")}, tokens=100)
    assert decompositions("v1", cap=other) == 2  # another capability, another curvature
    with pytest.raises(ValueError, match="at least 1"):
        StreamCurvatureCache(size=0)
