"""The evaluation harness on the tiny models: known answers, and agreement with direct computation.

A tiny random model knows no facts, so a "known" fact is made from the model's own greedy
continuation; its generated answers are read off the model first, then scored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from contract.facts import Fact, Neighbor, load_facts
from crispedit.corpus import read_documents
from crispedit.delta import add_to_weights
from crispedit.evaluate import (
    COUNTERFACT,
    LETTERS,
    MMLU_DIR,
    QA_TEMPLATE,
    _both,
    _read_rows,
    counterfact_scores,
    counterfact_triples,
    edited_weights,
    evaluate_edit,
    fact_retention,
    generate_answers,
    generation_accuracy,
    heldout_drift,
    locality,
    mmlu_accuracy,
    mmlu_choices,
    mmlu_prompt,
    mmlu_questions,
    normalize_answer,
    perplexity,
    preference,
    retention_triples,
    swapped_weights,
    teacher_forced_accuracy,
)
from crispedit.models import default_target_layers, get_layers, load_model
from crispedit.targets import encode_pair

ZSRE = Path(COUNTERFACT).parent / "zsre_mend_train-1k.json"
TOP_KEYS = {"efficacy", "generalization", "locality", "scores", "capability"}
CHEAP = {"tokens": 300, "retention": 6, "mmlu": 0}  # evaluate_edit options for fast runs


def layer_keys(model) -> list[str]:
    return [f"{name}.weight" for name in default_target_layers(model, n=2)]


def weights(model, keys: list[str]) -> dict[str, torch.Tensor]:
    layers = get_layers(model, [k.removesuffix(".weight") for k in keys])
    return {k: layers[k.removesuffix(".weight")].weight.detach().clone() for k in keys}


def random_delta(model, scale: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: scale * torch.randn(w.shape, generator=g)
        for k, w in weights(model, layer_keys(model)).items()
    }


def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids, one full forward per token (no cache, no padding)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def known_facts(model, tokenizer, want: int = 2) -> list[Fact]:
    """Facts the model already knows: prompt + its own greedy next token(s) as the target, kept
    when `encode_pair` gives back exactly those tokens (the target starts a new word)."""
    facts = []
    for doc in read_documents("wikitext-heldout")[:400]:
        prompt = " ".join(doc.split()[:6])
        ids = tokenizer(prompt)["input_ids"]
        for n in (2, 1):
            new = greedy(model, ids, n)
            text = tokenizer.decode(new)
            if not text.startswith(" ") or not text.strip() or tokenizer.eos_token_id in new:
                continue
            try:
                encoded, _ = encode_pair(tokenizer, prompt, text[1:])
            except ValueError:
                continue
            if encoded == ids + new:
                facts.append(Fact(prompt=prompt, target=text[1:]))
                break
        if len(facts) == want:
            return facts
    pytest.fail("the tiny model knows no fact of this construction")


def cut(text: str) -> str:
    """The answer rule, written out independently: skip leading blanks, stop at . or newline."""
    text = text.lstrip()
    for i, ch in enumerate(text):
        if ch in ".\n":
            return text[:i].strip()
    return text.strip()


# ---------------------------------------------------------------------------------------------
# weight swap


def test_swapped_weights_restores_bit_exactly_even_on_error(tiny):
    model, _ = tiny
    keys = layer_keys(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = {k: torch.randn_like(w) for k, w in weights(model, keys).items()}
    with pytest.raises(RuntimeError, match="boom"), swapped_weights(model, new):
        for k in keys:
            assert torch.equal(model.state_dict()[k], new[k])
        raise RuntimeError("boom")
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_edited_weights_are_those_of_an_applied_delta(tiny):
    model, _ = tiny
    delta = random_delta(model)
    before = weights(model, list(delta))
    edited = edited_weights(model, delta)
    assert all(torch.equal(w, before[k]) for k, w in weights(model, list(delta)).items())
    add_to_weights(model, delta)
    applied = weights(model, list(delta))
    assert all(torch.equal(edited[k], applied[k]) for k in delta)
    assert not any(torch.equal(edited[k], before[k]) for k in delta)


def test_both_without_edit_measures_once(tiny):
    model, _ = tiny
    calls = []
    base, after = _both(model, None, lambda: calls.append(1) or object())
    assert base is after and len(calls) == 1


# ---------------------------------------------------------------------------------------------
# answers and generation


@pytest.mark.parametrize(
    ("answer", "target"),
    [("Rome.", "Rome"), ("rome", "Rome"), ("  The  Rome!", "rome"), ("an Apple", "apple"),
     ("New-York", "NewYork"), ("a b c", "b c")],
)  # fmt: skip
def test_normalize_answer_matches(answer, target):
    assert normalize_answer(answer) == normalize_answer(target)


@pytest.mark.parametrize(
    ("answer", "target"), [("Paris", "Rome"), ("theatre", "atre"), ("Rome Italy", "Rome")]
)
def test_normalize_answer_differs(answer, target):
    assert normalize_answer(answer) != normalize_answer(target)


def test_normalize_answer_exact_forms():
    assert normalize_answer("  The Eiffel   Tower, Paris. ") == "eiffel tower paris"
    assert normalize_answer("An answer's end!") == "answers end"
    assert normalize_answer("...") == ""


PROMPTS = ["The Eiffel Tower is", "Paris", "The game began development in 2010 , carrying over"]


def test_generate_answers_are_the_greedy_continuation_cut(tiny):
    model, tokenizer = tiny
    answers = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=12)
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        new = greedy(model, tokenizer(prompt)["input_ids"], 12)
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        assert answer == cut(tokenizer.decode(new, skip_special_tokens=True)), prompt
    assert tokenizer.padding_side == "right"  # restored
    # left padding in a batch changes nothing
    assert answers == [generate_answers(model, tokenizer, [p], 12)[0] for p in PROMPTS]


def test_generation_accuracy_exact_match_after_normalisation(tiny):
    model, tokenizer = tiny
    for qa in (False, True):
        prompts = [QA_TEMPLATE.format(prompt=p) if qa else p for p in PROMPTS]
        answers = generate_answers(model, tokenizer, prompts)
        # the model's own answer, shouted and with a full stop, still matches
        pairs = [(p, f"{a.upper()}.") for p, a in zip(PROMPTS, answers, strict=True)]
        assert generation_accuracy(model, tokenizer, pairs, qa=qa) == 1.0
        wrong = [(p, f"{a} zzz") for p, a in zip(PROMPTS, answers, strict=True)]
        mixed = [pairs[0], *wrong[1:]]
        assert generation_accuracy(model, tokenizer, mixed, qa=qa) == pytest.approx(1 / 3)
    assert math.isnan(generation_accuracy(model, tokenizer, []))


# ---------------------------------------------------------------------------------------------
# efficacy, locality, held-out drift


def test_known_fact_scores_one_before_any_edit(tiny):
    model, tokenizer = tiny
    facts = known_facts(model, tokenizer)
    assert teacher_forced_accuracy(model, tokenizer, [(f.prompt, f.target) for f in facts]) == 1
    result = evaluate_edit(model, tokenizer, facts, None, generation=False, **CHEAP)
    assert result["efficacy"]["n"] == len(facts)
    assert result["efficacy"]["base"]["teacher_forced"] == 1.0
    assert result["efficacy"]["edited"]["teacher_forced"] == 1.0


@pytest.mark.parametrize("how", ["none", "zero"])
def test_no_edit_changes_nothing(tiny, how):
    model, tokenizer = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    facts = [
        Fact("The Eiffel Tower is located in", "Rome", paraphrases=("The Eiffel Tower is in",),
             neighbors=(Neighbor("The Louvre is located in", "Paris"),), ground_truth="Paris"),
    ]  # fmt: skip
    delta = (
        None if how == "none" else {k: torch.zeros_like(v) for k, v in random_delta(model).items()}
    )
    result = evaluate_edit(model, tokenizer, facts, delta, **CHEAP)
    assert set(result) == TOP_KEYS
    cap = result["capability"]
    assert cap["kl"] == 0.0 and cap["ppl_change_pct"] == 0.0
    assert cap["ppl_base"] == cap["ppl_edited"] > 1
    assert result["locality"] == {"n": 1, "token_agreement": 1.0, "unchanged": 1.0}
    for group in ("efficacy", "generalization"):
        assert result[group]["n"] == 1
        assert result[group]["base"] == result[group]["edited"]
    assert all(s["n"] == 1 and s["base"] == s["edited"] for s in result["scores"].values())
    assert cap["fact_retention"]["base"] == cap["fact_retention"]["edited"]
    json.dumps(result, allow_nan=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_nonzero_delta_moves_kl_and_matches_the_applied_model(tiny):
    model, tokenizer = tiny
    delta = random_delta(model, scale=0.5)
    facts = [Fact("The Eiffel Tower is located in", "Rome",
                  neighbors=(Neighbor("The Louvre is located in", "Paris"),))]  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate_edit(model, tokenizer, facts, delta, generation=False, **CHEAP)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    cap = result["capability"]
    assert cap["kl"] > 0 and cap["ppl_base"] != cap["ppl_edited"]
    assert 0 < cap["n_tokens"] <= 300
    assert result["generalization"]["n"] == 0
    assert result["generalization"]["base"]["teacher_forced"] is None
    heldout = read_documents("wikitext-heldout")
    assert cap["ppl_base"] == pytest.approx(perplexity(model, tokenizer, heldout, 300), rel=1e-5)
    add_to_weights(model, delta)  # the edited figures are those of the edited model itself
    assert cap["ppl_edited"] == pytest.approx(perplexity(model, tokenizer, heldout, 300), rel=1e-5)
    pairs = [(facts[0].prompt, facts[0].target)]
    assert result["efficacy"]["edited"]["teacher_forced"] == teacher_forced_accuracy(
        model, tokenizer, pairs
    )


def test_kl_matches_a_direct_computation(tiny):
    model, tokenizer = tiny
    delta = random_delta(model, scale=0.5)
    docs = ["The quick brown fox jumps over the lazy dog near the river bank today."]
    drift = heldout_drift(model, tokenizer, edited_weights(model, delta), docs, 100)
    ids = torch.tensor([tokenizer(docs[0])["input_ids"]])
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        add_to_weights(model, delta)
        q = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert drift["n_tokens"] == ids.shape[1] - 1
    assert drift["kl"] == pytest.approx(expected, rel=1e-4)


def test_locality_counts_unchanged_answer_positions(tiny):
    model, tokenizer = tiny
    neighbors = [("The Louvre is located in", "Paris France"), ("Rome is the capital of", "Italy")]
    same = locality(model, tokenizer, neighbors, None)
    assert same == {"n": 2, "token_agreement": 1.0, "unchanged": 1.0}
    edited = edited_weights(model, random_delta(model, scale=3.0))
    result = locality(model, tokenizer, neighbors, edited)
    # the same comparison by hand: argmax at each answer position, base vs edited
    expected = []
    for prompt, answer in neighbors:
        ids, n_prompt = encode_pair(tokenizer, prompt, answer)
        x = torch.tensor([ids])
        with torch.no_grad():
            base = model(input_ids=x).logits[0, n_prompt - 1 : len(ids) - 1].argmax(-1)
            with swapped_weights(model, edited):
                after = model(input_ids=x).logits[0, n_prompt - 1 : len(ids) - 1].argmax(-1)
        expected.append((base == after).float().mean().item())
    assert result["n"] == 2
    assert result["token_agreement"] == pytest.approx(sum(expected) / 2)
    assert result["unchanged"] == sum(e == 1.0 for e in expected) / 2
    assert locality(model, tokenizer, [], edited) == {
        "n": 0, "token_agreement": None, "unchanged": None
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# known-fact retention


def test_retention_excludes_edited_records():
    counterfact = load_facts(COUNTERFACT)
    edited = counterfact[:3]
    triples = retention_triples(edited, limit=5)
    assert len(triples) == 5
    edited_prompts = {f.prompt for f in edited}
    assert not {p for p, _, _ in triples} & edited_prompts
    kept = [f for f in counterfact[3:] if f.subject not in {e.subject for e in edited}][:5]
    assert triples == [(f.prompt, f.ground_truth, f.target) for f in kept]
    # a record about an edited subject is excluded too, whatever its prompt
    same_subject = Fact("Some other prompt", "x", subject=counterfact[3].subject)
    assert counterfact[3].prompt not in {p for p, _, _ in retention_triples([same_subject], 5)}
    # every record edited: nothing left
    assert retention_triples(counterfact, limit=10) == []


def test_retention_on_other_candidates():
    zsre = load_facts(ZSRE, limit=20)
    triples = retention_triples(zsre[:2], limit=4, candidates=zsre)
    assert triples == [(f.prompt, f.ground_truth, f.target) for f in zsre[2:6]]


def test_fact_retention_compares_mean_token_logprobs(tiny):
    model, tokenizer = tiny
    triples = retention_triples([], limit=6)
    expected = []
    for prompt, true, false in triples:
        scores = []
        for target in (true, false):
            ids, n = encode_pair(tokenizer, prompt, target)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            scores.append(
                sum(logp[t - 1, ids[t]].item() for t in range(n, len(ids))) / (len(ids) - n)
            )
        expected.append(scores[0] > scores[1])
    assert fact_retention(model, tokenizer, triples, batch_size=4) == sum(expected) / len(expected)
    result = evaluate_edit(model, tokenizer, [Fact("p", "t")], None, tokens=0, mmlu=0,
                           generation=False, triples=triples)  # fmt: skip
    assert result["capability"]["fact_retention"]["n"] == 6
    assert result["capability"]["n_tokens"] == 0 and result["capability"]["kl"] is None


# ---------------------------------------------------------------------------------------------
# CounterFact scores (ES, PS, NS)

SCORED = [
    Fact("The Eiffel Tower is located in", "Rome", ground_truth="Paris",
         paraphrases=("The Eiffel Tower stands in", "Where is the Eiffel Tower? It is in"),
         neighbors=(Neighbor("The Louvre is located in", "Paris"),
                    Neighbor("Notre-Dame is in", "paris"),  # the true object, spelt otherwise
                    Neighbor("The Colosseum is in", "Rome"))),  # not the true object: left out
    Fact("Danielle Darrieux's mother tongue is", "English language", ground_truth="French",
         paraphrases=("Danielle Darrieux grew up speaking",),
         neighbors=(Neighbor("Léon Blum's mother tongue is", "French"),)),
    Fact("Toko Yasuda plays the", "piano", ground_truth="electric guitar",
         neighbors=(Neighbor("Jimi Hendrix plays the", "electric guitar"),)),
    Fact("Ice is", "cold", paraphrases=("Frozen water is",)),  # no true object: left out
    Fact("Snow is", "White", ground_truth="white", neighbors=(Neighbor("Milk is", "white"),)),
]  # fmt: skip
# the triples written out by hand: (prompt, answer that should be the more likely, the other)
SCORED_TRIPLES = {
    "efficacy": [
        ("The Eiffel Tower is located in", "Rome", "Paris"),
        ("Danielle Darrieux's mother tongue is", "English language", "French"),
        ("Toko Yasuda plays the", "piano", "electric guitar"),
    ],
    "paraphrase": [
        ("The Eiffel Tower stands in", "Rome", "Paris"),
        ("Where is the Eiffel Tower? It is in", "Rome", "Paris"),
        ("Danielle Darrieux grew up speaking", "English language", "French"),
    ],
    "neighborhood": [
        ("The Louvre is located in", "Paris", "Rome"),
        ("Notre-Dame is in", "Paris", "Rome"),
        ("Léon Blum's mother tongue is", "French", "English language"),
        ("Jimi Hendrix plays the", "electric guitar", "piano"),
    ],
}


def answer_logprobs(model, tokenizer, prompt: str, answer: str) -> list[float]:
    """Each answer token's log-probability after the prompt: one full forward of that sequence
    alone (no batch, no padding)."""
    ids, n = encode_pair(tokenizer, prompt, answer)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [logp[t - 1, ids[t]].item() for t in range(n, len(ids))]


def brute_scores(model, tokenizer, reduce) -> tuple[dict[str, float], list[bool]]:
    """Each score as the share of SCORED_TRIPLES whose first answer wins under `reduce` (of the
    token log-probabilities), and every comparison's outcome."""
    scores, wins = {}, []
    for name, triples in SCORED_TRIPLES.items():
        won = [
            reduce(answer_logprobs(model, tokenizer, p, a))
            > reduce(answer_logprobs(model, tokenizer, p, b))
            for p, a, b in triples
        ]
        scores[name], wins = sum(won) / len(won), wins + won
    return scores, wins


