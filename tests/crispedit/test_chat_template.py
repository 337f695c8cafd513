"""The chat template option: `off` is today's encoding, `on` is exactly the wrapped prompts.

The tiny tokenizer has no template; these tests set one (a Jinja string) on a copy. Its turns
are spelled out by hand below (`wrapped`), so every check compares the engine's wrapping with an
independent one: an edit or an evaluation with the template on must be bit for bit the same as
one with it off on prompts wrapped by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny

from contract.facts import Fact, Neighbor
from contract.settings import EditSettings, SettingsError
from crispedit.curvature import plan_curvature
from crispedit.editor import CrispEditor
from crispedit.evaluate import evaluate_edit
from crispedit.models import parse_layers
from crispedit.sequential import edit_set_factors
from crispedit.streams import base_weights, cached_curvature, edit_on_stream
from crispedit.targets import (
    encode_pair,
    encode_prompt,
    resolve_chat_template,
    target_batches,
)
from curvature_store import Store

# a generation prompt ending in ":" (the target follows after a space) or in a newline (the
# target follows directly, as in ChatML)
COLON = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>:{% endif %}"
)
NEWLINE = COLON.replace("<|assistant|>:", "<|assistant|>\n")

FACTS = [
    Fact("The Eiffel Tower is located in", "Rome", subject="The Eiffel Tower",
         paraphrases=("Where is the Eiffel Tower? It is in",),
         neighbors=(Neighbor("The Louvre is located in", "Paris"),), ground_truth="Paris"),
    Fact("Robert Boulter is an English", "chef", subject="Robert Boulter",
         neighbors=(Neighbor("Danielle Darrieux speaks", "French"),), ground_truth="actor"),
]  # fmt: skip
TRIPLES = [("The capital of Italy is", "Rome", "Oslo"), ("Ice is", "cold", "hot")]
FAST = {"lr": 3e-2, "epochs": 6, "progress": False}


def wrapped(prompt: str, template: str = COLON) -> str:
    """The user turn and the generation prompt of COLON / NEWLINE, written out by hand."""
    end = "<|assistant|>:" if template == COLON else "<|assistant|>\n"
    return f"<|user|> {prompt}\n{end}"


def with_template(tokenizer, template: str = COLON):
    tok = copy.deepcopy(tokenizer)  # the session's tokenizer keeps having none
    tok.chat_template = template
    return tok


def wrapped_facts(facts: list[Fact]) -> list[Fact]:
    return [
        Fact(wrapped(f.prompt), f.target, subject=f.subject,
             paraphrases=tuple(wrapped(p) for p in f.paraphrases),
             neighbors=tuple(Neighbor(wrapped(n.prompt), n.target) for n in f.neighbors),
             ground_truth=f.ground_truth)
        for f in facts
    ]  # fmt: skip


def test_off_gives_the_plain_encoding_of_prompt_space_target(tiny_tokenizer):
    """DESIGN §2.5's text, `prompt + " " + target`, tokenized whole; its prompt tokens are the
    prompt's own. The default (no `chat`) and `chat=False` both give exactly that."""
    tok = with_template(tiny_tokenizer)  # a template present changes nothing when off
    for prompt, target in [("The capital of France is", "Paris"), ("Ice is", "cold water")]:
        whole = tiny_tokenizer(f"{prompt} {target}")["input_ids"]
        n = len(tiny_tokenizer(prompt)["input_ids"])
        assert whole[:n] == tiny_tokenizer(prompt)["input_ids"]  # no merge across the boundary
        assert encode_pair(tok, prompt, target) == (whole, n)
        assert encode_pair(tok, prompt, target, chat=False) == (whole, n)
        assert encode_prompt(tok, prompt) == tiny_tokenizer(prompt)["input_ids"]
    pairs = [("The capital of France is", "Paris"), ("Ice is", "cold")]
    for a, b in zip(
        target_batches(tok, pairs, 2), target_batches(tok, pairs, 2, chat=False), strict=True
    ):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("template", [COLON, NEWLINE])
def test_on_is_the_user_turn_then_the_generation_prompt_then_the_target(tiny_tokenizer, template):
    tok = with_template(tiny_tokenizer, template)
    prompt, target = "The capital of France is", "Paris"
    text = wrapped(prompt, template)
    sep = " " if template == COLON else ""  # a generation prompt ending in a newline: none
    ids, n = encode_pair(tok, prompt, target, chat=True)
    assert ids[:n] == tiny_tokenizer(text)["input_ids"] == encode_prompt(tok, prompt, chat=True)
    assert tok.decode(ids[n:]) == f"{sep}{target}"
    assert ids == tiny_tokenizer(f"{text}{sep}{target}")["input_ids"]


def test_a_template_with_its_own_bos_gets_no_second_one(tiny_tokenizer):
    """A tokenizer that adds a BOS (here <eos> in its place) and a template that writes it, as
    Llama 3's does: the wrapped prompt starts with one BOS, a plain prompt with the added one."""
    from tokenizers import processors

    tok = with_template(tiny_tokenizer, "<eos>" + COLON)
    bos = tok.convert_tokens_to_ids("<eos>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A", special_tokens=[("<eos>", bos)]
    )
    assert tok("Ice is")["input_ids"][0] == bos  # the tokenizer does add it
    ids, n = encode_pair(tok, "Ice is", "cold", chat=True)
    assert ids[:2].count(bos) == 1 and ids[0] == bos
    assert ids[:n] == tok(f"<eos>{wrapped('Ice is')}", add_special_tokens=False)["input_ids"]
    assert encode_pair(tok, "Ice is", "cold")[0][0] == bos


