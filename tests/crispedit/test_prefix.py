"""The fast edit forward (cached frozen prefix, logits at target positions only) against the full
model: same loss, same gradients, same edit, and a model left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny

from contract.facts import Fact
from crispedit.delta import apply_delta
from crispedit.editor import CrispEditor
from crispedit.models import get_layers, is_conv1d, parse_layers, trainable_only, transformer_blocks
from crispedit.prefix import FastForward
from crispedit.targets import target_batches, target_loss

FACTS = [  # three with a subject: their anchors go through the fast and the full forward too
    Fact(prompt="The Eiffel Tower is located in", target="Rome", subject="The Eiffel Tower"),
    Fact(prompt="The capital of France is", target="Berlin"),
    Fact(prompt="Robert Boulter is an English", target="chef", subject="Robert Boulter"),
    Fact(prompt="Paris", target="is the capital of a country in western Europe"),
    Fact(
        prompt="The mother tongue of Danielle Darrieux is",
        target="English",
        subject="Danielle Darrieux",
    ),
]
PAIRS = [(f.prompt, f.target) for f in FACTS]
ARCHS = ["llama", "gpt2", "gptj", "gptneox", "mistral", "qwen2"]
EDIT = {"lr": 3e-2, "epochs": 6, "batch_size": 2, "progress": False}


def make_model(arch: str, seed: int = 0):
    """make_tiny's four architectures, plus tiny Mistral and Qwen2 (`qwen2-sliding`: sliding
    attention in the upper two blocks only)."""
    if arch not in ("mistral", "qwen2", "qwen2-sliding", "gptneo"):
        return make_tiny(arch, seed)
    from transformers import (
        GPTNeoConfig,
        GPTNeoForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = {"vocab_size": TINY_VOCAB, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}
    if arch == "gptneo":  # no fast path: the editor must fall back to the full forward
        config = GPTNeoConfig(
            hidden_size=32,
            num_layers=4,
            num_heads=4,
            attention_types=[[["global", "local"], 2]],
            window_size=8,
            max_position_embeddings=256,
            **common,
        )
        return GPTNeoForCausalLM(config).float().eval()
    shape = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=6, **shape, **common)).eval()
    sliding = {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 2}
    config = Qwen2Config(**shape, **common, **(sliding if arch == "qwen2-sliding" else {}))
    return Qwen2ForCausalLM(config).float().eval()


def losses_and_grads(model, layers, fn):
    params = [m.weight for m in get_layers(model, layers).values()]
    with trainable_only(model, params):
        loss = fn()
        grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def check_step(model, tok, layers, start):
    """The fast loss and edited-weight gradients of a shuffled batch equal the full model's."""
    fast = FastForward.plan(model, layers)
    assert fast is not None and fast.start == start
    states = fast.prefix_states(tok, PAIRS, 2)  # cached under a batching unlike the step's
    assert (states is None) == (start is None)
    rows = [3, 0, 4, 2]
    batch = next(target_batches(tok, [PAIRS[i] for i in rows], len(rows)))
    assert batch["attention_mask"].sum(-1).unique().numel() > 1  # really padded

    def full():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return target_loss(out.logits, batch["labels"])

    loss, grads = losses_and_grads(model, layers, full)
    fast_loss, fast_grads = losses_and_grads(
        model, layers, lambda: fast.token_losses(batch, states, rows)[0].mean()
    )
    torch.testing.assert_close(fast_loss, loss, rtol=1e-6, atol=1e-6)
    for g, fg in zip(grads, fast_grads, strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(fg, g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_step_equals_the_full_model(arch, tiny_tokenizer):
    model = make_model(arch)
    check_step(model, tiny_tokenizer, parse_layers(model, "2-3"), start=2)
    # not only MLP output projections: an attention projection of the lowest block
    prefix, _ = transformer_blocks(model)
    attention = next(
        f"{prefix}.1.{name}"
        for name, m in model.get_submodule(f"{prefix}.1").named_modules()
        if (isinstance(m, torch.nn.Linear) or is_conv1d(m)) and "att" in name
    )
    check_step(model, tiny_tokenizer, [attention, *parse_layers(model, "3")], start=1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_only_where_the_prefix_cannot_be_cached(arch, tiny_tokenizer):
    """Block 0 edited, or a layer outside the blocks (the head): logits at the targets only."""
    model = make_model(arch)
    check_step(model, tiny_tokenizer, parse_layers(model, "0-1"), start=None)
    head = "lm_head"
    check_step(model, tiny_tokenizer, [*parse_layers(model, "2"), head], start=None)


def test_alternating_layer_types_are_not_sliced(tiny_tokenizer):
    """Qwen2 with sliding attention in the upper blocks looks attention types up by position in
    the block loop: slicing would shift them, so only the head is restricted."""
    model = make_model("qwen2-sliding")
    assert model.config.layer_types[1] != model.config.layer_types[2]
    check_step(model, tiny_tokenizer, parse_layers(model, "2-3"), start=None)
    model = make_model("qwen2-sliding")
    check_step(model, tiny_tokenizer, parse_layers(model, "3"), start=None)


def structure(model):
    return [(n, id(m)) for n, m in model.named_modules()]


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gptj", "gptneox"])
def test_fast_edit_equals_the_full_edit(arch, tiny_tokenizer):
    deltas, models = {}, {}
    for fast in (True, False):
        model = make_model(arch)
        layers = parse_layers(model, "2-3")
        before, n_hooks = structure(model), hooks(model)
        editor = CrispEditor(
            model, tiny_tokenizer, None, method="ft", layers=layers, fast=fast, **EDIT
        )
        assert (editor.fast is not None) == fast
        deltas[fast] = editor.edit(FACTS)
        assert structure(model) == before and hooks(model) == n_hooks
        models[fast] = model
    fast, full = deltas[True], deltas[False]
    assert fast.report["epochs"] == full.report["epochs"] == EDIT["epochs"]
    assert fast.report["efficacy"] == full.report["efficacy"]
    assert fast.report["loss_curve"] == pytest.approx(full.report["loss_curve"], rel=1e-4)
    for name, t in full.tensors.items():
        assert t.abs().max() > 0
        torch.testing.assert_close(fast.tensors[name], t, rtol=1e-4, atol=1e-5 * float(t.norm()))
    # the edited model runs exactly like a fresh model with the delta applied
    fresh = make_model(arch)
    apply_delta(fresh, fast)
    ids = tiny_tokenizer("The capital of France is Berlin", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(models[True](input_ids=ids).logits, fresh(input_ids=ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_aborted_edit_leaves_the_model_whole(arch, tiny_tokenizer):
    model = make_model(arch)
    layers = parse_layers(model, "2-3")
    before, n_hooks = structure(model), hooks(model)

    def cancel(progress):
        raise KeyboardInterrupt("cancelled")

    editor = CrispEditor(
        model, tiny_tokenizer, None, method="ft", layers=layers, on_epoch=cancel, **EDIT
    )
    assert editor.fast is not None and editor.fast.start == 2
    with pytest.raises(KeyboardInterrupt):
        editor.edit(FACTS)
    assert structure(model) == before and hooks(model) == n_hooks
    # the (half-edited) model computes exactly what a fresh one with its weights computes
    fresh = make_model(arch)
    fresh.load_state_dict(model.state_dict())
    batch = next(target_batches(tiny_tokenizer, PAIRS, len(PAIRS)))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)
    # and the same editor edits again afterwards, as a worker's next job does
    editor.on_epoch = None
    assert editor.edit(FACTS[:2]).report["epochs"] == EDIT["epochs"]
    assert structure(model) == before and hooks(model) == n_hooks


def test_error_inside_a_fast_step_leaves_the_model_whole(tiny_tokenizer):
    """An exception raised while the blocks are sliced (here by the top block, in the second step)
    propagates, and the block list and hooks are restored."""
    model = make_model("llama")
    before, n_hooks = structure(model), hooks(model)
    editor = CrispEditor(model, tiny_tokenizer, None, method="ft", layers="2-3", **EDIT)
    sliced = []
    top = model.model.layers[3]

    def fail_when_sliced(module, args, output):
        if len(model.model.layers) == 2:
            sliced.append(1)
            if len(sliced) == 2:
                raise RuntimeError("boom")

    handle = top.register_forward_hook(fail_when_sliced)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            editor.edit(FACTS)
    finally:
        handle.remove()
    assert structure(model) == before and hooks(model) == n_hooks
    assert len(model.model.layers) == 4


def test_unsupported_architecture_falls_back(tiny_tokenizer):
    model = make_model("gptneo")
    layers = parse_layers(model, "2-3")
    assert FastForward.plan(model, layers) is None
    editor = CrispEditor(model, tiny_tokenizer, None, method="ft", layers=layers, **EDIT)
    assert editor.fast is None
    delta = editor.edit(FACTS)
    assert delta.report["loss_curve"][-1] < delta.report["loss_curve"][0]
    other = make_model("gptneo")
    plain = CrispEditor(other, tiny_tokenizer, None, method="ft", layers=layers, fast=False, **EDIT)
    for name, t in plain.edit(FACTS).tensors.items():
        assert torch.equal(delta.tensors[name], t)


def test_training_mode_runs_the_full_model(tiny_tokenizer, monkeypatch):
    """Dropout makes the prefix random: a model in training mode is never cached."""
    model = make_model("llama")
    editor = CrispEditor(model, tiny_tokenizer, None, method="ft", layers="2-3", **EDIT)
    monkeypatch.setattr(editor.fast, "prefix_states", lambda *a: pytest.fail("cached"))
    monkeypatch.setattr(editor.fast, "token_losses", lambda *a: pytest.fail("fast step"))
    model.train()
    editor.edit(FACTS[:2])
