"""MEMIT and AlphaEdit across devices and dtypes: the model on an accelerator with its curvature on
the CPU (and the reverse), a bf16 model, a stream's earlier keys on the accelerator, and the
accelerator memory of AlphaEdit's solve.

The accelerator is tests/devices.py's: an op mixing it with the CPU raises as on CUDA, and values
are computed for real, so each result is compared with the same edit run all on the CPU.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import make_tiny
from devices import (
    accelerator,
    max_memory_allocated,
    memory_allocated,
    on_accelerator,
    reset_peak_memory_stats,
)
from test_device import assert_close_on_cpu, stream_setup, tiny_batches
from test_memit import LAST_TOKEN_FACTS

from contract.settings import EditSettings
from crispedit import alphaedit
from crispedit.alphaedit import AlphaEditor
from crispedit.curvature import Curvature, LayerCurvature, collect_curvature
from crispedit.editor import make_editor
from crispedit.models import get_layers, parse_layers
from crispedit.streams import base_weights, edit_on_stream, materialize, read_state

QUIET = {"progress": False}
# few value steps and one context prefix: the device handling, not the edit's quality, is tested
# AlphaEdit's update on the preserved keys' directions, relative to its norm: the float64 solve
# leaves ~3e-8 (the fp32 eigenbasis and delta), a float32 one ~1e-7, one rounded to bf16 ~3e-3
TOLERANCE = 1e-6
QUICK = {"value_steps": 6, "value_contexts": 1, "covariance_weight": 1.0, "alphaedit_l2": 1e-2}


@pytest.fixture
def dev():
    with accelerator() as device:
        yield device


def curvature_of(arch: str, tokenizer, layers: list[str], model=None) -> Curvature:
    """Curvature of `layers` from the fp32 tiny model of `arch` (or from `model`), on the CPU."""
    source = make_tiny(arch) if model is None else model
    return collect_curvature(source, layers, tiny_batches(tokenizer), progress=False)


def placed(curvature: Curvature, device) -> Curvature:
    """A copy of `curvature`'s K-FAC factors on `device`, with no eigenbasis computed yet."""
    layers = {
        n: LayerCurvature(A=c.A.clone().to(device), B=c.B.clone().to(device))
        for n, c in curvature.layers.items()
    }
    return Curvature(layers=layers, tokens=curvature.tokens)


def median_threshold(curvature: Curvature) -> float:
    """A null threshold that leaves every layer a real null space (half of A's eigenvalues or so)
    and a real preserved space: the tiny models' A is full rank."""
    return min(float(c.eigen("A", "cpu")[0].median()) for c in curvature.layers.values())