def test_counterfact_triples_are_those_written_by_hand():
    assert counterfact_triples(SCORED) == SCORED_TRIPLES


def test_counterfact_scores_equal_a_brute_force_computation(tiny):
    model, tokenizer = tiny
    delta = random_delta(model, scale=0.5)
    result = evaluate_edit(model, tokenizer, SCORED, delta, tokens=0, retention=0, mmlu=0,
                           generation=False)["scores"]  # fmt: skip
    assert {k: v["n"] for k, v in result.items()} == {"efficacy": 3, "paraphrase": 3,
                                                       "neighborhood": 4}  # fmt: skip
    # batches that split a triple's two answers apart give the same share
    ns = preference(model, tokenizer, SCORED_TRIPLES["neighborhood"], batch_size=3)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    base, base_wins = brute_scores(model, tokenizer, mean)
    _, base_sum_wins = brute_scores(model, tokenizer, sum)
    add_to_weights(model, delta)  # the edited figures are those of the edited model itself
    edited, edited_wins = brute_scores(model, tokenizer, mean)
    _, edited_sum_wins = brute_scores(model, tokenizer, sum)
    assert {k: v["base"] for k, v in result.items()} == base
    assert {k: v["edited"] for k, v in result.items()} == edited
    assert ns == base["neighborhood"]
    assert base != edited  # the delta moved some comparison
    # the answers' lengths differ, so the sum of log-probabilities would decide otherwise somewhere:
    # the scores above compare means, as the papers' code does
    assert base_wins + edited_wins != base_sum_wins + edited_sum_wins


