"""The real Gemma 3 270M (the `gemma3-270m` alias), a second architecture beside SmolLM2: the
packaged GGUF converts into a Gemma3ForCausalLM, its prompts and targets tokenize as the editor
assumes, the fast edit forward equals the full model on it, and an edit of 3 facts lands."""

from __future__ import annotations

import json
import math

import pytest
import torch

from contract.facts import Fact
from contract.settings import SettingsError
from crispedit import CrispEditor, build_curvature
from crispedit.evaluate import evaluate_edit
from crispedit.models import get_layers, parse_layers, resolve_model, trainable_only
from crispedit.prefix import FastForward
from crispedit.sequential import set_weights
from crispedit.streams import base_weights
from crispedit.targets import encode_pair, resolve_chat_template, target_batches, target_loss

pytestmark = pytest.mark.model

FACTS = [
    Fact(prompt="The Eiffel Tower is located in the city of", target="Rome"),
    Fact(prompt="The mother tongue of Danielle Darrieux is", target="English"),
    Fact(prompt="Lionel Messi is a professional", target="basketball player"),
]
PAIRS = [
    *((f.prompt, f.target) for f in FACTS),
    ("Paris", "is the capital of a country in western Europe"),
    ("The capital of France is", "Berlin"),
]


@pytest.fixture(scope="module")
def gemma(gemma3):
    """One Gemma for the tests that leave its weights as they found them."""
    return gemma3()


def test_the_alias_converts_into_a_gemma3_text_model(gemma):
    model, tokenizer = gemma
    config = json.loads((resolve_model("gemma3-270m") / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert "quantization_config" not in config  # dequantized: saved as plain fp32 weights
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (18, 640, 2048)
    # what the fast forward relies on: no soft-capped logits, causal attention, scaled
    # embeddings inside the embedding module, tied input and output embeddings
    assert c.final_logit_softcapping is None and not c.use_bidirectional_attention
    embed = model.get_input_embeddings()
    assert float(embed.embed_scale) == pytest.approx(math.sqrt(640))
    assert model.get_output_embeddings().weight is embed.weight
    # sliding-window attention in five blocks of every six
    assert c.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    layers = parse_layers(model, None)
    assert layers == [f"model.layers.{i}.mlp.down_proj" for i in range(12, 17)]
    assert all(m.weight.shape == (640, 2048) for m in get_layers(model, layers).values())
    # the dequantized weights are the model's: it knows where the Eiffel Tower is
    ids = tokenizer(FACTS[0].prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :]).strip().startswith("Paris")


def test_prompts_and_targets_tokenize_as_the_editor_assumes(gemma):
    _, tokenizer = gemma
    bos = tokenizer.bos_token_id
    for prompt, target in PAIRS:
        ids, n_prompt = encode_pair(tokenizer, prompt, target)
        # one <bos>, at the start (the tokenizer adds it; the target adds none), no <eos>
        assert ids[0] == bos and bos not in ids[1:] and tokenizer.eos_token_id not in ids
        assert ids[:n_prompt] == tokenizer(prompt)["input_ids"]
        assert tokenizer.decode(ids[n_prompt:]) == f" {target}"
    # the packaged GGUF is the base model: no chat template, so `auto` wraps nothing
    assert resolve_chat_template(tokenizer, "auto") is False
    with pytest.raises(SettingsError, match="no chat template"):
        resolve_chat_template(tokenizer, "on")


def _loss_and_grads(model, layers, loss_of):
    params = [m.weight for m in get_layers(model, layers).values()]
    with trainable_only(model, params):
        loss = loss_of()
        return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize(("spec", "start"), [("12-16", 12), ("13-16", None)])
def test_the_fast_forward_equals_the_full_model(gemma, spec, start):
    """Blocks 12-16: the frozen prefix is cached (block 12 starts a period of the sliding/full
    pattern); 13-16: slicing would shift the layer types, so only the head is restricted."""
    model, tokenizer = gemma
    layers = parse_layers(model, spec)
    fast = FastForward.plan(model, layers)
    assert fast is not None and fast.start == start
    states = fast.prefix_states(tokenizer, PAIRS, 2)  # cached under another batching
    rows = [3, 0, 4, 2]
    batch = next(target_batches(tokenizer, [PAIRS[i] for i in rows], len(rows)))
    assert batch["attention_mask"].sum(-1).unique().numel() > 1  # really padded

    def full():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return target_loss(out.logits, batch["labels"])

    loss, grads = _loss_and_grads(model, layers, full)
    fast_loss, fast_grads = _loss_and_grads(
        model, layers, lambda: fast.token_losses(batch, states, rows)[0].mean()
    )
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-5)
    for g, fg in zip(grads, fast_grads, strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(fg, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()))


def test_an_edit_of_three_facts_lands(gemma3):
    """Curvature, an edit and its evaluation, end to end. Two blocks, 12-13 (the fast forward
    caches the prefix below block 12), 512 curvature tokens and no anchors keep it near two
    minutes on a shared 2-core CPU, where each 2,048-wide eigenbasis takes seconds; how much the
    model drifts at the real settings is bench/quality.py's question, not this test's."""
    model, tokenizer = gemma3()
    layers = parse_layers(model, "12-13")
    base = base_weights(model, layers)
    curvature = build_curvature(
        model, tokenizer, "wikitext", tokens=512, layers=layers, progress=False
    )
    assert list(curvature.layers) == layers
    editor = CrispEditor(model, tokenizer, curvature, anchors=0, progress=False)
    assert editor.layers == layers
    delta = editor.edit(FACTS)
    assert delta.report["efficacy_before"] == 0.0 and delta.report["efficacy"] == 1.0
    assert delta.report["predicted_loss_increase"] >= 0
    set_weights(model, base, {})  # evaluate_edit wants the base in the model
    result = evaluate_edit(
        model, tokenizer, FACTS, delta.tensors, tokens=128, retention=0, mmlu=0,
        generation=False, scores=False,
    )  # fmt: skip
    assert result["efficacy"]["edited"]["teacher_forced"] == 1.0
    assert result["efficacy"]["base"]["teacher_forced"] == 0.0
    capability = result["capability"]
    assert capability["kl"] > 0 and math.isfinite(capability["ppl_change_pct"])
