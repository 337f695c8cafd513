"""Edit metrics: how well an edit landed, and what else it changed.

Every metric compares a BASE model with an EDITED one, and only one model is held in memory: the
edited layers' weights are swapped in and out around each computation (`swapped_weights`).

- efficacy and generalization (the edit prompts and their paraphrases): teacher-forced (every
  target token is the argmax given the prompt and the previous target tokens) and generated
  (greedy answer, exact match after SQuAD normalisation, without and with a QA context, as in
  "The Mirage of Model Editing", Yang et al. 2025);
- locality (the neighbour prompts): how many teacher-forced argmax predictions on the neighbours'
  answers the edit left unchanged (EasyEdit's definition);
- scores: the CounterFact literature's probability comparisons (Meng et al. 2022, "Locating and
  Editing Factual Associations in GPT"): efficacy, paraphrase and neighbourhood score, the share
  of prompts where the new object is more likely than the true one (the true one on the
  neighbours; "likely": mean per-token log-probability of the whole answer, as the papers' code
  compares them), for facts that carry a true object;
- capability: held-out perplexity and per-token KL(base ‖ edited) on text the curvature never saw
  (`wikitext-heldout`), known-fact retention on CounterFact records that were not edited (ROME's
  true-vs-counterfactual log-probability test), and 5-shot MMLU accuracy on a bundled subset.

    report = evaluate_edit(model, tokenizer, facts, delta.tensors)   # the model holds the base
"""

from __future__ import annotations

import csv
import itertools
import math
import re
import string
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from contract.facts import Fact, load_facts
from contract.settings import DEFAULTS
from crispedit.corpus import ASSETS, BATCH_SIZE, pad_batches, read_documents, token_sequences
from crispedit.curvature import valid_label_mask
from crispedit.delta import add_to_weights
from crispedit.models import get_layers
from crispedit.targets import (
    IGNORE,
    prompt_text,
    resolve_chat_template,
    target_batches,
    target_hits,
)

EVAL_BATCH = 32  # prompt/target pairs per teacher-forced batch
EVAL_TOKENS = 8192  # held-out tokens for perplexity and KL
HELDOUT = "wikitext-heldout"  # never the curvature corpus
GEN_BATCH = 16  # prompts per generation batch
MAX_NEW_TOKENS = 40
STOP_CHARS = (".", "\n")  # a generated answer ends at the first of these (or at EOS)
QA_TEMPLATE = "Please answer the question:\n\nQ: {prompt}\nA:"
RETENTION = 200  # non-edited CounterFact records for known-fact retention
COUNTERFACT = ASSETS / "counterfact-edit-1k.json"
MMLU_DIR = ASSETS / "mmlu"  # {subject}_dev.csv (the shots) and {subject}_test.csv per subject
MMLU_SHOTS = 5
MMLU_BATCH = 8
LETTERS = "ABCD"


# ---------------------------------------------------------------------------------------------
# Base and edited weights in one model


@contextmanager
def swapped_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside: the given weights (state-dict names such as `model.layers.20.mlp.down_proj.weight`,
    storage layout) replace the model's; on exit, even when the body raises, the original weights
    come back bit for bit. Lets one resident model play both the base and the edited model."""
    layers = get_layers(model, [key.removesuffix(".weight") for key in tensors])
    params = {key: layers[key.removesuffix(".weight")].weight for key in tensors}
    saved = {key: p.detach().clone() for key, p in params.items()}
    try:
        with torch.no_grad():
            for key, p in params.items():
                if tuple(p.shape) != tuple(tensors[key].shape):
                    raise ValueError(
                        f"weight {key} has shape {tuple(p.shape)}, not {tuple(tensors[key].shape)}"
                    )
                p.copy_(tensors[key])
        yield
    finally:
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(saved[key])


def edited_weights(model: nn.Module, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights `W_base + ΔW` of a delta's layers (the model holds the base), computed by
    `add_to_weights` itself, so they are bitwise those of an applied delta. The model is left
    unchanged."""
    layers = get_layers(model, [key.removesuffix(".weight") for key in delta])
    current = {key: layers[key.removesuffix(".weight")].weight.detach().clone() for key in delta}
    with swapped_weights(model, current):  # restores the base after the addition
        add_to_weights(model, dict(delta))
        return {key: layers[key.removesuffix(".weight")].weight.detach().clone() for key in delta}


