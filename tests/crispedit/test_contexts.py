"""Context prefixes (crispedit.contexts) and the projected editor's `contexts` option: the
prefixes against the model's own greedy generation and MEMIT's, each fact's k + 1 sequences
against a tokenisation by hand, and the step's loss against separate full forwards."""

from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny

from contract.facts import Fact
from contract.settings import EditSettings, SettingsError, option_rules
from crispedit.contexts import CONTEXT_TOKENS, CONTEXTS, context_prefixes
from crispedit.curvature import plan_curvature
from crispedit.editor import CrispEditor, _Tally
from crispedit.evaluate import teacher_forced_accuracy
from crispedit.memit import MemitEditor
from crispedit.models import parse_layers
from crispedit.streams import base_weights, cached_curvature, edit_on_stream
from curvature_store import Store

FACTS = [
    Fact(prompt=f"{s} works as a", target=t, subject=s)
    for s, t in [("Anna Berg", "chef"), ("Tom Hale", "pilot"), ("Ida Moss", "judge")]
]


@pytest.fixture
def setup(tiny):
    model, tok = tiny
    return model, tok, parse_layers(model, "2-3")


def test_prefixes_are_the_models_greedy_continuations_and_memits_own(setup):
    """Each prefix is its starter and the model's greedy `CONTEXT_TOKENS` tokens (as
    `generate` finds them), then ". "; the same on every call and a copy of the model; MEMIT's
    value contexts are the empty prefix and these."""
    model, tok, _ = setup
    prefixes = context_prefixes(model, tok, 3)
    for starter, prefix in zip(CONTEXTS[:3], prefixes, strict=True):
        ids = torch.tensor([tok(starter, add_special_tokens=False)["input_ids"]])
        out = model.generate(
            ids, max_new_tokens=CONTEXT_TOKENS, min_new_tokens=CONTEXT_TOKENS, do_sample=False,
            attention_mask=torch.ones_like(ids), pad_token_id=0,
        )  # fmt: skip
        assert out.shape[1] == ids.shape[1] + CONTEXT_TOKENS
        text = " ".join(tok.decode(out[0], skip_special_tokens=True).split())
        assert prefix == text + ". "
    assert len(set(prefixes)) == 3
    assert context_prefixes(copy.deepcopy(model), tok, 3) == prefixes
    assert context_prefixes(model, tok, 0) == []
    with pytest.raises(ValueError, match="starters"):
        context_prefixes(model, tok, len(CONTEXTS) + 1)
    # MEMIT's own (it needs a curvature to be built; its prefixes only the model and settings)
    memit = SimpleNamespace(model=model, tokenizer=tok, settings=EditSettings(value_contexts=3))
    assert MemitEditor._contexts(memit) == ["", *prefixes]


def by_hand(tok, text: str, target: str) -> tuple[list[int], list[int]]:
    """The token ids of `text + " " + target` and its labels (-100 but at the target's tokens),
    the target's tokens found as those of `" " + target` at the end."""
    ids = tok(f"{text} {target}")["input_ids"]
    tail = tok(f" {target}", add_special_tokens=False)["input_ids"]
    assert ids[-len(tail) :] == tail
    return ids, [-100] * (len(ids) - len(tail)) + tail


def test_each_fact_trains_its_prompt_and_k_prefixed_copies(setup):
    """With contexts=2 a batch of facts holds 3 sequences per fact, the fact's in turn (its bare
    prompt first), each `prefix + prompt + " " + target` with its labels on the target tokens;
    the anchors stay the fact's and the efficacy is measured on the bare prompts."""
    model, tok, layers = setup
    prefixes = context_prefixes(model, tok, 2)
    editor = CrispEditor(model, tok, None, method="ft", layers=layers, contexts=2, anchors=1,
                         progress=False)  # fmt: skip
    run = editor._prepare(FACTS)
    plain = CrispEditor(model, tok, None, method="ft", layers=layers, anchors=1, progress=False)
    assert run.anchors.owned == plain._prepare(FACTS).anchors.owned
    assert run.pairs == [(f.prompt, f.target) for f in FACTS]
    rows = [2, 0]
    batch = editor._batch(run, rows)
    expected = [
        by_hand(tok, prefix + FACTS[r].prompt, FACTS[r].target)
        for r in rows
        for prefix in ["", *prefixes]
    ]
    assert len(batch["input_ids"]) == len(expected) == 6
    for row, (ids, labels) in enumerate(expected):
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (
            batch["input_ids"].shape[1] - n
        )
        assert batch["labels"][row, :n].tolist() == labels
        assert (batch["labels"][row, n:] == -100).all()
    editor._release(run)