def test_facts_without_a_true_object_have_no_scores(tiny):
    model, tokenizer = tiny
    none = {"n": 0, "base": None, "edited": None}
    facts = [SCORED[3], SCORED[4]]  # no true object; a true object that is the new one
    result = evaluate_edit(model, tokenizer, facts, random_delta(model), tokens=0, retention=0,
                           mmlu=0, generation=False)  # fmt: skip
    assert result["scores"] == {"efficacy": none, "paraphrase": none, "neighborhood": none}
    assert counterfact_scores(model, tokenizer, [], None)["efficacy"] == none
    json.dumps(result, allow_nan=False)


def test_scores_off_skips_them_and_changes_nothing_else(tiny):
    model, tokenizer = tiny
    delta = random_delta(model, scale=0.5)
    cheap = dict(tokens=64, retention=0, mmlu=0, generation=False)
    full = evaluate_edit(model, tokenizer, SCORED, delta, **cheap)
    skipped = evaluate_edit(model, tokenizer, SCORED, delta, scores=False, **cheap)
    none = {"n": 0, "base": None, "edited": None}
    assert full["scores"]["efficacy"]["n"] == 3
    assert skipped["scores"] == {"efficacy": none, "paraphrase": none, "neighborhood": none}
    assert {k: v for k, v in skipped.items() if k != "scores"} == {
        k: v for k, v in full.items() if k != "scores"
    }