def _both(model: nn.Module, edited: Mapping[str, torch.Tensor] | None, measure: Callable):
    """`measure()` on the base weights and on the edited ones; with no edit, the same result
    twice (so an unedited model compares exactly equal to itself)."""
    base = measure()
    if edited is None:
        return base, base
    with swapped_weights(model, edited):
        return base, measure()


# ---------------------------------------------------------------------------------------------
# Teacher-forced scores


@torch.no_grad()
def teacher_forced_accuracy(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = EVAL_BATCH,
    *,
    chat: bool = False,
) -> float:
    """Fraction of (prompt, target) pairs whose whole target is the greedy prediction; `chat`:
    the prompts wrapped in the chat template (crispedit.targets)."""
    if not pairs:
        return float("nan")
    device = next(model.parameters()).device
    hits = 0
    for batch in target_batches(tokenizer, pairs, batch_size, chat=chat):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hits += int(target_hits(logits, batch["labels"]).sum())
    return hits / len(pairs)


@torch.no_grad()
def locality(
    model: nn.Module,
    tokenizer,
    neighbors: Sequence[tuple[str, str]],
    edited: Mapping[str, torch.Tensor] | None,
    batch_size: int = EVAL_BATCH,
    *,
    chat: bool = False,
) -> dict:
    """How much of the model's behaviour on unrelated (prompt, answer) pairs an edit kept.

    Each pair is teacher-forced as `prompt + " " + answer` (with `chat`, the prompt wrapped in
    the chat template); at every answer position the edited
    model's argmax is compared with the base model's. `token_agreement` is the mean over pairs of
    the fraction of unchanged positions (EasyEdit), `unchanged` the fraction of pairs with every
    position unchanged; both are None when there are no pairs.
    """
    device = next(model.parameters()).device
    agreement, unchanged = [], []
    for batch in target_batches(tokenizer, neighbors, batch_size, chat=chat):
        batch = {k: v.to(device) for k, v in batch.items()}
        counted = batch["labels"][:, 1:] != IGNORE

        def argmax(batch=batch):
            return (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                .logits[:, :-1]
                .argmax(-1)
            )

        base, after = _both(model, edited, argmax)
        same = base == after
        agreement += ((same & counted).sum(-1) / counted.sum(-1)).tolist()
        unchanged += (same | ~counted).all(-1).tolist()
    n = len(agreement)
    return {
        "n": n,
        "token_agreement": sum(agreement) / n if n else None,
        "unchanged": sum(unchanged) / n if n else None,
    }


def _mean_target_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the mean log-probability of the target tokens, teacher-forced."""
    gold = labels[:, 1:]
    counted = gold != IGNORE
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    picked = logp.gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * counted).sum(-1) / counted.sum(-1)


def _key(text: str) -> str:
    # two spellings of one answer or prompt: case and runs of whitespace do not count
    return " ".join(text.split()).casefold()


def retention_triples(
    edited_facts: Sequence[Fact], limit: int = RETENTION, candidates: Sequence[Fact] | None = None
) -> list[tuple[str, str, str]]:
    """(prompt, true object, false object) of the first `limit` candidate facts that were not
    edited, for `fact_retention`. Candidates default to the bundled CounterFact records (true =
    ground_truth, false = the counterfact target_new); any facts with a ground truth will do (e.g.
    zsRE, when every CounterFact record was edited). A candidate is left out when its prompt or
    its subject is among the edited facts', since the edit may rightly have changed it."""
    if candidates is None:
        candidates = load_facts(COUNTERFACT)
    prompts = {_key(f.prompt) for f in edited_facts}
    subjects = {_key(f.subject) for f in edited_facts if f.subject}
    triples = []
    for fact in candidates:
        if len(triples) >= limit:
            break
        if _key(fact.prompt) in prompts or (fact.subject and _key(fact.subject) in subjects):
            continue
        if fact.ground_truth and _key(fact.ground_truth) != _key(fact.target):
            triples.append((fact.prompt, fact.ground_truth, fact.target))
    return triples