def spy_solves(monkeypatch) -> list[tuple[torch.dtype, bool]]:
    """Spy on `torch.linalg.solve`: one entry per call, its matrix's dtype and whether it ran on
    the accelerator."""
    calls, solve = [], torch.linalg.solve

    def spy(A, B, *args, **kwargs):
        calls.append((A.dtype, on_accelerator(A)))
        return solve(A, B, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve", spy)
    return calls


def settings_for(method: str, curvature: Curvature) -> EditSettings:
    return EditSettings(method=method, null_threshold=median_threshold(curvature), **QUICK)


@pytest.mark.parametrize(
    ("arch", "method", "model_on", "curvature_on"),
    (
        ("llama", "memit", "dev", "cpu"),
        ("llama", "alphaedit", "dev", "cpu"),
        ("llama", "alphaedit", "cpu", "dev"),
        ("gpt2", "memit", "dev", "cpu"),
        ("gpt2", "alphaedit", "dev", "dev"),
    ),
)
def test_an_edit_across_devices_is_the_cpu_edit(
    arch, method, model_on, curvature_on, tiny_tokenizer, dev, monkeypatch
):
    """GPT-2's Conv1D stores its weight transposed: the delta must come back in its layout."""
    where = {"dev": dev, "cpu": "cpu"}
    layers = parse_layers(make_tiny(arch), "2-3")
    curvature = curvature_of(arch, tiny_tokenizer, layers)
    settings = settings_for(method, curvature)
    ref_editor = make_editor(make_tiny(arch), tiny_tokenizer, curvature, settings, layers=layers,
                             **QUIET)  # fmt: skip
    expected = ref_editor.edit(LAST_TOKEN_FACTS)
    model = make_tiny(arch).to(where[model_on])
    there = placed(curvature, where[curvature_on])
    calls = spy_solves(monkeypatch)
    delta = make_editor(model, tiny_tokenizer, there, settings, layers=layers, **QUIET).edit(
        LAST_TOKEN_FACTS
    )
    # one solve per layer, in float64 on the model's device, wherever the curvature is
    assert calls == [(torch.float64, model_on == "dev")] * len(layers)
    assert delta.report["efficacy"] == expected.report["efficacy"]
    if method == "alphaedit":
        assert delta.report["kept_fraction"] == expected.report["kept_fraction"]
    for name, module in get_layers(model, layers).items():
        key = f"{name}.weight"
        d = delta.tensors[key]
        assert not on_accelerator(d) and d.dtype == torch.float32  # a delta is a CPU artifact
        assert d.shape == module.weight.shape  # GPT-2's (d_in, d_out), Llama's (d_out, d_in)
        assert float(d.norm()) > 0
        assert_close_on_cpu(d, expected.tensors[key], rtol=1e-3)


def rounded_alphaedit_solve(dtype: torch.dtype):
    """`alphaedit.alphaedit_solve` with every operand and product rounded to `dtype`: the solve a
    model's own dtype would give. `torch.linalg.solve` refuses bf16, so for bf16 its LU runs in
    float32 on the bf16-rounded system (the rounding of M and P is what breaks the null space)."""

    def solve(K, R, P, previous=None, l2=alphaedit.L2):
        K, R, P = K.to(dtype), R.to(dtype), P.to(K.device, dtype)
        gram = K @ K.T
        if previous is not None:
            gram = gram + previous.to(K.device, dtype)
        M = gram @ P + l2 * torch.eye(len(P), dtype=dtype, device=K.device)
        work = torch.float32 if dtype == torch.bfloat16 else dtype
        return torch.linalg.solve(M.T.to(work), (P @ K @ R.T).to(work)).T.float()

    return solve


def preserved_share(D: torch.Tensor, c: LayerCurvature, threshold: float) -> float:
    """‖Δ U_kept‖ / ‖Δ‖ in float64, U_kept A's eigenvectors at or above `threshold` (the preserved
    keys' directions, where AlphaEdit's update must be zero); Δ in (d_out, d_in)."""
    s, U = c.eigen("A", "cpu")
    kept = U[:, s >= threshold].double()
    return float((D.double() @ kept).norm() / D.double().norm())


def test_a_bf16_alphaedit_solves_in_float64_and_keeps_the_preserved_keys(
    tiny_tokenizer, dev, monkeypatch
):
    """A bf16 model on the accelerator, its curvature (from the fp32 copy) on the CPU. The same
    edit with the solve rounded to float32 and to bf16 shows the tolerance is one a bf16 solve
    fails."""
    layers = parse_layers(make_tiny("llama"), "2-3")
    curvature = curvature_of("llama", tiny_tokenizer, layers,
                             make_tiny("llama").to(torch.bfloat16).float())  # fmt: skip
    settings = settings_for("alphaedit", curvature)
    threshold = settings.null_threshold

    def edit(dtype: torch.dtype | None):
        model = make_tiny("llama").to(dev, torch.bfloat16)
        before = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}
        with monkeypatch.context() as patch:
            if dtype is not None:
                patch.setattr(alphaedit, "alphaedit_solve", rounded_alphaedit_solve(dtype))
            calls = spy_solves(patch)
            editor = make_editor(model, tiny_tokenizer, curvature, settings, layers=layers,
                                 **QUIET)  # fmt: skip
            delta = editor.edit(LAST_TOKEN_FACTS)
        shares = [
            preserved_share(delta.tensors[f"{n}.weight"], curvature.layers[n], threshold)
            for n in layers
        ]
        return model, before, delta, calls, max(shares)

    model, before, delta, calls, ours = edit(None)
    assert calls == [(torch.float64, True)] * len(layers)
    for name, module in get_layers(model, layers).items():
        D = delta.tensors[f"{name}.weight"]
        assert D.dtype == torch.float32 and not on_accelerator(D) and float(D.norm()) > 0
        # the model holds W_before + delta, rounded once into bf16
        assert module.weight.dtype == torch.bfloat16
        assert torch.equal(module.weight.cpu(), (before[name].cpu().float() + D).bfloat16())
    single, half = (edit(dtype)[-1] for dtype in (torch.float32, torch.bfloat16))
    print(f"preserved share: float64 {ours:.2e}, float32 {single:.2e}, bf16 {half:.2e}")
    assert ours <= TOLERANCE and single <= 10 * TOLERANCE and half > 100 * TOLERANCE


def test_a_bf16_memit_solves_in_float64_and_returns_an_fp32_delta(tiny_tokenizer, dev, monkeypatch):
    layers = parse_layers(make_tiny("llama"), "2-3")
    curvature = curvature_of("llama", tiny_tokenizer, layers)
    model = make_tiny("llama").to(dev, torch.bfloat16)
    before = {n: m.weight.detach().cpu().float() for n, m in get_layers(model, layers).items()}
    calls = spy_solves(monkeypatch)
    delta = make_editor(model, tiny_tokenizer, curvature, settings_for("memit", curvature),
                        layers=layers, **QUIET).edit(LAST_TOKEN_FACTS)  # fmt: skip
    assert calls == [(torch.float64, True)] * len(layers)
    for name, module in get_layers(model, layers).items():
        D = delta.tensors[f"{name}.weight"]
        assert D.dtype == torch.float32 and not on_accelerator(D) and float(D.norm()) > 0
        assert torch.equal(module.weight.cpu(), (before[name] + D).bfloat16())


