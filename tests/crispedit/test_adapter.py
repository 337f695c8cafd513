"""Adapters: a delta exported as a PEFT LoRA adapter loads with the real `peft` and gives the
model the delta gives, exactly at full rank and within the reported error below it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny
from peft import PeftModel
from safetensors.torch import load_file

from contract.adapters import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_MANIFEST_FILE,
    ADAPTER_WEIGHTS_FILE,
    DEFAULT_RANK,
    AdapterError,
    choose_rank,
)
from crispedit.adapter import adapter_tensors, save_adapter
from crispedit.delta import add_to_weights
from crispedit.models import get_layers, is_conv1d, weight_matrix

LAYERS = {"llama": [2, 3], "gpt2": [1, 3]}
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 7, 3], [2, 4, 8, 16, 32, 64, 128, 5]])


def tiny_delta(arch: str, seed: int = 1) -> tuple[dict[str, torch.Tensor], dict]:
    """A delta on two MLP output projections of the tiny `arch` model, in the weights' storage
    layout: a strong rank-3 part plus a weak full-rank part (an edit is mostly low rank), and
    the version manifest fields an export reads."""
    model = make_tiny(arch)
    proj = "model.layers.{}.mlp.down_proj" if arch == "llama" else "transformer.h.{}.mlp.c_proj"
    names = [proj.format(i) for i in LAYERS[arch]]
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, module in get_layers(model, names).items():
        d_out, d_in = weight_matrix(module).shape
        low = torch.randn(d_out, 3, generator=gen) @ torch.randn(3, d_in, generator=gen) * 0.05
        full = low + 0.002 * torch.randn(d_out, d_in, generator=gen)
        deltas[f"{name}.weight"] = full.T.contiguous() if is_conv1d(module) else full
    transposed = [n for n, m in get_layers(model, names).items() if is_conv1d(m)]
    return deltas, {"id": "v1", "model": "tiny", "transposed_layers": transposed}


def logits_with_delta(arch: str, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    model = make_tiny(arch)
    add_to_weights(model, deltas)
    with torch.no_grad():
        return model(IDS).logits


def logits_with_adapter(arch: str, folder) -> torch.Tensor:
    model = PeftModel.from_pretrained(make_tiny(arch), str(folder)).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_full_rank_adapter_loads_in_peft_and_gives_the_deltas_model(arch, tmp_path):
    deltas, manifest = tiny_delta(arch)
    full = max(min(d.shape) for d in deltas.values())
    report = save_adapter(tmp_path / "adapter", deltas, manifest, rank=full)
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == sorted([ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_MANIFEST_FILE])
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == full
    assert config["target_modules"] == [k.removesuffix(".weight") for k in deltas]
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert all(layer["relative_error"] < 1e-6 for layer in report["layers"].values())

    expected = logits_with_delta(arch, deltas)
    base = logits_with_delta(arch, {})
    got = logits_with_adapter(arch, tmp_path / "adapter")
    assert (expected - base).abs().max() > 1e-2  # the delta does change the model
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)

    # and merged into the weights, the model's layers are base + delta
    merged = PeftModel.from_pretrained(
        make_tiny(arch), str(tmp_path / "adapter")
    ).merge_and_unload()
    reference = make_tiny(arch)
    add_to_weights(reference, deltas)
    for key in deltas:
        layer = key.removesuffix(".weight")
        torch.testing.assert_close(
            get_layers(merged, [layer])[layer].weight,
            get_layers(reference, [layer])[layer].weight,
            atol=1e-6,
            rtol=1e-5,
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_truncated_adapter_is_as_far_from_the_delta_as_it_reports(arch, tmp_path):
    deltas, manifest = tiny_delta(arch)
    report = save_adapter(tmp_path / "a.tar.gz", deltas, manifest, rank=3)
    assert report["r"] == 3
    import tarfile

    with tarfile.open(tmp_path / "a.tar.gz") as archive:
        archive.extractall(tmp_path / "x", filter="data")
    weights = load_file(tmp_path / "x" / ADAPTER_WEIGHTS_FILE)
    for key, delta in deltas.items():
        layer = key.removesuffix(".weight")
        b = weights[f"base_model.model.{layer}.lora_B.weight"]
        a = weights[f"base_model.model.{layer}.lora_A.weight"]
        product = b @ a
        matrix = delta.T if arch == "gpt2" else delta
        error = float((matrix - product).norm() / matrix.norm())
        stated = report["layers"][layer]["relative_error"]
        assert 0.005 < stated < 0.2  # the weak full-rank part is cut off, and only it
        assert error == pytest.approx(stated, rel=1e-3)

    expected = logits_with_delta(arch, deltas)
    change = (expected - logits_with_delta(arch, {})).norm()
    gap = (logits_with_adapter(arch, tmp_path / "x") - expected).norm()
    worst = max(layer["relative_error"] for layer in report["layers"].values())
    assert gap <= 2 * worst * change  # the logits miss by about the share the weights miss


def test_energy_keeps_the_smallest_rank_holding_that_share():
    values = [3.0, 2.0, 1.0, 0.0]  # squares 9, 4, 1: 9/14 = 0.64, 13/14 = 0.929
    assert [choose_rank(values, None, e, "l") for e in (0.5, 0.64, 0.9, 0.92, 0.99, 1.0)] == [
        1, 1, 2, 2, 3, 3,
    ]  # fmt: skip
    assert choose_rank([0.0, 0.0], None, 0.9, "l") == 0
    deltas, manifest = tiny_delta("llama")
    weights, config, report = adapter_tensors(deltas, manifest, energy=0.9999)
    ranks = [layer["rank"] for layer in report["layers"].values()]
    assert all(3 < r < 32 for r in ranks) and config["r"] == max(ranks)
    # what the energy leaves out bounds the error; a lower-rank layer is zero-padded to r
    assert all(layer["relative_error"] ** 2 <= 1e-4 for layer in report["layers"].values())
    for layer, info in report["layers"].items():
        a = weights[f"base_model.model.{layer}.lora_A.weight"]
        assert a.shape[0] == config["r"] and not a[info["rank"] :].any()
    _, _, low = adapter_tensors(deltas, manifest, energy=0.9)
    assert all(layer["rank"] <= 3 for layer in low["layers"].values())


@pytest.mark.parametrize(
    ("rank", "energy", "field"),
    [(0, None, "rank"), (-2, None, "rank"), (33, None, "rank"), (2.5, None, "rank"),
     (None, 0.0, "energy"), (None, 1.5, "energy"), (None, float("nan"), "energy"),
     (2, 0.9, "energy")],
)  # fmt: skip
def test_bad_rank_or_energy_is_refused_and_writes_nothing(rank, energy, field, tmp_path):
    deltas, manifest = tiny_delta("llama")  # min(d_out, d_in) = 32
    with pytest.raises(AdapterError) as err:
        save_adapter(tmp_path / "out", deltas, manifest, rank=rank, energy=energy)
    assert err.value.field == field
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_without_rank_or_energy_the_default_rank_capped_at_each_layer():
    deltas, manifest = tiny_delta("llama")  # min(d_out, d_in) = 32 < DEFAULT_RANK
    _, config, report = adapter_tensors(deltas, manifest)
    assert report["default_rank"] and report["rank"] == DEFAULT_RANK
    assert config["r"] == 32 and all(x["rank"] == 32 for x in report["layers"].values())


def test_numpy_deltas_and_another_dtype(tmp_path):
    deltas, manifest = tiny_delta("llama")
    as_numpy = {k: v.numpy() for k, v in deltas.items()}
    weights, _, report = adapter_tensors(as_numpy, manifest, rank=4, dtype=torch.bfloat16)
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    assert report["dtype"] == "torch.bfloat16" and report["version"] == "v1"
    reference, _, _ = adapter_tensors(deltas, manifest, rank=4)
    for key, w in weights.items():
        b16 = reference[key].to(torch.bfloat16)
        assert torch.equal(w, b16) or np.allclose(w.float(), b16.float(), atol=1e-2)


def test_save_adapter_writes_what_adapter_tensors_builds_with_every_option(tmp_path):
    deltas, manifest = tiny_delta("gpt2")
    options = {
        "rank": 5, "energy": None, "dtype": torch.float16, "device": "cpu", "base_model": "other"
    }  # fmt: skip
    weights, config, report = adapter_tensors(deltas, manifest, **options)
    assert save_adapter(tmp_path / "adapter", deltas, manifest, **options) == report
    saved = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE)
    assert saved.keys() == weights.keys()
    assert all(torch.equal(saved[k], w) and w.dtype == torch.float16 for k, w in weights.items())
    written = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert written == config and written["base_model_name_or_path"] == "other"
    with pytest.raises(TypeError):  # a misspelt option is refused before anything is written
        save_adapter(tmp_path / "typo", deltas, manifest, rnak=5)
    assert not (tmp_path / "typo").exists()


@pytest.mark.model
def test_smollm2_adapter_matches_the_delta(smollm2, tmp_path):
    model, tokenizer = smollm2()
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(20, 25)]
    gen = torch.Generator().manual_seed(0)
    deltas = {}
    for name, module in get_layers(model, names).items():
        d_out, d_in = module.weight.shape
        deltas[f"{name}.weight"] = (
            torch.randn(d_out, 8, generator=gen) @ torch.randn(8, d_in, generator=gen) * 2e-3
        )
    manifest = {"id": "v1", "model": "smollm2", "transposed_layers": []}
    report = save_adapter(tmp_path / "adapter", deltas, manifest, rank=8)
    assert all(layer["relative_error"] < 1e-3 for layer in report["layers"].values())
    ids = tokenizer(["The Eiffel Tower is located in the city of"], return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids).logits
        add_to_weights(model, deltas)
        expected = model(ids).logits
        add_to_weights(model, deltas, -1.0)
        got = PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()(ids).logits
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)