@torch.no_grad()
def preference(
    model: nn.Module,
    tokenizer,
    triples: Sequence[tuple[str, str, str]],
    batch_size: int = EVAL_BATCH,
    *,
    chat: bool = False,
) -> float:
    """Fraction of (prompt, a, b) triples where the model's mean per-token log-probability of
    answer a given the prompt (teacher-forced) strictly exceeds that of answer b: ROME's
    comparison of two objects, whose code (`test_batch_prediction`) divides each answer's
    negative log-likelihood by its token count, so a long answer is not penalised for its length.
    `chat`: the prompts wrapped in the chat template. NaN for no triples."""
    if not triples:
        return float("nan")
    device = next(model.parameters()).device
    pairs = [pair for p, a, b in triples for pair in ((p, a), (p, b))]
    scores = []
    for batch in target_batches(tokenizer, pairs, batch_size, chat=chat):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scores += _mean_target_logprob(logits, batch["labels"]).tolist()
    return sum(a > b for a, b in zip(scores[0::2], scores[1::2], strict=True)) / len(triples)


def fact_retention(
    model: nn.Module,
    tokenizer,
    triples: Sequence[tuple[str, str, str]],
    batch_size: int = EVAL_BATCH,
    *,
    chat: bool = False,
) -> float:
    """Fraction of (prompt, true, false) triples where the model prefers the true object
    (`preference`), as ROME's CounterFact evaluation scores known facts (`chat`: the prompts
    wrapped in the chat template). NaN for no triples."""
    return preference(model, tokenizer, triples, batch_size, chat=chat)


def counterfact_triples(facts: Sequence[Fact]) -> dict[str, list[tuple[str, str, str]]]:
    """The (prompt, preferred, other) triples of the CounterFact scores, by score: `efficacy`
    (each edited prompt, new target against the true object), `paraphrase` (each paraphrase,
    likewise) and `neighborhood` (each neighbour prompt, the true object against the new target).

    Only facts with a true object (`ground_truth`) other than their target count. A neighbour
    counts only when its answer is the fact's true object: CounterFact's neighbourhood prompts
    are other subjects sharing the relation and the true object, which is what makes "the true
    object stays more likely" mean "the edit did not spill"; neighbours with other answers
    (zsRE's Natural Questions) fall outside that definition."""
    out: dict[str, list[tuple[str, str, str]]] = {
        "efficacy": [],
        "paraphrase": [],
        "neighborhood": [],
    }
    for fact in facts:
        true, new = fact.ground_truth, fact.target
        if not true or _key(true) == _key(new):
            continue
        out["efficacy"].append((fact.prompt, new, true))
        out["paraphrase"] += [(p, new, true) for p in fact.paraphrases]
        out["neighborhood"] += [
            (n.prompt, true, new) for n in fact.neighbors if _key(n.target) == _key(true)
        ]
    return out


def counterfact_scores(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    edited: Mapping[str, torch.Tensor] | None,
    *,
    chat: bool = False,
) -> dict:
    """The CounterFact literature's scores (Meng et al. 2022, ROME; reported by MEMIT and
    AlphaEdit as ES, PS and NS), base and edited: `efficacy`, the share of edited prompts where
    the new target is more likely than the true object; `paraphrase`, the same on the
    paraphrases; `neighborhood`, the share of neighbour prompts where the true object stays more
    likely than the new target. "More likely" compares mean per-token log-probabilities of the
    whole answer, teacher-forced (`preference`), as the papers' code does. Each score is
    `{n, base, edited}` over the triples of `counterfact_triples`; with none (facts without a
    true object) n is 0 and both figures are None."""
    groups = counterfact_triples(facts)

    def measure() -> dict:
        return {
            name: _number(preference(model, tokenizer, triples, chat=chat))
            for name, triples in groups.items()
        }

    base, after = _both(model, edited, measure)
    return {
        name: {"n": len(triples), "base": base[name], "edited": after[name]}
        for name, triples in groups.items()
    }


# ---------------------------------------------------------------------------------------------
# Generation


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single
    spaces. Two answers match when their normalised forms are equal ("The Rome." == "rome")."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _cut_answer(text: str) -> str:
    # leading whitespace is not the end of an answer: "A:" is often followed by a space or newline
    text = text.lstrip()
    ends = [i for i in (text.find(c) for c in STOP_CHARS) if i >= 0]
    return text[: min(ends)].strip() if ends else text.strip()