def test_zsre_has_efficacy_and_paraphrase_scores_but_no_neighbourhood():
    """zsRE records carry their true answers, so ES and PS are defined; their neighbours are
    unrelated questions, not other subjects with the true object, so NS is not."""
    zsre = load_facts(ZSRE, limit=5)
    triples = counterfact_triples(zsre)
    assert triples["efficacy"] == [(f.prompt, f.target, f.ground_truth) for f in zsre]
    assert len(triples["paraphrase"]) == sum(len(f.paraphrases) for f in zsre) > 0
    assert triples["neighborhood"] == []


# ---------------------------------------------------------------------------------------------
# MMLU


def test_mmlu_prompt_has_five_shots_then_the_question():
    shots = _read_rows(MMLU_DIR / "world_religions_dev.csv")
    row = _read_rows(MMLU_DIR / "world_religions_test.csv")[0]
    prompt = mmlu_prompt("world_religions", shots, row)
    assert len(shots) == 5
    assert prompt.startswith(
        "The following are multiple choice questions (with answers) about world religions.\n\n"
    )
    blocks = prompt.split("\n\n")[1:]
    assert len(blocks) == 6 and prompt.count("Answer:") == 6
    for shot, block in zip(shots, blocks, strict=False):
        assert block.startswith(shot["question"] + "\nA. " + shot["choice0"])
        assert block.endswith(f"\nD. {shot['choice3']}\nAnswer: {LETTERS[int(shot['answer'])]}")
    assert blocks[-1] == (
        f"{row['question']}\nA. {row['choice0']}\nB. {row['choice1']}\nC. {row['choice2']}\n"
        f"D. {row['choice3']}\nAnswer:"
    )


