"""How anchor subjects are chosen (`anchor_choice`, issue 23's locality lever): "random" draws
exactly as before from the original pool; "similar" takes the pool subjects nearest the edited one
by the cosine of the model's states entering the lowest edited block, never an edited subject."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch
from conftest import make_tiny
from devices import accelerator, on_accelerator

from contract.facts import Fact
from contract.settings import EditSettings, SettingsError
from crispedit import anchors as anchors_module
from crispedit import editor as editor_module
from crispedit.anchors import (
    SIMILAR_SUBJECTS,
    SUBJECT_TEMPLATE,
    SUBJECTS,
    anchor_prompts,
    is_question,
    lowest_block,
    subject_states,
)
from crispedit.editor import CrispEditor
from crispedit.models import parse_layers
from crispedit.targets import encode_prompt

FACTS = [
    Fact(
        prompt="Gérard Depardieu is a native speaker of", target="Dutch", subject="Gérard Depardieu"
    ),
    Fact(prompt="The capital of France is", target="Berlin"),  # no subject: no anchors
    Fact(prompt="Which city is Toyota based in?", target="Oslo", subject="Toyota"),  # a question
    Fact(prompt="Lyon is located in the country of", target="Peru", subject="Lyon"),
    Fact(prompt="Paris is the capital of", target="Italy", subject="Lutetia"),  # not in the prompt
    Fact(prompt="Alain Delon was born in", target="Oslo", subject="Alain Delon"),  # a pool subject
]
FAST_EDIT = {"method": "ft", "lr": 3e-2, "epochs": 2, "progress": False}


def old_anchor_prompts(facts, k=2, seed=0, questions=False):
    """crispedit.anchors.anchor_prompts as it was before `anchor_choice`, word for word."""
    if k <= 0:
        return [[] for _ in facts]
    edited = {f.subject.casefold() for f in facts if f.subject}
    pool = [s for s in SUBJECTS if s.casefold() not in edited]
    rng = random.Random(seed)
    anchors = []
    for fact in facts:
        skipped = not questions and is_question(fact.prompt)
        if skipped or not fact.subject or fact.subject not in fact.prompt:
            anchors.append([])
            continue
        others = rng.sample(pool, min(k, len(pool)))
        anchors.append([fact.prompt.replace(fact.subject, other, 1) for other in others])
    return anchors


def test_random_draws_the_anchors_it_always_drew(tiny_tokenizer):
    """The random pool is the original 58 subjects, in their order (the digest of the tuple as it
    was), and every draw is the old function's: the default, any seed, k and questions."""
    digest = hashlib.sha256("\n".join(SUBJECTS).encode()).hexdigest()
    assert digest == "3f6edc646c45b9b457f9600d84e4209ffb86010b4c4d8a67b62b1ead509f49d9"
    assert EditSettings().anchor_choice == "random"
    assert anchor_prompts(FACTS) == old_anchor_prompts(FACTS)
    for seed in (0, 1, 7):
        for k in (0, 1, 2, 4, len(SUBJECTS)):
            for questions in (False, True):
                old = old_anchor_prompts(FACTS, k, seed, questions)
                assert anchor_prompts(FACTS, k, seed, questions, "random") == old
    # and the editor asks for them as before: its anchor token ids are those of the old prompts
    model, tok = make_tiny("llama"), tiny_tokenizer
    targets = CrispEditor(model, tok, **FAST_EDIT, seed=3)._anchor_targets(FACTS, None, "cpu")
    assert targets.ids == [
        encode_prompt(tok, p) for ps in old_anchor_prompts(FACTS, seed=3) for p in ps
    ]


def test_the_similar_pool_holds_the_random_one_and_about_300_distinct_subjects():
    assert SIMILAR_SUBJECTS[: len(SUBJECTS)] == SUBJECTS
    assert 280 <= len(SIMILAR_SUBJECTS) <= 320
    assert len({s.casefold() for s in SIMILAR_SUBJECTS}) == len(SIMILAR_SUBJECTS)
    assert all(s == s.strip() and "{" not in s for s in SIMILAR_SUBJECTS)
    # a subject is represented at the text's last token, after a lead-in (not at position 0)
    assert SUBJECT_TEMPLATE.endswith("{}") and not SUBJECT_TEMPLATE.startswith("{}")