def test_an_alphaedit_streams_second_version_with_the_model_on_the_accelerator(
    tmp_path, tiny_tokenizer, dev, monkeypatch
):
    """Two versions on one stream, the model on the accelerator and its capability curvature
    read from the store (on the CPU). The stream state (the earlier keys' S_A)
    stays on the host (`read_state`); the second edit's solve takes it to the accelerator. Both
    versions are the CPU stream's, and the second is the edit an `AlphaEditor` given the earlier
    keys on the accelerator makes from the first."""
    solve, seen = alphaedit.alphaedit_solve, []

    def spy(K, R, P, previous=None, l2=alphaedit.L2):
        seen.append((on_accelerator(K), None if previous is None else on_accelerator(previous)))
        return solve(K, R, P, previous, l2)

    monkeypatch.setattr(alphaedit, "alphaedit_solve", spy)
    solves = spy_solves(monkeypatch)

    def stream(root, device):
        store, model, layers, capability = stream_setup(
            root, tiny_tokenizer, device, "kfac", built_on_device=False
        )
        settings = settings_for("alphaedit", capability)
        base = base_weights(make_tiny("llama"), layers)

        def on_stream(facts):
            return edit_on_stream(store, "tiny", "main", model, tiny_tokenizer, base,
                                  capability, facts, settings=settings, **QUIET)  # fmt: skip

        versions = [on_stream(LAST_TOKEN_FACTS[:2]), on_stream(LAST_TOKEN_FACTS[2:])]
        return store, model, layers, capability, settings, base, versions

    ref_store, _, layers, *_, expected = stream(tmp_path / "cpu", "cpu")
    seen.clear()
    solves.clear()
    store, model, _, capability, settings, base, versions = stream(tmp_path / "dev", dev)
    n = len(layers)
    assert seen == [(True, None)] * n + [(True, False)] * n
    assert solves == [(torch.float64, True)] * 2 * n
    assert versions[1][1].report["previous_edits"]
    for (manifest, delta), (ref_manifest, ref_delta) in zip(versions, expected, strict=True):
        assert manifest["edit_tokens"] == ref_manifest["edit_tokens"]
        for key, d in delta.tensors.items():
            assert not on_accelerator(d)
            assert_close_on_cpu(d, ref_delta.tensors[key], rtol=1e-3)
        state = read_state(store, manifest["id"])
        ref_state = read_state(ref_store, ref_manifest["id"])
        for name in layers:
            assert_close_on_cpu(state.S_A[name], ref_state.S_A[name])
    # the earlier keys handed over on the accelerator: the same second edit
    first = versions[0][0]["id"]
    materialize(store, first, model, base)
    previous = {n: S.to(dev) for n, S in read_state(store, first).S_A.items()}
    direct = AlphaEditor(model, tiny_tokenizer, capability, settings, layers=layers,
                         previous=previous, **QUIET).edit(LAST_TOKEN_FACTS[2:])  # fmt: skip
    assert seen[-n:] == [(True, True)] * n
    for key, d in direct.tensors.items():
        assert_close_on_cpu(d, versions[1][1].tensors[key], rtol=1e-4)


@pytest.mark.parametrize("method", ("memit", "alphaedit"))
def test_a_solve_holds_a_few_input_square_matrices_on_the_accelerator(
    method, tiny_tokenizer, dev, monkeypatch
):
    """Each layer's solve, from its covariance on the CPU (AlphaEdit: its eigendecomposition on
    the accelerator, and the earlier keys' Gram matrix on the CPU, as a stream hands it over),
    adds at most four float64 d_in × d_in matrices and two float64 d_out × d_in ones to what the
    accelerator held before it (at 8B, down_proj's d_in = 14336: 6.6 GB): P, M, M P and the LU
    factor; R K_1ᵀ P and the result. An extra d_in × d_in copy (an explicit identity, a Gram
    matrix summed out of place) breaks the bound."""
    layers = parse_layers(make_tiny("llama"), "2-3")
    curvature = curvature_of("llama", tiny_tokenizer, layers)
    model = make_tiny("llama").to(dev)
    previous = {n: 3 * c.A.double() for n, c in curvature.layers.items()}
    extra = {"previous": previous} if method == "alphaedit" else {}
    editor = make_editor(model, tiny_tokenizer, curvature, settings_for(method, curvature),
                         layers=layers, **extra, **QUIET)  # fmt: skip
    solve, peaks = editor._solve, []

    def measured(name, K, R, facts):
        gc.collect()
        start = memory_allocated()
        reset_peak_memory_stats()
        update = solve(name, K, R, facts)
        d_out, d_in = update.shape
        peaks.append((max_memory_allocated() - start, (4 * d_in**2 + 2 * d_out * d_in) * 8))
        return update

    monkeypatch.setattr(editor, "_solve", measured)
    editor.edit(LAST_TOKEN_FACTS)
    assert len(peaks) == len(layers)
    assert all(0 < peak <= bound for peak, bound in peaks), peaks