def test_resolution_auto_on_off(tiny_tokenizer):
    tok = with_template(tiny_tokenizer)
    assert resolve_chat_template(tok, "auto") and resolve_chat_template(tok, "on")
    assert not resolve_chat_template(tok, "off")
    assert not resolve_chat_template(tiny_tokenizer, "auto")  # no template: auto is off
    assert not resolve_chat_template(tiny_tokenizer, "off")
    with pytest.raises(SettingsError, match="chat_template is on, but the tokenizer has no"):
        resolve_chat_template(tiny_tokenizer, "on")
    with pytest.raises(SettingsError, match="chat_template must be one of auto, on, off"):
        EditSettings(chat_template="yes")


def test_on_without_a_template_is_refused_before_any_work(tiny_tokenizer):
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    on = EditSettings(method="ft", chat_template="on")
    with pytest.raises(SettingsError) as error:
        CrispEditor(model, tiny_tokenizer, None, layers="2-3", settings=on, **FAST)
    assert error.value.field == "chat_template"
    with pytest.raises(SettingsError, match="chat_template is on"):
        evaluate_edit(model, tiny_tokenizer, FACTS, None, chat_template="on", tokens=0, mmlu=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_auto_without_a_template_edits_exactly_as_off(tiny_tokenizer):
    deltas = []
    for choice in ("auto", "off"):
        settings = EditSettings(method="ft", anchors=2, chat_template=choice)
        editor = CrispEditor(
            make_tiny("llama"), tiny_tokenizer, None, layers="2-3", settings=settings, **FAST
        )
        deltas.append(editor.edit(FACTS))
    assert deltas[0].report["chat_template"] == deltas[1].report["chat_template"] == "off"
    assert all(torch.equal(deltas[0].tensors[k], deltas[1].tensors[k]) for k in deltas[0].tensors)


@pytest.mark.parametrize("fast", [True, False])
def test_an_edit_with_the_template_is_the_edit_of_the_wrapped_prompts(tiny_tokenizer, fast):
    """Facts, subject anchors, the cached prefix and the efficacy all see the wrapped prompts:
    the delta is bit for bit that of the template off on prompts wrapped by hand."""
    tok = with_template(tiny_tokenizer)
    runs = []
    for facts, choice in ((FACTS, "auto"), (wrapped_facts(FACTS), "off")):
        settings = EditSettings(method="ft", anchors=2, chat_template=choice)
        editor = CrispEditor(
            make_tiny("llama"), tok, None, layers="2-3", settings=settings, fast=fast, **FAST
        )
        runs.append(editor.edit(facts))
    on, by_hand = runs
    assert on.report["chat_template"] == "on" and by_hand.report["chat_template"] == "off"
    for key in ("efficacy", "efficacy_before", "loss_curve"):
        assert on.report[key] == by_hand.report[key]
    assert all(torch.equal(on.tensors[k], by_hand.tensors[k]) for k in on.tensors)
    assert any(t.abs().sum() > 0 for t in on.tensors.values())


def test_an_evaluation_with_the_template_is_that_of_the_wrapped_prompts(tiny_tokenizer):
    """Efficacy, generalization (teacher-forced and generated), locality, the CounterFact scores
    and retention with the template on equal those of the template off on prompts wrapped by
    hand; the held-out text is plain in both."""
    tok = with_template(tiny_tokenizer)
    model = make_tiny("llama")
    layers = parse_layers(model, "2-3")
    g = torch.Generator().manual_seed(0)
    delta = {
        f"{name}.weight": 0.3 * torch.randn(w.shape, generator=g)
        for name, w in base_weights(model, layers).items()
    }
    common = {"tokens": 200, "mmlu": 0, "generation": True}
    on = evaluate_edit(model, tok, FACTS, delta, triples=TRIPLES, chat_template="on", **common)
    hand = [(wrapped(p), true, false) for p, true, false in TRIPLES]
    by_hand = evaluate_edit(
        model, tok, wrapped_facts(FACTS), delta, triples=hand, chat_template="off", **common
    )
    assert on == by_hand
    assert {k: v["n"] for k, v in on["scores"].items()} == {
        "efficacy": 2, "paraphrase": 1, "neighborhood": 1
    }  # fmt: skip
    plain = evaluate_edit(model, tok, FACTS, delta, triples=TRIPLES, chat_template="off", **common)
    assert plain["capability"]["ppl_edited"] == on["capability"]["ppl_edited"]
    assert plain["locality"] != on["locality"] or plain["efficacy"] != on["efficacy"]


def test_a_stream_records_the_resolved_choice_and_wraps_its_edit_set(tmp_path, tiny_tokenizer):
    tok = with_template(tiny_tokenizer)
    model = make_tiny("llama")
    layers = parse_layers(model, "2-3")
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            edit_set_factors(model, tok, layers, FACTS, chat=True).to_tensors().values(),
            edit_set_factors(model, tok, layers, wrapped_facts(FACTS)).to_tensors().values(),
            strict=True,
        )
    )
    store = Store(tmp_path / "store")
    recipe = plan_curvature(model, tok, "wikitext", 400, layers, seq_len=64)
    curvature, _ = cached_curvature(store, model, tok, recipe, progress=False)
    base = base_weights(model, layers)
    manifest, _ = edit_on_stream(
        store, "tiny", "main", model, tok, base, curvature, FACTS, chat_template="auto", **FAST
    )
    assert manifest["options"]["chat_template"] == "on"
    assert EditSettings.from_options(manifest["options"]).chat_template == "on"