class _AnswerEnded:
    """Stopping criterion of `generate`: True for each row whose answer has ended."""

    def __init__(self, tokenizer, start: int):
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        ended = [any(c in t.lstrip() for c in STOP_CHARS) for t in texts]
        return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = GEN_BATCH,
    *,
    chat: bool = False,
    whole: bool = False,
) -> list[str]:
    """The model's greedy answer to each prompt: the generated text up to (not including) the
    first ".", newline or EOS after any leading whitespace, stripped. Prompts are batched with left
    padding (the tokenizer's padding side is restored afterwards) and a row stops generating once
    its answer has ended. `chat`: each prompt is asked as a user turn of the chat template.
    `whole`: the whole greedy completion instead, up to EOS or `max_new_tokens`, as generated."""
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    answers = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [prompt_text(tokenizer, p, chat=chat) for p in prompts[i : i + batch_size]]
            # a templated text holds its own special tokens (crispedit.targets.encode_prompt)
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
            batch = {k: v.to(device) for k, v in batch.items()}
            start = batch["input_ids"].shape[1]
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
                stopping_criteria=StoppingCriteriaList(
                    [] if whole else [_AnswerEnded(tokenizer, start)]
                ),
            )
            for row in out[:, start:].tolist():
                row = row[: row.index(eos)] if eos in row else row
                text = tokenizer.decode(row, skip_special_tokens=True)
                answers.append(text if whole else _cut_answer(text))
    finally:
        tokenizer.padding_side = side
    return answers


def generation_accuracy(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    qa: bool = False,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = GEN_BATCH,
    *,
    chat: bool = False,
) -> float:
    """Fraction of (prompt, target) pairs whose greedy answer equals the target after
    `normalize_answer` (exact match, as in "The Mirage of Model Editing"). With `qa`, each prompt
    is asked inside QA_TEMPLATE instead of as is; with `chat`, that prompt is the user turn of
    the chat template. NaN for no pairs."""
    if not pairs:
        return float("nan")
    prompts = [QA_TEMPLATE.format(prompt=p) if qa else p for p, _ in pairs]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, chat=chat)
    hits = sum(
        normalize_answer(a) == normalize_answer(t) for a, (_, t) in zip(answers, pairs, strict=True)
    )
    return hits / len(pairs)


# ---------------------------------------------------------------------------------------------
# Held-out text


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer, documents: list[str], max_tokens: int = 8192, batch_size: int = 8
) -> float:
    """exp(mean next-token cross-entropy) over the first `max_tokens` tokens of `documents`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    sequences = token_sequences(tokenizer, documents, max_tokens)
    for batch in pad_batches(sequences, tokenizer.pad_token_id, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch, use_cache=False).logits
        mask = valid_label_mask(batch["attention_mask"])
        labels = batch["input_ids"][:, 1:][mask[:, :-1]]
        total += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1][mask[:, :-1]].float(), labels, reduction="sum"
            )
        )
        count += int(mask.sum())
    return math.exp(total / count)


@torch.no_grad()
def heldout_drift(
    model: nn.Module,
    tokenizer,
    edited: Mapping[str, torch.Tensor] | None,
    documents: list[str],
    max_tokens: int = EVAL_TOKENS,
    batch_size: int = BATCH_SIZE,
) -> dict:
    """Base and edited perplexity over the same first `max_tokens` tokens of `documents`, their
    change in percent, and the mean per-token KL(base ‖ edited) of the next-token distributions
    at the same positions; `n_tokens` counts those positions (the tokens that have a previous
    token in their sequence). Computed batch by batch (both models' log-probabilities of one batch
    at a time), so no run ever holds all logits."""
    device = next(model.parameters()).device
    nll_base = nll_edited = kl = 0.0
    count = 0
    sequences = token_sequences(tokenizer, documents, max_tokens)
    for batch in pad_batches(sequences, tokenizer.pad_token_id, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = valid_label_mask(batch["attention_mask"])[:, :-1]
        labels = batch["input_ids"][:, 1:][mask].unsqueeze(-1)

        def logprobs(batch=batch, mask=mask):
            logits = model(**batch, use_cache=False).logits[:, :-1][mask]
            return torch.log_softmax(logits.float(), -1)

        base, after = _both(model, edited, logprobs)
        nll_base -= float(base.gather(-1, labels).sum())
        nll_edited -= float(after.gather(-1, labels).sum())
        kl += float((base.exp() * (base - after)).sum())
        count += len(labels)
    if not count:
        return {
            "n_tokens": 0,
            "ppl_base": None,
            "ppl_edited": None,
            "ppl_change_pct": None,
            "kl": None,
        }
    ppl_base, ppl_edited = math.exp(nll_base / count), math.exp(nll_edited / count)
    return {
        "n_tokens": count,
        "ppl_base": ppl_base,
        "ppl_edited": ppl_edited,
        "ppl_change_pct": 100 * (ppl_edited / ppl_base - 1),
        "kl": kl / count,
    }


# ---------------------------------------------------------------------------------------------
# MMLU


def _read_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _question_block(row: dict) -> str:
    choices = "".join(f"\n{letter}. {row[f'choice{i}']}" for i, letter in enumerate(LETTERS))
    return f"{row['question']}{choices}\nAnswer:"


def mmlu_prompt(subject: str, shots: Sequence[dict], row: dict) -> str:
    """The standard MMLU few-shot prompt (Hendrycks et al. 2021): a header naming the subject,
    each solved shot as "question / A. .. D. / Answer: X" and a blank line, then the question
    ending in "Answer:". Rows have the keys question, choice0-3 and answer (0-3)."""
    topic = subject.replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
    solved = "".join(f"{_question_block(s)} {LETTERS[int(s['answer'])]}\n\n" for s in shots)
    return header + solved + _question_block(row)


def mmlu_questions(n: int | None = None, folder: Path = MMLU_DIR) -> list[tuple[str, int]]:
    """(5-shot prompt, answer index) of the first `n` (default: all) bundled MMLU test questions.

    The subjects are interleaved (the first question of each subject, then the second...) so that
    any `n` samples every subject alike. Each subject's shots are its five dev questions."""
    per_subject = []
    for test in sorted(folder.glob("*_test.csv")):
        subject = test.name.removesuffix("_test.csv")
        shots = _read_rows(folder / f"{subject}_dev.csv")[:MMLU_SHOTS]
        rows = _read_rows(test)
        per_subject.append([(mmlu_prompt(subject, shots, r), int(r["answer"])) for r in rows])
    interleaved = [q for group in itertools.zip_longest(*per_subject) for q in group if q]
    return interleaved[:n]