def test_mmlu_bundle_is_interleaved_by_subject():
    questions = mmlu_questions()
    subjects = sorted(p.name.removesuffix("_test.csv") for p in MMLU_DIR.glob("*_test.csv"))
    assert len(subjects) == 8 and len(questions) == 200
    first = [p.split(" about ")[1].split(".\n")[0] for p, _ in questions[:8]]
    assert first == [s.replace("_", " ") for s in subjects]
    assert mmlu_questions(3) == questions[:3]
    assert all(a in range(4) for _, a in questions)


def test_mmlu_scoring_picks_the_argmax_letter(tiny):
    model, tokenizer = tiny
    rows = _read_rows(MMLU_DIR / "global_facts_test.csv")[:5]
    shots = _read_rows(MMLU_DIR / "global_facts_dev.csv")
    # short prompts (the tiny GPT-2 has 256 positions) of different lengths, to pad the batches
    prompts = [mmlu_prompt("global_facts", shots[:0], row) for row in rows]
    letters = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"][0] for c in LETTERS]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            logits = model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]])).logits
            expected.append(int(logits[0, -1, letters].argmax()))
    assert mmlu_choices(model, tokenizer, prompts, batch_size=3) == expected
    answers = [int(r["answer"]) for r in rows]
    accuracy = sum(e == a for e, a in zip(expected, answers, strict=True)) / len(rows)
    questions = list(zip(prompts, answers, strict=True))
    assert mmlu_accuracy(model, tokenizer, questions, batch_size=2) == accuracy


