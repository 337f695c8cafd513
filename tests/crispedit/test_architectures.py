"""Every architecture our users run, end to end on a tiny random model of each: default layers,
curvature against a one-sequence-at-a-time brute force, a projected edit whose delta rebuilds the
edited model, the fast forward against the full one (or its refusal), and the fingerprint."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS, make_tiny
from test_curvature import assert_factor_close, brute_force
from test_prefix import check_step

from crispedit.corpus import pad_batches, read_documents, token_sequences
from crispedit.curvature import collect_curvature
from crispedit.delta import apply_delta
from crispedit.editor import CrispEditor
from crispedit.facts import Fact
from crispedit.models import (
    ModelError,
    default_target_layers,
    is_editable,
    model_fingerprint,
    parse_layers,
    weight_matrix,
)
from crispedit.prefix import FastForward
from crispedit.targets import target_batches

# The default layer of each tiny model (4 blocks: block 3, the last) and its (d_out, d_in).
DEFAULT_LAYER = {
    "llama": ("model.layers.3.mlp.down_proj", (32, 48)),
    "mistral": ("model.layers.3.mlp.down_proj", (32, 48)),
    "qwen2": ("model.layers.3.mlp.down_proj", (32, 48)),
    "qwen3": ("model.layers.3.mlp.down_proj", (32, 48)),
    "gemma": ("model.layers.3.mlp.down_proj", (32, 48)),
    "gemma2": ("model.layers.3.mlp.down_proj", (32, 48)),
    "gemma3": ("model.layers.3.mlp.down_proj", (32, 48)),
    "gemma3-vision": ("model.language_model.layers.3.mlp.down_proj", (32, 48)),
    "phi3": ("model.layers.3.mlp.down_proj", (32, 48)),
    "gpt2": ("transformer.h.3.mlp.c_proj", (32, 128)),
    "gptj": ("transformer.h.3.mlp.fc_out", (32, 128)),
    "gptneox": ("gpt_neox.layers.3.mlp.dense_4h_to_h", (32, 64)),
    "opt": ("model.decoder.layers.3.fc2", (32, 48)),
}
# Mixtral's experts are one fused 3-D parameter per block: it is edited in its attention output
# projections, named explicitly; every other model through block indices.
LAYERS = {"mixtral": "model.layers.2.self_attn.o_proj,model.layers.3.self_attn.o_proj"}
# Architectures whose edit steps run the fast forward (the others run the full model): logits
# scaled or soft-capped after the head (Gemma 2), an input that is no single module's output
# (OPT adds its positions inline) or a multimodal wrapper keep the full forward.
FAST = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma3",
    "phi3",
    "gpt2",
    "gptj",
    "gptneox",
    "mixtral",
}
FACTS = [
    Fact(prompt="The Eiffel Tower is located in", target="Rome"),
    Fact(prompt="Robert Boulter is an English", target="chef"),
]
EDIT = {"method": "kfac", "gamma": 0.8, "lr": 3e-2, "epochs": 3, "batch_size": 2}


def test_every_architecture_is_covered():
    assert set(TINY_ARCHS) == {*DEFAULT_LAYER, "mixtral"}


@pytest.fixture(scope="module")
def sequences(tiny_tokenizer):
    """Four short sequences of different lengths, so that batches of two need padding."""
    seqs = token_sequences(tiny_tokenizer, read_documents("wikitext")[:40], 300, seq_len=32)
    return [s[: 8 + 5 * i] for i, s in enumerate(seqs[:4])]


def edited_layers(model, arch: str) -> list[str]:
    return parse_layers(model, LAYERS.get(arch, "2-3"))


@pytest.mark.parametrize("arch", sorted(DEFAULT_LAYER))
def test_default_layer_is_the_mlp_output_projection(arch):
    model = make_tiny(arch)
    name, shape = DEFAULT_LAYER[arch]
    assert default_target_layers(model) == parse_layers(model, None) == [name]
    module = model.get_submodule(name)
    assert is_editable(module)
    assert tuple(weight_matrix(module).shape) == shape
    # block indices name the same projection in other blocks
    assert parse_layers(model, "1") == [name.replace(".3.", ".1.")]


def test_mixtral_default_layers_refused_naming_the_layers_that_work():
    model = make_tiny("mixtral")
    for spec in (None, "2-3"):
        with pytest.raises(ModelError, match=r"mlp\.experts") as err:
            parse_layers(model, spec)
        assert "model.layers.3.self_attn.o_proj" in str(err.value)
    # the fused experts by module or by parameter name: refused, saying why
    for spec in ("model.layers.2.mlp.experts", "model.layers.2.mlp.experts.down_proj"):
        with pytest.raises(ModelError, match="fused in 3-D parameters"):
            parse_layers(model, spec)
    # and the suggested layers do work
    assert edited_layers(model, "mixtral") == LAYERS["mixtral"].split(",")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_curvature_equals_brute_force(arch, tiny_tokenizer, sequences):
    """Batched and right-padded (two per batch) against one unpadded sequence at a time."""
    model = make_tiny(arch)
    layers = edited_layers(model, arch)
    batches = pad_batches(sequences, tiny_tokenizer.pad_token_id, 2)
    curv = collect_curvature(model, layers, batches, progress=False)
    A, B, _, n_tokens = brute_force(model, layers, sequences, [s[1:] for s in sequences])
    assert curv.tokens == n_tokens
    for name in layers:
        assert_factor_close(curv.layers[name].A, A[name])
        assert_factor_close(curv.layers[name].B, B[name])


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [(arch, torch.float32) for arch in TINY_ARCHS]
    # bf16, as on a GPU: the architectures with a path of their own
    + [(arch, torch.bfloat16) for arch in ("opt", "gemma3-vision", "mixtral")],
)
def test_projected_edit_changes_only_its_layers(arch, dtype, tiny_tokenizer, sequences):
    model = make_tiny(arch).to(dtype)
    layers = edited_layers(model, arch)
    batches = pad_batches(sequences, tiny_tokenizer.pad_token_id, 2)
    curv = collect_curvature(model, layers, batches, progress=False)
    editor = CrispEditor(model, tiny_tokenizer, curv, layers=layers, progress=False, **EDIT)
    assert (editor.fast is not None) == (arch in FAST)
    delta = editor.edit(FACTS)
    assert delta.report["loss_curve"][-1] < delta.report["loss_curve"][0]

    fresh = make_tiny(arch).to(dtype)
    assert model_fingerprint(fresh, layers) == delta.meta["base_fingerprint"]
    edited = {f"{name}.weight" for name in layers}
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q) != (name in edited), name
    apply_delta(fresh, delta)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert model_fingerprint(fresh, layers) == delta.meta["edited_fingerprint"]
    assert delta.meta["edited_fingerprint"] != delta.meta["base_fingerprint"]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fast_forward_matches_the_full_forward_or_is_declined(arch, tiny_tokenizer):
    """Same loss and edited-layer gradients as the full model, on a padded, shuffled batch fed
    prefix states cached under another batching (test_prefix's check), or no plan at all."""
    model = make_tiny(arch)
    layers = edited_layers(model, arch)
    if arch in FAST:
        check_step(model, tiny_tokenizer, layers, start=2)
    else:
        assert FastForward.plan(model, layers) is None


def test_fingerprint_tells_architectures_and_seeds_apart():
    fingerprints = {}
    for arch in TINY_ARCHS:
        for seed in (0, 1):
            model = make_tiny(arch, seed)
            fp = model_fingerprint(model, edited_layers(model, arch))
            assert fp == model_fingerprint(make_tiny(arch, seed), edited_layers(model, arch))
            fingerprints[arch, seed] = fp
    assert len(set(fingerprints.values())) == len(fingerprints)


def test_soft_capped_logits_are_declined(tiny_tokenizer):
    """A Gemma 3 config may soft-cap its logits: then they are not the head's output, which the
    fast forward computes, so it must not be used."""
    model = make_tiny("gemma3")
    model.config.final_logit_softcapping = 0.5
    batch = next(target_batches(tiny_tokenizer, [(f.prompt, f.target) for f in FACTS], 2))
    with torch.no_grad():
        capped = model(**batch).logits
        head = model.lm_head(model.model(**batch).last_hidden_state)
    assert not torch.allclose(capped, head)
    assert FastForward.plan(model, edited_layers(model, "gemma3")) is None
    model.config.final_logit_softcapping = None
    assert FastForward.plan(model, edited_layers(model, "gemma3")) is not None