def losses_alone(model, tok, texts: list[tuple[str, str]]) -> list[torch.Tensor]:
    """Per (text, target): its target tokens' cross-entropies, by a full forward of it alone."""
    out = []
    with torch.no_grad():
        for text, target in texts:
            ids, labels = by_hand(tok, text, target)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            gold = torch.tensor(labels[1:])
            keep = gold != -100
            out.append(
                torch.nn.functional.cross_entropy(logits[keep], gold[keep], reduction="none")
            )
    return out


@pytest.mark.parametrize("fast", [True, False])
def test_the_step_loss_is_that_of_every_sequence_by_a_full_forward(setup, fast):
    """The loss of a batch with contexts (by the cached fast forward, or the full one) is the
    mean over every target token of every fact's sequences, each forwarded alone; under
    `stop="fact"` a fact's loss is the mean over all its copies' target tokens."""
    model, tok, layers = setup
    prefixes = context_prefixes(model, tok, 3)
    rows = [1, 2, 0]
    alone = [
        losses_alone(model, tok, [(p + FACTS[r].prompt, FACTS[r].target) for p in ["", *prefixes]])
        for r in rows
    ]
    for stop in ("batch", "fact"):
        editor = CrispEditor(model, tok, None, method="ft", layers=layers, contexts=3, anchors=0,
                             stop=stop, loss_stop=0.0, fast=fast, progress=False)  # fmt: skip
        assert (editor.fast is not None and editor.fast.start == 2) == fast
        run = editor._prepare(FACTS)
        assert (run.prefix is not None) == fast and len(run.sequences.pairs) == 12
        tally = _Tally()
        with torch.no_grad():
            loss = editor._batch_loss(run, editor._batch(run, rows), rows, tally)
        every = torch.cat([t for fact in alone for t in fact])
        torch.testing.assert_close(loss, every.mean(), rtol=1e-5, atol=1e-6)
        if stop == "fact":
            worst = max(float(torch.cat(fact).mean()) for fact in alone)
            assert tally.worst == pytest.approx(worst, rel=1e-5)
        editor._release(run)


def test_micro_batches_with_contexts_take_the_same_gradient(setup):
    """Slices of facts carry all their sequences: the gradient is the whole batch's."""
    model, tok, layers = setup
    grads = {}
    for micro in (0, 1):
        options = dict(method="ft", layers=layers, anchors=1, contexts=2, stop="fact")
        editor = CrispEditor(model, tok, None, micro_batch=micro, progress=False, **options)
        run = editor._prepare(FACTS)
        rows = [2, 0, 1]
        assert editor._backward(run, editor._batch(run, rows), rows, _Tally())
        grads[micro] = {n: m.weight.grad.clone() for n, m in editor.modules.items()}
        editor._release(run)
    for name, g in grads[0].items():
        assert g.abs().max() > 0
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-7)