def test_evaluate_edit_mmlu_counts_and_skip(tiny_model_dir, tiny_tokenizer):
    model, _ = load_model(str(tiny_model_dir))  # a Llama: rotary positions fit 5-shot prompts
    facts = [Fact("The Eiffel Tower is located in", "Rome")]
    options = {"tokens": 0, "retention": 0, "generation": False}
    result = evaluate_edit(model, tiny_tokenizer, facts, random_delta(model), mmlu=3, **options)
    mmlu = result["capability"]["mmlu"]
    assert mmlu["n"] == 3 and 0 <= mmlu["base"] <= 1 and 0 <= mmlu["edited"] <= 1
    skipped = evaluate_edit(model, tiny_tokenizer, facts, None, mmlu=0, **options)["capability"]
    assert skipped["mmlu"] == {"n": 0, "base": None, "edited": None}
    assert skipped["fact_retention"] == {"n": 0, "base": None, "edited": None}


def test_evaluate_edit_rejects_bad_arguments(tiny):
    model, tokenizer = tiny
    facts = [Fact("a", "b")]
    delta = random_delta(model)
    with pytest.raises(ValueError, match="not both"):
        evaluate_edit(model, tokenizer, facts, delta, edited=edited_weights(model, delta))
    with pytest.raises(ValueError, match="mmlu"):
        evaluate_edit(model, tokenizer, facts, mmlu=-1)


# ---------------------------------------------------------------------------------------------
# the real model


@pytest.mark.model
def test_smollm2_known_fact_scores_one_every_way(smollm2):
    model, tokenizer = smollm2()
    # SmolLM2 completes this prompt with "Paris" and answers "Paris" in the QA context as well
    fact = Fact("The city where you can visit the Eiffel Tower is", "Paris")
    # a plain completion: in the chat template the assistant's turn starts with a sentence
    result = evaluate_edit(
        model, tokenizer, [fact], None, tokens=256, retention=20, mmlu=0, chat_template="off"
    )
    assert result["efficacy"]["base"] == {
        "teacher_forced": 1.0, "generation": 1.0, "generation_qa": 1.0
    }  # fmt: skip
    assert result["capability"]["fact_retention"]["base"] > 0.5  # it knows most true objects
    assert result["capability"]["kl"] == 0.0


@pytest.mark.model
def test_smollm2_counterfact_scores_before_any_edit(smollm2):
    model, tokenizer = smollm2()
    facts = load_facts(COUNTERFACT, limit=20)
    # plain prompts, as fact_retention below reads them
    result = evaluate_edit(model, tokenizer, facts, None, tokens=0, retention=0, mmlu=0,
                           generation=False, chat_template="off")  # fmt: skip
    scores = result["scores"]
    # each bundled record has one paraphrase and one neighbour sharing its true object
    assert all(s["n"] == 20 and s["base"] == s["edited"] for s in scores.values())
    # unedited, the model mostly prefers the true object, on the subjects and their neighbours
    # (with a margin of a few records either way)
    assert scores["efficacy"]["base"] < 0.5 and scores["neighborhood"]["base"] > 0.5
    # ES is retention's comparison turned round, on the same prompts
    triples = [(f.prompt, f.ground_truth, f.target) for f in facts]
    assert scores["efficacy"]["base"] == pytest.approx(
        1 - fact_retention(model, tokenizer, triples)
    )