def _letter_ids(tokenizer) -> list[int]:
    # the token right after "Answer:" is " A" (or its first piece)
    ids = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"][0] for letter in LETTERS]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the tokenizer does not tell the answer letters apart: {ids}")
    return ids


def last_token_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, vocab) next-token logits after each right-padded row's last real token; the
    vocabulary projection runs only at those positions, not at every (batch, seq) one."""
    last = batch["attention_mask"].sum(-1) - 1
    keep = last.unique()  # sorted
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        logits_to_keep=keep, use_cache=False,
    ).logits  # fmt: skip
    return logits[torch.arange(len(last), device=last.device), torch.searchsorted(keep, last)]


@torch.no_grad()
def mmlu_choices(
    model: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = MMLU_BATCH
) -> list[int]:
    """For each prompt, the index of the letter among " A", " B", " C", " D" with the largest
    next-token logit. Prompts are batched by length and the vocabulary projection is computed
    only at each prompt's last position."""
    device = next(model.parameters()).device
    letters = torch.tensor(_letter_ids(tokenizer), device=device)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    choices = [0] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = next(pad_batches([encoded[i] for i in rows], tokenizer.pad_token_id, len(rows)))
        batch = {k: v.to(device) for k, v in batch.items()}
        at_last = last_token_logits(model, batch)
        for i, pick in zip(rows, at_last[:, letters].argmax(-1).tolist(), strict=True):
            choices[i] = pick
    return choices


def mmlu_accuracy(
    model: nn.Module, tokenizer, questions: Sequence[tuple[str, int]], batch_size: int = MMLU_BATCH
) -> float:
    """Fraction of (prompt, answer index) questions whose letter `mmlu_choices` picks. NaN for
    none."""
    if not questions:
        return float("nan")
    picks = mmlu_choices(model, tokenizer, [p for p, _ in questions], batch_size)
    return sum(p == a for p, (_, a) in zip(picks, questions, strict=True)) / len(questions)


# ---------------------------------------------------------------------------------------------
# Everything at once


def _number(x: float | None) -> float | None:
    # JSON has no NaN: a metric over no samples is null
    return None if x is None or math.isnan(x) else float(x)


