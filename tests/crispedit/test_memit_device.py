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
from test_device import assert_close_on_cpu, tiny_batches
from test_memit import LAST_TOKEN_FACTS

from contract.settings import EditSettings
from crispedit import alphaedit
from crispedit.curvature import Curvature, LayerCurvature, collect_curvature
from crispedit.editor import make_editor
from crispedit.models import get_layers, parse_layers

QUIET = {"progress": False}
# few value steps and one context prefix: the device handling, not the edit's quality, is tested
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