def known_vectors(near: dict[str, dict[str, float]], dim: int = 512):
    """A representation with known nearest neighbours: each pool subject a fixed random unit
    vector (nearly orthogonal to the others in `dim` dimensions), each subject of `near` the sum of
    its pool subjects' vectors with the given weights. Records every call's subjects."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.nn.functional.normalize(
        torch.randn(len(SIMILAR_SUBJECTS), dim, generator=generator), dim=-1
    )
    vectors = dict(zip(SIMILAR_SUBJECTS, basis, strict=True))
    calls = []

    def vector(subject):  # a subject outside the pool and `near`: a random one of its own
        if subject not in vectors:
            vectors[subject] = torch.nn.functional.normalize(
                torch.randn(dim, generator=generator), dim=0
            )
        return vectors[subject]

    def represent(subjects):
        calls.append(list(subjects))
        rows = []
        for s in subjects:
            if s in near:
                rows.append(sum(w * vector(o) for o, w in near[s].items()))
            else:
                rows.append(vector(s))
        return torch.stack(rows)

    represent.calls = calls
    return represent


def test_similar_takes_the_nearest_pool_subjects_by_cosine():
    """With a representation whose neighbours are known, each fact gets its own subject's k
    nearest, nearest first, in its own prompt; the norm does not count (cosine, not a dot
    product): a long vector half along the subject loses to a short one close to it."""
    near = {
        "Gérard Depardieu": {"Alain Delon": 1.0, "Catherine Deneuve": 0.6, "Sophia Loren": 0.3},
        "Lyon": {"Rome": 1.0, "Vienna": 0.8},
    }
    represent = known_vectors(near)
    facts = [FACTS[0], FACTS[3]]
    anchors = anchor_prompts(facts, k=3, choice="similar", represent=represent)
    assert anchors[0] == [
        "Alain Delon is a native speaker of",
        "Catherine Deneuve is a native speaker of",
        "Sophia Loren is a native speaker of",
    ]
    assert anchors[1][:2] == [
        "Rome is located in the country of",
        "Vienna is located in the country of",
    ]
    # one call: the pool, then each subject that gets anchors once
    (called,) = represent.calls
    assert called == [*SIMILAR_SUBJECTS, "Gérard Depardieu", "Lyon"]

    def scaled(subjects):  # "Paris" 100 times longer, half along Depardieu's direction
        rows = known_vectors(near)(subjects)
        depardieu = rows[subjects.index("Gérard Depardieu")]
        paris = subjects.index("Paris")
        rows[paris] = 100 * (rows[paris] + torch.nn.functional.normalize(depardieu, dim=0))
        return rows

    nearest = anchor_prompts([FACTS[0]], k=1, choice="similar", represent=scaled)
    assert nearest == [["Alain Delon is a native speaker of"]]


def test_similar_never_anchors_on_a_subject_of_the_edit():
    """A pool subject edited by any fact of the edit (its case aside, a question's too) is never
    an anchor, however near; the rest of the pool is, as far as k goes."""
    # Depardieu's representation is Delon's and Toyota's: both edited, so neither is taken
    near = {"Gérard Depardieu": {"Alain Delon": 1.0, "Toyota": 1.0, "Catherine Deneuve": 0.5}}
    anchors = anchor_prompts(FACTS, k=1, choice="similar", represent=known_vectors(near))
    assert anchors[0] == ["Catherine Deneuve is a native speaker of"]
    # the facts without a subject in their prompt, or a question, get none, as with random
    assert [len(a) for a in anchors] == [1, 0, 0, 1, 0, 1]
    facts = [*FACTS, Fact(prompt="paris is a city in", target="Peru", subject="paris")]
    everything = anchor_prompts(
        facts, k=len(SIMILAR_SUBJECTS), choice="similar", represent=known_vectors(near)
    )
    edited = {"Alain Delon", "Toyota", "Paris"}  # the edit's subjects in the pool
    assert len(everything[0]) == len(SIMILAR_SUBJECTS) - len(edited)
    others = {p.removesuffix(" is a native speaker of") for p in everything[0]}
    assert others == set(SIMILAR_SUBJECTS) - edited


def test_similar_is_deterministic_and_ignores_the_seed():
    near = {"Gérard Depardieu": {"Alain Delon": 1.0}, "Lyon": {"Rome": 1.0}}
    first = anchor_prompts(FACTS, k=3, seed=0, choice="similar", represent=known_vectors(near))
    for seed in (0, 5):
        again = anchor_prompts(
            FACTS, k=3, seed=seed, choice="similar", represent=known_vectors(near)
        )
        assert again == first
    # a tie (the same vector twice) goes to the subject earlier in the pool
    tied = {"Lyon": {"Rome": 1.0, "Vienna": 1.0}}
    rome_first = SIMILAR_SUBJECTS.index("Rome") < SIMILAR_SUBJECTS.index("Vienna")
    anchors = anchor_prompts([FACTS[3]], k=2, choice="similar", represent=known_vectors(tied))
    assert anchors[0][0].startswith("Rome " if rome_first else "Vienna ")


def test_similar_compares_in_float32_whatever_the_representations_dtype():
    """Two pool subjects whose cosines to the subject differ below bf16's resolution: in bf16
    they tie (the earlier would win), in float32, as computed, the nearer wins."""
    first, second = SIMILAR_SUBJECTS[0], SIMILAR_SUBJECTS[1]
    vectors = {first: [1.0, 0.0625], second: [1.0, 0.125], "Lyon": [1.0, 0.1171875]}

    def represent(subjects):
        rows = [vectors.get(s, [-1.0, float(i)]) for i, s in enumerate(subjects)]
        return torch.tensor(rows, dtype=torch.bfloat16)

    unit = torch.nn.functional.normalize(represent([first, second, "Lyon"]), dim=-1)
    in_bf16 = unit[2] @ unit[:2].T
    assert in_bf16[0] == in_bf16[1]  # the premise: bf16 cannot tell them apart
    anchors = anchor_prompts([FACTS[3]], k=1, choice="similar", represent=represent)
    assert anchors == [[FACTS[3].prompt.replace("Lyon", second)]]


def reference_states(model, tok, subjects, block):
    """The representation written out: one text at a time, unpadded, the model's own hidden
    states (`hidden_states[block]` is what enters block `block`) at the last token, in fp32."""
    rows = []
    with torch.no_grad():
        for s in subjects:
            ids = torch.tensor([tok(SUBJECT_TEMPLATE.format(s))["input_ids"]])
            out = model(input_ids=ids, output_hidden_states=True)
            rows.append(out.hidden_states[block][0, -1].float())
    return torch.stack(rows)


def test_subject_states_are_the_models_states_entering_the_block(tiny_tokenizer, monkeypatch):
    """Batched and padded (more subjects than a batch), the states are the model's own, and the
    similar anchors of a real model are the pool subjects of the largest cosines under them."""
    pool = SIMILAR_SUBJECTS[:100]  # texts of several lengths, in padded batches of 64 then 36
    monkeypatch.setattr(anchors_module, "SIMILAR_SUBJECTS", pool)  # the reference runs one by one
    model = make_tiny("llama")
    ref = reference_states(model, tiny_tokenizer, [*pool, "Gérard Depardieu"], 2)
    got = subject_states(model, tiny_tokenizer, pool, 2)
    assert got.dtype == torch.float32 and got.shape == (len(pool), 32)
    torch.testing.assert_close(got, ref[:-1], rtol=1e-4, atol=1e-5)
    # another block, other states
    assert not torch.allclose(subject_states(model, tiny_tokenizer, pool[:3], 1), got[:3])

    represent = lambda subjects: subject_states(model, tiny_tokenizer, subjects, 2)  # noqa: E731
    (anchors,) = anchor_prompts([FACTS[0]], k=3, choice="similar", represent=represent)
    chosen = [pool.index(p.removesuffix(" is a native speaker of")) for p in anchors]
    cosine = torch.nn.functional.cosine_similarity(ref[-1:], ref[:-1])
    # the three largest cosines, nearest first (to rounding: the batched states differ a little)
    torch.testing.assert_close(cosine[chosen], cosine.topk(3).values, rtol=0, atol=1e-5)


def test_the_editor_represents_subjects_at_its_lowest_edited_block(tiny_tokenizer, monkeypatch):
    """The editor's similar anchors come from the states entering its lowest edited block, and
    the delta's meta and report record the choice."""
    model = make_tiny("llama")
    blocks = []

    def recording(model_, tok, subjects, block):
        blocks.append(block)
        return subject_states(model_, tok, subjects, block)

    monkeypatch.setattr(editor_module, "subject_states", recording)
    for spec, lowest in (("2-3", 2), ("1,3", 1)):
        layers = parse_layers(model, spec)
        assert lowest_block(model, layers) == lowest
        editor = CrispEditor(
            model, tiny_tokenizer, layers=layers, anchor_choice="similar", **FAST_EDIT
        )
        targets = editor._anchor_targets(FACTS, None, "cpu")
        represent = lambda s, b=lowest: subject_states(model, tiny_tokenizer, s, b)  # noqa: E731
        expected = anchor_prompts(FACTS, choice="similar", represent=represent)
        assert targets.ids == [encode_prompt(tiny_tokenizer, p) for ps in expected for p in ps]
        assert blocks[-1] == lowest
    delta = CrispEditor(
        model, tiny_tokenizer, layers=layers, anchor_choice="similar", **FAST_EDIT
    ).edit(FACTS)
    assert delta.meta["anchor_choice"] == delta.report["anchor_choice"] == "similar"
    random_delta = CrispEditor(make_tiny("llama"), tiny_tokenizer, layers=layers, **FAST_EDIT).edit(
        FACTS
    )
    assert random_delta.meta["anchor_choice"] == "random"


def test_a_bf16_model_and_one_on_the_accelerator_represent_in_float32(tiny_tokenizer):
    """A bf16 model's states come back in float32 (near the fp32 model's: the same model to bf16's
    rounding) and its similar anchors are those of those states; on the logical accelerator of
    tests/devices.py (mixing devices raises, as on CUDA) the states are computed and stay there,
    equal to the CPU's."""
    subjects = list(SIMILAR_SUBJECTS[:80])
    fp32 = subject_states(make_tiny("llama"), tiny_tokenizer, subjects, 2)
    model = make_tiny("llama").to(torch.bfloat16)
    states = subject_states(model, tiny_tokenizer, subjects, 2)
    assert states.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(states, fp32).min() > 0.99
    layers = parse_layers(model, "2-3")
    editor = CrispEditor(model, tiny_tokenizer, layers=layers, anchor_choice="similar", **FAST_EDIT)
    targets = editor._anchor_targets(FACTS, None, "cpu")
    represent = lambda s: subject_states(model, tiny_tokenizer, s, 2)  # noqa: E731
    expected = anchor_prompts(FACTS, choice="similar", represent=represent)
    assert targets.ids == [encode_prompt(tiny_tokenizer, p) for ps in expected for p in ps]
    assert targets.base.dtype == torch.float32

    with accelerator() as dev:
        there = subject_states(make_tiny("llama").to(dev), tiny_tokenizer, subjects, 2)
        assert on_accelerator(there) and there.dtype == torch.float32
        there = there.cpu()
    torch.testing.assert_close(there, fp32, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", ["nearest", "", 1, None])
def test_a_bad_anchor_choice_is_a_settings_error_naming_it(tiny_tokenizer, value):
    if value is None:  # from_options takes None for the default
        assert EditSettings.from_options({"anchor_choice": None}).anchor_choice == "random"
        return
    with pytest.raises(SettingsError) as caught:
        EditSettings.from_options({"anchor_choice": value})
    assert caught.value.field == "anchor_choice" and str(caught.value).startswith("anchor_choice ")
    with pytest.raises(SettingsError, match="anchor_choice"):
        CrispEditor(make_tiny("llama"), tiny_tokenizer, method="ft", anchor_choice=value)
    with pytest.raises(ValueError, match="anchor choice"):
        anchor_prompts(FACTS, choice=value)


def test_similar_needs_a_representation_and_round_trips_through_a_manifest():
    with pytest.raises(ValueError, match="represent"):
        anchor_prompts(FACTS, choice="similar")
    assert anchor_prompts(FACTS, k=0, choice="similar") == [[] for _ in FACTS]
    settings = EditSettings(anchor_choice="similar")
    assert EditSettings.from_options(settings.to_options()) == settings