@contextmanager
def _phase(name: str, progress: bool) -> Iterator[None]:
    started = time.perf_counter()
    yield
    if progress:
        print(f"eval: {name} ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)


def _rewrite_scores(
    model: nn.Module,
    tokenizer,
    pairs: list[tuple[str, str]],
    edited: Mapping[str, torch.Tensor] | None,
    generation: bool,
    chat: bool,
) -> dict:
    """Teacher-forced and generated (plain and QA) accuracy on pairs, base and edited."""

    def scores() -> dict:
        out = {"teacher_forced": teacher_forced_accuracy(model, tokenizer, pairs, chat=chat)}
        for key, qa in (("generation", False), ("generation_qa", True)):
            out[key] = (
                generation_accuracy(model, tokenizer, pairs, qa=qa, chat=chat)
                if generation
                else None
            )
        return {k: _number(v) for k, v in out.items()}

    base, after = _both(model, edited, scores)
    return {"n": len(pairs), "base": base, "edited": after}


def evaluate_edit(
    model: nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    delta: Mapping[str, torch.Tensor] | None = None,
    *,
    edited: Mapping[str, torch.Tensor] | None = None,
    tokens: int = EVAL_TOKENS,
    retention: int = RETENTION,
    triples: Sequence[tuple[str, str, str]] | None = None,
    mmlu: int | None = None,
    generation: bool = True,
    scores: bool = True,
    chat_template: str = DEFAULTS.chat_template,
    progress: bool = False,
) -> dict:
    """Evaluate an edit of `facts`: the model holds the BASE weights, the edit is `delta`
    (`W_edited - W_base`, a Delta's tensors) or `edited` (the edited layers' weights themselves),
    and with neither the model is compared with itself. Returns a JSON-able dict with the keys
    efficacy, generalization (paraphrases), locality (neighbours), scores (the CounterFact
    literature's probability comparisons, `counterfact_scores`) and capability (held-out
    perplexity and KL over `tokens` tokens, known-fact retention on `retention` non-edited
    CounterFact records or on the given `triples`, MMLU accuracy on `mmlu` questions, default all
    bundled). Every metric carries its sample count n; a metric over nothing (0 to skip it) is
    null. `generation=False` skips the generated answers, `scores=False` the probability
    comparisons (their figures null: they cost as much as the rest together). `chat_template`
    (auto, on, off: the edit option) wraps every prompt of the facts and of the retention set in
    the tokenizer's chat template, as the edit was trained; held-out text and MMLU's few-shot
    prompts stay plain. The model's weights are unchanged on return; `progress` prints one line
    per phase on stderr."""
    if delta is not None and edited is not None:
        raise ValueError("give the edit as delta or as edited weights, not both")
    for name, value in (("tokens", tokens), ("retention", retention), ("mmlu", mmlu)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")
    chat = resolve_chat_template(tokenizer, chat_template)
    if delta is not None:
        edited = edited_weights(model, delta)
    pairs = [(f.prompt, f.target) for f in facts]
    paraphrases = [(p, f.target) for f in facts for p in f.paraphrases]
    neighbors = [(n.prompt, n.target) for f in facts for n in f.neighbors]

    with _phase(f"efficacy on {len(pairs)} prompts", progress):
        efficacy = _rewrite_scores(model, tokenizer, pairs, edited, generation, chat)
    with _phase(f"generalization on {len(paraphrases)} paraphrases", progress):
        generalization = _rewrite_scores(model, tokenizer, paraphrases, edited, generation, chat)
    with _phase(f"locality on {len(neighbors)} neighbours", progress):
        local = locality(model, tokenizer, neighbors, edited, chat=chat)
    with _phase("CounterFact scores (efficacy, paraphrase, neighbourhood)", progress):
        scores = counterfact_scores(model, tokenizer, facts if scores else [], edited, chat=chat)
    with _phase(f"perplexity and KL on {tokens} held-out tokens", progress):
        documents = read_documents(HELDOUT) if tokens else []
        capability = heldout_drift(model, tokenizer, edited, documents, tokens)
    if triples is None:
        triples = retention_triples(facts, retention) if retention else []
    triples = list(triples)[:retention]
    with _phase(f"known-fact retention on {len(triples)} facts", progress):
        base, after = _both(
            model, edited, lambda: fact_retention(model, tokenizer, triples, chat=chat)
        )
    capability["fact_retention"] = {
        "n": len(triples),
        "base": _number(base),
        "edited": _number(after),
    }
    questions = mmlu_questions(mmlu) if mmlu != 0 else []
    with _phase(f"MMLU on {len(questions)} questions", progress):
        base, after = _both(model, edited, lambda: mmlu_accuracy(model, tokenizer, questions))
    capability["mmlu"] = {"n": len(questions), "base": _number(base), "edited": _number(after)}
    return {
        "efficacy": efficacy,
        "generalization": generalization,
        "locality": local,
        "scores": scores,
        "capability": capability,
    }
