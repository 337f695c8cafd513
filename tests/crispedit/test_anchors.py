"""Subject anchors: the prompts they make, the fast path's anchor logits, and their effect on an
edit of a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from contract.facts import Fact
from crispedit.anchors import SUBJECTS, anchor_prompts
from crispedit.corpus import pad_batches
from crispedit.editor import CrispEditor
from crispedit.models import get_layers, parse_layers
from crispedit.prefix import FastForward

FACTS = [
    Fact(prompt="The Eiffel Tower is located in", target="Rome", subject="The Eiffel Tower"),
    Fact(
        prompt="The mother tongue of Danielle Darrieux is",
        target="English",
        subject="Danielle Darrieux",
    ),
    Fact(prompt="Robert Boulter is an English", target="chef", subject="Robert Boulter"),
]
EDIT = {"method": "ft", "lr": 3e-2, "epochs": 30, "progress": False}


def test_anchor_prompts_swap_the_subject_only():
    anchors = anchor_prompts(FACTS, k=3, seed=0)
    assert [len(a) for a in anchors] == [3, 3, 3]
    for fact, prompts in zip(FACTS, anchors, strict=True):
        template = fact.prompt.replace(fact.subject, "{}", 1)
        others = set()
        for p in prompts:
            other = next(s for s in SUBJECTS if template.format(s) == p)
            others.add(other)
            assert other != fact.subject
        assert len(others) == 3  # three different subjects
    assert anchor_prompts(FACTS, k=3, seed=0) == anchors  # deterministic
    assert anchor_prompts(FACTS, k=3, seed=1) != anchors
    assert anchor_prompts(FACTS, k=0) == [[], [], []]


def test_no_anchors_without_a_subject_in_the_prompt_and_never_an_edited_subject():
    facts = [
        Fact(prompt="The capital of France is", target="Berlin"),  # no subject
        Fact(prompt="Paris is the capital of", target="Italy", subject="Lutetia"),  # not in it
        Fact(prompt="Albert Einstein was born in", target="Oslo", subject="Albert Einstein"),
        Fact(prompt="Toyota was founded in", target="Chile", subject="Toyota"),
    ]
    anchors = anchor_prompts(facts, k=len(SUBJECTS), seed=0)
    assert anchors[0] == [] and anchors[1] == []
    # every pool subject but the two being edited: neither is ever asked about in an anchor
    assert len(anchors[2]) == len(SUBJECTS) - 2
    for prompt in anchors[2] + anchors[3]:
        assert not prompt.startswith(("Albert Einstein ", "Toyota "))


def test_questions_get_anchors_only_when_asked_for():
    question = Fact(prompt="Which city is Toyota based in? ", target="Oslo", subject="Toyota")
    facts = [question, FACTS[0]]
    assert [len(a) for a in anchor_prompts(facts, k=2, seed=0)] == [0, 2]
    anchors = anchor_prompts(facts, k=2, seed=0, questions=True)
    assert [len(a) for a in anchors] == [2, 2]
    assert all(p.startswith("Which city is ") and p.endswith("? ") for p in anchors[0])


def test_the_editor_anchors_questions_only_when_told(tiny_tokenizer):
    model = make_tiny("llama")
    question = Fact(prompt="Which city is Toyota based in?", target="Oslo", subject="Toyota")
    for asked, expected in ((False, 0), (True, 2)):
        editor = CrispEditor(model, tiny_tokenizer, **EDIT, anchors=2, anchor_questions=asked)
        assert len(editor._anchor_targets([question], None, "cpu").ids) == expected


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_last_logits_equal_the_full_model(arch, tiny_tokenizer):
    model = make_tiny(arch)
    fast = FastForward.plan(model, parse_layers(model, "2-3"))
    prompts = [p for ps in anchor_prompts(FACTS, k=2) for p in ps]
    ids = [tiny_tokenizer(p)["input_ids"] for p in prompts]
    states = fast.states_of(pad_batches(ids, tiny_tokenizer.pad_token_id, 4))  # other batching
    rows = [5, 0, 3, 1]
    batch = next(pad_batches([ids[r] for r in rows], tiny_tokenizer.pad_token_id, len(rows)))
    assert batch["attention_mask"].sum(-1).unique().numel() > 1  # really padded
    with torch.no_grad():
        full = model(**batch).logits
        last = batch["attention_mask"].sum(-1) - 1
        expected = full[torch.arange(len(rows)), last]
        torch.testing.assert_close(fast.last_logits(batch, states, rows), expected)
        torch.testing.assert_close(fast.last_logits(batch), expected)


def anchor_kl(model, tok, prompts, base_logp):
    ids = [tok(p)["input_ids"] for p in prompts]
    batch = next(pad_batches(ids, tok.pad_token_id, len(ids)))
    with torch.no_grad():
        logits = model(**batch).logits
    last = batch["attention_mask"].sum(-1) - 1
    logp = logits[torch.arange(len(ids)), last].log_softmax(-1)
    if base_logp is None:
        return logp
    kl = torch.nn.functional.kl_div(logp, base_logp, log_target=True, reduction="batchmean")
    return float(kl)


def test_anchors_keep_the_other_subjects_answers_and_the_edit_still_lands(tiny_tokenizer):
    """Same edit with and without anchors: both land; with them, the next-token distribution on
    the anchor prompts (and on unseen ones, other subjects again) moves far less. A random tiny
    model's distributions are flat, so its anchor KL is small against the facts' loss: weight 10."""
    tok = tiny_tokenizer
    seen = [p for ps in anchor_prompts(FACTS, k=4, seed=0) for p in ps]
    unseen = [p for ps in anchor_prompts(FACTS, k=4, seed=7) for p in ps if p not in seen]
    base_model = make_tiny("llama")
    base_seen = anchor_kl(base_model, tok, seen, None)
    base_unseen = anchor_kl(base_model, tok, unseen, None)
    kls = {}
    for k in (0, 4):
        model = make_tiny("llama")
        layers = parse_layers(model, "2-3")
        editor = CrispEditor(model, tok, layers=layers, anchors=k, anchor_weight=10.0, **EDIT)
        delta = editor.edit(FACTS)
        assert delta.report["efficacy"] == 1.0
        assert delta.meta["anchors"] == k
        kls[k] = (
            anchor_kl(model, tok, seen, base_seen),
            anchor_kl(model, tok, unseen, base_unseen),
        )
    assert kls[4][0] < 0.5 * kls[0][0]
    assert kls[4][1] < 0.5 * kls[0][1]


def test_facts_without_subjects_edit_exactly_as_without_anchors(tiny_tokenizer):
    facts = [Fact(prompt=f.prompt, target=f.target) for f in FACTS]
    weights = []
    for k in (0, 2):
        model = make_tiny("llama")
        layers = parse_layers(model, "2-3")
        CrispEditor(model, tiny_tokenizer, layers=layers, anchors=k, **EDIT).edit(facts)
        weights.append([m.weight.detach().clone() for m in get_layers(model, layers).values()])
    for a, b in zip(*weights, strict=True):
        assert torch.equal(a, b)


def test_negative_anchors_are_refused(tiny_tokenizer):
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="anchors"):
        CrispEditor(model, tiny_tokenizer, method="ft", layers="2-3", anchors=-1)