def test_an_edit_with_contexts_reports_them_and_differs_from_one_without(setup):
    """The report names the prefixes and measures efficacy on the bare prompts; the edit is
    deterministic, and not the one without contexts."""
    model, tok, layers = setup
    options = dict(method="ft", layers=layers, lr=3e-2, epochs=30, progress=False)
    deltas, models = {}, {}
    for k in (0, 2, 2):
        models[k] = copy.deepcopy(model)
        delta = CrispEditor(models[k], tok, None, contexts=k, **options).edit(FACTS)
        deltas.setdefault(k, []).append(delta)
    plain, (first, again) = deltas[0][0], deltas[2]
    pairs = [(f.prompt, f.target) for f in FACTS]
    assert first.report["efficacy"] == teacher_forced_accuracy(models[2], tok, pairs) > 0
    assert first.meta["contexts"] == 2
    assert first.report["context_prefixes"] == context_prefixes(model, tok, 2)
    assert plain.report["context_prefixes"] == [] and plain.meta["contexts"] == 0
    for key, d in first.tensors.items():
        torch.testing.assert_close(again.tensors[key], d, rtol=0, atol=0)  # deterministic
        assert (d - plain.tensors[key]).abs().max() > 1e-4


def test_contexts_is_validated_and_round_trips():
    assert option_rules("contexts")["le"] == len(CONTEXTS)  # a prefix per starter at most
    assert option_rules("value_contexts")["le"] <= len(CONTEXTS)
    settings = EditSettings(contexts=4, method="nullspace")
    assert EditSettings.from_options(settings.to_options()) == settings
    for bad in (-1, len(CONTEXTS) + 1, "2", 1.5, True):
        with pytest.raises(SettingsError) as caught:
            EditSettings.from_options({"contexts": bad})
        assert caught.value.field == "contexts"
    for method in ("memit", "alphaedit"):
        with pytest.raises(SettingsError, match="contexts applies to the projected editor"):
            EditSettings(method=method, contexts=1)


def test_a_stream_version_records_contexts_and_its_rerun_is_the_same_edit(tmp_path, tiny_tokenizer):
    """The manifest's options read back into the settings, and an edit of its facts with them
    on a fresh base model reproduces the version's delta."""
    model = make_tiny("llama")
    layers = parse_layers(model, "2-3")
    store = Store(tmp_path / "store")
    recipe = plan_curvature(model, tiny_tokenizer, "wikitext", 400, layers, seq_len=64)
    capability, _ = cached_curvature(store, model, tiny_tokenizer, recipe, progress=False)
    base = base_weights(make_tiny("llama"), layers)
    settings = EditSettings(contexts=2, layers=tuple(layers), lr=3e-2, epochs=8)
    manifest, delta = edit_on_stream(
        store, "tiny", "main", model, tiny_tokenizer, base, capability, FACTS[:2],
        settings=settings, progress=False,
    )  # fmt: skip
    assert manifest["options"]["contexts"] == 2
    rerun_settings = EditSettings.from_options(manifest["options"])
    # the manifest records the resolved template choice: off, the tiny tokenizer having none
    assert rerun_settings == replace(settings, chat_template="off")
    rerun = CrispEditor(make_tiny("llama"), tiny_tokenizer, capability, rerun_settings,
                        progress=False).edit(FACTS[:2])  # fmt: skip
    for key, d in delta.tensors.items():
        torch.testing.assert_close(rerun.tensors[key], d, rtol=1e-5, atol=1e-7)


def test_with_a_chat_template_the_prefix_sits_in_the_user_turn(setup):
    """The prefixed prompt is the user's message: the template wraps prefix and prompt
    together, and the target follows the assistant's generation prompt."""
    model, tok, layers = setup
    tok = copy.deepcopy(tok)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    editor = CrispEditor(model, tok, None, method="ft", layers=layers, contexts=1, anchors=0,
                         chat_template="on", progress=False)  # fmt: skip
    run = editor._prepare(FACTS[:1])
    (prefix,) = context_prefixes(model, tok, 1)
    batch = editor._batch(run, [0])
    text = tok.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()])
    assert text == f"<|user|>{prefix}{FACTS[0].prompt}<eos><|assistant|> {FACTS[0].target}"
    target = batch["labels"][1][batch["labels"][1] != -100]
    assert tok.decode(target) == f" {FACTS[0].target}"
    editor._release(run)
